"""The loss families of ppo_ext.policy_loss (loss_type, docs/SPEC.md "Loss families") against the float64
eager reference, over every test dimension of the vanilla loss: importance-sampling levels, aggregation
modes, the log-ratio clamp, dtypes, mask dtypes and advantage shapes, layouts, gradcheck, opcheck,
torch.compile, determinism, thread counts and CPU instruction sets. Each family's formula is also checked on
hand-computed numbers (worked out here from the frameworks' definitions, not from the reference), and
its argument errors.
"""

import math
import zlib

import pytest
import torch

import ppo_ext
from helpers import (AGG_MODES, ADV_SHAPES, CPU_CAPABILITIES, FAMILY_OPTIONS, LOSS_TYPES, MASK_KINDS,
                     bitwise_equal_outputs, check_against_reference, counts_by_name, family_is_modes,
                     family_options, make_inputs, op_args, run_ext, run_ref, run_with_cpu_capability, same_bits)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def _family_cases():
    return [(f, s) for f in LOSS_TYPES for s in family_is_modes(f)]


def _inputs(B, T, seed, device, loss_type, **kw):
    """make_inputs kept away from the family's ratio boundaries (ratio_cap as one more); for vespo with row sums of
    the log-ratios within about [-1.5, 1.5], where its Gamma weight varies (it is ~0 beyond a few units)."""
    cap = FAMILY_OPTIONS[loss_type].get("ratio_cap")
    if loss_type == "vespo":
        kw = {"row_offset": 1.0 / T, "row_jitter": 0.1 / T, "token_noise": 0.5 / math.sqrt(T), **kw}
    return make_inputs(B, T, seed=seed, device=device, dual_clip=cap, **kw)


@pytest.mark.parametrize("clamp", [False, True], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type,is_mode", _family_cases())
def test_every_option_matches_reference(device, loss_type, is_mode, agg, clamp):
    kw = family_options(loss_type, is_mode, agg, clamp)
    for B, T in [(5, 37), (3, 700)]:
        inp = _inputs(B, T, _seed(loss_type, is_mode, agg, clamp, B, T), device, loss_type)
        check_against_reference(inp, what=f"{kw} B={B} T={T}", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dtypes(device, loss_type, dtype):
    for is_mode in family_is_modes(loss_type):
        kw = family_options(loss_type, is_mode, "seq-mean-token-mean")
        inp = _inputs(4, 300, _seed("dtype", loss_type, dtype, is_mode), device, loss_type, dtype=dtype)
        check_against_reference(inp, what=f"{kw} {dtype}", **kw)


@pytest.mark.parametrize("mask_kind", MASK_KINDS, ids=str)
@pytest.mark.parametrize("adv_shape", ADV_SHAPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mask_dtypes_and_advantage_shapes(device, loss_type, adv_shape, mask_kind):
    kw = family_options(loss_type)
    inp = _inputs(5, 64, _seed("mask", loss_type, adv_shape, mask_kind), device, loss_type, adv_shape=adv_shape,
                  mask_kind=mask_kind)
    check_against_reference(inp, what=f"{kw} {adv_shape} {mask_kind}", **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_weights_and_on_policy(device, loss_type):
    kw = family_options(loss_type)
    inp = _inputs(4, 50, _seed("noweights", loss_type), device, loss_type, weights=False)
    check_against_reference(inp, what="no weights", **kw)
    inp.old = None  # on-policy: old = log_probs, ratio 1
    check_against_reference(inp, what="on-policy", **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_noncontiguous_inputs(device, loss_type):
    for is_mode in family_is_modes(loss_type):
        kw = family_options(loss_type, is_mode)
        inp = _inputs(6, 2 * 90, _seed("layout", loss_type, is_mode), device, loss_type)
        inp.lp, inp.old, inp.weights = inp.lp[:, ::2], inp.old.t().contiguous().t()[:, 1::2], inp.weights[:, ::2]
        inp.adv, inp.mask = inp.adv[:, ::2], inp.mask[:, ::2]
        assert not inp.lp.is_contiguous() and not inp.old.is_contiguous()
        check_against_reference(inp, what=f"{kw} strided", **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_positions_never_matter(device, loss_type):
    """NaN / inf at masked positions: bitwise the same results as finite values there, and gradient 0."""
    kw = family_options(loss_type)
    inp = _inputs(5, 40, _seed("masked", loss_type), device, loss_type)
    out, grad = run_ext(inp, **kw)
    masked = inp.mask == 0
    for fill in (float("nan"), float("inf"), -float("inf")):
        poisoned = _inputs(5, 40, _seed("masked", loss_type), device, loss_type)
        for name in ("lp", "old", "adv", "weights"):
            setattr(poisoned, name, torch.where(masked, fill, getattr(poisoned, name)))
        out2, grad2 = run_ext(poisoned, **kw)
        bitwise_equal_outputs(out, out2)
        assert same_bits(grad, grad2)
        assert torch.all(grad2[masked] == 0)


# The families whose gradient holds a weight of the ratio fixed (a stop-gradient): their gradient is the
# derivative of their value only where that weight is locally constant.
STOPPED_WEIGHT = ("cispo", "dppo_tv", "dppo_kl")


@pytest.mark.parametrize("loss_type,is_mode", _family_cases())
def test_gradcheck(device, loss_type, is_mode):
    # seq-token's gradient is by definition local (docs/SPEC.md), so its rows get a constant w * A. The
    # stopped-weight families get every ratio e^2, beyond every bound and cap (cispo's weight is then 1 + clip_high,
    # dppo's the cap C or a dropped token): there the derivative of the value is the gradient they define.
    # vespo's Gamma weight is constant where its row log-weight is clamped: every log-ratio -25 puts every row
    # (one valid token is enough) at log(1e-8), where small k keep the weight of order 1.
    constant_row = is_mode == "seq-token"
    vespo_k = dict(vespo_k_pos=0.1, vespo_k_neg=0.2) if loss_type == "vespo" else {}
    kw = family_options(loss_type, is_mode, "seq-mean-token-mean", **vespo_k)
    inp = _inputs(3, 6, _seed("gradcheck", loss_type, is_mode), device, loss_type, dtype=torch.float64,
                  margin=1e-3, adv_shape="B" if constant_row else "BT", weights=not constant_row)
    if loss_type in STOPPED_WEIGHT:
        inp.old = inp.lp - 2.0
    if loss_type == "vespo":
        inp.old = inp.lp + 25.0
    lp = inp.lp.clone().requires_grad_(True)

    def loss(x):
        return ppo_ext.policy_loss(x, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **kw).loss

    assert torch.autograd.gradcheck(loss, (lp,), eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_opcheck(device, loss_type, layout):
    for is_mode in family_is_modes(loss_type):
        kw = family_options(loss_type, is_mode)
        inp = _inputs(4, 34, _seed("opcheck", loss_type, is_mode), device, loss_type)
        lp, old, adv, mask, w = inp.lp, inp.old, inp.adv, inp.mask, inp.weights
        if layout == "noncontiguous":
            lp, old, adv, mask, w = (t.t().contiguous().t() for t in (lp, old, adv, mask, w))
        args = op_args(lp.requires_grad_(True), old, adv, mask, w, **kw)
        torch.library.opcheck(torch.ops.ppo_ext.policy_loss.default, args)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_torch_compile_fullgraph(device, loss_type):
    torch._dynamo.reset()
    kw = family_options(loss_type)
    inp = _inputs(4, 33, _seed("compile", loss_type), device, loss_type)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(lp, old, adv, mask, w):
        out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w, **kw)
        return out.loss, out.counts

    lp = inp.lp.clone().requires_grad_(True)
    loss, counts = step(lp, inp.old, inp.adv, inp.mask, inp.weights)
    loss.backward()
    eager, eager_grad = run_ext(inp, **kw)
    assert same_bits(loss.detach(), eager.loss.detach()) and torch.equal(counts, eager.counts)
    assert same_bits(lp.grad, eager_grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bitwise_deterministic_and_thread_count(loss_type):
    kw = family_options(loss_type, family_is_modes(loss_type)[-1])
    inp = _inputs(40, 700, _seed("det", loss_type), "cpu", loss_type)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grad = run_ext(inp, **kw)
        torch.set_num_threads(max(2, threads))
        many, many_grad = run_ext(inp, **kw)
        again, again_grad = run_ext(inp, **kw)
    finally:
        torch.set_num_threads(threads)
    for out, grad in ((many, many_grad), (again, again_grad)):
        bitwise_equal_outputs(one, out)
        assert same_bits(one_grad, grad)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_sets(capability):
    """Every family under each CPU instruction set matches the reference (the vector code per ISA)."""
    script = """
import torch
from helpers import FAMILY_OPTIONS, check_against_reference, family_is_modes, family_options, make_inputs
for loss_type in FAMILY_OPTIONS:
    for is_mode in family_is_modes(loss_type):
        for dtype in (torch.float32, torch.float64):
            kw = family_options(loss_type, is_mode, "seq-mean-token-mean", clamp=True)
            inp = make_inputs(5, 203, seed=7, dtype=dtype, dual_clip=FAMILY_OPTIONS[loss_type].get("ratio_cap"))
            check_against_reference(inp, what=f"{loss_type} {is_mode} {dtype}", **kw)
print("ok")
"""
    run_with_cpu_capability(capability, script)


# ----------------------------------------------------------------------------------------------------------
# Hand-computed numbers: one valid token each (B = 1, T = 2, the second token masked), token-mean, weight w.
# Each expected value is the family's formula as the frameworks write it, evaluated here with math.


def _one_token(device, lp, old, adv, w=1.0, **kw):
    x = torch.tensor([[lp, 0.0]], dtype=torch.float64, device=device, requires_grad=True)
    out = ppo_ext.policy_loss(x, torch.tensor([[old, 0.0]], dtype=torch.float64, device=device),
                              torch.tensor([adv], dtype=torch.float64, device=device),
                              torch.tensor([[True, False]], device=device),
                              token_weights=torch.tensor([[w, 1.0]], dtype=torch.float64, device=device), **kw)
    out.loss.backward()
    return out.loss.item(), x.grad[0, 0].item(), counts_by_name(out.counts)


def test_cispo_numbers(device):
    # r = e^0.5 = 1.6487 > 1 + 0.28: clipped to 1.28, a stopped weight; l = -1.28 * A * lp, dl/dlp = -1.28 A.
    loss, grad, counts = _one_token(device, -1.0, -1.5, 2.0, w=0.5, loss_type="cispo", clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.5 * -1.28 * 2.0 * -1.0, rel=1e-12)
    assert grad == pytest.approx(0.5 * -1.28 * 2.0, rel=1e-12)
    assert (counts["clipped_high"], counts["clipped_active"], counts["clipped_low"]) == (1, 1, 0)
    # inside the bounds the weight is r itself: r = e^-0.1
    loss, grad, counts = _one_token(device, -2.0, -1.9, -1.0, loss_type="cispo")
    assert loss == pytest.approx(math.exp(-0.1) * -2.0, rel=1e-12)  # -r * A * lp = -r * -1 * -2
    assert grad == pytest.approx(math.exp(-0.1), rel=1e-12)
    assert counts["clipped_low"] + counts["clipped_high"] + counts["clipped_active"] == 0


def test_sapo_numbers(device):
    # A > 0: tau = tau_pos; l = -A * sigmoid(tau (r - 1)) * 4 / tau; dl/dlp = -A * 4 s (1 - s) * r.
    r, tau, adv = math.exp(0.3), 0.7, 1.5
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    loss, grad, _ = _one_token(device, -1.0, -1.3, adv, loss_type="sapo", tau_pos=tau, tau_neg=1.6)
    assert loss == pytest.approx(-adv * s * 4 / tau, rel=1e-12)
    assert grad == pytest.approx(-adv * 4 * s * (1 - s) * r, rel=1e-12)
    # A <= 0 (A = 0 included, as verl's torch.where(A > 0, ...)): tau = tau_neg
    r, tau, adv = math.exp(-0.4), 1.6, -0.8
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    loss, grad, _ = _one_token(device, -1.4, -1.0, adv, loss_type="sapo", tau_pos=0.7, tau_neg=tau)
    assert loss == pytest.approx(-adv * s * 4 / tau, rel=1e-12)
    assert grad == pytest.approx(-adv * 4 * s * (1 - s) * r, rel=1e-12)


def test_gpg_and_dro_numbers(device):
    loss, grad, _ = _one_token(device, -1.2, -0.7, 0.9, w=2.0, loss_type="gpg")
    assert loss == pytest.approx(2.0 * -0.9 * -1.2, rel=1e-12) and grad == pytest.approx(2.0 * -0.9, rel=1e-12)
    # dro: l = -(lp A - beta/2 (lp - old)^2), dl/dlp = -(A - beta (lp - old))
    loss, grad, _ = _one_token(device, -1.2, -0.7, 0.9, loss_type="dro", dro_beta=0.3)
    assert loss == pytest.approx(-(-1.2 * 0.9 - 0.15 * 0.25), rel=1e-12)
    assert grad == pytest.approx(-(0.9 - 0.3 * -0.5), rel=1e-12)


def test_dppo_numbers(device):
    # tv, A > 0: p - p_old = e^-1 - e^-1.2 = 0.0667 <= 0.08 kept: l = -A min(r, C) lp with r = e^0.2.
    kw = dict(clip_low=0.12, clip_high=0.08, ratio_cap=1.6)
    loss, grad, counts = _one_token(device, -1.0, -1.2, 1.0, loss_type="dppo_tv", **kw)
    assert loss == pytest.approx(math.exp(0.2), rel=1e-12) and grad == pytest.approx(-math.exp(0.2), rel=1e-12)
    assert counts["clipped_active"] == 0 and counts["dual_clipped"] == 0
    # tv, A > 0 and p - p_old = e^-0.5 - e^-1 = 0.2387 > 0.08: dropped (0 loss, 0 gradient), clipped_high
    loss, grad, counts = _one_token(device, -0.5, -1.0, 1.0, loss_type="dppo_tv", **kw)
    assert loss == 0 and grad == 0 and (counts["clipped_high"], counts["clipped_active"]) == (1, 1)
    # tv, A < 0, the same move (up) is kept whatever its size; r = e^0.5 = 1.65 > C = 1.6: truncated, dual_clipped
    loss, grad, counts = _one_token(device, -0.5, -1.0, -1.0, loss_type="dppo_tv", **kw)
    assert loss == pytest.approx(1.6 * -0.5, rel=1e-12) and grad == pytest.approx(1.6, rel=1e-12)
    assert (counts["dual_clipped"], counts["clipped_active"]) == (1, 0)
    # kl, A < 0, a move down: binary KL = p_old (old - lp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))
    lp, old = -1.3, -1.0
    p, p_old = math.exp(lp), math.exp(old)
    bkl = p_old * (old - lp) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
    assert 0.02 < bkl  # above a threshold of 0.02: dropped; below 0.04: kept
    loss, grad, counts = _one_token(device, lp, old, -1.0, loss_type="dppo_kl", clip_low=0.02, clip_high=0.5,
                                    ratio_cap=1.6)
    assert loss == 0 and grad == 0 and (counts["clipped_low"], counts["clipped_active"]) == (1, 1)
    assert bkl < 0.04
    loss, grad, counts = _one_token(device, lp, old, -1.0, loss_type="dppo_kl", clip_low=0.04, clip_high=0.5,
                                    ratio_cap=1.6)
    assert loss == pytest.approx(math.exp(lp - old) * lp, rel=1e-12) and counts["clipped_active"] == 0


def test_geo_mean_numbers(device):
    # One row of three valid tokens, A = 1.5 > 0, eps_lo = 0.3, eps_hi = 0.25 (log-ratio bounds): the terms are
    # min(d, 0.25) = (0.1, 0.25, -0.5); R = exp(mean) = exp(-0.05); l = -A R for each token; token-mean: -A R.
    # "seq" gradient: dL/dlp_u = -A R * q'(u) / 3 with q' = (1, 0, 1) (the clipped token gets none).
    d = torch.tensor([[0.1, 0.4, -0.5]], dtype=torch.float64, device=device)
    old = torch.full_like(d, -1.0)
    lp = (old + d).requires_grad_(True)
    kw = dict(loss_type="geo_mean", clip_low=0.3, clip_high=0.25)
    out = ppo_ext.policy_loss(lp, old, torch.tensor([1.5], dtype=torch.float64, device=device),
                              importance_sampling="seq", **kw)
    out.loss.backward()
    R = math.exp((0.1 + 0.25 - 0.5) / 3)
    assert out.loss.item() == pytest.approx(-1.5 * R, rel=1e-12)
    torch.testing.assert_close(lp.grad.cpu(), torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64) * -1.5 * R / 3)
    c = counts_by_name(out.counts)
    assert (c["clipped_high"], c["clipped_active"], c["clipped_low"]) == (2, 1, 0)  # 0.4 and -0.5 lie outside
    # A < 0: the terms are max(d, -0.3) = (0.1, 0.4, -0.3)
    lp2 = (old + d).requires_grad_(True)
    out = ppo_ext.policy_loss(lp2, old, torch.tensor([-2.0], dtype=torch.float64, device=device),
                              importance_sampling="seq-token", **kw)
    out.loss.backward()
    R = math.exp((0.1 + 0.4 - 0.3) / 3)
    assert out.loss.item() == pytest.approx(2.0 * R, rel=1e-12)
    # seq-token: each token's own term, dL/dlp_t = -A_t R q'(t) / 3 (token-mean over 3 tokens)
    torch.testing.assert_close(lp2.grad.cpu(), torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64) * 2.0 * R / 3)
    c = counts_by_name(out.counts)
    assert (c["clipped_low"], c["clipped_active"], c["clipped_high"]) == (2, 1, 0)


def _vespo_row(device, d, adv, rollout=None, **kw):
    """One row of len(d) valid tokens (log-ratios d, old = -1) and a masked fifth with a huge log-ratio, token-mean."""
    n = len(d)
    old = torch.full((1, n + 1), -1.0, dtype=torch.float64, device=device)
    lp = (old + torch.tensor([list(d) + [1e4]], dtype=torch.float64, device=device)).requires_grad_(True)
    mask = torch.tensor([[True] * n + [False]], device=device)
    if rollout is not None:
        kw["rollout_log_probs"] = old - torch.tensor([list(rollout) + [0.0]], dtype=torch.float64, device=device)
    out = ppo_ext.policy_loss(lp, old, torch.tensor([adv], dtype=torch.float64, device=device), mask,
                              loss_type="vespo", **kw)
    out.loss.backward()
    return out.loss.item(), lp.grad[0].tolist(), lp.detach()[0, :n].tolist()


def _vespo_expected(log_w, adv, lps, k, lam):
    """TRL's get_gamma_weights and loss, evaluated here: phi = exp(lam + k log w - lam w), l = -phi A lp."""
    phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
    n = len(lps)
    return -phi * adv * sum(lps) / n, [-phi * adv / n] * n + [0.0]


def test_vespo_numbers(device):
    log_1e8 = math.log(1e-8)
    # A >= 0: (k, lambda) = (2, 3) (the defaults); log w = the row's sum of log-ratios (the masked token unread).
    for d, log_w in [((0.2, -0.5, 0.1), -0.2),
                     ((-25.0, 10.0), -10.0),  # each log-ratio clamped to [-20, 20] first
                     ((-15.0, -10.0), log_1e8)]:  # the row's log-weight clamped to [log(1e-8), 20]
        loss, grad, lps = _vespo_row(device, d, 1.5)
        expected_loss, expected_grad = _vespo_expected(log_w, 1.5, lps, 2.0, 3.0)
        assert loss == pytest.approx(expected_loss, rel=1e-12), d
        assert grad == pytest.approx(expected_grad, rel=1e-12), d
    # A < 0: (k_neg, lambda_neg), taken as given (TRL's clamp of lambda to >= 1e-4 is its adapter's)
    loss, grad, lps = _vespo_row(device, (0.3, 0.4), -0.7, vespo_k_neg=1.2, vespo_lambda_neg=-0.5)
    expected_loss, expected_grad = _vespo_expected(0.7, -0.7, lps, 1.2, -0.5)
    assert loss == pytest.approx(expected_loss, rel=1e-12) and grad == pytest.approx(expected_grad, rel=1e-12)
    # a weight that overflows is 0 (TRL's nan_to_num), not inf or NaN
    loss, grad, _ = _vespo_row(device, (0.5, 0.5), 1.0, vespo_k_pos=800.0, vespo_lambda_pos=1.0)
    assert loss == 0.0 and grad == [0.0, 0.0, 0.0]
    # a token-level rollout correction joins the log-weight (old - rollout = 0.3, 0.6, truncated at 1.5: the log
    # of each weight) and does not multiply the loss
    rollout_kw = dict(rollout_is="token", rollout_is_high=1.5)
    loss, grad, lps = _vespo_row(device, (0.2, -0.5), 1.5, rollout=(0.3, 0.6), **rollout_kw)
    expected_loss, expected_grad = _vespo_expected(-0.3 + 0.3 + math.log(1.5), 1.5, lps, 2.0, 3.0)
    assert loss == pytest.approx(expected_loss, rel=1e-12) and grad == pytest.approx(expected_grad, rel=1e-12)
    # masked (IcePop): the second token's weight is 0, whose log is clamped to log(1e-8)
    loss, grad, lps = _vespo_row(device, (0.2, -0.5), 1.5, rollout=(0.3, 0.6), **rollout_kw, rollout_is_mode="mask")
    expected_loss, expected_grad = _vespo_expected(-0.3 + 0.3 + log_1e8, 1.5, lps, 2.0, 3.0)
    assert loss == pytest.approx(expected_loss, rel=1e-12) and grad == pytest.approx(expected_grad, rel=1e-12)


def test_value_numbers(device):
    # v = 1.0, v_old = 0.5, eps = 0.2, R = 2.0: clamp(v) = 0.7, (v - R)^2 = 1 < (0.7 - R)^2 = 1.69: the clipped
    # term wins, its clamp is in force: l = 0.5 * 1.69, gradient 0, clip_active.
    loss, grad, counts = _one_token(device, 1.0, 0.5, 2.0, loss_type="value", clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(0.5 * 1.69, rel=1e-12) and grad == 0
    assert (counts["clipped_high"], counts["clipped_active"]) == (1, 1)
    # R = 0.0: (v - R)^2 = 1 > 0.49: the unclipped term, gradient v - R = 1 (times w = 3)
    loss, grad, counts = _one_token(device, 1.0, 0.5, 0.0, w=3.0, loss_type="value", clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(3 * 0.5, rel=1e-12) and grad == pytest.approx(3.0, rel=1e-12)
    assert (counts["clipped_high"], counts["clipped_active"]) == (1, 0)


def test_value_loss_api(device):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    old = (v.detach() + 0.3 * torch.randn(4, 9, generator=g, dtype=torch.float64).to(device))
    R = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device)
    mask = torch.rand(4, 9, generator=g).to(device) < 0.7
    # unclipped: 0.5 * masked mean of (v - R)^2, written out here
    out = ppo_ext.value_loss(v, None, R, mask)
    expected = 0.5 * ((v.detach() - R) ** 2)[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12) and out.metrics["clipfrac"].item() == 0
    out.loss.backward()
    torch.testing.assert_close(v.grad, torch.where(mask, v.detach() - R, 0.0) / mask.sum())
    # clipped: against the float64 reference, and the fraction is the count over the valid tokens
    v.grad = None
    out = ppo_ext.value_loss(v, old, R, mask, clip_range=0.1, loss_agg_mode="seq-mean-token-mean")
    ref = ppo_ext.reference.policy_loss_reference(v, old, R, mask, loss_type="value", clip_low=0.1,
                                                  loss_agg_mode="seq-mean-token-mean")
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    c = counts_by_name(out.counts)
    assert 0 < c["clipped_active"] < c["valid_tokens"]
    assert out.metrics["clipfrac"].item() == pytest.approx(c["clipped_active"] / c["valid_tokens"], rel=1e-6)
    with pytest.raises(ValueError, match="old_values is required with clip_range"):
        ppo_ext.value_loss(v, None, R, mask, clip_range=0.1)
    with pytest.raises(ValueError, match="log_ratio_clamp does not apply"):
        ppo_ext.policy_loss(v, old, R, mask, loss_type="value", log_ratio_clamp=1.0)


def test_value_has_no_ratio(device):
    # the values' exp(v - v_old) would mean nothing (and overflows float32 here): no ratio, its statistics 1;
    # approx_kl is the mean of v_old - v over the valid tokens
    v = torch.tensor([[120.0, 3.0, -50.0]], device=device, requires_grad=True)
    old = torch.tensor([[10.0, 2.0, 1.0]], device=device)
    mask = torch.tensor([[True, True, False]], device=device)
    out = ppo_ext.policy_loss(v, old, torch.zeros(1, 3, device=device), mask, loss_type="value", clip_low=0.5,
                              clip_high=0.5)
    assert [out.metrics[k].item() for k in ("ratio_mean", "ratio_min", "ratio_max")] == [1.0, 1.0, 1.0]
    assert out.metrics["approx_kl"].item() == pytest.approx(((10 - 120) + (2 - 3)) / 2, rel=1e-6)
    # clamp(120, 9.5, 10.5) = 10.5: 120^2 > 10.5^2, the unclipped term; clamp(3, 1.5, 2.5) = 2.5: 9 > 6.25, too
    assert out.loss.item() == pytest.approx(0.5 * (120.0 ** 2 + 3.0 ** 2) / 2, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["cispo", "gpg", "dro", "dppo_tv", "dppo_kl", "vespo", "value"])
def test_direct_gradient_ignores_an_overflowing_ratio(device, loss_type):
    """A family whose gradient does not go through the ratio has a finite gradient where the ratio is inf (lp -
    old = 1000, no clamp: inf even in float64), as the frameworks' autograd through their .detach() gives it (never 0 * inf)."""
    kw = family_options(loss_type)
    inp = _inputs(3, 20, _seed("overflow", loss_type), device, loss_type, dtype=torch.float64)
    inp.old = inp.lp - 1000.0
    out, grad = run_ext(inp, **kw)
    ref_out, ref_grad = run_ref(inp, **kw)
    assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    torch.testing.assert_close(grad, ref_grad)


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="ppo"), 'loss_type must be one of "vanilla", "cispo", "sapo", "gpg", "dro", "dppo_tv", '
                            '"dppo_kl", "geo_mean", "vespo", "value", got "ppo"'),
    (dict(loss_type="geo_mean"), 'loss_type "geo_mean" is a sequence-level loss: importance_sampling must be '
                                 '"seq" or "seq-token", got "token"'),
    (dict(loss_type="geo_mean", importance_sampling="seq", dual_clip=2.0), 'dual_clip applies to loss_type'),
    (dict(loss_type="cispo", dual_clip=3.0), 'dual_clip applies to loss_type "vanilla" only'),
    (dict(loss_type="sapo", ratio_cap=2.0), 'ratio_cap applies to loss_type "vanilla", "dppo_tv" and "dppo_kl"'),
    (dict(loss_type="dro"), "dro_beta must be a finite number > 0"),
    (dict(loss_type="dro", dro_beta=0.0), "dro_beta must be a finite number > 0"),
    (dict(loss_type="vanilla", dro_beta=0.1), 'dro_beta applies to loss_type "dro" only'),
    (dict(loss_type="gpg", importance_sampling="seq"), 'loss_type "gpg" is defined at the token level'),
    (dict(loss_type="dppo_kl", importance_sampling="seq-token"), 'loss_type "dppo_kl" is defined at the token'),
    (dict(loss_type="sapo", tau_pos=0.0), "tau_pos must be a finite number > 0"),
    (dict(loss_type="sapo", tau_neg=float("inf")), "tau_neg must be a finite number > 0"),
    (dict(loss_type="vespo", importance_sampling="seq"), 'loss_type "vespo" is defined at the token level'),
    (dict(loss_type="vespo", log_ratio_clamp=5.0), 'log_ratio_clamp does not apply to loss_type "vespo"'),
    (dict(loss_type="vespo", vespo_k_pos=float("nan")), "vespo_k_pos must be a finite number"),
    (dict(loss_type="vespo", vespo_lambda_neg=float("inf")), "vespo_lambda_neg must be a finite number"),
    (dict(loss_type="vespo", rollout_log_probs=torch.zeros(2, 3), rollout_is="seq", rollout_is_high=2.0),
     'loss_type "vespo" takes a token-level rollout correction (rollout_is "token")'),
])
def test_family_argument_errors(kw, match):
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), **kw)


def test_loss_type_must_be_a_string():
    with pytest.raises(TypeError, match="loss_type must be a string"):
        ppo_ext.policy_loss(torch.zeros(2, 3), None, torch.zeros(2), loss_type=1)
