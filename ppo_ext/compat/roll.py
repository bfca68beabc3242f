"""ROLL adapter: ROLL's ``ActorWorker.loss_func`` on ppo_ext's kernel: the policy-gradient loss, and with
``ref_log_probs`` / ``entropy`` its KL loss (``use_kl_loss``, ``kl_loss_coef``: ROLL's k3, in the same kernel pass)
and entropy bonus (``entropy_loss_coef``).

``compute_policy_loss`` takes ROLL's config vocabulary (``pg_clip``, ``pg_clip_low``, ``pg_clip_high``,
``use_pg_clip_range``, ``dual_clip_loss``, ``importance_sampling`` "token"/"seq", ``loss_agg_mode``),
from ROLL's ``pipeline_config`` or as keywords, and returns ``(pg_loss, metrics)``: the loss ROLL's
``agg_loss`` gives (``weighted_pg_loss`` when ``sample_weights`` are given), computed with its gradient
by one fused ``ppo_ext.policy_loss`` call, and the metrics of ROLL's actor worker (and of the seed
document) under their keys. Inside ``loss_func``::

    from ppo_ext.compat.roll import compute_policy_loss

    pg_loss, pg_metrics = compute_policy_loss(
        log_probs, old_log_probs, advantages, final_response_mask, self.pipeline_config,
        sample_weights=sample_weights)

How ROLL's options map onto ppo_ext's (docs/SPEC.md):

- clip: ``clip_low = pg_clip_low if use_pg_clip_range else pg_clip`` (``clip_high`` likewise);
- ``importance_sampling="token"``: ``exp(log_probs - old_log_probs)``; ``"seq"``: ``exp`` of the masked
  mean log-ratio of the row, the gradient flowing through the mean (ppo_ext's ``"seq"``);
- ``dual_clip_loss``: ROLL's ``-max(-loss, (1 + 2 * pg_clip) * A)`` for ``A < 0`` is ppo_ext's dual clip
  with ``c = 1 + 2 * pg_clip`` (``pg_clip``, not ``pg_clip_low``; it must be > 0 so that ``c > 1``);
- ``loss_agg_mode`` (ROLL's ``agg_loss``; ROLL's default is ``seq-mean-token-mean``):
  ``token-mean``: sum / ``batch_num_tokens``;
  ``seq-mean-token-mean`` and ``seq-mean-token-sum``: sum over the rows with a valid token /
  ``global_valid_samples``;
  ``seq-mean-token-sum-norm``: sum / ``T`` (``num_seqs=1``, ``loss_scale_factor=T``);
- the normalisers are the ones ROLL's training strategy hands ``loss_func`` in ``data.meta_info``
  (``Strategy._get_batch_num_tokens`` / ``_get_global_valid_samples`` of ROLL's ``strategy.py``, called
  by the Megatron and FSDP2 strategies' ``train_step`` on the batch of one optimizer step and
  all-reduced over the data-parallel group; links below): ``batch_num_tokens``
  = the valid tokens, ``global_valid_samples`` = the rows with *at least one* valid token (not all rows:
  that is only its ``"default"`` entry, which ``loss_func`` does not use). Without them the adapter uses
  these counts of this batch, ``N`` and ``S`` (what the strategy computes on one rank holding the whole
  batch); for data parallel pass ``ppo_ext.distributed.global_normalisers``'s ``num_tokens`` and
  ``num_seqs``. (``agg_loss``'s own fallback, ``loss_mat.size(0)`` = all ``B`` rows, is not what a ROLL
  training run computes: ``loss_func`` always passes the strategy's counts.) ROLL multiplies each
  micro-batch's loss by ``num_microbatches * dp_size`` (``loss_scale``) against the averaging of
  Megatron/FSDP, so the gradient it applies is the *sum* over ranks of these losses' gradients;
- ``sample_weights`` (B,) (ROLL's ``weighted_pg_loss``) and ``token_weights`` (B, T) (e.g. a clamped
  train/infer importance ratio) multiply the per-token loss (ppo_ext's ``token_weights``).

The metrics, and how each differs from the core API's masked metric (``ppo_ext.policy_loss(...).metrics``,
over valid tokens only, token-weighted). ``m`` is the mask, ``r`` the ratio ROLL computes at *every*
position (token level: ``exp(log_probs - old_log_probs)``, padding included; sequence level: the row's
ratio broadcast over the row, 1 for a row without valid token), ``B x T`` the shape:

``actor/ppo_ratio_high_clipfrac``  mean of ``r > 1 + clip_high`` over all ``B*T`` positions, padding
    included (the seed's ``clipped_high.mean()``). Core ``clipfrac_high`` divides the count over valid
    tokens by the valid tokens ``N``. At the sequence level ROLL's value is the fraction of the ``B``
    rows that clip (each row counts ``T`` times), the core's the fraction of valid tokens in such rows.
``actor/ppo_ratio_low_clipfrac``   the same for ``r < 1 - clip_low`` (core ``clipfrac_low``).
``actor/ppo_ratio_clipfrac``       their sum (the seed's ``clipped.mean()``; core ``clipfrac``).
``actor/clipfrac``    the indicator of the clip in force (``surr2 < surr1``, the core's ``clipped_active``
    count) aggregated like the loss, with the loss's normalisers (ROLL's ``agg_loss`` with
    ``loss_agg_mode``, ``batch_num_tokens`` and ``global_valid_samples``): ``token-mean`` count /
    ``batch_num_tokens`` (the core's ``clipfrac_active`` when that is the local ``N``);
    ``seq-mean-token-mean`` the sum of the per-row fractions / ``global_valid_samples``;
    ``seq-mean-token-sum`` count / ``global_valid_samples``; ``-norm`` count / ``T``. With global
    normalisers it is this rank's share: the ranks' values add up to the whole batch's. (ROLL's
    ``token-mean`` numerator also sums padding positions, where its zero advantages make
    ``surr1 == surr2``; here only valid tokens count.)
``actor/ratio_mean``  the mean over valid tokens of each row, then the mean over all ``B`` rows of this
    batch, empty rows counting 0 (``masked_mean(r, m, dim=-1).mean()``: no normaliser in ROLL's call).
    Core ``ratio_mean`` is the token-weighted mean over valid tokens (1 when there is none).
``actor/ratio_max``   ``max(r * m)``: the core ``ratio_max`` when there is a valid token, 0 when
    there is none (core: 1).
``actor/ratio_min``   ``min(r * m + (1 - m) * 1e10)``: the core ``ratio_min``, 1e10 when there is no
    valid token (core: 1).
``actor/approxkl``    ``0.5 * (log_probs - old_log_probs)**2`` at valid tokens (ROLL's "mse" estimator)
    aggregated like the loss, with the loss's normalisers (as ``actor/clipfrac``). Not a core metric:
    core ``approx_kl`` is the k1 estimator ``mean(old - new)`` over the local valid tokens.
``actor/policykl``    ``log_probs - old_log_probs`` at valid tokens (ROLL's "kl") aggregated like the
    loss, with the loss's normalisers. With ``token-mean`` and the local ``N`` it is ``-approx_kl`` of
    the core (opposite sign); other modes aggregate per row.

These are the formulas of ``ActorWorker.loss_func`` of ROLL's ``base_worker.py``: ``actor/ppo_ratio_*``
and ``actor/ratio_*`` take no normaliser there; ``actor/clipfrac``, ``actor/approxkl`` and
``actor/policykl`` take the strategy's ``batch_num_tokens`` and ``global_valid_samples``, as the loss.
(The RLVR worker's ``loss_func``, whose loss and options the adapter follows, logs ``@sum``-suffixed
keys with partly other formulas.) ROLL's source, at commit 8eb27cc2dc34c4d1310b169d9b86d339004d811a:

- base_worker.py (``loss_func``, its metrics):
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/pipeline/base_worker.py#L213-L324
- the RLVR worker's ``loss_func`` (the loss, ``sample_weights``, the ``"seq"`` ratio, the dual clip):
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/pipeline/rlvr/actor_worker.py#L11-L167
- ``agg_loss``, ``masked_mean``, ``compute_approx_kl``:
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/utils/functionals.py#L181-L297
- the normalisers:
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/distributed/strategy/strategy.py#L355-L431
  (passed by megatron_strategy.py ``train_step``, L1259-L1296, and fsdp2_strategy.py, L1584-L1588).

Where ppo_ext's numbers differ from ROLL's on purpose: a zero denominator (no valid token) gives 0,
not NaN (ROLL's strategy replaces a zero count by 1, which gives the same 0); masked positions never
reach the loss or its gradient (ROLL's ``token-mean`` numerator sums the loss matrix unmasked, which
only matters if the per-token loss is non-zero at padding, i.e. if the advantages are; ROLL's open PR
#444 masks it too); ROLL's ``1e-8`` in denominators is left out.

The loss path has no host synchronisation. Metrics are Python floats as ROLL's (``.item()`` each): one
``.tolist()`` synchronises once for all; ``return_tensors=True`` keeps 0-dim tensors. The metrics the
kernel does not give (``ratio_mean``, ``approxkl``, ``policykl``, the per-row forms of ``clipfrac``,
the sequence-level seed fractions) are computed under ``torch.no_grad()`` with plain torch ops, as
ROLL computes them; the token-level seed fractions come from a second, gradient-free kernel pass over
all positions.
"""

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch

import ppo_ext
from ppo_ext.names import COUNT_INDEX, IMPORTANCE_SAMPLING_LEVELS, LOSS_AGG_MODES

__all__ = ["compute_policy_loss", "ROLL_DEFAULTS", "METRIC_KEYS", "LOSS_METRIC_KEYS", "IS_WEIGHT_TYPES"]

# ROLL's train/infer importance-weight granularities (TrainInferISWeightConfig.weight_type) and the kernel's
# rollout-correction level of each.
IS_WEIGHT_TYPES = {"token": "token", "geometric": "seq-mean", "sequence": "seq"}

# ROLL's PPOConfig / RLVRConfig defaults.
ROLL_DEFAULTS = {
    "pg_clip": 0.2,
    "pg_clip_low": 0.2,
    "pg_clip_high": 0.2,
    "use_pg_clip_range": False,
    "dual_clip_loss": False,
    "importance_sampling": "token",
    "loss_agg_mode": "seq-mean-token-mean",
    "use_kl_loss": False,
    "kl_loss_coef": 0.0,
    "entropy_loss_coef": 0.0,
}
# The loss values ROLL's base worker logs, when the KL to the reference is given (ref_log_probs), after METRIC_KEYS.
LOSS_METRIC_KEYS = ("actor/pg_loss", "actor/kl_loss", "actor/total_loss")
METRIC_KEYS = (
    "actor/ppo_ratio_high_clipfrac",
    "actor/ppo_ratio_low_clipfrac",
    "actor/ppo_ratio_clipfrac",
    "actor/clipfrac",
    "actor/ratio_mean",
    "actor/ratio_max",
    "actor/ratio_min",
    "actor/approxkl",
    "actor/policykl",
)
# ROLL's values: ppo_ext's but "token-sum" (not in ROLL's agg_loss) and "seq-token" (GSPO-token: not in ROLL).
_LOSS_AGG_MODES = tuple(m for m in LOSS_AGG_MODES if m != "token-sum")
_LEVELS = tuple(level for level in IMPORTANCE_SAMPLING_LEVELS if level != "seq-token")


def _option(name: str, explicit, config):
    if explicit is not None:
        return explicit
    if config is not None:
        if isinstance(config, Mapping):
            value = config.get(name, None)
        else:
            value = getattr(config, name, None)
        if value is not None:
            return value
    return ROLL_DEFAULTS[name]


def _div(num: torch.Tensor, den) -> torch.Tensor:
    """num / den, 0 where den == 0 (ROLL gives NaN there)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _roll_agg(x: torch.Tensor, n: torch.Tensor, mode: str, num_tokens, num_seqs) -> torch.Tensor:
    """ROLL's agg_loss of a per-token quantity that is already 0 at masked positions (n: valid tokens per
    row), with the normalisers the loss uses: num_tokens (batch_num_tokens) for token-mean, num_seqs
    (global_valid_samples) for the seq-mean modes, as ROLL's metric calls pass them."""
    T = x.shape[1]
    if mode == "token-mean":
        return _div(x.sum(), num_tokens)
    if mode == "seq-mean-token-sum":
        return _div(x.sum(), num_seqs)
    if mode == "seq-mean-token-mean":
        return _div(_div(x.sum(-1), n).sum(), num_seqs)
    return _div(x.sum(), T)  # seq-mean-token-sum-norm


def compute_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: Optional[Any] = None,
    *,
    pg_clip: Optional[float] = None,
    pg_clip_low: Optional[float] = None,
    pg_clip_high: Optional[float] = None,
    use_pg_clip_range: Optional[bool] = None,
    dual_clip_loss: Optional[bool] = None,
    importance_sampling: Optional[str] = None,
    loss_agg_mode: Optional[str] = None,
    sample_weights: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    batch_num_tokens=None,
    global_valid_samples=None,
    return_tensors: bool = False,
    infer_log_probs: Optional[torch.Tensor] = None,
    is_weight_type: str = "token",
    is_weight_upper_bound: Optional[float] = 1.2,
    ref_log_probs: Optional[torch.Tensor] = None,
    use_kl_loss: Optional[bool] = None,
    kl_loss_coef: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_loss_coef: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """ROLL's clipped policy-gradient loss and its metrics, the loss and its gradient by ppo_ext's kernel.

    log_probs, old_log_probs (None: on-policy), response_mask: (B, T); advantages (B, T), (B, 1) or
    (B,). Options come from the keywords, else from ``config`` (ROLL's ``pipeline_config``: attributes
    or a mapping), else ROLL's defaults (``ROLL_DEFAULTS``). ``sample_weights`` (B,) and
    ``token_weights`` (B, T) multiply the per-token loss. ``batch_num_tokens`` (token-mean) and
    ``global_valid_samples`` (the seq-mean modes) are the normalisers ROLL's strategy passes
    ``loss_func`` (numbers or 0-dim tensors): the valid tokens and the rows with at least one valid
    token, of the whole data-parallel batch. Default: those counts of this batch (``N``, ``S``). For data
    parallel pass ``ppo_ext.distributed.global_normalisers(mask)``'s ``num_tokens`` and ``num_seqs``.
    They divide the loss and, as in ROLL, ``actor/clipfrac``, ``actor/approxkl`` and ``actor/policykl``.

    ``infer_log_probs`` (the inference engine's log-probs, ROLL's ``infer_logprobs``) turns on ROLL's
    train/infer importance weight (``train_infer_correction.is_weight``: ``weight_type`` ``is_weight_type``,
    ``upper_bound`` ``is_weight_upper_bound``) in the kernel: ``exp(old - infer)`` per token ("token"), of the
    row's mean ("geometric") or sum ("sequence"), clamped to ``[0, upper_bound]``, multiplying the per-token
    loss, and the metric ``actor/is_weight_clipfrac@sum`` (valid tokens above the bound over
    ``batch_num_tokens``; ROLL's numerator counts every position, padding included: at the row levels each of
    a filtered row's ``T`` positions, as here). "segment" and ROLL's filters (which change the mask) are not
    supported.

    ``ref_log_probs`` (the reference policy's log-probs): ROLL's KL loss, ``compute_approx_kl(log_probs,
    ref_log_probs, kl_penalty="k3")`` (``exp(ref - lp) - (ref - lp) - 1`` clamped to ``[-10, 10]``) aggregated
    as the loss (no sample weights), in the same kernel pass: added times ``kl_loss_coef`` when ``use_kl_loss``
    (options from the keywords or ``config``, as the others), and logged as ``actor/kl_loss`` either way, with
    ``actor/pg_loss`` and ``actor/total_loss`` (``LOSS_METRIC_KEYS``, after ``METRIC_KEYS``). ``entropy`` (B, T)
    with ``entropy_loss_coef > 0``: ROLL's entropy bonus, ``total - entropy_loss_coef * agg(entropy)`` with the
    loss's mask and normalisers, differentiable w.r.t. the entropy.

    Returns ``(loss, metrics)``: ROLL's ``total_loss`` (the policy-gradient loss, plus the KL and entropy terms
    when asked for), the metric keys ``METRIC_KEYS`` (and ``LOSS_METRIC_KEYS`` with ``ref_log_probs``), documented
    (with how each differs from the core API's metric) in the module docstring. Floats cost one host synchronisation (ROLL calls
    ``.item()`` on each); ``return_tensors=True`` returns 0-dim tensors and synchronises nothing.
    """
    pg_clip = float(_option("pg_clip", pg_clip, config))
    use_range = bool(_option("use_pg_clip_range", use_pg_clip_range, config))
    clip_low = float(_option("pg_clip_low", pg_clip_low, config)) if use_range else pg_clip
    clip_high = float(_option("pg_clip_high", pg_clip_high, config)) if use_range else pg_clip
    dual = bool(_option("dual_clip_loss", dual_clip_loss, config))
    level = _option("importance_sampling", importance_sampling, config)
    mode = _option("loss_agg_mode", loss_agg_mode, config)
    if level not in _LEVELS:
        levels = " or ".join(map(repr, _LEVELS))
        raise ValueError(f"importance_sampling must be {levels} (ROLL's values), got {level!r}")
    if mode not in _LOSS_AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {mode!r} (ROLL's agg_loss takes {list(_LOSS_AGG_MODES)})")
    if dual and not pg_clip > 0:
        raise ValueError(f"dual_clip_loss needs pg_clip > 0 (ROLL's dual-clip constant is 1 + 2 * pg_clip), "
                         f"got {pg_clip}")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must have shape (B, T), got {tuple(log_probs.shape)}")
    B, T = log_probs.shape

    weights = token_weights
    if sample_weights is not None:
        if sample_weights.shape != (B,):
            raise ValueError(f"sample_weights must have shape ({B},), got {tuple(sample_weights.shape)}")
        per_row = sample_weights.reshape(B, 1).expand(B, T)  # a view: no copy
        weights = per_row if weights is None else weights * per_row

    if mode == "token-mean":
        normalisers = {"num_tokens": batch_num_tokens}
    elif mode == "seq-mean-token-sum-norm":
        normalisers = {"num_seqs": 1, "loss_scale_factor": T}
    else:
        normalisers = {"num_seqs": global_valid_samples}  # None: S, the rows with a valid token

    correction = {}
    if infer_log_probs is not None:
        if is_weight_type not in IS_WEIGHT_TYPES:
            raise NotImplementedError(f"is_weight_type {is_weight_type!r}: ppo_ext computes ROLL's "
                                      f"{list(IS_WEIGHT_TYPES)} train/infer weights (not 'segment')")
        correction = dict(rollout_log_probs=infer_log_probs, rollout_is=IS_WEIGHT_TYPES[is_weight_type],
                          rollout_is_mode="truncate", rollout_is_low=0.0, rollout_is_high=is_weight_upper_bound)
    kl_loss_coef = float(_option("kl_loss_coef", kl_loss_coef, config))
    with_kl = bool(_option("use_kl_loss", use_kl_loss, config))
    if with_kl and ref_log_probs is None:
        raise ValueError("use_kl_loss needs ref_log_probs (ROLL's ref_log_probs, the reference policy's)")
    # ROLL's k3: its value clamped to [-10, 10], no clamp before the exp (verl's has one)
    kl = {} if ref_log_probs is None else dict(ref_log_probs=ref_log_probs, kl_estimator="k3", kl_clamp=10.0,
                                               kl_coef=kl_loss_coef if with_kl else 0.0)
    out = ppo_ext.policy_loss(
        log_probs, old_log_probs, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=(1.0 + 2.0 * pg_clip) if dual else None,
        importance_sampling=level, loss_agg_mode=mode, token_weights=weights, **normalisers, **correction, **kl,
    )
    metrics = _metrics(out, log_probs, old_log_probs, advantages, response_mask, level, mode, clip_low, clip_high,
                       batch_num_tokens, global_valid_samples)
    loss = out.loss
    entropy_loss_coef = float(_option("entropy_loss_coef", entropy_loss_coef, config))
    if entropy_loss_coef > 0:
        if entropy is None:
            raise ValueError("entropy_loss_coef > 0 needs entropy (ROLL's op_compute_entropy of the logits)")
        valid = response_mask != 0
        num_tokens = out.counts[COUNT_INDEX["valid_tokens"]] if batch_num_tokens is None else batch_num_tokens
        num_seqs = out.counts[COUNT_INDEX["valid_seqs"]] if global_valid_samples is None else global_valid_samples
        masked = torch.where(valid, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
        loss = loss - entropy_loss_coef * _roll_agg(masked, valid.sum(-1), mode, num_tokens, num_seqs)
    if ref_log_probs is not None:
        kl_loss = out.metrics["kl_loss"]
        pg_loss = out.loss.detach() - (kl_loss_coef * kl_loss if with_kl else 0.0)
        metrics.update({"actor/pg_loss": pg_loss.to(torch.float32), "actor/kl_loss": kl_loss,
                        "actor/total_loss": loss.detach().to(torch.float32)})
    if infer_log_probs is not None and is_weight_upper_bound is not None:
        # ROLL's numerator sums (weight > bound) over every position: at the token level the valid tokens above
        # the bound (padding holds ratio 1), at a row level every one of a filtered row's T positions.
        tokens = out.counts[COUNT_INDEX["valid_tokens"]] if batch_num_tokens is None else batch_num_tokens
        if is_weight_type == "token":
            above = out.counts[COUNT_INDEX["rollout_filtered_tokens"]]
        else:
            above = out.counts[COUNT_INDEX["rollout_filtered_seqs"]] * T
        metrics["actor/is_weight_clipfrac@sum"] = _div(above.to(torch.float32), tokens)
    if return_tensors:
        return loss, metrics
    values = torch.stack(list(metrics.values())).tolist()  # the one synchronisation
    return loss, dict(zip(metrics.keys(), values))


@torch.no_grad()
def _metrics(out, log_probs, old_log_probs, advantages, response_mask, level, mode, clip_low, clip_high,
             batch_num_tokens, global_valid_samples):
    B, T = log_probs.shape
    acc = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    lp = log_probs.detach()
    old = lp if old_log_probs is None else old_log_probs.detach()
    valid = response_mask != 0
    n = valid.sum(-1).to(acc)  # valid tokens per row
    N = out.counts[COUNT_INDEX["valid_tokens"]]
    d = torch.where(valid, lp.to(acc) - old.to(acc), torch.zeros((), dtype=acc, device=lp.device))
    positions = B * T
    # The normalisers of ROLL's metric calls: the loss's (the strategy's counts; here when not given).
    num_tokens = N if batch_num_tokens is None else batch_num_tokens
    num_seqs = out.counts[COUNT_INDEX["valid_seqs"]] if global_valid_samples is None else global_valid_samples

    # The seed's clip fractions, over all B*T positions.
    if level == "token":
        # Every position counts, padding included: the kernel's counters with no mask.
        every = ppo_ext.policy_loss(lp, old_log_probs, lp.new_zeros(B, dtype=acc), None,
                                    clip_low=clip_low, clip_high=clip_high)
        low = _div(every.counts[COUNT_INDEX["clipped_low"]].to(acc), positions)
        high = _div(every.counts[COUNT_INDEX["clipped_high"]].to(acc), positions)
        row_ratio = None
    else:
        # Each row's ratio fills its T positions; a row without valid token has ratio 1.
        row_ratio = torch.exp(_div(d.sum(-1), n))
        low = _div((row_ratio < 1 - clip_low).sum().to(acc), B)
        high = _div((row_ratio > 1 + clip_high).sum().to(acc), B)

    # actor/clipfrac: the clip-in-force indicator aggregated like the loss.
    active = out.counts[COUNT_INDEX["clipped_active"]].to(acc)
    if mode == "token-mean":
        clipfrac = _div(active, num_tokens)
    elif mode == "seq-mean-token-sum":
        clipfrac = _div(active, num_seqs)
    elif mode == "seq-mean-token-sum-norm":
        clipfrac = _div(active, T)
    else:  # seq-mean-token-mean needs the count of every row
        ratio = torch.exp(d) if row_ratio is None else row_ratio.unsqueeze(-1)
        adv = advantages.detach().to(acc)
        adv = adv.reshape(B, 1) if adv.dim() == 1 else adv
        surr1 = ratio * adv
        surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
        clipfrac = _roll_agg((valid & (surr2 < surr1)).to(acc), n, mode, num_tokens, num_seqs)

    # actor/ratio_mean: per-row mean over valid tokens, then the mean over all B rows.
    if row_ratio is None:
        row_mean = _div(torch.where(valid, torch.exp(d), torch.zeros((), dtype=acc, device=d.device)).sum(-1), n)
    else:
        row_mean = torch.where(n > 0, row_ratio, torch.zeros_like(row_ratio))
    ratio_mean = _div(row_mean.sum(), B)

    any_valid = N > 0
    zero = torch.zeros((), dtype=acc, device=lp.device)
    metrics = {
        "actor/ppo_ratio_high_clipfrac": high,
        "actor/ppo_ratio_low_clipfrac": low,
        "actor/ppo_ratio_clipfrac": low + high,
        "actor/clipfrac": clipfrac,
        "actor/ratio_mean": ratio_mean,
        "actor/ratio_max": torch.where(any_valid, out.metrics["ratio_max"].to(acc), zero),
        "actor/ratio_min": torch.where(any_valid, out.metrics["ratio_min"].to(acc), zero + 1e10),
        "actor/approxkl": _roll_agg(0.5 * d * d, n, mode, num_tokens, num_seqs),
        "actor/policykl": _roll_agg(d, n, mode, num_tokens, num_seqs),
    }
    return {k: v.to(torch.float32) for k, v in metrics.items()}
