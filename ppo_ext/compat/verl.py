"""verl adapter: verl 0.9's ``compute_policy_loss_vanilla`` and ``compute_policy_loss_gspo`` on ppo_ext's kernel.

Same signatures, same return values ``(pg_loss, pg_metrics)``, same metric keys, same config reading
and the same aggregation (``agg_loss`` with ``config.global_batch_info``) as the functions of the same
names in ``verl/trainer/ppo/core_algos.py``; the per-token loss, its reduction and its gradient are
computed by one ``ppo_ext.policy_loss`` call (forward and backward fused) instead of verl's eager ops.

Use inside verl (in every process that builds the actor, e.g. the worker module)::

    from ppo_ext.compat import verl as ppo_ext_verl
    ppo_ext_verl.register()   # -> ("ppo_ext_vanilla", "ppo_ext_gspo")
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=ppo_ext_vanilla   (or ppo_ext_gspo)

or call the functions directly where verl would call its own.

How verl's options map onto ppo_ext's (see docs/SPEC.md for the latter):

========================================  =========================================================
verl                                      ppo_ext.policy_loss
========================================  =========================================================
``clip_ratio``, ``clip_ratio_low/high``    ``clip_low``, ``clip_high`` (None: ``clip_ratio``)
vanilla: ratio ``exp(clamp(d, -20, 20))``  ``importance_sampling="token"``, ``log_ratio_clamp=20``
vanilla: dual clip, ``clip_ratio_c``       ``dual_clip=clip_ratio_c`` (default 3.0; always on)
GSPO: ``sg[s_i]*pi/sg[pi]``, ``max=10``    ``importance_sampling="seq-token"``, ``log_ratio_clamp=10``;
                                           ``loss_agg_mode`` as given (default ``"seq-mean-token-mean"``)
``rollout_is_weights``                     ``token_weights``
``agg_loss(..., **global_batch_info)``     ``num_tokens=batch_num_tokens``, ``num_seqs=global_batch_size``,
                                           ``loss_scale_factor``; the loss is then multiplied by ``dp_size``
``actor/pg_clipfrac``                      ``metrics["clipfrac_active"]`` (``L2 > L1``)
``actor/ppo_kl``                           ``metrics["approx_kl"]`` (``mean(-d)``, ``d`` clamped)
``actor/pg_clipfrac_lower``                ``metrics["dual_clipfrac"]`` (vanilla); 0.0 (GSPO)
========================================  =========================================================

``dp_size`` is there because FSDP/DDP *average* gradients over the data-parallel ranks: verl scales
each rank's loss by ``dp_size`` so that the average of the per-rank gradients is the gradient of the
loss over the global batch, whose normalisers (``batch_num_tokens``, ``global_batch_size``) are the
global counts (``ppo_ext.distributed.global_normalisers`` all-reduces them in one collective).

The functions are checked against verl 0.9.1's own ``compute_policy_loss_vanilla``,
``compute_policy_loss_gspo`` and ``agg_loss`` (verl/trainer/ppo/core_algos.py, loaded from the installed
package by tests/frameworks.py and called as verl's ``ppo_loss`` in verl/workers/utils/losses.py calls
them, with verl's own ActorConfig) in tests/test_compat_verl.py.

Where the results can differ from verl's (all of them corner cases, and all documented in the tests):

- A zero normaliser (no valid token in a ``token-mean`` micro-batch with no ``batch_num_tokens``, a
  ``global_batch_size`` of 0) gives loss 0 and gradient 0, where verl divides by zero (NaN/inf).
- NaN or inf at masked positions never reaches the loss, the gradient or a metric. In verl a NaN
  advantage there makes the gradient NaN (``0 * nan`` in the backward of ``-A * ratio``), and a NaN
  log-prob or advantage makes the loss NaN in the sequence modes (``agg_loss`` multiplies by the mask
  instead of selecting), as does a NaN log-prob in GSPO (its row mean multiplies the log-ratios by the
  mask). ``response_mask`` is read as 0/1 (non-zero = valid), as verl's always is (its ``ppo_loss``
  passes a bool mask).
- ``seq-mean-token-mean`` divides each row by its token count ``n_i``; verl by ``n_i + 1e-8``; the
  metrics divide by ``N`` where verl divides by ``N + 1e-8`` (relative differences of 1e-8/n).
- GSPO: verl clamps the log of the sequence ratio from above only (``max=10``); ppo_ext clamps to
  ``[-10, 10]``. They differ only for a row whose mean log-ratio is below -10 (ratio < 4.5e-5): there
  ppo_ext's per-token loss is ``-A * 4.5e-5`` with gradient 0 instead of ``-A * r`` with gradient
  ``-A * r`` (both below ``4.5e-5 * |A|``).
- GSPO: ``actor/ppo_kl`` is ppo_ext's ``approx_kl``, whose per-token log-ratio is clamped to
  ``[-10, 10]``; verl's GSPO ``ppo_kl`` is not clamped. They differ only if a token's ``|log_prob -
  old_log_prob|`` exceeds 10 (a probability ratio above 22026).

The loss path has no host synchronisation. The metrics are Python floats, as verl returns them
(verl calls ``.item()`` on each): converting them costs one synchronisation (one ``.tolist()`` for all
three). Pass ``return_tensors=True`` to get 0-dim tensors instead and no synchronisation at all.
"""

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch

import ppo_ext
from ppo_ext.names import LOSS_AGG_MODES

__all__ = ["compute_policy_loss_vanilla", "compute_policy_loss_gspo", "register",
           "VANILLA_NAME", "GSPO_NAME", "VANILLA_LOG_RATIO_CLAMP", "GSPO_LOG_RATIO_CLAMP"]

VANILLA_NAME = "ppo_ext_vanilla"
GSPO_NAME = "ppo_ext_gspo"
VANILLA_LOG_RATIO_CLAMP = 20.0  # verl: torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
GSPO_LOG_RATIO_CLAMP = 10.0  # verl: torch.clamp(log_seq_importance_ratio, max=10.0)
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
_LOSS_AGG_MODES = LOSS_AGG_MODES  # verl's agg_loss takes every mode of ppo_ext, under the same names
_MISSING = object()


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
    info = _config_value(config, "global_batch_info", None) or {}
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
    if return_tensors:
        return loss, metrics
    # verl returns floats (.item() on each metric): one synchronisation for all of them.
    values = torch.stack([v.to(torch.float32) for v in metrics.values()]).tolist()
    return loss, dict(zip(metrics.keys(), values))


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
    if config is None:
        raise ValueError("compute_policy_loss_vanilla needs the actor config (verl asserts config is not None)")
    clip_low, clip_high = _clip_ratios(config)
    clip_ratio_c = float(_config_value(config, "clip_ratio_c", 3.0))
    if not clip_ratio_c > 1.0:
        raise ValueError("The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
                         f"but get the value: {clip_ratio_c}.")
    normalisers, dp_size = _aggregation(config, loss_agg_mode)
    out = ppo_ext.policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c,
        importance_sampling="token", log_ratio_clamp=VANILLA_LOG_RATIO_CLAMP,
        loss_agg_mode=loss_agg_mode, token_weights=rollout_is_weights, **normalisers,
    )
    metrics = {
        "actor/pg_clipfrac": out.metrics["clipfrac_active"],
        "actor/ppo_kl": out.metrics["approx_kl"],
        "actor/pg_clipfrac_lower": out.metrics["dual_clipfrac"],
    }
    return _finish(out.loss, dp_size, metrics, return_tensors)


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
    if config is None:
        raise ValueError("compute_policy_loss_gspo needs the actor config (verl asserts config is not None)")
    clip_low, clip_high = _clip_ratios(config)
    normalisers, dp_size = _aggregation(config, loss_agg_mode)
    out = ppo_ext.policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=None,
        importance_sampling="seq-token", log_ratio_clamp=GSPO_LOG_RATIO_CLAMP,
        loss_agg_mode=loss_agg_mode, token_weights=rollout_is_weights, **normalisers,
    )
    metrics = {
        "actor/pg_clipfrac": out.metrics["clipfrac_active"],
        "actor/ppo_kl": out.metrics["approx_kl"],
        "actor/pg_clipfrac_lower": torch.zeros((), dtype=torch.float32, device=out.loss.device),
    }
    return _finish(out.loss, dp_size, metrics, return_tensors)


def register(vanilla_name: str = VANILLA_NAME, gspo_name: str = GSPO_NAME) -> Tuple[str, str]:
    """Registers the two functions in verl's policy-loss registry (``core_algos.register_policy_loss``)
    under ``vanilla_name`` and ``gspo_name``, and returns the names: select them with
    ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``. verl's own ``vanilla`` and ``gspo`` are
    left as they are. Call it in every process that builds the actor (the registry is per process).

    Raises ImportError, saying what to do, when verl cannot be imported.
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError(
            "ppo_ext.compat.verl.register() puts ppo_ext's losses into verl's policy-loss registry, but verl "
            f"could not be imported ({exc}). Install verl (pip install verl) in this environment, or call "
            "ppo_ext.compat.verl.compute_policy_loss_vanilla / compute_policy_loss_gspo directly."
        ) from exc
    register_policy_loss = getattr(core_algos, "register_policy_loss", None)
    if register_policy_loss is None:
        raise ImportError("this verl has no verl.trainer.ppo.core_algos.register_policy_loss (verl >= 0.5 has); "
                          "call ppo_ext.compat.verl's functions directly instead")
    register_policy_loss(vanilla_name)(compute_policy_loss_vanilla)
    register_policy_loss(gspo_name)(compute_policy_loss_gspo)
    return vanilla_name, gspo_name
