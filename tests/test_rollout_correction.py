"""The rollout correction computed in the kernel (docs/SPEC.md "Rollout correction"): from rollout_log_probs,
the inference engine's log-probs, a constant weight per token, per row (the product of the ratios) or per row's
geometric mean, truncated to the bounds or masked outside them, with its metrics and counts. Against the
float64 reference over levels, modes, bounds, importance-sampling levels, aggregation modes, families and
dtypes; hand-computed numbers; opcheck, torch.compile, determinism; errors.
"""

import math
import zlib

import pytest
import torch

import ppo_ext
from helpers import (CPU_CAPABILITIES, check_against_reference, counts_by_name, family_is_modes,
                     family_options, make_inputs, op_args, options, run_ext, run_with_cpu_capability, same_bits)
from ppo_ext.names import ROLLOUT_IS_LEVELS

LEVELS = ROLLOUT_IS_LEVELS[1:]
# (mode, mask weight, low, high): TIS (upper bound), both bounds, IcePop / MIS (mask), OpenRLHF's mask
# keeping the token's own ratio
CORRECTIONS = [
    ("truncate", "unit", None, 1.3),
    ("truncate", "unit", 0.8, 1.25),
    ("mask", "unit", 0.75, 1.3),
    ("mask", "unit", None, 1.2),
    ("mask", "token", 0.8, 1.25),
]
IDS = [f"{m}-{w}-{lo}-{hi}" for m, w, lo, hi in CORRECTIONS]


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def with_rollout(inp, seed, spread=0.15):
    """rollout = old + a per-row offset + per-token noise (so that rows and tokens fall on either side of the
    bounds), kept away from every bound of CORRECTIONS at the token, row-sum and row-mean levels."""
    g = torch.Generator().manual_seed(seed)
    B, T = inp.lp.shape
    old = inp.old.double().cpu()
    bounds = [math.log(b) for _, _, lo, hi in CORRECTIONS for b in (lo, hi) if b is not None]
    valid = torch.ones(B, T, dtype=torch.bool) if inp.mask is None else (inp.mask.cpu() != 0)
    for _ in range(200):
        rollout = old + spread * (torch.randn(B, 1, generator=g, dtype=torch.float64) +
                                  torch.randn(B, T, generator=g, dtype=torch.float64))
        rollout = rollout.to(inp.old.dtype).double()
        e = torch.where(valid, old - rollout, 0)
        units = [e, e.sum(1, keepdim=True), e.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)]
        if all(((u - b).abs() > 1e-4).all() for u in units for b in bounds):
            inp.rollout = rollout.to(inp.old.dtype).to(inp.lp.device)
            return inp
    raise AssertionError("no rollout draw away from the bounds")


def correction(level, mode, weight, lo, hi):
    return dict(rollout_is=level, rollout_is_mode=mode, rollout_is_mask_weight=weight, rollout_is_low=lo,
                rollout_is_high=hi)


def check(inp, what, **kw):
    return check_against_reference(inp, what=what, rollout_log_probs=inp.rollout, **kw)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("is_mode", ["token", "seq", "seq-token"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_matches_reference(device, corr, level, is_mode, agg):
    kw = {**options(is_mode, agg, dual=True, clamp=True), **correction(level, *corr)}
    for B, T in [(6, 37), (3, 600)]:
        inp = with_rollout(make_inputs(B, T, seed=_seed(corr, level, is_mode, agg, B, T), device=device),
                           _seed("r", corr, level, B, T))
        ext, _, ref, _ = check(inp, f"{kw} B={B} T={T}", **kw)
    c = counts_by_name(ref.counts)
    if level == "token":  # (rows: a few per batch, on either side or not; test_numbers cuts rows by hand)
        assert 0 < c["rollout_filtered_tokens"] < c["valid_tokens"], "the bounds cut some tokens, not all"


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gpg", "dro", "dppo_tv", "geo_mean", "vespo", "value"])
def test_every_family(device, loss_type):
    # vespo: a token-level correction, its log-weights joining the row's log-weight (row levels are refused)
    for level in ("token",) if loss_type == "vespo" else LEVELS:
        for corr in CORRECTIONS[:3]:
            kw = {**family_options(loss_type, family_is_modes(loss_type)[-1], "seq-mean-token-mean"),
                  **correction(level, *corr)}
            inp = with_rollout(make_inputs(5, 70, seed=_seed(loss_type, level, corr), device=device,
                                           dual_clip=kw.get("ratio_cap")), _seed("r", loss_type, level, corr))
            check(inp, f"{kw}", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes_and_layouts(device, dtype):
    for level in LEVELS:
        kw = {**options("token", "token-mean"), **correction(level, "mask", "unit", 0.75, 1.3)}
        inp = with_rollout(make_inputs(4, 130, seed=_seed("dt", dtype, level), device=device, dtype=dtype),
                           _seed("rdt", dtype, level))
        check(inp, f"{dtype} {level}", **kw)
        inp.rollout = inp.rollout.t().contiguous().t()  # a column-major rollout
        check(inp, f"{dtype} {level} strided", **kw)
        inp.rollout = inp.rollout.double()  # another dtype than the others'
        check(inp, f"{dtype} {level} float64 rollout", **kw)


def test_without_correction_the_metrics_are_one(device):
    inp = make_inputs(4, 30, seed=3, device=device)
    out, _ = run_ext(inp)
    for k in ("rollout_weight_mean", "rollout_weight_min", "rollout_weight_max"):
        assert out.metrics[k].item() == 1.0
    assert out.metrics["rollout_filtered_frac"].item() == 0.0
    c = counts_by_name(out.counts)
    assert c["rollout_filtered_tokens"] == c["rollout_filtered_seqs"] == 0


def test_numbers(device):
    """One row of three valid tokens, vanilla at ratio 1 (old = lp) and A = 1: the loss is -mean(weight)."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64, device=device)
    rollout = lp - torch.tensor([[0.1, -0.5, 0.3, 9.0]], dtype=torch.float64, device=device)  # e = old - rollout
    mask = torch.tensor([[True, True, True, False]], device=device)
    adv = torch.ones(1, dtype=torch.float64, device=device)

    def run(**kw):
        out = ppo_ext.policy_loss(lp, lp, adv, mask, rollout_log_probs=rollout, **kw)
        return out.loss.item(), out.metrics, counts_by_name(out.counts)

    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.3)]
    # token TIS at 1.2: min(r, 1.2)
    loss, metrics, c = run(rollout_is="token", rollout_is_high=1.2)
    w = [min(x, 1.2) for x in r]
    assert loss == pytest.approx(-sum(w) / 3, rel=1e-12)
    assert metrics["rollout_weight_max"].item() == pytest.approx(1.2) and c["rollout_filtered_tokens"] == 1
    # token mask [0.7, 1.2]: e^-0.5 = 0.61 and e^0.3 = 1.35 are dropped
    loss, metrics, c = run(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.7, rollout_is_high=1.2)
    assert loss == pytest.approx(-r[0] / 3, rel=1e-12) and c["rollout_filtered_tokens"] == 2
    assert metrics["rollout_filtered_frac"].item() == pytest.approx(2 / 3)
    # seq (the product e^-0.1 = 0.905) truncated to [0.95, 2]: 0.95 for every token
    loss, _, c = run(rollout_is="seq", rollout_is_low=0.95, rollout_is_high=2.0)
    assert loss == pytest.approx(-0.95, rel=1e-12) and c["rollout_filtered_seqs"] == 1
    # seq-mean (e^(-0.1/3)) masked to [0.9, 1.1]: kept; with the token's own ratio as its weight
    loss, _, c = run(rollout_is="seq-mean", rollout_is_mode="mask", rollout_is_low=0.9, rollout_is_high=1.1)
    assert loss == pytest.approx(-math.exp(-0.1 / 3), rel=1e-12) and c["rollout_filtered_seqs"] == 0
    loss, _, _ = run(rollout_is="seq-mean", rollout_is_mode="mask", rollout_is_low=0.9, rollout_is_high=1.1,
                     rollout_is_mask_weight="token")
    assert loss == pytest.approx(-sum(r) / 3, rel=1e-12)
    # seq-mean masked to [0.98, 1.1]: the whole row is dropped
    loss, metrics, c = run(rollout_is="seq-mean", rollout_is_mode="mask", rollout_is_low=0.98, rollout_is_high=1.1)
    assert loss == 0 and c["rollout_filtered_seqs"] == 1 and c["rollout_filtered_tokens"] == 3
    assert metrics["rollout_weight_max"].item() == 0


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_opcheck(device, layout):
    for level in LEVELS:
        kw = {**options("seq"), **correction(level, "mask", "token", 0.8, 1.25)}
        inp = with_rollout(make_inputs(4, 34, seed=_seed("oc", level), device=device), _seed("roc", level))
        lp, old, adv, mask, w, rollout = inp.lp, inp.old, inp.adv, inp.mask, inp.weights, inp.rollout
        if layout == "noncontiguous":
            lp, old, adv, mask, w, rollout = (t.t().contiguous().t() for t in (lp, old, adv, mask, w, rollout))
        args = op_args(lp.requires_grad_(True), old, adv, mask, w, rollout_log_probs=rollout, **kw)
        torch.library.opcheck(torch.ops.ppo_ext.policy_loss.default, args)


def test_torch_compile_and_determinism(device):
    torch._dynamo.reset()
    kw = {**options("token"), **correction("seq-mean", "truncate", "unit", 0.8, 1.25)}
    inp = with_rollout(make_inputs(4, 33, seed=8, device=device), 9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(lp, old, adv, mask, w, rollout):
        out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w, rollout_log_probs=rollout, **kw)
        return out.loss, out.counts

    lp = inp.lp.clone().requires_grad_(True)
    loss, counts = step(lp, inp.old, inp.adv, inp.mask, inp.weights, inp.rollout)
    loss.backward()
    eager, eager_grad = run_ext(inp, rollout_log_probs=inp.rollout, **kw)
    again, again_grad = run_ext(inp, rollout_log_probs=inp.rollout, **kw)
    assert same_bits(loss.detach(), eager.loss.detach()) and torch.equal(counts, eager.counts)
    assert same_bits(lp.grad, eager_grad) and same_bits(eager_grad, again_grad)
    assert same_bits(eager.loss, again.loss)


def test_module_takes_rollout_log_probs_per_call():
    inp = with_rollout(make_inputs(3, 20, seed=4), 5)
    kw = correction("token", "truncate", "unit", None, 1.2)
    module = ppo_ext.PolicyLoss(**kw)
    a = module(inp.lp, inp.old, inp.adv, inp.mask, rollout_log_probs=inp.rollout)
    b = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, rollout_log_probs=inp.rollout, **kw)
    assert same_bits(a.loss, b.loss)
    with pytest.raises(TypeError, match="rollout_log_probs"):
        ppo_ext.PolicyLoss(rollout_log_probs=inp.rollout, **kw)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_instruction_sets(capability):
    script = """
import torch
from helpers import check_against_reference, make_inputs, options
from test_rollout_correction import CORRECTIONS, LEVELS, correction, with_rollout
for level in LEVELS:
    for corr in CORRECTIONS:
        for dtype in (torch.float32, torch.float64):
            inp = with_rollout(make_inputs(5, 203, seed=7, dtype=dtype), 11)
            kw = {**options("seq", "seq-mean-token-mean"), **correction(level, *corr)}
            check_against_reference(inp, what=f"{level} {corr} {dtype}", rollout_log_probs=inp.rollout, **kw)
print("ok")
"""
    run_with_cpu_capability(capability, script)


@pytest.mark.parametrize("kw,match", [
    (dict(rollout_is="token"), "rollout_is needs rollout_log_probs"),
    (dict(rollout_is="token", rollout=True), "rollout_is needs a bound"),
    (dict(rollout=True, rollout_is_high=2.0), 'rollout_log_probs was given with rollout_is="none"'),
    (dict(rollout_is="seq", rollout=True, rollout_is_low=2.0, rollout_is_high=1.0), "rollout_is_low must be <="),
    (dict(rollout_is="seq", rollout=True, rollout_is_high=-1.0), "rollout_is_high must be a finite number >= 0"),
    (dict(rollout_is="seq", rollout=True, rollout_is_low=float("nan")), "rollout_is_low must be a finite number"),
    (dict(rollout_is="product", rollout=True, rollout_is_high=2.0),
     'rollout_is must be one of "none", "token", "seq", "seq-mean", got "product"'),
    (dict(rollout_is="seq", rollout=True, rollout_is_high=2.0, rollout_is_mode="clip"),
     'rollout_is_mode must be one of "truncate", "mask"'),
    (dict(rollout_is="seq", rollout=True, rollout_is_high=2.0, rollout_shape=(2, 4)),
     "rollout_log_probs must have the shape of log_probs"),
])
def test_errors(kw, match):
    lp = torch.zeros(2, 3)
    rollout = torch.zeros(*kw.pop("rollout_shape", (2, 3))) if kw.pop("rollout", False) or "rollout_shape" in kw \
        else None
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        ppo_ext.policy_loss(lp, lp, torch.zeros(2), rollout_log_probs=rollout, **kw)
