"""The ppo_ext ops as PyTorch sees them: fake (meta) kernels, for tracing and torch.compile.

The kernels themselves are registered from C++ (csrc/ops.cpp declares the schemas, csrc/cpu and
csrc/cuda implement them, csrc/autograd.cpp the autograd formula); importing ppo_ext._C runs those
registrations.
"""

import types

import torch

from ppo_ext import _C  # noqa: F401  (registers the ops)
from ppo_ext.names import COUNT_NAMES, METRIC_NAMES  # (also importable from here, as before)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(op_name, device_of):
    """Registers fn(a) as the fake kernel of ppo_ext::<op_name>. `a` holds the op's arguments by name, with
    the schema's defaults filled in (a call may leave them out), and every tensor argument has been checked
    to be on the device of argument `device_of`, as the real kernels check: a call that reaches the fake
    kernel instead (e.g. one argument on the meta device) would otherwise return uninitialised values."""
    schema = getattr(torch.ops.ppo_ext, op_name).default._schema

    def register(fn):
        def fake(*args, **kwargs):
            a = types.SimpleNamespace(**{
                arg.name: args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
                for i, arg in enumerate(schema.arguments)
            })
            reference = getattr(a, device_of)
            for arg in schema.arguments:
                t = getattr(a, arg.name)
                if isinstance(t, torch.Tensor) and t.device != reference.device:
                    raise ValueError(f"{arg.name} must be on the device of {device_of} ({reference.device}), "
                                     f"got {t.device}")
            return fn(a)

        torch.library.register_fake(f"ppo_ext::{op_name}")(fake)
        return fn

    return register


@_fake("policy_loss", device_of="log_probs")
def _policy_loss_fake(a):
    lp = a.log_probs
    torch._check(lp.dim() == 2, lambda: f"log_probs must have shape (B, T), got {tuple(lp.shape)}")
    acc = _acc_dtype(lp.dtype)
    return (
        lp.new_empty((), dtype=acc),
        lp.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
        lp.new_empty((len(COUNT_NAMES),), dtype=torch.int64),
        lp.new_empty(lp.shape if a.compute_grad else (0,), dtype=acc),
        lp.new_empty((), dtype=acc),
    )


@_fake("policy_loss_backward", device_of="token_grad")
def _policy_loss_backward_fake(a):
    return a.token_grad.new_empty(a.token_grad.shape, dtype=a.dtype)


@_fake("policy_loss_backward_inplace", device_of="token_grad")
def _policy_loss_backward_inplace_fake(a):
    return None


def _check_logits(logits, labels):
    torch._check(logits.dim() in (2, 3),
                 lambda: f"logits must have shape (B, T, V) or (N, V), got {tuple(logits.shape)}")
    torch._check(tuple(labels.shape) == tuple(logits.shape[:-1]),
                 lambda: f"labels must have the shape of logits without its last dimension, got {tuple(labels.shape)}")


def _log_probs_outputs(like, shape, compute_entropy):
    """(log_probs, logsumexp, entropy) of the labels' shape, in like's accumulation type (entropy (0,) unless asked)."""
    acc = _acc_dtype(like.dtype)
    return tuple(like.new_empty(s, dtype=acc) for s in (shape, shape, shape if compute_entropy else (0,)))


@_fake("token_log_probs", device_of="logits")
def _token_log_probs_fake(a):
    _check_logits(a.logits, a.labels)
    return _log_probs_outputs(a.logits, a.logits.shape[:-1], a.compute_entropy)


@_fake("token_log_probs_backward", device_of="logits")
def _token_log_probs_backward_fake(a):
    _check_logits(a.logits, a.labels)
    return a.logits.new_empty(a.logits.shape)


@_fake("token_log_probs_backward_inplace", device_of="logits")
def _token_log_probs_backward_inplace_fake(a):
    _check_logits(a.logits, a.labels)
    return None


def _check_hidden(hidden, weight, labels):
    torch._check(hidden.dim() in (2, 3),
                 lambda: f"hidden must have shape (B, T, H) or (N, H), got {tuple(hidden.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[-1],
                 lambda: f"weight must have shape (V, H) with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    torch._check(tuple(labels.shape) == tuple(hidden.shape[:-1]),
                 lambda: f"labels must have the shape of hidden without its last dimension, got {tuple(labels.shape)}")


@_fake("hidden_log_probs", device_of="hidden")
def _hidden_log_probs_fake(a):
    _check_hidden(a.hidden, a.weight, a.labels)
    return _log_probs_outputs(a.hidden, a.labels.shape, a.compute_entropy)


@_fake("hidden_log_probs_backward", device_of="hidden")
def _hidden_log_probs_backward_fake(a):
    _check_hidden(a.hidden, a.weight, a.labels)
    want_hidden, want_weight, want_bias = a.output_mask
    want_bias = want_bias and a.bias is not None
    return (
        a.hidden.new_empty(a.hidden.shape if want_hidden else (0,)),
        a.weight.new_empty(a.weight.shape if want_weight else (0,)),
        a.weight.new_empty(a.weight.shape[:1] if want_bias else (0,)),
    )


def built_with_cuda() -> bool:
    """Whether this build of ppo_ext has its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("ppo_ext::policy_loss", "CUDA")
