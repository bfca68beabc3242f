"""ppo_ext.policy_loss against the float64 reference of docs/SPEC.md, on every device: every option,
dtype, layout and normaliser; gradients (gradcheck and autograd of the reference); opcheck;
torch.compile; the seed's worked examples; determinism."""

import itertools
import math
import zlib

import pytest
import torch

import ppo_ext
from helpers import (ADV_SHAPES, AGG_MODES, CPU_CAPABILITIES, IS_MODES, MASK_KINDS, NO_TOKEN_METRICS, Inputs,
                     bitwise_equal_outputs, check_against_reference, counts_by_name, make_inputs, op_args, options,
                     run_ext, run_with_cpu_capability, same_bits)
from ppo_ext.names import COUNT_NAMES, METRIC_NAMES

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _seed(*parts):
    """A fresh seed per parametrisation, the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode())


# --------------------------------------------------------------------------------------------
# Values and gradients against the reference.


@pytest.mark.parametrize("clamp", [False, True], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("dual", [False, True], ids=["nodual", "dual"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("is_mode", IS_MODES)
def test_every_option_matches_reference(device, is_mode, agg, dual, clamp):
    kw = options(is_mode, agg, dual, clamp)
    for B, T in [(6, 37), (3, 1), (4, 130)]:
        inp = make_inputs(B, T, seed=_seed(is_mode, agg, dual, clamp, B, T), device=device)
        check_against_reference(inp, what=f"{kw} B={B} T={T}", **kw)


# The ratio cap (TRL's two-sided clip, delta): below the upper clip bound 1 + CLIP_HIGH (where it changes the
# loss of A > 0 too), above it (A < 0 only), with and without the dual clip.
@pytest.mark.parametrize("ratio_cap", [1.1, 1.6, 2.5], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("dual", [False, True], ids=["nodual", "dual"])
@pytest.mark.parametrize("is_mode", IS_MODES)
def test_ratio_cap_matches_reference(device, is_mode, dual, ratio_cap):
    for agg in ("token-mean", "seq-mean-token-sum"):
        kw = options(is_mode, agg, dual, ratio_cap=ratio_cap)
        for B, T in [(6, 37), (4, 130)]:
            inp = make_inputs(B, T, seed=_seed("cap", is_mode, agg, dual, ratio_cap, B, T), device=device)
            check_against_reference(inp, what=f"{kw} B={B} T={T}", **kw)
    # The cap is in force somewhere, and changes the loss (with the dual clip, a cap above it would not).
    inp = make_inputs(6, 130, seed=_seed("cap-effect", is_mode), device=device, row_offset=1.2)
    capped, _ = run_ext(inp, **options(is_mode, ratio_cap=ratio_cap))
    uncapped, _ = run_ext(inp, **options(is_mode))
    assert capped.loss.item() != uncapped.loss.item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_mode", IS_MODES)
def test_dtypes(device, dtype, is_mode):
    for agg in ("token-mean", "seq-mean-token-mean"):
        kw = options(is_mode, agg, dual=True, clamp=True)
        # T = 1100 crosses the CPU tile and is not a multiple of any vector width.
        inp = make_inputs(5, 1100, seed=_seed(dtype, is_mode, agg), device=device, dtype=dtype)
        check_against_reference(inp, what=f"{dtype} {kw}", **kw)


@pytest.mark.parametrize("old_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_constant_inputs_in_other_dtypes(device, old_dtype):
    """old_log_probs, advantages and token_weights may have their own floating dtype."""
    inp = make_inputs(4, 50, seed=_seed(old_dtype), device=device, dtype=torch.bfloat16, old_dtype=old_dtype)
    check_against_reference(inp, **options("token", dual=True))


@pytest.mark.parametrize("mask_kind", MASK_KINDS, ids=str)
@pytest.mark.parametrize("adv_shape", ADV_SHAPES)
def test_mask_dtypes_and_advantage_shapes(device, mask_kind, adv_shape):
    for is_mode in IS_MODES:
        inp = make_inputs(5, 33, seed=_seed(mask_kind, adv_shape, is_mode), device=device, adv_shape=adv_shape,
                          mask_kind=mask_kind)
        check_against_reference(inp, **options(is_mode, "seq-mean-token-mean", dual=True))


def test_without_token_weights(device):
    for is_mode in IS_MODES:
        inp = make_inputs(5, 40, seed=_seed("now", is_mode), device=device, weights=False)
        check_against_reference(inp, **options(is_mode, dual=True))


def test_on_policy_ratio_is_one(device):
    """old_log_probs=None: ratio 1 everywhere, nothing clipped, loss = -weighted mean of A."""
    inp = make_inputs(4, 25, seed=1, device=device)
    inp.old = None
    ext, grad, ref, ref_grad = check_against_reference(inp, **options("token"))
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert ext.metrics[k].item() == 1.0
    c = counts_by_name(ext.counts)
    assert [c[k] for k in ("clipped_low", "clipped_high", "clipped_active", "dual_clipped")] == [0, 0, 0, 0]
    valid = inp.mask.cpu()
    expected = -(inp.adv * inp.weights).double().cpu()[valid].sum() / valid.sum()
    assert math.isclose(ext.loss.item(), expected.item(), rel_tol=1e-5)


def test_asymmetric_clip_and_clip_high_default(device):
    inp = make_inputs(6, 64, seed=2, device=device, clip_low=0.1, clip_high=0.1)
    out_default = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, clip_low=0.1)
    out_explicit = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, clip_low=0.1, clip_high=0.1)
    bitwise_equal_outputs(out_default, out_explicit)
    inp = make_inputs(6, 64, seed=3, device=device, clip_low=0.1, clip_high=0.4)
    check_against_reference(inp, clip_low=0.1, clip_high=0.4)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_normalisers(device, agg, as_tensor):
    inp = make_inputs(5, 30, seed=_seed("norm", agg, as_tensor), device=device)
    vals = dict(num_tokens=517, num_seqs=13, loss_scale_factor=2048.0)
    if as_tensor:
        vals = {k: torch.tensor(v, device=device) for k, v in vals.items()}
    check_against_reference(inp, **options("token", agg, dual=True), **vals)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_zero_denominator_gives_zero_loss_and_gradient(device, agg):
    inp = make_inputs(4, 20, seed=4, device=device)
    inp.mask = torch.zeros_like(inp.mask)
    ext, grad = run_ext(inp, loss_agg_mode=agg)
    assert ext.loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0
    assert ext.counts.tolist() == [0] * len(COUNT_NAMES)
    assert {k: ext.metrics[k].item() for k in METRIC_NAMES} == NO_TOKEN_METRICS
    # A given normaliser of 0 too.
    inp = make_inputs(4, 20, seed=5, device=device)
    ext, grad = run_ext(inp, loss_agg_mode=agg, num_tokens=0, num_seqs=torch.tensor(0, device=device),
                        loss_scale_factor=0.0)
    if agg != "token-sum":
        assert ext.loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0


@pytest.mark.parametrize("shape", [(0, 0), (0, 7), (3, 0), (1, 1)])
def test_empty_and_tiny_shapes(device, shape):
    B, T = shape
    for is_mode, agg in itertools.product(IS_MODES, AGG_MODES):
        inp = make_inputs(B, T, seed=6, device=device)
        check_against_reference(inp, what=f"{shape} {is_mode} {agg}", **options(is_mode, agg, dual=True))


def test_many_rows_and_chunks(device):
    """Enough tokens for several CPU chunks and CUDA blocks, with B not a multiple of anything."""
    for is_mode in IS_MODES:
        inp = make_inputs(67, 1531, seed=_seed("big", is_mode), device=device, adv_shape="B")
        check_against_reference(inp, **options(is_mode, "seq-mean-token-mean", dual=True, clamp=True))


def check_long_row(device):
    """A row of 8.4M tokens, float32 and float64: the CPU kernel keeps its extremes and counts in per-lane registers
    and reduces them every 2^19 tokens a lane (every F = 2^23 tokens with 16 lanes, 2^22 with 8, 2^21 with 4) and at
    the row's end. Log-ratios d and rollout log-ratios e far from every bound: before F in {0, -1}, and one d = -2
    (the smallest ratio); from F on in {0, 1}, and d = 2 at the last token (the largest). So a reduction that dropped
    or double-counted the lanes on either side of F changes a count or an extreme. (The bound itself, counts exact in
    float lanes below 2^24 a lane, is not reachable at this size.)"""
    F, T = 2 ** 23, 2 ** 23 + 11_000
    g = torch.Generator().manual_seed(_seed("long row"))
    sign = torch.where(torch.arange(T) < F, -1.0, 1.0)
    d = torch.randint(0, 2, (1, T), generator=g) * sign
    e = torch.randint(0, 2, (1, T), generator=g) * sign
    d[0, 5], d[0, -1] = -2, 2
    mask = torch.rand(1, T, generator=g) < 0.9
    mask[0, 5] = mask[0, -1] = True
    old = -torch.rand(1, T, generator=g)
    expected = {"valid_tokens": mask.sum().item(), "valid_seqs": 1, "clipped_low": (mask & (d < 0)).sum().item(),
                "clipped_high": (mask & (d > 0)).sum().item(), "dual_clipped": 0,
                "clipped_active": (mask & (d > 0)).sum().item(),  # A = 1: the clip is in force above the range
                "rollout_filtered_tokens": (mask & (e != 0)).sum().item(), "rollout_filtered_seqs": 0}
    for dtype in (torch.float32, torch.float64):
        o = old.to(dtype)
        out = ppo_ext.policy_loss((o + d.to(dtype)).to(device), o.to(device), torch.ones(1, device=device),
                                  mask.to(device), rollout_log_probs=(o - e.to(dtype)).to(device), rollout_is="token",
                                  rollout_is_low=0.5, rollout_is_high=2.0)
        counts = counts_by_name(out.counts.cpu())
        assert counts == expected, (dtype, counts, expected)
        metrics = {k: v.item() for k, v in out.metrics.items()}
        assert metrics["ratio_min"] == pytest.approx(math.exp(-2), rel=1e-6)
        assert metrics["ratio_max"] == pytest.approx(math.exp(2), rel=1e-6)
        assert (metrics["rollout_weight_min"], metrics["rollout_weight_max"]) == (0.5, 2.0)


def test_long_row_counts_and_extremes(device):
    check_long_row(device)


def _noncontiguous(inp: Inputs, device):
    """The same values in non-contiguous layouts: transposed storage, strided slices, expanded advantages."""
    B, T = inp.lp.shape

    def transposed(t):
        return None if t is None else t.t().contiguous().t()

    def sliced(t):
        if t is None:
            return None
        big = torch.zeros(B, 2 * T + 3, dtype=t.dtype, device=device)
        big[:, 1:2 * T + 1:2] = t
        return big[:, 1:2 * T + 1:2]

    adv = inp.adv[:, :1].expand(B, T) if inp.adv.dim() == 2 else inp.adv
    return Inputs(transposed(inp.lp), sliced(inp.old), adv, transposed(inp.mask), sliced(inp.weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(device, dtype):
    for is_mode in IS_MODES:
        inp = make_inputs(7, 45, seed=_seed("nc", is_mode, dtype), device=device, dtype=dtype, adv_shape="B1")
        nc = _noncontiguous(inp, device)
        assert not nc.lp.is_contiguous() and not nc.old.is_contiguous() and nc.adv.stride(1) == 0
        ext_nc, grad_nc = run_ext(nc, **options(is_mode, dual=True))
        ext, grad = run_ext(inp, **options(is_mode, dual=True))
        bitwise_equal_outputs(ext_nc, ext)
        assert same_bits(grad_nc, grad)
        check_against_reference(nc, **options(is_mode, dual=True))


def test_sequence_gradients(device):
    """seq and seq-token: same values; same gradient when w*A is constant within each row, different
    (and both equal to their reference) otherwise."""
    inp = make_inputs(6, 40, seed=7, device=device, adv_shape="B", weights=False)
    seq, g_seq, _, _ = check_against_reference(inp, **options("seq"))
    tok, g_tok, _, _ = check_against_reference(inp, **options("seq-token"))
    torch.testing.assert_close(seq.loss, tok.loss)
    torch.testing.assert_close(g_seq, g_tok, rtol=1e-5, atol=1e-7)
    inp = make_inputs(6, 40, seed=8, device=device, adv_shape="BT")
    _, g_seq, _, _ = check_against_reference(inp, **options("seq"))
    _, g_tok, _, _ = check_against_reference(inp, **options("seq-token"))
    assert (g_seq - g_tok).abs().max() > 1e-3


def test_masked_positions_get_zero_gradient(device):
    inp = make_inputs(5, 30, seed=9, device=device)
    for is_mode in IS_MODES:
        _, grad = run_ext(inp, **options(is_mode, dual=True))
        assert torch.count_nonzero(grad[inp.mask == 0]).item() == 0


# --------------------------------------------------------------------------------------------
# The seed's worked examples (docs/SPEC.md, "Worked examples"), numbers derived here from the formulas.

SEED_LP = [[-0.5, -1.2, -0.8, -2.0], [-1.0, -0.4, -1.5, -0.9]]
SEED_OLD = [[-0.6, -1.1, -1.1, -2.1], [-1.3, -0.5, -1.4, -0.9]]


def test_seed_clipfrac_example(device):
    ratio = torch.tensor([[1.10, 0.95, 1.25, 1.05], [0.75, 1.15, 0.82, 0.99]], dtype=torch.float64)
    lp = ratio.log().to(device)
    old = torch.zeros_like(lp)
    out = ppo_ext.policy_loss(lp, old, torch.ones_like(lp), clip_low=0.2)
    low, high = (ratio < 0.8).sum().item(), (ratio > 1.2).sum().item()
    assert (low, high) == (1, 1)
    c = counts_by_name(out.counts)
    assert [c["clipped_low"], c["clipped_high"]] == [low, high]
    assert out.metrics["clipfrac"].item() == pytest.approx((low + high) / 8)
    assert out.metrics["clipfrac_low"].item() == pytest.approx(1 / 8)
    assert out.metrics["clipfrac_high"].item() == pytest.approx(1 / 8)


def test_seed_token_ratio_example(device):
    lp = torch.tensor(SEED_LP, dtype=torch.float64, device=device)
    old = torch.tensor(SEED_OLD, dtype=torch.float64, device=device)
    out = ppo_ext.policy_loss(lp, old, torch.ones(2, device=device, dtype=torch.float64), clip_low=0.2)
    r = [math.exp(a - b) for ra, rb in zip(SEED_LP, SEED_OLD) for a, b in zip(ra, rb)]
    assert [round(x, 4) for x in r] == [1.1052, 0.9048, 1.3499, 1.1052, 1.3499, 1.1052, 0.9048, 1.0]
    assert out.metrics["ratio_mean"].item() == pytest.approx(sum(r) / 8, rel=1e-6)
    assert out.metrics["ratio_min"].item() == pytest.approx(min(r), rel=1e-6)
    assert out.metrics["ratio_max"].item() == pytest.approx(max(r), rel=1e-6)
    assert counts_by_name(out.counts)["clipped_high"] == sum(x > 1.2 for x in r) == 2


def test_seed_sequence_ratio_example(device):
    lp = torch.tensor(SEED_LP, dtype=torch.float64, device=device)
    old = torch.tensor(SEED_OLD, dtype=torch.float64, device=device)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], device=device)
    out = ppo_ext.policy_loss(lp, old, torch.ones(2, device=device, dtype=torch.float64), mask,
                              importance_sampling="seq")
    means = [sum(SEED_LP[0][t] - SEED_OLD[0][t] for t in range(3)) / 3,
             sum(SEED_LP[1][t] - SEED_OLD[1][t] for t in range(4)) / 4]
    assert means == pytest.approx([0.1, 0.075])
    r = [math.exp(x) for x in means]
    assert [round(x, 4) for x in r] == [1.1052, 1.0779]
    assert out.metrics["ratio_min"].item() == pytest.approx(r[1], rel=1e-6)
    assert out.metrics["ratio_max"].item() == pytest.approx(r[0], rel=1e-6)
    assert out.metrics["ratio_mean"].item() == pytest.approx((3 * r[0] + 4 * r[1]) / 7, rel=1e-6)
    c = counts_by_name(out.counts)
    assert [c["valid_tokens"], c["valid_seqs"]] == [7, 2]


# --------------------------------------------------------------------------------------------
# Gradients: gradcheck in float64 (the ops' own backward against finite differences).


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("is_mode", IS_MODES)
def test_gradcheck(device, is_mode, agg):
    # seq-token's gradient is by definition not the derivative of its value (docs/SPEC.md: stop-gradient), except
    # where w*A is constant within each row: there gradcheck applies to it too.
    constant_row = is_mode == "seq-token"
    inp = make_inputs(4, 9, seed=_seed("gc", is_mode, agg), device=device, dtype=torch.float64, margin=1e-3,
                      adv_shape="B" if constant_row else "BT", weights=not constant_row)
    kw = options(is_mode, agg, dual=True, clamp=True)

    def loss(lp):
        return ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **kw).loss

    lp = inp.lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (lp,), eps=1e-6, atol=1e-7)


def test_grad_scales_with_upstream_gradient(device):
    inp = make_inputs(4, 30, seed=10, device=device)
    lp = inp.lp.clone().requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, dual_clip=1.5)
    (g,) = torch.autograd.grad(out.loss * 3.5, lp)
    _, g1 = run_ext(inp, dual_clip=1.5)
    torch.testing.assert_close(g, 3.5 * g1, rtol=1e-6, atol=0)


def test_gradient_only_to_log_probs(device):
    inp = make_inputs(3, 10, seed=11, device=device)
    lp = inp.lp.clone().requires_grad_(True)
    old, adv, w = (t.clone().requires_grad_(True) for t in (inp.old, inp.adv, inp.weights))
    out = ppo_ext.policy_loss(lp, old, adv, inp.mask, token_weights=w)
    out.loss.backward()
    assert lp.grad is not None and old.grad is None and adv.grad is None and w.grad is None
    assert all(not v.requires_grad for v in out.metrics.values()) and not out.counts.requires_grad


# --------------------------------------------------------------------------------------------
# The ops as PyTorch sees them: opcheck (schema, fake kernels, autograd registration), compile.


def _op_args(inp: Inputs, compute_grad=True, **kw):
    return op_args(inp.lp, inp.old, inp.adv, inp.mask, inp.weights, compute_grad=compute_grad, **options(**kw))


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("is_mode", IS_MODES)
def test_opcheck_policy_loss(device, is_mode, layout):
    inp = make_inputs(5, 21, seed=_seed("oc", is_mode), device=device, adv_shape="B")
    if layout == "noncontiguous":
        inp = _noncontiguous(inp, device)
    inp.lp.requires_grad_(True)
    torch.library.opcheck(torch.ops.ppo_ext.policy_loss.default,
                          _op_args(inp, importance_sampling=is_mode, dual=True, clamp=True))
    # Tensor normalisers, and compute_grad=False (which saves nothing to go backward through).
    inp.lp = inp.lp.detach()
    args = _op_args(inp, compute_grad=False, loss_agg_mode="seq-mean-token-sum-norm",
                    num_tokens=torch.tensor(100.0, device=device), num_seqs=torch.tensor(4, device=device),
                    loss_scale_factor=torch.tensor(7.0, device=device))
    torch.library.opcheck(torch.ops.ppo_ext.policy_loss.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_policy_loss_backward(device, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    token_grad = torch.randn(6, 13, dtype=acc, device=device)
    grad_scale = torch.tensor(0.25, dtype=acc, device=device)
    grad_loss = torch.tensor(2.0, dtype=acc, device=device)
    torch.library.opcheck(torch.ops.ppo_ext.policy_loss_backward.default, (grad_loss, token_grad, grad_scale, dtype))
    out = torch.ops.ppo_ext.policy_loss_backward(grad_loss, token_grad, grad_scale, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, (token_grad * 0.5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_policy_loss_backward_inplace(device, dtype):
    token_grad = torch.randn(6, 13, dtype=dtype, device=device)
    grad_scale = torch.tensor(0.25, dtype=dtype, device=device)
    grad_loss = torch.tensor(-3.0, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.ppo_ext.policy_loss_backward_inplace.default,
                          (grad_loss, token_grad.clone(), grad_scale))
    expected = torch.ops.ppo_ext.policy_loss_backward(grad_loss, token_grad, grad_scale, dtype)
    torch.ops.ppo_ext.policy_loss_backward_inplace(grad_loss, token_grad, grad_scale)
    assert same_bits(token_grad, expected)
    with pytest.raises(ValueError, match="token_grad must be contiguous"):
        torch.ops.ppo_ext.policy_loss_backward_inplace(grad_loss, token_grad.t(), grad_scale)


def _backward_ops(fn):
    """The ppo_ext backward ops that fn() ran (the profiler's record of dispatcher calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("ppo_ext::policy_loss_backward")]


def test_backward_takes_saved_gradient_only_when_no_one_else_can_read_it(device):
    """The autograd backward scales the saved per-token gradient in place and hands it over as log_probs' gradient
    (no new (B, T) tensor) only where nothing else can read it; the gradient is bitwise the same either way."""
    inp = make_inputs(5, 33, seed=16, device=device)
    kw = options(dual=True, loss_agg_mode="seq-mean-token-mean")

    def raw(lp):  # the op's outputs, token_grad among them
        return torch.ops.ppo_ext.policy_loss(*op_args(lp, inp.old, inp.adv, inp.mask, inp.weights, **kw))

    outputs = raw(inp.lp)
    expected = torch.ops.ppo_ext.policy_loss_backward(torch.tensor(2.5, device=device), outputs[3], outputs[4],
                                                      torch.float32)

    def loss(lp):
        return ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **kw).loss * 2.5

    # ppo_ext.policy_loss drops the op's token_grad output: the saved gradient is taken, scaled in place
    lp = inp.lp.clone().requires_grad_(True)
    out = loss(lp)
    assert _backward_ops(out.backward) == ["ppo_ext::policy_loss_backward_inplace"]
    assert same_bits(lp.grad, expected)
    # retain_graph: every backward but the last leaves the saved gradient as it is; all give the same gradient
    lp = inp.lp.clone().requires_grad_(True)
    out = loss(lp)
    grads = []
    for retain in (True, True, False):
        assert _backward_ops(lambda: grads.append(torch.autograd.grad(out, lp, retain_graph=retain)[0])) == [
            "ppo_ext::policy_loss_backward" + ("" if retain else "_inplace")]
    for g in grads:
        assert same_bits(g, expected)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward()
    # a caller that holds the op's token_grad output: it is not overwritten
    lp = inp.lp.clone().requires_grad_(True)
    outputs = raw(lp)
    token_grad = outputs[3]
    held = token_grad.clone()
    assert _backward_ops(lambda: (outputs[0] * 2.5).backward()) == ["ppo_ext::policy_loss_backward"]
    assert same_bits(token_grad, held) and same_bits(lp.grad, expected)
    # ... nor a view of it (its storage is shared)
    lp = inp.lp.clone().requires_grad_(True)
    outputs = raw(lp)
    row = outputs[3][1]
    held = row.clone()
    outputs = outputs[0]
    assert _backward_ops(lambda: (outputs * 2.5).backward()) == ["ppo_ext::policy_loss_backward"]
    assert same_bits(row, held) and same_bits(lp.grad, expected)
    # ... and one that changes it in place before the backward gets autograd's error, not a wrong gradient
    lp = inp.lp.clone().requires_grad_(True)
    outputs = raw(lp)
    outputs[3][0].zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation: the token_grad output"):
        outputs[0].backward()
    # batched upstream gradients (vmap over the backward): a new, batched tensor
    lp = inp.lp.clone().requires_grad_(True)
    out = loss(lp)
    (batched,) = torch.autograd.grad(out, lp, torch.tensor([1.0, -2.0], device=device), is_grads_batched=True)
    assert same_bits(batched[0], expected) and same_bits(batched[1], expected * -2)
    # a gradient of another dtype than the saved one's (bf16 log-probs): a new tensor
    lp = inp.lp.to(torch.bfloat16).requires_grad_(True)
    out = loss(lp)
    assert _backward_ops(out.backward) == ["ppo_ext::policy_loss_backward"]
    assert lp.grad.dtype == torch.bfloat16
    # log_probs used by two losses: their gradients add up
    lp = inp.lp.clone().requires_grad_(True)
    (loss(lp) + loss(lp)).backward()
    assert same_bits(lp.grad, expected * 2)


def test_fake_kernel_matches_real_kernel(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    inp = make_inputs(5, 21, seed=12, device=device, dtype=torch.bfloat16)
    real = torch.ops.ppo_ext.policy_loss(*_op_args(inp))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_inp = Inputs(*(None if t is None else mode.from_tensor(t) for t in
                            (inp.lp, inp.old, inp.adv, inp.mask, inp.weights)))
        fake = torch.ops.ppo_ext.policy_loss(*_op_args(fake_inp))
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride(), r.device) == (f.shape, f.dtype, f.stride(), f.device)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    kw = options("seq-token", "seq-mean-token-mean", dual=True, clamp=True)

    def step(lp, old, adv, mask, w, num_tokens):
        out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w, num_tokens=num_tokens, **kw)
        return out.loss * 2, out.metrics["clipfrac"], out.counts

    compiled = torch.compile(step, fullgraph=True)
    for seed in (13, 14):  # the second call re-uses the compiled graph
        inp = make_inputs(6, 40, seed=seed, device=device)
        lp1 = inp.lp.clone().requires_grad_(True)
        lp2 = inp.lp.clone().requires_grad_(True)
        nt = torch.tensor(300.0, device=device)
        a = compiled(lp1, inp.old, inp.adv, inp.mask, inp.weights, nt)
        b = step(lp2, inp.old, inp.adv, inp.mask, inp.weights, nt)
        a[0].backward()
        b[0].backward()
        for x, y in zip(a, b):
            assert same_bits(x, y)
        assert same_bits(lp1.grad, lp2.grad)


def test_module(device):
    module = ppo_ext.PolicyLoss(clip_low=0.2, clip_high=0.28, dual_clip=1.5, importance_sampling="seq")
    assert "dual_clip=1.5" in repr(module)
    inp = make_inputs(4, 20, seed=15, device=device)
    out = module(inp.lp, inp.old, inp.adv, inp.mask, inp.weights, num_tokens=50)
    ref = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, num_tokens=50,
                              clip_low=0.2, clip_high=0.28, dual_clip=1.5, importance_sampling="seq")
    bitwise_equal_outputs(out, ref)
    with pytest.raises(TypeError, match="num_tokens"):
        ppo_ext.PolicyLoss(num_tokens=3)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ppo_ext.PolicyLoss(loss_agg_mode="mean")


def test_no_grad_saves_no_gradient(device):
    inp = make_inputs(4, 20, seed=16, device=device)
    *_, token_grad, _ = torch.ops.ppo_ext.policy_loss(*_op_args(inp, compute_grad=False))
    assert token_grad.shape == (0,)
    with torch.no_grad():
        out = ppo_ext.policy_loss(inp.lp.requires_grad_(True), inp.old, inp.adv, inp.mask)
    assert not out.loss.requires_grad


# --------------------------------------------------------------------------------------------
# Determinism.


def test_bitwise_deterministic(device):
    inp = make_inputs(37, 3001, seed=17, device=device)
    for is_mode in IS_MODES:
        kw = options(is_mode, "seq-mean-token-mean", dual=True)
        a, ga = run_ext(inp, **kw)
        b, gb = run_ext(inp, **kw)
        bitwise_equal_outputs(a, b)
        assert same_bits(ga, gb)


def test_cpu_result_does_not_depend_on_thread_count():
    inp = make_inputs(41, 4099, seed=18)  # about 10 chunks of work
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([run_ext(inp, **options(m, "seq-mean-token-mean", dual=True)) for m in IS_MODES])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for (a, ga), (b, gb) in zip(results[0], other):
            bitwise_equal_outputs(a, b)
            assert same_bits(ga, gb)


_ISA_SCRIPT = r"""
import itertools, torch
from helpers import IS_MODES, AGG_MODES, make_inputs, options, check_against_reference
for i, (dtype, is_mode, agg) in enumerate(itertools.product(
        (torch.float32, torch.bfloat16, torch.float16, torch.float64), IS_MODES, AGG_MODES)):
    for B, T in ((3, 1), (4, 17), (2, 1100)):
        inp = make_inputs(B, T, seed=1000 + i, dtype=dtype)
        check_against_reference(inp, **options(is_mode, agg, dual=True, clamp=True))
from test_policy_loss import check_long_row
check_long_row("cpu")
print("ok")
"""


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_sets(capability):
    """Each CPU kernel (scalar, AVX2, the widest the machine has) against the reference."""
    run_with_cpu_capability(capability, _ISA_SCRIPT)
