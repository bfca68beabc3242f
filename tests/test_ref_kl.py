"""The KL to a reference policy computed in the kernel (docs/SPEC.md "KL to a reference policy"): from
ref_log_probs, verl's kl_penalty estimators (k1, abs, k2, k3 with verl's clamps, the "+" straight-through forms),
the value clamp, TRL's bias correction, aggregated as the loss and kl_coef times it added to it, with its
metrics kl and kl_loss. Against the float64 reference over estimators, levels, aggregation modes, families and
dtypes; against verl's own kl_penalty and agg_loss; hand-computed numbers; gradcheck, opcheck, torch.compile,
determinism, CPU instruction sets; errors.
"""

import math
import zlib

import pytest
import torch

import frameworks
import ppo_ext
from helpers import (AGG_MODES, CPU_CAPABILITIES, IS_MODES, check_against_reference, family_is_modes,
                     family_options, make_inputs, op_args, options, run_ext, run_with_cpu_capability, same_bits)
from ppo_ext.reference import policy_loss_reference
from ppo_ext.names import KL_ESTIMATORS

# Every name, and the "+" forms of the estimators whose gradient it changes (k2+ is k2 itself).
ESTIMATORS = KL_ESTIMATORS + ("kl+", "abs+", "k2+", "low_var_kl+", "k3+")


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def _k3(k):
    return math.exp(-k) + k - 1


# k = lp - ref where the estimators have a kink or a clamp: 0 (abs), k3 = +-10 (k ~ -2.6, k ~ 11), |k| = 20.
KINKS = [0.0, -20.0, 20.0, 11.0 - math.exp(-11.0), -2.6094]


def with_ref(inp, seed, spread=0.6, far_rows=True):
    """ref = lp + a per-row offset + per-token noise; with far_rows, two rows far from the policy (k up to ~13 and
    down to ~-4) so that k3's clamp at 10 is in force for some tokens. Kept away from KINKS and from the value
    clamp (k3 = 10 at k = -2.6094 and at k = 11 - e^-11)."""
    g = torch.Generator().manual_seed(seed)
    B, T = inp.lp.shape
    lp = inp.lp.double().cpu()
    offset = spread * torch.randn(B, 1, generator=g, dtype=torch.float64)
    if far_rows and B >= 4:
        offset[2], offset[3] = -10.0, 3.0  # k = lp - ref = -offset: ~10 (k3 ~ 9-13) and ~-3 (k3 ~ 8-30)
    ref = (lp + offset + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).to(inp.lp.dtype)
    for _ in range(100):
        k = lp - ref.double()
        k3 = torch.exp(-k) + k - 1
        bad = ((k.abs() < 1e-4) | ((k.abs() - 20).abs() < 1e-4) | ((k3 - 10).abs() < 1e-3))
        if not bad.any():
            break
        ref = (ref.double() + 0.05 * bad).to(inp.lp.dtype)  # (more than a bfloat16 step at |ref| < 8)
    else:
        raise AssertionError("no reference draw away from the kinks")
    inp.ref = ref.to(inp.lp.device)
    return inp


def kl(estimator="low_var_kl", coef=0.7, **kw):
    return dict(kl_estimator=estimator, kl_coef=coef, **kw)


def check(inp, what, **kw):
    return check_against_reference(inp, what=what, ref_log_probs=inp.ref, **kw)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias_corrected"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_reference(device, estimator, bias, is_mode, agg):
    kw = {**options(is_mode, agg, dual=True, clamp=True), **kl(estimator, kl_bias_correction=bias)}
    for B, T in [(6, 37), (4, 300)]:
        inp = with_ref(make_inputs(B, T, seed=_seed(estimator, bias, is_mode, agg, B, T), device=device),
                       _seed("ref", estimator, B, T))
        ext, _, ref, _ = check(inp, f"{kw} B={B} T={T}", **kw)
        assert ext.metrics["kl"].item() != 0 and ext.metrics["kl_loss"].item() != 0


@pytest.mark.parametrize("kl_clamp", [0.5, 3.0, float("inf")])
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k3+"])
def test_value_clamp(device, estimator, kl_clamp):
    kw = {**options("token", "seq-mean-token-mean"), **kl(estimator, 1.3, kl_clamp=kl_clamp)}
    inp = with_ref(make_inputs(6, 80, seed=_seed("clamp", estimator, kl_clamp), device=device), _seed("rc", kl_clamp))
    check(inp, f"{kw}", **kw)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "vespo"])
def test_every_family(device, loss_type):
    for is_mode in family_is_modes(loss_type):
        for k, (estimator, bias) in enumerate([("k3", False), ("k2", True), ("k3+", True)]):
            kw = {**family_options(loss_type, is_mode, AGG_MODES[k]), **kl(estimator, 0.4, kl_bias_correction=bias)}
            inp = with_ref(make_inputs(5, 70, seed=_seed(loss_type, is_mode, k), device=device,
                                       dual_clip=kw.get("ratio_cap")), _seed("r", loss_type, k))
            check(inp, f"{kw}", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes_and_layouts(device, dtype):
    kw = {**options("token", "token-mean", dual=True), **kl("k3", kl_bias_correction=True)}
    inp = with_ref(make_inputs(4, 130, seed=_seed("dt", dtype), device=device, dtype=dtype), _seed("rdt", dtype))
    check(inp, f"{dtype}", **kw)
    inp.ref = inp.ref.t().contiguous().t()  # a column-major reference
    check(inp, f"{dtype} strided", **kw)
    inp.ref = inp.ref.double()  # another dtype than the others'
    check(inp, f"{dtype} float64 reference", **kw)


def test_rollout_correction_does_not_weight_the_kl(device):
    from test_rollout_correction import correction, with_rollout
    inp = with_ref(with_rollout(make_inputs(5, 60, seed=12, device=device), 13), 14)
    for level in ("token", "seq"):
        kw = {**options("token"), **kl("k3"), **correction(level, "mask", "unit", 0.8, 1.25)}
        check(inp, f"{level}", rollout_log_probs=inp.rollout, **kw)


def test_without_coefficient_only_the_metrics_change(device):
    """kl_coef=0 with ref_log_probs: the loss, the gradient and every other output are those without it, bitwise."""
    inp = with_ref(make_inputs(5, 50, seed=15, device=device), 16)
    plain, plain_grad = run_ext(inp, **options("seq", dual=True))
    with_kl, with_kl_grad = run_ext(inp, ref_log_probs=inp.ref, **options("seq", dual=True))
    assert same_bits(plain.loss, with_kl.loss) and same_bits(plain_grad, with_kl_grad)
    assert torch.equal(plain.counts, with_kl.counts)
    for name, value in plain.metrics.items():
        if name in ("kl", "kl_loss"):
            assert value.item() == 0 and with_kl.metrics[name].item() > 0, name
        else:
            assert same_bits(value, with_kl.metrics[name]), name


def test_numbers(device):
    """One row of four tokens, three valid, A = 0 (the policy loss and its gradient are 0): k = lp - ref is
    0.5, -1 and 12 (k3 clamped to 10); the loss is kl_coef * mean(kl), its gradient kl_coef * dkl/dlp / 3."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64, device=device)
    k = [0.5, -1.0, 12.0]
    ref = lp - torch.tensor([k + [float("nan")]], dtype=torch.float64, device=device)  # NaN at the masked one
    mask = torch.tensor([[True, True, True, False]], device=device)
    adv = torch.zeros(1, dtype=torch.float64, device=device)

    def run(estimator, **kw):
        x = lp.clone().requires_grad_(True)
        out = ppo_ext.policy_loss(x, lp, adv, mask, ref_log_probs=ref, kl_coef=0.5, kl_estimator=estimator, **kw)
        out.loss.backward()
        return out.loss.item(), x.grad[0].tolist(), out.metrics

    k3 = [_k3(x) for x in k]
    assert k3[2] > 10
    cases = {
        "k1": (k, [1.0, 1.0, 1.0]),
        "abs": ([0.5, 1.0, 12.0], [1.0, -1.0, 1.0]),
        "k2": ([x * x / 2 for x in k], k),
        "k3": (k3[:2] + [10.0], [1 - math.exp(-k[0]), 1 - math.exp(-k[1]), 0.0]),  # clamped: no gradient
        "k3+": (k3[:2] + [10.0], k),  # k2's gradient, through the clamp
    }
    for estimator, (values, derivatives) in cases.items():
        loss, grad, metrics = run(estimator)
        assert loss == pytest.approx(0.5 * sum(values) / 3, rel=1e-12), estimator
        assert grad == pytest.approx([0.5 * d / 3 for d in derivatives] + [0.0], rel=1e-12, abs=1e-15), estimator
        assert metrics["kl"].item() == pytest.approx(sum(values) / 3, rel=1e-6), estimator
        assert metrics["kl_loss"].item() == pytest.approx(sum(values) / 3, rel=1e-6), estimator
    # kl_clamp=inf: k3 unclamped (TRL's)
    loss, grad, _ = run("k3", kl_clamp=float("inf"))
    assert loss == pytest.approx(0.5 * sum(k3) / 3, rel=1e-12)
    assert grad[2] == pytest.approx(0.5 * (1 - math.exp(-12.0)) / 3, rel=1e-12)
    # bias correction at ratio r = exp(0.2) (old = lp - 0.2): every value and derivative times r, plus value * dr
    x = lp.clone().requires_grad_(True)
    out = ppo_ext.policy_loss(x, lp - 0.2, adv, mask, ref_log_probs=ref, kl_coef=0.5, kl_estimator="k2",
                              kl_bias_correction=True)
    out.loss.backward()
    r = math.exp(0.2)
    assert out.loss.item() == pytest.approx(0.5 * r * sum(v * v / 2 for v in k) / 3, rel=1e-12)
    assert x.grad[0, :3].tolist() == pytest.approx([0.5 * r * (v + v * v / 2) / 3 for v in k], rel=1e-12)


def test_verl_k3_is_finite_where_the_policy_gives_a_token_probability_zero(device):
    """lp = -inf at a valid token: verl's k3 clamps ref - lp to 20 before its exp, so it is 10 there (gradient 0);
    without verl's clamps (kl_clamp=inf, TRL's k3) it is NaN, as TRL's."""
    lp = torch.tensor([[-1.0, -float("inf")]], dtype=torch.float64, device=device)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64, device=device)
    old = torch.tensor([[-1.0, -3.0]], dtype=torch.float64, device=device)  # the ratio 0 there: the policy loss 0
    x = lp.clone().requires_grad_(True)
    out = ppo_ext.policy_loss(x, old, torch.zeros(1, dtype=torch.float64, device=device), ref_log_probs=ref,
                              kl_coef=1.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx((_k3(0.5) + 10.0) / 2, rel=1e-12)
    assert x.grad[0].tolist() == pytest.approx([(1 - math.exp(-0.5)) / 2, 0.0], rel=1e-12)
    unclamped = ppo_ext.policy_loss(lp, old, torch.zeros(1, dtype=torch.float64, device=device), ref_log_probs=ref,
                                    kl_coef=1.0, kl_clamp=float("inf"))
    assert math.isnan(unclamped.loss.item())


def test_masked_positions_are_not_read(device):
    inp = with_ref(make_inputs(4, 40, seed=17, device=device), 18)
    kw = {**options("seq-token"), **kl("k3+", kl_bias_correction=True)}
    a, a_grad = run_ext(inp, ref_log_probs=inp.ref, **kw)
    poisoned = torch.where(inp.mask != 0, inp.ref, torch.tensor(float("nan"), device=device))
    b, b_grad = run_ext(inp, ref_log_probs=poisoned, **kw)
    assert same_bits(a.loss, b.loss) and same_bits(a_grad, b_grad)
    assert all(same_bits(a.metrics[n], b.metrics[n]) for n in a.metrics)


# verl's own estimator (core_algos.kl_penalty) aggregated by its own agg_loss, the KL loss of its actor
# (verl/workers/utils/losses.py: policy_loss += kl_loss * kl_loss_coef), against the kernel's at A = 0.
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_verl_kl_penalty(estimator, agg):
    verl = frameworks.load_or_skip(frameworks.verl)
    inp = with_ref(make_inputs(6, 90, seed=_seed("verl", estimator, agg), mask_kind="bool"), _seed("vr", agg))
    coef = 0.05
    lp_verl = inp.lp.double().clone().requires_grad_(True)
    kld = verl.core_algos.kl_penalty(lp_verl, inp.ref.double(), estimator)
    expected = verl.core_algos.agg_loss(loss_mat=kld, loss_mask=inp.mask.double(), loss_agg_mode=agg) * coef
    expected.backward()
    lp = inp.lp.double().clone().requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old.double(), torch.zeros(6, dtype=torch.float64), inp.mask,
                              ref_log_probs=inp.ref.double(), kl_coef=coef, kl_estimator=estimator,
                              loss_agg_mode=agg)
    out.loss.backward()
    # verl's seq-mean-token-mean divides by n + 1e-8
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.metrics["kl_loss"].double(), expected.detach() / coef, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp.grad, lp_verl.grad, rtol=1e-8, atol=1e-14)


def test_gradcheck():
    # "seq-token"'s gradient is local by definition, not the derivative of its value: the reference covers it
    inp = with_ref(make_inputs(3, 7, seed=19, dtype=torch.float64, mask_kind="bool"), 20, spread=0.3, far_rows=False)
    for is_mode in ("token", "seq"):
        for estimator, bias in [("k3", True), ("abs", False), ("k1", True)]:
            kw = {**options(is_mode), **kl(estimator, 0.8, kl_bias_correction=bias)}

            def f(lp):
                return ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights,
                                           ref_log_probs=inp.ref, **kw).loss

            assert torch.autograd.gradcheck(f, (inp.lp.clone().requires_grad_(True),)), (is_mode, estimator)


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_opcheck(device, layout):
    for estimator, bias in [("k3", False), ("k2+", True)]:
        inp = with_ref(make_inputs(4, 34, seed=_seed("oc", estimator), device=device), _seed("roc", estimator))
        lp, old, adv, mask, w, ref = inp.lp, inp.old, inp.adv, inp.mask, inp.weights, inp.ref
        if layout == "noncontiguous":
            lp, old, adv, mask, w, ref = (t.t().contiguous().t() for t in (lp, old, adv, mask, w, ref))
        args = op_args(lp.requires_grad_(True), old, adv, mask, w, ref_log_probs=ref,
                       **options("seq"), **kl(estimator, kl_bias_correction=bias))
        torch.library.opcheck(torch.ops.ppo_ext.policy_loss.default, args)


def test_torch_compile_and_determinism(device):
    torch._dynamo.reset()
    kw = {**options("token"), **kl("k3", kl_bias_correction=True)}
    inp = with_ref(make_inputs(4, 33, seed=8, device=device), 9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(lp, old, adv, mask, w, ref):
        out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w, ref_log_probs=ref, **kw)
        return out.loss, out.metrics["kl"], out.counts

    lp = inp.lp.clone().requires_grad_(True)
    loss, kl_metric, counts = step(lp, inp.old, inp.adv, inp.mask, inp.weights, inp.ref)
    loss.backward()
    eager, eager_grad = run_ext(inp, ref_log_probs=inp.ref, **kw)
    again, again_grad = run_ext(inp, ref_log_probs=inp.ref, **kw)
    assert same_bits(loss.detach(), eager.loss.detach()) and torch.equal(counts, eager.counts)
    assert same_bits(kl_metric, eager.metrics["kl"])
    assert same_bits(lp.grad, eager_grad) and same_bits(eager_grad, again_grad)
    assert same_bits(eager.loss, again.loss)


def test_module_takes_ref_log_probs_per_call():
    inp = with_ref(make_inputs(3, 20, seed=4), 5)
    module = ppo_ext.PolicyLoss(**kl("k3+"))
    a = module(inp.lp, inp.old, inp.adv, inp.mask, ref_log_probs=inp.ref)
    b = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, ref_log_probs=inp.ref, **kl("k3+"))
    assert same_bits(a.loss, b.loss)
    with pytest.raises(TypeError, match="ref_log_probs"):
        ppo_ext.PolicyLoss(ref_log_probs=inp.ref, **kl())
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        ppo_ext.PolicyLoss(kl_estimator="k4")


def test_from_logits(device):
    """policy_loss_from_logits forwards the KL keywords: the same numbers as policy_loss on its log-probs."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(3, 8, 11, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 8), generator=g).to(device)
    inp = with_ref(make_inputs(3, 8, seed=22, device=device), 23)
    out = ppo_ext.policy_loss_from_logits(logits, labels, inp.old, inp.adv, inp.mask, ref_log_probs=inp.ref,
                                          **kl("k3"))
    direct = ppo_ext.policy_loss(out.log_probs, inp.old, inp.adv, inp.mask, ref_log_probs=inp.ref, **kl("k3"))
    assert same_bits(out.loss.detach(), direct.loss) and same_bits(out.metrics["kl"], direct.metrics["kl"])


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_sets(capability):
    script = """
import torch
from helpers import check_against_reference, make_inputs, options
from test_ref_kl import ESTIMATORS, kl, with_ref
for estimator in ESTIMATORS:
    for bias in (False, True):
        for dtype in (torch.float32, torch.float64):
            inp = with_ref(make_inputs(5, 203, seed=7, dtype=dtype), 11)
            kw = {**options("seq-token", "seq-mean-token-mean"), **kl(estimator, kl_bias_correction=bias)}
            check_against_reference(inp, what=f"{estimator} {bias} {dtype}", ref_log_probs=inp.ref, **kw)
print("ok")
"""
    run_with_cpu_capability(capability, script)


@pytest.mark.parametrize("kw,match", [
    (dict(kl_coef=0.1), "kl_coef needs ref_log_probs"),
    (dict(kl_clamp=5.0), "kl_clamp and kl_bias_correction need ref_log_probs"),
    (dict(kl_bias_correction=True), "kl_clamp and kl_bias_correction need ref_log_probs"),
    (dict(ref=True, kl_coef=float("nan")), "kl_coef must be a finite number"),
    (dict(ref=True, kl_coef=float("inf")), "kl_coef must be a finite number"),
    (dict(ref=True, kl_clamp=0.0), "kl_clamp must be > 0"),
    (dict(ref=True, kl_clamp=float("nan")), "kl_clamp must be > 0"),
    (dict(ref=True, kl_estimator="k4"),
     'kl_estimator must be one of "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", got "k4"'),
    (dict(ref=True, kl_estimator="k3++"), 'kl_estimator must be one of'),
    (dict(ref=True, kl_estimator="full"), 'kl_estimator must be one of'),
    (dict(ref=True, ref_shape=(2, 4)), "ref_log_probs must have the shape of log_probs"),
    (dict(ref=True, loss_type="value"), 'ref_log_probs does not apply to loss_type "value"'),
])
def test_errors(kw, match):
    lp = torch.zeros(2, 3)
    shape = kw.pop("ref_shape", (2, 3))
    ref = torch.zeros(*shape) if kw.pop("ref", False) else None
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("+", r"\+")):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), ref_log_probs=ref, **kw)


def test_type_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="ref_log_probs must be a torch.Tensor or None"):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), ref_log_probs=[[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="kl_bias_correction must be True or False"):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), ref_log_probs=lp, kl_bias_correction=1)
    with pytest.raises(TypeError, match="ref_log_probs must be float32, float64, float16 or bfloat16"):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), ref_log_probs=torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_kl_loss_alone(device, agg):
    """ppo_ext.kl_loss: the KL term alone, aggregated as the loss would be (the reference's KL loss with a zero policy
    loss); finite (verl's k3: 10, gradient 0) where a valid token's log-prob is -inf, where the on-policy ratio would
    make the zero policy loss NaN."""
    inp = with_ref(make_inputs(5, 40, seed=_seed("alone", agg), device=device, dtype=torch.float64), 31)
    normalisers = dict(num_tokens=77.0, num_seqs=6.0, loss_scale_factor=50.0)
    lp = inp.lp.clone().requires_grad_(True)
    loss = ppo_ext.kl_loss(lp, inp.ref, inp.mask, kl_estimator="k3+", loss_agg_mode=agg, **normalisers)
    loss.backward()
    x = inp.lp.clone().cpu().requires_grad_(True)
    zero = torch.zeros_like(x)
    ref = policy_loss_reference(x, zero, zero[:, 0], inp.mask.cpu(), ref_log_probs=inp.ref.cpu(), kl_coef=1.0,
                                kl_estimator="k3+", loss_agg_mode=agg, **normalisers)
    ref.loss.backward()
    torch.testing.assert_close(loss.cpu(), ref.loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad.cpu(), x.grad, rtol=1e-12, atol=1e-14)
    assert ref.metrics["kl_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    lp = torch.tensor([[-1.0, -float("inf")]], dtype=torch.float64, device=device, requires_grad=True)
    ref_lp = torch.tensor([[-1.5, -2.0]], dtype=torch.float64, device=device)
    loss = ppo_ext.kl_loss(lp, ref_lp)
    loss.backward()
    assert loss.item() == pytest.approx((_k3(0.5) + 10.0) / 2, rel=1e-12)
    assert lp.grad[0].tolist() == pytest.approx([(1 - math.exp(-0.5)) / 2, 0.0], rel=1e-12)
