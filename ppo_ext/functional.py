"""The public API: ppo_ext.policy_loss and the PolicyLoss module (see ../shared/SPEC.md)."""

import numbers
from typing import Dict, NamedTuple, Optional, Union

import torch

from ppo_ext._ops import COUNT_NAMES, METRIC_NAMES

Normaliser = Union[None, int, float, torch.Tensor]


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. log_probs
    metrics: Dict[str, torch.Tensor]  # 0-dim float32 tensors, keys METRIC_NAMES
    counts: torch.Tensor  # int64 (6,), names COUNT_NAMES


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
    importance_sampling: str = "token",
    loss_agg_mode: str = "token-mean",
    log_ratio_clamp: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> PolicyLossOutput:
    """The clipped PPO policy loss, its metrics and its clip counters, in one fused kernel.

    log_probs (B, T) float32/bfloat16/float16/float64, the current policy's log-probs of the taken
    tokens; old_log_probs (B, T) or None (on-policy: ratio 1); advantages (B, T), (B, 1) or (B,);
    mask (B, T), non-zero = the token counts. See SPEC.md for every option. No host synchronisation.
    """
    _check_tensor("log_probs", log_probs, optional=False)
    _check_tensor("old_log_probs", old_log_probs, optional=True)
    _check_tensor("advantages", advantages, optional=False)
    _check_tensor("mask", mask, optional=True)
    _check_tensor("token_weights", token_weights, optional=True)
    clip_low = _float_option("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _float_option("clip_high", clip_high)
    num_tokens_tensor, num_tokens_value = _split_normaliser("num_tokens", num_tokens)
    num_seqs_tensor, num_seqs_value = _split_normaliser("num_seqs", num_seqs)
    scale_tensor, scale_value = _split_normaliser("loss_scale_factor", loss_scale_factor)
    compute_grad = torch.is_grad_enabled() and log_probs.requires_grad
    loss, metrics, counts, _, _ = torch.ops.ppo_ext.policy_loss(
        log_probs, old_log_probs, advantages, mask, token_weights,
        num_tokens_tensor, num_seqs_tensor, scale_tensor, num_tokens_value, num_seqs_value, scale_value,
        clip_low, clip_high, _float_option("dual_clip", dual_clip, optional=True),
        _float_option("log_ratio_clamp", log_ratio_clamp, optional=True),
        _str_option("importance_sampling", importance_sampling), _str_option("loss_agg_mode", loss_agg_mode),
        compute_grad,
    )
    return PolicyLossOutput(loss, dict(zip(METRIC_NAMES, metrics.unbind())), counts)


class PolicyLoss(torch.nn.Module):
    """ppo_ext.policy_loss as a module: the options are fixed at construction, the tensors (and the
    per-step normalisers) are given to forward."""

    def __init__(self, **options):
        super().__init__()
        per_call = {"token_weights", "num_tokens", "num_seqs", "loss_scale_factor"} & options.keys()
        if per_call:
            raise TypeError(f"{sorted(per_call)} change with every batch: pass them to forward, not to PolicyLoss()")
        policy_loss(torch.zeros(0, 0), None, torch.zeros(0), **options)  # validates the options now
        self.options = options

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: Optional[torch.Tensor],
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        token_weights: Optional[torch.Tensor] = None,
        *,
        num_tokens: Normaliser = None,
        num_seqs: Normaliser = None,
        loss_scale_factor: Normaliser = None,
    ) -> PolicyLossOutput:
        return policy_loss(
            log_probs, old_log_probs, advantages, mask, token_weights=token_weights, num_tokens=num_tokens,
            num_seqs=num_seqs, loss_scale_factor=loss_scale_factor, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
