"""ppo_ext.compat.verl against verl 0.9.1's own code.

verl's compute_policy_loss_<mode> (vanilla, gspo, cispo, sapo, gpg, dro, dppo_tv, dppo_kl, geo_mean, kl_cov,
clip_cov; clip_cov's random draw from the default generator, reseeded alike for verl and the adapter) and agg_loss are
verl's, from the installed package (verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py,
executed from their files by tests/frameworks.verl with stand-ins for ray, omegaconf, tensordict,
transformers and the worker configs: nothing of verl is copied here). They are called as verl's actor calls
them (``ppo_loss`` in verl/workers/utils/losses.py): keyword arguments, ``response_mask`` as bool,
``loss_agg_mode = config.loss_agg_mode``, and ``config`` verl's own ActorConfig whose ``global_batch_info``
holds what the trainer puts there (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor = config.loss_scale_factor``). verl runs on float64 copies of the inputs with autograd;
the adapter on the float32 inputs (and, for the parity tests, on float64 copies too) with the same config
object. Compared: the loss, the gradient and every metric (verl returns Python floats: the values are
compared, and the keys in order).

Without verl 0.9.1 installed the tests that need it skip, saying what to install (PPO_EXT_REQUIRE_FRAMEWORKS=1
makes that a failure); the adapter's own tests (config forms, errors, registry stand-in) run anyway.

Inputs: tests/helpers.make_inputs (a fully masked row, a mask of density 0.8, log-ratios spread so that
the clip, the dual clip and whole-row clips all happen, kept away from the clip boundaries), or the same
values with a ragged (right-padded) mask, or with no valid token at all. The dppo modes get log-probs of
their own (``_dppo_inputs``: probabilities in (0, 1), divergences on both sides of every threshold used
here, ratios above the truncations), kept away from every threshold and truncation so that float32 and
float64 take the same keep decisions.
"""

import dataclasses
import functools
import inspect
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import frameworks
import ppo_ext
from helpers import AGG_MODES, make_inputs
from ppo_ext.compat import verl as pv

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
B, T = 10, 24
LOSS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-7, atol=1e-10)}
METRIC_TOL = dict(rel=1e-5, abs=1e-6)  # ppo_ext's metrics are float32
KEYS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
KINDS = ("vanilla", "gspo")
NEW_KINDS = ("cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl")
ALL_KINDS = KINDS + NEW_KINDS
DPPO = ("dppo_tv", "dppo_kl")
# geo_mean (GMPO), kl_cov and clip_cov have tests of their own (geo_mean ignores loss_agg_mode and global_batch_info,
# the *_cov modes select tokens by a batch statistic): registered, not in ALL_KINDS.
REGISTERED_KINDS = ALL_KINDS + ("geo_mean", "kl_cov", "clip_cov", "bypass_mode")
ADAPTER = {kind: getattr(pv, f"compute_policy_loss_{kind}") for kind in REGISTERED_KINDS}
ALL_NAMES = tuple(f"ppo_ext_{kind}" for kind in REGISTERED_KINDS)  # what register() names them
# verl's metric keys, in its order, per mode.
VERL_KEYS = {**dict.fromkeys(ALL_KINDS, KEYS), "gpg": (), "dro": ("actor/ppo_kl",)}
# The options each mode is tested at (ActorConfig fields on top of verl_config's clip ratios): not the
# defaults, so that a swapped tau, a lost beta or threshold, a default truncation shows.
SAPO_TAUS = dict(tau_pos=0.7, tau_neg=1.6)
DRO_BETA = 0.3
DPPO_FIELDS = {"dppo_tv": dict(clip_ratio_low=0.12, clip_ratio_high=0.08, clip_ratio_c=1.6),
               "dppo_kl": dict(clip_ratio_low=0.04, clip_ratio_high=0.02, clip_ratio_c=1.6)}
# Every dppo threshold and truncation any test here uses (the inputs are kept away from all of them).
DPPO_THRESHOLDS = (0.02, 0.04, 0.08, 0.1, 0.12, 0.2)
DPPO_CAPS = (1.6, 3.0, 20.0)


@pytest.fixture(scope="module")
def verl():
    return frameworks.load_or_skip(frameworks.verl)


# ----------------------------------------------------------------------------------------------------
# inputs, configs, running both


def _options(kind):
    if kind == "vanilla":
        return dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=CLIP_C, log_ratio_clamp=20.0)
    if kind == "gspo":
        return dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, log_ratio_clamp=10.0)
    return dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, log_ratio_clamp=20.0)


def _near(x, bounds, margin=1e-4):
    return any(bool(((x - b).abs() < margin).any()) for b in bounds)


def _inputs(kind, seed, mask="bernoulli", weights=True, b=B, t=T):
    """make_inputs' values; mask "bernoulli" (make_inputs' own), "ragged" (right padding: lengths from 0 to
    T, row 1 empty, row 0 full) or "empty" (no valid token). With a ragged mask the row means change, so
    draws whose mean log-ratio lies near a boundary are redrawn. The dppo modes: _dppo_inputs."""
    if kind in DPPO:
        return _dppo_inputs(kind, seed, mask, weights, b, t)
    opts = _options(kind)
    bounds = [math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH), opts["log_ratio_clamp"], -opts["log_ratio_clamp"]]
    for attempt in range(50):
        inp = make_inputs(b, t, seed=seed + 7919 * attempt, weights=weights, **opts)
        if mask == "bernoulli":
            return inp
        if mask == "empty":
            inp.mask = torch.zeros(b, t, dtype=torch.bool)
            return inp
        g = torch.Generator().manual_seed(seed + attempt)
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        lengths[0], lengths[1] = t, 0
        valid = torch.arange(t)[None, :] < lengths[:, None]
        d = inp.lp.double() - inp.old.double()
        dbar = torch.where(valid, d, 0).sum(-1) / valid.sum(-1).clamp(min=1)
        if not _near(dbar[lengths > 0], bounds):
            inp.mask = valid
            return inp
    raise AssertionError("no ragged draw away from the boundaries")


def _divergence(kind, lp, old):
    """The float64 divergence dppo compares with its thresholds (TV: p - p_old; KL: the binary KL), only to
    keep the inputs away from the thresholds."""
    p, p_old = lp.exp(), old.exp()
    if kind == "dppo_tv":
        return p - p_old
    return p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))


def _dppo_inputs(kind, seed, mask="bernoulli", weights=True, b=B, t=T, margin=1e-4):
    """_inputs' mask, advantages and weights with log-probs of actual probabilities: old ~ -U(0.03, 3.53),
    log-ratios a per-row offset in [-0.8, 0.8] plus N(0, 0.6) (so that ratios exceed every truncation used
    here), p capped at 0.995. Tokens within `margin` of a threshold (DPPO_THRESHOLDS, and -those for TV),
    of p = p_old, or of a truncation (DPPO_CAPS) are moved, so that float32 and float64 agree."""
    inp = _inputs("cispo", seed, mask, weights, b, t)
    g = torch.Generator().manual_seed(seed)
    old = -0.03 - 3.5 * torch.rand(b, t, generator=g, dtype=torch.float64)
    offsets = torch.linspace(-0.8, 0.8, b, dtype=torch.float64)[torch.randperm(b, generator=g)]
    lp = (old + offsets[:, None] + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)).clamp(
        max=math.log(0.995))
    bounds = DPPO_THRESHOLDS + tuple(-x for x in DPPO_THRESHOLDS) if kind == "dppo_tv" else DPPO_THRESHOLDS
    for _ in range(100):
        lp32, old32 = lp.float().double(), old.float().double()
        near = torch.zeros_like(lp, dtype=torch.bool)
        for bound in bounds:
            near |= (_divergence(kind, lp32, old32) - bound).abs() < margin
        near |= (lp32 - old32).abs() < margin
        for cap in DPPO_CAPS:
            near |= ((lp32 - old32).exp() / cap - 1).abs() < margin
        if not near.any():
            break
        lp = torch.where(near, lp - 30 * margin, lp)
    else:
        raise AssertionError("could not move the dppo inputs away from the thresholds")
    inp.lp, inp.old = lp.float(), old.float()
    return inp


def trainer_info(mask, dp_size=1, as_tensors=False):
    """What verl's trainer puts into global_batch_info for a mini-batch with this (global) mask: the engine's
    batch_num_tokens (all-reduced loss-mask sum, .item()), global_batch_size = ppo_mini_batch_size * n (every
    row of the mini-batch, empty ones too) and the data-parallel size. as_tensors: 0-dim tensors instead."""
    valid = mask != 0
    num_tokens, rows = valid.sum(), torch.tensor(valid.shape[0])
    if not as_tensors:
        num_tokens, rows = int(num_tokens), int(rows)
    return dict(dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=rows)


def policy_loss_config(verl, **fields):
    """verl's PolicyLossConfig (the type of ActorConfig.policy_loss), e.g. with dro_beta."""
    return type(verl.actor_config().policy_loss)(**fields)


def kind_fields(verl, kind):
    """The ActorConfig fields mode `kind` is tested at, on top of verl_config's clip ratios."""
    if kind == "sapo":
        return dict(SAPO_TAUS)
    if kind == "dro":
        return dict(policy_loss=policy_loss_config(verl, dro_beta=DRO_BETA))
    return dict(DPPO_FIELDS.get(kind, {}))


def verl_config(verl, mode, info=None, loss_scale_factor=None, kind="vanilla", **fields):
    """verl's ActorConfig for one micro-batch, global_batch_info filled in as verl's ppo_loss does (info None:
    left empty, as for a direct call); with the fields mode `kind` is tested at, then `fields`."""
    fields = {**dict(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C),
              **kind_fields(verl, kind), **fields}
    config = verl.actor_config(loss_agg_mode=mode, loss_scale_factor=loss_scale_factor, **fields)
    if info is not None:
        config.global_batch_info["dp_size"] = info["dp_size"]
        config.global_batch_info["batch_num_tokens"] = info["batch_num_tokens"]
        config.global_batch_info["global_batch_size"] = info["global_batch_size"]
        config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    return config


def _call(fn, inp, config, rows, dtype, loss_agg_mode=None):
    lp = inp.lp[rows].detach().to(dtype).clone().requires_grad_(True)
    w = None if inp.weights is None else inp.weights[rows].to(dtype)
    mode = config.loss_agg_mode if loss_agg_mode is None else loss_agg_mode
    loss, metrics = fn(old_log_prob=inp.old[rows].to(dtype), log_prob=lp, advantages=inp.adv[rows].to(dtype),
                       response_mask=inp.mask[rows].to(bool), loss_agg_mode=mode, config=config,
                       rollout_is_weights=w)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def run_adapter(kind, inp, config, rows=slice(None), dtype=torch.float32, loss_agg_mode=None):
    return _call(ADAPTER[kind], inp, config, rows, dtype, loss_agg_mode)


def run_verl(verl, kind, inp, config, rows=slice(None), loss_agg_mode=None):
    return _call(getattr(verl.core_algos, f"compute_policy_loss_{kind}"), inp, config, rows, torch.float64,
                 loss_agg_mode)


def assert_same(adapter, ref, what, skip=(), keys=KEYS):
    """The adapter's (loss, metrics, gradient) against verl's: verl's metric keys are `keys`, in order, and
    the adapter's the same; the tolerance that of the adapter's dtype."""
    loss, metrics, grad = adapter
    ref_loss, ref_metrics, ref_grad = ref
    tol = LOSS_TOL[loss.dtype]
    torch.testing.assert_close(loss.double(), ref_loss, **tol, msg=lambda m: f"{what}: loss\n{m}")
    assert list(ref_metrics) == list(keys), f"{what}: verl's keys are {list(ref_metrics)}"
    assert list(metrics) == list(ref_metrics), f"{what}: keys {list(metrics)}, verl's {list(ref_metrics)}"
    for k in keys:
        assert isinstance(ref_metrics[k], float)
        assert isinstance(metrics[k], float), f"{what}: {k} is {type(metrics[k]).__name__}, verl returns float"
        if k not in skip:
            assert metrics[k] == pytest.approx(ref_metrics[k], **METRIC_TOL), \
                f"{what}: {k} {metrics[k]} != verl's {ref_metrics[k]}"
    assert grad.dtype == loss.dtype
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["rtol"] / 10 * scale + 1e-12,
                               msg=lambda m: f"{what}: gradient\n{m}")


def check(verl, kind, inp, config, what, rows=slice(None), dtype=torch.float32, loss_agg_mode=None, **kw):
    got = run_adapter(kind, inp, config, rows, dtype, loss_agg_mode)
    ref = run_verl(verl, kind, inp, config, rows, loss_agg_mode)
    assert_same(got, ref, what, keys=VERL_KEYS[kind], **kw)
    return got, ref


def differs(got, other, kind="vanilla"):
    """The comparison fails for `other` (verl computing something else)."""
    with pytest.raises(AssertionError):
        assert_same(got, other, "expected to differ", keys=VERL_KEYS[kind])


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


# ----------------------------------------------------------------------------------------------------
# parity


@DTYPES
@pytest.mark.parametrize("mask", ["bernoulli", "ragged"])
@pytest.mark.parametrize("weights", [True, False], ids=["is_weights", "no_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_one_rank(verl, kind, mode, weights, mask, dtype):
    """One rank: global_batch_info empty (a direct call), then filled as verl's trainer fills it for one rank
    (batch_num_tokens and global_batch_size of the mini-batch, here this micro-batch), then with a constant
    loss_scale_factor. The adapter in float32 and in float64 (the float32 values), verl in float64. sapo in
    every mode too: like verl's it aggregates seq-mean-token-mean whatever the mode."""
    seed = 1000 + 17 * AGG_MODES.index(mode) + 3 * weights + 5 * (mask == "ragged") + ALL_KINDS.index(kind)
    inp = _inputs(kind, seed, mask, weights)
    check(verl, kind, inp, verl_config(verl, mode, kind=kind), f"{kind} {mode} {mask} no info", dtype=dtype)
    check(verl, kind, inp, verl_config(verl, mode, trainer_info(inp.mask), kind=kind),
          f"{kind} {mode} {mask} trainer info", dtype=dtype)
    if mode == "seq-mean-token-sum-norm":
        check(verl, kind, inp, verl_config(verl, mode, trainer_info(inp.mask), loss_scale_factor=40, kind=kind),
              f"{kind} {mode} {mask} loss_scale_factor 40", dtype=dtype)


@pytest.mark.parametrize("as_tensors", [False, True], ids=["int_normalisers", "tensor_normalisers"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_parity_two_ranks(verl, kind, mode, as_tensors):
    """Two data-parallel ranks, global_batch_info holding the global counts: each rank's loss, metrics and
    gradient match verl's, and (FSDP averaging the gradients) the mean of the per-rank losses and gradients
    is verl's loss and gradient of the whole batch on one rank with the same normalisers. The dppo modes in
    float64 (their keep decisions), the others in float32."""
    seed = 2000 + 17 * AGG_MODES.index(mode) + 5 * as_tensors + ALL_KINDS.index(kind)
    dtype = torch.float64 if kind in DPPO else torch.float32
    inp = _inputs(kind, seed, "ragged")
    lsf = 40 if mode == "seq-mean-token-sum-norm" else None
    info = trainer_info(inp.mask, dp_size=2, as_tensors=as_tensors)
    halves = [slice(0, 4), slice(4, B)]  # uneven: 4 and 6 rows, the empty row 1 on rank 0
    per_rank = [check(verl, kind, inp, verl_config(verl, mode, info, lsf, kind=kind), f"{kind} {mode} rank {r}",
                      rows, dtype=dtype)[0]
                for r, rows in enumerate(halves)]
    whole = run_verl(verl, kind, inp, verl_config(verl, mode, {**info, "dp_size": 1}, lsf, kind=kind))
    tol = LOSS_TOL[dtype]
    torch.testing.assert_close(sum(r[0].double() for r in per_rank) / 2, whole[0], **tol)
    mean_grad = torch.cat([r[2] for r in per_rank]).double() / 2
    torch.testing.assert_close(mean_grad, whole[2], rtol=tol["rtol"],
                               atol=tol["rtol"] / 10 * whole[2].abs().max().item())


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_no_valid_token(verl, kind, mode):
    """A micro-batch without a valid token. With the trainer's global normalisers (other ranks have tokens)
    verl's loss, gradient and metrics are all 0, and so are the adapter's. Without them verl divides 0 by 0
    (token-mean, the sequence modes, and sapo in every mode: NaN), where the adapter gives 0: the documented
    difference."""
    inp = _inputs(kind, 3000 + AGG_MODES.index(mode), "empty")
    info = dict(dp_size=2, batch_num_tokens=37, global_batch_size=8)
    got, _ = check(verl, kind, inp, verl_config(verl, mode, info, 40 if mode.endswith("norm") else None, kind=kind),
                   f"{kind} {mode} empty rank")
    assert got[0].item() == 0 and torch.all(got[2] == 0) and all(v == 0 for v in got[1].values())
    config = verl_config(verl, mode, kind=kind)
    got, ref = run_adapter(kind, inp, config), run_verl(verl, kind, inp, config)
    assert got[0].item() == 0 and torch.all(got[2] == 0) and all(v == 0 for v in got[1].values())
    assert ref[1] == got[1]  # verl's metrics divide by N + 1e-8: 0 too
    if mode == "token-sum" and kind != "sapo":
        assert ref[0].item() == 0
    else:
        assert math.isnan(ref[0].item())


@pytest.mark.parametrize("kind", KINDS)
def test_config_options(verl, kind):
    """The config fields the functions read, against verl on verl's ActorConfig: its defaults (clip 0.2 both
    ways, clip_ratio_c 3.0), clip_ratio_low/high None (falling back to clip_ratio), another clip_ratio_c."""
    inp = _inputs(kind, 4000 + (kind == "gspo"))
    mode = "token-mean"
    configs = {
        "defaults": verl.actor_config(loss_agg_mode=mode),
        "low/high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.25, clip_ratio_low=None,
                                           clip_ratio_high=None),
        "high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.25, clip_ratio_low=0.1, clip_ratio_high=None),
        "clip_ratio_c 1.7": verl_config(verl, mode, clip_ratio_c=1.7),
    }
    for name, config in configs.items():
        check(verl, kind, inp, config, f"{kind} {name}")


def test_inputs_exercise_every_branch(verl):
    """The parity tests mean something only if the inputs clip, dual-clip, have an empty row and make the modes
    differ (GSPO's too: verl 0.9.1's GSPO honours loss_agg_mode); and the comparison does catch a result
    computed with other options: verl run with another dual clip, clip range, dp_size, mode or ratio does
    not match the adapter."""
    inp = _inputs("vanilla", 3)
    valid = inp.mask != 0
    assert (valid.sum(-1) == 0).sum() == 1 and (valid.sum(-1) > 0).sum() == B - 1
    config = verl_config(verl, "token-mean")
    got = run_adapter("vanilla", inp, config)
    assert got[1]["actor/pg_clipfrac"] > 0.05 and got[1]["actor/pg_clipfrac_lower"] > 0.01
    for kind in KINDS:
        losses = {m: run_verl(verl, kind, inp, verl_config(verl, m))[0].item() for m in AGG_MODES}
        assert len({round(v, 6) for v in losses.values()}) == len(AGG_MODES), (kind, losses)

    differs(got, run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", clip_ratio_c=1e9)))  # no dual clip
    differs(got, run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", clip_ratio_high=CLIP_LOW)))
    differs(got, run_verl(verl, "vanilla", inp, verl_config(verl, "seq-mean-token-mean")))
    info = trainer_info(inp.mask, dp_size=2)
    rank0 = run_adapter("vanilla", inp, verl_config(verl, "token-mean", info), slice(0, 4))
    differs(rank0, run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", {**info, "dp_size": 1}),
                            slice(0, 4)))  # forgetting the dp_size factor
    ginp = _inputs("gspo", 4)
    got = run_adapter("gspo", ginp, verl_config(verl, "token-mean"))
    assert got[1]["actor/pg_clipfrac"] > 0.05
    differs(got, run_verl(verl, "gspo", ginp, verl_config(verl, "seq-mean-token-mean")))  # GSPO in another mode
    # a token-level ratio is not GSPO's
    differs(got, run_verl(verl, "vanilla", ginp, verl_config(verl, "token-mean", clip_ratio_c=1e9)))


# ----------------------------------------------------------------------------------------------------
# the other modes: their options, their branches, their quirks


def test_signatures_are_verls(verl):
    """Every function has the parameters of verl's function of the same name (names, order, kinds,
    defaults), and then the keyword-only return_tensors."""
    for kind in ALL_KINDS:
        ours = list(inspect.signature(ADAPTER[kind]).parameters.values())
        theirs = list(inspect.signature(getattr(verl.core_algos, f"compute_policy_loss_{kind}")).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours[:-1]] == [(p.name, p.kind, p.default) for p in theirs], kind
        assert ours[-1].name == "return_tensors" and ours[-1].kind is inspect.Parameter.KEYWORD_ONLY
        assert ours[-1].default is False


def _sub(inp, keep):
    """The inputs with only the valid tokens where `keep` holds."""
    return SimpleNamespace(**{**vars(inp), "mask": inp.mask & keep})


def test_cispo_branches_and_options(verl):
    """CISPO's inputs clip on both sides, with both signs of the advantage (verl's pg_clipfrac counts both,
    where the PPO-style active fraction would not); verl's defaults, clip ratios None, asymmetric ratios;
    the comparison catches another clip range, another mode, a PPO clip fraction and no stop-gradient."""
    inp = _inputs("cispo", 4100)
    mode = "token-mean"
    config = verl_config(verl, mode, kind="cispo")
    got, ref = check(verl, "cispo", inp, config, "cispo")
    r = (inp.lp.double() - inp.old.double()).exp()
    low, high = r < 1 - CLIP_LOW, r > 1 + CLIP_HIGH
    for side in (low, high):
        for sign in (inp.adv > 0, inp.adv < 0):
            assert int((side & sign & inp.mask).sum()) >= 3
    assert ref[1]["actor/pg_clipfrac"] > 0.15 and ref[1]["actor/pg_clipfrac_lower"] == 0.0
    for name, cfg in {
        "defaults": verl.actor_config(loss_agg_mode=mode),
        "low/high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.25, clip_ratio_low=None,
                                           clip_ratio_high=None),
        "high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.25, clip_ratio_low=0.1, clip_ratio_high=None),
        "wide": verl_config(verl, mode, clip_ratio_low=0.5, clip_ratio_high=0.9),
    }.items():
        check(verl, "cispo", inp, cfg, f"cispo {name}")
    differs(got, run_verl(verl, "cispo", inp, verl_config(verl, mode, clip_ratio_high=CLIP_LOW)), "cispo")
    differs(got, run_verl(verl, "cispo", inp, verl_config(verl, "seq-mean-token-mean")), "cispo")
    vanilla = run_verl(verl, "vanilla", inp, verl_config(verl, mode, clip_ratio_c=1e9))
    assert vanilla[1]["actor/pg_clipfrac"] < ref[1]["actor/pg_clipfrac"] - 0.05  # PPO's fraction is another one
    assert not torch.allclose(vanilla[2], ref[2], rtol=1e-3)  # the gradient through the ratio is another one


def test_sapo_ignores_loss_agg_mode(verl):
    """verl's SAPO aggregates with seq-mean-token-mean whatever loss_agg_mode says (an invalid one too), and so
    does the adapter: bitwise the same result in every mode, verl's in each; while the modes do differ for
    the same per-token loss (cispo's here), and sapo computed in another mode does not match."""
    inp = _inputs("sapo", 4200)
    config = verl_config(verl, "token-mean", kind="sapo")
    base = run_adapter("sapo", inp, config, loss_agg_mode="seq-mean-token-mean")
    for mode in AGG_MODES + ("no-such-mode",):
        got, _ = check(verl, "sapo", inp, config, f"sapo {mode}", loss_agg_mode=mode)
        assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2]) and got[1] == base[1]
    losses = {m: run_verl(verl, "cispo", inp, verl_config(verl, m))[0].item() for m in AGG_MODES}
    assert len({round(v, 6) for v in losses.values()}) == len(AGG_MODES)
    lp = inp.lp.clone().requires_grad_(True)
    honoured = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, loss_type="sapo", log_ratio_clamp=20.0,
                                   token_weights=inp.weights, loss_agg_mode="token-mean", **SAPO_TAUS)
    assert abs(honoured.loss.item() - base[0].item()) > 1e-3


def test_sapo_taus(verl):
    """tau_pos where A > 0, tau_neg elsewhere, read from the config: verl's defaults (1.0, 1.05), the tested
    pair, the pair swapped, equal taus; tokens of both signs, ratios on both sides of 1; the comparison
    catches swapped taus and metrics that are not verl's constant zeros."""
    inp = _inputs("sapo", 4300)
    d = inp.lp.double() - inp.old.double()
    for sign in (inp.adv > 0, inp.adv <= 0):
        for side in (d > 0.1, d < -0.1):
            assert int((sign & side & inp.mask).sum()) >= 5
    mode = "seq-mean-token-mean"
    configs = {
        "defaults": verl.actor_config(loss_agg_mode=mode),
        "tested": verl_config(verl, mode, kind="sapo"),
        "swapped": verl_config(verl, mode, tau_pos=SAPO_TAUS["tau_neg"], tau_neg=SAPO_TAUS["tau_pos"]),
        "equal": verl_config(verl, mode, tau_pos=2.0, tau_neg=2.0),
    }
    results = {name: check(verl, "sapo", inp, cfg, f"sapo {name}") for name, cfg in configs.items()}
    got = results["tested"][0]
    assert got[1]["actor/pg_clipfrac"] == 0.0 and got[1]["actor/pg_clipfrac_lower"] == 0.0
    assert got[1]["actor/ppo_kl"] != 0.0
    differs(got, results["swapped"][1], "sapo")
    differs(got, results["defaults"][1], "sapo")


def test_gpg(verl):
    """GPG: -A * log_prob; no metric (verl returns {}); old_log_prob not read (NaN there changes nothing, in
    verl or the adapter); clip ratios not read; the comparison catches another mode and a missing weight."""
    inp = _inputs("gpg", 4400)
    config = verl_config(verl, "token-mean", kind="gpg")
    got, ref = check(verl, "gpg", inp, config, "gpg")
    assert got[1] == {} and ref[1] == {}
    nan_old = SimpleNamespace(**{**vars(inp), "old": torch.full_like(inp.old, math.nan)})
    got2, _ = check(verl, "gpg", nan_old, config, "gpg, old_log_prob NaN")
    assert torch.equal(got2[0], got[0]) and torch.equal(got2[2], got[2])
    check(verl, "gpg", inp, verl_config(verl, "token-mean", clip_ratio_low=0.9, clip_ratio_high=5.0), "gpg clip")
    differs(got, run_verl(verl, "gpg", inp, verl_config(verl, "seq-mean-token-sum")), "gpg")
    differs(got, run_verl(verl, "gpg", SimpleNamespace(**{**vars(inp), "weights": None}), config), "gpg")


def _dro_config(verl, mode, beta):
    return verl_config(verl, mode, policy_loss=policy_loss_config(verl, dro_beta=beta))


def test_dro_beta(verl):
    """DRO reads config.policy_loss.dro_beta: several values match verl; the penalty shows (another beta does
    not match); the log-ratio is not clamped (tokens with |d| > 20: loss, gradient and actor/ppo_kl as verl's
    unclamped ones); only actor/ppo_kl is reported."""
    inp = _inputs("dro", 4500)
    mode = "token-mean"
    results = {beta: check(verl, "dro", inp, _dro_config(verl, mode, beta), f"dro beta {beta}")
               for beta in (DRO_BETA, 2.0, 1e-3)}
    got = results[DRO_BETA][0]
    assert list(got[1]) == ["actor/ppo_kl"]
    differs(got, results[2.0][1], "dro")
    differs(got, results[1e-3][1], "dro")
    wild = _with_far_log_ratios(inp)
    got, ref = check(verl, "dro", wild, verl_config(verl, mode, kind="dro"), "dro |d| > 20")
    d = wild.lp.double() - wild.old.double()
    unclamped = verl.torch_functional.masked_mean(-d, wild.mask).item()
    assert got[1]["actor/ppo_kl"] == pytest.approx(unclamped, rel=1e-5)
    assert abs(unclamped - verl.torch_functional.masked_mean(-d.clamp(-20, 20), wild.mask).item()) > 1e-2


@pytest.mark.parametrize("beta", [None, 0.0, -0.5], ids=["none", "zero", "negative"])
def test_dro_beta_errors_are_verls(verl, beta):
    """dro_beta None (PolicyLossConfig's default) or <= 0: verl raises ValueError, and so does the adapter,
    with verl's message; a config without policy_loss: verl asserts, the adapter raises ValueError."""
    inp = _inputs("dro", 4600)
    config = verl_config(verl, "token-mean", policy_loss=policy_loss_config(verl, dro_beta=beta))
    message = "policy_loss.dro_beta must be a positive value when using DRO"
    for run in (lambda: run_verl(verl, "dro", inp, config), lambda: run_adapter("dro", inp, config)):
        with pytest.raises(ValueError, match=message):
            run()
    with pytest.raises(ValueError, match="policy_loss"):
        pv.compute_policy_loss_dro(inp.old, inp.lp, inp.adv, inp.mask, "token-mean", _plain_config())


@pytest.mark.parametrize("kind", DPPO)
def test_dppo_branches(verl, kind):
    """The dppo inputs drop tokens on both sides (A > 0 and A <= 0: verl's pg_clipfrac on each half) and keep
    tokens whose ratio exceeds the truncation (pg_clipfrac_lower on each half); for the KL, tokens beyond the
    threshold that are kept because they move away from the advantage's side (p <= p_old for A > 0, p >=
    p_old otherwise). The comparison catches the other divergence, the thresholds swapped, no truncation,
    verl's default truncation, and clip_ratio_c read as 20.0."""
    inp = _dppo_inputs(kind, 4700)
    mode = "token-mean"
    config = verl_config(verl, mode, kind=kind)
    got, ref = check(verl, kind, inp, config, kind, dtype=torch.float64)
    check(verl, kind, inp, config, f"{kind} float32", dtype=torch.float32)
    assert 0.1 < ref[1]["actor/pg_clipfrac"] < 0.9 and ref[1]["actor/pg_clipfrac_lower"] > 0.02
    for name, part in {"A > 0": inp.adv > 0, "A <= 0": inp.adv <= 0}.items():
        half = run_verl(verl, kind, _sub(inp, part), config)[1]
        assert half["actor/pg_clipfrac"] > 0.05 and half["actor/pg_clipfrac_lower"] > 0.01, (name, half)
    fields = DPPO_FIELDS[kind]
    if kind == "dppo_kl":
        kl = _divergence(kind, inp.lp.double(), inp.old.double())
        away = {"A > 0": (inp.adv > 0) & (inp.lp < inp.old) & (kl > fields["clip_ratio_high"]),
                "A <= 0": (inp.adv <= 0) & (inp.lp > inp.old) & (kl > fields["clip_ratio_low"])}
        for name, part in away.items():
            assert int((part & inp.mask).sum()) >= 3, name
            assert run_verl(verl, kind, _sub(inp, part), config)[1]["actor/pg_clipfrac"] == 0.0, name
    other = "dppo_kl" if kind == "dppo_tv" else "dppo_tv"
    differs(got, run_verl(verl, other, inp, config), kind)
    differs(got, run_verl(verl, kind, inp, verl_config(verl, mode, kind=kind, clip_ratio_low=fields["clip_ratio_high"],
                                                       clip_ratio_high=fields["clip_ratio_low"])), kind)
    for cap in (math.inf, CLIP_C, pv.DPPO_CLIP_RATIO_C_DEFAULT):
        differs(got, run_verl(verl, kind, inp, verl_config(verl, mode, kind=kind, clip_ratio_c=cap)), kind)


@pytest.mark.parametrize("kind", DPPO)
def test_dppo_config_options(verl, kind):
    """The dppo thresholds are clip_ratio_low/high (each defaulting to clip_ratio) and the truncation is
    ``config.get("clip_ratio_c", 20.0)``, as verl reads them: on verl's ActorConfig that is its field, 3.0 by
    default (not 20.0: the inputs have kept tokens with ratios between 3 and 20, so the two differ), on a
    DictConfig-like config without the key 20.0; clip_ratio_c inf (no truncation) and 1e9 too."""
    inp = _dppo_inputs(kind, 4800)
    mode = "token-mean"
    assert verl.actor_config().get("clip_ratio_c", 20.0) == 3.0
    configs = {
        "defaults": verl.actor_config(loss_agg_mode=mode),
        "low/high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.1, clip_ratio_low=None,
                                           clip_ratio_high=None),
        "high None": verl.actor_config(loss_agg_mode=mode, clip_ratio=0.2, clip_ratio_low=0.04, clip_ratio_high=None),
        "clip_ratio_c inf": verl_config(verl, mode, kind=kind, clip_ratio_c=math.inf),
        "clip_ratio_c 1e9": verl_config(verl, mode, kind=kind, clip_ratio_c=1e9),
    }
    results = {name: check(verl, kind, inp, cfg, f"{kind} {name}", dtype=torch.float64)
               for name, cfg in configs.items()}
    assert results["defaults"][1][1]["actor/pg_clipfrac_lower"] > 0.01  # kept tokens with r > 3
    assert results["clip_ratio_c inf"][1][1]["actor/pg_clipfrac_lower"] == 0.0
    # a DictConfig-like config (attributes and .get) without clip_ratio_c: verl's default 20.0
    no_c = _GetOnly(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, loss_agg_mode=mode,
                    global_batch_info={})
    got, ref = check(verl, kind, inp, no_c, f"{kind} no clip_ratio_c", dtype=torch.float64)
    differs(got, results["defaults"][1], kind)
    twenty = run_verl(verl, kind, inp, verl.actor_config(loss_agg_mode=mode, clip_ratio_c=20.0))
    assert_same(got, twenty, "clip_ratio_c 20", keys=VERL_KEYS[kind])


def _verl_keeps(verl, kind, lp, old, adv, config, dtype, adapter=False):
    """Which tokens dppo keeps (a non-zero gradient) in verl's function or the adapter's, in `dtype`."""
    fn = ADAPTER[kind] if adapter else getattr(verl.core_algos, f"compute_policy_loss_{kind}")
    x = lp.to(dtype).clone().requires_grad_(True)
    loss, _ = fn(old_log_prob=old.to(dtype), log_prob=x, advantages=adv.to(dtype),
                 response_mask=torch.ones(lp.shape, dtype=torch.bool), loss_agg_mode="token-sum", config=config)
    loss.backward()
    return x.grad != 0


@pytest.mark.parametrize("kind", DPPO)
def test_dppo_keep_decisions_float32(verl, kind):
    """dppo's keep decisions in the inputs' precision. 200,000 random float32 tokens (no margin): the
    adapter's float32 decisions are verl's float32 and float64 ones. 20,000 tokens placed within ~1e-7 of
    the threshold (A > 0): in float64 the adapter decides every one as verl does; in float32 some are decided
    otherwise than verl's float32 (exp/log round differently) and more otherwise than verl's own float64,
    all of them within 1e-5 of the threshold: the documented difference, and why the parity tests keep their
    inputs away from the thresholds."""
    config = verl.actor_config(clip_ratio_low=0.12, clip_ratio_high=0.08, clip_ratio_c=1.6)
    g = torch.Generator().manual_seed(ALL_KINDS.index(kind))
    n = 100_000
    old = -0.03 - 3.5 * torch.rand(2, n, generator=g)
    lp = (old + 0.6 * torch.randn(2, n, generator=g)).clamp(max=math.log(0.995))
    adv = torch.randn(2, n, generator=g)
    ours = _verl_keeps(verl, kind, lp, old, adv, config, torch.float32, adapter=True)
    assert 0.05 < 1 - ours.float().mean().item() < 0.5  # some dropped
    assert torch.equal(ours, _verl_keeps(verl, kind, lp, old, adv, config, torch.float32))
    assert torch.equal(ours, _verl_keeps(verl, kind, lp, old, adv, config, torch.float64))
    # at the threshold: p with divergence(p) = 0.08 (bisection in float64), times 1 + 1e-7 N(0, 1)
    n = 20_000
    old = (-0.2 - 3.3 * torch.rand(1, n, generator=g, dtype=torch.float64)).float().double()  # p_old < 0.82
    low, high = old.exp(), torch.full_like(old, 0.99999)
    for _ in range(60):
        mid = (low + high) / 2
        below = _divergence(kind, mid.log(), old) < 0.08
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    lp = (low * (1 + 1e-7 * torch.randn(1, n, generator=g, dtype=torch.float64))).log().float()
    adv = torch.ones(1, n)
    verl64 = _verl_keeps(verl, kind, lp, old, adv, config, torch.float64)
    assert 0.3 < verl64.float().mean().item() < 0.7  # both sides of the threshold
    assert torch.equal(_verl_keeps(verl, kind, lp, old, adv, config, torch.float64, adapter=True), verl64)
    ours = _verl_keeps(verl, kind, lp, old, adv, config, torch.float32, adapter=True)
    verl32 = _verl_keeps(verl, kind, lp, old, adv, config, torch.float32)
    flips, own_flips = int((ours != verl32).sum()), int((verl32 != verl64).sum())
    assert 0 < flips < own_flips, (flips, own_flips)
    distance = (_divergence(kind, lp.double(), old) - 0.08).abs()
    assert distance[ours != verl32].max().item() < 1e-5 and distance.max().item() < 1e-5


def test_refused_options_documented_difference(verl):
    """Option values ppo_ext refuses: the adapter raises ValueError where verl computes a number (the
    documented difference): taus not finite and > 0, dro_beta NaN or inf, a negative clip ratio, dppo's
    clip_ratio_c <= 0 or NaN. dppo's clip_ratio_c in (0, 1) and inf are taken."""
    bad = [("sapo", dict(tau_pos=0.0)), ("sapo", dict(tau_neg=-1.0)), ("sapo", dict(tau_pos=math.inf)),
           ("dro", dict(policy_loss=policy_loss_config(verl, dro_beta=math.nan))),
           ("dro", dict(policy_loss=policy_loss_config(verl, dro_beta=math.inf))),
           ("cispo", dict(clip_ratio_low=-0.1)), ("dppo_tv", dict(clip_ratio_high=-0.1)),
           ("dppo_kl", dict(clip_ratio_c=0.0)), ("dppo_tv", dict(clip_ratio_c=-1.0)),
           ("dppo_kl", dict(clip_ratio_c=math.nan))]
    for kind, fields in bad:
        config = verl_config(verl, "token-mean", kind=kind, **fields)
        run_verl(verl, kind, _inputs(kind, 4900), config)  # verl computes something
        with pytest.raises(ValueError):
            run_adapter(kind, _inputs(kind, 4900), config)
    for kind in DPPO:
        check(verl, kind, _dppo_inputs(kind, 4901), verl_config(verl, "token-mean", kind=kind, clip_ratio_c=0.5),
              f"{kind} clip_ratio_c 0.5", dtype=torch.float64)


@pytest.mark.parametrize("kind", ["vanilla", "cispo", "sapo", "dppo_tv", "dppo_kl"])
def test_log_ratio_clamp_20(verl, kind):
    """Tokens with |log_prob - old_log_prob| > 20: verl clamps the log-ratio (the ratio, gradient 0 through it,
    ppo_kl) in vanilla, cispo, sapo and dppo; the adapter too. (dro does not clamp: test_dro_beta.)"""
    inp = _with_far_log_ratios(_inputs(kind, 5))
    for mode in ("token-mean", "seq-mean-token-sum"):
        got, _ = check(verl, kind, inp, verl_config(verl, mode, kind=kind), f"clamp 20 {kind} {mode}",
                       dtype=torch.float64 if kind in DPPO else torch.float32)
    unclamped = verl.torch_functional.masked_mean(-(inp.lp.double() - inp.old.double()), inp.mask).item()
    assert abs(got[1]["actor/ppo_kl"] - unclamped) > 1e-3  # the clamp shows in ppo_kl


def _with_far_log_ratios(inp):
    """The inputs with the first four tokens of row 0 valid and log-ratios 25, -25, 21, -30 (log-probs of
    probabilities, for dppo's divergences)."""
    inp = SimpleNamespace(**vars(inp))
    inp.lp, inp.old, inp.mask = inp.lp.clone(), inp.old.clone(), inp.mask.clone()
    inp.lp[0, :4] = torch.tensor([-0.5, -26.0, -0.2, -31.0])
    inp.old[0, :4] = torch.tensor([-25.5, -1.0, -21.2, -1.0])
    inp.mask[0, :4] = True
    return inp


def _verl_nan(kind, mode, where):
    """Where verl 0.9.1 gets NaN from a NaN at the masked positions of `where`: (loss, gradient)."""
    sequence = mode.startswith("seq") or kind == "sapo"  # agg_loss multiplies by the mask (sapo: always seq)
    loss = sequence and not (kind == "gpg" and where == "old_log_probs")  # gpg does not read old_log_prob
    if kind == "gspo" and where in ("log_probs", "old_log_probs"):
        loss = True  # the row mean multiplies the log-ratios by the mask
    # The backward of a product with the masked value gives 0 * nan: the advantage and the weight always; the
    # log-probs where the per-token loss is a coefficient made of them times log_prob (cispo, dro, dppo).
    grad = where in ("advantages", "weights") or kind in ("cispo", "dro", "dppo_tv", "dppo_kl")
    return loss, grad


@pytest.mark.parametrize("where", ["log_probs", "old_log_probs", "advantages", "weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_masked_nan_documented_difference(verl, kind, mode, where):
    """NaN at masked positions: the adapter's loss, gradient and metrics are bitwise those of the same batch
    with finite values there. verl's get NaN as _verl_nan says (asserted exactly, both ways), its metrics
    never (masked_mean selects): the documented difference."""
    inp = _inputs(kind, 8)
    config = verl_config(verl, mode, kind=kind)
    clean = run_adapter(kind, inp, config)
    dirty = SimpleNamespace(**vars(inp))
    attr = {"log_probs": "lp", "old_log_probs": "old", "advantages": "adv", "weights": "weights"}[where]
    setattr(dirty, attr, getattr(inp, attr).clone())
    getattr(dirty, attr)[~inp.mask] = math.nan
    got, ref = run_adapter(kind, dirty, config), run_verl(verl, kind, dirty, config)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2]) and got[1] == clean[1]
    loss_nan, grad_nan = _verl_nan(kind, mode, where)
    assert math.isnan(ref[0].item()) == loss_nan
    assert bool(torch.isnan(ref[2]).any()) == grad_nan
    assert not any(math.isnan(v) for v in ref[1].values())


# ----------------------------------------------------------------------------------------------------
# GSPO's clamp and its documented differences


def test_gspo_clamp_10_from_above(verl):
    """A row whose mean log-ratio exceeds 10: verl clamps the sequence ratio at e^10 (gradient 0).
    actor/ppo_kl is the documented exception: ppo_ext's clamps each token's log-ratio to [-10, 10]."""
    inp = _inputs("gspo", 6)
    inp.old = inp.old.clone()
    inp.old[0] = inp.lp[0] - 12.0
    inp.mask[0] = True
    inp.adv = inp.adv.clone()
    inp.adv[0] = -torch.rand(T) - 0.5  # negative: the unclipped branch, e^10, is in force
    got, ref = check(verl, "gspo", inp, verl_config(verl, "seq-mean-token-mean"), "gspo clamp 10",
                     skip=("actor/ppo_kl",))
    assert torch.all(got[2][0] == 0) and got[0].item() > 100
    d = inp.lp.double() - inp.old.double()
    masked_mean = verl.torch_functional.masked_mean
    assert got[1]["actor/ppo_kl"] == pytest.approx(masked_mean(-d.clamp(-10, 10), inp.mask).item(), rel=1e-5)
    assert ref[1]["actor/ppo_kl"] == pytest.approx(masked_mean(-d, inp.mask).item(), rel=1e-9)
    assert ref[1]["actor/ppo_kl"] < got[1]["actor/ppo_kl"] - 0.1  # row 0's tokens: verl -12, ppo_ext -10


def test_gspo_documented_deviation_below_minus_10(verl):
    """The documented difference: a row whose mean log-ratio is below -10 (ppo_ext clamps at -10, verl does
    not). Loss and gradient differ by less than 4.6e-5 * |A| per token of that row."""
    inp = _inputs("gspo", 7, weights=False)
    inp.old = inp.old.clone()
    inp.old[0] = inp.lp[0] + 12.0
    inp.mask[0] = True
    inp.adv = inp.adv.clone()
    inp.adv[0] = torch.rand(T) + 0.5  # positive: the unclipped branch -A * r is in force
    config = verl_config(verl, "seq-mean-token-mean")
    got, ref = run_adapter("gspo", inp, config), run_verl(verl, "gspo", inp, config)
    assert got[1]["actor/pg_clipfrac"] == pytest.approx(ref[1]["actor/pg_clipfrac"], rel=1e-5)
    bound = math.exp(-10) * inp.adv[0].abs().max().item()
    assert abs(got[0].item() - ref[0].item()) < bound
    assert (got[2].double() - ref[2]).abs().max().item() < bound
    torch.testing.assert_close(got[2][1:].double(), ref[2][1:], rtol=1e-5, atol=1e-7)  # other rows exact


# ----------------------------------------------------------------------------------------------------
# config forms, errors, registry


class _GetOnly:
    """Like omegaconf's DictConfig: attributes and .get."""

    def __init__(self, **kw):
        self._kw = kw

    def __getattr__(self, name):
        try:
            return self.__dict__["_kw"][name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, key, default=None):
        return self._kw.get(key, default)


def _plain_config(info=None, **kw):
    cfg = dict(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C,
               global_batch_info=dict(info or {}))
    cfg.update(kw)
    return cfg


def _plain_fields(kind):
    """kind_fields as plain values (dro's policy_loss a dict)."""
    if kind == "sapo":
        return dict(SAPO_TAUS)
    if kind == "dro":
        return dict(policy_loss=dict(dro_beta=DRO_BETA))
    if kind == "kl_cov":
        return dict(policy_loss=dict(kl_cov_ratio=0.05, ppo_kl_coef=0.1))
    if kind == "clip_cov":
        return dict(policy_loss=dict(clip_cov_ratio=0.05))
    return dict(DPPO_FIELDS.get(kind, {}))


def test_config_forms():
    """The adapter reads a config by attribute or with .get: a dataclass-like namespace, a DictConfig-like
    object and a plain dict give bitwise the same results (verl's own ActorConfig: the parity tests)."""
    inp = _inputs("vanilla", 9)
    ref = run_adapter("vanilla", inp, SimpleNamespace(**_plain_config(), loss_agg_mode="token-mean"))
    forms = [
        _GetOnly(**_plain_config(), loss_agg_mode="token-mean"),
        {**_plain_config(), "loss_agg_mode": "token-mean"},
        dict(clip_ratio=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C, loss_agg_mode="token-mean"),
    ]
    for cfg in forms:
        lp = inp.lp.clone().requires_grad_(True)
        loss, metrics = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean", cfg,
                                                       inp.weights)
        loss.backward()
        assert torch.equal(loss, ref[0]) and torch.equal(lp.grad, ref[2]) and metrics == ref[1]
    # clip_ratio_c missing: verl's default 3.0
    lp = inp.lp.clone().requires_grad_(True)
    loss, _ = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean",
                                             dict(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH),
                                             inp.weights)
    assert torch.equal(loss, ref[0])


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_config_forms_other_modes(kind):
    """The other modes read their fields (clip ratios, tau_pos/tau_neg, policy_loss.dro_beta, clip_ratio_c)
    from a namespace, a DictConfig-like object and a plain dict (policy_loss a dict, or a namespace in a
    dict) with bitwise the same results (verl's own ActorConfig: the parity tests)."""
    inp = _inputs(kind, 9)
    mode = "seq-mean-token-sum"
    fields = {**_plain_config(), **_plain_fields(kind), "loss_agg_mode": mode}
    ref = run_adapter(kind, inp, SimpleNamespace(**fields))
    for cfg in (_GetOnly(**fields), fields,
                {**fields, "policy_loss": SimpleNamespace(**fields.get("policy_loss", {}))}):
        got = run_adapter(kind, inp, cfg, loss_agg_mode=mode)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]) and got[1] == ref[1], type(cfg)


def test_errors():
    inp = _inputs("vanilla", 10)
    args = (inp.old, inp.lp, inp.adv, inp.mask)
    with pytest.raises(ValueError, match="config"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _plain_config(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        pv.compute_policy_loss_vanilla(*args, "sample-mean", _plain_config())
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        pv.compute_policy_loss_gspo(*args, "sample-mean", _plain_config())
    with pytest.raises(TypeError, match="unknown keys"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _plain_config({"num_tokens": 3}))
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _plain_config({"dp_size": 2}))
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        for kind, fn in ADAPTER.items():
            if kind in ("geo_mean", "bypass_mode"):  # geo_mean reads no global_batch_info, as verl's
                continue  # (test_geo_mean_parity); bypass_mode runs verl's helper first (test_bypass_mode_*)
            with pytest.raises(ValueError, match="global_batch_size is required"):
                fn(*args, mode, _plain_config({"dp_size": 2, "batch_num_tokens": 5}, **_plain_fields(kind)))
    pv.compute_policy_loss_vanilla(*args, "token-sum", _plain_config({"dp_size": 2}))  # needs no global count


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_errors_other_modes(kind):
    """The other modes: no config, an unknown mode (sapo: ignored, as in verl, but its seq-mean-token-mean
    still needs global_batch_size with dp_size > 1), unknown global_batch_info keys; dppo's truncation must
    be > 0 (ppo_ext's ratio_cap)."""
    inp = _inputs(kind, 10)
    args = (inp.old, inp.lp, inp.adv, inp.mask)
    fn = ADAPTER[kind]
    config = _plain_config(**_plain_fields(kind))
    with pytest.raises(ValueError, match="needs the actor config"):
        fn(*args, "token-mean", None)
    with pytest.raises(TypeError, match="unknown keys"):
        fn(*args, "token-mean", _plain_config({"num_tokens": 3}, **_plain_fields(kind)))
    if kind == "sapo":
        fn(*args, "sample-mean", config)
        with pytest.raises(ValueError, match="global_batch_size is required"):
            fn(*args, "token-mean", _plain_config({"dp_size": 2, "batch_num_tokens": 5}, **_plain_fields(kind)))
    else:
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            fn(*args, "sample-mean", config)
        with pytest.raises(ValueError, match="batch_num_tokens is required"):
            fn(*args, "token-mean", _plain_config({"dp_size": 2}, **_plain_fields(kind)))
    if kind in DPPO:
        for c in (0.0, -1.0, math.nan):
            with pytest.raises(ValueError, match="clip_ratio_c"):
                fn(*args, "token-mean", _plain_config(**{**_plain_fields(kind), "clip_ratio_c": c}))


def test_errors_are_verls(verl):
    """The adapter refuses what verl refuses, with verl's messages (agg_loss's ValueErrors, in every mode; verl
    asserts on vanilla's clip_ratio_c, the adapter raises ValueError with the same words)."""
    inp = _inputs("vanilla", 11)
    bad = [("token-mean", dict(dp_size=2, batch_num_tokens=None, global_batch_size=None), "batch_num_tokens is required"),
           ("seq-mean-token-mean", dict(dp_size=2, batch_num_tokens=5, global_batch_size=None),
            "global_batch_size is required")]
    for kind in ALL_KINDS:
        for mode, info, message in bad:
            if kind == "sapo":  # seq-mean-token-mean whatever the mode
                message = "global_batch_size is required"
            config = verl_config(verl, mode, info, kind=kind)
            for run in (lambda: run_adapter(kind, inp, config), lambda: run_verl(verl, kind, inp, config)):
                with pytest.raises(ValueError, match=message):
                    run()
    config = verl_config(verl, "token-mean", clip_ratio_c=1.0)
    with pytest.raises(AssertionError, match="clip_ratio_c"):
        run_verl(verl, "vanilla", inp, config)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        run_adapter("vanilla", inp, config)


def test_return_tensors_and_no_valid_token():
    inp = _inputs("vanilla", 12)
    lp = inp.lp.clone().requires_grad_(True)
    loss, metrics = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean", _plain_config(),
                                                   return_tensors=True)
    assert all(isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad for v in metrics.values())
    _, floats = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean", _plain_config())
    assert {k: v.item() for k, v in metrics.items()} == floats


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_return_tensors_other_modes(kind):
    """return_tensors=True: the same keys as 0-dim float32 tensors, no gradient, the values of the floats
    (verl's constant zeros too); gpg's {} either way; the loss bitwise the same."""
    inp = _inputs(kind, 12)
    config = _plain_config(**_plain_fields(kind))
    fn = ADAPTER[kind]
    loss, metrics = fn(inp.old, inp.lp, inp.adv, inp.mask, "token-mean", config, inp.weights, return_tensors=True)
    loss2, floats = fn(inp.old, inp.lp, inp.adv, inp.mask, "token-mean", config, inp.weights)
    assert torch.equal(loss, loss2) and list(metrics) == list(floats) == list(VERL_KEYS[kind])
    assert all(isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32 and not v.requires_grad
               for v in metrics.values())
    assert {k: v.item() for k, v in metrics.items()} == floats


def _install_verl_modules(monkeypatch, core_algos):
    """sys.modules as if `import verl.trainer.ppo.core_algos` gave `core_algos`."""
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.core_algos = core_algos
    trainer = types.ModuleType("verl.trainer")
    trainer.ppo = ppo
    top = types.ModuleType("verl")
    top.trainer = trainer
    for name, module in [("verl", top), ("verl.trainer", trainer), ("verl.trainer.ppo", ppo),
                         ("verl.trainer.ppo.core_algos", core_algos)]:
        monkeypatch.setitem(sys.modules, name, module)


def test_register_into_verls_registry(verl, monkeypatch):
    """register() with verl's own core_algos: its registry hands out the adapter's functions under the new
    names, ppo_ext_<mode> for every mode (verl's own functions untouched), other names where given, and what
    it hands out, called as verl's ppo_loss calls it, computes verl's numbers."""
    core_algos = verl.core_algos
    monkeypatch.setattr(core_algos, "POLICY_LOSS_REGISTRY", dict(core_algos.POLICY_LOSS_REGISTRY))
    _install_verl_modules(monkeypatch, core_algos)
    assert pv.register() == ALL_NAMES
    for kind, name in zip(REGISTERED_KINDS, ALL_NAMES):
        assert core_algos.get_policy_loss_fn(name) is ADAPTER[kind]
        assert core_algos.get_policy_loss_fn(kind) is getattr(core_algos, f"compute_policy_loss_{kind}")
    names = pv.register("a", "b", dppo_kl_name="z")
    dppo_kl = REGISTERED_KINDS.index("dppo_kl")
    assert names == ("a", "b") + ALL_NAMES[2:dppo_kl] + ("z",) + ALL_NAMES[dppo_kl + 1:]
    assert core_algos.get_policy_loss_fn("b") is pv.compute_policy_loss_gspo
    assert core_algos.get_policy_loss_fn("z") is pv.compute_policy_loss_dppo_kl
    # verl's trainer selects bypass mode by verl's name: registered under it, the adapter's replaces verl's
    pv.register(bypass_mode_name="bypass_mode")
    assert core_algos.get_policy_loss_fn("bypass_mode") is pv.compute_policy_loss_bypass_mode
    for kind, name in zip(ALL_KINDS, ALL_NAMES):
        inp = _inputs(kind, 13 + ALL_KINDS.index(kind))
        config = verl_config(verl, "seq-mean-token-mean", trainer_info(inp.mask), kind=kind)
        got = _call(core_algos.get_policy_loss_fn(name), inp, config, slice(None), torch.float64)
        assert_same(got, run_verl(verl, kind, inp, config), f"registered {name}", keys=VERL_KEYS[kind])


def test_register_into_a_stand_in_registry(monkeypatch):
    """register() where verl is not installed: a stand-in core_algos with verl's register_policy_loss API."""
    registry = {}

    def register_policy_loss(name):
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    _install_verl_modules(monkeypatch, SimpleNamespace(register_policy_loss=register_policy_loss))
    assert pv.register() == ALL_NAMES
    assert registry == {name: ADAPTER[kind] for kind, name in zip(REGISTERED_KINDS, ALL_NAMES)}
    assert list(registry) == list(ALL_NAMES)


def test_register_without_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # makes `import verl...` raise ImportError
    with pytest.raises(ImportError, match="pip install verl"):
        pv.register()


# ----------------------------------------------------------------------------------------------------
# tests/frameworks.py itself


def test_frameworks_loader(verl):
    """The loader executes verl's installed files (not a copy), leaves sys.modules as it found it, and its
    stand-ins fail loudly when used; load_functions gives the same function from the same file."""
    assert verl.core_algos.__file__ == str(frameworks.package_dir("verl") / "trainer" / "ppo" / "core_algos.py")
    assert verl.torch_functional.masked_mean.__code__.co_filename.endswith("torch_functional.py")
    assert not any(n == "verl" or n.startswith(("verl.", "omegaconf", "transformers")) for n in sys.modules)
    # no stand-in tensordict left behind (the real one may be imported: frameworks.verl_actor runs on it)
    assert getattr(sys.modules.get("tensordict"), "__file__", "absent") is not None
    with pytest.raises(frameworks.StubUsed, match="group_mean_std"):
        verl.core_algos.group_mean_std(torch.zeros(2), torch.zeros(2))
    fns = frameworks.load_functions("verl.utils.torch_functional", ["masked_sum", "masked_mean"],
                                    {"torch": torch, "Optional": None})
    x, m = torch.randn(4, 5), torch.rand(4, 5) > 0.5
    assert torch.equal(fns["masked_mean"](x, m), verl.torch_functional.masked_mean(x, m))
    with pytest.raises(frameworks.FrameworkMissing, match="no top-level"):
        frameworks.load_functions("verl.utils.torch_functional", ["no_such_function"], {})
    with pytest.raises(frameworks.FrameworkMissing, match="not installed"):
        frameworks.require("no-such-framework-ppo-ext")
    with pytest.raises(frameworks.FrameworkMissing, match="written against 0.0.1"):
        frameworks.require("verl", "0.0.1")
    with pytest.raises(ValueError, match="parent package"):
        with frameworks.stubbed_imports(stubs={"verl.utils.device": {}}):
            pass


# ----------------------------------------------------------------------------------------------------------
# geo_mean (GMPO) and the critic's compute_value_loss, against verl's own functions


def _geo_inputs(seed, mask="bernoulli", adv_shape="B"):
    """make_inputs with GMPO's per-sequence advantages (verl: "we only support sequence level advantage"),
    log-ratios kept away from the log-space clip bounds -CLIP_LOW and CLIP_HIGH."""
    inp = make_inputs(B, T, seed=seed, adv_shape=adv_shape, log_ratio_clamp=None, dual_clip=None,
                      clip_low=1 - math.exp(-CLIP_LOW), clip_high=math.exp(CLIP_HIGH) - 1)
    if adv_shape == "B":
        inp.adv = inp.adv[:, None].expand(B, T)  # verl's advantages are (B, T)
    if mask == "ragged":
        lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
        lengths[0], lengths[1] = T, 0
        inp.mask = torch.arange(T)[None, :] < lengths[:, None]
    return inp


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("mask", ["bernoulli", "ragged"])
@pytest.mark.parametrize("weights", [True, False], ids=["is_weights", "no_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_geo_mean_parity(verl, mode, weights, mask, dp_size):
    """verl's geo_mean ignores loss_agg_mode and global_batch_info (torch.mean over all B rows): so does the
    adapter, in every mode and with dp_size 2; rollout_is_weights enter as verl's per-row geometric mean."""
    inp = _geo_inputs(50 + AGG_MODES.index(mode), mask)
    if not weights:
        inp.weights = None
    config = verl_config(verl, mode, trainer_info(inp.mask, dp_size=dp_size))
    ref = run_verl(verl, "geo_mean", inp, config)
    for dtype in (torch.float32, torch.float64):
        got = run_adapter("geo_mean", inp, config, dtype=dtype)
        assert_same(got, ref, f"geo_mean {mode} {mask} weights={weights} dp={dp_size} {dtype}")


def test_geo_mean_inputs_exercise_the_clip(verl):
    """Some tokens lie outside the log-space clip range on both sides of A (so the clip can change the numbers),
    and the clip changes verl's loss."""
    inp = _geo_inputs(50)
    d, valid, A = inp.lp - inp.old, inp.mask != 0, inp.adv
    assert ((d > CLIP_HIGH) & (A > 0) & valid).any() and ((d < -CLIP_LOW) & (A < 0) & valid).any()
    loss, metrics, _ = run_adapter("geo_mean", inp, verl_config(verl, "token-mean"))
    wide, _, _ = run_adapter("geo_mean", inp, verl_config(verl, "token-mean", clip_ratio_low=5.0, clip_ratio_high=5.0))
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0
    assert loss.item() != wide.item()


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("cliprange", [0.05, 0.5])
def test_value_loss_parity(verl, cliprange, dp_size, mode):
    g = torch.Generator().manual_seed(60 + AGG_MODES.index(mode))
    vpreds = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = vpreds + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    info = trainer_info(mask, dp_size=dp_size) if dp_size > 1 else {}
    kw = dict(cliprange_value=cliprange, loss_agg_mode=mode, **info)

    def run(fn, dtype):
        v = vpreds.to(dtype).clone().requires_grad_(True)
        loss, clipfrac = fn(vpreds=v, returns=returns.to(dtype), values=values.to(dtype), response_mask=mask, **kw)
        loss.backward()
        return loss.detach(), clipfrac, v.grad

    ref_loss, ref_clipfrac, ref_grad = run(verl.core_algos.compute_value_loss, torch.float64)
    assert 0 < ref_clipfrac.item() < 1
    for dtype in (torch.float32, torch.float64):
        loss, clipfrac, grad = run(pv.compute_value_loss, dtype)
        what = f"value loss {mode} dp={dp_size} eps={cliprange} {dtype}"
        torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL[dtype], msg=lambda m: f"{what}\n{m}")
        assert isinstance(clipfrac, torch.Tensor) and clipfrac.shape == ()
        assert clipfrac.item() == pytest.approx(ref_clipfrac.item(), **METRIC_TOL), what
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5 if dtype == torch.float32 else 1e-9,
                                   atol=1e-7, msg=lambda m: f"{what}: gradient\n{m}")


def test_value_loss_signature_is_verls(verl):
    ours = inspect.signature(pv.compute_value_loss)
    theirs = inspect.signature(verl.core_algos.compute_value_loss)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]


# ----------------------------------------------------------------------------------------------------
# kl_cov (KL-Cov): the penalised tokens selected on the device, against verl's topk on the CPU

_CLIPFRAC_KEY = "actor/pg_clipfrac"


def _kl_cov_config(verl, ratio, coef, mode="token-mean", info=None):
    policy_loss = policy_loss_config(verl, loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef)
    return verl_config(verl, mode, info, policy_loss=policy_loss)


def _kl_cov_inputs(seed, b=B, t=T, adv="BT", weights=False):
    inp = _inputs("vanilla", seed, weights=weights, b=b, t=t)
    g = torch.Generator().manual_seed(seed)
    if adv == "BT":  # per-token advantages: distinct covariance terms (ties at the k-th are improbable)
        inp.adv = inp.adv + 0.3 * torch.randn(inp.adv.shape, generator=g, dtype=inp.adv.dtype)
    return inp


@pytest.mark.parametrize("ratio,coef", [(0.0002, 0.1), (0.05, 1.0), (0.3, 0.5)])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_cov(verl, mode, ratio, coef, dtype):
    inp = _kl_cov_inputs(int(ratio * 1e4) + AGG_MODES.index(mode))
    config = _kl_cov_config(verl, ratio, coef, mode)
    got = run_adapter("kl_cov", inp, config, dtype=dtype)
    ref = run_verl(verl, "kl_cov", inp, config)
    assert_same(got, ref, f"kl_cov {mode} {ratio} {coef}", keys=("actor/ppo_kl",))
    # the penalty matters: the same loss without it differs (ratio 0.0002 still penalises one token)
    plain = run_adapter("kl_cov", inp, _kl_cov_config(verl, ratio, 0.0, mode), dtype=dtype)
    assert (plain[2] - got[2]).abs().max() > 1e-6


def test_kl_cov_two_ranks_and_row_advantages(verl):
    """Global normalisers and dp_size (each rank selects among its own tokens, as verl's); (B,) advantages."""
    for rows, seed in ((slice(0, B // 2), 41), (slice(B // 2, B), 42)):
        inp = _kl_cov_inputs(seed)
        config = _kl_cov_config(verl, 0.05, 0.2, "seq-mean-token-mean", trainer_info(inp.mask, dp_size=2))
        assert_same(run_adapter("kl_cov", inp, config, rows), run_verl(verl, "kl_cov", inp, config, rows),
                    f"kl_cov rank {rows}", keys=("actor/ppo_kl",))
    inp = _kl_cov_inputs(43)
    config = _kl_cov_config(verl, 0.05, 0.2)
    got = pv.compute_policy_loss_kl_cov(inp.old, inp.lp, inp.adv[:, 0], inp.mask, "token-mean", config)[0]
    ref = pv.compute_policy_loss_kl_cov(inp.old, inp.lp, inp.adv[:, :1].expand_as(inp.lp), inp.mask,
                                        "token-mean", config)[0]
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_cov_rollout_weights(verl, mode, dtype):
    """verl weights the penalised tokens' whole loss, penalty included: the adapter's second, weighted term."""
    inp = _kl_cov_inputs(60 + AGG_MODES.index(mode), weights=True)
    assert inp.weights is not None
    config = _kl_cov_config(verl, 0.2, 0.5, mode)
    got = run_adapter("kl_cov", inp, config, dtype=dtype)
    assert_same(got, run_verl(verl, "kl_cov", inp, config), f"kl_cov weighted {mode}", keys=("actor/ppo_kl",))
    # the weights reach the penalty: weighting the surrogate alone differs from verl's
    unweighted_penalty = run_adapter("kl_cov", inp, _kl_cov_config(verl, 0.2, 0.0, mode), dtype=dtype)[0] + \
        run_adapter("kl_cov", dataclasses.replace(inp, weights=None), config, dtype=dtype)[0] - \
        run_adapter("kl_cov", dataclasses.replace(inp, weights=None), _kl_cov_config(verl, 0.2, 0.0, mode),
                    dtype=dtype)[0]
    assert (unweighted_penalty - got[0]).abs() > 1e-6


def test_kl_cov_rollout_weights_masked_nan(verl):
    """Masked positions holding NaN (log-probs, weights) leave the weighted kl_cov's loss and gradient finite."""
    inp = _kl_cov_inputs(70, weights=True)
    clean = run_adapter("kl_cov", inp, _kl_cov_config(verl, 0.2, 0.5), dtype=torch.float64)
    masked = ~inp.mask.bool()
    assert masked.any()
    dirty = dataclasses.replace(inp, **{k: getattr(inp, k).masked_fill(masked, float("nan"))
                                        for k in ("lp", "old", "weights")})
    got = run_adapter("kl_cov", dirty, _kl_cov_config(verl, 0.2, 0.5), dtype=torch.float64)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2])


def test_kl_cov_bad_ratio(verl):
    inp = _kl_cov_inputs(44)
    with pytest.raises(ValueError, match="kl_cov_ratio should be larger than 0"):
        pv.compute_policy_loss_kl_cov(inp.old, inp.lp, inp.adv, inp.mask, "token-mean",
                                      _kl_cov_config(verl, 0.0, 0.2))


def test_kl_cov_selection_needs_no_host_synchronisation():
    """The selection is device ops only: a tensor count, a sort, a gather (no .item(), no nonzero)."""
    valid = torch.tensor([[True, True, False, True]])
    adv = torch.tensor([[1.0, -1.0, 5.0, 2.0]])
    lp = torch.tensor([[-1.0, -2.0, -9.0, -0.5]])
    # means over valid tokens: A 2/3, lp -7/6; covariance terms 0.0556, 1.4722, -, 0.8889: the largest is token 1
    selected = pv._largest_covariance_tokens(pv._covariance_terms(adv, lp, valid), valid, 0.34)  # floor(3 * 0.34) = 1
    assert selected.tolist() == [[False, True, False, False]]
    selected = pv._largest_covariance_tokens(pv._covariance_terms(adv, lp, valid), valid, 0.67)  # floor(3 * 0.67) = 2
    assert selected.tolist() == [[False, True, False, True]]
    none = torch.zeros_like(valid)
    assert not pv._largest_covariance_tokens(pv._covariance_terms(adv, lp, none), none, 0.5).any()


# ----------------------------------------------------------------------------------------------------
# clip_cov (Clip-Cov): verl's own random draw (the same generator state removes the same tokens)


def _clip_cov_config(verl, ratio, lb, ub, mode="token-mean", info=None):
    policy_loss = policy_loss_config(verl, loss_mode="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    return verl_config(verl, mode, info, policy_loss=policy_loss)


def _clip_cov_inputs(seed, weights=False):
    inp = _inputs("vanilla", seed, weights=weights)
    g = torch.Generator().manual_seed(seed)
    inp.adv = 3 * inp.adv + torch.randn(inp.adv.shape, generator=g, dtype=inp.adv.dtype)  # covariances beyond lb
    return inp


def _seeded(run, seed):
    torch.manual_seed(seed)  # verl's torch.randperm draws from the default generator
    return run()


@pytest.mark.parametrize("ratio,lb,ub", [(0.0002, 1.0, 5.0), (0.05, 0.5, 5.0), (0.5, 0.2, 2.0)])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip_cov(verl, mode, ratio, lb, ub, dtype):
    inp = _clip_cov_inputs(int(ratio * 1e4) + AGG_MODES.index(mode))
    config = _clip_cov_config(verl, ratio, lb, ub, mode)
    got = _seeded(lambda: run_adapter("clip_cov", inp, config, dtype=dtype), 11)
    ref = _seeded(lambda: run_verl(verl, "clip_cov", inp, config), 11)
    assert_same(got, ref, f"clip_cov {mode} {ratio}", keys=(_CLIPFRAC_KEY, "actor/ppo_kl"))
    assert ref[1][_CLIPFRAC_KEY] > 0  # some tokens were removed
    # another generator state removes other tokens (when the draw has a choice)
    if ratio < 0.5:
        other = _seeded(lambda: run_verl(verl, "clip_cov", inp, config), 12)
        assert not torch.equal(other[2], ref[2])


def test_clip_cov_rollout_weights_and_two_ranks(verl):
    inp = _clip_cov_inputs(51, weights=True)
    config = _clip_cov_config(verl, 0.05, 0.5, 5.0, "seq-mean-token-mean")
    assert_same(_seeded(lambda: run_adapter("clip_cov", inp, config, dtype=torch.float64), 3),
                _seeded(lambda: run_verl(verl, "clip_cov", inp, config), 3), "clip_cov weighted",
                keys=(_CLIPFRAC_KEY, "actor/ppo_kl"))
    for rows, seed in ((slice(0, B // 2), 52), (slice(B // 2, B), 53)):
        inp = _clip_cov_inputs(seed)
        config = _clip_cov_config(verl, 0.05, 0.5, 5.0, "token-mean", trainer_info(inp.mask, dp_size=2))
        assert_same(_seeded(lambda: run_adapter("clip_cov", inp, config, rows), 4),
                    _seeded(lambda: run_verl(verl, "clip_cov", inp, config, rows), 4), f"clip_cov rank {rows}",
                    keys=(_CLIPFRAC_KEY, "actor/ppo_kl"))


def test_clip_cov_no_candidate(verl):
    """Covariance bounds no token reaches: nothing removed, the plain clipped loss (verl's too)."""
    inp = _clip_cov_inputs(54)
    config = _clip_cov_config(verl, 0.05, 1e6, 2e6)
    got = _seeded(lambda: run_adapter("clip_cov", inp, config, dtype=torch.float64), 5)
    assert_same(got, _seeded(lambda: run_verl(verl, "clip_cov", inp, config), 5), "clip_cov none",
                keys=(_CLIPFRAC_KEY, "actor/ppo_kl"))
    assert got[1][_CLIPFRAC_KEY] == 0


# ----------------------------------------------------------------------------------------------------
# bypass_mode: verl's rollout_corr_helper for the weights, the rejection mask and its metrics, the loss on the kernel


@pytest.fixture
def verl_bypass(verl, monkeypatch):
    """verl's own bypass_mode and the adapter both import verl.trainer.ppo.rollout_corr_helper when called: the
    helper verl() loaded (the installed verl's __init__ imports ray)."""
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.rollout_corr_helper", verl.rollout_corr_helper)
    return verl


def _bypass_config(verl, mode="token-mean", info=None, **correction):
    rollout_correction = type(policy_loss_config(verl).rollout_correction)(bypass_mode=True, **correction)
    policy_loss = policy_loss_config(verl, loss_mode="bypass_mode", rollout_correction=rollout_correction)
    return verl_config(verl, mode, info, policy_loss=policy_loss)


# (loss_type, rollout_is, rollout_is_threshold, rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold)
BYPASS_CASES = [
    ("ppo_clip", None, 2.0, False, None, None),
    ("ppo_clip", "token", 2.0, False, "token_k1", "0.5_1.5"),
    ("ppo_clip", "sequence", 2.0, False, "seq_mean_k3,token_k2", "0.05,0.3"),
    ("reinforce", None, 2.0, False, None, None),
    ("reinforce", "token", 1.5, False, None, None),
    ("reinforce", "token", "0.5_1.5", True, "token_k1", "0.6_1.4"),
    ("reinforce", "sequence", 4.0, False, "seq_max_k2", 0.2),
]


@pytest.mark.parametrize("case", BYPASS_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bypass_mode(verl_bypass, case, mode, dtype):
    loss_type, rollout_is, threshold, normalize, rs, rs_threshold = case
    config = _bypass_config(verl_bypass, mode, loss_type=loss_type, rollout_is=rollout_is,
                            rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize, rollout_rs=rs,
                            rollout_rs_threshold=rs_threshold)
    inp = _inputs("vanilla", 80 + BYPASS_CASES.index(case), weights=False)
    ref = run_verl(verl_bypass, "bypass_mode", inp, config)
    got = run_adapter("bypass_mode", inp, config, dtype=dtype)
    keys = list(ref[1])
    pg_keys = [k for k in keys if not k.startswith("rollout_corr/")]
    assert pg_keys == ([_CLIPFRAC_KEY, "actor/ppo_kl", "actor/pg_clipfrac_lower"] if loss_type == "ppo_clip"
                       else ["actor/ppo_kl"])
    # the helper's metrics were computed from the adapter's dtype: compared at that dtype's tolerance below
    skip = [k for k in keys if k.startswith("rollout_corr/")] if dtype == torch.float32 else []
    assert_same(got, ref, f"bypass_mode {case} {mode}", keys=keys, skip=skip)
    for k in skip:
        assert got[1][k] == pytest.approx(ref[1][k], rel=1e-4, abs=1e-5), k
    if rs is not None:  # the rejection mask took effect: some token was rejected
        assert ref[1]["rollout_corr/rollout_rs_masked_fraction"] > 0


def test_bypass_mode_two_ranks_and_errors(verl_bypass):
    for rows, seed in ((slice(0, B // 2), 90), (slice(B // 2, B), 91)):
        inp = _inputs("vanilla", seed, weights=False)
        config = _bypass_config(verl_bypass, "token-mean", trainer_info(inp.mask, dp_size=2), loss_type="reinforce",
                                rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.5_1.5")
        ref = run_verl(verl_bypass, "bypass_mode", inp, config, rows)
        assert_same(run_adapter("bypass_mode", inp, config, rows, dtype=torch.float64), ref, f"bypass rank {rows}",
                    keys=list(ref[1]))
    inp = _inputs("vanilla", 92, weights=False)
    no_correction = verl_config(verl_bypass, "token-mean", policy_loss=policy_loss_config(
        verl_bypass, loss_mode="bypass_mode", rollout_correction=None))
    for run in (run_adapter, functools.partial(run_verl, verl_bypass)):
        with pytest.raises(ValueError, match="rollout_correction config not found"):
            run("bypass_mode", inp, no_correction)
    with pytest.raises(ValueError, match="Invalid loss_type"):
        run_adapter("bypass_mode", inp, _bypass_config(verl_bypass, loss_type="dpo"))
