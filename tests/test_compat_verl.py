"""ppo_ext.compat.verl against verl 0.9.1's own code.

verl's compute_policy_loss_vanilla, compute_policy_loss_gspo and agg_loss are verl's, from the installed
package (verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py, executed from their files
by tests/frameworks.verl with stand-ins for ray, omegaconf, tensordict, transformers and the worker
configs: nothing of verl is copied here). They are called as verl's actor calls them (``ppo_loss`` in
verl/workers/utils/losses.py): keyword arguments, ``response_mask`` as bool, ``loss_agg_mode =
config.loss_agg_mode``, and ``config`` verl's own ActorConfig whose ``global_batch_info`` holds what the
trainer puts there (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor =
config.loss_scale_factor``). verl runs on float64 copies of the inputs with autograd; the adapter on
the float32 inputs with the same config object. Compared: the loss, the gradient and every metric
(verl returns Python floats: the values are compared, and the keys in order).

Without verl 0.9.1 installed the tests that need it skip, saying what to install (PPO_EXT_REQUIRE_FRAMEWORKS=1
makes that a failure); the adapter's own tests (config forms, errors, registry stand-in) run anyway.

Inputs: tests/helpers.make_inputs (a fully masked row, a mask of density 0.8, log-ratios spread so that
the clip, the dual clip and whole-row clips all happen, kept away from the clip boundaries), or the same
values with a ragged (right-padded) mask, or with no valid token at all.
"""

import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import frameworks
from helpers import AGG_MODES, make_inputs
from ppo_ext.compat import verl as pv

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
B, T = 10, 24
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
METRIC_TOL = dict(rel=1e-5, abs=1e-6)
KEYS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
KINDS = ("vanilla", "gspo")
ADAPTER = {"vanilla": pv.compute_policy_loss_vanilla, "gspo": pv.compute_policy_loss_gspo}


@pytest.fixture(scope="module")
def verl():
    return frameworks.load_or_skip(frameworks.verl)


# ----------------------------------------------------------------------------------------------------
# inputs, configs, running both


def _options(kind):
    if kind == "vanilla":
        return dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=CLIP_C, log_ratio_clamp=20.0)
    return dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None, log_ratio_clamp=10.0)


def _near(x, bounds, margin=1e-4):
    return any(bool(((x - b).abs() < margin).any()) for b in bounds)


def _inputs(kind, seed, mask="bernoulli", weights=True, b=B, t=T):
    """make_inputs' values; mask "bernoulli" (make_inputs' own), "ragged" (right padding: lengths from 0 to
    T, row 1 empty, row 0 full) or "empty" (no valid token). With a ragged mask the row means change, so
    draws whose mean log-ratio lies near a boundary are redrawn."""
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


def trainer_info(mask, dp_size=1, as_tensors=False):
    """What verl's trainer puts into global_batch_info for a mini-batch with this (global) mask: the engine's
    batch_num_tokens (all-reduced loss-mask sum, .item()), global_batch_size = ppo_mini_batch_size * n (every
    row of the mini-batch, empty ones too) and the data-parallel size. as_tensors: 0-dim tensors instead."""
    valid = mask != 0
    num_tokens, rows = valid.sum(), torch.tensor(valid.shape[0])
    if not as_tensors:
        num_tokens, rows = int(num_tokens), int(rows)
    return dict(dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=rows)


def verl_config(verl, mode, info=None, loss_scale_factor=None, **fields):
    """verl's ActorConfig for one micro-batch, global_batch_info filled in as verl's ppo_loss does (info None:
    left empty, as for a direct call)."""
    fields = {**dict(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C),
              **fields}
    config = verl.actor_config(loss_agg_mode=mode, loss_scale_factor=loss_scale_factor, **fields)
    if info is not None:
        config.global_batch_info["dp_size"] = info["dp_size"]
        config.global_batch_info["batch_num_tokens"] = info["batch_num_tokens"]
        config.global_batch_info["global_batch_size"] = info["global_batch_size"]
        config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    return config


def _call(fn, inp, config, rows, dtype):
    lp = inp.lp[rows].detach().to(dtype).clone().requires_grad_(True)
    w = None if inp.weights is None else inp.weights[rows].to(dtype)
    loss, metrics = fn(old_log_prob=inp.old[rows].to(dtype), log_prob=lp, advantages=inp.adv[rows].to(dtype),
                       response_mask=inp.mask[rows].to(bool), loss_agg_mode=config.loss_agg_mode, config=config,
                       rollout_is_weights=w)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def run_adapter(kind, inp, config, rows=slice(None)):
    return _call(ADAPTER[kind], inp, config, rows, torch.float32)


def run_verl(verl, kind, inp, config, rows=slice(None)):
    fn = {"vanilla": verl.core_algos.compute_policy_loss_vanilla, "gspo": verl.core_algos.compute_policy_loss_gspo}
    return _call(fn[kind], inp, config, rows, torch.float64)


def assert_same(adapter, ref, what, skip=()):
    loss, metrics, grad = adapter
    ref_loss, ref_metrics, ref_grad = ref
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL, msg=lambda m: f"{what}: loss\n{m}")
    assert list(ref_metrics) == list(KEYS), f"{what}: verl's keys are {list(ref_metrics)}"
    assert list(metrics) == list(ref_metrics), f"{what}: keys {list(metrics)}, verl's {list(ref_metrics)}"
    for k in KEYS:
        assert isinstance(ref_metrics[k], float)
        assert isinstance(metrics[k], float), f"{what}: {k} is {type(metrics[k]).__name__}, verl returns float"
        if k not in skip:
            assert metrics[k] == pytest.approx(ref_metrics[k], **METRIC_TOL), \
                f"{what}: {k} {metrics[k]} != verl's {ref_metrics[k]}"
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * scale + 1e-12,
                               msg=lambda m: f"{what}: gradient\n{m}")


def check(verl, kind, inp, config, what, rows=slice(None), **kw):
    got, ref = run_adapter(kind, inp, config, rows), run_verl(verl, kind, inp, config, rows)
    assert_same(got, ref, what, **kw)
    return got, ref


# ----------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("mask", ["bernoulli", "ragged"])
@pytest.mark.parametrize("weights", [True, False], ids=["is_weights", "no_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_one_rank(verl, kind, mode, weights, mask):
    """One rank: global_batch_info empty (a direct call), then filled as verl's trainer fills it for one rank
    (batch_num_tokens and global_batch_size of the mini-batch, here this micro-batch), then with a constant
    loss_scale_factor."""
    seed = 1000 + 17 * AGG_MODES.index(mode) + 3 * weights + 5 * (mask == "ragged") + (kind == "gspo")
    inp = _inputs(kind, seed, mask, weights)
    check(verl, kind, inp, verl_config(verl, mode), f"{kind} {mode} {mask} no info")
    check(verl, kind, inp, verl_config(verl, mode, trainer_info(inp.mask)), f"{kind} {mode} {mask} trainer info")
    if mode == "seq-mean-token-sum-norm":
        check(verl, kind, inp, verl_config(verl, mode, trainer_info(inp.mask), loss_scale_factor=40),
              f"{kind} {mode} {mask} loss_scale_factor 40")


@pytest.mark.parametrize("as_tensors", [False, True], ids=["int_normalisers", "tensor_normalisers"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_two_ranks(verl, kind, mode, as_tensors):
    """Two data-parallel ranks, global_batch_info holding the global counts: each rank's loss, metrics and
    gradient match verl's, and (FSDP averaging the gradients) the mean of the per-rank losses and gradients
    is verl's loss and gradient of the whole batch on one rank with the same normalisers."""
    seed = 2000 + 17 * AGG_MODES.index(mode) + 5 * as_tensors + (kind == "gspo")
    inp = _inputs(kind, seed, "ragged")
    lsf = 40 if mode == "seq-mean-token-sum-norm" else None
    info = trainer_info(inp.mask, dp_size=2, as_tensors=as_tensors)
    halves = [slice(0, 4), slice(4, B)]  # uneven: 4 and 6 rows, the empty row 1 on rank 0
    per_rank = [check(verl, kind, inp, verl_config(verl, mode, info, lsf), f"{kind} {mode} rank {r}", rows)[0]
                for r, rows in enumerate(halves)]
    whole = run_verl(verl, kind, inp, verl_config(verl, mode, {**info, "dp_size": 1}, lsf))
    torch.testing.assert_close(sum(r[0].double() for r in per_rank) / 2, whole[0], **LOSS_TOL)
    mean_grad = torch.cat([r[2] for r in per_rank]).double() / 2
    torch.testing.assert_close(mean_grad, whole[2], rtol=1e-5, atol=1e-6 * whole[2].abs().max().item())


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_no_valid_token(verl, kind, mode):
    """A micro-batch without a valid token. With the trainer's global normalisers (other ranks have tokens)
    verl's loss, gradient and metrics are all 0, and so are the adapter's. Without them verl divides 0 by 0
    (token-mean, the sequence modes: NaN), where the adapter gives 0: the documented difference."""
    inp = _inputs(kind, 3000 + AGG_MODES.index(mode), "empty")
    info = dict(dp_size=2, batch_num_tokens=37, global_batch_size=8)
    got, _ = check(verl, kind, inp, verl_config(verl, mode, info, 40 if mode.endswith("norm") else None),
                   f"{kind} {mode} empty rank")
    assert got[0].item() == 0 and torch.all(got[2] == 0) and all(v == 0 for v in got[1].values())
    got, ref = run_adapter(kind, inp, verl_config(verl, mode)), run_verl(verl, kind, inp, verl_config(verl, mode))
    assert got[0].item() == 0 and torch.all(got[2] == 0) and all(v == 0 for v in got[1].values())
    assert ref[1] == got[1]  # verl's metrics divide by N + 1e-8: 0 too
    if mode == "token-sum":
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

    def differs(other):
        with pytest.raises(AssertionError):
            assert_same(got, other, "expected to differ")

    differs(run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", clip_ratio_c=1e9)))  # no dual clip
    differs(run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", clip_ratio_high=CLIP_LOW)))
    differs(run_verl(verl, "vanilla", inp, verl_config(verl, "seq-mean-token-mean")))
    info = trainer_info(inp.mask, dp_size=2)
    rank0 = run_adapter("vanilla", inp, verl_config(verl, "token-mean", info), slice(0, 4))
    with pytest.raises(AssertionError):  # forgetting the dp_size factor
        assert_same(rank0, run_verl(verl, "vanilla", inp, verl_config(verl, "token-mean", {**info, "dp_size": 1}),
                                    slice(0, 4)), "no dp_size")
    ginp = _inputs("gspo", 4)
    got = run_adapter("gspo", ginp, verl_config(verl, "token-mean"))
    assert got[1]["actor/pg_clipfrac"] > 0.05
    with pytest.raises(AssertionError):  # GSPO in another mode
        assert_same(got, run_verl(verl, "gspo", ginp, verl_config(verl, "seq-mean-token-mean")), "gspo mode")
    with pytest.raises(AssertionError):  # a token-level ratio is not GSPO's
        assert_same(got, run_verl(verl, "vanilla", ginp, verl_config(verl, "token-mean", clip_ratio_c=1e9)),
                    "token-level ratio")


# ----------------------------------------------------------------------------------------------------
# the clamps and the documented differences


def test_vanilla_log_ratio_clamp_20(verl):
    """Tokens with |log_prob - old_log_prob| > 20: verl clamps the log-ratio (value, gradient 0, ppo_kl)."""
    inp = _inputs("vanilla", 5)
    inp.old = inp.old.clone()
    inp.old[0, :4] = inp.lp[0, :4] - torch.tensor([25.0, -25.0, 21.0, -30.0])
    inp.mask[0, :4] = True
    for mode in ("token-mean", "seq-mean-token-sum"):
        got, _ = check(verl, "vanilla", inp, verl_config(verl, mode), f"clamp 20 {mode}")
    unclamped = verl.torch_functional.masked_mean(-(inp.lp.double() - inp.old.double()), inp.mask).item()
    assert abs(got[1]["actor/ppo_kl"] - unclamped) > 1e-3  # the clamp shows in ppo_kl


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


@pytest.mark.parametrize("where", ["log_probs", "advantages"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_nan_documented_difference(verl, kind, mode, where):
    """NaN at masked positions: the adapter's loss, gradient and metrics are bitwise those of the same batch
    with finite values there. In verl a NaN advantage there makes the gradient NaN (0 * nan in the backward
    of -A * ratio), and a NaN log-prob or advantage makes the loss NaN in the sequence modes (agg_loss
    multiplies by the mask instead of selecting), as does a NaN log-prob in GSPO (its row mean multiplies
    the log-ratios by the mask): the documented difference."""
    inp = _inputs(kind, 8)
    clean = run_adapter(kind, inp, verl_config(verl, mode))
    dirty = SimpleNamespace(**vars(inp))
    dirty.lp, dirty.adv = inp.lp.clone(), inp.adv.clone()
    (dirty.lp if where == "log_probs" else dirty.adv)[~inp.mask] = math.nan
    got, ref = run_adapter(kind, dirty, verl_config(verl, mode)), run_verl(verl, kind, dirty, verl_config(verl, mode))
    assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2]) and got[1] == clean[1]
    assert bool(torch.isnan(ref[2]).any()) == (where == "advantages")
    assert math.isnan(ref[0].item()) == (mode.startswith("seq") or (kind == "gspo" and where == "log_probs"))


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
        for fn in ADAPTER.values():
            with pytest.raises(ValueError, match="global_batch_size is required"):
                fn(*args, mode, _plain_config({"dp_size": 2, "batch_num_tokens": 5}))
    pv.compute_policy_loss_vanilla(*args, "token-sum", _plain_config({"dp_size": 2}))  # needs no global count


def test_errors_are_verls(verl):
    """The adapter refuses what verl refuses, with verl's messages (agg_loss's ValueErrors; verl asserts on
    clip_ratio_c, the adapter raises ValueError with the same words)."""
    inp = _inputs("vanilla", 11)
    bad = [("token-mean", dict(dp_size=2, batch_num_tokens=None, global_batch_size=None), "batch_num_tokens is required"),
           ("seq-mean-token-mean", dict(dp_size=2, batch_num_tokens=5, global_batch_size=None),
            "global_batch_size is required")]
    for kind in KINDS:
        for mode, info, message in bad:
            config = verl_config(verl, mode, info)
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
    names (verl's own "vanilla" and "gspo" untouched), and what it hands out, called as verl's ppo_loss calls
    it, computes verl's numbers."""
    core_algos = verl.core_algos
    monkeypatch.setattr(core_algos, "POLICY_LOSS_REGISTRY", dict(core_algos.POLICY_LOSS_REGISTRY))
    _install_verl_modules(monkeypatch, core_algos)
    assert pv.register() == ("ppo_ext_vanilla", "ppo_ext_gspo")
    assert core_algos.get_policy_loss_fn("ppo_ext_vanilla") is pv.compute_policy_loss_vanilla
    assert core_algos.get_policy_loss_fn("ppo_ext_gspo") is pv.compute_policy_loss_gspo
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla
    assert pv.register("a", "b") == ("a", "b") and core_algos.get_policy_loss_fn("b") is pv.compute_policy_loss_gspo
    for kind, name in (("vanilla", "ppo_ext_vanilla"), ("gspo", "ppo_ext_gspo")):
        inp = _inputs(kind, 13 + (kind == "gspo"))
        config = verl_config(verl, "seq-mean-token-mean", trainer_info(inp.mask))
        got = _call(core_algos.get_policy_loss_fn(name), inp, config, slice(None), torch.float32)
        assert_same(got, run_verl(verl, kind, inp, config), f"registered {name}")


def test_register_into_a_stand_in_registry(monkeypatch):
    """register() where verl is not installed: a stand-in core_algos with verl's register_policy_loss API."""
    registry = {}

    def register_policy_loss(name):
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    _install_verl_modules(monkeypatch, SimpleNamespace(register_policy_loss=register_policy_loss))
    assert pv.register() == ("ppo_ext_vanilla", "ppo_ext_gspo")
    assert registry == {"ppo_ext_vanilla": pv.compute_policy_loss_vanilla, "ppo_ext_gspo": pv.compute_policy_loss_gspo}


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
    assert not any(n == "verl" or n.startswith(("verl.", "omegaconf", "tensordict", "transformers")) for n in sys.modules)
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
