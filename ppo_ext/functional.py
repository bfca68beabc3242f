"""The public API: ppo_ext.policy_loss and the PolicyLoss module, value_loss, kl_loss, and the losses and log-probs
from logits and from hidden states (see docs/SPEC.md)."""

import inspect
import numbers
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from ppo_ext.names import COUNT_INDEX, METRIC_NAMES

Normaliser = Union[None, int, float, torch.Tensor]


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. log_probs
    metrics: Dict[str, torch.Tensor]  # 0-dim float32 tensors, keys METRIC_NAMES
    counts: torch.Tensor  # int64 (8,), names COUNT_NAMES


def _split_normaliser(name: str, value: Normaliser):
    """A normaliser goes to the op as a 0-dim tensor or as a float, so numbers cost no device copy."""
    if value is None:
        return None, None
    if isinstance(value, torch.Tensor):
        return value, None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return None, float(value)
    raise TypeError(f"{name} must be a number, a 0-dim tensor or None, got {type(value).__name__}")


def _check_tensor(name: str, value, optional: bool) -> None:
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _float_option(name: str, value, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    expected = "a number or None" if optional else "a number"
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _bool_option(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _str_option(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ratio_cap: Optional[float] = None,
    importance_sampling: str = "token",
    loss_agg_mode: str = "token-mean",
    log_ratio_clamp: Optional[float] = None,
    loss_type: str = "vanilla",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    rollout_log_probs: Optional[torch.Tensor] = None,
    rollout_is: str = "none",
    rollout_is_mode: str = "truncate",
    rollout_is_low: Optional[float] = None,
    rollout_is_high: Optional[float] = None,
    rollout_is_mask_weight: str = "unit",
    ref_log_probs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
    kl_clamp: Optional[float] = None,
    kl_bias_correction: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> PolicyLossOutput:
    """The policy loss (the clipped PPO surrogate, or the family ``loss_type`` names), its metrics and its
    clip counters, in one fused kernel.

    log_probs (B, T) float32/bfloat16/float16/float64, the current policy's log-probs of the taken
    tokens; old_log_probs (B, T) or None (on-policy: ratio 1); advantages (B, T), (B, 1) or (B,);
    mask (B, T), non-zero = the token counts. loss_type (ppo_ext.LOSS_TYPES) picks the family: "vanilla" (the
    clipped surrogate), "cispo", "sapo" (tau_pos, tau_neg), "gpg", "dro" (dro_beta), "dppo_tv", "dppo_kl"
    (clip_low/clip_high are their divergence thresholds, ratio_cap their truncation), "geo_mean" (GMPO:
    importance_sampling "seq" or "seq-token", clip_low/clip_high bound the log-ratio), "vespo" (TRL's VESPO: the
    row's Gamma weight with vespo_k_pos, vespo_lambda_pos for A >= 0 and vespo_k_neg, vespo_lambda_neg for A < 0;
    a rollout_is="token" correction joins its row log-weight instead of weighting the loss). See docs/SPEC.md for
    every option. No host synchronisation.

    ref_log_probs (B, T), the reference policy's log-probs: the KL to it per token by kl_estimator (verl's
    kl_penalty names: "low_var_kl"/"k3", "kl"/"k1", "abs", "mse"/"k2", each with a "+" suffix for k2's gradient),
    its value clamped to [-kl_clamp, kl_clamp] (None: the estimator's own, verl's for k3), times the loss's ratio
    with kl_bias_correction (TRL's use_bias_correction_kl), aggregated as the loss (token_weights do not scale it);
    kl_coef times it is added to the loss. metrics["kl"] is its mean over valid tokens, metrics["kl_loss"] its
    aggregated value (without kl_coef). Same kernel pass.
    """
    # every argument by name: the torch.compile of torch 2.11 (the GPU machines') cannot trace locals()
    return _policy_loss(
        log_probs, old_log_probs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ratio_cap=ratio_cap, importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode,
        log_ratio_clamp=log_ratio_clamp, loss_type=loss_type, tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, rollout_log_probs=rollout_log_probs, rollout_is=rollout_is,
        rollout_is_mode=rollout_is_mode, rollout_is_low=rollout_is_low, rollout_is_high=rollout_is_high,
        rollout_is_mask_weight=rollout_is_mask_weight, ref_log_probs=ref_log_probs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, kl_clamp=kl_clamp, kl_bias_correction=kl_bias_correction,
        token_weights=token_weights, num_tokens=num_tokens, num_seqs=num_seqs,
        loss_scale_factor=loss_scale_factor)[0]


# policy_loss's keyword options and their defaults (what _policy_loss reads).
_POLICY_LOSS_KEYWORDS = {name: p.default for name, p in inspect.signature(policy_loss).parameters.items()
                         if p.kind == inspect.Parameter.KEYWORD_ONLY}


def _policy_loss(log_probs, old_log_probs, advantages, mask, **o) -> Tuple[PolicyLossOutput, torch.Tensor]:
    """policy_loss (its keywords in ``o``), and the op's grad_scale: 1 / the denominator of the aggregation, by
    which policy_loss_from_logits aggregates the entropy as the loss."""
    compute_grad = torch.is_grad_enabled() and getattr(log_probs, "requires_grad", False)  # (checked in the op call)
    loss, metrics, counts, _, grad_scale = _policy_loss_op(log_probs, old_log_probs, advantages, mask, compute_grad, o)
    return PolicyLossOutput(loss, dict(zip(METRIC_NAMES, metrics.unbind())), counts), grad_scale


def _policy_loss_op(log_probs, old_log_probs, advantages, mask, compute_grad: bool, o) -> Tuple[torch.Tensor, ...]:
    """The ppo_ext::policy_loss op's outputs for policy_loss's arguments (its keywords in ``o``), checked."""
    _check_tensor("log_probs", log_probs, optional=False)
    _check_tensor("old_log_probs", old_log_probs, optional=True)
    _check_tensor("advantages", advantages, optional=False)
    _check_tensor("mask", mask, optional=True)
    for name in ("token_weights", "rollout_log_probs", "ref_log_probs"):
        _check_tensor(name, o[name], optional=True)
    clip_low = _float_option("clip_low", o["clip_low"])
    clip_high = clip_low if o["clip_high"] is None else _float_option("clip_high", o["clip_high"])
    num_tokens_tensor, num_tokens_value = _split_normaliser("num_tokens", o["num_tokens"])
    num_seqs_tensor, num_seqs_value = _split_normaliser("num_seqs", o["num_seqs"])
    scale_tensor, scale_value = _split_normaliser("loss_scale_factor", o["loss_scale_factor"])

    def number(name, optional=False):
        return _float_option(name, o[name], optional)

    return torch.ops.ppo_ext.policy_loss(
        log_probs, old_log_probs, advantages, mask, o["token_weights"],
        num_tokens_tensor, num_seqs_tensor, scale_tensor, num_tokens_value, num_seqs_value, scale_value,
        clip_low, clip_high, number("dual_clip", True), number("ratio_cap", True), number("log_ratio_clamp", True),
        _str_option("loss_type", o["loss_type"]), number("tau_pos"), number("tau_neg"), number("dro_beta", True),
        number("vespo_k_pos"), number("vespo_lambda_pos"), number("vespo_k_neg"), number("vespo_lambda_neg"),
        o["rollout_log_probs"], _str_option("rollout_is", o["rollout_is"]),
        _str_option("rollout_is_mode", o["rollout_is_mode"]), number("rollout_is_low", True),
        number("rollout_is_high", True), _str_option("rollout_is_mask_weight", o["rollout_is_mask_weight"]),
        o["ref_log_probs"], number("kl_coef"), _str_option("kl_estimator", o["kl_estimator"]),
        number("kl_clamp", True), _bool_option("kl_bias_correction", o["kl_bias_correction"]),
        _str_option("importance_sampling", o["importance_sampling"]), _str_option("loss_agg_mode", o["loss_agg_mode"]),
        compute_grad,
    )


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. values
    metrics: Dict[str, torch.Tensor]  # "clipfrac": the fraction of valid tokens where the clipped term is larger
    counts: torch.Tensor  # int64 (8,), names COUNT_NAMES: valid_tokens, valid_seqs, below / above the clip range,
    #                       the clipped term larger (clipped_active); dual_clipped is 0


def value_loss(
    values: torch.Tensor,
    old_values: Optional[torch.Tensor],
    returns: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_range: Optional[float] = None,
    clip_range_high: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    token_weights: Optional[torch.Tensor] = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> ValueLossOutput:
    """The critic's clipped value loss of PPO, 0.5 * max((v - R)^2, (clamp(v, v_old - eps, v_old + eps) - R)^2)
    per token (verl's compute_value_loss, OpenRLHF's ValueLoss), aggregated as policy_loss aggregates, forward
    and backward in the same fused kernel (loss_type="value" of the policy-loss op, docs/SPEC.md).

    values (B, T) (differentiable), old_values (B, T) (the values at rollout; needed with clip_range), returns
    (B, T) or (B,); clip_range: eps, or None for the unclipped 0.5 * (v - R)^2; clip_range_high: the upper eps
    (None: clip_range). metrics["clipfrac"] is verl's vf_clipfrac. No host synchronisation.
    """
    if clip_range is None:
        if clip_range_high is not None:
            raise ValueError("clip_range_high needs clip_range")
        old_values, clip_range, clip_range_high = None, 0.0, 0.0  # v_old = v: the clipped term is v itself
    elif old_values is None:
        raise ValueError("old_values is required with clip_range (the clip is around the old values)")
    out = policy_loss(values, old_values, returns, mask, loss_type="value", clip_low=clip_range,
                      clip_high=clip_range_high, loss_agg_mode=loss_agg_mode, token_weights=token_weights,
                      num_tokens=num_tokens, num_seqs=num_seqs, loss_scale_factor=loss_scale_factor)
    return ValueLossOutput(out.loss, {"clipfrac": out.metrics["clipfrac_active"]}, out.counts)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    kl_estimator: str = "low_var_kl",
    kl_clamp: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> torch.Tensor:
    """The KL to the reference policy alone, aggregated (docs/SPEC.md "KL to a reference policy"): what
    policy_loss adds with kl_coef=1, for code that adds the KL loss apart from the policy loss (verl's, ROLL's and
    OpenRLHF's actors aggregate it so). One kernel call on a zero policy loss (A = 0, old = 0: the ratio exp(lp) is
    at most 1, and finite where lp = -inf); differentiable w.r.t. log_probs."""
    _check_tensor("log_probs", log_probs, optional=False)
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    return policy_loss(log_probs, zero.expand(log_probs.shape), zero.expand(log_probs.shape[:1]), mask,
                       ref_log_probs=ref_log_probs, kl_coef=1.0, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
                       loss_agg_mode=loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                       loss_scale_factor=loss_scale_factor).loss


class PolicyLossFromLogitsOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. logits
    metrics: Dict[str, torch.Tensor]  # METRIC_NAMES, "entropy" (mean over valid tokens) when computed,
    #                                   "entropy_loss" (aggregated as the loss) with entropy_coef
    counts: torch.Tensor  # int64 (8,), names COUNT_NAMES
    log_probs: torch.Tensor  # (B, T) float32 log-probs of the labels, detached
    entropy: Optional[torch.Tensor]  # (B, T) float32 per-token entropy (differentiable), or None


def log_probs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log_softmax(logits / temperature) at the labels, and optionally the entropy, without materialising
    the log-softmax: one pass over the logits forward, one backward (see README "From logits").

    logits (B, T, V) or (N, V), float32/bfloat16/float16/float64, the V dimension contiguous, rows of any
    stride (e.g. ``full_logits[:, :-1]`` of a (B, T + 1, V) tensor, without a copy); labels int64 (B, T)
    (or (N,), or (B, T) with N = B * T). Returns (log_probs, entropy): float32 (float64 for float64
    logits) of the labels' shape, both differentiable w.r.t. the logits (entropy None unless return_entropy): an
    entropy term's gradient, dH/dx = -p (log p + H) / temperature, joins the log-probs' in the same backward pass
    over the logits (nothing of it is computed when the entropy gets no gradient). inplace_backward=True writes the
    gradient into the logits' buffer: after
    backward the logits hold their gradient, not their values. Labels must lie in [0, V): on the CPU
    anything else raises ValueError; on a GPU it is not checked (a check would synchronise with the host)
    and gives a NaN log-prob, unless check_labels=True (a debugging aid: one host synchronisation).
    """
    _check_tensor("logits", logits, optional=False)
    _check_tensor("labels", labels, optional=False)
    temperature = _float_option("temperature", temperature)
    out_shape = labels.shape
    if check_labels:
        _check_labels_in_range(labels, logits.shape[-1], "the last dimension of logits")
    if logits.dim() == 2 and labels.dim() == 2:  # (N, V) logits of (B, T) labels
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                             f"{tuple(logits.shape)}: expected N = B * T")
        labels = labels.reshape(-1)
    log_probs, _, entropy = torch.ops.ppo_ext.token_log_probs(
        logits, labels, temperature, bool(return_entropy), bool(inplace_backward))
    log_probs = log_probs.view(out_shape)
    return log_probs, entropy.view(out_shape) if return_entropy else None


def _check_labels_in_range(labels: torch.Tensor, vocab: int, what: str) -> None:
    """check_labels=True: labels in [0, V) (one host synchronisation: a debugging aid)."""
    if not labels.numel():
        return
    bad = (labels < 0) | (labels >= vocab)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"labels must be token ids in [0, V) with V = {vocab} ({what}), got labels{list(first)} = "
                         f"{labels[first].item()}")


def _autocast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """What autocast does to an input of a lower-precision op: floating tensors but float64 cast to its dtype."""
    return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t


def log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
    check_labels: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_probs_from_logits(hidden @ weight.T + bias, labels)`` without the logits: the LM head and the log-softmax
    chunk by chunk (README "From hidden states"). Peak extra memory: one (chunk_tokens, V) buffer, whatever the
    number of tokens.

    hidden (B, T, H) or (N, H), any strides (e.g. ``last_hidden[:, :-1]``: not copied whole, except once by a 16-bit head's backward); weight (V, H), as
    ``nn.Linear(H, V).weight`` (or a tied embedding) holds it; bias (V,) or None; all of one dtype (float32,
    bfloat16, float16, float64); labels int64 of hidden's shape without H (or (B, T) for (B * T, H) hidden).
    Returns (log_probs, entropy), float32 (float64 for float64), differentiable w.r.t. hidden, weight and bias
    (entropy None unless return_entropy). The
    backward recomputes each chunk's logits (one more GEMM) rather than keeping them. chunk_tokens: the rows per
    chunk (None: from V, a buffer of about 64 MiB within 256 to 384 rows). grad_weight: float32 / float64 heads sum
    it chunk after chunk; 16-bit heads compute it by a second pass over blocks of the vocabulary, one GEMM per
    block over all tokens (rounded once); in a fixed order either way (deterministic). check_labels: see
    log_probs_from_logits. Under torch.autocast the inputs are cast as the head's F.linear would be (float64 left
    as it is; the gradients flow back to the originals' dtypes).

    process_group: the LM head split over the vocabulary across this tensor-parallel group (Megatron's / verl's
    vocabulary-parallel head): ``weight`` (and ``bias``) are this rank's rows ``[vocab_start, vocab_start + V_r)``
    of the head (default: rank * V_r), ``hidden`` and ``labels`` (global token ids) the same on every rank; the
    log-probs and entropy are the full vocabulary's, on every rank, and hidden's gradient the full one
    (``ppo_ext.distributed.vocab_parallel_log_probs``: one all-gather of a few bytes a token forward, one
    all-reduce of hidden's size backward).
    """
    hidden, weight, bias, labels, temperature = _hidden_inputs(hidden, weight, labels, bias, temperature, chunk_tokens,
                                                               check_labels and process_group is None)
    return _log_probs_of_hidden(hidden, weight, labels, bias, temperature, return_entropy, chunk_tokens, check_labels,
                                process_group, vocab_start)


def _log_probs_of_hidden(hidden, weight, labels, bias, temperature, return_entropy, chunk_tokens, check_labels,
                         process_group, vocab_start):
    """log_probs_from_hidden of checked arguments (_hidden_inputs)."""
    out_shape = labels.shape
    if hidden.dim() == 2 and labels.dim() == 2:  # (N, H) hidden states of (B, T) labels
        labels = labels.reshape(-1)
    if process_group is not None:
        from ppo_ext.distributed import vocab_parallel_log_probs

        log_probs, entropy = vocab_parallel_log_probs(
            hidden, weight, labels, process_group, bias=bias, temperature=temperature,
            compute_entropy=bool(return_entropy), chunk_tokens=int(chunk_tokens or 0), vocab_start=vocab_start,
            check_labels=check_labels)
    else:
        log_probs, _, entropy = torch.ops.ppo_ext.hidden_log_probs(
            hidden, weight, labels, bias, temperature, bool(return_entropy), int(chunk_tokens or 0))
    return log_probs.view(out_shape), entropy.view(out_shape) if return_entropy else None


def _hidden_inputs(hidden, weight, labels, bias, temperature, chunk_tokens, check_labels: bool):
    """log_probs_from_hidden's arguments checked, and cast as under autocast; (hidden, weight, bias, labels,
    temperature)."""
    for name, t, optional in (("hidden", hidden, False), ("weight", weight, False), ("labels", labels, False),
                              ("bias", bias, True)):
        _check_tensor(name, t, optional)
    temperature = _float_option("temperature", temperature)
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be an integer >= 1 or None, got {chunk_tokens!r}")
    if torch.is_autocast_enabled(hidden.device.type):  # as the LM head's F.linear would run under autocast
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = (_autocast(t, dtype) for t in (hidden, weight, bias))
    if check_labels and weight.dim() == 2:
        _check_labels_in_range(labels, weight.shape[0], "the rows of weight")
    if hidden.dim() == 2 and labels.dim() == 2 and labels.numel() != hidden.shape[0]:  # (N, H) hidden, (B, T) labels
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match hidden of shape "
                         f"{tuple(hidden.shape)}: expected N = B * T")
    return hidden, weight, bias, labels, temperature


def policy_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
    check_labels: bool = False,
    **loss_options,
) -> PolicyLossFromLogitsOutput:
    """The clipped PPO policy loss from the policy's logits: ``log_probs_from_logits`` (log_softmax of
    logits / temperature at the labels, online, no log-softmax materialised), then ``policy_loss`` on
    them with every option as there. The loss is differentiable w.r.t. the logits.

    logits (B, T, V) or (B * T, V); labels int64 (B, T); old_log_probs, advantages, mask and every keyword
    option of policy_loss (clip_low, dual_clip, loss_agg_mode, num_tokens, ...) as there. Returns loss, metrics, counts (as policy_loss), the detached (B, T) log-probs and,
    with return_entropy, the (B, T) entropy and its mean over valid tokens as metrics["entropy"].
    entropy_coef: the entropy bonus, ``loss - entropy_coef * agg(entropy)``, the entropy aggregated as the loss
    (the same loss_agg_mode and normalisers, not weighted by token_weights: verl's entropy_loss, logged as
    metrics["entropy_loss"]), its gradient in the same backward pass over the logits; the entropy is computed
    whenever entropy_coef != 0 (returned only with return_entropy). inplace_backward and check_labels: see
    log_probs_from_logits.
    """
    entropy_coef = _float_option("entropy_coef", entropy_coef)
    options = _loss_options("policy_loss_from_logits", loss_options)
    log_probs, entropy = log_probs_from_logits(
        logits, labels, temperature=temperature, return_entropy=bool(return_entropy) or entropy_coef != 0,
        inplace_backward=inplace_backward, check_labels=check_labels)
    return _loss_of_log_probs(log_probs, entropy, old_log_probs, advantages, mask, return_entropy, entropy_coef,
                              options)[0]


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    chunk_tokens: Optional[int] = None,
    check_labels: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    grad_in_forward: Optional[bool] = None,
    **loss_options,
) -> PolicyLossFromLogitsOutput:
    """policy_loss_from_logits from the hidden states and the LM head, without the logits: ``log_probs_from_hidden``
    then ``policy_loss`` (every keyword of policy_loss_from_logits but inplace_backward, which has no logits to
    overwrite). The loss is differentiable w.r.t. hidden, weight and bias; returns what policy_loss_from_logits
    returns. process_group, vocab_start: a vocabulary-parallel head (log_probs_from_hidden): every rank computes
    the same loss.

    grad_in_forward: the loss's gradients w.r.t. hidden, weight and bias are formed in the forward pass, from each
    chunk's logits while they are in their buffer, and handed over by the backward pass (times its upstream
    gradient): one GEMM fewer than recomputing the logits in the backward pass (README "From hidden states"). None
    (the default): where it applies: in eager mode (not under torch.compile), a gradient asked for, not float16 (a
    loss scaler's factor is needed before the float16 logits' gradient exists, and comes with the upstream
    gradient), and chunks that hold whole rows where the loss reads a row statistic
    (importance_sampling "seq"
    or "seq-token", geo_mean, vespo, a sequence-level rollout correction). True: required (a
    ValueError says why where it does not apply); False: never. The gradients exist from the forward pass on; a
    second backward through the same graph (retain_graph=True) recomputes. The same numbers either way (bitwise
    under an upstream gradient of 1 with token-level options, no seq-mean-token-mean, no entropy bonus; else to
    rounding: the upstream gradient is applied after the GEMMs of grad_hidden and of a float32 / float64 head's
    gradient). With a process_group each chunk's log-probs are combined over the ranks (one all-gather of the
    chunk's rows) and grad_hidden is all-reduced in the forward pass."""
    entropy_coef = _float_option("entropy_coef", entropy_coef)
    options = _loss_options("policy_loss_from_hidden", loss_options)
    hidden, weight, bias, labels, temperature = _hidden_inputs(hidden, weight, labels, bias, temperature, chunk_tokens,
                                                               check_labels and process_group is None)
    need_entropy = bool(return_entropy) or entropy_coef != 0
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be True, False or None, got {type(grad_in_forward).__name__}")
    if grad_in_forward is not False:
        from ppo_ext.hidden import plan, policy_loss_grad_in_forward

        chunks, chunk, why_not = plan(hidden, weight, bias, labels, (old_log_probs, advantages, mask), chunk_tokens,
                                      options, vocab_parallel=process_group is not None)
        if chunks is not None:
            return policy_loss_grad_in_forward(
                hidden, weight, bias, labels, old_log_probs, advantages, mask, temperature=temperature, chunks=chunks,
                chunk=chunk, entropy_coef=entropy_coef, return_entropy=return_entropy, options=options,
                process_group=process_group, vocab_start=vocab_start, check_labels=check_labels)
        if grad_in_forward and why_not is not None:  # (None: arguments the generic path's checks reject)
            _check_loss_options(options)  # an invalid option's own error first
            raise ValueError(f"grad_in_forward=True does not apply here: {why_not}")
    log_probs, entropy = _log_probs_of_hidden(hidden, weight, labels, bias, temperature, need_entropy, chunk_tokens,
                                              check_labels, process_group, vocab_start)
    return _loss_of_log_probs(log_probs, entropy, old_log_probs, advantages, mask, return_entropy, entropy_coef,
                              options)[0]


def _check_loss_options(options) -> None:
    """policy_loss's own error where its options are invalid (checked on an empty batch)."""
    empty = torch.zeros(0, 0)
    tensors = ("token_weights", "rollout_log_probs", "ref_log_probs", "num_tokens", "num_seqs", "loss_scale_factor")
    _policy_loss_op(empty, None, torch.zeros(0), None, False, {
        **options, **{k: empty if isinstance(options[k], torch.Tensor) and options[k].dim() == 2 else None
                      for k in tensors}})


def _loss_options(caller: str, loss_options) -> Dict:
    unknown = loss_options.keys() - _POLICY_LOSS_KEYWORDS.keys()
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {sorted(unknown)}")
    return {**_POLICY_LOSS_KEYWORDS, **loss_options}


def _loss_of_log_probs(log_probs, entropy, old_log_probs, advantages, mask, return_entropy: bool,
                       entropy_coef: float, options) -> Tuple[PolicyLossFromLogitsOutput, torch.Tensor]:
    """The policy loss of the log-probs (and entropy) of the from-logits and from-hidden paths, with the entropy
    metrics and bonus; and the op's grad_scale."""
    out, grad_scale = _policy_loss(log_probs, old_log_probs, advantages, mask, **options)
    loss, metrics = out.loss, out.metrics
    if entropy is not None:
        valid = None if mask is None else mask != 0
        masked = entropy if valid is None else torch.where(valid, entropy, 0)
        valid_tokens = out.counts[COUNT_INDEX["valid_tokens"]]
        metrics = {**metrics, "entropy": (masked.detach().sum() / valid_tokens.clamp(min=1)).float()}
        if entropy_coef != 0:
            entropy_loss = _aggregate_like_the_loss(masked, valid, options["loss_agg_mode"], grad_scale)
            loss = loss - entropy_coef * entropy_loss
            metrics["entropy_loss"] = entropy_loss.detach().float()
    return PolicyLossFromLogitsOutput(loss, metrics, out.counts, log_probs.detach(),
                                      entropy if return_entropy else None), grad_scale


def _aggregation_weights(valid: Optional[torch.Tensor], shape, loss_agg_mode: str, dtype: torch.dtype,
                        device) -> torch.Tensor:
    """Each token's weight in the aggregation's sum, before the kernel's 1 / denominator (docs/SPEC.md
    "Aggregation"): 1 where valid (valid None: everywhere), 0 where not; divided by the row's valid tokens for
    seq-mean-token-mean."""
    w = torch.ones(shape, dtype=dtype, device=device) if valid is None else valid.to(dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        w = w / w.sum(1, keepdim=True).clamp(min=1)
    return w


def _aggregate_like_the_loss(x: torch.Tensor, valid: Optional[torch.Tensor], loss_agg_mode: str,
                             grad_scale: torch.Tensor) -> torch.Tensor:
    """x (B, T), 0 at masked positions, aggregated as the policy loss is: its sum with the aggregation's weights,
    times the kernel's 1 / denominator."""
    if loss_agg_mode == "seq-mean-token-mean":
        x = x * _aggregation_weights(valid, x.shape, loss_agg_mode, x.dtype, x.device)
    return x.sum() * grad_scale


class PolicyLoss(torch.nn.Module):
    """ppo_ext.policy_loss as a module: the options are fixed at construction, the tensors (and the
    per-step normalisers) are given to forward."""

    def __init__(self, **options):
        super().__init__()
        per_call = {"token_weights", "rollout_log_probs", "ref_log_probs", "num_tokens", "num_seqs", "loss_scale_factor"} & options.keys()
        if per_call:
            raise TypeError(f"{sorted(per_call)} change with every batch: pass them to forward, not to PolicyLoss()")
        # validates the options now (a rollout correction's and the KL's checks need their log-probs)
        rollout = torch.zeros(0, 0) if options.get("rollout_is", "none") != "none" else None
        ref = torch.zeros(0, 0) if any(name.startswith("kl_") for name in options) else None
        policy_loss(torch.zeros(0, 0), None, torch.zeros(0), rollout_log_probs=rollout, ref_log_probs=ref, **options)
        self.options = options

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: Optional[torch.Tensor],
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        token_weights: Optional[torch.Tensor] = None,
        *,
        rollout_log_probs: Optional[torch.Tensor] = None,
        ref_log_probs: Optional[torch.Tensor] = None,
        num_tokens: Normaliser = None,
        num_seqs: Normaliser = None,
        loss_scale_factor: Normaliser = None,
    ) -> PolicyLossOutput:
        return policy_loss(
            log_probs, old_log_probs, advantages, mask, token_weights=token_weights,
            rollout_log_probs=rollout_log_probs, ref_log_probs=ref_log_probs, num_tokens=num_tokens,
            num_seqs=num_seqs, loss_scale_factor=loss_scale_factor, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
