"""ppo_ext.compat.roll against an independent eager implementation of ROLL's loss_func formulas.

The eager code below is written from the seed document (its worked examples: docs/SPEC.md; ROLL's ActorWorker.loss_func:
ratio, clip, clipped_low/high/mean, the seq-level ratio) and from ROLL's published behaviour (its
agg_loss, masked_mean, the dual clip -max(-loss, (1 + 2 pg_clip) A), the metric formulas), in float64
with autograd. As in ROLL, the advantages are 0 at padding; log-probs there are arbitrary (random),
so the seed's all-positions convention is really exercised.
"""

from types import SimpleNamespace

import pytest
import torch

import ppo_ext
from ppo_ext.compat import roll as pr
from helpers import AGG_MODES, counts_by_name, make_inputs

MODES = tuple(m for m in AGG_MODES if m != "token-sum")  # ROLL's agg_loss has every mode but token-sum
B, T = 10, 24
PG_CLIP, CLIP_LOW, CLIP_HIGH = 0.2, 0.2, 0.28
METRIC_TOL = dict(rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# ROLL's formulas, eager, float64


def roll_masked_mean(x, m, dim=None):
    if dim is None:
        return (x * m).sum() / (m.sum() + 1e-8)
    msum = m.sum(dim)
    return torch.where(msum > 0, (x * m).sum(dim) / (msum + 1e-8), torch.zeros_like(msum))


def roll_agg(mat, m, mode, batch_num_tokens=None, global_valid_samples=None, weights=None):
    if batch_num_tokens is None:
        batch_num_tokens = m.sum()
    if global_valid_samples is None:
        global_valid_samples = mat.shape[0]
    if weights is None:
        weights = torch.ones(mat.shape[0], dtype=mat.dtype)
    valid_rows = (m > 0).any(-1).double()
    if mode == "token-mean":
        return (mat * weights.unsqueeze(-1)).sum() / batch_num_tokens  # numerator not masked, as in ROLL
    if mode == "seq-mean-token-sum":
        return ((mat * m).sum(-1) * weights * valid_rows).sum() / (global_valid_samples + 1e-8)
    if mode == "seq-mean-token-mean":
        return (roll_masked_mean(mat, m, dim=-1) * weights * valid_rows).sum() / (global_valid_samples + 1e-8)
    return ((mat * m).sum(-1) * weights * valid_rows).sum() / m.shape[-1]  # seq-mean-token-sum-norm


def eager_roll(lp, old, adv, mask, level, mode, *, clip_low, clip_high, pg_clip, dual, sample_weights=None,
               token_weights=None, batch_num_tokens=None, global_valid_samples=None):
    m = mask.double()
    log_ratio = lp - old
    if level == "token":
        ratio = log_ratio.exp()
    else:
        ratio = roll_masked_mean(log_ratio, m, dim=-1).exp().unsqueeze(-1).expand_as(log_ratio)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.min(surr1, surr2)
    if dual:
        loss = torch.where(adv < 0, -torch.max(-loss, (1 + pg_clip * 2) * adv), loss)
    if token_weights is not None:
        loss = token_weights * loss
    pg_loss = roll_agg(loss, m, mode, batch_num_tokens, global_valid_samples, sample_weights)
    with torch.no_grad():
        clipped_low = (ratio < 1 - clip_low).double()
        clipped_high = (ratio > 1 + clip_high).double()
        clipped = clipped_low + clipped_high
        metrics = {
            "actor/ppo_ratio_high_clipfrac": clipped_high.mean(),
            "actor/ppo_ratio_low_clipfrac": clipped_low.mean(),
            "actor/ppo_ratio_clipfrac": clipped.mean(),
            "actor/clipfrac": roll_agg(torch.lt(surr2, surr1).double(), m, mode),
            "actor/ratio_mean": roll_masked_mean(ratio, m, dim=-1).mean(),
            "actor/ratio_max": torch.max(ratio * m),
            "actor/ratio_min": torch.min(ratio * m + (1 - m) * 1e10),
            "actor/approxkl": roll_agg(0.5 * log_ratio.square() * m, m, mode),
            "actor/policykl": roll_agg(log_ratio * m, m, mode),
        }
    return pg_loss, {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------


def _inputs(seed, b=B, t=T, dual=True):
    inp = make_inputs(b, t, seed=seed, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                      dual_clip=(1 + 2 * PG_CLIP) if dual else None, log_ratio_clamp=None)
    inp.adv = torch.where(inp.mask != 0, inp.adv, torch.zeros_like(inp.adv))  # ROLL's advantages are 0 at padding
    return inp


def _weights(inp, kind, seed):
    g = torch.Generator().manual_seed(seed)
    sample = (0.5 + torch.rand(inp.lp.shape[0], generator=g)) if kind in ("sample", "both") else None
    token = inp.weights if kind in ("token", "both") else None
    return sample, token


def run_adapter(inp, rows=slice(None), sample=None, token=None, **options):
    lp = inp.lp[rows].detach().clone().requires_grad_(True)
    loss, metrics = pr.compute_policy_loss(
        lp, inp.old[rows], inp.adv[rows], inp.mask[rows],
        sample_weights=None if sample is None else sample[rows],
        token_weights=None if token is None else token[rows], **options)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def run_eager(inp, rows=slice(None), sample=None, token=None, *, level, mode, dual, clip_low=CLIP_LOW,
              clip_high=CLIP_HIGH, pg_clip=PG_CLIP, **norm):
    x = inp.f64()
    lp = x.lp[rows].clone().requires_grad_(True)
    loss, metrics = eager_roll(
        lp, x.old[rows], x.adv[rows], inp.mask[rows], level, mode, clip_low=clip_low, clip_high=clip_high,
        pg_clip=pg_clip, dual=dual, sample_weights=None if sample is None else sample[rows].double(),
        token_weights=None if token is None else x.weights[rows], **norm)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def assert_same(got, ref, what, skip=()):
    loss, metrics, grad = got
    ref_loss, ref_metrics, ref_grad = ref
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: loss\n{m}")
    assert tuple(metrics) == pr.METRIC_KEYS
    for k in pr.METRIC_KEYS:
        if k in skip:
            continue
        assert isinstance(metrics[k], float), f"{what}: {k}"
        assert metrics[k] == pytest.approx(ref_metrics[k], **METRIC_TOL), \
            f"{what}: {k} {metrics[k]} != {ref_metrics[k]}"
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item() + 1e-12,
                               msg=lambda m: f"{what}: gradient\n{m}")


def _options(level, mode, dual, use_range=True):
    return dict(pg_clip=PG_CLIP, pg_clip_low=CLIP_LOW, pg_clip_high=CLIP_HIGH, use_pg_clip_range=use_range,
                dual_clip_loss=dual, importance_sampling=level, loss_agg_mode=mode)


# ----------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("variant", ["dual_weighted", "plain"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", ["token", "seq"])
def test_parity(level, mode, variant):
    dual = variant == "dual_weighted"
    seed = 300 + 11 * MODES.index(mode) + 2 * (level == "seq") + dual
    inp = _inputs(seed, dual=dual)
    sample, token = _weights(inp, "both" if dual else "none", seed)
    got = run_adapter(inp, sample=sample, token=token, **_options(level, mode, dual))
    ref = run_eager(inp, sample=sample, token=token, level=level, mode=mode, dual=dual)
    assert_same(got, ref, f"{level} {mode} {variant}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", ["token", "seq"])
def test_parity_with_global_normalisers(level, mode):
    """Two data-parallel ranks with ROLL's batch_num_tokens / global_valid_samples: each rank matches
    ROLL's formulas, and the per-rank losses and gradients add up to the whole batch's."""
    seed = 400 + 11 * MODES.index(mode) + (level == "seq")
    inp = _inputs(seed)
    sample, token = _weights(inp, "both", seed)
    opts = _options(level, mode, True)
    total_tokens = int((inp.mask != 0).sum())
    norm = dict(batch_num_tokens=torch.tensor(total_tokens), global_valid_samples=torch.tensor(B))
    ranks = []
    for rows in (slice(0, 3), slice(3, B)):
        got = run_adapter(inp, rows, sample, token, **opts, **norm)
        ref = run_eager(inp, rows, sample, token, level=level, mode=mode, dual=True,
                        batch_num_tokens=total_tokens, global_valid_samples=B)
        assert_same(got, ref, f"{level} {mode} rank {rows}")
        ranks.append(got)
    whole = run_eager(inp, slice(None), sample, token, level=level, mode=mode, dual=True)
    torch.testing.assert_close(sum(r[0].double() for r in ranks), whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]).double(), whole[2], rtol=1e-5,
                               atol=1e-6 * whole[2].abs().max().item())


def test_inputs_exercise_every_branch():
    """The inputs clip (also in padding), dual-clip and have an empty row, and the comparison catches a
    wrong dual-clip constant, the masked (core) clip fractions, and verl's seq-mean convention."""
    inp = _inputs(5)
    opts = _options("token", "seq-mean-token-mean", True)
    got = run_adapter(inp, **opts)
    out = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                              dual_clip=1 + 2 * PG_CLIP)
    c = counts_by_name(out.counts)
    assert c["dual_clipped"] > 0 and c["clipped_low"] > 0 and c["clipped_high"] > 0
    assert ((inp.mask != 0).sum(-1) == 0).any()
    # the seed's all-positions fraction differs from the core's valid-token fraction
    assert got[1]["actor/ppo_ratio_low_clipfrac"] != pytest.approx(out.metrics["clipfrac_low"].item(), rel=1e-3)
    with pytest.raises(AssertionError):  # dual-clip constant 1 + 2 * pg_clip_high instead of pg_clip
        assert_same(got, run_eager(inp, level="token", mode="seq-mean-token-mean", dual=True, pg_clip=CLIP_HIGH), "c")
    with pytest.raises(AssertionError):  # no dual clip
        assert_same(got, run_eager(inp, level="token", mode="seq-mean-token-mean", dual=False), "no dual")
    # seq-mean over valid rows (verl) instead of all rows (ROLL)
    valid_rows = int(((inp.mask != 0).sum(-1) > 0).sum())
    with pytest.raises(AssertionError):
        assert_same(got, run_eager(inp, level="token", mode="seq-mean-token-mean", dual=True,
                                   global_valid_samples=valid_rows), "verl's seq count")


def test_seed_worked_examples():
    """The seed's worked examples (docs/SPEC.md, "Worked examples")."""
    ratio = torch.tensor([[1.10, 0.95, 1.25, 1.05], [0.75, 1.15, 0.82, 0.99]], dtype=torch.float64)
    lp, old = ratio.log().float(), torch.zeros(2, 4)
    adv, mask = torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool)
    _, m = pr.compute_policy_loss(lp, old, adv, mask, pg_clip=0.2, importance_sampling="token")
    assert m["actor/ppo_ratio_low_clipfrac"] == pytest.approx(1 / 8)
    assert m["actor/ppo_ratio_high_clipfrac"] == pytest.approx(1 / 8)
    assert m["actor/ppo_ratio_clipfrac"] == pytest.approx(0.25)
    lp = torch.tensor([[-0.5, -1.2, -0.8, -2.0], [-1.0, -0.4, -1.5, -0.9]])
    old = torch.tensor([[-0.6, -1.1, -1.1, -2.1], [-1.3, -0.5, -1.4, -0.9]])
    _, m = pr.compute_policy_loss(lp, old, adv, mask, importance_sampling="token", loss_agg_mode="token-mean")
    assert m["actor/ratio_max"] == pytest.approx(1.3499, abs=1e-4)
    assert m["actor/ratio_min"] == pytest.approx(0.9048, abs=1e-4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    _, m = pr.compute_policy_loss(lp, old, adv, mask, importance_sampling="seq")
    assert m["actor/ratio_max"] == pytest.approx(1.1052, abs=1e-4)
    assert m["actor/ratio_min"] == pytest.approx(1.0779, abs=1e-4)
    assert m["actor/ratio_mean"] == pytest.approx((1.1052 + 1.0779) / 2, abs=1e-4)


def test_padding_counts_in_the_seed_fractions_only():
    """A clipped ratio at a padding position counts in actor/ppo_ratio_* (the seed's convention, all
    B*T positions), not in the core's clipfrac, nor in the loss; a sequence-level clip counts T times."""
    lp = torch.zeros(2, 4)
    old = torch.zeros(2, 4)
    old[0, 3] = -1.0  # padding position with ratio e > 1.2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.ones(2, 4) * mask
    loss, m = pr.compute_policy_loss(lp, old, adv, mask, importance_sampling="token", loss_agg_mode="token-mean")
    core = ppo_ext.policy_loss(lp, old, adv, mask)
    assert m["actor/ppo_ratio_high_clipfrac"] == pytest.approx(1 / 8) and core.metrics["clipfrac_high"] == 0
    assert loss.item() == pytest.approx(-1.0)
    old = torch.zeros(2, 4)
    old[1] = -0.5  # row 1 clips at the sequence level: 4 of 8 positions, 4 of 7 valid tokens
    _, m = pr.compute_policy_loss(lp, old, adv, mask, importance_sampling="seq")
    core = ppo_ext.policy_loss(lp, old, adv, mask, importance_sampling="seq")
    assert m["actor/ppo_ratio_high_clipfrac"] == pytest.approx(0.5)
    assert core.metrics["clipfrac_high"].item() == pytest.approx(4 / 7)


def test_no_valid_token():
    lp = torch.randn(3, 5, requires_grad=True)
    loss, m = pr.compute_policy_loss(lp, lp.detach() + 0.5, torch.zeros(3, 5), torch.zeros(3, 5),
                                     loss_agg_mode="token-mean")
    loss.backward()
    assert loss.item() == 0 and torch.all(lp.grad == 0)
    assert m["actor/ratio_max"] == 0 and m["actor/ratio_min"] == 1e10 and m["actor/clipfrac"] == 0
    assert m["actor/ppo_ratio_low_clipfrac"] == 1.0  # every position (all padding) has ratio e^-0.5 < 0.8


def test_options_from_config_and_keywords():
    inp = _inputs(6)
    config = SimpleNamespace(pg_clip=PG_CLIP, pg_clip_low=CLIP_LOW, pg_clip_high=CLIP_HIGH, use_pg_clip_range=True,
                             dual_clip_loss=True, importance_sampling="seq", loss_agg_mode="token-mean")
    from_config = run_adapter(inp, config=config)
    assert_same(from_config, run_eager(inp, level="seq", mode="token-mean", dual=True), "config")
    from_dict = run_adapter(inp, config=vars(config))
    torch.testing.assert_close(from_dict[0], from_config[0], rtol=0, atol=0)
    # keywords override the config; use_pg_clip_range False ignores pg_clip_low/high
    overridden = run_adapter(inp, config=config, use_pg_clip_range=False, importance_sampling="token")
    assert_same(overridden, run_eager(inp, level="token", mode="token-mean", dual=True, clip_low=PG_CLIP,
                                      clip_high=PG_CLIP), "override")
    # ROLL's defaults: pg_clip 0.2, token level, seq-mean-token-mean, no dual clip
    defaults = run_adapter(inp)
    assert_same(defaults, run_eager(inp, level="token", mode="seq-mean-token-mean", dual=False, clip_low=0.2,
                                    clip_high=0.2), "defaults")


def test_errors_and_tensors():
    inp = _inputs(7)
    args = (inp.lp, inp.old, inp.adv, inp.mask)
    with pytest.raises(ValueError, match="importance_sampling"):
        pr.compute_policy_loss(*args, importance_sampling="seq-token")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        pr.compute_policy_loss(*args, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="pg_clip > 0"):
        pr.compute_policy_loss(*args, pg_clip=0.0, dual_clip_loss=True)
    with pytest.raises(ValueError, match="sample_weights"):
        pr.compute_policy_loss(*args, sample_weights=torch.ones(B + 1))
    loss, tensors = pr.compute_policy_loss(*args, return_tensors=True)
    _, floats = pr.compute_policy_loss(*args)
    assert all(isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32 for v in tensors.values())
    assert {k: v.item() for k, v in tensors.items()} == floats
