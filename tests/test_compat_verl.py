"""ppo_ext.compat.verl against verl 0.9's eager code.

The eager side is the copy of verl's code that the benchmarks measure ppo_ext against
(benchmarks/baselines/verl.py: compute_policy_loss_vanilla, compute_policy_loss_gspo, agg_loss with
global_batch_info, the masked_mean of its metrics; where it comes from is in its docstring), run in
float64 with autograd. verl itself is not installed here and not imported.
Every test draws fresh random inputs (tests/helpers.make_inputs: a fully masked row, a mask of density
0.8, log-ratios spread so that the clip, the dual clip and whole-row clips all happen, kept away from
the clip boundaries so that float32 and float64 agree on every comparison).
"""

import contextlib
import math
import os
import sys
import types
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from ppo_ext.compat import verl as pv
from helpers import AGG_MODES, make_inputs

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: benchmarks/
from benchmarks.baselines import verl as verl_eager  # noqa: E402

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
B, T = 10, 24
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
METRIC_TOL = dict(rel=1e-5, abs=1e-6)
KEYS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


# ----------------------------------------------------------------------------------------------------
# verl's code (the benchmarks' copy), eager, float64


def eager_vanilla(old, lp, adv, valid, mode, w=None, info=None, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                  clip_c=CLIP_C, dual=True):
    """verl's compute_policy_loss_vanilla; dual=False (not verl) moves the dual clip to infinity, where it
    never acts."""
    loss, clipfrac, ppo_kl, lower = verl_eager.compute_policy_loss_vanilla(
        old, lp, adv, valid, clip_low, clip_high, clip_c if dual else math.inf, loss_agg_mode=mode,
        rollout_is_weights=w, global_batch_info=info)
    return loss, dict(zip(KEYS, (clipfrac, ppo_kl, lower)))


def eager_gspo(old, lp, adv, valid, mode, w=None, info=None, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
               honour_mode=False):
    """verl's compute_policy_loss_gspo, which aggregates with seq-mean-token-mean whatever the mode;
    honour_mode=True (not verl) makes it aggregate with `mode`."""
    agg_loss = verl_eager.agg_loss

    def agg_loss_in_mode(loss_mat, loss_mask, loss_agg_mode, **normalisers):
        return agg_loss(loss_mat, loss_mask, mode, **normalisers)

    in_mode = mock.patch.object(verl_eager, "agg_loss", agg_loss_in_mode) if honour_mode else contextlib.nullcontext()
    with in_mode:
        loss, clipfrac, ppo_kl, lower = verl_eager.compute_policy_loss_gspo(
            old, lp, adv, valid, clip_low, clip_high, rollout_is_weights=w, global_batch_info=info)
    return loss, dict(zip(KEYS, (clipfrac, ppo_kl, lower)))


EAGER = {"vanilla": eager_vanilla, "gspo": eager_gspo}
ADAPTER = {"vanilla": pv.compute_policy_loss_vanilla, "gspo": pv.compute_policy_loss_gspo}


# ----------------------------------------------------------------------------------------------------
# running both


def _inputs(kind, seed, b=B, t=T, weights=True, **kw):
    if kind == "vanilla":
        return make_inputs(b, t, seed=seed, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=CLIP_C,
                           log_ratio_clamp=20.0, weights=weights, **kw)
    return make_inputs(b, t, seed=seed, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=None,
                       log_ratio_clamp=10.0, weights=weights, **kw)


def _config(info=None, **kw):
    cfg = dict(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C,
               global_batch_info=dict(info or {}))
    cfg.update(kw)
    return cfg


def run_adapter(kind, inp, mode, info=None, rows=slice(None), config=None):
    lp = inp.lp[rows].detach().clone().requires_grad_(True)
    w = None if inp.weights is None else inp.weights[rows]
    loss, metrics = ADAPTER[kind](inp.old[rows], lp, inp.adv[rows], inp.mask[rows], mode,
                                  config if config is not None else _config(info), w)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def run_eager(kind, inp, mode, info=None, rows=slice(None), **kw):
    x = inp.f64()
    lp = x.lp[rows].clone().requires_grad_(True)
    w = None if x.weights is None else x.weights[rows]
    valid = inp.mask[rows] != 0
    loss, metrics = EAGER[kind](x.old[rows], lp, x.adv[rows], valid, mode, w, info, **kw)
    loss.backward()
    return loss.detach(), {k: float(v.detach()) for k, v in metrics.items()}, lp.grad


def assert_same(adapter, eager, what, skip=()):
    loss, metrics, grad = adapter
    ref_loss, ref_metrics, ref_grad = eager
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL, msg=lambda m: f"{what}: loss\n{m}")
    assert list(metrics) == list(KEYS), f"{what}: keys {list(metrics)}"
    for k in KEYS:
        if k in skip:
            continue
        assert isinstance(metrics[k], float), f"{what}: {k} is {type(metrics[k]).__name__}, verl returns float"
        assert metrics[k] == pytest.approx(ref_metrics[k], **METRIC_TOL), \
            f"{what}: {k} {metrics[k]} != {ref_metrics[k]}"
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * scale + 1e-12,
                               msg=lambda m: f"{what}: gradient\n{m}")


def _global_info(inp, dp_size, as_tensors, loss_scale_factor):
    """global_batch_info as verl's trainer fills it: the counts of the whole (global) batch."""
    valid = inp.mask != 0
    n = valid.sum(-1)
    num_tokens, num_seqs = n.sum(), (n > 0).sum()
    if not as_tensors:
        num_tokens, num_seqs = int(num_tokens), int(num_seqs)
    return dict(dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=num_seqs,
                loss_scale_factor=loss_scale_factor)


# ----------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("weights", [True, False], ids=["is_weights", "no_weights"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["vanilla", "gspo"])
def test_parity_dp1(kind, mode, weights):
    """One rank: verl's default (empty global_batch_info), and the same batch described explicitly."""
    seed = 1000 + 17 * AGG_MODES.index(mode) + 3 * weights + (kind == "gspo")
    inp = _inputs(kind, seed, weights=weights)
    assert_same(run_adapter(kind, inp, mode), run_eager(kind, inp, mode), f"{kind} {mode} dp1")
    info = _global_info(inp, 1, as_tensors=False, loss_scale_factor=None)
    explicit = run_adapter(kind, inp, mode, info)
    assert_same(explicit, run_eager(kind, inp, mode, info), f"{kind} {mode} dp1 explicit info")
    torch.testing.assert_close(explicit[0], run_adapter(kind, inp, mode)[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("as_tensors", [True, False], ids=["tensor_normalisers", "int_normalisers"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["vanilla", "gspo"])
def test_parity_dp2(kind, mode, as_tensors):
    """Two data-parallel ranks with verl's global_batch_info: each rank's loss, metrics and gradient
    match verl's formulas, and (FSDP averaging the gradients) the mean of the per-rank losses and
    gradients is the loss and gradient of the whole batch on one rank."""
    seed = 2000 + 17 * AGG_MODES.index(mode) + 5 * as_tensors + (kind == "gspo")
    inp = _inputs(kind, seed)
    halves = [slice(0, 4), slice(4, B)]  # uneven: 4 and 6 rows, the empty row 1 on rank 0
    info = _global_info(inp, 2, as_tensors, loss_scale_factor=40 if mode.endswith("norm") else None)
    per_rank = []
    for rank, rows in enumerate(halves):
        got = run_adapter(kind, inp, mode, info, rows)
        assert_same(got, run_eager(kind, inp, mode, info, rows), f"{kind} {mode} dp2 rank {rank}")
        per_rank.append(got)
    whole_info = dict(loss_scale_factor=40) if mode.endswith("norm") else {}
    whole_loss, _, whole_grad = run_adapter(kind, inp, mode, whole_info)
    eager_loss, _, eager_grad = run_eager(kind, inp, mode, whole_info)
    torch.testing.assert_close(whole_loss.double(), eager_loss, **LOSS_TOL)
    mean_loss = sum(r[0].double() for r in per_rank) / 2
    torch.testing.assert_close(mean_loss, eager_loss, **LOSS_TOL)
    mean_grad = torch.cat([r[2] for r in per_rank]).double() / 2
    torch.testing.assert_close(mean_grad, eager_grad, rtol=1e-5, atol=1e-6 * eager_grad.abs().max().item())
    torch.testing.assert_close(mean_grad, whole_grad.double(), rtol=1e-5, atol=1e-7)


def test_inputs_exercise_every_branch():
    """The parity tests mean something only if the inputs clip, dual-clip, have an empty row and make
    the modes differ; and the comparison does catch a formula that is wrong in any of these."""
    inp = _inputs("vanilla", 3)
    valid = inp.mask != 0
    assert (valid.sum(-1) == 0).sum() == 1 and (valid.sum(-1) > 0).sum() == B - 1
    _, metrics, _ = run_adapter("vanilla", inp, "token-mean")
    assert metrics["actor/pg_clipfrac"] > 0.05 and metrics["actor/pg_clipfrac_lower"] > 0.01
    losses = {m: run_adapter("vanilla", inp, m)[0].item() for m in AGG_MODES}
    assert len({round(v, 6) for v in losses.values()}) == len(AGG_MODES)

    got = run_adapter("vanilla", inp, "token-mean")
    with pytest.raises(AssertionError):  # without the dual clip
        assert_same(got, run_eager("vanilla", inp, "token-mean", dual=False), "no dual clip")
    with pytest.raises(AssertionError):  # another clip range
        assert_same(got, run_eager("vanilla", inp, "token-mean", clip_high=CLIP_LOW), "symmetric clip")
    info = _global_info(inp, 2, True, None)
    got = run_adapter("vanilla", inp, "token-mean", info, slice(0, 4))
    eager_no_dp = run_eager("vanilla", inp, "token-mean", {**info, "dp_size": 1}, slice(0, 4))
    with pytest.raises(AssertionError):  # forgetting the dp_size factor
        assert_same(got, eager_no_dp, "no dp_size")

    ginp = _inputs("gspo", 4)
    got = run_adapter("gspo", ginp, "token-mean")
    assert got[1]["actor/pg_clipfrac"] > 0.05
    with pytest.raises(AssertionError):  # verl's GSPO ignores loss_agg_mode
        assert_same(got, run_eager("gspo", ginp, "token-mean", honour_mode=True), "gspo honouring the mode")
    token_level = run_eager("vanilla", ginp, "seq-mean-token-mean", dual=False)
    with pytest.raises(AssertionError):  # a token-level ratio is not GSPO's
        assert_same(got, token_level, "token-level ratio")


# ----------------------------------------------------------------------------------------------------
# the clamps


def test_vanilla_log_ratio_clamp_20():
    """Tokens with |log_prob - old_log_prob| > 20: verl clamps the log-ratio (value, gradient 0, ppo_kl)."""
    inp = _inputs("vanilla", 5)
    old = inp.old.clone()
    old[0, :4] = inp.lp[0, :4] - torch.tensor([25.0, -25.0, 21.0, -30.0])
    inp.old = old
    inp.mask[0, :4] = True
    for mode in ("token-mean", "seq-mean-token-sum"):
        got, ref = run_adapter("vanilla", inp, mode), run_eager("vanilla", inp, mode)
        assert_same(got, ref, f"clamp 20 {mode}")
    unclamped = verl_eager.masked_mean(-(inp.lp.double() - old.double()), inp.mask != 0).item()
    assert abs(got[1]["actor/ppo_kl"] - unclamped) > 1e-3  # the clamp shows in ppo_kl


def test_gspo_clamp_10_from_above():
    """A row whose mean log-ratio exceeds 10: verl clamps the sequence ratio at e^10 (gradient 0).
    actor/ppo_kl is the documented exception: ppo_ext's clamps each token's log-ratio to [-10, 10]."""
    inp = _inputs("gspo", 6)
    inp.old = inp.old.clone()
    inp.old[0] = inp.lp[0] - 12.0
    inp.mask[0] = True
    inp.adv = inp.adv.clone()
    inp.adv[0] = -torch.rand(T) - 0.5  # negative: the unclipped branch, e^10, is in force
    got, ref = run_adapter("gspo", inp, "seq-mean-token-mean"), run_eager("gspo", inp, "seq-mean-token-mean")
    assert_same(got, ref, "gspo clamp 10", skip=("actor/ppo_kl",))
    assert torch.all(got[2][0] == 0) and got[0].item() > 100
    d = inp.lp.double() - inp.old.double()
    valid = inp.mask != 0
    assert got[1]["actor/ppo_kl"] == pytest.approx(verl_eager.masked_mean(-d.clamp(-10, 10), valid).item(), rel=1e-5)
    assert ref[1]["actor/ppo_kl"] == pytest.approx(verl_eager.masked_mean(-d, valid).item(), rel=1e-9)
    assert ref[1]["actor/ppo_kl"] < got[1]["actor/ppo_kl"] - 0.1  # row 0's tokens: verl -12, ppo_ext -10


def test_gspo_documented_deviation_below_minus_10():
    """The documented difference: a row whose mean log-ratio is below -10 (ppo_ext clamps at -10, verl
    does not). Loss and gradient differ by less than 4.6e-5 * |A| per token of that row."""
    inp = _inputs("gspo", 7, weights=False)
    inp.old = inp.old.clone()
    inp.old[0] = inp.lp[0] + 12.0
    inp.mask[0] = True
    inp.adv = inp.adv.clone()
    inp.adv[0] = torch.rand(T) + 0.5  # positive: the unclipped branch -A * r is in force
    got = run_adapter("gspo", inp, "seq-mean-token-mean")
    ref = run_eager("gspo", inp, "seq-mean-token-mean")
    assert got[1]["actor/pg_clipfrac"] == pytest.approx(ref[1]["actor/pg_clipfrac"], rel=1e-5)
    bound = math.exp(-10) * inp.adv[0].abs().max().item()
    assert abs(got[0].item() - ref[0].item()) < bound
    assert (got[2].double() - ref[2]).abs().max().item() < bound
    torch.testing.assert_close(got[2][1:].double(), ref[2][1:], rtol=1e-5, atol=1e-7)  # other rows exact


# ----------------------------------------------------------------------------------------------------
# config, errors, registry


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


def test_config_forms():
    inp = _inputs("vanilla", 8)
    ref = run_adapter("vanilla", inp, "token-mean", config=_config())
    forms = [
        SimpleNamespace(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C,
                        global_batch_info={}),
        _GetOnly(clip_ratio=0.2, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C,
                 global_batch_info={}),
        dict(clip_ratio=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C),  # low None -> clip_ratio
    ]
    for cfg in forms:
        got = run_adapter("vanilla", inp, "token-mean", config=cfg)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)
    # clip_ratio_c missing: verl's default 3.0; clip_ratio_low/high None: clip_ratio
    sym = run_adapter("vanilla", inp, "token-mean", config=dict(clip_ratio=0.25, clip_ratio_low=None))
    assert_same(sym, run_eager("vanilla", inp, "token-mean", clip_low=0.25, clip_high=0.25, clip_c=3.0), "defaults")
    other_c = run_adapter("vanilla", inp, "token-mean", config=_config(clip_ratio_c=1.7))
    assert_same(other_c, run_eager("vanilla", inp, "token-mean", clip_c=1.7), "clip_ratio_c 1.7")


def test_errors():
    inp = _inputs("vanilla", 9)
    args = (inp.old, inp.lp, inp.adv, inp.mask)
    with pytest.raises(ValueError, match="config"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _config(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        pv.compute_policy_loss_vanilla(*args, "sample-mean", _config())
    with pytest.raises(TypeError, match="unknown keys"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _config({"num_tokens": 3}))
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        pv.compute_policy_loss_vanilla(*args, "token-mean", _config({"dp_size": 2}))
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        with pytest.raises(ValueError, match="global_batch_size is required"):
            pv.compute_policy_loss_vanilla(*args, mode, _config({"dp_size": 2, "batch_num_tokens": 5}))
    with pytest.raises(ValueError, match="global_batch_size is required"):
        pv.compute_policy_loss_gspo(*args, "token-mean", _config({"dp_size": 2, "batch_num_tokens": 5}))
    # token-sum needs no global count
    pv.compute_policy_loss_vanilla(*args, "token-sum", _config({"dp_size": 2}))


def test_return_tensors_and_no_valid_token():
    inp = _inputs("vanilla", 10)
    lp = inp.lp.clone().requires_grad_(True)
    loss, metrics = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean", _config(),
                                                   return_tensors=True)
    assert all(isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad for v in metrics.values())
    _, floats = pv.compute_policy_loss_vanilla(inp.old, lp, inp.adv, inp.mask, "token-mean", _config())
    assert {k: v.item() for k, v in metrics.items()} == floats
    # No valid token in the micro-batch (verl: 0/0): loss 0, gradient 0, metrics 0.
    for fn in (pv.compute_policy_loss_vanilla, pv.compute_policy_loss_gspo):
        lp = inp.lp.clone().requires_grad_(True)
        loss, metrics = fn(inp.old, lp, inp.adv, torch.zeros_like(inp.mask), "token-mean", _config())
        loss.backward()
        assert loss.item() == 0 and torch.all(lp.grad == 0) and all(v == 0 for v in metrics.values())


def test_register_into_a_verl_registry(monkeypatch):
    """register() with a stand-in for verl's core_algos (verl itself is not installed here)."""
    registry = {}

    def register_policy_loss(name):
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.register_policy_loss = register_policy_loss
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.core_algos = core_algos
    trainer = types.ModuleType("verl.trainer")
    trainer.ppo = ppo
    verl = types.ModuleType("verl")
    verl.trainer = trainer
    for name, module in [("verl", verl), ("verl.trainer", trainer), ("verl.trainer.ppo", ppo),
                         ("verl.trainer.ppo.core_algos", core_algos)]:
        monkeypatch.setitem(sys.modules, name, module)
    assert pv.register() == ("ppo_ext_vanilla", "ppo_ext_gspo")
    assert registry == {"ppo_ext_vanilla": pv.compute_policy_loss_vanilla, "ppo_ext_gspo": pv.compute_policy_loss_gspo}
    assert pv.register("a", "b") == ("a", "b") and registry["a"] is pv.compute_policy_loss_vanilla
    # verl calls the registered function with keywords only
    inp = _inputs("gspo", 11)
    loss, metrics = registry["ppo_ext_gspo"](old_log_prob=inp.old, log_prob=inp.lp, advantages=inp.adv,
                                             response_mask=inp.mask, loss_agg_mode="token-mean",
                                             config=_config(), rollout_is_weights=inp.weights)
    assert set(metrics) == set(KEYS) and loss.shape == ()


def test_register_without_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # makes `import verl...` raise ImportError
    with pytest.raises(ImportError, match="pip install verl"):
        pv.register()
