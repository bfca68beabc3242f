"""verl adapter: verl 0.9's policy losses (``compute_policy_loss_<mode>`` for vanilla, gspo, cispo, sapo, gpg,
dro, dppo_tv, dppo_kl, geo_mean, kl_cov, clip_cov and bypass_mode), its actor's whole loss (``ppo_loss``) and its critic's
``compute_value_loss`` on ppo_ext's kernel.

Same signatures, same return values ``(pg_loss, pg_metrics)``, same metric keys, same config reading
and the same aggregation (``agg_loss`` with ``config.global_batch_info``) as the functions of the same
names in ``verl/trainer/ppo/core_algos.py``; the per-token loss, its reduction and its gradient are
computed by one ``ppo_ext.policy_loss`` call (forward and backward fused) instead of verl's eager ops.

Use inside verl (in every process that builds the actor, e.g. the worker module)::

    from ppo_ext.compat import verl as ppo_ext_verl
    ppo_ext_verl.register()   # -> ("ppo_ext_vanilla", "ppo_ext_gspo", ..., "ppo_ext_bypass_mode")
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=ppo_ext_vanilla   (or ppo_ext_<mode>)

or call the functions directly where verl would call its own. The actor's whole loss, verl's ``ppo_loss``
(``verl/workers/utils/losses.py``: the policy loss, ``use_kl_loss``'s KL loss to the reference and the
``entropy_coeff`` bonus), is this module's ``ppo_loss``; ``register_actor_loss()`` makes verl's actor worker use it.

How verl's options map onto ppo_ext's (see docs/SPEC.md for the latter; ``d = log_prob - old_log_prob``):

============================================  ======================================================================
verl                                          ppo_ext.policy_loss
============================================  ======================================================================
``clip_ratio``, ``clip_ratio_low/high``       ``clip_low``, ``clip_high`` (None: ``clip_ratio``)
vanilla: ratio ``exp(clamp(d, -20, 20))``     ``importance_sampling="token"``, ``log_ratio_clamp=20``
vanilla: dual clip, ``clip_ratio_c``          ``dual_clip=clip_ratio_c`` (default 3.0; always on)
GSPO: ``sg[s_i]*pi/sg[pi]``, ``max=10``       ``importance_sampling="seq-token"``, ``log_ratio_clamp=10``;
                                              ``loss_agg_mode`` as given (default ``"seq-mean-token-mean"``)
cispo: ``-sg(clip(r))*A*log_prob``            ``loss_type="cispo"``, the clip ratios, ``log_ratio_clamp=20``
sapo: ``tau_pos``, ``tau_neg``                ``loss_type="sapo"``, ``tau_pos``, ``tau_neg`` (ActorConfig's
                                              1.0, 1.05), ``log_ratio_clamp=20``; always
                                              ``loss_agg_mode="seq-mean-token-mean"`` (verl ignores the argument)
gpg: ``-log_prob * A``                        ``loss_type="gpg"``, ``old_log_probs=None`` (verl does not read it)
dro: ``policy_loss.dro_beta``                 ``loss_type="dro"``, ``dro_beta``; no clamp (``d`` as it is)
dppo_tv / dppo_kl: the clip ratios            ``loss_type="dppo_tv"`` / ``"dppo_kl"``, ``clip_low``, ``clip_high``
                                              (the divergence thresholds), ``log_ratio_clamp=20``
dppo: ``config.get("clip_ratio_c", 20.0)``    ``ratio_cap`` (an ActorConfig has the field: 3.0, not 20.0;
                                              ``inf``: ``ratio_cap=None``)
geo_mean: GMPO, ``torch.mean`` over rows      ``loss_type="geo_mean"``, ``importance_sampling="seq"``, the clip
                                              ratios as log-ratio bounds, ``"seq-mean-token-mean"`` with
                                              ``num_seqs=B``, no clamp; ``loss_agg_mode`` and
                                              ``global_batch_info`` ignored (as verl); IS weights: their
                                              per-row geometric mean
bypass_mode (``old_log_prob`` = rollout's)    verl's own rollout_corr_helper for the weights ``pi / pi_rollout``,
                                              the rejection mask and ``rollout_corr/*`` (eager, its syncs); then
                                              ppo_clip: vanilla on that mask; reinforce: ``loss_type="gpg"`` with
                                              the weights as ``token_weights``
``compute_value_loss``                        ``ppo_ext.value_loss`` (``loss_type="value"``), verl's arguments
``rollout_is_weights``                        ``token_weights``
``agg_loss(..., **global_batch_info)``        ``num_tokens=batch_num_tokens``, ``num_seqs=global_batch_size``,
                                              ``loss_scale_factor``; the loss is then multiplied by ``dp_size``
``actor/pg_clipfrac``                         ``metrics["clipfrac_active"]`` (vanilla: ``L2 > L1``; GSPO; dppo:
                                              the tokens not kept); ``metrics["clipfrac"]`` (cispo:
                                              ``r != clip(r)``, clipped either way); 0.0 (sapo)
``actor/ppo_kl``                              ``metrics["approx_kl"]`` (``mean(-d)``, ``d`` clamped as the ratio's;
                                              dro: unclamped)
``actor/pg_clipfrac_lower``                   ``metrics["dual_clipfrac"]`` (vanilla; dppo: kept tokens with
                                              ``r > clip_ratio_c``); 0.0 (GSPO, cispo, sapo)
the metric keys                               verl's, in its order: the three above; dro ``actor/ppo_kl``
                                              alone; gpg none (``{}``)
============================================  ======================================================================

``dp_size`` is there because FSDP/DDP *average* gradients over the data-parallel ranks: verl scales
each rank's loss by ``dp_size`` so that the average of the per-rank gradients is the gradient of the
loss over the global batch, whose normalisers (``batch_num_tokens``, ``global_batch_size``) are the
global counts (``ppo_ext.distributed.global_normalisers`` all-reduces them in one collective).

The functions are checked against verl 0.9.1's own ``compute_policy_loss_<mode>`` and ``agg_loss``
(verl/trainer/ppo/core_algos.py, loaded from the installed package by tests/frameworks.py and called as
verl's ``ppo_loss`` in verl/workers/utils/losses.py calls them, with verl's own ActorConfig) in
tests/test_compat_verl.py. verl's quirks are reproduced: sapo's fixed aggregation, dppo's truncation
read with ``.get`` (3.0 on an ActorConfig, 20.0 only on a config without the key), the clamp to
``[-20, 20]`` in vanilla, cispo, sapo and dppo but not dro, dppo's keep decisions on the unclamped
probabilities, the metric dicts with their constant zeros. verl asserts that cispo's and sapo's config
is an ActorConfig; the adapter reads any config form (ActorConfig, DictConfig, dict, namespace), and
raises ValueError where verl asserts (no config, dro without ``config.policy_loss``).

Where the results can differ from verl's (all of them corner cases, and all documented in the tests):

- A zero normaliser (no valid token in a ``token-mean`` micro-batch with no ``batch_num_tokens``, a
  ``global_batch_size`` of 0; sapo: any mode) gives loss 0 and gradient 0, where verl divides by zero
  (NaN/inf).
- NaN or inf at masked positions never reaches the loss, the gradient or a metric. In verl a NaN
  advantage or ``rollout_is_weights`` there makes the gradient NaN (``0 * nan`` in the backward of the
  product), and so does a NaN log-prob or old log-prob in cispo, dro and dppo (their loss is a coefficient
  made of them times ``log_prob``); any NaN there makes verl's loss NaN in the sequence modes, and so in
  sapo whatever the mode (``agg_loss`` multiplies by the mask instead of selecting; not gpg's
  ``old_log_prob``, which it does not read), as does a NaN log-prob or old log-prob in GSPO (its row
  mean multiplies the log-ratios by the mask). verl's metrics select (``masked_mean``): never NaN.
  ``response_mask`` is read as 0/1 (non-zero = valid), as verl's always is (its ``ppo_loss`` passes a
  bool mask).
- ``seq-mean-token-mean`` (sapo's always) divides each row by its token count ``n_i``; verl by ``n_i +
  1e-8``; the metrics divide by ``N`` where verl divides by ``N + 1e-8`` (relative differences of 1e-8/n).
- Option values ppo_ext refuses raise ValueError where verl computes a number: ``tau_pos``/``tau_neg``
  not finite and > 0 (verl: infinite or sign-flipped gates), ``dro_beta`` NaN or inf (verl: a NaN or
  inf loss; None and <= 0 raise in both, with verl's message), negative clip ratios, and dppo's
  ``clip_ratio_c`` <= 0 or NaN (verl: every ratio truncated to it, or NaN).
- GSPO: verl clamps the log of the sequence ratio from above only (``max=10``); ppo_ext clamps to
  ``[-10, 10]``. They differ only for a row whose mean log-ratio is below -10 (ratio < 4.5e-5): there
  ppo_ext's per-token loss is ``-A * 4.5e-5`` with gradient 0 instead of ``-A * r`` with gradient
  ``-A * r`` (both below ``4.5e-5 * |A|``).
- GSPO: ``actor/ppo_kl`` is ppo_ext's ``approx_kl``, whose per-token log-ratio is clamped to
  ``[-10, 10]``; verl's GSPO ``ppo_kl`` is not clamped. They differ only if a token's ``|log_prob -
  old_log_prob|`` exceeds 10 (a probability ratio above 22026).

- dppo's keep decisions compare a divergence with a threshold, computed by verl's formula in the inputs'
  precision (float32 for float32). On 200,000 random float32 tokens they are verl's float32 and float64
  decisions, and in float64 they are verl's even at the threshold; but a float32 divergence within
  float32 rounding (~1e-7) of the threshold can be decided otherwise than verl's float32 (exp and log
  round differently): in the tests, 822 of 20,000 tokens placed there for the TV, 1,574 for the KL, where
  verl's own float32 and float64 disagree on 1,900 and 6,076.

The loss path has no host synchronisation, except in clip_cov (verl's random draw: its ``.item()`` and
``nonzero``) and bypass_mode (verl's rollout_corr_helper: an ``.item()`` per metric). The metrics are Python floats, as verl returns them
(verl calls ``.item()`` on each): converting them costs one synchronisation (one ``.tolist()`` for all
of them). Pass ``return_tensors=True`` to get 0-dim tensors instead and no synchronisation at all.
"""

import math
import sys
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch

import ppo_ext
from ppo_ext.names import LOSS_AGG_MODES

__all__ = ["compute_policy_loss_vanilla", "compute_policy_loss_gspo", "compute_policy_loss_cispo",
           "compute_policy_loss_sapo", "compute_policy_loss_gpg", "compute_policy_loss_dro",
           "compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl", "compute_policy_loss_geo_mean",
           "compute_policy_loss_kl_cov", "compute_policy_loss_clip_cov", "compute_policy_loss_bypass_mode",
           "ppo_loss", "register_actor_loss",
           "compute_value_loss", "register", "LOSS_MODES", "NAMES",
           "POLICY_LOSSES", "VANILLA_NAME", "GSPO_NAME", "TOKEN_LOG_RATIO_CLAMP", "VANILLA_LOG_RATIO_CLAMP",
           "GSPO_LOG_RATIO_CLAMP", "DPPO_CLIP_RATIO_C_DEFAULT"]

# verl's loss modes the adapter provides, in register()'s order, and the names register() gives them.
LOSS_MODES = ("vanilla", "gspo", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "kl_cov",
              "clip_cov", "bypass_mode")
NAMES = {mode: f"ppo_ext_{mode}" for mode in LOSS_MODES}
VANILLA_NAME = NAMES["vanilla"]
GSPO_NAME = NAMES["gspo"]
# verl: torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0) in vanilla, cispo, sapo, dppo_tv, dppo_kl.
TOKEN_LOG_RATIO_CLAMP = 20.0
VANILLA_LOG_RATIO_CLAMP = TOKEN_LOG_RATIO_CLAMP
GSPO_LOG_RATIO_CLAMP = 10.0  # verl: torch.clamp(log_seq_importance_ratio, max=10.0)
DPPO_CLIP_RATIO_C_DEFAULT = 20.0  # verl's dppo: config.get("clip_ratio_c", 20.0) (ActorConfig has the field: 3.0)
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
_LOSS_AGG_MODES = LOSS_AGG_MODES  # verl's agg_loss takes every mode of ppo_ext, under the same names
_MISSING = object()

# verl's metric keys per mode, each with the ppo_ext metric that is its value (None: verl's constant 0.0).
_CLIPFRAC, _KL, _LOWER = "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"
_METRICS = {
    "vanilla": {_CLIPFRAC: "clipfrac_active", _KL: "approx_kl", _LOWER: "dual_clipfrac"},
    "gspo": {_CLIPFRAC: "clipfrac_active", _KL: "approx_kl", _LOWER: None},
    "cispo": {_CLIPFRAC: "clipfrac", _KL: "approx_kl", _LOWER: None},
    "sapo": {_CLIPFRAC: None, _KL: "approx_kl", _LOWER: None},
    "gpg": {},
    "dro": {_KL: "approx_kl"},
    "dppo_tv": {_CLIPFRAC: "clipfrac_active", _KL: "approx_kl", _LOWER: "dual_clipfrac"},
    "dppo_kl": {_CLIPFRAC: "clipfrac_active", _KL: "approx_kl", _LOWER: "dual_clipfrac"},
    "geo_mean": {_CLIPFRAC: "clipfrac_high", _KL: "approx_kl", _LOWER: "clipfrac_low"},
    "kl_cov": {},  # (its actor/ppo_kl, mean |d|, is not a kernel metric: compute_policy_loss_kl_cov)
    "clip_cov": {},  # (its pg_clipfrac is the fraction of tokens it removed: compute_policy_loss_clip_cov)
    "bypass_mode": {},  # (vanilla's or reinforce's, and verl's rollout_corr/*: compute_policy_loss_bypass_mode)
}


def _config_value(config, key: str, default):
    """A config value read the way verl reads its ActorConfig: by attribute (``config.clip_ratio``) or
    with ``.get`` (``config.get("clip_ratio_c", 3.0)``). Accepts verl's dataclass configs, omegaconf's
    DictConfig, plain dicts and any object with attributes; a missing key gives ``default`` (the
    default of verl's ActorConfig)."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    value = getattr(config, key, _MISSING)
    if value is not _MISSING:
        return value
    get = getattr(config, "get", None)
    return get(key, default) if callable(get) else default


def _clip_ratios(config) -> Tuple[float, float]:
    clip_ratio = _config_value(config, "clip_ratio", 0.2)
    low = _config_value(config, "clip_ratio_low", None)
    high = _config_value(config, "clip_ratio_high", None)
    return float(clip_ratio if low is None else low), float(clip_ratio if high is None else high)


def _aggregation(config, loss_agg_mode: str) -> Tuple[Dict[str, Any], Any]:
    """ppo_ext's normaliser arguments and the dp_size factor for verl's ``agg_loss(loss_agg_mode,
    **config.global_batch_info)``, with verl's checks."""
    return _agg_loss_arguments(_config_value(config, "global_batch_info", None) or {}, loss_agg_mode)


def _agg_loss_arguments(info: Mapping, loss_agg_mode: str) -> Tuple[Dict[str, Any], Any]:
    """The same for verl's ``agg_loss(loss_agg_mode, **info)``."""
    unknown = sorted(set(info) - set(_GLOBAL_BATCH_KEYS))
    if unknown:
        raise TypeError(f"config.global_batch_info has unknown keys {unknown}; verl's agg_loss takes "
                        f"{list(_GLOBAL_BATCH_KEYS)}")
    dp_size = info.get("dp_size", 1)
    dp_size = 1 if dp_size is None else dp_size
    batch_num_tokens = info.get("batch_num_tokens", None)
    global_batch_size = info.get("global_batch_size", None)
    if loss_agg_mode not in _LOSS_AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r} (one of {list(_LOSS_AGG_MODES)})")
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        return {"num_tokens": batch_num_tokens}, dp_size
    if loss_agg_mode == "token-sum":
        return {}, dp_size
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    options = {"num_seqs": global_batch_size}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        options["loss_scale_factor"] = info.get("loss_scale_factor", None)  # None: the response length T
    return options, dp_size


def _finish(loss: torch.Tensor, dp_size, metrics: Dict[str, torch.Tensor], return_tensors: bool):
    if dp_size != 1:
        loss = loss * dp_size
    if return_tensors or not metrics:
        return loss, metrics
    # verl returns floats (.item() on each metric): one synchronisation for all of them.
    values = torch.stack([v.to(torch.float32) for v in metrics.values()]).tolist()
    return loss, dict(zip(metrics.keys(), values))


def _policy_loss_config(config, mode: str):
    """``config.policy_loss`` (dro's, kl_cov's, clip_cov's options), which verl asserts is there."""
    _require_config(config, mode)
    policy_loss_config = _config_value(config, "policy_loss", None)
    if policy_loss_config is None:
        raise ValueError(f"compute_policy_loss_{mode} needs config.policy_loss (verl asserts config.policy_loss is "
                         "not None)")
    return policy_loss_config


def _number_or_default(policy_loss_config, name: str, default: float) -> float:
    """A ``config.policy_loss`` number, its default where it is None (verl's ``x if x is not None else default``)."""
    value = _config_value(policy_loss_config, name, None)
    return default if value is None else float(value)


def _require_config(config, mode: str) -> None:
    if config is None:
        raise ValueError(f"compute_policy_loss_{mode} needs the actor config (verl asserts config is not None)")


def _compute(mode: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str, config,
             rollout_is_weights, return_tensors: bool, **options):
    """The one ppo_ext.policy_loss call of every adapter: verl's ``agg_loss(..., loss_agg_mode,
    **config.global_batch_info)`` as normalisers and the dp_size factor, ``rollout_is_weights`` as
    token_weights, the family's ``options``; then verl's metric dict of ``mode``."""
    normalisers, dp_size = _aggregation(config, loss_agg_mode)
    out = ppo_ext.policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        loss_agg_mode=loss_agg_mode, token_weights=rollout_is_weights, **normalisers, **options,
    )
    return _finish(out.loss, dp_size, _verl_metrics(mode, out), return_tensors)


def _verl_metrics(mode: str, out) -> Dict[str, torch.Tensor]:
    """verl's metric dict of ``mode`` from ppo_ext's output (``_METRICS``; None: verl's constant 0.0)."""
    return {key: (out.metrics[name] if name is not None
                  else torch.zeros((), dtype=torch.float32, device=out.loss.device))
            for key, name in _METRICS[mode].items()}


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_vanilla`` (PPO with dual clip), computed by ppo_ext's fused kernel.

    Token-level ratio ``exp(clamp(log_prob - old_log_prob, -20, 20))``, clip ``[1 - clip_ratio_low,
    1 + clip_ratio_high]``, dual clip at ``clip_ratio_c`` (``config.get("clip_ratio_c", 3.0)``, must be
    > 1) for negative advantages, ``rollout_is_weights`` multiplying the per-token loss, then verl's
    ``agg_loss`` with ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``).

    All tensors are (batch, response_length). Returns ``(pg_loss, metrics)`` with the metric keys
    ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as Python floats, which costs
    one host synchronisation (verl itself calls ``.item()`` on each); ``return_tensors=True`` keeps
    them as 0-dim tensors. The loss itself is computed without any synchronisation.
    """
    _require_config(config, "vanilla")
    clip_low, clip_high = _clip_ratios(config)
    clip_ratio_c = float(_config_value(config, "clip_ratio_c", 3.0))
    if not clip_ratio_c > 1.0:
        raise ValueError("The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
                         f"but get the value: {clip_ratio_c}.")
    return _compute("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type="vanilla", clip_low=clip_low,
                    clip_high=clip_high, dual_clip=clip_ratio_c, importance_sampling="token",
                    log_ratio_clamp=TOKEN_LOG_RATIO_CLAMP)


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_gspo`` (GSPO-token), computed by ppo_ext's fused kernel.

    Ratio ``s_i,t = sg[s_i] * pi / sg[pi]`` with ``log s_i`` the masked mean log-ratio of row i,
    clamped at 10; clip ``[1 - clip_ratio_low, 1 + clip_ratio_high]``; no dual clip;
    ``rollout_is_weights`` multiplying the per-token loss; then verl's ``agg_loss`` in ``loss_agg_mode``
    (verl's actor passes ``config.loss_agg_mode``; the function's default is ``"seq-mean-token-mean"``,
    the GSPO paper's) with ``config.global_batch_info``.

    Returns ``(pg_loss, metrics)`` with ``actor/pg_clipfrac``, ``actor/ppo_kl`` and
    ``actor/pg_clipfrac_lower`` (always 0.0) as Python floats: one host synchronisation, as verl's
    ``.item()`` calls; ``return_tensors=True`` keeps 0-dim tensors. See the module docstring for the
    two corner cases (log-ratios beyond +-10) where the numbers differ from verl's.
    """
    _require_config(config, "gspo")
    clip_low, clip_high = _clip_ratios(config)
    return _compute("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type="vanilla", clip_low=clip_low,
                    clip_high=clip_high, dual_clip=None, importance_sampling="seq-token",
                    log_ratio_clamp=GSPO_LOG_RATIO_CLAMP)


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_cispo`` (CISPO, MiniMax-M1), computed by ppo_ext's fused kernel.

    Per-token loss ``-sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A * log_prob`` with ``r =
    exp(clamp(log_prob - old_log_prob, -20, 20))``: the gradient flows through ``log_prob`` only.
    ``rollout_is_weights`` multiply it; then verl's ``agg_loss`` in ``loss_agg_mode`` with
    ``config.global_batch_info``. Metrics as verl's: ``actor/pg_clipfrac`` the fraction of valid tokens
    whose ratio is clipped (``ratio != clipped_ratio``: below or above the bounds), ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower`` always 0.0; floats, or 0-dim tensors with ``return_tensors=True``.
    """
    _require_config(config, "cispo")
    clip_low, clip_high = _clip_ratios(config)
    return _compute("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type="cispo", clip_low=clip_low,
                    clip_high=clip_high, log_ratio_clamp=TOKEN_LOG_RATIO_CLAMP)


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_sapo`` (soft adaptive policy optimisation), computed by ppo_ext's
    fused kernel.

    Per-token loss ``-A * sigmoid(tau (r - 1)) * 4 / tau`` with ``r = exp(clamp(log_prob - old_log_prob,
    -20, 20))`` and ``tau = config.tau_pos`` where ``A > 0``, else ``config.tau_neg`` (ActorConfig's
    defaults 1.0 and 1.05); ``rollout_is_weights`` multiply it. As verl's, it aggregates with
    ``"seq-mean-token-mean"`` whatever ``loss_agg_mode`` says (the argument is accepted and ignored, an
    invalid mode too), with ``config.global_batch_info``. Metrics: ``actor/pg_clipfrac`` and
    ``actor/pg_clipfrac_lower`` always 0.0, ``actor/ppo_kl``.
    """
    _require_config(config, "sapo")
    tau_pos = float(_config_value(config, "tau_pos", 1.0))
    tau_neg = float(_config_value(config, "tau_neg", 1.05))
    return _compute("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                    rollout_is_weights, return_tensors, loss_type="sapo", tau_pos=tau_pos, tau_neg=tau_neg,
                    log_ratio_clamp=TOKEN_LOG_RATIO_CLAMP)


def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_gpg`` (GPG), computed by ppo_ext's fused kernel.

    Per-token loss ``-log_prob * A`` (``old_log_prob`` is not read, as in verl), times
    ``rollout_is_weights``, then verl's ``agg_loss`` in ``loss_agg_mode`` with
    ``config.global_batch_info``. Returns ``(pg_loss, {})``: verl's GPG reports no metric.
    """
    _require_config(config, "gpg")
    return _compute("gpg", None, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type="gpg")


def compute_policy_loss_dro(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_dro`` (direct reward optimisation with a quadratic log-ratio
    penalty), computed by ppo_ext's fused kernel.

    Per-token loss ``-(log_prob * A - 0.5 * beta * (log_prob - old_log_prob) ** 2)``, the log-ratio not
    clamped, ``beta = config.policy_loss.dro_beta`` (ValueError, with verl's message, when it is None or
    <= 0); times ``rollout_is_weights``; then verl's ``agg_loss`` in ``loss_agg_mode`` with
    ``config.global_batch_info``. Metrics: ``actor/ppo_kl`` alone (the unclamped ``mean(-d)``).
    """
    beta = _config_value(_policy_loss_config(config, "dro"), "dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return _compute("dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type="dro", dro_beta=float(beta))


def _compute_dppo(mode: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                  rollout_is_weights, return_tensors):
    _require_config(config, mode)
    clip_low, clip_high = _clip_ratios(config)  # the divergence thresholds
    clip_ratio_c = float(_config_value(config, "clip_ratio_c", DPPO_CLIP_RATIO_C_DEFAULT))
    if not clip_ratio_c > 0:
        raise ValueError(f"compute_policy_loss_{mode} truncates the ratio at clip_ratio_c, which must be > 0 "
                         f"(ppo_ext's ratio_cap), got {clip_ratio_c}")
    return _compute(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, return_tensors, loss_type=mode, clip_low=clip_low, clip_high=clip_high,
                    ratio_cap=None if clip_ratio_c == math.inf else clip_ratio_c,
                    log_ratio_clamp=TOKEN_LOG_RATIO_CLAMP)


def compute_policy_loss_dppo_tv(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_dppo_tv`` (DPPO-Binary-TV), computed by ppo_ext's fused kernel.

    Per-token loss ``-A * sg(min(r, clip_ratio_c)) * log_prob * keep`` with ``r = exp(clamp(log_prob -
    old_log_prob, -20, 20))``; ``keep`` (a constant) is ``p - p_old <= clip_ratio_high`` where ``A > 0``,
    ``p - p_old >= -clip_ratio_low`` otherwise (``p = exp(log_prob)``, unclamped; the clip ratios are the
    TV thresholds, each defaulting to ``clip_ratio``). ``clip_ratio_c`` is read as verl reads it,
    ``config.get("clip_ratio_c", 20.0)``: ActorConfig's field, 3.0 by default. Times
    ``rollout_is_weights``, then verl's ``agg_loss`` in ``loss_agg_mode`` with ``config.global_batch_info``.
    Metrics: ``actor/pg_clipfrac`` (tokens not kept), ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (kept
    tokens with ``r > clip_ratio_c``).
    """
    return _compute_dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, return_tensors)


def compute_policy_loss_dppo_kl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_dppo_kl`` (DPPO-Binary-KL), computed by ppo_ext's fused kernel.

    As ``compute_policy_loss_dppo_tv`` with ``keep`` from the binary KL ``b = p_old (old - lp) + (1 -
    p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``: ``b <= clip_ratio_high or p <= p_old`` where ``A >
    0``, ``b <= clip_ratio_low or p >= p_old`` otherwise.
    """
    return _compute_dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, return_tensors)


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_geo_mean`` (GMPO), computed by ppo_ext's fused kernel.

    Per row ``-mean_t(A) * exp(mean_t(q))`` with ``q = sign(A) min(sign(A) d, sign(A) clamp(d, -clip_ratio_low,
    clip_ratio_high))`` on the unclamped log-ratio ``d`` (ppo_ext's ``loss_type="geo_mean"``,
    ``importance_sampling="seq"``), averaged over all ``B`` rows, empty ones included, as verl's
    ``torch.mean``: verl ignores ``loss_agg_mode`` and ``config.global_batch_info`` (no dp_size factor) here,
    and so does this function. ``rollout_is_weights`` enter as verl's per-row geometric mean
    ``exp(mean_t log(w + 1e-10))`` (computed here, eagerly). Metrics: ``actor/pg_clipfrac`` (valid tokens whose
    log-ratio lies outside the clip range, with ``A > 0``), ``actor/ppo_kl`` (unclamped),
    ``actor/pg_clipfrac_lower`` (outside, ``A < 0``).
    """
    _require_config(config, "geo_mean")
    clip_low, clip_high = _clip_ratios(config)
    weights = None
    if rollout_is_weights is not None:
        valid = response_mask != 0
        log_w = torch.where(valid, torch.log(rollout_is_weights.detach() + 1e-10), 0.0)
        row = log_w.sum(-1, keepdim=True) / (valid.sum(-1, keepdim=True) + 1e-8)
        weights = torch.exp(row).expand_as(log_prob)
    out = ppo_ext.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss_type="geo_mean", importance_sampling="seq",
        loss_agg_mode="seq-mean-token-mean", clip_low=clip_low, clip_high=clip_high, token_weights=weights,
        num_seqs=log_prob.shape[0],
    )
    return _finish(out.loss, 1, _verl_metrics("geo_mean", out), return_tensors)


# kl_cov's surrogate -A r is unclipped: the clipped loss with an interval that holds every ratio, [1 - 1, 1 + max]
# (in float32 the upper bound is inf; both branches of the clipped loss are then -A r, with -A r's gradient).
_UNCLIPPED = dict(clip_low=1.0, clip_high=sys.float_info.max)


def _covariance_terms(advantages, log_prob, valid) -> torch.Tensor:
    """kl_cov's and clip_cov's statistic per token, (A - mean A)(lp - mean lp), the means over the valid tokens
    (advantages (B, T) or (B,)); -inf at masked positions. Without gradient, on the device."""
    with torch.no_grad():
        adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).detach()
        lp = log_prob.detach()
        count = valid.sum().clamp(min=1)
        cov = (adv - torch.where(valid, adv, 0).sum() / count) * (lp - torch.where(valid, lp, 0).sum() / count)
        return torch.where(valid, cov, -torch.inf)


def _largest_covariance_tokens(cov, valid, ratio: float) -> torch.Tensor:
    """kl_cov's selection, on the device without a host synchronisation: the valid tokens whose covariance term
    (``_covariance_terms``) is among the max(1, floor(N * ratio)) largest, N the valid tokens (verl: torch.topk of
    the same values on the CPU). The k-th largest value is read from a device sort; tokens tied with it are all
    taken (topk takes k of them)."""
    with torch.no_grad():
        n = valid.sum()
        cov = cov.reshape(-1)
        k = torch.clamp(torch.floor(n.to(torch.float64) * ratio), min=1).to(torch.long)
        kth = cov.sort(descending=True).values.gather(0, (k - 1).clamp(max=cov.numel() - 1).reshape(1))
        return valid & (cov >= kth).reshape(valid.shape)


def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_kl_cov`` (KL-Cov, "The Entropy Mechanism of RL for Reasoning LMs"), on ppo_ext's
    kernel, without verl's host synchronisations (its ``.cpu()`` copies and topk there): the unclipped surrogate
    ``-A r``, ``r = exp(log_prob - old_log_prob)`` (no clamp), plus ``ppo_kl_coef * |log_prob - old_log_prob|`` at
    the ``max(1, int(N * kl_cov_ratio))`` valid tokens of largest ``(A - mean A)(log_prob - mean log_prob)``
    (``config.policy_loss.kl_cov_ratio``, ``ppo_kl_coef``), aggregated by ``agg_loss``. The selection is a device
    sort (``_largest_covariance_tokens``), the penalty the kernel's ``abs`` KL against ``old_log_prob`` at the
    selected tokens (against ``log_prob`` itself elsewhere: 0, gradient 0), one kernel call. Metric
    ``actor/ppo_kl``: the mean of ``|log_prob - old_log_prob|`` over valid tokens. ``rollout_is_weights`` weight
    the surrogate and, as verl's, the penalty: the kernel's KL term takes no weight, so then the weighted penalty
    (a few eager ops on the selected tokens) is aggregated by a second kernel call (``_aggregate``). Differs from
    verl: tokens tied at the k-th covariance are all penalised (verl's topk takes k)."""
    policy_loss_config = _policy_loss_config(config, "kl_cov")
    ratio = _number_or_default(policy_loss_config, "kl_cov_ratio", 0.0002)
    coef = _number_or_default(policy_loss_config, "ppo_kl_coef", 1.0)
    if not ratio > 0:
        raise ValueError("kl_cov_ratio should be larger than 0.")
    valid = response_mask != 0
    selected = _largest_covariance_tokens(_covariance_terms(advantages, log_prob, valid), valid, ratio)
    normalisers, dp_size = _aggregation(config, loss_agg_mode)
    if rollout_is_weights is None:
        penalised = torch.where(selected, old_log_prob.detach(), log_prob.detach())
        out = ppo_ext.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode,
                                  ref_log_probs=penalised, kl_coef=coef, kl_estimator="abs", kl_clamp=math.inf,
                                  **_UNCLIPPED, **normalisers)
        loss = out.loss
    else:
        out = ppo_ext.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode,
                                  token_weights=rollout_is_weights, **_UNCLIPPED, **normalisers)
        old = old_log_prob.detach()
        # the inner where keeps the unselected positions (masked NaN included) out of the gradient
        distance = (torch.where(selected, log_prob, old) - old).abs()
        penalty = torch.where(selected, coef * rollout_is_weights.detach() * distance, 0)
        loss = out.loss + _aggregate(penalty, response_mask, loss_agg_mode, normalisers)
    with torch.no_grad():
        n = valid.sum().clamp(min=1)
        abs_kl = torch.where(valid, (log_prob.detach() - old_log_prob.detach()).abs(), 0).sum() / n
    return _finish(loss, dp_size, {"actor/ppo_kl": abs_kl.to(torch.float32)}, return_tensors)


def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_clip_cov`` (Clip-Cov) on ppo_ext's kernel: the clipped loss (no dual clip, no
    clamp) with the loss of up to ``max(1, int(clip_cov_ratio * N))`` tokens removed, drawn at random (verl's
    ``torch.randperm``) among the valid tokens the clip leaves alone whose ``(A - mean A)(lp - mean lp)`` lies in
    ``(clip_cov_lb, clip_cov_ub)`` (``config.policy_loss``; defaults 0.0002, 1, 5). The draw is verl's own: its
    count read with ``.item()``, its candidates with ``nonzero`` (two host synchronisations, as in verl) and its
    ``torch.randperm`` from torch's default generator, so that the same generator state removes the same tokens;
    then one kernel call with the removed tokens' weight 0 (times ``rollout_is_weights``). Metrics
    ``actor/pg_clipfrac`` (the fraction of valid tokens removed, as verl's) and ``actor/ppo_kl``."""
    policy_loss_config = _policy_loss_config(config, "clip_cov")
    ratio, lb, ub = (_number_or_default(policy_loss_config, name, default) for name, default in
                     (("clip_cov_ratio", 0.0002), ("clip_cov_lb", 1.0), ("clip_cov_ub", 5.0)))
    if not ratio > 0:
        raise ValueError("clip_ratio should be larger than 0.")
    clip_low, clip_high = _clip_ratios(config)
    valid = response_mask != 0
    with torch.no_grad():
        lp, adv = log_prob.detach(), (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).detach()
        ratio_t = torch.exp(lp - old_log_prob)
        clipped = (-adv * torch.clamp(ratio_t, 1 - clip_low, 1 + clip_high) > -adv * ratio_t) & valid
        count = valid.sum()
        cov = torch.where(clipped, -torch.inf, _covariance_terms(advantages, log_prob, valid))
        clip_num = max(int(ratio * count.item()), 1)  # (verl's host synchronisation)
        candidates = torch.nonzero((cov < ub) & (cov > lb) & valid)  # (and its second)
        if len(candidates) > 0:
            candidates = candidates[torch.randperm(len(candidates))[:min(clip_num, len(candidates))]]
        kept = torch.ones_like(lp)
        kept[candidates[:, 0], candidates[:, 1]] = 0
        removed = (torch.where(valid, 1 - kept, 0).sum() / count.clamp(min=1)).to(torch.float32)
    weights = kept if rollout_is_weights is None else kept * rollout_is_weights
    normalisers, dp_size = _aggregation(config, loss_agg_mode)
    out = ppo_ext.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode,
                              clip_low=clip_low, clip_high=clip_high, token_weights=weights, **normalisers)
    metrics = {_CLIPFRAC: removed, _KL: out.metrics["approx_kl"]}
    return _finish(out.loss, dp_size, metrics, return_tensors)


def compute_policy_loss_bypass_mode(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    return_tensors: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """verl's ``compute_policy_loss_bypass_mode`` (``old_log_prob`` is the rollout's log-probs), its loss on
    ppo_ext's kernel. The importance weights ``pi / pi_rollout``, the rejection mask and the ``rollout_corr/*``
    metrics come from verl's own ``compute_rollout_correction_and_rejection_mask`` (verl.trainer.ppo.
    rollout_corr_helper: eager ops without gradient and its own host synchronisations, one ``.item()`` per metric,
    so the same options give the same mask and metrics), configured by ``config.policy_loss.rollout_correction``
    (``loss_type``, ``rollout_is``, ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
    ``rollout_rs_threshold``). Then, on the rejection mask, ``loss_type="ppo_clip"`` is
    ``compute_policy_loss_vanilla`` without weights (the ratio already is ``pi / pi_rollout``) and
    ``"reinforce"`` the loss ``-w A lp`` (the gpg family with the weights as token weights) with verl's
    ``actor/ppo_kl``. ``rollout_is_weights`` is ignored, as in verl. verl's trainer selects this loss by the name
    ``bypass_mode`` whatever the configured loss_mode: ``register(bypass_mode_name="bypass_mode")`` replaces verl's
    own with it."""
    _require_config(config, "bypass_mode")
    policy_loss_config = _config_value(config, "policy_loss", None)
    correction = None if policy_loss_config is None else _config_value(policy_loss_config, "rollout_correction", None)
    if correction is None:
        raise ValueError("rollout_correction config not found in policy_loss. When using loss_mode='bypass_mode', "
                         "ensure rollout_correction config is passed.")
    loss_type = _config_value(correction, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    try:
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
    except ImportError as exc:
        raise ImportError(f"ppo_ext.compat.verl.compute_policy_loss_bypass_mode uses verl's rollout_corr_helper for "
                          f"its weights, mask and metrics, but it could not be imported ({exc})") from exc
    with torch.no_grad():
        weights, mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob.detach(), rollout_log_prob=old_log_prob, response_mask=response_mask,
            **{name: _config_value(correction, name, default) for name, default in (
                ("rollout_is", None), ("rollout_is_threshold", 2.0), ("rollout_is_batch_normalize", False),
                ("rollout_rs", None), ("rollout_rs_threshold", None))})
    if loss_type == "ppo_clip":
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config,
                                                    None, return_tensors=True)
    else:
        normalisers, dp_size = _aggregation(config, loss_agg_mode)
        out = ppo_ext.policy_loss(log_prob, old_log_prob, advantages, mask, loss_type="gpg",
                                  token_weights=None if weights is None else weights.batch["rollout_is_weights"],
                                  loss_agg_mode=loss_agg_mode, **normalisers)
        loss, metrics = _finish(out.loss, dp_size, {_KL: out.metrics["approx_kl"]}, return_tensors=True)
    loss, metrics = _finish(loss, 1, metrics, return_tensors)
    metrics.update(rollout_metrics)
    return loss, metrics


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_value_loss`` (the critic's clipped value loss), computed by ppo_ext's fused kernel
    (``ppo_ext.value_loss``): ``0.5 * agg_loss(max((vpreds - returns)^2, (clip(vpreds, values -
    cliprange_value, values + cliprange_value) - returns)^2), loss_agg_mode, dp_size, ...)`` and
    ``vf_clipfrac``, the fraction of valid tokens where the clipped term is the larger, a 0-dim tensor as
    verl returns it. The same signature as verl's."""
    normalisers, dp_size = _agg_loss_arguments(
        {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size,
         "loss_scale_factor": loss_scale_factor}, loss_agg_mode)
    out = ppo_ext.value_loss(vpreds, values, returns, response_mask, clip_range=cliprange_value,
                             loss_agg_mode=loss_agg_mode, **normalisers)
    loss = out.loss * dp_size if dp_size != 1 else out.loss
    return loss, out.metrics["clipfrac"]


# ----------------------------------------------------------------------------------------------------
# The actor's whole loss: verl's ppo_loss (verl/workers/utils/losses.py)


def _verl_actor_modules():
    """verl's padding helpers, its Metric and its own ppo_loss (imported when the actor loss first runs)."""
    try:
        from verl.utils import metric
        from verl.workers.utils import losses, padding
    except ImportError as exc:
        raise ImportError(f"ppo_ext.compat.verl.ppo_loss runs inside verl (it reads verl's TensorDict batches), but "
                          f"verl could not be imported ({exc})") from exc
    return padding, metric, losses


def _agg_loss(values: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str, info: Mapping) -> torch.Tensor:
    """verl's ``agg_loss(values, response_mask, loss_agg_mode, **info)`` on the kernel (``_aggregate``), with the
    same normalisers and dp_size factor as every adapter's loss."""
    normalisers, dp_size = _agg_loss_arguments(info, loss_agg_mode)
    loss = _aggregate(values, response_mask, loss_agg_mode, normalisers)
    return loss * dp_size if dp_size != 1 else loss


def _aggregate(values: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str, normalisers) -> torch.Tensor:
    """``values`` aggregated by the kernel with ppo_ext's normaliser arguments (no dp_size factor), differentiable
    w.r.t. ``values``: the loss of the gpg family, ``-A * lp``, with ``A = -1`` and ``lp = values``."""
    minus_one = torch.full(values.shape[:1], -1.0, dtype=values.dtype, device=values.device)
    out = ppo_ext.policy_loss(values, None, minus_one, response_mask, loss_type="gpg", loss_agg_mode=loss_agg_mode,
                              **normalisers)
    return out.loss


def _kl_loss(log_prob, ref_log_prob, response_mask, loss_agg_mode: str, info: Mapping, kl_loss_type: str):
    """verl's ``agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type), response_mask, loss_agg_mode, **info)``,
    one kernel call: ppo_ext.kl_loss (verl's estimators and clamps)."""
    normalisers, dp_size = _agg_loss_arguments(info, loss_agg_mode)
    loss = ppo_ext.kl_loss(log_prob, ref_log_prob, response_mask, kl_estimator=kl_loss_type,
                           loss_agg_mode=loss_agg_mode, **normalisers)
    return loss * dp_size if dp_size != 1 else loss


def ppo_loss(config, model_output, data, dp_group=None):
    """verl 0.9's actor loss, ``verl.workers.utils.losses.ppo_loss`` (the ``loss_fn`` verl's actor worker calls
    with the micro-batch), on ppo_ext's kernels: the same signature, the same padded tensors (verl's own
    ``no_padding_2_padding`` and TensorDict selection), the same ``config.global_batch_info``, and

    - the policy loss of ``config.policy_loss.loss_mode`` (verl's name or ``ppo_ext_<mode>``) by this module's
      ``compute_policy_loss_<mode>``; a mode it does not cover hands the whole
      call to verl's own ppo_loss;
    - ``use_kl_loss``: ``kl_loss_coef`` times the KL to the reference (``data["ref_log_prob"]``, estimator
      ``kl_loss_type``, verl's ``kl_penalty`` with its clamps and "+" forms) aggregated as verl's ``agg_loss``
      does, one kernel call (apart from the policy loss: verl aggregates it with ``config.loss_agg_mode`` even for
      sapo and geo_mean, whose policy losses aggregate otherwise);
    - the entropy bonus, ``entropy_coeff`` times the aggregated ``model_output["entropy"]`` (when the model
      returned it), one kernel call, differentiable w.r.t. the entropy;

    and verl's metrics: the policy loss's (``Metric`` of ``MEAN``), ``actor/pg_loss``, ``actor/entropy_loss``,
    ``kl_loss`` (``Metric`` of ``SUM`` with global normalisers, else ``MEAN``, as verl) and ``kl_coef``.
    ``register_actor_loss()`` makes verl's actor worker use it."""
    padding, metric, losses = _verl_actor_modules()
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    mode = loss_mode[len("ppo_ext_"):] if loss_mode.startswith("ppo_ext_") else loss_mode
    if mode not in POLICY_LOSSES:
        return losses.ppo_loss(config, model_output, data, dp_group)
    Metric, AggregationType = metric.Metric, metric.AggregationType
    log_prob = padding.no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = padding.no_padding_2_padding(entropy, data)
    # verl's global batch info and metric aggregation (losses.py)
    info = config.global_batch_info
    info["dp_size"] = data["dp_size"]
    info["batch_num_tokens"] = data["batch_num_tokens"]
    info["global_batch_size"] = data["global_batch_size"]
    info["loss_scale_factor"] = config.loss_scale_factor
    global_info = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
                   or config.loss_scale_factor is not None)
    metric_aggregation = AggregationType.SUM if global_info else AggregationType.MEAN
    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [key for key in ("rollout_is_weights", "ref_log_prob") if key in data]
    data = data.select(*fields).to_padded_tensor()
    response_mask = data["response_mask"].to(bool)
    loss_agg_mode = config.loss_agg_mode
    pg_loss, pg_metrics = POLICY_LOSSES[mode](
        old_log_prob=data["old_log_probs"], log_prob=log_prob, advantages=data["advantages"],
        response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
        rollout_is_weights=data.get("rollout_is_weights", None), return_tensors=True)
    metrics = Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=metric_aggregation)
    policy_loss = pg_loss
    if entropy is not None:
        entropy_loss = _agg_loss(entropy, response_mask, loss_agg_mode, info)
        policy_loss = policy_loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)
    if config.use_kl_loss:
        kl_loss = _kl_loss(log_prob, data["ref_log_prob"], response_mask, loss_agg_mode, info, config.kl_loss_type)
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics


def register_actor_loss():
    """Makes verl's actor worker (``verl.workers.engine_workers``, which builds its ``loss_fn`` as
    ``partial(ppo_loss, config=actor_config)`` when the actor is initialised) use this module's ``ppo_loss``. Call
    it in the worker process before the actor is built (with ``register()`` for the policy losses). Returns verl's
    own ppo_loss."""
    try:
        from verl.workers import engine_workers
    except ImportError as exc:
        raise ImportError(f"ppo_ext.compat.verl.register_actor_loss() patches verl.workers.engine_workers, but it "
                          f"could not be imported ({exc})") from exc
    previous = engine_workers.ppo_loss
    engine_workers.ppo_loss = ppo_loss
    return previous


POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "dro": compute_policy_loss_dro,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "geo_mean": compute_policy_loss_geo_mean,
    "kl_cov": compute_policy_loss_kl_cov,
    "clip_cov": compute_policy_loss_clip_cov,
    "bypass_mode": compute_policy_loss_bypass_mode,
}
assert tuple(POLICY_LOSSES) == LOSS_MODES and tuple(_METRICS) == LOSS_MODES


def register(vanilla_name: str = VANILLA_NAME, gspo_name: str = GSPO_NAME, *,
             cispo_name: str = NAMES["cispo"], sapo_name: str = NAMES["sapo"], gpg_name: str = NAMES["gpg"],
             dro_name: str = NAMES["dro"], dppo_tv_name: str = NAMES["dppo_tv"],
             dppo_kl_name: str = NAMES["dppo_kl"], geo_mean_name: str = NAMES["geo_mean"],
             kl_cov_name: str = NAMES["kl_cov"], clip_cov_name: str = NAMES["clip_cov"],
             bypass_mode_name: str = NAMES["bypass_mode"]) -> Tuple[str, ...]:
    """Registers every function in verl's policy-loss registry (``core_algos.register_policy_loss``), by
    default as ``ppo_ext_<mode>`` (``NAMES``: ``ppo_ext_vanilla``, ``ppo_ext_gspo``, ``ppo_ext_cispo``,
    ``ppo_ext_sapo``, ``ppo_ext_gpg``, ``ppo_ext_dro``, ``ppo_ext_dppo_tv``, ``ppo_ext_dppo_kl``,
    ``ppo_ext_geo_mean``, ``ppo_ext_kl_cov``, ``ppo_ext_clip_cov``, ``ppo_ext_bypass_mode``), and
    returns the names in that order (``LOSS_MODES``): select one with
    ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``. verl's own losses are left as they are.
    Call it in every process that builds the actor (the registry is per process).

    Raises ImportError, saying what to do, when verl cannot be imported.
    """
    names = (vanilla_name, gspo_name, cispo_name, sapo_name, gpg_name, dro_name, dppo_tv_name, dppo_kl_name,
             geo_mean_name, kl_cov_name, clip_cov_name, bypass_mode_name)
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError(
            "ppo_ext.compat.verl.register() puts ppo_ext's losses into verl's policy-loss registry, but verl "
            f"could not be imported ({exc}). Install verl (pip install verl) in this environment, or call "
            "ppo_ext.compat.verl.compute_policy_loss_<mode> (vanilla, gspo, ...) directly."
        ) from exc
    register_policy_loss = getattr(core_algos, "register_policy_loss", None)
    if register_policy_loss is None:
        raise ImportError("this verl has no verl.trainer.ppo.core_algos.register_policy_loss (verl >= 0.5 has); "
                          "call ppo_ext.compat.verl's functions directly instead")
    for mode, name in zip(LOSS_MODES, names):
        register_policy_loss(name)(POLICY_LOSSES[mode])
    return names
