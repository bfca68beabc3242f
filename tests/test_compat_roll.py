"""ppo_ext.compat.roll against ROLL's loss_func and training strategy, written out from ROLL's source.

ROLL publishes no package (``roll`` on PyPI is another project), so tests/frameworks.py cannot load its
code; the reference below is ROLL's own code transcribed statement by statement, in float64 with
autograd, from ROLL at commit 8eb27cc2dc34c4d1310b169d9b86d339004d811a (ROLL_COMMIT):

- ``roll_strategy_normalisers``: ``Strategy._get_batch_num_tokens`` and ``_get_global_valid_samples``
  (strategy.py L355-L431), which the Megatron strategy's ``train_step`` (megatron_strategy.py
  L1259-L1269) and the FSDP2 one (fsdp2_strategy.py L1584-L1588) store in ``data.meta_info`` before
  calling ``loss_func`` on each micro-batch:
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/distributed/strategy/strategy.py#L355-L431
- ``roll_agg_loss``, ``roll_masked_mean``, ``roll_masked_sum``, ``roll_compute_approx_kl``: ``agg_loss``,
  ``masked_mean``, ``masked_sum``, ``compute_approx_kl`` (functionals.py L181-L297):
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/utils/functionals.py#L181-L297
- ``roll_loss_func``: the policy-gradient loss of the RLVR ``ActorWorker.loss_func`` (actor_worker.py
  L64-L100: the token/seq ratio, the clip, the dual clip, ``train_infer_is_weight``, ``weighted_pg_loss``
  with ``sample_weights``), and the metrics of ``ActorWorker.loss_func`` in base_worker.py (L289-L322,
  the keys the adapter returns):
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/pipeline/rlvr/actor_worker.py#L64-L100
  https://github.com/alibaba/ROLL/blob/8eb27cc2dc34c4d1310b169d9b86d339004d811a/roll/pipeline/base_worker.py#L289-L322

The mask is the response mask as ``loss_func`` sees it (ROLL's ``response_mask[:, 1:]``, which the
strategy slices in the same way before counting). As in ROLL, the advantages are 0 at padding; the
log-probs there are random, so the all-positions conventions (``actor/ppo_ratio_*``) are exercised.
"""

from types import SimpleNamespace

import pytest
import torch

import ppo_ext
import ppo_ext.distributed as ppo_dist
from ppo_ext.compat import roll as pr
from helpers import AGG_MODES, counts_by_name, make_inputs

ROLL_COMMIT = "8eb27cc2dc34c4d1310b169d9b86d339004d811a"
MODES = tuple(m for m in AGG_MODES if m != "token-sum")  # ROLL's agg_loss has every mode but token-sum
LEVELS = ("token", "seq")
B, T = 10, 24
PG_CLIP, CLIP_LOW, CLIP_HIGH = 0.2, 0.2, 0.28
METRIC_TOL = dict(rel=1e-5, abs=1e-6)
# The metrics ROLL divides by the strategy's normalisers (base_worker.py L296-L321); the others are local.
NORMALISED_METRICS = ("actor/clipfrac", "actor/approxkl", "actor/policykl")


# ----------------------------------------------------------------------------------------------------
# ROLL, transcribed (float64)


def roll_strategy_normalisers(rank_masks):
    """``meta_info['batch_num_tokens'][key]`` and ``meta_info['global_valid_samples'][key]`` as ROLL's
    strategy computes them for the mask ``key`` (strategy.py L381-L387 and L422-L429): on each data-parallel
    rank ``loss_mask.sum()`` and ``torch.any(loss_mask > 0, dim=-1).to(torch.long).sum()`` over the rank's
    rows (the whole batch of one optimizer step, all its micro-batches), ``dist.all_reduce(SUM)`` over the
    ranks (here: a sum over ``rank_masks``, one mask per rank), and a total of 0 replaced by 1."""
    num = sum(m.sum() for m in rank_masks)  # all_reduce(num, SUM)
    if num.item() == 0:
        num = num.new_tensor(1)
    num_valid = sum(torch.any(m > 0, dim=-1).to(torch.long).sum() for m in rank_masks)  # all_reduce(SUM)
    if num_valid.item() == 0:
        num_valid = num_valid.new_tensor(1)
    return num, num_valid


def roll_masked_mean(tensor, mask, dim=None):
    if dim is not None:
        mask_sum = mask.sum(axis=dim)
        return torch.where(mask_sum > 0, (tensor * mask).sum(axis=dim) / (mask_sum + 1e-8), torch.zeros_like(mask_sum))
    return (tensor * mask).sum() / (mask.sum() + 1e-8)


def roll_masked_sum(tensor, mask, dim=None):
    if dim is not None:
        mask_sum = mask.sum(axis=dim)
        return torch.where(mask_sum > 0, (tensor * mask).sum(axis=dim), torch.zeros_like(mask_sum))
    return (tensor * mask).sum()


def roll_agg_loss(loss_mat, loss_mask, loss_agg_mode, batch_num_tokens=None, global_valid_samples=None,
                  weights=None):
    if batch_num_tokens is None:
        batch_num_tokens = loss_mask.sum()
    if global_valid_samples is None:
        global_valid_samples = loss_mat.size(0)
    ones = lambda: torch.ones(loss_mask.shape[0], device=loss_mask.device)  # noqa: E731
    if loss_agg_mode == "token-mean":
        if weights is None:
            weights = ones()
        loss = (loss_mat * weights.unsqueeze(-1)).sum() / batch_num_tokens
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = roll_masked_sum(loss_mat, loss_mask, dim=-1)
        valid_samples = torch.any(loss_mask > 0, dim=-1).float()
        if weights is None:
            weights = ones()
        loss = (seq_losses * weights * valid_samples).sum() / (global_valid_samples + 1e-8)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_losses = roll_masked_mean(loss_mat, loss_mask, dim=-1)
        valid_samples = torch.any(loss_mask > 0, dim=-1).float()
        if weights is None:
            weights = ones()
        loss = (seq_losses * weights * valid_samples).sum() / (global_valid_samples + 1e-8)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = roll_masked_sum(loss_mat, loss_mask, dim=-1)
        valid_samples = torch.any(loss_mask > 0, dim=-1).float()
        if weights is None:
            weights = ones()
        loss = (seq_losses * weights * valid_samples).sum() / loss_mask.shape[-1]
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


def roll_compute_approx_kl(log_probs, log_probs_base, action_mask=None, kl_penalty="kl"):
    if kl_penalty == "kl":
        log_ratio = log_probs - log_probs_base
    elif kl_penalty == "mse":
        log_ratio = 0.5 * (log_probs - log_probs_base).square()
    elif kl_penalty == "k3":
        kl = log_probs_base - log_probs
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        log_ratio = torch.clamp(kld, min=-10, max=10)
    else:
        raise NotImplementedError
    if action_mask is not None:
        return log_ratio * action_mask
    return log_ratio


def roll_loss_func(log_probs, old_log_probs, advantages, response_mask, cfg, batch_num_tokens,
                   global_valid_samples, sample_weights=None, train_infer_is_weight=None):
    """(pg loss, metrics) of ROLL's loss_func for one micro-batch, with the strategy's normalisers.

    ``cfg``: ROLL's pipeline_config fields. ``sample_weights`` None: ROLL's ``agg_loss`` with no weights
    (``original_pg_loss``; the base worker's ``pg_loss``); given: ``weighted_pg_loss``.
    ``train_infer_is_weight`` given: ``train_infer_correction.is_weight.enabled``."""
    response_mask = response_mask.long()
    final_response_mask = response_mask
    approxkl = roll_compute_approx_kl(log_probs, old_log_probs, action_mask=response_mask, kl_penalty="mse")
    policykl = roll_compute_approx_kl(log_probs, old_log_probs, action_mask=response_mask, kl_penalty="kl")

    if cfg.importance_sampling == "token":
        ratio = (log_probs - old_log_probs).exp()
    elif cfg.importance_sampling == "seq":
        log_ratio = log_probs - old_log_probs
        masked_log_ratio = roll_masked_mean(log_ratio, final_response_mask, dim=-1)
        ratio = masked_log_ratio.exp().unsqueeze(-1).expand_as(log_ratio)

    pg_clip_low = cfg.pg_clip_low if cfg.use_pg_clip_range else cfg.pg_clip
    pg_clip_high = cfg.pg_clip_high if cfg.use_pg_clip_range else cfg.pg_clip
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - pg_clip_low, 1 + pg_clip_high) * advantages
    loss = -torch.min(surr1, surr2)
    if cfg.dual_clip_loss:
        dual_clip_loss = -torch.max(-loss, (1 + cfg.pg_clip * 2) * advantages)
        loss = torch.where(advantages < 0, dual_clip_loss, loss)
    if train_infer_is_weight is not None:
        loss = loss * train_infer_is_weight
    pg_loss = roll_agg_loss(loss_mat=loss, loss_mask=final_response_mask, loss_agg_mode=cfg.loss_agg_mode,
                            weights=sample_weights, batch_num_tokens=batch_num_tokens,
                            global_valid_samples=global_valid_samples)

    with torch.no_grad():
        clipped_low = (ratio < 1 - pg_clip_low).float()
        clipped_high = (ratio > 1 + pg_clip_high).float()
        clipped = (clipped_low + clipped_high).float()
        metrics = {
            "actor/ppo_ratio_high_clipfrac": clipped_high.mean(),
            "actor/ppo_ratio_low_clipfrac": clipped_low.mean(),
            "actor/ppo_ratio_clipfrac": clipped.mean(),
            "actor/ratio_mean": roll_masked_mean(ratio, response_mask, dim=-1).mean(),
            "actor/ratio_max": torch.max(ratio * response_mask),
            "actor/ratio_min": torch.min(ratio * response_mask + (1 - response_mask) * 1e10),
            "actor/clipfrac": roll_agg_loss(loss_mat=torch.lt(surr2, surr1).float(), loss_mask=response_mask,
                                            loss_agg_mode=cfg.loss_agg_mode, batch_num_tokens=batch_num_tokens,
                                            global_valid_samples=global_valid_samples),
            "actor/approxkl": roll_agg_loss(loss_mat=approxkl, loss_mask=response_mask,
                                            loss_agg_mode=cfg.loss_agg_mode, batch_num_tokens=batch_num_tokens,
                                            global_valid_samples=global_valid_samples),
            "actor/policykl": roll_agg_loss(loss_mat=policykl, loss_mask=response_mask,
                                            loss_agg_mode=cfg.loss_agg_mode, batch_num_tokens=batch_num_tokens,
                                            global_valid_samples=global_valid_samples),
        }
    return pg_loss, {k: v.item() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------


def _inputs(seed, b=B, t=T, dual=True, empty=(1,)):
    """Random ragged inputs (density 0.8) with the rows ``empty`` fully masked, advantages 0 at padding."""
    inp = make_inputs(b, t, seed=seed, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                      dual_clip=(1 + 2 * PG_CLIP) if dual else None, log_ratio_clamp=None, empty_row=False)
    for i in empty:
        inp.mask[i] = False
    inp.adv = torch.where(inp.mask != 0, inp.adv, torch.zeros_like(inp.adv))  # ROLL's advantages are 0 at padding
    return inp


def _weights(inp, kind, seed):
    g = torch.Generator().manual_seed(seed)
    sample = (0.5 + torch.rand(inp.lp.shape[0], generator=g)) if kind in ("sample", "both") else None
    token = inp.weights if kind in ("token", "both") else None
    return sample, token


def _config(level="token", mode="seq-mean-token-mean", dual=False, use_range=True, pg_clip=PG_CLIP,
            clip_low=CLIP_LOW, clip_high=CLIP_HIGH):
    return SimpleNamespace(pg_clip=pg_clip, pg_clip_low=clip_low, pg_clip_high=clip_high,
                           use_pg_clip_range=use_range, dual_clip_loss=dual, importance_sampling=level,
                           loss_agg_mode=mode)


def run_adapter(inp, rows=slice(None), sample=None, token=None, **options):
    lp = inp.lp[rows].detach().clone().requires_grad_(True)
    loss, metrics = pr.compute_policy_loss(
        lp, inp.old[rows], inp.adv[rows], inp.mask[rows],
        sample_weights=None if sample is None else sample[rows],
        token_weights=None if token is None else token[rows], **options)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def run_roll(inp, cfg, rows=slice(None), sample=None, token=None, normalisers=None):
    """ROLL's loss_func on the rows ``rows`` (float64), with ``normalisers`` = (batch_num_tokens,
    global_valid_samples) from roll_strategy_normalisers; None: the strategy's counts of these rows alone
    (one rank holding the whole batch)."""
    x = inp.f64()
    mask = inp.mask[rows]
    if normalisers is None:
        normalisers = roll_strategy_normalisers([mask])
    lp = x.lp[rows].clone().requires_grad_(True)
    loss, metrics = roll_loss_func(
        lp, x.old[rows], x.adv[rows], mask, cfg, *normalisers,
        sample_weights=None if sample is None else sample[rows].double(),
        train_infer_is_weight=None if token is None else x.weights[rows])
    loss.backward()
    return loss.detach(), metrics, lp.grad


def assert_same(got, ref, what, keys=pr.METRIC_KEYS):
    loss, metrics, grad = got
    ref_loss, ref_metrics, ref_grad = ref
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: loss\n{m}")
    assert tuple(metrics) == tuple(keys)
    for k in keys:
        assert isinstance(metrics[k], float), f"{what}: {k}"
        assert metrics[k] == pytest.approx(ref_metrics[k], **METRIC_TOL), \
            f"{what}: {k} {metrics[k]} != ROLL's {ref_metrics[k]}"
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item() + 1e-12,
                               msg=lambda m: f"{what}: gradient\n{m}")


def _options(cfg):
    return dict(vars(cfg))


# ----------------------------------------------------------------------------------------------------
# parity, one rank: the adapter's default normalisers are what ROLL's strategy computes from the batch


@pytest.mark.parametrize("variant", ["dual_weighted", "plain"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_parity(level, mode, variant):
    """Ragged masks, one empty row of 10: loss, gradient and every metric key."""
    dual = variant == "dual_weighted"
    seed = 300 + 11 * MODES.index(mode) + 2 * (level == "seq") + dual
    inp = _inputs(seed, dual=dual)
    sample, token = _weights(inp, "both" if dual else "none", seed)
    cfg = _config(level, mode, dual)
    assert_same(run_adapter(inp, sample=sample, token=token, **_options(cfg)),
                run_roll(inp, cfg, sample=sample, token=token), f"{level} {mode} {variant}")


@pytest.mark.parametrize("weights", ["none", "sample", "token", "both"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_empty_rows(level, mode, weights):
    """2 of 6 rows without a valid token (the issue's case): ROLL's strategy counts 4 valid samples, so
    the seq-mean modes divide by 4 (all 6 rows would be 1.5x off), in the loss, the gradient and
    actor/clipfrac, actor/approxkl, actor/policykl."""
    seed = 500 + 11 * MODES.index(mode) + 3 * (level == "seq") + ("none", "sample", "token", "both").index(weights)
    inp = _inputs(seed, b=6, t=16, empty=(1, 4))
    assert int(roll_strategy_normalisers([inp.mask])[1]) == 4
    sample, token = _weights(inp, weights, seed)
    cfg = _config(level, mode, dual=True)
    assert_same(run_adapter(inp, sample=sample, token=token, **_options(cfg)),
                run_roll(inp, cfg, sample=sample, token=token), f"{level} {mode} {weights}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_all_masked(level, mode):
    """No valid token: ROLL's strategy passes 1 for both counts; loss and gradient 0, every metric ROLL's
    (ratio_max 0, ratio_min 1e10, the all-positions fractions of the padding's ratios)."""
    inp = _inputs(600 + MODES.index(mode) + 5 * (level == "seq"), b=4, t=8, empty=range(4))
    assert not inp.mask.any() and not inp.adv.any()
    sample, token = _weights(inp, "both", 6)
    cfg = _config(level, mode, dual=True)
    got = run_adapter(inp, sample=sample, token=token, **_options(cfg))
    assert_same(got, run_roll(inp, cfg, sample=sample, token=token), f"{level} {mode} all masked")
    assert got[0].item() == 0 and torch.all(got[2] == 0)


# ----------------------------------------------------------------------------------------------------
# data parallel: two ranks, the strategy's global normalisers


SPLITS = {"halves": (slice(0, 3), slice(3, 6)), "rank0_only_empty_rows": (slice(0, 1), slice(1, 6))}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_data_parallel_two_ranks(level, mode, split):
    """Two data-parallel ranks, simulated in one process by splitting the batch (rows 0 and 3 empty).

    Each rank passes the normalisers ROLL's strategy gives every rank (roll_strategy_normalisers over
    both ranks' masks: the all-reduced valid tokens and valid rows), as numbers or 0-dim tensors. Asserted:

    1. each rank's loss, gradient and every metric equal ROLL's loss_func on that rank's rows with those
       normalisers;
    2. the ranks' losses add up to ROLL's loss of the whole batch on one rank, and the sum of the ranks'
       gradients w.r.t. a parameter both ranks share (a per-position shift of the log-probs, as model
       weights are shared) equals the whole batch's. That sum is the gradient ROLL applies: its
       strategies multiply each micro-batch's loss by ``loss_scale = num_microbatches * dp_size``
       (megatron_strategy.py L1294-L1296, fsdp2_strategy.py L1588) to undo Megatron's / FSDP's averaging
       over micro-batches and data-parallel ranks, so the all-reduced gradient is the sum of the ranks'
       loss_func gradients. The per-row gradients (each row lives on one rank) concatenate to the
       whole batch's;
    3. actor/clipfrac, actor/approxkl and actor/policykl, divided by the global counts, add up over the
       ranks to the whole batch's value, as the loss (the other metrics are per-rank means);
    4. ppo_ext.distributed.global_normalisers (no process group: the local sums, i.e. the whole batch
       when given the whole mask) gives ROLL's counts as num_tokens and num_seqs, not num_rows.
    """
    seed = 700 + 11 * MODES.index(mode) + 2 * (level == "seq") + (split != "halves")
    inp = _inputs(seed, b=6, t=16, empty=(0, 3))
    sample, token = _weights(inp, "both", seed)
    cfg = _config(level, mode, dual=True)
    ranks = SPLITS[split]
    norm = roll_strategy_normalisers([inp.mask[r] for r in ranks])
    g = ppo_dist.global_normalisers(inp.mask)
    assert int(g.num_tokens) == int(norm[0]) and int(g.num_seqs) == int(norm[1]) == 4  # 4.
    assert int(g.num_rows) == 6

    shift = torch.zeros(inp.lp.shape[1], dtype=torch.float64, requires_grad=True)

    def adapter_on_rank(rows, as_tensors):
        lp = (inp.lp[rows].double() + shift).float()
        lp.retain_grad()
        gn = dict(batch_num_tokens=norm[0], global_valid_samples=norm[1]) if as_tensors else \
            dict(batch_num_tokens=int(norm[0]), global_valid_samples=int(norm[1]))
        loss, metrics = pr.compute_policy_loss(lp, inp.old[rows], inp.adv[rows], inp.mask[rows],
                                               sample_weights=sample[rows], token_weights=token[rows],
                                               **_options(cfg), **gn)
        loss.backward()
        return loss.detach(), metrics, lp.grad

    per_rank = []
    for k, rows in enumerate(ranks):
        got = adapter_on_rank(rows, as_tensors=k == 0)
        assert_same(got, run_roll(inp, cfg, rows, sample, token, normalisers=norm), f"{level} {mode} rank {k}")  # 1.
        per_rank.append(got)
    shift_grad = shift.grad.clone()

    whole = run_roll(inp, cfg, sample=sample, token=token)  # one rank holding the whole batch
    x = inp.f64()
    shift_ref = torch.zeros(inp.lp.shape[1], dtype=torch.float64, requires_grad=True)
    ref_loss, _ = roll_loss_func(x.lp + shift_ref, x.old, x.adv, inp.mask, cfg, *roll_strategy_normalisers([inp.mask]),
                                 sample_weights=sample.double(), train_infer_is_weight=x.weights)
    ref_loss.backward()
    torch.testing.assert_close(sum(r[0].double() for r in per_rank), whole[0], rtol=1e-5, atol=1e-6)  # 2.
    torch.testing.assert_close(shift_grad, shift_ref.grad, rtol=1e-5, atol=1e-6 * shift_ref.grad.abs().max().item())
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]).double(), whole[2], rtol=1e-5,
                               atol=1e-6 * whole[2].abs().max().item())
    for k in NORMALISED_METRICS:  # 3.
        assert sum(r[1][k] for r in per_rank) == pytest.approx(whole[1][k], **METRIC_TOL), k


def test_readme_recipe_all_rows_is_not_rolls():
    """The old data-parallel recipe, global_valid_samples = num_rows (all rows), against ROLL: in the
    seq-mean modes it is B / S off (6 / 4 here) in the loss, the gradient and the normalised metrics."""
    inp = _inputs(9, b=6, t=16, empty=(0, 3))
    cfg = _config("token", "seq-mean-token-mean", dual=True)
    g = ppo_dist.global_normalisers(inp.mask)
    ref = run_roll(inp, cfg)
    good = run_adapter(inp, **_options(cfg), batch_num_tokens=g.num_tokens, global_valid_samples=g.num_seqs)
    assert_same(good, ref, "num_seqs")
    bad = run_adapter(inp, **_options(cfg), batch_num_tokens=g.num_tokens, global_valid_samples=g.num_rows)
    assert bad[0].item() == pytest.approx(ref[0].item() * 4 / 6, rel=1e-5)
    with pytest.raises(AssertionError):
        assert_same(bad, ref, "num_rows")


# ----------------------------------------------------------------------------------------------------


def test_inputs_exercise_every_branch():
    """The inputs clip (also in padding), dual-clip and have an empty row, and the comparison catches a
    wrong dual-clip constant, no dual clip, and agg_loss's own fallback (all B rows) for
    global_valid_samples in the loss or in the metrics."""
    inp = _inputs(5)
    cfg = _config("token", "seq-mean-token-mean", dual=True)
    got = run_adapter(inp, **_options(cfg))
    out = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                              dual_clip=1 + 2 * PG_CLIP)
    c = counts_by_name(out.counts)
    assert c["dual_clipped"] > 0 and c["clipped_low"] > 0 and c["clipped_high"] > 0 and c["clipped_active"] > 0
    assert ((inp.mask != 0).sum(-1) == 0).any()
    # the seed's all-positions fraction differs from the core's valid-token fraction
    assert got[1]["actor/ppo_ratio_low_clipfrac"] != pytest.approx(out.metrics["clipfrac_low"].item(), rel=1e-3)
    with pytest.raises(AssertionError):  # dual-clip constant 1 + 2 * pg_clip_high instead of pg_clip
        assert_same(got, run_roll(inp, _config("token", "seq-mean-token-mean", dual=True, pg_clip=CLIP_HIGH)), "c")
    with pytest.raises(AssertionError):  # no dual clip
        assert_same(got, run_roll(inp, _config("token", "seq-mean-token-mean", dual=False)), "no dual")
    ref = run_roll(inp, cfg)
    assert_same(got, ref, "ROLL")
    all_rows = run_roll(inp, cfg, normalisers=(roll_strategy_normalisers([inp.mask])[0], B))
    with pytest.raises(AssertionError):  # all rows: agg_loss's fallback, not what the strategy passes
        assert_same(got, (all_rows[0], ref[1], ref[2]), "all rows: loss", keys=())
    with pytest.raises(AssertionError):
        assert_same(got, (ref[0], ref[1], all_rows[2]), "all rows: gradient", keys=())
    for k in NORMALISED_METRICS:  # ... and in each metric ROLL divides by the strategy's counts
        assert got[1][k] != pytest.approx(all_rows[1][k], rel=1e-3), k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["B1", "B"])
def test_row_advantages(shape, mode):
    """Advantages (B, 1) or (B,) (one per row, GRPO): ROLL's loss_func with them expanded to (B, T) and 0
    at padding, as ROLL's advantages are."""
    inp = _inputs(800 + MODES.index(mode), b=6, t=16, empty=(2,))
    row = torch.randn(6, generator=torch.Generator().manual_seed(8))
    cfg = _config("seq", mode, dual=True)
    got = run_adapter(SimpleNamespace(lp=inp.lp, old=inp.old, mask=inp.mask,
                                      adv=row[:, None] if shape == "B1" else row), **_options(cfg))
    inp.adv = torch.where(inp.mask, row[:, None].expand(6, 16), torch.zeros(()))
    assert_same(got, run_roll(inp, cfg), f"{shape} {mode}")


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
    config = _config("seq", "token-mean", dual=True)
    from_config = run_adapter(inp, config=config)
    assert_same(from_config, run_roll(inp, config), "config")
    from_dict = run_adapter(inp, config=vars(config))
    torch.testing.assert_close(from_dict[0], from_config[0], rtol=0, atol=0)
    # keywords override the config; use_pg_clip_range False ignores pg_clip_low/high (ROLL: pg_clip both ways)
    overridden = run_adapter(inp, config=config, use_pg_clip_range=False, importance_sampling="token")
    assert_same(overridden, run_roll(inp, _config("token", "token-mean", dual=True, use_range=False)), "override")
    # ROLL's defaults: pg_clip 0.2, token level, seq-mean-token-mean, no dual clip
    defaults = run_adapter(inp)
    assert_same(defaults, run_roll(inp, _config("token", "seq-mean-token-mean", dual=False, use_range=False,
                                                pg_clip=0.2)), "defaults")


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
    for mode in MODES:
        norm = dict(batch_num_tokens=torch.tensor(500), global_valid_samples=torch.tensor(20))
        loss, tensors = pr.compute_policy_loss(*args, loss_agg_mode=mode, return_tensors=True, **norm)
        _, floats = pr.compute_policy_loss(*args, loss_agg_mode=mode, **norm)
        assert all(isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32
                   for v in tensors.values())
        assert {k: v.item() for k, v in tensors.items()} == floats


# ----------------------------------------------------------------------------------------------------
# ROLL's train/infer importance weight (train_infer_correction.is_weight), computed by the kernel


def roll_train_infer_is_weight(old_log_probs, infer_log_probs, response_mask, weight_type, upper_bound):
    """ROLL's is_weight of compute_train_infer_correction (ROLL's train-infer correction module at ROLL_COMMIT,
    _compute_all_granularity's ratios): exp(old - infer) per token, of the row's masked mean ("geometric") or
    masked sum ("sequence"), clamped to [0, upper_bound]; and its clip fraction metric."""
    response_mask = response_mask.long()
    log_ratio = old_log_probs - infer_log_probs
    ratio = {
        "token": log_ratio.exp(),
        "geometric": roll_masked_mean(log_ratio, response_mask, dim=-1).exp().unsqueeze(-1).expand_as(log_ratio),
        "sequence": roll_masked_sum(log_ratio, response_mask, dim=-1).exp().unsqueeze(-1).expand_as(log_ratio),
    }[weight_type]
    tokens = max(float(response_mask.float().sum()), 1.0)
    clipfrac = roll_agg_loss((ratio > upper_bound).float(), response_mask, "token-mean", batch_num_tokens=tokens)
    return ratio.clamp(min=0.0, max=upper_bound), clipfrac.item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("weight_type", list(pr.IS_WEIGHT_TYPES))
def test_train_infer_is_weight(weight_type, level, mode):
    inp = _inputs(70 + MODES.index(mode))
    g = torch.Generator().manual_seed(71)
    B_, T_ = inp.lp.shape
    infer = (inp.old.double() + 0.1 * torch.randn(B_, 1, generator=g, dtype=torch.float64)
             + 0.1 * torch.randn(B_, T_, generator=g, dtype=torch.float64)).float()
    # ROLL's batches hold the same padding in both (ratio 1 there): its clip-fraction numerator, an unmasked
    # token-mean agg_loss, counts padding positions too, so padding must not exceed the bound.
    infer = torch.where(inp.mask != 0, infer, inp.old)
    ub = 1.1
    cfg = _config(level, mode, dual=True)
    x = inp.f64()
    weight, clipfrac = roll_train_infer_is_weight(x.old, infer.double(), inp.mask, weight_type, ub)
    assert 0 < clipfrac < 1, "the bound cuts some tokens, not all"
    lp = x.lp.clone().requires_grad_(True)
    ref_loss, ref_metrics = roll_loss_func(lp, x.old, x.adv, inp.mask, cfg, *roll_strategy_normalisers([inp.mask]),
                                           train_infer_is_weight=weight)
    ref_loss.backward()
    ref_metrics["actor/is_weight_clipfrac@sum"] = clipfrac
    got = run_adapter(inp, infer_log_probs=infer, is_weight_type=weight_type, is_weight_upper_bound=ub,
                      **_options(cfg))
    assert_same(got, (ref_loss.detach(), ref_metrics, lp.grad), f"{weight_type} {level} {mode}",
                keys=pr.METRIC_KEYS + ("actor/is_weight_clipfrac@sum",))


def test_train_infer_segment_is_refused():
    inp = _inputs(72)
    with pytest.raises(NotImplementedError, match="segment"):
        run_adapter(inp, infer_log_probs=inp.old, is_weight_type="segment")


# ----------------------------------------------------------------------------------------------------
# The KL loss to the reference and the entropy bonus (base_worker.py L255-L287, transcribed)


def roll_total_loss(pg_loss, log_probs, ref_log_probs, entropy, response_mask, cfg, batch_num_tokens,
                    global_valid_samples):
    """ROLL's total_loss and the loss metrics from the policy-gradient loss (base_worker.py L255-L287)."""
    response_mask = response_mask.long()
    kl_loss = roll_compute_approx_kl(log_probs=log_probs, log_probs_base=ref_log_probs, action_mask=response_mask,
                                     kl_penalty="k3")
    kl_loss = roll_agg_loss(loss_mat=kl_loss, loss_mask=response_mask, loss_agg_mode=cfg.loss_agg_mode,
                            batch_num_tokens=batch_num_tokens, global_valid_samples=global_valid_samples)
    if cfg.use_kl_loss:
        total_loss = pg_loss + kl_loss * cfg.kl_loss_coef
    else:
        total_loss = pg_loss
    if cfg.entropy_loss_coef > 0:
        entropy_loss = roll_agg_loss(loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=cfg.loss_agg_mode,
                                     batch_num_tokens=batch_num_tokens, global_valid_samples=global_valid_samples)
        total_loss = total_loss - entropy_loss * cfg.entropy_loss_coef
    return total_loss, {"actor/pg_loss": pg_loss.item(), "actor/kl_loss": kl_loss.item(),
                        "actor/total_loss": total_loss.item()}


def _kl_case(seed):
    inp = _inputs(seed)
    g = torch.Generator().manual_seed(seed)
    ref = inp.lp.double() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref[0, :4] = inp.lp[0, :4].double() + 4.0  # k3 = e^4 - 5 ~ 50: ROLL's clamp at 10
    ref[2, :4] = inp.lp[2, :4].double() - 25.0  # lp - ref = 25: no clamp before ROLL's exp (verl's clamps it at 20)
    entropy = 3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    return inp, ref, entropy


@pytest.mark.parametrize("use_kl", [True, False], ids=["use_kl_loss", "kl_metric_only"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_kl_loss_and_entropy_bonus(level, mode, use_kl):
    inp, ref, entropy = _kl_case(hash((level, mode)) % 1000)
    cfg = SimpleNamespace(**vars(_config(level, mode, dual=True)), use_kl_loss=use_kl, kl_loss_coef=0.07,
                          entropy_loss_coef=0.01)
    sample, _ = _weights(inp, "sample", 3)
    # ppo_ext
    lp = inp.lp.detach().double().clone().requires_grad_(True)
    ent = entropy.clone().requires_grad_(True)
    # (ROLL's op_compute_entropy multiplies the entropy by the mask: 0 at padding, no gradient there)
    loss, metrics = pr.compute_policy_loss(lp, inp.old.double(), inp.adv.double(), inp.mask, cfg,
                                           sample_weights=sample.double(), ref_log_probs=ref, entropy=ent * inp.mask)
    loss.backward()
    # ROLL
    x = inp.f64()
    normalisers = roll_strategy_normalisers([inp.mask])
    ref_lp = x.lp.clone().requires_grad_(True)
    ref_ent = entropy.clone().requires_grad_(True)
    pg_loss, ref_metrics = roll_loss_func(ref_lp, x.old, x.adv, inp.mask, cfg, *normalisers,
                                          sample_weights=sample.double())
    total, loss_metrics = roll_total_loss(pg_loss, ref_lp, ref, ref_ent * inp.mask, inp.mask, cfg, *normalisers)
    total.backward()
    ref_metrics.update(loss_metrics)
    assert_same((loss.detach(), metrics, lp.grad), (total.detach(), ref_metrics, ref_lp.grad), f"{level} {mode}",
                keys=pr.METRIC_KEYS + pr.LOSS_METRIC_KEYS)
    torch.testing.assert_close(ent.grad, ref_ent.grad, rtol=1e-9, atol=1e-12)


def test_kl_needs_ref_and_entropy_bonus_needs_entropy():
    inp, ref, _ = _kl_case(5)
    with pytest.raises(ValueError, match="use_kl_loss needs ref_log_probs"):
        pr.compute_policy_loss(inp.lp, inp.old, inp.adv, inp.mask, use_kl_loss=True, kl_loss_coef=0.1)
    with pytest.raises(ValueError, match="entropy_loss_coef > 0 needs entropy"):
        pr.compute_policy_loss(inp.lp, inp.old, inp.adv, inp.mask, entropy_loss_coef=0.1)
    _, metrics = pr.compute_policy_loss(inp.lp, inp.old, inp.adv, inp.mask)
    assert tuple(metrics) == pr.METRIC_KEYS  # without ref_log_probs: no loss metrics
