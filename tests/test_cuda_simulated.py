"""The CUDA kernels, run on the CPU: the host code of csrc/cuda/ops_host.h and the kernels of csrc/cuda/*.cuh,
compiled by the host compiler against the simulator of tests/cuda_sim (threads as fibres, barriers and warp
shuffles checked), compared with ppo_ext's CPU ops on the same inputs. Every kernel test runs under three
schedules (threads, warps and blocks in forward, reverse and seeded-random order), so that a missing barrier,
a divergent shuffle or an order-dependent finalize fails here rather than on a user's GPU.

    pytest tests/test_cuda_simulated.py        # alone (the module builds once, ~1 minute, then is cached)

Tolerances: where the arithmetic is the CPU kernel's (counts, ratios' order statistics) the results are
compared bitwise; sums are compared to the float32 (float64) rounding of a different summation order, and
the float32 log-probs to the GPU's approximate exp (__expf, emulated) against the CPU's 1-ulp exp.
"""

import zlib

import pytest
import torch

import helpers
import ppo_ext
from cuda_sim import load
from helpers import (AGG_MODES, CLIP_HIGH, CLIP_LOW, DUAL_CLIP, IS_MODES, LOG_RATIO_CLAMP, count, make_inputs,
                     same_bits)

SCHEDULES = ("forward", "reverse", "random")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture(scope="module")
def sim():
    """The simulator module. While it runs, torch fills every fresh at::empty with NaN (integers: their max),
    so that an output or workspace element a kernel fails to write shows."""
    module = load()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield module
    torch.use_deterministic_algorithms(before)


@pytest.fixture(params=SCHEDULES)
def schedule(request, sim):
    """Runs the test under one schedule; the random one is seeded by the test's name (reproducible)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    sim.set_schedule(request.param, seed)
    sim.set_sm_count(2)
    yield request.param
    sim.set_schedule("forward", 0)
    sim.set_sm_count(2)


# --------------------------------------------------------------------------------------------
# policy_loss


def op_args(lp, old, adv, mask, weights, **options):
    """The positional arguments of ppo_ext::policy_loss, clipped at CLIP_LOW / CLIP_HIGH unless asked otherwise."""
    return helpers.op_args(lp, old, adv, mask, weights, **{"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, **options})


def compare_policy_loss(sim, args, what="", grad_loss=None):
    """The simulated CUDA op against the CPU op on the same arguments, forward and backward."""
    cpu = torch.ops.ppo_ext.policy_loss(*args)
    gpu = sim.policy_loss(*args)
    loss_c, metrics_c, counts_c, token_grad_c, scale_c = cpu
    loss_g, metrics_g, counts_g, token_grad_g, scale_g = gpu
    acc = loss_c.dtype
    assert loss_g.dtype == acc and token_grad_g.dtype == acc and scale_g.dtype == acc, what
    assert metrics_g.dtype == torch.float32 and counts_g.dtype == torch.int64, what
    assert torch.equal(counts_g, counts_c), f"{what}: counts {counts_g.tolist()} != CPU {counts_c.tolist()}"
    rtol = 1e-12 if acc == torch.float64 else 2e-6
    n = max(1, int(count(counts_c, "valid_tokens")))
    # a sum of n terms of either sign, in another order: its rounding grows with n, not with the result
    atol = (1e-15 if acc == torch.float64 else 1e-7) * n
    torch.testing.assert_close(loss_g, loss_c, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: loss\n{m}")
    assert same_bits(scale_g, scale_c) or torch.allclose(scale_g, scale_c, rtol=rtol, atol=0), f"{what}: grad_scale"
    names = list(ppo_ext.METRIC_NAMES)
    for k, name in enumerate(names):
        torch.testing.assert_close(metrics_g[k], metrics_c[k], rtol=2e-6, atol=1e-7, equal_nan=True,
                                   msg=lambda m: f"{what}: metric {name}\n{m}")
    torch.testing.assert_close(token_grad_g, token_grad_c, rtol=rtol, atol=atol * 1e-3, equal_nan=True,
                               msg=lambda m: f"{what}: token_grad\n{m}")
    if token_grad_c.numel() or args[-1]:
        dtype = args[0].dtype
        g = grad_loss if grad_loss is not None else torch.tensor(1.7, dtype=acc)
        back_c = torch.ops.ppo_ext.policy_loss_backward(g, token_grad_c, scale_c, dtype)
        back_g = sim.policy_loss_backward(g, token_grad_g, scale_g, dtype)
        assert back_g.dtype == dtype and back_g.shape == back_c.shape, what
        tol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(dtype, rtol)
        torch.testing.assert_close(back_g, back_c, rtol=tol, atol=atol * 1e-3, equal_nan=True,
                                   msg=lambda m: f"{what}: backward\n{m}")
        if dtype == acc:  # the in-place backward: the same kernel, its output over its input
            in_place = token_grad_g.clone()
            sim.policy_loss_backward_inplace(g, in_place, scale_g)
            assert same_bits(in_place, back_g), f"{what}: in-place backward"
    return gpu


def inputs(B, T, seed, dtype=torch.float32, adv_shape="BT", weights=True, **kw):
    x = make_inputs(B, T, seed=seed, dtype=dtype, adv_shape=adv_shape, weights=weights, log_ratio_clamp=LOG_RATIO_CLAMP,
                    dual_clip=DUAL_CLIP, **kw)
    return x.lp, x.old, x.adv, x.mask, x.weights


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_policy_loss_modes(sim, schedule, importance_sampling, loss_agg_mode):
    # 11 rows on a grid of at most 4 blocks (one multiprocessor): the grid-stride loop takes 2-3 rows a block
    sim.set_sm_count(1)
    cases = [(None, None, None), (DUAL_CLIP, LOG_RATIO_CLAMP, None), (DUAL_CLIP, None, 1.1)]  # dual, clamp, cap
    for k, (dual, clamp, cap) in enumerate(cases):
        x = inputs(11, 45, seed=100 + k, adv_shape=("BT", "B", "BT")[k])
        compare_policy_loss(sim, op_args(*x, dual_clip=dual, log_ratio_clamp=clamp, ratio_cap=cap,
                                         importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode),
                            f"{importance_sampling}/{loss_agg_mode}/{k}")


@pytest.mark.parametrize("loss_type,importance_sampling",
                         [(f, s) for f in helpers.LOSS_TYPES for s in helpers.family_is_modes(f)])
def test_policy_loss_families(sim, schedule, loss_type, importance_sampling):
    # every family on the same grid-stride grid, with the clamp, in both precisions and two aggregations
    sim.set_sm_count(1)
    for k, (dtype, agg) in enumerate([(torch.float32, "token-mean"), (torch.float64, "seq-mean-token-mean"),
                                      (torch.bfloat16, "seq-mean-token-sum")]):
        x = inputs(11, 45, seed=300 + k, dtype=dtype, adv_shape=("BT", "B", "BT")[k])
        kw = helpers.family_options(loss_type, importance_sampling, agg, clamp=k != 1)
        compare_policy_loss(sim, op_args(*x, **kw), f"{loss_type}/{importance_sampling}/{dtype}/{agg}")
    if loss_type not in ("vanilla", "sapo", "geo_mean"):
        # a direct-gradient family where the ratio overflows (lp - old = 1000, inf in float64): its gradient stays finite
        lp, old, adv, mask, w = inputs(5, 40, seed=310, dtype=torch.float64)
        args = op_args(lp, lp - 1000.0, adv, mask, w, **helpers.family_options(loss_type))
        assert torch.isfinite(sim.policy_loss(*args)[3]).all()
        compare_policy_loss(sim, args, f"{loss_type} overflowing ratio")


@pytest.mark.parametrize("level", ["token", "seq", "seq-mean"])
def test_policy_loss_rollout_correction(sim, schedule, level):
    # the rollout correction's row sums (prepass), weights and statistics on the grid-stride grid
    from test_rollout_correction import CORRECTIONS, correction, with_rollout
    sim.set_sm_count(1)
    for k, corr in enumerate(CORRECTIONS):
        dtype = (torch.float32, torch.float64)[k % 2]
        inp = with_rollout(make_inputs(11, 45, seed=320 + k, dtype=dtype), 330 + k)
        is_mode = ("token", "seq", "seq-token")[k % 3]
        kw = dict(importance_sampling=is_mode, loss_agg_mode=AGG_MODES[k], **correction(level, *corr))
        compare_policy_loss(sim, op_args(inp.lp, inp.old, inp.adv, inp.mask, inp.weights,
                                         rollout_log_probs=inp.rollout, **kw), f"{level}/{corr}/{dtype}")
        if level == "token":  # vespo: the weights' logs summed in the prepass into the row's log-weight
            vespo = {**helpers.family_options("vespo", loss_agg_mode=AGG_MODES[k]), **correction(level, *corr)}
            compare_policy_loss(sim, op_args(inp.lp, inp.old, inp.adv, inp.mask, inp.weights,
                                             rollout_log_probs=inp.rollout, **vespo), f"vespo/{corr}/{dtype}")


@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_policy_loss_ref_kl(sim, schedule, importance_sampling):
    # the KL to the reference: its sums (kl, kl_loss), its gradient in the direct term and, bias-corrected, through
    # the ratio (the "seq" pass 3 included), every estimator, on the grid-stride grid
    from test_ref_kl import ESTIMATORS, with_ref
    sim.set_sm_count(1)
    for k, estimator in enumerate(ESTIMATORS):
        dtype = (torch.float32, torch.float64)[k % 2]
        inp = with_ref(make_inputs(11, 45, seed=340 + k, dtype=dtype), 350 + k)
        kw = dict(importance_sampling=importance_sampling, loss_agg_mode=AGG_MODES[k % len(AGG_MODES)],
                  dual_clip=DUAL_CLIP, ref_log_probs=inp.ref, kl_coef=0.3, kl_estimator=estimator,
                  kl_bias_correction=k % 3 == 0, kl_clamp=(None, 2.0, float("inf"))[k % 3])
        compare_policy_loss(sim, op_args(inp.lp, inp.old, inp.adv, inp.mask, inp.weights, **kw),
                            f"{estimator}/{dtype}/{kw['loss_agg_mode']}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_policy_loss_dtypes(sim, schedule, dtype):
    for importance_sampling in IS_MODES:
        x = inputs(6, 70, seed=200, dtype=dtype)
        compare_policy_loss(sim, op_args(*x, importance_sampling=importance_sampling, dual_clip=DUAL_CLIP,
                                         loss_agg_mode="seq-mean-token-mean"), f"{dtype}/{importance_sampling}")
    # mixed: bf16 log-probs, float32 old log-probs, float64 advantages and weights
    lp, old, adv, mask, w = inputs(5, 33, seed=201, dtype=torch.bfloat16)
    compare_policy_loss(sim, op_args(lp, old.float(), adv.double(), mask, w.double()), "mixed dtypes")


def test_policy_loss_mask_dtypes(sim, schedule):
    lp, old, adv, mask, w = inputs(5, 40, seed=300)
    for dtype in MASK_DTYPES:
        m = mask.to(dtype)
        if dtype.is_floating_point:
            m = m * 0.37  # non-zero values other than 1 are valid too
        compare_policy_loss(sim, op_args(lp, old, adv, m, w, loss_agg_mode="seq-mean-token-mean"), str(dtype))
    tiny = mask.double() * 1e-300  # zero as a float32, valid as a float64
    compare_policy_loss(sim, op_args(lp, old, adv, tiny, w), "float64 1e-300 mask")
    compare_policy_loss(sim, op_args(lp, old, adv, None, w), "no mask")


@pytest.mark.parametrize("B,T", [(0, 5), (4, 0), (0, 0), (3, 1), (2, 1100), (1, 513)])
def test_policy_loss_shapes(sim, schedule, B, T):
    # empty batches, a row longer than the block (512 threads), a row of one token
    for importance_sampling in IS_MODES:
        x = inputs(B, T, seed=400, empty_row=B >= 3)
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            compare_policy_loss(sim, op_args(*x, importance_sampling=importance_sampling, loss_agg_mode=mode),
                                f"({B}, {T}) {importance_sampling} {mode}")


def test_policy_loss_all_masked_and_no_old(sim, schedule):
    lp, old, adv, mask, w = inputs(4, 30, seed=500)
    for importance_sampling in IS_MODES:
        out = compare_policy_loss(sim, op_args(lp, old, adv, torch.zeros_like(mask), w,
                                               importance_sampling=importance_sampling), "all masked")
        assert out[0].item() == 0.0 and out[3].abs().sum().item() == 0.0
        compare_policy_loss(sim, op_args(lp, None, adv, mask, None, importance_sampling=importance_sampling), "on-policy")


def test_policy_loss_layouts(sim, schedule):
    lp, old, adv, mask, w = inputs(9, 24, seed=600)
    t = lambda x: x.t().contiguous().t()  # noqa: E731 (column-major)
    compare_policy_loss(sim, op_args(t(lp), t(old), t(adv), t(mask), t(w), importance_sampling="seq"), "transposed")
    wide = lambda x: torch.cat([x, x], 1)[:, ::2]  # noqa: E731 (column stride 2)
    compare_policy_loss(sim, op_args(wide(lp), wide(old), wide(adv), wide(mask), wide(w)), "strided")
    row = torch.randn(9, dtype=torch.float64)
    for adv_view, name in [(row, "(B,)"), (row[:, None], "(B, 1)"), (row[:, None].expand(9, 24), "expanded"),
                           (torch.randn(9, 3)[:, 1], "strided (B,)")]:
        compare_policy_loss(sim, op_args(lp, old, adv_view, mask, w, loss_agg_mode="seq-mean-token-sum"), name)


def test_policy_loss_normalisers(sim, schedule):
    lp, old, adv, mask, w = inputs(7, 50, seed=700)
    for mode in AGG_MODES:
        for nt, ns, ls in [(123.0, 5.0, 64.0), (torch.tensor(123), torch.tensor(5.0, dtype=torch.float64),
                                                torch.tensor(64, dtype=torch.int32)),
                           (torch.tensor(0.0), torch.tensor(0.0), None), (0.0, 0.0, 0.0)]:
            compare_policy_loss(sim, op_args(lp, old, adv, mask, w, loss_agg_mode=mode, num_tokens=nt, num_seqs=ns,
                                             loss_scale_factor=ls), f"{mode} {nt} {ns} {ls}")


def test_policy_loss_no_grad_and_grad_dtypes(sim, schedule):
    lp, old, adv, mask, w = inputs(5, 20, seed=800)
    out = compare_policy_loss(sim, op_args(lp, old, adv, mask, w, compute_grad=False), "compute_grad=False")
    assert out[3].shape == (0,)
    for g in (torch.tensor(0.25, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.bfloat16)):
        compare_policy_loss(sim, op_args(lp, old, adv, mask, w), f"grad_loss {g.dtype}", grad_loss=g)


def test_policy_loss_nan_at_valid_position(sim, schedule):
    lp, old, adv, mask, w = inputs(4, 16, seed=900)
    lp = lp.clone()
    lp[2, 3], mask[2, 3] = float("nan"), True
    lp[0, 1], mask[0, 1] = float("inf"), False  # masked garbage never matters
    for importance_sampling in IS_MODES:
        compare_policy_loss(sim, op_args(lp, old, adv, mask, w, importance_sampling=importance_sampling), "NaN")


def test_policy_loss_block_count(sim, schedule):
    """The launch configuration: the grid of policy_loss_blocks, every block run, the backward's grid."""
    for B, sm in [(0, 3), (1, 3), (5, 1), (50, 3)]:
        sim.set_sm_count(sm)
        x = inputs(B, 9, seed=950, empty_row=False)
        sim.reset_stats()
        compare_policy_loss(sim, op_args(*x), f"B={B} sm={sm}")
        blocks = min(max(B, 1), 4 * sm)
        assert sim.policy_loss_blocks(B, sm) == blocks
        back = sim.policy_loss_backward_blocks(B * 9, sm) if B else 0
        assert back == (min((B * 9 + 255) // 256, 8 * sm) if B else 0)
        stats = sim.stats()
        # the forward, then the backward and the in-place backward (compare_policy_loss runs both)
        assert stats["launches"] == 1 + 2 * (B > 0) and stats["blocks"] == blocks + 2 * back, stats
        assert stats["threads"] == blocks * sim.policy_loss_threads + 2 * back * 256, stats
    assert sim.policy_loss_blocks(10 ** 9, 132) == 528


# --------------------------------------------------------------------------------------------
# token_log_probs


def logits_of(B, T, V, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    return logits, labels


def log_probs_tol(dtype):
    # float32 sums of the GPU's approximate exp against the CPU's 1-ulp exp; float64 exact exp
    return (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 2e-5)


def compare_log_probs(sim, logits, labels, temperature=1.0, what="", grad_zero_rows=True):
    tol = log_probs_tol(logits.dtype)
    first = None  # the outputs without the entropy
    for entropy in (False, True):
        cpu = torch.ops.ppo_ext.token_log_probs(logits, labels, temperature, entropy, False)
        gpu = sim.token_log_probs(logits, labels, temperature, entropy, False)
        for name, c, g in zip(("log_probs", "logsumexp", "entropy"), cpu, gpu):
            assert g.dtype == c.dtype and g.shape == c.shape, f"{what}: {name}"
            torch.testing.assert_close(g, c, rtol=tol[0], atol=tol[1], equal_nan=True,
                                       msg=lambda m: f"{what}: {name} (entropy={entropy})\n{m}")
        if entropy:
            assert same_bits(gpu[0], first[0]), f"{what}: log-probs depend on compute_entropy"
        first = gpu
    # backward, out of place and in place; some rows with zero upstream gradient
    lse = cpu[1]
    grad = torch.randn(labels.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(1))
    if grad_zero_rows and grad.numel():
        grad.view(-1)[::3] = 0
    back_c = torch.ops.ppo_ext.token_log_probs_backward(grad, logits, labels, lse, temperature)
    back_g = sim.token_log_probs_backward(grad, logits, labels, lse, temperature)
    gtol = {torch.float16: (2 ** -10, 1e-5), torch.bfloat16: (2 ** -7, 1e-4)}.get(logits.dtype, tol)
    torch.testing.assert_close(back_g, back_c, rtol=gtol[0], atol=gtol[1], equal_nan=True,
                               msg=lambda m: f"{what}: backward\n{m}")
    if grad_zero_rows and grad.numel():
        assert (back_g.reshape(-1, back_g.shape[-1])[::3] == 0).all()
    inplace = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype).copy_(logits)  # same layout
    sim.token_log_probs_backward_inplace(grad, inplace, labels, lse, temperature)
    assert same_bits(inplace.contiguous(), back_g), f"{what}: in-place backward differs"
    # with the entropy's gradient (an entropy bonus): other rows zero in both upstream gradients, some in one
    entropy = cpu[2]
    grad_entropy = torch.randn(labels.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(2))
    if grad_zero_rows and grad.numel():
        grad_entropy.view(-1)[::3] = 0
        grad_entropy.view(-1)[1::6] = 0
        grad.view(-1)[2::6] = 0
    back_c = torch.ops.ppo_ext.token_log_probs_backward(grad, logits, labels, lse, temperature, grad_entropy, entropy)
    back_g = sim.token_log_probs_backward(grad, logits, labels, lse, temperature, grad_entropy, entropy)
    torch.testing.assert_close(back_g, back_c, rtol=gtol[0], atol=gtol[1], equal_nan=True,
                               msg=lambda m: f"{what}: backward with the entropy\n{m}")
    if grad_zero_rows and grad.numel():
        assert (back_g.reshape(-1, back_g.shape[-1])[::3] == 0).all()
    inplace = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype).copy_(logits)
    sim.token_log_probs_backward_inplace(grad, inplace, labels, lse, temperature, grad_entropy, entropy)
    assert same_bits(inplace.contiguous(), back_g), f"{what}: in-place backward with the entropy differs"


@pytest.mark.parametrize("V", [1, 7, 32, 4099, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_token_log_probs(sim, schedule, V, dtype):
    B, T = (2, 3) if V >= 4099 else (3, 5)
    logits, labels = logits_of(B, T, V, seed=V, dtype=dtype)
    compare_log_probs(sim, logits, labels, what=f"V={V} {dtype}")
    compare_log_probs(sim, logits, labels, temperature=0.7, what=f"V={V} {dtype} T=0.7")


def test_token_log_probs_layouts(sim, schedule):
    full, labels = logits_of(2, 6, 1031, seed=5, dtype=torch.bfloat16)  # odd V: rows not 16-byte aligned
    compare_log_probs(sim, full[:, :-1], labels[:, 1:], what="sliced rows, odd V")
    full, labels = logits_of(2, 6, 1024, seed=6)
    compare_log_probs(sim, full[:, 1:], labels[:, 1:], what="sliced rows, aligned")
    compare_log_probs(sim, full.reshape(12, 1024), labels.reshape(12), temperature=1.3, what="(N, V)")
    compare_log_probs(sim, full[:, :, 3:40], torch.randint(0, 37, (2, 6)), what="unaligned row start")
    # more rows than the grid: a block takes several
    sim.set_sm_count(1)
    many, many_labels = logits_of(40, 30, 40, seed=7)
    compare_log_probs(sim, many, many_labels, what="grid-stride rows")
    compare_log_probs(sim, many[:0], many_labels[:0], what="no rows")


def test_token_log_probs_launch_configuration(sim):
    for V, pack in [(1, 4), (7, 8), (4099, 8), (32000, 4), (151936, 8), (10 ** 7, 2)]:
        threads = sim.log_probs_threads(V, pack)
        assert threads in (32, 64, 128, 256) and (threads == 256 or threads * pack * 4 >= V), (V, pack, threads)
    assert sim.log_probs_blocks(1, 256, 132) == 1
    assert sim.log_probs_blocks(10 ** 9, 256, 132) == 132 * 8 * 8


def test_token_log_probs_extreme_logits(sim, schedule):
    """Huge logits at a temperature != 1 (the max used to be scaled before the offsets were taken, which
    overflowed exp from ~1.5e9 on), -inf entries, NaN rows, out-of-range labels."""
    for dtype, big in [(torch.float32, 1e30), (torch.float32, 2e9), (torch.bfloat16, 1e30), (torch.float64, 1e300)]:
        logits, labels = logits_of(2, 3, 50, seed=11, dtype=dtype)
        logits[0, 0, 7] = big
        labels[0, 0] = 7
        logits[0, 1, 9] = -big
        logits[1, 2, :] = big  # all equal: uniform
        for temperature in (0.7, 1.0, 1.9):
            out = sim.token_log_probs(logits, labels, temperature, True, False)
            ref = torch.log_softmax(logits.double() / temperature, -1)
            ref_lp = ref.gather(-1, labels[..., None])[..., 0]
            ref_entropy = -(ref.exp() * ref).nan_to_num().sum(-1)
            assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all(), (dtype, big, temperature, out)
            torch.testing.assert_close(out[0].double(), ref_lp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out[2].double(), ref_entropy, rtol=1e-4, atol=1e-4)
            compare_log_probs(sim, logits, labels, temperature, what=f"{dtype} {big} T={temperature}")
    logits, labels = logits_of(2, 3, 20, seed=12)
    logits[0, 0, 5:15] = float("-inf")
    labels[0, 0] = 2
    logits[1, 2, 4] = float("nan")
    compare_log_probs(sim, logits, labels, temperature=0.8, what="-inf and NaN")
    bad = labels.clone()
    bad[1, 1], bad[0, 2] = 20, -1
    out = sim.token_log_probs(logits, bad, 1.0, False, False)
    assert out[0][1, 1].isnan() and out[0][0, 2].isnan() and torch.isfinite(out[0][0, :2]).all()
    grad = torch.ones(2, 3)
    back = sim.token_log_probs_backward(grad, logits, bad, out[1], 1.0)
    soft = torch.softmax(logits[1, 1], -1)
    torch.testing.assert_close(back[1, 1], -soft, rtol=1e-5, atol=1e-6)  # no one-hot for a bad label


def test_token_log_probs_backward_of_a_vocabulary_block(sim, schedule):
    """hidden_log_probs' second backward pass: the gradient of a block of the vocabulary's columns (labels shifted by
    the block's start, out of [0, block) for the rows whose label lies elsewhere; the full rows' logsumexp) is those
    columns of the full rows' gradient."""
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = logits_of(3, 4, 300, seed=13, dtype=dtype)
        _, lse, entropy = torch.ops.ppo_ext.token_log_probs(logits, labels, 0.9, True, False)
        g = torch.Generator().manual_seed(3)
        grad, grad_entropy = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
        full = torch.ops.ppo_ext.token_log_probs_backward(grad, logits, labels, lse, 0.9, grad_entropy, entropy)
        for start, stop in ((0, 100), (100, 233), (233, 300)):
            block = logits[..., start:stop].contiguous()
            got = sim.token_log_probs_backward(grad, block, labels - start, lse, 0.9, grad_entropy, entropy)
            gtol = (2 ** -7, 1e-4) if dtype == torch.bfloat16 else (1e-5, 1e-6)
            torch.testing.assert_close(got, full[..., start:stop], rtol=gtol[0], atol=gtol[1],
                                       msg=lambda m: f"{dtype} columns {start}:{stop}\n{m}")
            inplace = block.clone()
            sim.token_log_probs_backward_inplace(grad, inplace, labels - start, lse, 0.9, grad_entropy, entropy)
            assert same_bits(inplace, got)


# --------------------------------------------------------------------------------------------
# The simulator itself: what it reports, its 16-bit floats and its __expf.

ERRORS = {
    "divergent_barrier": r"__syncthreads in divergent code",
    "barrier_after_exit": r"__syncthreads not reached by every thread of the block.*thread 3 .*exited",
    "partial_barrier": r"__syncthreads not reached by every thread of the block",
    "shuffle_outside_mask": r"__shfl_down_sync\(mask 0xffff\).* reads lane 16, which is not in the mask",
    "lane_not_in_mask": r"the calling lane is not in the mask",
    "shuffle_after_exit": r"waits for lane 5, which has exited",
    "masks_disagree": r"lanes of a warp disagree on a collective",
    "shuffle_beside_barrier": r"warp collective in divergent code",
    "spin_forever": r"no progress: threads have only spun on memory",
    "misaligned_store": r"misaligned address: a vector store .*: thread 3 \(warp 0 lane 3\) at .*sim_ops.cpp:",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_simulator_reports(sim, schedule, name):
    out = torch.zeros(32 * 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cuda_sim: .*" + ERRORS[name]) as e:
        sim.run_example(name, out, 1, 32, 0)
    message = str(e.value)
    assert "block (0,0,0)" in message and f"{name}_kernel" in message
    assert "sim_ops.cpp:" in message or name == "spin_forever"  # a spin has no call site of a barrier


def test_simulator_accepts_legal_patterns(sim, schedule):
    """A partial __syncwarp beside a full-warp shuffle, a thread spinning on an atomic flag that another thread
    of the block raises, and aligned 16-byte stores: legal CUDA, which the checks must not refuse in any
    schedule."""
    out = torch.zeros(32 * 4, dtype=torch.int32)
    sim.run_example("disjoint_syncwarp", out, 1, 32, 0)
    assert torch.equal(out[:32], (torch.arange(32) ^ 16).int())
    out.zero_()
    sim.run_example("spin_on_flag", out, 1, 32, 0)
    assert out[0].item() == 1 and out[1].item() == 1
    sim.run_example("vector_store", out, 1, 32, 0)
    assert torch.equal(out, (torch.arange(32)[:, None] + torch.arange(4)).reshape(-1).int())


def test_simulator_invalid_launches(sim):
    out = torch.zeros(1024 * 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"invalid launch: a grid of \(0,1,1\)"):
        sim.run_example("warp_sum", out, 0, 32, 0)
    with pytest.raises(RuntimeError, match=r"invalid launch: a block of \(1025,1,1\)"):
        sim.run_example("warp_sum", torch.zeros(1025 * 4, dtype=torch.int32), 1, 1025, 0)
    with pytest.raises(RuntimeError, match="mask names lane 20, which is not in the block"):
        sim.run_example("warp_sum", out, 1, 20, 0)  # a partial warp under a full mask


def test_simulator_shuffles_and_missing_barrier(sim, schedule):
    out = torch.zeros(64 * 4, dtype=torch.int32)
    sim.run_example("warp_sum", out, 1, 64, 0)
    lane = torch.arange(64) % 32
    got = out.view(64, 4)
    assert (got[:, 0] == 496).all()
    assert torch.equal(got[:, 1].long(), torch.where(lane + 3 < 32, lane + 3, lane))
    assert torch.equal(got[:, 2].long(), torch.where(lane % 8 >= 2, lane - 2, lane))
    assert torch.equal(got[:, 3].long(), lane // 16 * 16 + (lane % 16 + 9) % 16)
    n = 96
    expected = (torch.arange(n) + 1) % n
    for salt in (1000, 2000):
        sim.run_example("neighbour", out := torch.zeros(2 * n * 4, dtype=torch.int32), 2, n, salt)
        assert torch.equal(out[:2 * n].view(2, n), (expected + salt).int().expand(2, n))


def test_missing_barrier_fails_in_some_schedule(sim):
    """Without its barrier the neighbour kernel reads slots not yet written in at least one schedule."""
    n, wrong = 96, []
    for k, order in enumerate(SCHEDULES):
        sim.set_schedule(order, 3)
        out = torch.zeros(n * 4, dtype=torch.int32)
        sim.run_example("neighbour_no_barrier", out, 1, n, 5000 + k)  # a new salt: stale slots are wrong
        wrong.append(not torch.equal(out[:n], ((torch.arange(n) + 1) % n + 5000 + k).int()))
    sim.set_schedule("forward", 0)
    assert any(wrong), wrong


def test_half_and_bfloat16_conversions(sim):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for bfloat, dtype in ((False, torch.float16), (True, torch.bfloat16)):
        torch.testing.assert_close(sim.half_to_float(bits, bfloat), bits.view(dtype).float(), rtol=0, atol=0,
                                   equal_nan=True)
        g = torch.Generator().manual_seed(2)
        x = torch.cat([torch.randn(100000, generator=g) * 10.0 ** torch.randint(-9, 6, (100000,), generator=g),
                       bits.view(dtype).float(),                                   # every representable value
                       (bits.view(dtype).float()[:-1] + bits.view(dtype).float()[1:]) / 2,  # halfway: ties
                       torch.tensor([65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0 ** -25, 2.0 ** -26, 3e38,
                                     float("inf"), -float("inf")])])
        x = x[torch.isfinite(x) | torch.isinf(x)]
        got = sim.float_to_half(x, bfloat).view(dtype).float()
        torch.testing.assert_close(got, x.to(dtype).float(), rtol=0, atol=0, equal_nan=True)


def test_expf_approximation(sim):
    x = torch.cat([torch.linspace(-104, 88.7, 200001), torch.tensor([0.0, -0.0, -1e-40, 1e-40, -float("inf")])])
    got = sim.expf_approx(x).double()
    exact = x.double().exp()
    normal = exact.float().abs() >= 1.1754943508222875e-38
    rel = ((got - exact).abs() / exact)[normal]
    assert rel.max().item() < 2 ** -23 * (1 + 90 * 1.5)  # the rounding of x * log2(e), then 1 ulp
    # subnormal results kept, as the GPU's ex2.approx.f32 without .ftz keeps them, to their spacing 2^-149
    subnormal = ~normal & (x < 0)
    assert ((got - exact).abs()[subnormal] <= exact[subnormal] * 2 ** -23 * (1 + 104 * 1.5) + 2 ** -149).all()
    assert (got[subnormal & (exact > 2 ** -149)] > 0).all()
    assert got[-1] == 0 and got[-5] == 1 and got[-4] == 1
