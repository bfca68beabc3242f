"""Data-parallel helpers: the global normalisers and the global clip fractions, exact across ranks.

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

__all__ = ["GlobalNormalisers", "global_normalisers", "all_reduce_counts", "clip_fractions"]


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
