"""The ppo_ext ops as PyTorch sees them: fake (meta) kernels, for tracing and torch.compile.

The kernels themselves are registered from C++ (csrc/ops.cpp declares the schemas, csrc/cpu and
csrc/cuda implement them, csrc/autograd.cpp the autograd formula); importing ppo_ext._C runs those
registrations.
"""

import torch

from ppo_ext import _C  # noqa: F401  (registers the ops)

METRIC_NAMES = (
    "clipfrac",
    "clipfrac_low",
    "clipfrac_high",
    "clipfrac_active",
    "dual_clipfrac",
    "approx_kl",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
)
COUNT_NAMES = ("valid_tokens", "valid_seqs", "clipped_low", "clipped_high", "clipped_active", "dual_clipped")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(reference_name, reference, **tensors):
    """The device check of the real kernels, for calls that reach the fake kernel instead (e.g. one
    argument on the meta device): without it they would return uninitialised values."""
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on the device of {reference_name} ({reference.device}), got {t.device}")


@torch.library.register_fake("ppo_ext::policy_loss")
def _policy_loss_fake(log_probs, old_log_probs, advantages, mask, token_weights, num_tokens, num_seqs,
                      loss_scale_factor, num_tokens_value, num_seqs_value, loss_scale_factor_value, clip_low,
                      clip_high, dual_clip, log_ratio_clamp, importance_sampling, loss_agg_mode, compute_grad):
    _check_devices("log_probs", log_probs, old_log_probs=old_log_probs, advantages=advantages, mask=mask,
                   token_weights=token_weights, num_tokens=num_tokens, num_seqs=num_seqs,
                   loss_scale_factor=loss_scale_factor)
    torch._check(log_probs.dim() == 2, lambda: f"log_probs must have shape (B, T), got {tuple(log_probs.shape)}")
    acc = _acc_dtype(log_probs.dtype)
    return (
        log_probs.new_empty((), dtype=acc),
        log_probs.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
        log_probs.new_empty((len(COUNT_NAMES),), dtype=torch.int64),
        log_probs.new_empty(log_probs.shape if compute_grad else (0,), dtype=acc),
        log_probs.new_empty((), dtype=acc),
    )


@torch.library.register_fake("ppo_ext::policy_loss_backward")
def _policy_loss_backward_fake(grad_loss, token_grad, grad_scale, dtype):
    _check_devices("token_grad", token_grad, grad_loss=grad_loss, grad_scale=grad_scale)
    return token_grad.new_empty(token_grad.shape, dtype=dtype)


def _check_logits(logits, labels):
    _check_devices("logits", logits, labels=labels)
    torch._check(logits.dim() in (2, 3),
                 lambda: f"logits must have shape (B, T, V) or (N, V), got {tuple(logits.shape)}")
    torch._check(tuple(labels.shape) == tuple(logits.shape[:-1]),
                 lambda: f"labels must have the shape of logits without its last dimension, got {tuple(labels.shape)}")


@torch.library.register_fake("ppo_ext::token_log_probs")
def _token_log_probs_fake(logits, labels, temperature, compute_entropy, inplace_backward):
    _check_logits(logits, labels)
    acc = _acc_dtype(logits.dtype)
    shape = logits.shape[:-1]
    return (
        logits.new_empty(shape, dtype=acc),
        logits.new_empty(shape, dtype=acc),
        logits.new_empty(shape if compute_entropy else (0,), dtype=acc),
    )


@torch.library.register_fake("ppo_ext::token_log_probs_backward")
def _token_log_probs_backward_fake(grad_log_probs, logits, labels, logsumexp, temperature):
    _check_logits(logits, labels)
    _check_devices("logits", logits, grad_log_probs=grad_log_probs, logsumexp=logsumexp)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("ppo_ext::token_log_probs_backward_inplace")
def _token_log_probs_backward_inplace_fake(grad_log_probs, logits, labels, logsumexp, temperature):
    _check_logits(logits, labels)
    _check_devices("logits", logits, grad_log_probs=grad_log_probs, logsumexp=logsumexp)
    return None


def built_with_cuda() -> bool:
    """Whether this build of ppo_ext has its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("ppo_ext::policy_loss", "CUDA")
