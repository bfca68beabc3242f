"""Data-parallel helpers: the global normalisers and the global clip fractions, exact across ranks; and the
log-probs from hidden states with the LM head split over the vocabulary across a tensor-parallel group
(``vocab_parallel_log_probs``, which ``ppo_ext.log_probs_from_hidden(process_group=...)`` calls).

With the batch split over data-parallel ranks, each rank computes ``ppo_ext.policy_loss`` on its rows
with the *global* normalisers (``num_tokens`` = valid tokens of the whole batch, ``num_seqs`` = rows
with a valid token in the whole batch); then the per-rank losses add up to the loss of the whole batch
and the per-rank gradients are its gradient, exactly, for every aggregation mode (``token-sum`` and
``seq-mean-token-sum-norm`` with a fixed ``loss_scale_factor`` need no global count). The clip
counters are int64, so their all-reduced sums give the global clip fractions exactly::

    import ppo_ext, ppo_ext.distributed as ppo_dist

    g = ppo_dist.global_normalisers(mask)                  # one all_reduce, before the loss
    out = ppo_ext.policy_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-mean",
                              num_tokens=g.num_tokens, num_seqs=g.num_seqs)
    (out.loss * world_size).backward()                     # DDP/FSDP *average* gradients over ranks
    frac = ppo_dist.clip_fractions(ppo_dist.all_reduce_counts(out.counts))   # global clipfracs

Nothing here synchronises the host: the collectives run on the counts' device (CPU tensors for gloo,
CUDA tensors for NCCL) and the results stay there as 0-dim tensors, which ppo_ext takes as normalisers
without reading them. Without an initialised process group (or with ``torch.distributed``
unavailable) the functions return the local values, so single-process code needs no branch.
"""

from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist

from ppo_ext.names import COUNT_INDEX, COUNT_NAMES

__all__ = ["GlobalNormalisers", "global_normalisers", "all_reduce_counts", "clip_fractions",
           "vocab_parallel_log_probs"]


class GlobalNormalisers(NamedTuple):
    """Sums over the ranks of the group, 0-dim int64 tensors on the mask's device."""

    num_tokens: torch.Tensor  # valid tokens (ppo_ext's num_tokens; verl's and ROLL's batch_num_tokens)
    # rows with at least one valid token (ppo_ext's num_seqs; verl's global_batch_size; the
    # global_valid_samples ROLL's strategy hands its loss_func)
    num_seqs: torch.Tensor
    num_rows: torch.Tensor  # all rows, empty ones included (not ROLL's global_valid_samples: see num_seqs)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def global_normalisers(mask: torch.Tensor, group: Optional["dist.ProcessGroup"] = None) -> GlobalNormalisers:
    """The global valid-token count, valid-row count and row count of a data-parallel batch.

    ``mask`` is this rank's (B, T) response mask (non-zero = valid). All three numbers are summed over
    the ranks of ``group`` (default: the world) in a single ``all_reduce`` of one int64 tensor. Call it
    on every rank, before the loss; pass ``num_tokens=`` and ``num_seqs=`` to ``ppo_ext.policy_loss``.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    per_row = (mask != 0).sum(dim=1)
    local = torch.stack([
        per_row.sum(),
        (per_row > 0).sum(),
        torch.full((), mask.shape[0], dtype=torch.int64, device=mask.device),
    ]).to(torch.int64)
    if _distributed(group):
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    return GlobalNormalisers(*local.unbind())


def all_reduce_counts(counts: torch.Tensor, group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """The sum over the ranks of ``ppo_ext.policy_loss(...).counts`` (int64 (8,), ``COUNT_NAMES``), in one
    ``all_reduce``. Returns a new tensor; ``counts`` is left as it is."""
    if counts.shape != (len(COUNT_NAMES),) or counts.dtype != torch.int64:
        raise ValueError(f"counts must be the int64 ({len(COUNT_NAMES)},) tensor of ppo_ext.policy_loss, "
                         f"got {counts.dtype} {tuple(counts.shape)}")
    total = counts.clone()
    if _distributed(group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def clip_fractions(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The clip fractions of ``ppo_ext.METRIC_NAMES`` from (all-reduced) counts, as 0-dim float32 tensors:
    ``clipfrac``, ``clipfrac_low``, ``clipfrac_high``, ``clipfrac_active``, ``dual_clipfrac`` and
    ``rollout_filtered_frac``; each count divided by ``valid_tokens`` (0 when there is none), as the kernel
    computes them for one batch."""
    c = counts.to(torch.float64)
    n = c[COUNT_INDEX["valid_tokens"]]
    safe = torch.where(n > 0, n, torch.ones_like(n))

    def frac(x):
        return torch.where(n > 0, x / safe, torch.zeros_like(x))

    low, high = frac(c[COUNT_INDEX["clipped_low"]]), frac(c[COUNT_INDEX["clipped_high"]])
    fractions = {
        "clipfrac": low + high,
        "clipfrac_low": low,
        "clipfrac_high": high,
        "clipfrac_active": frac(c[COUNT_INDEX["clipped_active"]]),
        "dual_clipfrac": frac(c[COUNT_INDEX["dual_clipped"]]),
        "rollout_filtered_frac": frac(c[COUNT_INDEX["rollout_filtered_tokens"]]),
    }
    return {k: v.to(torch.float32) for k, v in fractions.items()}


# ----------------------------------------------------------------------------------------------------
# Tensor parallel: the LM head split over the vocabulary


def _combine_vocab_shards(log_probs: torch.Tensor, logsumexp: torch.Tensor, entropy: Optional[torch.Tensor],
                         in_shard: torch.Tensor, group):
    """The full vocabulary's (log_probs, logsumexp, entropy) of each token from those of this rank's shard of the
    vocabulary (the label's log-prob within the shard, valid where in_shard: on the rank holding the label; the
    shard's log-sum-exp L_r; the shard's entropy H_r, or None), in one collective: an all-gather of each shard's
    L_r, label logit (0 off the label's rank) and L_r - H_r, then on every rank, from the same gathered rows in rank
    order (the same bits on every rank): L = m + log sum_r exp(L_r - m) with m = max_r L_r, log_prob = x_label / T - L,
    H = L - sum_r exp(L_r - m) (L_r - H_r) / sum_r exp(L_r - m). The entropy is None without the shards' entropies."""
    parts = [logsumexp, torch.where(in_shard, log_probs + logsumexp, 0)]
    if entropy is not None:
        parts.append(logsumexp - entropy)
    local = torch.stack(parts).view(len(parts), -1)
    world = dist.get_world_size(group)
    gathered = local.new_empty(world * len(parts), local.shape[1])
    _all_gather_rows(gathered, local, group)
    shards = gathered.view(world, len(parts), *logsumexp.shape)
    top = shards[:, 0].amax(0)
    share = torch.exp(shards[:, 0] - top)
    total_share = share.sum(0)
    total_lse = top + torch.log(total_share)
    log_probs = shards[:, 1].sum(0) - total_lse
    if entropy is None:
        return log_probs, total_lse, None
    # a shard whose logits are all -inf for a token (share 0, L_r - H_r NaN) adds nothing
    spread = torch.where(share > 0, share * shards[:, 2], 0).sum(0)
    return log_probs, total_lse, total_lse - spread / total_share


# torch 2.14 renamed all_gather_into_tensor (a FutureWarning since); the GPU machines' 2.11 has the old name only
_all_gather_rows = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class _VocabParallelLogProbs(torch.autograd.Function):
    """Each rank runs ppo_ext::hidden_log_probs on its shard of the vocabulary (the labels of _shard_labels, clamped
    into it); one all-gather of (N,) rows combines the shards' results (_combine_vocab_shards). Backward:
    ppo_ext::hidden_log_probs_backward on the shard with the global L and H (labels outside the shard add no onehot
    term), its grad_hidden all-reduced (the head's input is replicated over the group), grad_weight and grad_bias
    the shard's."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local, in_shard, temperature, compute_entropy, chunk_tokens, group):
        lp, lse, entropy = torch.ops.ppo_ext.hidden_log_probs(
            hidden, weight, local.clamp(0, weight.shape[0] - 1), bias, temperature, compute_entropy, chunk_tokens)
        log_probs, total_lse, total_entropy = _combine_vocab_shards(lp, lse, entropy if compute_entropy else None,
                                                                   in_shard, group)
        if total_entropy is None:
            total_entropy = entropy
        ctx.save_for_backward(hidden, weight, bias, local, total_lse, total_entropy)
        ctx.options = (temperature, chunk_tokens, group)
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(total_entropy)
        return log_probs, total_entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, local, lse, entropy = ctx.saved_tensors
        temperature, chunk_tokens, group = ctx.options
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * 9
        if torch.is_grad_enabled():
            raise RuntimeError("ppo_ext.log_probs_from_hidden is differentiable once: backward with create_graph=True "
                               "(double backward) is not supported")
        g = torch.zeros_like(lse) if grad_log_probs is None else grad_log_probs
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_hidden, grad_weight, grad_bias = torch.ops.ppo_ext.hidden_log_probs_backward(
            g, hidden, weight, local, lse, bias, temperature, chunk_tokens, grad_entropy,
            None if grad_entropy is None else entropy, output_mask)
        if output_mask[0]:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        return (grad_hidden if output_mask[0] else None, grad_weight if output_mask[1] else None,
                grad_bias if output_mask[2] else None) + (None,) * 6


def _shard_labels(labels: torch.Tensor, rows: int, vocab_start: Optional[int], group, check_labels: bool):
    """The labels as rows of this rank's shard [vocab_start, vocab_start + rows) of the vocabulary (default
    vocab_start: rank * rows), outside [0, rows) where another rank's, and where they are in it; checked to lie in
    exactly one rank's shard for CPU tensors and with check_labels."""
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * rows
    if check_labels or labels.device.type == "cpu":
        _check_labels_in_shards(labels, int(vocab_start), rows, group)
    local = labels - int(vocab_start)
    return local, (local >= 0) & (local < rows)


def _check_labels_in_shards(labels: torch.Tensor, vocab_start: int, rows: int, group) -> None:
    """Raises ValueError naming the first label that lies in no rank's shard of the vocabulary (or in several)."""
    owners = ((labels >= vocab_start) & (labels < vocab_start + rows)).to(torch.int32)
    dist.all_reduce(owners, op=dist.ReduceOp.SUM, group=group)
    bad = owners != 1
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"labels must be token ids of the vocabulary split over the process group (each in "
                         f"exactly one rank's rows of weight), got labels{list(first)} = {labels[first].item()} "
                         f"(in {owners[first].item()} shards)")


def vocab_parallel_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, group, *,
                             bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                             compute_entropy: bool = False, chunk_tokens: int = 0,
                             vocab_start: Optional[int] = None, check_labels: bool = False):
    """log_softmax(hidden @ W.T + b)[labels] (and the entropy) with the LM head W split over the vocabulary across
    ``group``, as Megatron's and verl's vocabulary-parallel head holds it: this rank's ``weight`` (V_r, H) and
    ``bias`` (V_r,) are rows ``[vocab_start, vocab_start + V_r)`` of the full head (default ``vocab_start``: rank *
    V_r, equal shards in rank order); ``hidden`` and the global ``labels`` are the same on every rank. Returns
    ``(log_probs, entropy)`` of the full vocabulary on every rank (entropy a (0,) tensor without
    ``compute_entropy``), differentiable: ``hidden``'s gradient is the full one on every rank (all-reduced), the
    head's gradients are this rank's shard's. One all-gather of (N,) rows forward (three floats a token and rank),
    one all-reduce of hidden's size backward; the logits never exist whole, on any rank. Call it on every rank of
    the group, with the same ``hidden`` (and its requires_grad) and the same loss. Every label must lie in exactly
    one rank's shard: checked (one more all-reduce of (N,) integers) for CPU tensors, as the unsplit op checks its
    labels there, and with ``check_labels=True`` (which also synchronises with the host) for GPU ones; else a label
    outside every shard gives -L, a finite but meaningless log-prob."""
    local, in_shard = _shard_labels(labels, weight.shape[0], vocab_start, group, check_labels)
    return _VocabParallelLogProbs.apply(hidden, weight, bias, local, in_shard, float(temperature),
                                        bool(compute_entropy), int(chunk_tokens), group)
