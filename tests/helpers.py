"""Shared helpers of the test suite: the names of the modes, the random inputs, running ppo_ext and the float64
reference, tolerances, and running a script under a forced CPU instruction set."""

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import ppo_ext
from ppo_ext.names import (COUNT_INDEX, COUNT_NAMES, IMPORTANCE_SAMPLING_LEVELS, LOSS_AGG_MODES, LOSS_TYPES,
                           METRIC_NAMES)
from ppo_ext.reference import policy_loss_reference

# Every mode, from ppo_ext.names (short names for the parametrisations).
IS_MODES = IMPORTANCE_SAMPLING_LEVELS
AGG_MODES = LOSS_AGG_MODES
MASK_KINDS = ("bool", "uint8", "int64", "float32", None)
ADV_SHAPES = ("BT", "B1", "B")
MASK_DTYPES = {"bool": torch.bool, "uint8": torch.uint8, "int64": torch.int64, "float32": torch.float32}

# Each loss family with the options it is tested at: its own parameters at values that are not the
# defaults (a swapped tau shows), dppo's divergence thresholds where the random inputs keep some tokens and
# drop others, and its truncation in force for some tokens.
FAMILY_OPTIONS = {
    "vanilla": {},
    "cispo": {},
    "sapo": dict(tau_pos=0.7, tau_neg=1.6),
    "gpg": {},
    "dro": dict(dro_beta=0.3),
    "dppo_tv": dict(clip_low=0.12, clip_high=0.08, ratio_cap=1.6),
    "dppo_kl": dict(clip_low=0.04, clip_high=0.02, ratio_cap=1.6),
    "geo_mean": dict(clip_low=0.3, clip_high=0.25),  # log-ratio bounds
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
    "value": dict(clip_low=0.15, clip_high=0.2),  # the value clip range around the old values
}
assert tuple(FAMILY_OPTIONS) == LOSS_TYPES
# The families defined at every importance-sampling level (the others at "token" only).
RATIO_FAMILIES = ("vanilla", "cispo", "sapo")


def family_is_modes(loss_type):
    """The importance-sampling levels `loss_type` is defined at."""
    if loss_type == "geo_mean":  # a sequence-level loss
        return ("seq", "seq-token")
    return IS_MODES if loss_type in RATIO_FAMILIES else ("token",)


def family_options(loss_type, importance_sampling=None, loss_agg_mode="token-mean", clamp=False, **extra):
    """options() for the family: its FAMILY_OPTIONS (dual clip off: vanilla's alone), at its first level unless
    importance_sampling is given."""
    importance_sampling = importance_sampling or family_is_modes(loss_type)[0]
    clamp = clamp and loss_type not in ("value", "vespo")  # no ratio to clamp (value), its own clamp (vespo): refused
    return options(importance_sampling, loss_agg_mode, clamp=clamp, loss_type=loss_type,
                   **{**FAMILY_OPTIONS[loss_type], **extra})


# The options the random inputs are made for (ties with their boundaries are kept away).
CLIP_LOW, CLIP_HIGH, DUAL_CLIP, LOG_RATIO_CLAMP = 0.2, 0.28, 1.5, 0.45

# SPEC: with no valid token the fractions and approx_kl are 0, the ratio statistics 1.
NO_TOKEN_METRICS = {**dict.fromkeys(METRIC_NAMES, 0.0), "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0,
                    "rollout_weight_mean": 1.0, "rollout_weight_min": 1.0, "rollout_weight_max": 1.0}


def counts_by_name(counts: torch.Tensor) -> dict:
    """``counts`` (ppo_ext's int64 counts) as {name in COUNT_NAMES: int}."""
    assert counts.shape == (len(COUNT_NAMES),), counts.shape
    return dict(zip(COUNT_NAMES, counts.tolist()))


def count(counts: torch.Tensor, name: str) -> torch.Tensor:
    """The count ``name`` of ppo_ext's counts, a 0-dim int64 tensor (on the counts' device)."""
    return counts[COUNT_INDEX[name]]


@dataclass
class Inputs:
    lp: torch.Tensor
    old: Optional[torch.Tensor]
    adv: torch.Tensor
    mask: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]

    def to(self, device):
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Inputs(f(self.lp), f(self.old), f(self.adv), f(self.mask), f(self.weights))

    def f64(self):
        """float64 copies of the (already rounded) values: what the reference is run on."""
        f = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
        return Inputs(f(self.lp), f(self.old), f(self.adv), self.mask, f(self.weights))


def _near_boundary(x, boundaries, margin):
    near = torch.zeros_like(x, dtype=torch.bool)
    for b in boundaries:
        near |= (x - b).abs() < margin
    return near


def make_inputs(B, T, *, seed, device="cpu", dtype=torch.float32, old_dtype=None, adv_shape="BT",
                mask_kind="bool", weights=True, density=0.8, empty_row=True,
                clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL_CLIP, log_ratio_clamp=LOG_RATIO_CLAMP,
                margin=1e-4, lp_scale=5.0, row_offset=0.6, row_jitter=0.05, token_noise=0.3,
                weight_range=(0.0, 2.0)) -> Inputs:
    """Fresh random inputs with realistic scales: the one input generator of the suite.

    log-probs ~ -U(0, lp_scale); old = lp + a per-row offset (spread over [-row_offset, row_offset], plus
    N(0, row_jitter), so that whole rows clip at the sequence level too) + N(0, token_noise) per token;
    advantages N(0, 1), of shape (B, T), (B, 1) or (B,) (adv_shape); mask of density ~density
    (mask_kind: its dtype, or None for no mask), row 1 fully masked when empty_row (and B >= 3);
    weights U(weight_range) (None unless weights). log_probs in `dtype`, the others in `old_dtype`
    (default: `dtype`). Tokens (and rows, for the sequence ratio) whose log ratio lies within `margin` of
    a clip, dual-clip or clamp boundary of the given options are moved away, so that float32 and float64
    agree on every comparison and counts can be compared exactly; margin=None leaves them where they are.
    """
    g = torch.Generator().manual_seed(seed)
    old_dtype = old_dtype or dtype
    lp = (-lp_scale * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype)
    offsets = (torch.linspace(-row_offset, row_offset, B, dtype=torch.float64)[torch.randperm(B, generator=g)]
               if B else torch.zeros(0))
    offsets = offsets + row_jitter * torch.randn(B, generator=g, dtype=torch.float64)
    noise = token_noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    old = (lp.double() - offsets[:, None] + noise).to(old_dtype)  # d = lp - old = offset - noise
    adv_full = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv_row = torch.randn(B, generator=g, dtype=torch.float64)
    adv = {"BT": adv_full, "B1": adv_row[:, None], "B": adv_row}[adv_shape].to(old_dtype)
    valid = torch.rand(B, T, generator=g) < density
    if mask_kind is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    elif empty_row and B >= 3:
        valid[1] = False
    w_low, w_high = weight_range
    w = ((w_high - w_low) * torch.rand(B, T, generator=g, dtype=torch.float64) + w_low).to(old_dtype) \
        if weights else None

    bounds = [math.log(1 - clip_low), math.log(1 + clip_high)]
    if dual_clip is not None:
        bounds.append(math.log(dual_clip))
    if log_ratio_clamp is not None:
        bounds += [log_ratio_clamp, -log_ratio_clamp]
    if margin is not None:
        for _ in range(100):
            d = lp.double() - old.double()
            bad_tok = _near_boundary(d, bounds, margin)
            dbar = torch.where(valid, d, 0).sum(1) / valid.sum(1).clamp(min=1)
            bad_row = _near_boundary(dbar, bounds, margin)
            if not bad_tok.any() and not bad_row.any():
                break
            shift = 10 * margin * (bad_tok | bad_row[:, None])
            old = (old.double() + shift).to(old_dtype)
        else:
            raise AssertionError("could not move the inputs away from the boundaries")

    mask = None if mask_kind is None else valid.to(MASK_DTYPES[mask_kind])
    return Inputs(lp, old, adv, mask, w).to(device)


def options(importance_sampling="token", loss_agg_mode="token-mean", dual=False, clamp=False, **extra):
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, importance_sampling=importance_sampling,
              loss_agg_mode=loss_agg_mode, dual_clip=DUAL_CLIP if dual else None,
              log_ratio_clamp=LOG_RATIO_CLAMP if clamp else None)
    kw.update(extra)
    return kw


def op_args(lp, old, adv, mask=None, weights=None, *, compute_grad=True, **options):
    """Every argument of the raw op ppo_ext::policy_loss, positionally in its schema's order, from
    ppo_ext.policy_loss's keywords (a normaliser a tensor or a number); the rest at the schema's defaults."""
    given = dict(log_probs=lp, old_log_probs=old, advantages=adv, mask=mask, token_weights=weights,
                 compute_grad=compute_grad)
    for name in ("num_tokens", "num_seqs", "loss_scale_factor"):
        value = options.pop(name, None)
        given[name if isinstance(value, torch.Tensor) else f"{name}_value"] = (
            value if value is None or isinstance(value, torch.Tensor) else float(value))
    given.update(options)
    schema = torch.ops.ppo_ext.policy_loss.default._schema
    unknown = given.keys() - {a.name for a in schema.arguments}
    assert not unknown, f"not arguments of ppo_ext::policy_loss: {sorted(unknown)}"
    return tuple(given.get(a.name, a.default_value) for a in schema.arguments)


def run_ext(inp: Inputs, grad=True, **kw):
    """ppo_ext.policy_loss on the inputs, with the gradient w.r.t. log_probs (None if grad=False)."""
    lp = inp.lp.detach().clone().requires_grad_(grad)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **kw)
    if grad:
        out.loss.backward()
    return out, lp.grad


def run_ref(inp: Inputs, *, dtype=torch.float64, device=None, **kw):
    """The reference on `dtype` copies of the (rounded) inputs, on `device` (default: the inputs'), with its
    autograd gradient. float64 is the exact reference; the kernels' own precision (float32, or float64 for
    float64 log_probs) on the CPU gives eager PyTorch's inf/NaN pattern."""
    cast = lambda t: None if t is None else t.detach().to(device=device or t.device, dtype=dtype)  # noqa: E731
    lp = cast(inp.lp).clone().requires_grad_(True)
    mask = None if inp.mask is None else inp.mask.to(device or inp.mask.device)
    out = policy_loss_reference(lp, cast(inp.old), cast(inp.adv), mask, token_weights=cast(inp.weights), **kw)
    out.loss.backward()
    return out, lp.grad


# Tolerances by the dtype of log_probs: the kernels compute in float32 (float64 for float64) from the
# rounded inputs; the reference computes in float64 from the same rounded values.
LOSS_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6),
            torch.float64: (1e-10, 1e-12)}
# The gradient is rounded to log_probs' dtype at the end.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float64: 1e-10}
# float16 gradients of long rows fall below its normal range (6.1e-5), where the spacing is 2^-24.
GRAD_ATOL = {torch.float16: 2 ** -24}
METRIC_TOL = (1e-5, 1e-6)


def assert_close_to_reference(ext, ext_grad, ref, ref_grad, dtype, what="", loss_agg_mode="token-mean"):
    lp_dtype = dtype
    acc = torch.float64 if lp_dtype == torch.float64 else torch.float32
    assert ext.loss.dtype == acc, f"{what}: loss dtype {ext.loss.dtype}, expected {acc}"
    assert ext.loss.shape == ()
    rtol, atol = LOSS_TOL[lp_dtype]
    if loss_agg_mode in ("token-sum", "seq-mean-token-sum"):
        # A sum of O(1) terms that may cancel: float32 rounding grows with the number of terms, not with
        # the (possibly small) result.
        atol *= max(1, int(count(ref.counts, "valid_tokens")))
    torch.testing.assert_close(ext.loss.double().cpu(), ref.loss.detach().double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: loss\n{m}")
    assert set(ext.metrics) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        v = ext.metrics[k]
        assert v.dtype == torch.float32 and v.shape == () and not v.requires_grad, f"{what}: metric {k}: {v!r}"
        torch.testing.assert_close(v.cpu(), ref.metrics[k].cpu(), rtol=METRIC_TOL[0], atol=METRIC_TOL[1],
                                   equal_nan=True, msg=lambda m: f"{what}: metric {k}\n{m}")
    assert ext.counts.dtype == torch.int64 and ext.counts.shape == (len(COUNT_NAMES),)
    assert torch.equal(ext.counts.cpu(), ref.counts.cpu()), \
        f"{what}: counts {ext.counts.tolist()} != reference {ref.counts.tolist()} ({COUNT_NAMES})"
    if ext_grad is not None:
        assert ext_grad.dtype == lp_dtype, f"{what}: gradient dtype {ext_grad.dtype}, expected {lp_dtype}"
        assert ext_grad.shape == ref_grad.shape
        scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
        torch.testing.assert_close(ext_grad.double().cpu(), ref_grad.cpu(), rtol=GRAD_RTOL[lp_dtype],
                                   atol=1e-6 * scale + GRAD_ATOL.get(lp_dtype, 1e-12), equal_nan=True,
                                   msg=lambda m: f"{what}: gradient\n{m}")


def check_against_reference(inp: Inputs, what="", **kw):
    ext, ext_grad = run_ext(inp, **kw)
    ref, ref_grad = run_ref(inp, **kw)
    assert_close_to_reference(ext, ext_grad, ref, ref_grad, inp.lp.dtype, what or str(kw),
                              kw.get("loss_agg_mode", "token-mean"))
    return ext, ext_grad, ref, ref_grad


def bitwise_equal_outputs(a, b):
    """Asserts loss, metrics and counts bitwise equal (NaN equal to NaN)."""
    assert torch.equal(a.counts, b.counts), (a.counts, b.counts)
    assert _same_bits(a.loss, b.loss), (a.loss, b.loss)
    for k in METRIC_NAMES:
        assert _same_bits(a.metrics[k], b.metrics[k]), (k, a.metrics[k], b.metrics[k])


def _same_bits(x, y):
    if x is None or y is None:
        return x is None and y is None
    def as_bytes(t):  # a fresh stride-1 copy: a size-1 tensor may be "contiguous" with any stride
        return t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)

    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(as_bytes(x), as_bytes(y))


same_bits = _same_bits


# ----------------------------------------------------------------------------------------------------------
# A script under a forced CPU instruction set


HERE = os.path.dirname(os.path.abspath(__file__))
CPU_CAPABILITIES = ("default", "avx2", "native")


def run_with_cpu_capability(capability, script, timeout=300):
    """Runs `script` (Python source that prints "ok" when its checks pass) in a fresh interpreter whose CPU
    kernels are those of `capability`: "default" (scalar) and "avx2" set PPO_EXT_CPU_CAPABILITY, "native"
    unsets it (the widest instruction set the machine has), whatever the environment of the test run says.
    tests/ is on its PYTHONPATH. Asserts that it exits with 0 and prints exactly "ok"."""
    assert capability in CPU_CAPABILITIES, f"unknown capability {capability!r} (one of {CPU_CAPABILITIES})"
    env = dict(os.environ)
    env.pop("PPO_EXT_CPU_CAPABILITY", None)
    if capability != "native":
        env["PPO_EXT_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", \
        (f"capability {capability}: exit status {proc.returncode}\nstdout: {proc.stdout[-1000:]}\n"
         f"stderr: {proc.stderr[-3000:]}")
