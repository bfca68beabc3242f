"""OpenRLHF adapter: OpenRLHF 0.11's ``PolicyLoss`` and ``ValueLoss`` (openrlhf.models.loss) on ppo_ext's kernel.

``PolicyLoss`` here is a drop-in ``torch.nn.Module`` for OpenRLHF 0.11.2's: the same constructor, the
same ``forward`` and the same return value, ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``
(0-dim tensors; the last two ``None`` without rollout correction, as OpenRLHF's). The loss and its
gradient come from one ``ppo_ext.policy_loss`` call (forward and backward fused); OpenRLHF is never
imported. In OpenRLHF's actor (``ActorPPOTrainer.__init__`` in openrlhf.trainer.ray.ppo_actor)::

    from ppo_ext.compat.openrlhf import PolicyLoss   # instead of: from openrlhf.models import PolicyLoss

and nothing else changes: ``training_step`` calls it as before, ``self.actor_loss_fn(action_log_probs,
old_action_log_probs, advantages, action_mask=..., rollout_log_probs=..., **loss_batch_info)`` with
``loss_batch_info = {dp_size, batch_num_tokens, global_batch_size}`` from
openrlhf.utils.loss_utils (the global counts of the optimizer step, all-reduced over the data-parallel
group and divided by the gradient-accumulation steps; float32 tensors).

How OpenRLHF's options map onto ppo_ext's (docs/SPEC.md):

- ``clip_eps_low``, ``clip_eps_high``, ``dual_clip``: ``clip_low``, ``clip_high``, ``dual_clip``
  (OpenRLHF applies the dual clip in both loss types);
- ``policy_loss_type="ppo"``, ratio ``exp(clamp(d, -20, 20))``: ``importance_sampling="token"``,
  ``log_ratio_clamp=20``;
- ``policy_loss_type="gspo"``, ``exp`` of the row's masked mean log-ratio, not clamped:
  ``importance_sampling="seq"`` (the gradient flows through the mean, as in OpenRLHF's), no clamp;
- ``token_level_loss=True``: ``loss_agg_mode="token-mean"`` with ``num_tokens=batch_num_tokens``;
  ``False`` (and always for GSPO): ``"seq-mean-token-mean"`` with ``num_seqs=global_batch_size``;
- ``dp_size`` multiplies the loss when the mode's normaliser is given (OpenRLHF's ``aggregate_loss``
  ignores it otherwise);
- rollout correction with ``"ppo"``: the kernel's rollout correction (ratio gating) or ``token_weights``
  (the divergence gatings), the per-token coefficient below; with
  ``"gspo"``: ``old_log_probs=rollout_log_probs`` (OpenRLHF's GSPO takes its ratio against the rollout
  policy and weights nothing);
- ``clip_ratio``: ``metrics["clipfrac_active"]`` (``surr2 < surr1``); ``ppo_kl``:
  ``metrics["approx_kl"]`` (``mean(-d)``), but for GSPO with rollout correction the mean of
  ``old_log_probs - log_probs`` (the kernel's ratio is against the rollout policy there).

Rollout (train/inference mismatch) correction, ``is_correction_level`` "token" or "seq" (OpenRLHF's named
schemes: TIS = token level, "clip" mode; ICEPOP = token level, "mask" mode; seq-mask-tis = seq level,
"mask" mode; FlashREINFORCE's trust region = seq level, "mask" mode, "binary_kl" gating): with
``is = exp(old_log_probs - rollout_log_probs)`` and the gated statistic ``s`` (gating "ratio": ``is``
itself at token level, ``exp`` of the row's masked mean of ``log is`` at seq level; "binary_kl" / "tv":
the sampled token's binary KL / total variation between ``p = exp(rollout_log_probs)`` and ``q =
exp(old_log_probs)``, both clamped to ``[1e-6, 1 - 1e-6]``, per token or its row mean), and ``(low,
high) = is_correction_threshold``, the per-token coefficient is ``clamp(s, low, high)`` ("clip" mode)
or ``is`` where ``low <= s <= high`` and 0 elsewhere ("mask" mode). It is a constant (no gradient). The
ratio gates are the kernel's rollout correction (``rollout_log_probs``, ``rollout_is="token"`` or
``"seq-mean"``, ``rollout_is_mode="truncate"`` for "clip" or ``"mask"`` with ``rollout_is_mask_weight="token"``,
the threshold as the bounds): no eager op over the batch. The divergence gates are computed here with a
few eager elementwise ops and passed to the kernel as ``token_weights``; ``is_filter_ratio`` is the fraction of valid tokens (token
level) or of rows (seq level, every row of the micro-batch) outside the band, ``vllm_kl`` the mean of
``rollout_log_probs - old_log_probs`` over valid tokens.

``kl_loss`` is the KL loss of OpenRLHF's actor (``args.algo.kl.use_loss``: ``compute_approx_kl`` with the k1, k2
or k3 estimator, clamped to [-10, 10], then ``aggregate_loss``) in one kernel call, for ``training_step``'s two
lines ``kl = compute_approx_kl(...)``, ``kl_loss = aggregate_loss(kl, action_mask, **loss_batch_info)``.

The class is checked against OpenRLHF 0.11.2's own ``PolicyLoss`` (loaded from the installed package by
tests/frameworks.py) in tests/test_compat_openrlhf.py: every option, ragged masks, empty rows, two
data-parallel ranks with the trainer's global normalisers; loss, gradient and the four metrics.

Where the results differ from OpenRLHF's (corner cases; each is tested):

- No valid token where the mode's normaliser is not given (OpenRLHF's ``masked_mean``: 0 / 0): loss 0
  and gradient 0 instead of NaN. With no valid token ``clip_ratio``, ``ppo_kl``, ``vllm_kl`` and (token
  level) ``is_filter_ratio`` are 0 (ppo_ext's convention), where OpenRLHF's are NaN. A zero
  ``batch_num_tokens`` / ``global_batch_size`` gives 0 where OpenRLHF divides by zero.
- ``ppo_kl`` for ``policy_loss_type="ppo"``: the kernel's ``approx_kl`` clamps each token's log-ratio
  to ``[-20, 20]`` (as the ratio is); OpenRLHF's ``ppo_kl`` is not clamped. They differ only where
  ``|log_probs - old_log_probs| > 20`` (a probability ratio above 4.8e8).
- NaN or inf at masked positions never reaches the loss, the gradient or a metric (ppo_ext's rule);
  in OpenRLHF ``(loss * mask).sum()`` lets a NaN there through (``nan * 0``), and a NaN masked
  ``rollout_log_probs`` or ``old_log_probs`` makes its seq-level gate drop the whole row.
- ``action_mask`` is read as 0/1 (non-zero = valid), as OpenRLHF's (bool) always is; a float mask
  with other values would weight tokens in OpenRLHF's sums. ``action_mask=None`` means every token
  is valid, also where OpenRLHF fails (GSPO; the normalisers given).
- ``seq-mean-token-mean`` divides each row by ``n_i`` where OpenRLHF divides by ``n_i + 1e-8``
  (relative differences of 1e-8 / n).
- Invalid options raise ``ValueError`` at construction (OpenRLHF asserts ``dual_clip > 1`` and checks
  ``policy_loss_type`` only in ``forward``); clip epsilons must be finite and >= 0 (ppo_ext's rule).

The loss path has no host synchronisation; neither have the metrics (0-dim tensors on the device, as
OpenRLHF returns them). The rollout correction adds a few eager elementwise passes over
``old_log_probs`` / ``rollout_log_probs`` (constants, no autograd), as many as OpenRLHF's own.
"""

import numbers
from typing import Optional, Sequence, Tuple

import torch

import ppo_ext
from ppo_ext.names import COUNT_INDEX

__all__ = ["PolicyLoss", "ValueLoss", "POLICY_LOSS_TYPES", "IS_CORRECTION_LEVELS", "IS_CORRECTION_MODES",
           "IS_CORRECTION_GATINGS", "PPO_LOG_RATIO_CLAMP"]

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_CORRECTION_LEVELS = ("off", "token", "seq")
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")
PPO_LOG_RATIO_CLAMP = 20.0  # OpenRLHF: (log_probs - old_log_probs).clamp(min=-20.0, max=20.0)
_PROB_CLAMP = 1e-6  # OpenRLHF's clamp of p and q in the divergence gatings


def _masked_sum_count(x: torch.Tensor, mask: Optional[torch.Tensor], dim=None):
    """(sum of x over valid positions, number of valid positions), masked values selected out (not
    multiplied), so that NaN at masked positions stays out."""
    if mask is None:
        n = torch.tensor(x.shape[-1] if dim is not None else x.numel(), dtype=x.dtype, device=x.device)
        return x.sum(dim=dim), n
    valid = mask != 0
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim), \
        valid.sum(dim=dim).to(x.dtype)


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over valid tokens; 0 with none (ppo_ext's convention for metrics)."""
    s, n = _masked_sum_count(x, mask)
    return s / n.clamp(min=1)


def _row_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 1) mean over each row's valid tokens; NaN for a row without any, as OpenRLHF's masked_mean
    (its gate then counts such a row as out of band)."""
    s, n = _masked_sum_count(x, mask, dim=-1)
    return (s / n).unsqueeze(-1)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF 0.11's ``PolicyLoss``, computed by ppo_ext's fused kernel (see the module docstring).

    ``PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
    policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
    is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0))``, OpenRLHF's arguments and
    defaults, with OpenRLHF's checks (as ``ValueError``).

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None)`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio)``.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"Invalid policy loss type: {policy_loss_type!r} (one of {list(POLICY_LOSS_TYPES)})")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in IS_CORRECTION_LEVELS:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in IS_CORRECTION_MODES:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in IS_CORRECTION_GATINGS:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
        threshold = tuple(is_correction_threshold)
        if len(threshold) != 2 or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in threshold):
            raise ValueError(f"is_correction_threshold must be (low, high), got {is_correction_threshold!r}")
        if is_correction_gating != "ratio" and is_correction_level != "off" and threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")

        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sample mean
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        gspo = policy_loss_type == "gspo"
        # The ratio-gated corrections are computed in the kernel (the divergence gates eagerly, as weights).
        self.kernel_correction = is_correction_level != "off" and is_correction_gating == "ratio" and not gspo
        correction = {}
        if self.kernel_correction:
            low, high = threshold
            correction = dict(rollout_is="token" if is_correction_level == "token" else "seq-mean",
                              rollout_is_mode="truncate" if is_correction_mode == "clip" else "mask",
                              rollout_is_mask_weight="token", rollout_is_low=low, rollout_is_high=high)
        self.ppo_ext_loss = ppo_ext.PolicyLoss(
            clip_low=clip_eps_low, clip_high=clip_eps_high, dual_clip=dual_clip,
            importance_sampling="seq" if gspo else "token", log_ratio_clamp=None if gspo else PPO_LOG_RATIO_CLAMP,
            loss_agg_mode="token-mean" if self.token_level_loss else "seq-mean-token-mean", **correction,
        )  # validates the options now

    def _rollout_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """The divergence gates ("binary_kl", "tv", "mask" mode: OpenRLHF allows no other): OpenRLHF's per-token
        coefficient (token_weights), is_filter_ratio and vllm_kl, all constants, eagerly. (The ratio gates are
        the kernel's rollout correction.)"""
        low, high = self.is_correction_threshold
        seq = self.is_correction_level == "seq"
        old, rollout = old_log_probs.detach(), rollout_log_probs.detach()
        token_is = (old - rollout).exp()  # pi_train / pi_rollout
        p = rollout.exp().clamp(_PROB_CLAMP, 1 - _PROB_CLAMP)
        q = old.exp().clamp(_PROB_CLAMP, 1 - _PROB_CLAMP)
        if self.is_correction_gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:  # tv
            stat = (p - q).abs()
        if seq:
            stat = _row_mean(stat, action_mask)
        in_band = (stat >= low) & (stat <= high)
        weights = torch.where(in_band, token_is, torch.zeros((), dtype=token_is.dtype, device=token_is.device))
        out_of_band = ~in_band
        out_of_band = out_of_band.to(token_is.dtype)
        if seq:  # every row of the micro-batch, as OpenRLHF's filtered.float().mean()
            is_filter_ratio = out_of_band.sum() / max(out_of_band.numel(), 1)
        else:
            is_filter_ratio = _masked_mean(out_of_band, action_mask)
        vllm_kl = _masked_mean(rollout - old, action_mask)
        return weights, is_filter_ratio, vllm_kl

    def _kernel_filter_ratio(self, out, rows: int) -> torch.Tensor:
        """OpenRLHF's is_filter_ratio from the kernel's counts: the filtered fraction of valid tokens, or at the
        sequence level of all rows (a row without a valid token counts as filtered: its mean is NaN)."""
        if self.is_correction_level == "token":
            return out.metrics["rollout_filtered_frac"]
        counts = out.counts.to(torch.float32)
        filtered = counts[COUNT_INDEX["rollout_filtered_seqs"]] + rows - counts[COUNT_INDEX["valid_seqs"]]
        return filtered / max(rows, 1)

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens=None,
        global_batch_size=None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        correction = self.is_correction_level != "off"
        if correction and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        ratio_old, weights, vllm_kl, is_filter_ratio = old_log_probs, None, None, None
        if correction and self.policy_loss_type == "gspo":
            ratio_old = rollout_log_probs  # OpenRLHF's GSPO ratio: log_probs - rollout_log_probs
        elif correction and not self.kernel_correction:
            weights, is_filter_ratio, vllm_kl = self._rollout_correction(old_log_probs, rollout_log_probs,
                                                                         action_mask)
        elif correction:
            vllm_kl = _masked_mean(rollout_log_probs.detach() - old_log_probs.detach(), action_mask)
        normaliser = batch_num_tokens if self.token_level_loss else global_batch_size
        out = self.ppo_ext_loss(
            log_probs, ratio_old, advantages, action_mask, weights,
            rollout_log_probs=rollout_log_probs if self.kernel_correction else None,
            **({"num_tokens": batch_num_tokens} if self.token_level_loss else {"num_seqs": global_batch_size}),
        )
        if self.kernel_correction:
            is_filter_ratio = self._kernel_filter_ratio(out, log_probs.shape[0])
        loss = _dp_scaled(out.loss, normaliser, dp_size)
        clip_ratio = out.metrics["clipfrac_active"]
        if ratio_old is old_log_probs:
            ppo_kl = out.metrics["approx_kl"]
        else:  # the kernel's approx_kl is against the rollout policy here
            ppo_kl = _masked_mean(old_log_probs.detach() - log_probs.detach(), action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


# OpenRLHF's compute_approx_kl estimators, each clamped to [-10, 10] (k3's log-ratio floored at -10 first: beyond
# it k3 is clamped anyway, but a -inf log-prob gives 10, not NaN).
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_loss(log_probs: torch.Tensor, base_log_probs: torch.Tensor, action_mask: Optional[torch.Tensor] = None,
            kl_estimator: str = "k1", *, token_level_loss: bool = True, dp_size: int = 1, batch_num_tokens=None,
            global_batch_size=None, unbiased_gradient: bool = False) -> torch.Tensor:
    """OpenRLHF 0.11's KL loss of its actor (``ActorPPOTrainer.training_step`` with ``args.algo.kl.use_loss``):
    ``aggregate_loss(compute_approx_kl(log_probs, base_log_probs, kl_estimator=...), action_mask,
    **loss_batch_info)``, one kernel call (``ppo_ext.kl_loss``, the value clamped to [-10, 10] as OpenRLHF's),
    differentiable w.r.t. ``log_probs``; times ``kl_ctl`` it is added to the actor loss
    there. ``unbiased_gradient=True`` (the straight-through, importance-weighted gradient) is not supported."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator} (OpenRLHF's are {list(KL_ESTIMATORS)})")
    if unbiased_gradient:
        raise NotImplementedError("unbiased_gradient=True (OpenRLHF's straight-through KL gradient weighted by the "
                                  "clamped, detached ratio to the old policy) is not supported by ppo_ext; use "
                                  "OpenRLHF's compute_approx_kl for it")
    if kl_estimator == "k3":  # OpenRLHF's floor of lp - base at -10 (log_ratio.clamp(min=-10))
        log_probs = torch.maximum(log_probs, base_log_probs - 10.0)
    normaliser = batch_num_tokens if token_level_loss else global_batch_size
    loss = ppo_ext.kl_loss(log_probs, base_log_probs, action_mask, kl_estimator=kl_estimator, kl_clamp=10.0,
                           **({"num_tokens": batch_num_tokens} if token_level_loss
                              else {"num_seqs": global_batch_size, "loss_agg_mode": "seq-mean-token-mean"}))
    return _dp_scaled(loss, normaliser, dp_size)


def _dp_scaled(loss: torch.Tensor, normaliser, dp_size) -> torch.Tensor:
    """OpenRLHF's aggregate_loss multiplies by dp_size only when the mode's global normaliser is given."""
    if normaliser is not None and not (isinstance(dp_size, numbers.Real) and dp_size == 1):
        return loss * dp_size  # against DeepSpeed/DDP averaging the gradients over the ranks
    return loss


class ValueLoss(torch.nn.Module):
    """OpenRLHF 0.11's critic ``ValueLoss`` (openrlhf.models.loss), computed by ppo_ext's fused kernel
    (``ppo_ext.value_loss``, loss_type="value"): ``ValueLoss(clip_eps=None, token_level_loss=True)``,
    ``forward(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
    global_batch_size=None)`` returns the loss ``0.5 * aggregate_loss(max((v_clip - R)^2, (v - R)^2))``,
    ``v_clip = old_values + clamp(values - old_values, -clip_eps, clip_eps)`` (ppo_ext clamps ``values`` to
    ``[old - eps, old + eps]``: the same numbers up to one rounding of ``old + (v - old)``), or ``0.5 * (v -
    R)^2`` aggregated without ``clip_eps``. Its aggregation and ``dp_size`` as ``PolicyLoss``'s."""

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens=None,
        global_batch_size=None,
    ) -> torch.Tensor:
        normaliser = batch_num_tokens if self.token_level_loss else global_batch_size
        out = ppo_ext.value_loss(
            values, old_values if self.clip_eps is not None else None, returns, action_mask,
            clip_range=self.clip_eps, loss_agg_mode="token-mean" if self.token_level_loss else "seq-mean-token-mean",
            **({"num_tokens": batch_num_tokens} if self.token_level_loss else {"num_seqs": global_batch_size}),
        )
        return _dp_scaled(out.loss, normaliser, dp_size)
