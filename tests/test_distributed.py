"""Data parallelism: two real processes (torch.distributed, gloo, CPU, loopback) split a batch; with the
global normalisers of ppo_ext.distributed.global_normalisers the per-rank losses add up to the
single-process loss and the per-rank gradients are its gradient, for every aggregation mode and ratio
level, and the all-reduced int64 counts give exactly the single-process clip fractions.

This file is also the worker: the test runs `python test_distributed.py --worker RANK ...` twice.
"""

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import ppo_ext
import ppo_ext.distributed as ppo_dist
from ppo_ext.compat import verl as pv
from helpers import AGG_MODES, CLIP_HIGH, CLIP_LOW, COUNT_NAMES, IS_MODES, count, make_inputs, options

WORLD = 2
B, T, SEED = 12, 40, 2024
ROWS = [slice(0, 5), slice(5, B)]  # uneven split; the empty row 1 is on rank 0
TIMEOUT_S = 90
FRACTION_KEYS = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_active", "dual_clipfrac")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch():
    return make_inputs(B, T, seed=SEED)  # the same batch on every rank; each takes its rows


# ----------------------------------------------------------------------------------------------------
# the worker process


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        inp = _batch()
        rows = ROWS[rank]
        lp, old, adv, mask, w = inp.lp[rows], inp.old[rows], inp.adv[rows], inp.mask[rows], inp.weights[rows]
        g = ppo_dist.global_normalisers(mask)  # one collective
        results = {"normalisers": torch.stack(list(g))}
        for level in IS_MODES:
            for mode in AGG_MODES:
                x = lp.clone().requires_grad_(True)
                out = ppo_ext.policy_loss(x, old, adv, mask, token_weights=w, num_tokens=g.num_tokens,
                                          num_seqs=g.num_seqs, **options(level, mode, dual=True, clamp=True))
                out.loss.backward()
                counts = ppo_dist.all_reduce_counts(out.counts)
                results[level, mode] = {"loss": out.loss.detach(), "grad": x.grad, "counts": counts,
                                        "local_counts": out.counts, "fractions": ppo_dist.clip_fractions(counts)}
        # verl's vanilla loss with its global_batch_info filled from the same normalisers
        info = dict(dp_size=WORLD, batch_num_tokens=g.num_tokens, global_batch_size=g.num_seqs)
        config = dict(clip_ratio=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=3.0, global_batch_info=info)
        for mode in AGG_MODES:
            x = lp.clone().requires_grad_(True)
            loss, _ = pv.compute_policy_loss_vanilla(old, x, adv, mask, mode, config, w, return_tensors=True)
            loss.backward()
            results["verl", mode] = {"loss": loss.detach(), "grad": x.grad}
        results["vocab_parallel"] = _vocab_parallel_worker(rank)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# The vocabulary-parallel LM head: the full head (V, H) of _head(), rows [start, stop) of it on each rank.
HEAD_B, HEAD_T, HEAD_H, HEAD_V = 3, 7, 8, 50
SHARDS = {"equal": [(0, 25), (25, 50)], "uneven": [(0, 18), (18, 50)]}  # uneven: vocab_start given
HEAD_CASES = [("equal", torch.float32, 4), ("uneven", torch.float32, 100), ("equal", torch.bfloat16, 4)]


def _head(dtype):
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(HEAD_B, HEAD_T, HEAD_H, generator=g)
    weight = torch.randn(HEAD_V, HEAD_H, generator=g) * 0.8
    bias = torch.randn(HEAD_V, generator=g)
    labels = torch.randint(0, HEAD_V, (HEAD_B, HEAD_T), generator=g)
    c = torch.randn(2, HEAD_B, HEAD_T, generator=g)  # the loss's weights on the log-probs and the entropies
    old = -2 * torch.rand(HEAD_B, HEAD_T, generator=g)
    adv = torch.randn(HEAD_B, generator=g)
    mask = torch.rand(HEAD_B, HEAD_T, generator=g) < 0.8
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, c, old, adv, mask


def _head_run(hidden, weight, bias, labels, c, old, adv, mask, chunk, **tp):
    """log-probs, entropy and the gradients of a loss of both; then policy_loss_from_hidden's loss and gradients."""
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    lp, entropy = ppo_ext.log_probs_from_hidden(h, w, labels, bias=b, return_entropy=True, chunk_tokens=chunk,
                                                temperature=0.9, **tp)
    (lp * c[0] + entropy * c[1]).sum().backward()
    out = {"lp": lp.detach(), "entropy": entropy.detach(), "grads": [h.grad, w.grad, b.grad]}
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=b, chunk_tokens=chunk,
                                           entropy_coef=0.05, grad_in_forward=False, **tp).loss
    loss.backward()
    out.update(loss=loss.detach(), loss_grads=[h.grad, w.grad, b.grad])
    # the gradients formed in the forward pass: a row statistic (chunks of whole rows) where rows fit a chunk; then a
    # second backward through the same graph (recomputed), with the returned entropy in the caller's loss (its
    # gradient by a recompute pass)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    fused = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=b, chunk_tokens=chunk,
                                            entropy_coef=0.05, return_entropy=True, grad_in_forward=True,
                                            **_row_statistic(chunk), **tp)
    fused.loss.backward(retain_graph=True)
    out.update(fused_loss=fused.loss.detach(), fused_grads=[g.clone() for g in (h.grad, w.grad, b.grad)])
    (fused.loss + (fused.entropy * c[1]).sum()).backward()
    out.update(fused_twice_grads=[h.grad, w.grad, b.grad])
    return out


def _row_statistic(chunk):
    return {"importance_sampling": "seq"} if chunk >= HEAD_T else {}


def _fused_reference(hidden, weight, bias, labels, c, old, adv, mask, chunk):
    """_head_run's fused loss through the recomputing path of the unsplit head: its loss, and the gradients of
    _head_run's two backward passes."""
    args = (hidden, weight, bias, labels, c[1], old, adv, mask)
    kw = dict(chunk=chunk, grad_in_forward=False, **_row_statistic(chunk))
    loss, grads = _loss_run(*args, entropy_in_loss=False, **kw)
    _, with_entropy = _loss_run(*args, **kw)
    return loss, grads, [a + b for a, b in zip(grads, with_entropy)]


def _assert_close(actual, expected, dtype, what):
    """float32: 1e-5; bfloat16: 2e-2 relative to the largest entry (a gradient's wrong part as small as 1 / 100 of
    it shows)."""
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}\n{m}")


def _vocab_parallel_worker(rank):
    results = {}
    for shards, dtype, chunk in HEAD_CASES:
        hidden, weight, bias, *rest = _head(dtype)
        start, stop = SHARDS[shards][rank]
        tp = dict(process_group=dist.group.WORLD, vocab_start=start if shards == "uneven" else None)
        results[shards, dtype, chunk] = _head_run(hidden, weight[start:stop], bias[start:stop], *rest, chunk, **tp)
    # a label in no rank's shard (-100, a common ignore index): the same error on every rank, no hang
    hidden, weight, bias, labels, *_ = _head(torch.float32)
    labels[1, 2] = -100
    start, stop = SHARDS["equal"][rank]
    try:
        ppo_ext.log_probs_from_hidden(hidden, weight[start:stop], labels, process_group=dist.group.WORLD)
        results["bad_label"] = None
    except ValueError as exc:
        results["bad_label"] = str(exc)
    results.update(_shards_edge_worker(rank))
    old, adv, mask = _head(torch.float32)[5:]
    try:  # the gradients formed in the forward pass check the labels too
        ppo_ext.policy_loss_from_hidden(hidden.requires_grad_(True), weight[start:stop], labels, old, adv, mask,
                                        process_group=dist.group.WORLD, grad_in_forward=True)
        results["bad_label_fused"] = None
    except ValueError as exc:
        results["bad_label_fused"] = str(exc)
    return results


# Shards whose default chunks differ (float32: 335 rows for 50000 columns, 279 for 60000): the ranks must still cut
# the same chunks (a collective a chunk). And a shard whose logits are all -inf (a bias masking it): it adds nothing.
BIG_B, BIG_T, BIG_V, BIG_SPLIT = 4, 128, 110000, 50000


def _big_head():
    g = torch.Generator().manual_seed(SEED)
    return (torch.randn(BIG_B, BIG_T, HEAD_H, generator=g), torch.randn(BIG_V, HEAD_H, generator=g),
            torch.randint(0, BIG_V, (BIG_B, BIG_T), generator=g), torch.randn(BIG_B, BIG_T, generator=g))


def _masked_shard_head():
    hidden, weight, bias, labels, c, old, adv, mask = _head(torch.float32)
    bias[SHARDS["equal"][1][0]:] = -torch.inf  # rank 1's shard
    return hidden, weight, bias, labels % SHARDS["equal"][1][0], c[1], old, adv, mask


def _loss_run(hidden, weight, bias, labels, c, old, adv, mask, chunk=None, entropy_in_loss=True, **kw):
    """policy_loss_from_hidden with the entropy bonus (and the returned entropy, weighted by c, in the loss):
    loss, gradients."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=b, chunk_tokens=chunk, entropy_coef=0.05,
                                          return_entropy=True, **kw)
    (out.loss + (out.entropy * c).sum() if entropy_in_loss else out.loss).backward()
    return out.loss.detach(), [t.grad for t in (h, w, b) if t is not None]


def _shards_edge_worker(rank):
    results = {}
    hidden, weight, labels, c = _big_head()
    start, stop = (0, BIG_SPLIT) if rank == 0 else (BIG_SPLIT, BIG_V)
    for rows in ({}, {"importance_sampling": "seq"}):
        results["uneven_default_chunks", bool(rows)] = _loss_run(
            hidden, weight[start:stop], None, labels, c, None, torch.ones(BIG_B), None, grad_in_forward=True,
            process_group=dist.group.WORLD, vocab_start=start, **rows)
    hidden, weight, bias, *rest = _masked_shard_head()
    start, stop = SHARDS["equal"][rank]
    for fused in (False, True):
        results["masked_shard", fused] = _loss_run(hidden, weight[start:stop], bias[start:stop], *rest, chunk=4,
                                                   grad_in_forward=fused, process_group=dist.group.WORLD)
    return results


# ----------------------------------------------------------------------------------------------------
# the test


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(outdir):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    port = _free_port()
    script = os.path.abspath(__file__)
    procs = [subprocess.Popen([sys.executable, script, "--worker", str(rank), str(port), str(outdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {rank} exited with {p.returncode}:\n{log}"
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return _run_workers(tmp_path_factory.mktemp("gloo"))


def test_global_normalisers_across_ranks(rank_results):
    inp = _batch()
    n = (inp.mask != 0).sum(-1)
    expected = torch.tensor([n.sum(), (n > 0).sum(), B])
    for r in rank_results:
        assert torch.equal(r["normalisers"], expected), (r["normalisers"], expected)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("level", IS_MODES)
def test_ranks_add_up_to_one_process(rank_results, level, mode):
    inp = _batch()
    x = inp.lp.clone().requires_grad_(True)
    whole = ppo_ext.policy_loss(x, inp.old, inp.adv, inp.mask, token_weights=inp.weights,
                                **options(level, mode, dual=True, clamp=True))
    whole.loss.backward()
    parts = [r[level, mode] for r in rank_results]
    assert count(parts[0]["local_counts"], "valid_tokens") > 0 and count(parts[1]["local_counts"], "valid_tokens") > 0
    assert not torch.equal(parts[0]["local_counts"], parts[1]["local_counts"])
    torch.testing.assert_close(sum(p["loss"].double() for p in parts), whole.loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, rtol=1e-5, atol=1e-7)
    for p in parts:
        assert torch.equal(p["counts"], whole.counts), (p["counts"], whole.counts)
        for k in FRACTION_KEYS:
            torch.testing.assert_close(p["fractions"][k], whole.metrics[k], rtol=1e-6, atol=0, msg=k)
    # the global fractions are not simply the mean of the per-rank ones (uneven token counts)
    local = [ppo_dist.clip_fractions(p["local_counts"])["clipfrac"] for p in parts]
    if whole.metrics["clipfrac"] > 0:
        assert abs((local[0] + local[1]).item() / 2 - whole.metrics["clipfrac"].item()) > 1e-4


@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_adapter_across_ranks(rank_results, mode):
    """verl scales each rank's loss by dp_size (FSDP averages gradients): the mean over the ranks is
    the loss of the whole batch on one rank, and the mean of the gradients its gradient."""
    inp = _batch()
    x = inp.lp.clone().requires_grad_(True)
    config = dict(clip_ratio=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=3.0)
    whole, _ = pv.compute_policy_loss_vanilla(inp.old, x, inp.adv, inp.mask, mode, config, inp.weights)
    whole.backward()
    parts = [r["verl", mode] for r in rank_results]
    torch.testing.assert_close(sum(p["loss"].double() for p in parts) / WORLD, whole.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]) / WORLD, x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: str(c))
def test_vocab_parallel_head(rank_results, case):
    """The LM head split over the vocabulary on two ranks: every rank's log-probs, entropies, loss and hidden
    gradient are the unsplit head's, and the ranks' weight and bias gradients are its gradients' rows."""
    shards, dtype, chunk = case
    whole = _head_run(*_head(dtype), chunk)
    for rank, r in enumerate(rank_results):
        part = r["vocab_parallel"][case]
        for k in ("lp", "entropy", "loss"):
            _assert_close(part[k], whole[k], dtype, f"rank {rank} {k}")
        for key in ("grads", "loss_grads"):
            _assert_close(part[key][0], whole[key][0], dtype, f"rank {rank} {key}")
    for key in ("grads", "loss_grads"):
        for i, name in ((1, "weight"), (2, "bias")):
            joined = torch.cat([r["vocab_parallel"][case][key][i] for r in rank_results])
            _assert_close(joined, whole[key][i], dtype, f"{key} {name}")
    # what is replicated over the group is the same bits on every rank (each combines the same gathered rows in the
    # same order), so the replicas of the model cannot drift apart
    first, second = (r["vocab_parallel"][case] for r in rank_results)
    for k in ("lp", "entropy", "loss", "fused_loss"):
        assert torch.equal(first[k], second[k]), k
    for key in ("grads", "loss_grads", "fused_grads", "fused_twice_grads"):
        assert torch.equal(first[key][0], second[key][0]), key


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: str(c))
def test_vocab_parallel_grad_in_forward(rank_results, case):
    """policy_loss_from_hidden's gradients formed in the forward pass with the head split over two ranks (each
    chunk's log-probs combined over the ranks, grad_hidden all-reduced): the unsplit head's loss and gradients on
    the recomputing path, with a row statistic; then a second backward with the returned entropy in the loss."""
    shards, dtype, chunk = case
    loss, grads, twice = _fused_reference(*_head(dtype), chunk)
    for rank, r in enumerate(rank_results):
        part = r["vocab_parallel"][case]
        _assert_close(part["fused_loss"], loss, dtype, f"rank {rank} loss")
        for key, expected in (("fused_grads", grads), ("fused_twice_grads", twice)):
            _assert_close(part[key][0], expected[0], dtype, f"rank {rank} {key} hidden")
    for key, expected in (("fused_grads", grads), ("fused_twice_grads", twice)):
        for i, name in ((1, "weight"), (2, "bias")):
            joined = torch.cat([r["vocab_parallel"][case][key][i] for r in rank_results])
            _assert_close(joined, expected[i], dtype, f"{key} {name}")


@pytest.mark.parametrize("row_statistic", [False, True])
def test_vocab_parallel_uneven_default_chunks(rank_results, row_statistic):
    """Shards whose own default chunks differ (chunk_tokens=None): the same chunks on both ranks (else the
    collectives mismatch and gloo aborts), the unsplit head's loss and gradients."""
    hidden, weight, labels, c = _big_head()
    rows = {"importance_sampling": "seq"} if row_statistic else {}
    loss, grads = _loss_run(hidden, weight, None, labels, c, None, torch.ones(BIG_B), None, grad_in_forward=False,
                            **rows)
    parts = [r["vocab_parallel"]["uneven_default_chunks", row_statistic] for r in rank_results]
    for rank, (part_loss, part_grads) in enumerate(parts):
        _assert_close(part_loss, loss, torch.float32, f"rank {rank} loss")
        _assert_close(part_grads[0], grads[0], torch.float32, f"rank {rank} grad hidden")
    _assert_close(torch.cat([p[1][1] for p in parts]), grads[1], torch.float32, "grad weight")


@pytest.mark.parametrize("fused", [False, True])
def test_vocab_parallel_masked_shard(rank_results, fused):
    """A shard whose logits are all -inf for every token (its bias -inf): finite loss and gradients, the unsplit
    head's (its entropy term used to be 0 * (-inf - NaN) = NaN)."""
    loss, grads = _loss_run(*_masked_shard_head(), chunk=4, grad_in_forward=False)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    parts = [r["vocab_parallel"]["masked_shard", fused] for r in rank_results]
    for rank, (part_loss, part_grads) in enumerate(parts):
        _assert_close(part_loss, loss, torch.float32, f"rank {rank} loss")
        _assert_close(part_grads[0], grads[0], torch.float32, f"rank {rank} grad hidden")
    for i, name in ((1, "weight"), (2, "bias")):
        _assert_close(torch.cat([p[1][i] for p in parts]), grads[i], torch.float32, f"grad {name}")


def test_vocab_parallel_label_in_no_shard(rank_results):
    for r in rank_results:
        for key in ("bad_label", "bad_label_fused"):
            assert r["vocab_parallel"][key] is not None
            assert "labels[1, 2] = -100 (in 0 shards)" in r["vocab_parallel"][key], r["vocab_parallel"][key]


# ----------------------------------------------------------------------------------------------------
# in one process


def test_without_process_group_values_are_local():
    assert not dist.is_initialized()
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.uint8)
    g = ppo_dist.global_normalisers(mask)
    assert [int(v) for v in g] == [3, 2, 3] and all(v.dtype == torch.int64 and v.shape == () for v in g)
    by_name = dict(valid_tokens=8, valid_seqs=3, clipped_low=1, clipped_high=2, clipped_active=4, dual_clipped=1,
                   rollout_filtered_tokens=5, rollout_filtered_seqs=1)
    counts = torch.tensor([by_name[k] for k in COUNT_NAMES])
    assert torch.equal(ppo_dist.all_reduce_counts(counts), counts)
    f = ppo_dist.clip_fractions(counts)
    assert f["clipfrac"].item() == pytest.approx(3 / 8) and f["dual_clipfrac"].item() == pytest.approx(1 / 8)
    assert f["rollout_filtered_frac"].item() == pytest.approx(5 / 8)
    no_counts = torch.zeros(len(COUNT_NAMES), dtype=torch.int64)
    assert all(v.item() == 0 for v in ppo_dist.clip_fractions(no_counts).values())
    with pytest.raises(ValueError, match="counts"):
        ppo_dist.all_reduce_counts(counts.float())
    with pytest.raises(ValueError, match="mask"):
        ppo_dist.global_normalisers(mask[0])


def test_one_collective(monkeypatch):
    """global_normalisers does its all-reduce in one collective (one int64 tensor of 3 numbers)."""
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append((tensor.dtype, tuple(tensor.shape), group))
        tensor.mul_(2)  # as if a second rank had the same batch

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    g = ppo_dist.global_normalisers(mask, group="g")
    assert calls == [(torch.int64, (3,), "g")]
    assert [int(v) for v in g] == [4, 2, 4]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker RANK PORT OUTDIR (run by pytest)")
