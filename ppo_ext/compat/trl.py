"""TRL adapter: the loss of TRL 1.16's ``GRPOTrainer._compute_loss`` on ppo_ext's kernel.

``grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, args, ...)`` returns ``(loss,
metrics)``: the loss that ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) returns in
training mode for the configuration ``args`` (a ``GRPOConfig``, or any object or mapping with its
field names), its per-token loss, aggregation and gradient computed by one ``ppo_ext.policy_loss``
call, and the metrics TRL logs there, under TRL's keys. ``PPOExtGRPOMixin`` swaps it into a
``GRPOTrainer``::

    from trl import GRPOTrainer
    from ppo_ext.compat.trl import PPOExtGRPOMixin

    class Trainer(PPOExtGRPOMixin, GRPOTrainer):
        pass

    trainer = Trainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

(``from ppo_ext.compat.trl import PPOExtGRPOTrainer`` is that class, built on first use.)

How TRL's options map onto ppo_ext's (docs/SPEC.md):

===============================================  =====================================================
TRL (``GRPOConfig`` / ``_compute_loss``)          ``ppo_ext.policy_loss``
===============================================  =====================================================
``coef_1 = exp(log_ratio)`` (token level)         ``importance_sampling="token"``
``importance_sampling_level="sequence"``:          ``importance_sampling="seq"`` (the value and the
``exp(sum(m * log_ratio) / max(n_i, 1))``          gradient through the row's mean, as TRL's autograd)
``epsilon``, ``epsilon_high`` (None: epsilon)      ``clip_low``, ``clip_high``
``delta`` (``coef_1 = clamp(coef_1, max=delta)``)  ``ratio_cap=delta``
``old_per_token_logps`` None (on-policy)           ``old_log_probs=None`` (``old = sg(lp)``)
off-policy mask (``off_policy_mask_threshold``),   ``token_weights``, their product (the (B, 1) ones
``entropy_mask``, ``importance_sampling_ratio``    broadcast over the row)
``grpo``: mean over rows of the row's token mean,  ``"seq-mean-token-mean"``, ``num_seqs = B * gas``
then / gas
``bnpo``: sum / max(N, 1) / gas                    ``"token-mean"``, ``num_tokens = N * gas``
``dr_grpo``: sum / (B * max_completion_length)     ``"seq-mean-token-sum-norm"``, ``num_seqs = B``,
/ gas                                              ``loss_scale_factor = max_completion_length * gas``
``dapo``: sum / (max(num_items_in_batch, 1) /      ``"token-mean"``, ``num_tokens`` = that normaliser
num_processes * gas / steps_per_generation)        (a 0-dim tensor when num_items_in_batch is one)
``luspo``: mean over rows of the row's sum / gas   ``"seq-mean-token-sum"``, ``num_seqs = B * gas``
``cispo``: ``-sg(clamp(coef_1, max=e)) * A * lp`` ``loss_type="cispo"``, ``clip_low=1`` (lower
(``e = epsilon_high``: the bound is ``e``, not    bound 0: no lower clamp), ``clip_high = e - 1``
``1 + e``), aggregated as ``dapo``; no ``delta``  (``e < 1`` cannot be expressed: ``ValueError``)
``sapo``: ``-A sigmoid(t (coef_1 - 1)) 4 / t``,   ``loss_type="sapo"``, ``tau_pos``, ``tau_neg`` as
``t = sapo_temperature_pos`` (``A > 0``) or       TRL's ``torch.where`` makes them: in torch's
``_neg``; aggregated as ``grpo``; no ``delta``    default dtype (float32: rounded to float32)
``vespo``: ``-sg(phi) * A * lp``, ``phi`` the     ``loss_type="vespo"``, ``vespo_k_pos`` ... as TRL's
Gamma weight of the row's log-weight             ``torch.where`` makes them (float32); always
(``get_gamma_weights``, ``vespo_k_pos``,          ``importance_sampling="token"`` (TRL's level does not
``vespo_lambda_pos``, ``vespo_k_neg``,            reach its loss); vLLM's ratio (``token_*`` modes
``vespo_lambda_neg``); vLLM's ratio joins the     only, as TRL's ``__init__`` demands) as
log-weight; aggregated as ``dapo``; no ``delta``   ``rollout_log_probs = old - log(ratio)``,
                                                  ``rollout_is="token"``, ``rollout_is_low=0``
``beta * per_token_kl``, ``per_token_kl =``        ``ref_log_probs=ref_per_token_logps``,
``exp(ref - lp) - (ref - lp) - 1`` (no clamp),     ``kl_coef=beta``, ``kl_estimator="k3"``,
added after the weights, aggregated with the loss  ``kl_clamp=inf``; not weighted by ``token_weights``
``use_bias_correction_kl`` (default True): the     ``kl_bias_correction=True`` (the kernel's ratio at
KL times ``coef_1`` (token or sequence level)      the same level)
===============================================  =====================================================

``gas`` is ``gradient_accumulation_steps``, the trainer's ``current_gradient_accumulation_steps``;
``B`` counts every row, empty ones included (TRL's ``.mean()`` over rows and ``per_token_loss.size(0)``);
``N`` is the number of valid tokens. ``steps_per_generation`` is ``args.steps_per_generation``, which
``GRPOConfig`` sets to ``gradient_accumulation_steps`` when not given (so does the adapter when it is
None: ``args.gradient_accumulation_steps``, else the ``gradient_accumulation_steps`` keyword).
``num_items_in_batch`` is TRL's ``inputs["num_items_in_batch"]`` (the valid tokens of the whole
generation batch, summed over the processes); without it, ``dapo`` uses this batch's ``N``.

The off-policy mask (DeepSeek-V3.2's, TRL's ``get_off_policy_mask``): a row is kept when its advantage
is >= 0 or the masked mean over the row of ``nan_to_num(sampling - sg(lp), nan=0)`` is <= the threshold,
``sampling`` being ``sampling_per_token_logps`` when given, else ``old_per_token_logps`` (else ``sg(lp)``,
as TRL). ``entropy_mask`` (``top_entropy_quantile < 1``) is TRL's ``get_high_entropy_mask(entropies,
mask, 1 - top_entropy_quantile)``, which needs a gather of every process's entropies and a quantile: the
caller passes it (the mixin calls TRL's own method), and it is required exactly when
``top_entropy_quantile < 1``. ``importance_sampling_ratio`` (vLLM's, (B, T) or (B, 1)) is required exactly
when ``use_vllm`` and ``vllm_importance_sampling_correction`` are set, the two conditions under which TRL
puts it into the inputs and applies it; passing one TRL would not apply is a ``ValueError``.

Metrics (0-dim float32 tensors, computed without host synchronisation; TRL calls ``.item()`` on each,
``PPOExtGRPOMixin`` converts them with one ``.tolist()``), the keys ``"kl"`` (with ``beta != 0``: the mean of
the per-token KL over valid tokens, the kernel's ``metrics["kl"]``), ``"entropy"`` (when ``entropies`` is
given) then ``METRIC_KEYS_BY_LOSS_TYPE[loss_type]``, in TRL's order. For the clipped loss types (grpo, bnpo,
dr_grpo, dapo, luspo; ``METRIC_KEYS``), with ``r`` TRL's ``coef_1`` *after* the cap ``min(r, delta)``:

``clip_ratio/low_mean``     fraction of valid tokens with ``r < 1 - epsilon`` and ``A < 0``
``clip_ratio/high_mean``    fraction of valid tokens with ``r > 1 + epsilon_high`` and ``A > 0``
``clip_ratio/region_mean``  fraction with either (= ppo_ext's ``clipfrac_active`` when there is no
                            ``delta`` or ``delta >= 1 + epsilon_high``, where TRL's clip is in force)
``clip_ratio/low_min``      min over rows of the row's fraction of low-clipped tokens (rows without a
                            valid token left out; NaN when no row has one)
``clip_ratio/high_max``     max over rows of the row's fraction of high-clipped tokens (likewise)
``entropy``                 mean of ``entropies`` over valid tokens (only when ``entropies`` is given)

For ``cispo`` the one key ``cispo_clip_ratio``: the fraction of valid tokens with ``r > epsilon_high``
(TRL's bound, not ``1 + epsilon_high``; ``r`` uncapped: TRL applies ``delta`` to the clipped loss types
only) and ``A > 0``, which is ppo_ext's ``clipped_active`` count over the valid tokens with the mapping
above (its low side ``r < 0`` never holds). For ``sapo``, none (TRL logs no clip metric for it). For ``vespo`` the
one key ``vespo/phi_seq_mean``: the mean of the Gamma weight over the rows (all ``B``, empty ones included: their
weight is 1) with (B,) or (B, 1) advantages, over the valid tokens with (B, T) ones, as TRL's ``global_masked_mean``
of its ``phi_seq``; computed by a few eager ops here (the kernel's metrics do not include it).

As in TRL, when the clip indicator has one column (sequence level with (B,) or (B, 1) advantages, or
``T = 1``) the ``*_mean`` metrics are means over all ``B`` rows (empty ones count, unclipped: their
ratio is 1) and the per-row fractions are the indicators themselves; likewise ``entropy`` for ``T = 1``.
TRL's means are global: ``accelerator.reduce`` sums the numerators and the denominators over the
processes, and ``low_min``/``high_max`` are taken over the rows ``accelerator.gather`` collects from every
process. Pass ``accelerator`` (the trainer's ``self.accelerator``, or anything with its ``reduce(tensor,
reduction="sum")`` and ``gather(tensor)``) to get those values: one ``reduce`` and one ``gather`` (only
the clipped loss types gather; sapo without ``entropies`` has no metric and calls neither; collectives, no
host synchronisation). Without it the metrics are this process's values, which are TRL's
for a single process. These metrics take a few eager ops on (B, T) tensors under ``torch.no_grad()``
(the kernel's counts do not split the clip by the sign of ``A`` nor by row); the loss and its gradient
take one kernel call.

The entropy bonus (a static ``entropy_coef``): ``loss - entropy_coef * sum(entropies * m') / max(sum(m'), 1) / gas``
with ``m' = mask * entropy_mask`` (TRL's ops, on the ``entropies`` given, which carry their gradient to the model; the
mixin's come from TRL's own forward), and TRL's ``policy_loss`` metric (the loss before the bonus, before the
division by gas for grpo, bnpo, dr_grpo, luspo and sapo; gathered over the processes and averaged: one more
``gather``) and ``entropy_coef`` first among the metrics (the mixin logs ``entropy_coef`` on optimizer-step
boundaries only, as TRL).

Not supported yet (``NotImplementedError`` naming the option):

- ``use_adaptive_entropy`` (TRL's controller, which updates the trainer's ``entropy_coef`` from the world's
  entropy at each optimizer step);
- vespo with ``beta != 0``, ``use_bias_correction_kl`` and ``importance_sampling_level="sequence"`` (TRL's KL is
  then weighted by the sequence ratio while vespo's loss is token-level: two levels in one call).

Where the numbers can differ from TRL's on purpose: masked positions never reach anything (TRL multiplies
by the mask, so a NaN or inf there would make its loss or gradient NaN), except the one-column case above,
where TRL itself reads the indicators without the mask; the mask is read as 0/1 (TRL's
``completion_mask * tool_mask`` always is); no rows at all (B = 0) give loss 0, where TRL's mean over
no rows is NaN; ``kl`` for ``T = 1`` is the mean over the valid rows (TRL's ``global_masked_mean`` reads the
one-column KL without the mask, at every row); for vespo, the vLLM ratio at masked positions is not read (TRL sums its log over every position,
where TRL's own ratio is 1: it is computed from a masked difference), and the ratio reaches the row's log-weight
as ``exp(old - (old - log(ratio)))`` in the log-probs' dtype, which can differ from ``log(ratio)`` by half an ulp of
``old`` per token. Refused with a ``ValueError`` rather than computed differently: cispo with
``epsilon_high < 1`` (TRL's default ``epsilon_high=None`` is ``epsilon`` = 0.2; see the table) and sapo
temperatures that are not finite and > 0 (TRL's sigmoid gate divides by them; ppo_ext's sapo needs them > 0).

Checked against TRL 1.16.0's own ``GRPOTrainer._compute_loss``, run for real on a trainer object that
holds the attributes it reads, in tests/test_compat_trl.py.
"""

import math
import numbers
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch

import ppo_ext
from ppo_ext.names import COUNT_INDEX

# PPOExtGRPOTrainer is not in __all__: it imports trl when first asked for (module __getattr__ below).
__all__ = ["grpo_loss", "PPOExtGRPOMixin", "GRPO_CONFIG_DEFAULTS", "SUPPORTED_LOSS_TYPES", "METRIC_KEYS",
           "METRIC_KEYS_BY_LOSS_TYPE", "TRL_VERSION"]

TRL_VERSION = "1.16.0"

# GRPOConfig's defaults (trl/trainer/grpo_config.py) for the fields the loss reads; a field an ``args``
# object lacks takes this value. ``gradient_accumulation_steps`` is TrainingArguments' (default 1).
GRPO_CONFIG_DEFAULTS = {
    "loss_type": "dapo",
    "importance_sampling_level": "token",
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "beta": 0.0,
    "use_bias_correction_kl": True,
    "off_policy_mask_threshold": None,
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "use_vllm": False,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask",
    "max_completion_length": 512,
    "steps_per_generation": None,
}

_CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's clipped surrogate (ppo_ext's "vanilla")
SUPPORTED_LOSS_TYPES = _CLIP_LOSS_TYPES + ("cispo", "sapo", "vespo")
_LEVELS = {"token": "token", "sequence": "seq"}
_VESPO_PARAMETERS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")

# The keys of the loss's own metrics, after "entropy" (logged when `entropies` is given): those of the clipped
# loss types (METRIC_KEYS), cispo's one, none for sapo.
METRIC_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
               "clip_ratio/high_max")
METRIC_KEYS_BY_LOSS_TYPE = {**{lt: METRIC_KEYS for lt in _CLIP_LOSS_TYPES}, "cispo": ("cispo_clip_ratio",),
                            "sapo": (), "vespo": ("vespo/phi_seq_mean",)}

# The keyword inputs _compute_loss hands _get_per_token_logps_and_entropies from `inputs` (multimodal ones).
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_MISSING = object()


# ----------------------------------------------------------------------------------------------------
# Options


def _arg(args, name: str, default=_MISSING):
    """``args.name`` (or ``args[name]`` for a mapping); GRPOConfig's default when it is not there."""
    if default is _MISSING:
        default = GRPO_CONFIG_DEFAULTS[name]
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def _number(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    raise TypeError(f"args.{name} must be a number{' or None' if optional else ''}, got {type(value).__name__}")


def _options(args) -> SimpleNamespace:
    """The options of ``args`` that the loss reads, checked; unsupported ones raise NotImplementedError, values
    ppo_ext cannot reproduce (cispo's epsilon_high < 1, sapo's temperatures <= 0) ValueError."""
    if args is None:
        raise ValueError("grpo_loss needs args (a GRPOConfig, or an object/mapping with its field names)")
    loss_type = _arg(args, "loss_type")
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type!r} (TRL's are {list(SUPPORTED_LOSS_TYPES)})")
    level = _arg(args, "importance_sampling_level")
    if level not in _LEVELS:
        raise ValueError(f"Unknown importance sampling level: {level!r}. Possible values are 'token' and 'sequence'.")
    beta = float(_number("beta", _arg(args, "beta")))
    if not math.isfinite(beta):
        raise ValueError(f"args.beta must be a finite number, got {beta}")
    bias_correction = bool(_arg(args, "use_bias_correction_kl"))
    if beta != 0.0 and bias_correction and loss_type == "vespo" and level == "sequence":
        raise NotImplementedError(
            "loss_type='vespo' with beta != 0, use_bias_correction_kl and importance_sampling_level='sequence': TRL "
            "multiplies the KL by the sequence-level ratio while vespo's loss runs at the token level, which one kernel "
            "call does not combine; set use_bias_correction_kl=False or importance_sampling_level='token', or use "
            "TRL's own GRPOTrainer.")
    entropy_coef = float(_number("entropy_coef", _arg(args, "entropy_coef")))
    if not math.isfinite(entropy_coef):
        raise ValueError(f"args.entropy_coef must be a finite number, got {entropy_coef}")
    if bool(_arg(args, "use_adaptive_entropy")):
        raise NotImplementedError(
            "use_adaptive_entropy=True (TRL's entropy controller, which updates the trainer's entropy_coef from the "
            "world's entropy at each optimizer step) is not supported by ppo_ext.compat.trl; a static entropy_coef is. "
            "Set use_adaptive_entropy=False, or use TRL's own GRPOTrainer.")
    epsilon = float(_number("epsilon", _arg(args, "epsilon")))
    epsilon_high = _number("epsilon_high", _arg(args, "epsilon_high"), optional=True)
    delta = _number("delta", _arg(args, "delta"), optional=True)
    threshold = _number("off_policy_mask_threshold", _arg(args, "off_policy_mask_threshold"), optional=True)
    quantile = float(_number("top_entropy_quantile", _arg(args, "top_entropy_quantile")))
    epsilon_high = epsilon if epsilon_high is None else float(epsilon_high)
    tau_pos = tau_neg = None
    if loss_type == "sapo":
        tau_pos, tau_neg = _sapo_temperatures(_arg(args, "sapo_temperature_pos"), _arg(args, "sapo_temperature_neg"))
    vllm_is = bool(_arg(args, "use_vllm")) and bool(_arg(args, "vllm_importance_sampling_correction"))
    vespo = None
    if loss_type == "vespo":
        vespo = _vespo_parameters(args)
        mode = _arg(args, "vllm_importance_sampling_mode")
        if vllm_is and mode not in ("token_truncate", "token_mask"):  # as GRPOTrainer.__init__
            raise ValueError("VESPO loss requires `vllm_importance_sampling_mode` to be either 'token_truncate' or "
                             f"'token_mask'. Got: {mode}.")
    return SimpleNamespace(
        loss_type=loss_type, level=level, epsilon_low=epsilon, epsilon_high=epsilon_high,
        cispo_clip_high=_cispo_clip_high(epsilon_high) if loss_type == "cispo" else None,
        tau_pos=tau_pos, tau_neg=tau_neg, vespo=vespo, beta=beta, kl_bias_correction=bias_correction,
        entropy_coef=entropy_coef,
        delta=None if delta is None else float(delta),
        off_policy_mask_threshold=None if threshold is None else float(threshold),
        top_entropy_quantile=quantile,
        vllm_is=vllm_is,
        max_completion_length=_arg(args, "max_completion_length"),
        steps_per_generation=_arg(args, "steps_per_generation"),
        gradient_accumulation_steps=_arg(args, "gradient_accumulation_steps", None),
    )


def _cispo_clip_high(epsilon_high: float) -> float:
    """ppo_ext's clip_high for TRL's cispo, which clamps the ratio at ``epsilon_high`` itself
    (``torch.clamp(coef_1, max=epsilon_high)``, ScaleRL's eps_max), where ppo_ext clamps at ``1 + clip_high``:
    ``clip_high = epsilon_high - 1``, exact when ``1 + (epsilon_high - 1) == epsilon_high`` (every double in
    [1, 2**53)). ppo_ext's ``clip_high >= 0`` cannot express a bound below 1."""
    if not (math.isfinite(epsilon_high) and epsilon_high >= 1.0):
        raise ValueError(
            f"loss_type='cispo' with epsilon_high={epsilon_high}: TRL's cispo clamps the importance ratio at "
            "epsilon_high itself (torch.clamp(coef_1, max=epsilon_high); ScaleRL's eps_max, recommended 5.0), not at "
            "1 + epsilon_high, and ppo_ext's cispo clamps at 1 + clip_high with a finite clip_high >= 0, so only a "
            "finite epsilon_high >= 1 can be reproduced. Note that epsilon_high=None means epsilon (default 0.2), "
            "a bound below 1. Set epsilon_high >= 1 (e.g. 5.0), or use TRL's own GRPOTrainer.")
    clip_high = epsilon_high - 1.0
    if 1.0 + clip_high != epsilon_high:
        raise ValueError(f"loss_type='cispo' with epsilon_high={epsilon_high}: ppo_ext's bound 1 + clip_high cannot "
                         "equal it exactly in double precision (it can for every epsilon_high in [1, 2**53))")
    return clip_high


def _as_trl_where(name_pos: str, pos, name_neg: str, neg) -> Tuple[torch.Tensor, float, float]:
    """Two per-sign parameters as TRL's ``torch.where(advantages ..., pos, neg)`` makes them: a tensor of torch's
    default dtype (float32 unless changed), so rounded to it, whatever the dtype of the log-probs."""
    _number(name_pos, pos)
    _number(name_neg, neg)
    try:
        values = torch.where(torch.tensor([True, False]), pos, neg)
    except RuntimeError as exc:  # TRL's torch.where fails the same way
        raise ValueError(f"args.{name_pos}={pos}, args.{name_neg}={neg}: TRL's torch.where cannot make a "
                         f"{torch.get_default_dtype()} tensor of them ({exc})") from exc
    first, second = (float(v) for v in values.tolist())
    return values, first, second


def _vespo_parameters(args) -> Dict[str, float]:
    """ppo_ext's vespo_* options for TRL's ``get_gamma_weights``: k and lambda as its ``torch.where`` makes them,
    lambda clamped to >= 1e-4 in that dtype (TRL's clamp, which ppo_ext's vespo does not do); every one finite
    (ppo_ext refuses others)."""
    k_pos, lambda_pos, k_neg, lambda_neg = _VESPO_PARAMETERS
    _, kp, kn = _as_trl_where(k_pos, _arg(args, k_pos), k_neg, _arg(args, k_neg))
    lambdas, _, _ = _as_trl_where(lambda_pos, _arg(args, lambda_pos), lambda_neg, _arg(args, lambda_neg))
    lp, ln = (float(v) for v in lambdas.clamp(min=1e-4).tolist())
    values = {k_pos: kp, lambda_pos: lp, k_neg: kn, lambda_neg: ln}
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"args.{name}={_arg(args, name)} (as TRL's torch.where makes it: {value}): ppo_ext's "
                             "vespo takes finite parameters")
    return values


def _sapo_temperatures(pos, neg) -> Tuple[float, float]:
    """TRL's sapo temperatures as its ``torch.where(advantages > 0, pos, neg)`` makes them (_as_trl_where)."""
    values, tau_pos, tau_neg = _as_trl_where("sapo_temperature_pos", pos, "sapo_temperature_neg", neg)
    for name, given, value in (("sapo_temperature_pos", pos, tau_pos), ("sapo_temperature_neg", neg, tau_neg)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"args.{name}={given} (as TRL's torch.where makes it, {values.dtype}: {value}): "
                             "ppo_ext's sapo takes a finite temperature > 0")
    return tau_pos, tau_neg


def _family(opts) -> Dict[str, Any]:
    """The options of ``ppo_ext.policy_loss`` for TRL's per-token loss (the module docstring's table); what TRL
    does not read for a loss type (epsilon, epsilon_high, delta for sapo; epsilon, delta for cispo) is not passed."""
    if opts.loss_type == "cispo":
        return {"loss_type": "cispo", "clip_low": 1.0, "clip_high": opts.cispo_clip_high}
    if opts.loss_type == "sapo":
        return {"loss_type": "sapo", "tau_pos": opts.tau_pos, "tau_neg": opts.tau_neg}
    if opts.loss_type == "vespo":
        return {"loss_type": "vespo", **opts.vespo}
    return {"clip_low": opts.epsilon_low, "clip_high": opts.epsilon_high, "ratio_cap": opts.delta}


def _kl(opts, ref_per_token_logps) -> Dict[str, Any]:
    """The KL keywords of ``ppo_ext.policy_loss`` for TRL's ``beta * per_token_kl``: k3 unclamped (TRL's
    ``exp(ref - lp) - (ref - lp) - 1``), times the ratio with ``use_bias_correction_kl``; none with ``beta == 0``."""
    if opts.beta == 0.0:
        return {}
    if not isinstance(ref_per_token_logps, torch.Tensor):
        raise ValueError(f"args.beta={opts.beta}: TRL adds beta times the KL to the reference model, so pass "
                         "ref_per_token_logps (TRL's inputs['ref_per_token_logps'])")
    return {"ref_log_probs": ref_per_token_logps, "kl_coef": opts.beta, "kl_estimator": "k3",
            "kl_clamp": math.inf, "kl_bias_correction": opts.kl_bias_correction}


def _positive(name: str, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _aggregation(opts, B: int, mask: torch.Tensor, num_items_in_batch, gas, num_processes) -> Dict[str, Any]:
    """loss_agg_mode and the normalisers of TRL's aggregation for opts.loss_type (training mode)."""
    lt = opts.loss_type
    if lt in ("grpo", "sapo"):
        return {"loss_agg_mode": "seq-mean-token-mean", "num_seqs": B * gas}
    if lt == "luspo":
        return {"loss_agg_mode": "seq-mean-token-sum", "num_seqs": B * gas}
    if lt == "bnpo":
        return {"loss_agg_mode": "token-mean", "num_tokens": None if gas == 1 else torch.count_nonzero(mask) * gas}
    if lt == "dr_grpo":
        length = _positive("args.max_completion_length", opts.max_completion_length)
        return {"loss_agg_mode": "seq-mean-token-sum-norm", "num_seqs": B, "loss_scale_factor": length * gas}
    # dapo, cispo, vespo: `num_items_in_batch` spans the generation batch (every process, every step of it)
    spg = opts.steps_per_generation
    if spg is None:
        spg = opts.gradient_accumulation_steps if opts.gradient_accumulation_steps is not None else gas
    spg = _positive("args.steps_per_generation", spg)
    n = torch.count_nonzero(mask) if num_items_in_batch is None else num_items_in_batch
    if isinstance(n, torch.Tensor):
        normaliser = n.clamp(min=1.0) / num_processes * gas / spg
    elif isinstance(n, numbers.Real) and not isinstance(n, bool):
        normaliser = max(float(n), 1.0) / num_processes * gas / spg
    else:
        raise TypeError(f"num_items_in_batch must be a number, a 0-dim tensor or None, got {type(n).__name__}")
    return {"loss_agg_mode": "token-mean", "num_tokens": normaliser}


# ----------------------------------------------------------------------------------------------------
# Weights and metrics (no host synchronisation: no .item(), no data-dependent Python branch)


def _row_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1): the mean of x over each row's valid positions (0 for a row without one)."""
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1, keepdim=True)
    return total / valid.sum(-1, keepdim=True).clamp(min=1)


def _off_policy_keep(advantages2d, per_token_logps, old_per_token_logps, sampling_per_token_logps, valid,
                     threshold: float) -> torch.Tensor:
    """TRL's off-policy sequence mask: keep where A >= 0 or the row's mean KL(sampler || current) is small."""
    lp = per_token_logps.detach()
    sampling = sampling_per_token_logps
    if sampling is None:
        sampling = lp if old_per_token_logps is None else old_per_token_logps
    kl = torch.nan_to_num(sampling - lp, nan=0.0)  # unscored tokens (NaN from vLLM) give no KL evidence
    return (advantages2d >= 0) | (_row_mean(kl, valid) <= threshold)


def _weights(opts, B: int, T: int, advantages2d, per_token_logps, old_per_token_logps, sampling_per_token_logps,
             importance_sampling_ratio, entropy_mask, valid) -> Optional[torch.Tensor]:
    if opts.vllm_is and importance_sampling_ratio is None:
        raise ValueError("args.use_vllm and args.vllm_importance_sampling_correction are set, so TRL multiplies the "
                         "loss by inputs['importance_sampling_ratio']: pass importance_sampling_ratio")
    if not opts.vllm_is and importance_sampling_ratio is not None:
        raise ValueError("importance_sampling_ratio is given, but TRL applies it only when args.use_vllm and "
                         "args.vllm_importance_sampling_correction are both set")
    if opts.top_entropy_quantile < 1.0 and entropy_mask is None:
        raise ValueError(f"args.top_entropy_quantile={opts.top_entropy_quantile} < 1: pass entropy_mask, TRL's "
                         "trainer.get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile) (it gathers the "
                         "entropies of every process; PPOExtGRPOMixin does this)")
    if opts.top_entropy_quantile >= 1.0 and entropy_mask is not None:
        raise ValueError("entropy_mask is given, but TRL applies it only when args.top_entropy_quantile < 1")
    keep = None
    if opts.off_policy_mask_threshold is not None:
        keep = _off_policy_keep(advantages2d, per_token_logps, old_per_token_logps, sampling_per_token_logps,
                                valid, opts.off_policy_mask_threshold)
    if entropy_mask is not None:
        entropy_mask = entropy_mask.bool()
        keep = entropy_mask if keep is None else keep & entropy_mask
    weights = None if keep is None else keep.to(torch.float32)
    if importance_sampling_ratio is not None and opts.loss_type != "vespo":  # vespo: _vespo_log_ratio_of_vllm
        ratio = importance_sampling_ratio.detach()
        weights = ratio if weights is None else ratio * weights
    if weights is None:
        return None
    if weights.dim() != 2 or weights.shape[0] != B or weights.shape[1] not in (1, T):
        raise ValueError(f"importance_sampling_ratio / entropy_mask must have shape ({B}, {T}) or ({B}, 1), and "
                         f"combined with the off-policy mask give {tuple(weights.shape)}")
    return weights.expand(B, T)


def _vespo_log_ratio_of_vllm(opts, B: int, T: int, per_token_logps, old_per_token_logps,
                             importance_sampling_ratio) -> Dict[str, Any]:
    """For vespo, vLLM's per-token ratio as the kernel's token-level rollout correction, whose log joins the row's
    log-weight (TRL's get_gamma_weights): rollout_log_probs = old - log(ratio), unbounded (rollout_is_low=0).
    Nothing for the other loss types (their ratio is a token weight, _weights)."""
    if opts.loss_type != "vespo" or importance_sampling_ratio is None:
        return {}
    ratio = importance_sampling_ratio.detach()
    if ratio.shape != (B, T):
        raise ValueError(f"loss_type='vespo' takes a per-token importance_sampling_ratio of shape ({B}, {T}) (TRL's "
                         f"'token_truncate' / 'token_mask' modes), got {tuple(ratio.shape)}")
    dtype = torch.promote_types(per_token_logps.dtype, torch.float32)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    rollout = old.to(dtype) - torch.log(ratio).to(dtype)  # TRL's log, in the ratio's dtype
    return {"rollout_log_probs": rollout, "rollout_is": "token", "rollout_is_low": 0.0}


def _vespo_phi(opts, log_ratio, advantages2d, valid, importance_sampling_ratio) -> torch.Tensor:
    """TRL's phi_seq for its metric: the Gamma weight of the row's log-weight, (B, 1), or (B, T) with (B, T)
    advantages (what the kernel computes per token, here in eager ops for the metric alone)."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    terms = torch.where(valid, log_ratio.clamp(-20.0, 20.0), zero)
    if importance_sampling_ratio is not None:
        log_is = torch.log(importance_sampling_ratio.detach()).clamp(math.log(1e-8), 20.0).to(log_ratio.dtype)
        terms = terms + torch.where(valid, log_is, zero)
    log_w = terms.sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    nonneg = advantages2d >= 0
    v = opts.vespo
    k = torch.where(nonneg, v["vespo_k_pos"], v["vespo_k_neg"]).to(log_ratio.dtype)
    lam = torch.where(nonneg, v["vespo_lambda_pos"], v["vespo_lambda_neg"]).to(log_ratio.dtype)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """TRL's nanmin / nanmax of a 1-d tensor (NaN when every entry is NaN), without a host synchronisation."""
    if x.numel() == 0:
        return torch.full((), math.nan, dtype=x.dtype, device=x.device)
    nan = torch.isnan(x)
    fill = torch.full((), -math.inf if largest else math.inf, dtype=x.dtype, device=x.device)
    x = torch.where(nan, fill, x)
    value = x.amax() if largest else x.amin()
    return torch.where(nan.all(), torch.full_like(value, math.nan), value)


def _metrics(opts, per_token_logps, old_per_token_logps, advantages2d, valid, entropies, accelerator,
             importance_sampling_ratio=None, kernel_out=None):
    """TRL's metrics for opts.loss_type (keys: "kl" with beta != 0, "entropy" when entropies are given, then
    METRIC_KEYS_BY_LOSS_TYPE[loss_type]), with one reduce and, for the clipped loss types, one gather."""
    lp = per_token_logps.detach()
    clipped_loss = opts.loss_type in _CLIP_LOSS_TYPES
    flags = []
    phi = None
    if opts.loss_type == "vespo":
        log_ratio = torch.zeros_like(lp) if old_per_token_logps is None else lp - old_per_token_logps
        phi = _vespo_phi(opts, log_ratio, advantages2d, valid, importance_sampling_ratio)
    if clipped_loss or opts.loss_type == "cispo":
        log_ratio = torch.zeros_like(lp) if old_per_token_logps is None else lp - old_per_token_logps
        if opts.level == "sequence":
            log_ratio = _row_mean(log_ratio, valid)
        ratio = torch.exp(log_ratio)
        if clipped_loss:
            if opts.delta is not None:
                ratio = ratio.clamp(max=opts.delta)  # TRL's indicators read the capped coef_1
            low = (ratio < 1 - opts.epsilon_low) & (advantages2d < 0)
            high = (ratio > 1 + opts.epsilon_high) & (advantages2d > 0)
            flags = [low, high, low | high]
        else:  # cispo: TRL's bound is epsilon_high itself; delta is not applied
            flags = [(ratio > opts.epsilon_high) & (advantages2d > 0)]
    valid_f = valid.to(torch.float32)
    stats, rows = [], None
    if flags:
        flags = torch.stack(flags).to(torch.float32)  # (F, B, W), W = 1 or T
        B = flags.shape[1]
        if flags.shape[2] == 1:  # one value per row: every row counts, the mask is not applied (as TRL)
            sums, count = flags.sum((1, 2)), torch.full((1,), float(B), dtype=torch.float32, device=lp.device)
            if clipped_loss:
                rows = flags[:2, :, 0]
        else:
            masked = flags * valid_f
            sums, count = masked.sum((1, 2)), valid_f.sum().reshape(1)
            if clipped_loss:
                rows = masked[:2].sum(-1) / valid.sum(-1)  # NaN for a row without a valid token
        stats += [sums, count]
    if phi is not None:  # TRL's global_masked_mean(phi_seq): over the rows when it has one column
        if phi.shape[1] == 1:
            stats += [phi.sum().to(torch.float32).reshape(1),
                      torch.full((1,), float(phi.shape[0]), dtype=torch.float32, device=lp.device)]
        else:
            stats += [torch.where(valid, phi, torch.zeros((), dtype=phi.dtype, device=phi.device)).sum()
                      .to(torch.float32).reshape(1), valid_f.sum().reshape(1)]
    if opts.beta != 0.0:  # the kernel's mean of the per-token KL over valid tokens, as a sum and a count
        n = kernel_out.counts[COUNT_INDEX["valid_tokens"]].to(torch.float32)
        stats += [(kernel_out.metrics["kl"] * n).reshape(1), n.reshape(1)]
    if entropies is not None:
        ent = entropies.detach()
        if ent.shape[1] == 1:
            rows_count = torch.full((1,), float(ent.shape[0]), dtype=torch.float32, device=lp.device)
            stats += [ent.sum().to(torch.float32).reshape(1), rows_count]
        else:
            ent = torch.where(valid, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))
            stats += [ent.sum().to(torch.float32).reshape(1), valid_f.sum().reshape(1)]
    if not stats:
        return {}
    stats = torch.cat(stats)
    if rows is not None:
        rows = rows.t()  # (B, 2): the rows of every process are gathered along dim 0
    if accelerator is not None:
        stats = accelerator.reduce(stats, reduction="sum")
        if rows is not None:
            rows = accelerator.gather(rows)
    metrics = {}
    if opts.beta != 0.0:
        at = len(stats) - (4 if entropies is not None else 2)
        metrics["kl"] = stats[at] / stats[at + 1].clamp(min=1.0)
    if entropies is not None:
        metrics["entropy"] = stats[-2] / stats[-1].clamp(min=1.0)
    if clipped_loss:
        means = stats[:3] / stats[3].clamp(min=1.0)
        metrics["clip_ratio/low_mean"] = means[0]
        metrics["clip_ratio/high_mean"] = means[1]
        metrics["clip_ratio/region_mean"] = means[2]
        metrics["clip_ratio/low_min"] = _nan_extreme(rows[:, 0], largest=False)
        metrics["clip_ratio/high_max"] = _nan_extreme(rows[:, 1], largest=True)
    elif opts.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = stats[0] / stats[1].clamp(min=1.0)
    elif opts.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = stats[0] / stats[1].clamp(min=1.0)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The loss


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    args: Any,
    *,
    num_items_in_batch=None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_per_token_logps: Optional[torch.Tensor] = None,
    ref_per_token_logps: Optional[torch.Tensor] = None,
    entropy_mask: Optional[torch.Tensor] = None,
    entropies: Optional[torch.Tensor] = None,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    accelerator: Any = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss TRL's ``GRPOTrainer._compute_loss`` returns in training mode, and its metrics.

    ``per_token_logps`` (B, T) (the only input with a gradient), ``old_per_token_logps`` (B, T) or None
    (on-policy), ``advantages`` (B,), (B, 1) or (B, T), ``mask`` (B, T) (TRL's ``completion_mask``, times
    ``tool_mask`` when there is one; None: all valid), ``args`` a ``GRPOConfig`` or any object/mapping with
    its field names (a missing one takes GRPOConfig's default, ``GRPO_CONFIG_DEFAULTS``). The keywords are
    TRL's inputs of the same names (``inputs["num_items_in_batch"]``, ...), the trainer's
    ``current_gradient_accumulation_steps`` and ``accelerator.num_processes``, the entropy mask and the
    entropies (for the ``entropy`` metric) and the accelerator (global metrics); see the module docstring.
    ``ref_per_token_logps`` is read only with ``beta != 0`` (required then); ``sampling_per_token_logps`` only with
    ``off_policy_mask_threshold``.

    Returns ``(loss, metrics)``: the loss a 0-dim tensor (differentiable w.r.t. ``per_token_logps``), the
    metrics a dict of 0-dim float32 tensors under TRL's keys (``.item()`` them to log as TRL does). Nothing
    here synchronises the host.
    """
    opts = _options(args)
    if not isinstance(per_token_logps, torch.Tensor) or per_token_logps.dim() != 2:
        raise ValueError("per_token_logps must be a (B, T) tensor")
    gas = _positive("gradient_accumulation_steps", gradient_accumulation_steps)
    num_processes = _positive("num_processes", num_processes)
    B, T = per_token_logps.shape
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.bool, device=per_token_logps.device)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    advantages2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    valid = mask != 0
    with torch.no_grad():
        weights = _weights(opts, B, T, advantages2d, per_token_logps, old_per_token_logps, sampling_per_token_logps,
                           importance_sampling_ratio, entropy_mask, valid)
        rollout = _vespo_log_ratio_of_vllm(opts, B, T, per_token_logps, old_per_token_logps, importance_sampling_ratio)
    # TRL's importance_sampling_level does not reach vespo's loss (nor its metric): the kernel's token level
    level = "token" if opts.loss_type == "vespo" else _LEVELS[opts.level]
    out = ppo_ext.policy_loss(
        per_token_logps, old_per_token_logps, advantages, mask,
        importance_sampling=level, token_weights=weights, **_family(opts), **rollout,
        **_kl(opts, ref_per_token_logps), **_aggregation(opts, B, valid, num_items_in_batch, gas, num_processes),
    )
    loss = out.loss
    bonus = {}
    if opts.entropy_coef != 0.0:
        loss, bonus = _entropy_bonus(opts, loss, mask, entropies, entropy_mask, gas, accelerator)
    with torch.no_grad():
        metrics = _metrics(opts, per_token_logps, old_per_token_logps, advantages2d, valid, entropies, accelerator,
                           importance_sampling_ratio, out)
    return loss, {**bonus, **metrics}


def _entropy_bonus(opts, loss, mask, entropies, entropy_mask, gas, accelerator):
    """TRL's static entropy bonus: ``loss - entropy_coef * entropy_loss``, ``entropy_loss`` the mean of the
    entropies over the tokens the loss acts on (``mask * entropy_mask``), divided by gas (TRL's very ops, so its
    numbers); and TRL's ``policy_loss`` metric, the loss before the bonus (before the division by gas where TRL
    takes it so), gathered over the processes and averaged, and ``entropy_coef``."""
    if not isinstance(entropies, torch.Tensor):
        raise ValueError(f"args.entropy_coef={opts.entropy_coef}: TRL subtracts entropy_coef times the mean entropy, "
                         "so pass entropies (TRL's, with their gradient)")
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / gas
    policy_loss = loss.detach() * (1 if opts.loss_type in ("dapo", "cispo", "vespo") else gas)
    if accelerator is not None:
        policy_loss = accelerator.gather(policy_loss).nanmean()
    coef = torch.tensor(opts.entropy_coef, dtype=torch.float32, device=loss.device)
    return loss - opts.entropy_coef * entropy_loss, {"policy_loss": policy_loss.to(torch.float32), "entropy_coef": coef}


# ----------------------------------------------------------------------------------------------------
# The trainer


class PPOExtGRPOMixin:
    """Put before ``GRPOTrainer`` in a trainer's bases: ``class Trainer(PPOExtGRPOMixin, GRPOTrainer)``.

    Its ``_compute_loss`` does in training mode what TRL's does, with ``grpo_loss`` for the loss: the
    same call of TRL's own ``_get_per_token_logps_and_entropies`` (the model's forward), TRL's own
    ``get_high_entropy_mask`` when ``top_entropy_quantile < 1``, the options from the trainer's attributes
    (``loss_type``, ``epsilon_low``, ``epsilon_high``, ``importance_sampling_level``, ... and
    ``args.delta``, ``args.steps_per_generation``), the global metrics through ``self.accelerator``,
    appended to ``self._metrics["train"]`` under TRL's keys as Python floats (one ``.tolist()`` for all, where
    TRL calls ``.item()`` on each), and the MoE router's auxiliary loss added as TRL adds it. In evaluation
    mode (``self.model.training`` False) it calls TRL's own ``_compute_loss``. Unsupported options raise
    ``NotImplementedError`` before the forward pass.
    """

    def _ppo_ext_args(self) -> SimpleNamespace:
        """The options TRL's _compute_loss reads, from where it reads them: the trainer's attributes (set
        from its args in GRPOTrainer.__init__), and ``args.delta``, ``args.sapo_temperature_pos`` / ``_neg``,
        ``args.vespo_*``,
        ``args.steps_per_generation`` and ``args.use_bias_correction_kl``; the entropy bonus from the trainer's
        ``entropy_coef`` and ``use_adaptive_entropy``."""
        args = self.args
        return SimpleNamespace(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=_arg(args, "delta"), beta=self.beta,
            sapo_temperature_pos=_arg(args, "sapo_temperature_pos"),
            sapo_temperature_neg=_arg(args, "sapo_temperature_neg"),
            **{name: _arg(args, name) for name in _VESPO_PARAMETERS},
            vllm_importance_sampling_mode=self.vllm_importance_sampling_mode,
            use_bias_correction_kl=_arg(args, "use_bias_correction_kl"),
            off_policy_mask_threshold=self.off_policy_mask_threshold, top_entropy_quantile=self.top_entropy_quantile,
            entropy_coef=self.entropy_coef if self._entropy_bonus_enabled else 0.0,
            use_adaptive_entropy=self.use_adaptive_entropy, use_vllm=self.use_vllm,
            vllm_importance_sampling_correction=self.vllm_importance_sampling_correction,
            max_completion_length=self.max_completion_length,
            steps_per_generation=_arg(args, "steps_per_generation"),
            gradient_accumulation_steps=_arg(args, "gradient_accumulation_steps", None),
        )

    def _compute_loss(self, model, inputs):
        if not self.model.training:
            return super()._compute_loss(model, inputs)
        args = self._ppo_ext_args()
        _options(args)  # unsupported options fail before the forward pass
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in _MODEL_INPUT_KEYS})
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        gas = self.current_gradient_accumulation_steps
        use_is = self.use_vllm and self.vllm_importance_sampling_correction
        loss, metrics = grpo_loss(
            per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask, args,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            importance_sampling_ratio=inputs["importance_sampling_ratio"] if use_is else None,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
            ref_per_token_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            entropy_mask=entropy_mask, entropies=entropies, gradient_accumulation_steps=gas,
            num_processes=self.accelerator.num_processes, accelerator=self.accelerator,
        )
        if "entropy_coef" in metrics and not self.accelerator.sync_gradients:
            del metrics["entropy_coef"]  # TRL logs it on optimizer-step boundaries only
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / gas
            bonus = {k: metrics.pop(k) for k in ("policy_loss", "entropy_coef") if k in metrics}  # logged before it
            metrics = {**bonus, "aux_loss": self.accelerator.gather_for_metrics(aux_loss).mean(), **metrics}
        values = torch.stack([v.detach().to(torch.float32) for v in metrics.values()]).tolist() if metrics else []
        for key, value in zip(metrics, values):
            self._metrics["train"][key].append(value)
        return loss


def __getattr__(name: str):
    """``PPOExtGRPOTrainer``: ``PPOExtGRPOMixin`` on TRL's ``GRPOTrainer``, built when first asked for."""
    if name != "PPOExtGRPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from trl import GRPOTrainer
    except ImportError as exc:
        raise ImportError(
            f"ppo_ext.compat.trl.PPOExtGRPOTrainer subclasses trl.GRPOTrainer, but trl could not be imported ({exc}): "
            f"pip install trl (the adapter follows trl {TRL_VERSION}), or put PPOExtGRPOMixin before your own "
            "GRPOTrainer subclass") from exc
    cls = type("PPOExtGRPOTrainer", (PPOExtGRPOMixin, GRPOTrainer), {
        "__module__": __name__,
        "__doc__": "TRL's GRPOTrainer with ppo_ext's loss (PPOExtGRPOMixin).",
    })
    globals()[name] = cls
    return cls
