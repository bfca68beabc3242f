"""Numerical extremes, masked garbage and huge inputs.

What is promised (docs/SPEC.md) and what these tests hold the kernels to:
- Log ratios of +-50 and +-1000, with and without `log_ratio_clamp`: with a clamp, loss, gradient and
  metrics are finite numbers. Without one, the kernels give exactly the inf/NaN pattern that the eager
  implementation of docs/SPEC.md (ppo_ext.reference, run in the kernels' own precision: float32, or float64 for
  float64 log_probs) gives, and the same finite values elsewhere. Documented non-finite cases, all as
  in eager PyTorch:
    * r = exp(d) overflows (d > 88.7 in float32, > 709.8 in float64): ratio metrics are inf; the loss
      is +inf where A < 0 and the unclipped branch is in force (no dual clip), finite where the clip or
      the dual clip is in force; the gradient of such a token is NaN where a clip is in force (0 * inf,
      as autograd's exp backward gives) and inf otherwise.
    * A = 0 with r = inf: L1 = -0 * inf = NaN, so the loss is NaN.
    * a float16 gradient beyond 65504 is inf (the gradient has log_probs' dtype).
- Advantages of 1e30 and of 0, subnormal inputs, bfloat16/float16 values at the edge of their range:
  the same eager agreement, token by token; no flush of subnormals to zero (eager float32 keeps them).
  (Where eager's float32 *sum* of finite terms overflows, the kernels' float64 partial sums may stay
  finite: more accurate, and allowed.)
- Sequence lengths of 1 and of 1M tokens.
- NaN/inf at a valid position propagate into the loss (docs/SPEC.md: "it is not hidden"), as in eager.
- Masked garbage: NaN, +-inf and the largest finite value at masked positions of every input change
  nothing, bitwise: loss, metrics, counts and gradient (docs/SPEC.md: "Positions with m = 0 never influence
  anything ... even if lp, old, A or w hold NaN or inf there").
- A slow test (pytest --slow) with more than 2^31 elements proves 64-bit indexing.
"""

import itertools
import math

import pytest
import torch

import ppo_ext
from helpers import (AGG_MODES, COUNT_NAMES, GRAD_RTOL, IS_MODES, METRIC_NAMES, NO_TOKEN_METRICS, Inputs,
                     check_against_reference, count, counts_by_name, make_inputs, options, run_ext, run_ref, same_bits)

LP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run_eager(inp, **opts):
    """The reference in the kernels' precision (float32, float64 for float64 log_probs), on the CPU."""
    return run_ref(inp, dtype=_acc(inp.lp.dtype), device="cpu", **opts)


def _same_pattern(a, b, what):
    a, b = a.double().cpu(), b.double().cpu()
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(f(a), f(b)), f"{what}: {name} where eager has none, or the other way round:\n{a}\n{b}"


def _close(a, b, rtol, what):
    """NaN/inf patterns equal; finite values within rtol and 1e-6 of the largest finite magnitude."""
    _same_pattern(a, b, what)
    a, b = a.double().cpu(), b.double().cpu()
    fin = torch.isfinite(b)
    if fin.any():
        scale = float(b[fin].abs().max())
        torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=1e-6 * scale + 1e-30, msg=lambda m: f"{what}\n{m}")


def assert_matches_eager(ext, ext_grad, ref, ref_grad, lp_dtype, what=""):
    rtol = 1e-10 if lp_dtype == torch.float64 else 1e-5
    _close(ext.loss.detach(), ref.loss.detach(), rtol, f"{what} loss")
    for k in ppo_ext.METRIC_NAMES:
        _close(ext.metrics[k], ref.metrics[k], max(rtol, 1e-6), f"{what} metric {k}")
    assert ext.counts.cpu().tolist() == ref.counts.tolist(), f"{what} counts {ext.counts.tolist()} != {ref.counts.tolist()}"
    assert ext_grad.dtype == lp_dtype
    _close(ext_grad, ref_grad.to(lp_dtype), max(GRAD_RTOL[lp_dtype], 1e-5) if lp_dtype != torch.float64 else 1e-10,
           f"{what} gradient")


# ----------------------------------------------------------------------------------------------------------
# Log ratios of +-50 and +-1000


def _extreme_ratio_inputs(D, dtype, device, B=4, T=9):
    """Normal tokens with a few tokens (and, in row 0, a whole row) at log ratio D; advantages of both signs.

    log-probs -U(0, 3), log ratios N(0, 0.3) (no per-row offset, not moved off any boundary), mask of
    density 0.85 with every row's first token valid, weights U(0.5, 1.5)."""
    x = make_inputs(B, T, seed=7, dtype=torch.float64, lp_scale=3.0, row_offset=0.0, row_jitter=0.0, density=0.85,
                    empty_row=False, weight_range=(0.5, 1.5), margin=None)
    d = x.lp - x.old
    d[0, :] = D  # a whole row: the sequence ratio is extreme too
    d[1, ::3] = D
    d[2, 4] = -D
    old = x.lp - d
    adv = x.adv.clone()
    adv[0, ::2] = -adv[0, ::2].abs()
    adv[0, 1::2] = adv[0, 1::2].abs()
    mask = x.mask.clone()
    mask[:, 0] = True
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return Inputs(to(x.lp), to(old), to(adv), mask.to(device), to(x.weights))


@pytest.mark.parametrize("D", [50.0, -50.0, 1000.0, -1000.0])
@pytest.mark.parametrize("dtype", LP_DTYPES, ids=str)
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_extreme_log_ratios_match_eager(device, D, dtype, importance_sampling):
    inp = _extreme_ratio_inputs(D, dtype, device)
    for dual_clip, clamp, agg in [(None, None, "token-mean"), (3.0, None, "seq-mean-token-mean"),
                                  (None, 20.0, "token-sum"), (3.0, 20.0, "seq-mean-token-sum-norm")]:
        opts = dict(importance_sampling=importance_sampling, loss_agg_mode=agg, dual_clip=dual_clip,
                    log_ratio_clamp=clamp, clip_low=0.2, clip_high=0.28)
        ext, ext_grad = run_ext(inp, **opts)
        ref, ref_grad = _run_eager(inp, **opts)
        assert_matches_eager(ext, ext_grad, ref, ref_grad, dtype, f"D={D} {opts}")


@pytest.mark.parametrize("D", [50.0, -50.0, 1000.0, -1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_extreme_log_ratios_with_clamp_are_finite(device, D, dtype, importance_sampling):
    """With log_ratio_clamp, docs/SPEC.md promises numbers: no NaN, no inf anywhere (float16 is left out only
    because its *gradient* can legitimately overflow 65504)."""
    inp = _extreme_ratio_inputs(D, dtype, device)
    for dual_clip in (None, 3.0):
        for agg in AGG_MODES:
            ext, grad = run_ext(inp, importance_sampling=importance_sampling, loss_agg_mode=agg,
                                dual_clip=dual_clip, log_ratio_clamp=20.0)
            assert torch.isfinite(ext.loss), (agg, dual_clip, ext.loss)
            assert torch.isfinite(grad).all(), (agg, dual_clip, grad)
            for k, v in ext.metrics.items():
                assert torch.isfinite(v), (agg, dual_clip, k, v)
            ratio_max = ext.metrics["ratio_max"].item()
            assert ratio_max <= math.exp(20.0) * (1 + 1e-6), ratio_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_vanishing_ratio_is_finite_without_clamp(device, dtype):
    """d = -1000: r = 0 exactly; every output is a number (nothing overflows)."""
    inp = _extreme_ratio_inputs(-1000.0, dtype, device)
    inp.old = inp.lp + 1000.0  # every token
    for importance_sampling, dual_clip in itertools.product(IS_MODES, (None, 3.0)):
        ext, grad = run_ext(inp, importance_sampling=importance_sampling, dual_clip=dual_clip)
        assert torch.isfinite(ext.loss) and torch.isfinite(grad).all()
        assert ext.metrics["ratio_max"].item() == 0.0 and ext.metrics["clipfrac_low"].item() == 1.0


# ----------------------------------------------------------------------------------------------------------
# Advantages of 1e30 and 0, subnormals, edges of the bfloat16/float16 range


@pytest.mark.parametrize("dtype", LP_DTYPES, ids=str)
@pytest.mark.parametrize("adv_value", [1e30, -1e30, 0.0, -0.0, "mixed"])
def test_advantages_huge_and_zero(device, dtype, adv_value):
    inp = make_inputs(6, 37, seed=3, device=device, dtype=dtype, old_dtype=torch.float32)
    if adv_value == "mixed":
        adv = inp.adv.clone()
        adv[0] = 1e30
        adv[2] = 0.0
        adv[3, ::2] = -1e30
    else:
        adv = torch.full_like(inp.adv, adv_value)
    inp.adv = adv
    for importance_sampling, agg, dual in [("token", "token-mean", False), ("seq", "seq-mean-token-mean", True),
                                           ("seq-token", "token-sum", True)]:
        kw = options(importance_sampling, agg, dual=dual)
        ext, grad = run_ext(inp, **kw)
        ref, ref_grad = _run_eager(inp, **kw)
        assert_matches_eager(ext, grad, ref, ref_grad, dtype, f"A={adv_value} {kw}")
        assert torch.isfinite(ext.loss), ext.loss
        if adv_value in (0.0, -0.0):
            assert ext.loss.item() == 0.0 and not grad.any()
            assert count(ext.counts, "clipped_active").item() == 0  # the clip changes nothing when A = 0


@pytest.mark.parametrize("where", ["advantages", "weights", "log_probs", "all"])
def test_subnormal_inputs(device, where):
    """float32 subnormals behave as in eager float32 (no flush to zero): loss, gradient and counts."""
    inp = make_inputs(5, 41, seed=11, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny  # 1.18e-38; the values below are 1e-3..1e-1 of it
    if where in ("advantages", "all"):
        inp.adv = inp.adv * (tiny / 16)
    if where in ("weights", "all"):
        inp.weights = inp.weights * (tiny / 64)
    if where in ("log_probs", "all"):  # log ratios of ~1e-40: ratio 1
        inp.lp = inp.lp * (tiny / 8)
        inp.old = inp.old * (tiny / 8)
    assert (inp.adv.abs() < tiny).any() or where in ("weights", "log_probs")
    for importance_sampling, agg in [("token", "token-sum"), ("seq", "token-sum"), ("seq-token", "seq-mean-token-sum")]:
        kw = options(importance_sampling, agg, dual=True)
        ext, grad = run_ext(inp, **kw)
        ref, ref_grad = _run_eager(inp, **kw)
        _same_pattern(ext.loss, ref.loss, "loss")
        # subnormal arithmetic: an absolute error of a few units of 2^-149 per summed term
        spacing = 2.0 ** -149
        n = int(inp.mask.sum())
        assert abs(ext.loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item()) + 4 * n * spacing, \
            (where, kw, ext.loss.item(), ref.loss.item())
        assert (ext.loss.item() == 0.0) == (ref.loss.item() == 0.0), f"flushed to zero: {ext.loss.item()} vs {ref.loss.item()}"
        assert torch.equal(ext.counts.cpu(), ref.counts), (where, kw, ext.counts.tolist(), ref.counts.tolist())
        err = (grad.double().cpu() - ref_grad.double()).abs()
        assert (err <= 1e-4 * ref_grad.double().abs() + 4 * spacing).all(), (where, kw, err.max())
        assert torch.equal(grad.cpu() == 0, ref_grad == 0), "a subnormal gradient was flushed to zero"


def _edge_inputs(dtype, device):
    """Values at the edges of a 16-bit format: the largest finite, the smallest normal and subnormal."""
    fi = torch.finfo(dtype)
    big, small, sub = fi.max, fi.tiny, fi.tiny * fi.eps
    lp = torch.tensor([[-big, -big, 0.0, -1.0, -sub, -small, -1.0, -2.0],
                       [-1.0, -big, -sub, -0.5, -big, -1.0, -3.0, -small]], dtype=torch.float64)
    old = torch.tensor([[-big, 0.0, -big, -1.0, -sub, -small, -1.0 - sub, -2.0],
                        [-1.0, -1.0, 0.0, -0.5, -big / 2, -1.0, -3.0, -small]], dtype=torch.float64)
    adv = torch.tensor([[big, -big, 1.0, small, sub, -sub, big, -1.0],
                        [-1.0, 1.0, -big, 0.5, 2.0, big, small, -small]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 1.0, big, sub, small, 1.0, 1.0],
                      [big, 1.0, 1.0, 1.0, 1.0, 1.0, sub, 1.0]], dtype=torch.float64)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return to(lp), to(old), to(adv), to(w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_half_precision_range_edges_match_eager(device, dtype, importance_sampling):
    lp, old, adv, w = _edge_inputs(dtype, device)
    for dual_clip, clamp in [(None, None), (3.0, None), (None, 20.0), (3.0, 0.5)]:
        opts = dict(importance_sampling=importance_sampling, dual_clip=dual_clip, log_ratio_clamp=clamp)
        # One valid token at a time (the token's own value, ratio and gradient), plus its row in the
        # sequence modes. Not the whole batch at once: eager float32 sums two terms of -3e38 to -inf
        # (and -inf + inf to NaN) where the kernels' float64 partial sums stay finite and closer to the
        # exact value, which docs/SPEC.md allows.
        for i, j in itertools.product(range(2), range(8)):
            mask = torch.zeros(2, 8, dtype=torch.bool, device=device)
            mask[i, j] = True
            ext, grad = run_ext(Inputs(lp, old, adv, mask, w), **opts)
            ref, ref_grad = _run_eager(Inputs(lp, old, adv, mask, w), **opts)
            assert_matches_eager(ext, grad, ref, ref_grad, dtype, f"{opts} token ({i}, {j})")


# ----------------------------------------------------------------------------------------------------------
# Sequence lengths of 1 and 1M


@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_sequence_length_one(device, importance_sampling):
    for agg in AGG_MODES:
        inp = make_inputs(257, 1, seed=5, device=device)
        check_against_reference(inp, **options(importance_sampling, agg, dual=True, clamp=True))


@pytest.mark.parametrize("importance_sampling,dtype,agg", [("token", torch.float32, "token-mean"),
                                                           ("seq", torch.bfloat16, "seq-mean-token-mean"),
                                                           ("seq-token", torch.float32, "seq-mean-token-sum-norm")])
def test_sequence_of_one_million_tokens(device, importance_sampling, dtype, agg):
    inp = make_inputs(1, 1 << 20, seed=9, device=device, dtype=dtype, old_dtype=torch.float32, empty_row=False)
    check_against_reference(inp, **options(importance_sampling, agg, dual=True))


# ----------------------------------------------------------------------------------------------------------
# Non-finite values at valid positions propagate (as in eager)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["log_probs", "old_log_probs", "advantages", "token_weights"])
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_non_finite_at_valid_position_propagates(device, value, where, importance_sampling):
    inp = make_inputs(4, 19, seed=2, device=device)
    valid = inp.mask.nonzero()
    i, t = valid[len(valid) // 2].tolist()
    attr = {"log_probs": "lp", "old_log_probs": "old", "advantages": "adv", "token_weights": "weights"}[where]
    x = getattr(inp, attr).clone()
    x[i, t] = value
    setattr(inp, attr, x)
    for dual in (False, True):
        kw = options(importance_sampling, "token-mean", dual=dual)
        ext, grad = run_ext(inp, **kw)
        # "seq-token" with lp = +-inf: docs/SPEC.md's value is that of "seq" (r = exp(dbar) = inf or 0), while the
        # eager trick lp - lp.detach() + dbar gives inf - inf = NaN; so the values are compared with "seq"'s,
        # and the gradient (inf/NaN on that row either way) is not compared.
        seq_token_inf_lp = importance_sampling == "seq-token" and where == "log_probs" and math.isinf(value)
        ref_kw = dict(kw, importance_sampling="seq") if seq_token_inf_lp else kw
        ref, ref_grad = _run_eager(inp, **ref_kw)
        if seq_token_inf_lp:
            ref_grad = grad.double().cpu()
        what = f"{where}={value} {kw}"
        # (An infinity need not reach the loss: lp = -inf is a ratio of exactly 0, as in eager.)
        if math.isnan(value):
            assert torch.isnan(ext.loss), f"{what}: a NaN at a valid position was hidden: loss {ext.loss}"
        # Finite exactly where eager is finite (NaN and inf are not told apart: for "seq-token" with lp = inf,
        # docs/SPEC.md's value exp(dbar) = inf, while eager's lp - lp.detach() + dbar gives inf - inf = NaN), and
        # the same finite values; counts equal.
        for k in ppo_ext.METRIC_NAMES:
            _close_finite(ext.metrics[k], ref.metrics[k], 1e-5, f"{what} metric {k}")
        _close_finite(ext.loss, ref.loss.detach(), 1e-5, f"{what} loss")
        _close_finite(grad, ref_grad, 1e-5, f"{what} gradient")
        assert ext.counts.tolist() == ref.counts.tolist(), what


def _close_finite(a, b, rtol, what):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), \
        f"{what}: non-finite where eager is finite, or the other way round:\n{a}\n{b}"
    fin = torch.isfinite(b)
    if fin.any():
        scale = float(b[fin].abs().max())
        torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=1e-6 * scale + 1e-30, msg=lambda m: f"{what}\n{m}")


# ----------------------------------------------------------------------------------------------------------
# Masked garbage changes nothing, bitwise


GARBAGE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": None}


def _spoil(x, valid, value):
    if x is None:
        return None
    if value is None:
        value = torch.finfo(x.dtype).max
    return torch.where(valid, x, torch.tensor(value, dtype=x.dtype, device=x.device))


@pytest.mark.parametrize("dtype", LP_DTYPES, ids=str)
@pytest.mark.parametrize("importance_sampling", IS_MODES)
@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
def test_masked_garbage_changes_nothing_bitwise(device, dtype, importance_sampling, loss_agg_mode):
    for adv_shape, dual, clamp, old in [("BT", False, False, True), ("B", True, True, True),
                                        ("BT", True, False, False)]:
        inp = make_inputs(5, 70, seed=13, device=device, dtype=dtype, old_dtype=torch.float32, adv_shape=adv_shape)
        if not old:
            inp.old = None
        valid = inp.mask != 0
        kw = options(importance_sampling, loss_agg_mode, dual=dual, clamp=clamp)
        clean, clean_grad = run_ext(inp, **kw)
        for name, value in GARBAGE.items():
            for target in ("lp", "old", "adv", "weights", "all"):
                lp, old, adv, w = inp.lp, inp.old, inp.adv, inp.weights
                if target in ("lp", "all"):
                    lp = _spoil(lp, valid, value)
                if target in ("old", "all"):
                    old = _spoil(old, valid, value)
                if target in ("weights", "all"):
                    w = _spoil(w, valid, value)
                if target in ("adv", "all"):
                    if adv_shape == "BT":
                        adv = _spoil(adv, valid, value)
                    else:  # a per-row advantage is masked only where its row has no valid token
                        adv = _spoil(adv, valid.any(1), value)
                out, grad = run_ext(Inputs(lp, old, adv, inp.mask, w), **kw)
                what = f"{name} in {target}, adv {adv_shape}, {kw}"
                assert same_bits(out.loss, clean.loss), f"{what}: loss {out.loss} != {clean.loss}"
                assert torch.equal(out.counts, clean.counts), what
                for k in ppo_ext.METRIC_NAMES:
                    assert same_bits(out.metrics[k], clean.metrics[k]), f"{what}: {k} {out.metrics[k]} != {clean.metrics[k]}"
                assert same_bits(grad, clean_grad), f"{what}: gradient differs"
                assert not grad[~valid].any(), f"{what}: gradient at a masked position"


def test_masked_garbage_in_empty_rows_and_empty_batch(device):
    """A batch whose every position is masked, with garbage everywhere: loss 0, gradient 0, metrics as docs/SPEC.md."""
    B, T = 3, 40
    nan = torch.full((B, T), math.nan, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for importance_sampling, agg in itertools.product(IS_MODES, AGG_MODES):
        out, grad = run_ext(Inputs(nan, nan, torch.full((B,), math.inf, device=device), mask, nan),
                            importance_sampling=importance_sampling, loss_agg_mode=agg, dual_clip=2.0,
                            log_ratio_clamp=1.0)
        assert out.loss.item() == 0.0 and not grad.any() and not grad.isnan().any()
        assert out.counts.tolist() == [0] * len(COUNT_NAMES)
        assert {k: out.metrics[k].item() for k in METRIC_NAMES} == NO_TOKEN_METRICS


# ----------------------------------------------------------------------------------------------------------
# More than 2^31 elements (pytest --slow)


def _available_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _need(device, nbytes):
    have = _available_bytes(device)
    if have < nbytes * 1.2:
        pytest.skip(f"needs ~{nbytes / 2**30:.1f} GiB free on {device}, has {have / 2**30:.1f} GiB")


BIG_T = (1 << 30) + 5  # B = 2 rows: 2^31 + 10 elements, row 1 starts past 2^30 and ends past 2^31


@pytest.mark.slow
def test_more_than_2_31_elements_forward(device):
    """bfloat16 log_probs and old_log_probs as two overlapping views of one buffer (old[k] = lp[k + 1]),
    a uint8 mask: about 6.5 GB. Markers at flat positions around 2^31 and at the very end must be seen:
    counts, ratio extremes and the loss have closed forms."""
    B, T = 2, BIG_T
    numel = B * T
    _need(device, numel * 2 + numel + (1 << 28))
    with torch.no_grad():
        base = torch.zeros(numel + 1, dtype=torch.bfloat16, device=device)
        markers = [1000, T - 1, (1 << 31) - 1, (1 << 31) + 1, numel - 1]  # base[K] = -1
        base[torch.tensor(markers, device=device)] = -1.0
        lp = base[:-1].view(B, T)
        old = base[1:].view(B, T)
        # d[k] = base[k] - base[k+1]: +1 at K-1 (r = e, clipped high), -1 at K (r = 1/e, clipped low)
        mask = torch.ones(B, T, dtype=torch.uint8, device=device)
        masked = [(1 << 31) + 3, numel - 1]  # a plain token, and the last low marker
        mask.view(-1)[torch.tensor(masked, device=device)] = 0
        adv = torch.tensor([1.0, 2.0], device=device)
        out = ppo_ext.policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)

    highs = [k - 1 for k in markers]
    lows = [k for k in markers if k not in masked]
    N = numel - len(masked)
    A = lambda k: 1.0 if k < T else 2.0  # noqa: E731
    e = math.e
    # l = -A for r = 1; -1.2 A for r = e (the clip is in force); -A / e for r = 1/e (the unclipped branch)
    total = -(1.0 * T + 2.0 * T) + sum(A(k) for k in masked if k not in lows and k not in highs)
    total += sum(A(k) - 1.2 * A(k) for k in highs) + sum(A(k) - A(k) / e for k in lows)
    assert counts_by_name(out.counts) == dict(valid_tokens=N, valid_seqs=2, clipped_low=len(lows),
                                              clipped_high=len(highs), clipped_active=len(highs),
                                              dual_clipped=0), out.counts.tolist()
    assert math.isclose(out.loss.item(), total / N, rel_tol=1e-5), (out.loss.item(), total / N)
    assert math.isclose(out.metrics["ratio_max"].item(), e, rel_tol=1e-6)
    assert math.isclose(out.metrics["ratio_min"].item(), 1 / e, rel_tol=1e-6)
    assert math.isclose(out.metrics["approx_kl"].item(), (len(lows) - len(highs)) / N, rel_tol=1e-3, abs_tol=1e-12)
    ratio_mean = (N - len(lows) - len(highs) + len(highs) * e + len(lows) / e) / N
    assert math.isclose(out.metrics["ratio_mean"].item(), ratio_mean, rel_tol=1e-6)


@pytest.mark.slow
def test_more_than_2_31_elements_gradient(device):
    """On-policy bfloat16 log_probs of 2^31 + 10 elements, per-row advantages, token-sum: the gradient is
    exactly -A_i at every position, the last ones included. About 18 GB (the float32 per-token gradient)."""
    B, T = 2, BIG_T
    numel = B * T
    _need(device, numel * (2 + 4 + 2) + (1 << 30))
    lp = torch.zeros(B, T, dtype=torch.bfloat16, device=device, requires_grad=True)
    adv = torch.tensor([1.0, 2.0], device=device)
    out = ppo_ext.policy_loss(lp, None, adv, loss_agg_mode="token-sum")
    c = counts_by_name(out.counts)
    assert [c["valid_tokens"], c["valid_seqs"]] == [numel, 2]
    assert math.isclose(out.loss.item(), -3.0 * T, rel_tol=1e-6)
    out.loss.backward()
    del out
    grad = lp.grad
    assert grad.shape == (B, T) and grad.dtype == torch.bfloat16
    for i, a in enumerate((1.0, 2.0)):
        assert grad[i, 0].item() == -a and grad[i, -1].item() == -a and grad[i, T // 2].item() == -a
        assert bool((grad[i] == -a).all()), f"row {i}: a gradient element is not -A"
