"""ppo_ext.compat.openrlhf.PolicyLoss against OpenRLHF 0.11.2's own PolicyLoss.

OpenRLHF's PolicyLoss and aggregate_loss are OpenRLHF's, from the installed package (openrlhf.models.loss
and openrlhf.models.utils, executed from their files by tests/frameworks.openrlhf with a stand-in for
deepspeed, which the loss does not use: nothing of OpenRLHF is copied here). Both modules are built with
the same arguments and called as OpenRLHF's actor calls them (ActorPPOTrainer.training_step in
openrlhf.trainer.ray.ppo_actor: ``loss_fn(action_log_probs, old_action_log_probs, advantages,
action_mask=..., rollout_log_probs=..., **loss_batch_info)``, loss_batch_info as
openrlhf.utils.loss_utils makes it: ``dp_size`` and the global ``batch_num_tokens`` /
``global_batch_size`` as float32 tensors, divided by the gradient-accumulation steps). OpenRLHF runs on
float64 copies of the inputs with autograd; the adapter on the float32 inputs (and on the float64 ones,
for a tight comparison). Compared: the loss, the gradient and all four metrics (clip_ratio, ppo_kl,
vllm_kl, is_filter_ratio), None where OpenRLHF returns None.

Without OpenRLHF 0.11.2 installed the tests that need it skip, saying what to install
(PPO_EXT_REQUIRE_FRAMEWORKS=1 makes that a failure).

Inputs: tests/helpers.make_inputs (a fully masked row, mask density 0.8, log-ratios spread so that the
clip, the dual clip and whole-row clips happen, kept away from the clip boundaries) or the same values
with a ragged (right-padded) mask; rollout log-probs off the old ones by a per-row offset and per-token
noise, drawn so that the correction's gates cut some tokens and rows, away from their thresholds.
"""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import frameworks
from helpers import make_inputs
from ppo_ext.compat import openrlhf as po

B, T = 10, 24
CLIP_LOW, CLIP_HIGH, DUAL = 0.2, 0.28, 3.0
LOSS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
METRICS = ("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
# The valid rollout-correction settings: (level, mode, gating, threshold).
CORRECTIONS = [
    ("token", "clip", "ratio", (0.7, 1.5)),     # TIS
    ("token", "mask", "ratio", (0.7, 1.5)),     # ICEPOP
    ("seq", "mask", "ratio", (0.85, 1.2)),      # seq-mask-tis
    ("token", "mask", "binary_kl", (0.0, 0.01)),
    ("seq", "mask", "binary_kl", (0.0, 0.015)),  # FlashREINFORCE's trust region
    ("token", "mask", "tv", (0.0, 0.05)),
    ("seq", "mask", "tv", (0.0, 0.04)),
]
CORRECTION_IDS = [f"{lv}-{md}-{gt}" for lv, md, gt, _ in CORRECTIONS]


@pytest.fixture(scope="module")
def openrlhf():
    return frameworks.load_or_skip(frameworks.openrlhf)


# ----------------------------------------------------------------------------------------------------
# inputs


def _near(x, bounds, margin):
    x = x[torch.isfinite(x)]
    return any(bool(((x - b).abs() < margin * max(1.0, abs(b))).any()) for b in bounds)


def _gate_stats(old, rollout, valid, gating):
    """The statistic each gating reads, per token and per row (float64): only to keep the draws away from
    the thresholds, where float32 and float64 could fall on different sides."""
    old, rollout = old.double(), rollout.double()
    if gating == "ratio":
        tok = old - rollout  # compared on the log scale
    else:
        p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
        tok = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if gating == "binary_kl" else (p - q).abs()
    n = valid.sum(-1)
    row = torch.where(valid, tok, 0).sum(-1)[n > 0] / n[n > 0]
    return tok[valid], row


def make_case(seed, mask="bernoulli", b=B, t=T, dual=True, gspo=False, correction=None):
    """Inputs with rollout log-probs. mask: "bernoulli" (make_inputs'), "ragged" (right padding, lengths 0..T,
    row 1 empty, row 0 full) or "empty". correction (level, mode, gating, threshold): redraw until no gated
    statistic lies near the threshold."""
    opts = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL if dual else None,
                log_ratio_clamp=None if gspo else 20.0)
    clip_bounds = [math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH)] + ([math.log(DUAL)] if dual else [])
    for attempt in range(200):
        s = seed + 7919 * attempt
        inp = make_inputs(b, t, seed=s, weights=False, **opts)
        g = torch.Generator().manual_seed(s)
        if mask == "empty":
            inp.mask = torch.zeros(b, t, dtype=torch.bool)
        elif mask == "ragged":
            lengths = torch.randint(0, t + 1, (b,), generator=g)
            lengths[0], lengths[1] = t, 0
            inp.mask = torch.arange(t)[None, :] < lengths[:, None]
        valid = inp.mask != 0
        offsets = 0.25 * torch.randn(b, 1, generator=g, dtype=torch.float64)
        rollout = inp.old.double() + offsets + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
        inp.rollout = rollout.to(inp.old.dtype)
        if correction is not None:
            # The divergence gates read the probabilities themselves: shift every log-prob (the ratios do not
            # change) so that none exceeds log(0.95), away from 1, where 1 - p loses its digits in float32.
            shift = -0.05 - max(inp.lp.max().item(), inp.old.max().item(), inp.rollout.max().item())
            inp.lp, inp.old, inp.rollout = ((x.double() + shift).to(x.dtype) for x in (inp.lp, inp.old, inp.rollout))
        ok = True
        if mask == "ragged":  # the row means moved with the mask: keep them off the clip boundaries
            d = inp.lp.double() - inp.old.double()
            n = valid.sum(-1)
            ok = not _near(torch.where(valid, d, 0).sum(-1)[n > 0] / n[n > 0], clip_bounds, 1e-4)
        if gspo and correction is not None:  # GSPO's ratio is against the rollout policy then
            d = inp.lp.double() - inp.rollout.double()
            n = valid.sum(-1)
            ok = ok and not _near(torch.where(valid, d, 0).sum(-1)[n > 0] / n[n > 0], clip_bounds, 1e-4)
        if correction is not None and mask != "empty":
            level, _, gating, (low, high) = correction
            tok, row = _gate_stats(inp.old, inp.rollout, valid, gating)
            bounds = [math.log(low), math.log(high)] if gating == "ratio" else [high]
            stats = row if level == "seq" else tok
            ok = ok and not _near(stats, bounds, 1e-4)
        if ok:
            return inp
    raise AssertionError("no draw away from the boundaries")


def loss_batch_info(mask, dp_size=1, gas=1):
    """OpenRLHF's loss_batch_info for an optimizer step whose (global) loss mask is `mask`: the valid tokens
    and the rows with a valid token, float32 tensors divided by the gradient-accumulation steps."""
    valid = mask != 0
    return dict(dp_size=dp_size, batch_num_tokens=valid.sum().to(torch.float32) / gas,
                global_batch_size=(valid.sum(-1) > 0).sum().to(torch.float32) / gas)


# ----------------------------------------------------------------------------------------------------
# running both


def _run(module, inp, dtype, rows=slice(None), info=None, with_rollout=True, mask="given"):
    lp = inp.lp[rows].detach().to(dtype).clone().requires_grad_(True)
    m = None if mask is None else inp.mask[rows] if mask == "given" else mask[rows]
    out = module(lp, inp.old[rows].to(dtype), inp.adv[rows].to(dtype), action_mask=m,
                 rollout_log_probs=inp.rollout[rows].to(dtype) if with_rollout else None, **(info or {}))
    out[0].backward()
    return out, lp.grad


def run_adapter(kw, inp, dtype=torch.float32, **run):
    return _run(po.PolicyLoss(**kw), inp, dtype, **run)


def run_openrlhf(openrlhf, kw, inp, dtype=torch.float64, **run):
    return _run(openrlhf.loss.PolicyLoss(**kw), inp, dtype, **run)


def assert_same(got, ref, what, dtype=torch.float32, skip=()):
    (loss, *metrics), grad = got
    (ref_loss, *ref_metrics), ref_grad = ref
    assert len(metrics) == len(ref_metrics) == len(METRICS), what
    torch.testing.assert_close(loss.double(), ref_loss.detach().double(), **LOSS_TOL[dtype],
                               msg=lambda m: f"{what}: loss\n{m}")
    for name, v, r in zip(METRICS, metrics, ref_metrics):
        if r is None:
            assert v is None, f"{what}: {name} is {v}, OpenRLHF's is None"
            continue
        assert isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad, f"{what}: {name}: {v!r}"
        if name not in skip:
            # the kernel's metrics are float32 whatever the inputs' dtype (docs/SPEC.md)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v.double(), r.detach().double(), **tol, msg=lambda m: f"{what}: {name}\n{m}")
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * 0.1 * scale
                               + 1e-12, msg=lambda m: f"{what}: gradient\n{m}")


def check(openrlhf, kw, inp, what, dtypes=(torch.float32, torch.float64), skip=(), same_precision=False, **run):
    """The adapter in each of `dtypes` against OpenRLHF in float64 (same_precision: against OpenRLHF in the
    adapter's dtype, for gates whose float32 statistic is not float64's, see test_parity_rollout_correction)."""
    ref = run_openrlhf(openrlhf, kw, inp, **run)
    got = None
    for dtype in dtypes:
        got = run_adapter(kw, inp, dtype, **run)
        against = run_openrlhf(openrlhf, kw, inp, dtype=dtype, **run) if same_precision else ref
        assert_same(got, against, f"{what} ({dtype})", dtype, skip)
    return got, ref


def options(policy_loss_type="ppo", token_level_loss=True, dual=True, correction=None):
    kw = dict(clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL if dual else None,
              token_level_loss=token_level_loss, policy_loss_type=policy_loss_type)
    if correction is not None:
        level, mode, gating, threshold = correction
        kw.update(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                  is_correction_threshold=list(threshold))
    return kw


# ----------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("mask", ["bernoulli", "ragged"])
@pytest.mark.parametrize("dual", [True, False], ids=["dual_clip", "no_dual_clip"])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_parity(openrlhf, loss_type, token_level_loss, dual, mask):
    """One rank, without rollout correction: the local normalisers (loss_batch_info not given; a dp_size alone
    is then ignored, as by OpenRLHF's aggregate_loss), then the
    trainer's loss_batch_info of this micro-batch (gas = 1), then that of a step of 3 micro-batches (gas = 3,
    normalisers a third of the counts: the loss is scaled up by 3, as OpenRLHF does against DeepSpeed)."""
    seed = 100 + 8 * (loss_type == "gspo") + 4 * token_level_loss + 2 * dual + (mask == "ragged")
    inp = make_case(seed, mask, dual=dual, gspo=loss_type == "gspo")
    kw = options(loss_type, token_level_loss, dual)
    what = f"{loss_type} token_level={token_level_loss} dual={dual} {mask}"
    check(openrlhf, kw, inp, what + " local")
    check(openrlhf, kw, inp, what + " dp_size 2, no normaliser", info=dict(dp_size=2))  # dp_size unused then
    check(openrlhf, kw, inp, what + " trainer info", info=loss_batch_info(inp.mask))
    check(openrlhf, kw, inp, what + " gas 3", info=loss_batch_info(inp.mask, gas=3))


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("correction", CORRECTIONS, ids=CORRECTION_IDS)
def test_parity_rollout_correction(openrlhf, correction, loss_type):
    """Every rollout-correction setting OpenRLHF accepts (TIS, ICEPOP, seq-mask-tis, the divergence gates),
    at token and sequence level of the loss, with the trainer's normalisers; vllm_kl and is_filter_ratio
    included (None for GSPO, which only moves its ratio to the rollout policy).

    The binary-KL gate's lower bound is 0 and the statistic of a token with p = q is 0 up to rounding: in
    float32 it may come out as -1e-8 and the token is dropped, in float64 not. OpenRLHF does that too, so
    with that gating the float32 adapter is compared with OpenRLHF in float32 (the same formula, the same
    decisions), the float64 adapter with OpenRLHF in float64."""
    seed = 300 + 16 * CORRECTIONS.index(correction) + (loss_type == "gspo")
    for token_level_loss in (True, False):
        inp = make_case(seed + 2 * token_level_loss, "ragged", gspo=loss_type == "gspo", correction=correction)
        kw = options(loss_type, token_level_loss, correction=correction)
        what = f"{loss_type} {correction} token_level={token_level_loss}"
        got, ref = check(openrlhf, kw, inp, what, info=loss_batch_info(inp.mask),
                         same_precision=correction[2] == "binary_kl")
        if loss_type == "ppo":  # the gate cuts some, not all: the inputs exercise it
            assert 0 < ref[0][4].item() < 1, (what, ref[0][4])


@pytest.mark.parametrize("gating", ["binary_kl", "tv"])
def test_divergence_gates_at_the_probability_clamp(openrlhf, gating):
    """The divergence gates clamp p and q to [1e-6, 1 - 1e-6]: tokens the rollout gave probability 1 (log-prob
    0, where the unclamped binary KL is 0 * -inf = NaN) or about 0 (log-prob -30), the old policy nearly the
    same, are compared with OpenRLHF at the clamp."""
    correction = ("token", "mask", gating, (0.0, 0.01))
    inp = make_case(600 + (gating == "tv"), "ragged", correction=correction)
    inp.rollout, inp.old, inp.lp = inp.rollout.clone(), inp.old.clone(), inp.lp.clone()
    inp.rollout[0, :3], inp.old[0, :3] = 0.0, -1e-4
    inp.rollout[0, 3:6], inp.old[0, 3:6] = -30.0, -25.0
    inp.lp[0, :6] = inp.old[0, :6] - 0.05  # ratio 0.95: inside the clip range
    kw = options(correction=correction)
    got, ref = check(openrlhf, kw, inp, f"{gating} at the clamp", info=loss_batch_info(inp.mask),
                     same_precision=gating == "binary_kl")
    (loss, *_), grad = run_adapter(kw, inp, info=loss_batch_info(inp.mask))
    assert torch.all(grad[0, :6] != 0)  # kept by the gate: their gradient is not 0


@pytest.mark.parametrize("correction", [None, CORRECTIONS[2]], ids=["plain", "seq-mask-tis"])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_parity_two_ranks(openrlhf, loss_type, token_level_loss, correction):
    """Two data-parallel ranks with the trainer's global normalisers (dp_size 2): each rank matches OpenRLHF,
    and (DeepSpeed averaging the gradients) the mean of the per-rank losses and gradients is OpenRLHF's loss
    and gradient of the whole batch on one rank."""
    seed = 500 + 4 * (loss_type == "gspo") + 2 * token_level_loss + (correction is not None)
    inp = make_case(seed, "ragged", gspo=loss_type == "gspo", correction=correction)
    kw = options(loss_type, token_level_loss, correction=correction)
    info = loss_batch_info(inp.mask, dp_size=2)
    halves = [slice(0, 4), slice(4, B)]  # uneven: 4 and 6 rows, the empty row 1 on rank 0
    ranks = [check(openrlhf, kw, inp, f"rank {r}", rows=rows, info=info)[0] for r, rows in enumerate(halves)]
    (whole_loss, *_), whole_grad = run_openrlhf(openrlhf, kw, inp, info={**info, "dp_size": 1})
    torch.testing.assert_close(sum(r[0][0].double() for r in ranks) / 2, whole_loss.detach(), **LOSS_TOL[torch.float64])
    mean_grad = torch.cat([r[1] for r in ranks]).double() / 2
    torch.testing.assert_close(mean_grad, whole_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_no_valid_token(openrlhf, loss_type, token_level_loss):
    """A micro-batch without a valid token. With the trainer's global normalisers loss and gradient are 0, as
    OpenRLHF's; OpenRLHF's metrics are then 0 / 0 (NaN), the adapter's 0. Without the normalisers OpenRLHF's
    loss is NaN too, the adapter's 0: the documented difference."""
    correction = CORRECTIONS[1]
    inp = make_case(700 + token_level_loss, "empty", gspo=loss_type == "gspo")
    kw = options(loss_type, token_level_loss, correction=correction)
    for info in (dict(dp_size=2, batch_num_tokens=torch.tensor(37.0), global_batch_size=torch.tensor(6.0)), {}):
        (loss, *metrics), grad = run_adapter(kw, inp, info=info)
        (ref_loss, *ref_metrics), ref_grad = run_openrlhf(openrlhf, kw, inp, info=info)
        assert loss.item() == 0 and torch.all(grad == 0)
        if info:
            assert ref_loss.item() == 0 and torch.all(ref_grad == 0)
        else:  # masked_mean: 0 / 0
            assert math.isnan(ref_loss.item()) and torch.isnan(ref_grad).any()
        for name, v, r in zip(METRICS, metrics, ref_metrics):
            assert (v is None) == (r is None), name
            if v is not None and not (name == "is_filter_ratio" and correction[0] == "seq"):
                assert v.item() == 0 and math.isnan(r.item()), (name, v, r)


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_action_mask_none(openrlhf, loss_type):
    """action_mask=None: every token valid. Where OpenRLHF accepts it (PPO, local normalisers) the numbers are
    OpenRLHF's; elsewhere (GSPO, or with loss_batch_info) OpenRLHF fails and the adapter gives what OpenRLHF
    gives for an all-ones mask."""
    inp = make_case(800 + (loss_type == "gspo"), gspo=loss_type == "gspo", correction=CORRECTIONS[0])
    ones = torch.ones(B, T, dtype=torch.bool)
    inp.mask = ones
    for correction in (None, CORRECTIONS[0]):
        kw = options(loss_type, correction=correction)
        if loss_type == "ppo":
            check(openrlhf, kw, inp, f"mask None {correction}", mask=None)
        with pytest.raises((AttributeError, TypeError)):
            run_openrlhf(openrlhf, kw, inp, mask=None, info=loss_batch_info(ones)) if loss_type == "ppo" else \
                run_openrlhf(openrlhf, kw, inp, mask=None)
        got = run_adapter(kw, inp, mask=None, info=loss_batch_info(ones))
        assert_same(got, run_openrlhf(openrlhf, kw, inp, info=loss_batch_info(ones)), f"mask None ~ ones {correction}")


def test_inputs_exercise_every_branch(openrlhf):
    """The inputs clip, dual-clip, have an empty row, and the loss types and levels differ; and the comparison
    catches a result computed with other options: OpenRLHF run with another clip range, without the dual
    clip, at the other level, with the other loss type, without the dp_size factor or without the rollout
    correction does not match the adapter."""
    inp = make_case(918, "ragged", correction=CORRECTIONS[1])
    kw = options()
    got = run_adapter(kw, inp)
    assert 0.05 < got[0][1].item() < 0.9  # clip_ratio
    lp = inp.lp.double()
    dual_capped = (inp.adv < 0) & ((lp - inp.old.double()).exp() > DUAL) & inp.mask
    assert dual_capped.sum() >= 2
    losses = {(t, lvl): run_openrlhf(openrlhf, options(t, lvl), inp)[0][0].item()
              for t in ("ppo", "gspo") for lvl in (True, False)}
    assert len({round(v, 6) for (t, lvl), v in losses.items() if not (t == "gspo" and lvl)}) == 3, losses

    def differs(kw_other, base=kw, **run):
        mine = run_adapter(base, inp, **run)
        with pytest.raises(AssertionError):
            assert_same(mine, run_openrlhf(openrlhf, kw_other, inp, **run), f"expected to differ: {kw_other}")

    differs({**kw, "clip_eps_high": CLIP_LOW})
    differs({**kw, "dual_clip": None})
    differs({**kw, "token_level_loss": False})
    differs({**kw, "policy_loss_type": "gspo"})
    info = loss_batch_info(inp.mask, dp_size=2)
    mine = run_adapter(kw, inp, info=info)
    with pytest.raises(AssertionError):
        assert_same(mine, run_openrlhf(openrlhf, kw, inp, info={**info, "dp_size": 1}), "no dp_size")
    corrected = options(correction=CORRECTIONS[1])
    differs(kw, base=corrected)  # without the correction
    differs(options(correction=CORRECTIONS[0]), base=corrected)  # clip instead of mask


# ----------------------------------------------------------------------------------------------------
# the documented differences


def test_ppo_kl_beyond_clamp_documented_difference(openrlhf):
    """Tokens with |log_probs - old_log_probs| > 20: loss and gradient are OpenRLHF's (both clamp the
    log-ratio of the ratio); ppo_kl is not: the kernel's approx_kl clamps it too, OpenRLHF's does not."""
    inp = make_case(1000)
    inp.old = inp.old.clone()
    inp.old[0, :4] = inp.lp[0, :4] - torch.tensor([25.0, -25.0, 21.0, -30.0])
    inp.mask[0, :4] = True
    got, ref = check(openrlhf, options(), inp, "clamp 20", skip=("ppo_kl",))
    d = (inp.lp.double() - inp.old.double())[inp.mask]
    assert got[0][2].item() == pytest.approx((-d.clamp(-20, 20)).mean().item(), rel=1e-5)
    assert ref[0][2].item() == pytest.approx((-d).mean().item(), rel=1e-9)
    assert abs(got[0][2].item() - ref[0][2].item()) > 1e-3


@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_masked_nan_documented_difference(openrlhf, loss_type, token_level_loss):
    """NaN at masked positions (log-probs, advantages): the adapter's results are bitwise those with finite
    values there; OpenRLHF's loss is NaN ((loss * mask).sum() lets nan * 0 through)."""
    inp = make_case(1100 + token_level_loss, gspo=loss_type == "gspo")
    kw = options(loss_type, token_level_loss)
    (clean, *clean_metrics), clean_grad = run_adapter(kw, inp)
    dirty = SimpleNamespace(**vars(inp))
    dirty.lp, dirty.adv = inp.lp.clone(), inp.adv.clone()
    dirty.lp[~inp.mask], dirty.adv[~inp.mask] = math.nan, math.nan
    (loss, *metrics), grad = run_adapter(kw, dirty)
    assert torch.equal(loss, clean) and torch.equal(grad, clean_grad)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(metrics, clean_metrics))
    assert math.isnan(run_openrlhf(openrlhf, kw, dirty)[0][0].item())


# ----------------------------------------------------------------------------------------------------
# the module itself


def test_signature_is_openrlhfs(openrlhf):
    """The same constructor and forward, parameter by parameter, defaults included."""
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(po.PolicyLoss.__init__) == params(openrlhf.loss.PolicyLoss.__init__)
    assert params(po.PolicyLoss.forward) == params(openrlhf.loss.PolicyLoss.forward)
    assert issubclass(po.PolicyLoss, torch.nn.Module)


BAD_OPTIONS = [
    dict(dual_clip=1.0),
    dict(is_correction_level="sequence"),
    dict(is_correction_mode="drop"),
    dict(is_correction_gating="kl"),
    dict(is_correction_level="seq", is_correction_mode="clip"),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv"),
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=[0.5, 5.0]),
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_refuses_what_openrlhf_refuses(openrlhf, bad):
    with pytest.raises((ValueError, AssertionError)):
        openrlhf.loss.PolicyLoss(**bad)
    with pytest.raises(ValueError):
        po.PolicyLoss(**bad)


def test_errors():
    with pytest.raises(ValueError, match="Invalid policy loss type"):
        po.PolicyLoss(policy_loss_type="grpo")  # OpenRLHF: at forward
    with pytest.raises(ValueError, match="is_correction_threshold"):
        po.PolicyLoss(is_correction_threshold=[0.5])
    with pytest.raises(ValueError, match="clip_low"):
        po.PolicyLoss(clip_eps_low=-0.1)
    inp = make_case(1200)
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        run_adapter(options(correction=CORRECTIONS[0]), inp, with_rollout=False)


def test_return_values_and_no_rollout_needed():
    """Without correction rollout_log_probs is ignored, and vllm_kl / is_filter_ratio are None; the metrics are
    detached 0-dim tensors on the inputs' device; the loss is differentiable."""
    inp = make_case(1300)
    kw = options()
    (loss, *metrics), grad = run_adapter(kw, inp)
    (loss2, *metrics2), grad2 = run_adapter(kw, inp, with_rollout=False)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert metrics[2] is None and metrics[3] is None and metrics2[2] is None
    assert all(m.shape == () and not m.requires_grad for m in metrics[:2])
    with torch.no_grad():
        out = po.PolicyLoss(**kw)(inp.lp, inp.old, inp.adv, action_mask=inp.mask)
    assert len(out) == 5 and not out[0].requires_grad


# ----------------------------------------------------------------------------------------------------
# ValueLoss (the critic): ppo_ext.compat.openrlhf.ValueLoss against OpenRLHF's own ValueLoss


def _value_inputs(seed, b=B, t=T):
    """values, old values (off by N(0, 0.3)), returns (N(0, 1)), a mask with an empty row: float64."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    old = values + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    returns = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[1] = False
    return values, old, returns, mask


def _run_value(module, inputs, dtype, **info):
    values, old, returns, mask = (x.to(dtype) if x.is_floating_point() else x for x in inputs)
    v = values.detach().clone().requires_grad_(True)
    loss = module(v, old, returns, action_mask=mask, **info)
    loss.backward()
    return loss, v.grad


@pytest.mark.parametrize("info", [{}, "global"], ids=["local", "global_normalisers"])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("clip_eps", [None, 0.1, 0.4])
def test_value_loss_parity(openrlhf, clip_eps, token_level_loss, info):
    seed = 40 + int(10 * (clip_eps or 0))
    inputs = _value_inputs(seed)
    if info == "global":  # as loss_utils makes them: float32 tensors, dp_size 2
        mask = inputs[3]
        info = dict(dp_size=2, batch_num_tokens=torch.tensor(float(mask.sum() * 2)),
                    global_batch_size=torch.tensor(float(2 * B)))
    ref_loss, ref_grad = _run_value(openrlhf.loss.ValueLoss(clip_eps, token_level_loss), inputs, torch.float64, **info)
    for dtype in (torch.float32, torch.float64):
        loss, grad = _run_value(po.ValueLoss(clip_eps, token_level_loss), inputs, dtype, **info)
        what = f"clip_eps={clip_eps} token_level_loss={token_level_loss} {info} seed={seed} {dtype}"
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **LOSS_TOL[dtype], msg=lambda m: f"{what}\n{m}")
        torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * 0.01,
                                   msg=lambda m: f"{what}: gradient\n{m}")


def test_value_loss_inputs_clip_some_tokens():
    """The parity inputs clip some tokens and not others (the clip can change the numbers, so the tests can fail)."""
    values, old, returns, mask = _value_inputs(41)
    clipped = (values - old).abs() > 0.1
    larger = (old + (values - old).clamp(-0.1, 0.1) - returns) ** 2 > (values - returns) ** 2
    assert 0 < (clipped & larger & mask).sum() < mask.sum()


def test_value_loss_signature_is_openrlhfs(openrlhf):
    for name in ("__init__", "forward"):
        ours = inspect.signature(getattr(po.ValueLoss, name))
        theirs = inspect.signature(getattr(openrlhf.loss.ValueLoss, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()], name


# ----------------------------------------------------------------------------------------------------
# The actor's KL loss (args.algo.kl.use_loss): compute_approx_kl + aggregate_loss, one kernel call


@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("info", [None, (2, 300.0, 20.0)], ids=["local", "dp2"])
def test_kl_loss(openrlhf, estimator, token_level_loss, info):
    g = torch.Generator().manual_seed(61)
    B, T = 7, 40
    lp = -3 * torch.rand(B, T, generator=g)  # float32: OpenRLHF computes the KL in float32 (.float())
    base = lp + 0.6 * torch.randn(B, T, generator=g)
    base[0, :3] = lp[0, :3] + 4.0  # k3 = e^4 - 5 ~ 50: OpenRLHF's clamp at 10
    base[1, :3] = lp[1, :3] - 15.0  # k1 = 15, k2 = 112: clamped at 10 too
    if estimator == "k3":  # a token of probability 0: k3 is 10 there (OpenRLHF's floor at -10), not NaN
        lp[3, 1] = -torch.inf  # (k2's gradient there is NaN in OpenRLHF, 0 * -inf behind the clamp; 0 here)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[2] = False
    batch_info = {} if info is None else dict(dp_size=info[0], batch_num_tokens=info[1], global_batch_size=info[2])
    theirs_lp = lp.clone().requires_grad_(True)
    kl = openrlhf.utils.compute_approx_kl(theirs_lp, base, kl_estimator=estimator)
    theirs = openrlhf.loss.aggregate_loss(kl, mask, token_level_loss=token_level_loss, **batch_info)
    theirs.backward()
    ours_lp = lp.clone().requires_grad_(True)
    ours = po.kl_loss(ours_lp, base, mask, estimator, token_level_loss=token_level_loss, **batch_info)
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=2e-6, atol=1e-9)


def test_kl_loss_refuses_what_it_does_not_compute():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        po.kl_loss(lp, lp, None, "k4")
    with pytest.raises(NotImplementedError, match="unbiased_gradient"):
        po.kl_loss(lp, lp, None, "k3", unbiased_gradient=True)
