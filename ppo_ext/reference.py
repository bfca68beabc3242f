"""A plain eager PyTorch implementation of the loss defined in docs/SPEC.md.

It is written for reading, not for speed: every line is a formula of docs/SPEC.md, with the usual eager
ops (torch.maximum, torch.minimum, torch.where, and a clamp whose gradient passes at its bounds), so
that ties, NaN and autograd behave as they do in eager PyTorch. The tests compare ppo_ext's kernels with it (on float64 copies of the
inputs) and the benchmarks use it as the eager baseline. It imports nothing but torch.

Arithmetic is done in float32 for float32/bfloat16/float16 log_probs and in float64 for float64 ones,
like the kernels. The gradient w.r.t. log_probs comes from ordinary autograd.
"""

from typing import Dict, NamedTuple, Optional, Union

import torch

# Its own copy of ppo_ext.names (this module imports nothing but torch); tests/test_hygiene.py checks they agree.
METRIC_NAMES = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_active", "dual_clipfrac",
                "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
COUNT_NAMES = ("valid_tokens", "valid_seqs", "clipped_low", "clipped_high", "clipped_active", "dual_clipped")
IMPORTANCE_SAMPLING_LEVELS = ("token", "seq", "seq-token")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")

Normaliser = Union[None, int, float, torch.Tensor]


class ReferenceOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. log_probs
    metrics: Dict[str, torch.Tensor]  # 0-dim float32 tensors, keys METRIC_NAMES
    counts: torch.Tensor  # int64 (6,), in COUNT_NAMES order


def _safe_div(num: torch.Tensor, den) -> torch.Tensor:
    """num / den, and 0 (with gradient 0) where den == 0."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """torch.clamp's value, with the gradient passing inside the interval *bounds included* (torch.clamp's
    backward up to 2.13; 2.14 stopped it at the bounds). Written out so that the reference, and so the
    contract, does not change with the installed torch."""
    return torch.where((x >= lo) & (x <= hi), x, torch.clamp(x, lo, hi).detach())


def policy_loss_reference(
    log_probs: torch.Tensor,
    old_log_probs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ratio_cap: Optional[float] = None,
    importance_sampling: str = "token",
    loss_agg_mode: str = "token-mean",
    log_ratio_clamp: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> ReferenceOutput:
    if importance_sampling not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    eps_lo = clip_low
    eps_hi = clip_low if clip_high is None else clip_high
    c, K = dual_clip, log_ratio_clamp
    dtype = torch.promote_types(log_probs.dtype, torch.float32)  # float32, or float64 for float64
    B, T = log_probs.shape

    # m: the response mask. Masked positions are replaced by harmless values *before* any arithmetic
    # (torch.where, not a multiplication), so that a NaN/inf there reaches neither a value nor a gradient.
    m = torch.ones(B, T, dtype=torch.bool, device=log_probs.device) if mask is None else (mask != 0)
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    one = torch.ones((), dtype=dtype, device=log_probs.device)
    # old_log_probs, advantages and token_weights are constants: no gradient flows to them.
    lp = torch.where(m, log_probs.to(dtype), zero)
    old = lp.detach() if old_log_probs is None else torch.where(m, old_log_probs.detach().to(dtype), zero)
    A = advantages.detach().to(dtype)
    A = torch.where(m, (A.unsqueeze(-1) if A.dim() == 1 else A).expand(B, T), zero)
    w = one if token_weights is None else torch.where(m, token_weights.detach().to(dtype), zero)

    n = m.sum(dim=1)  # n_i, valid tokens of row i
    N = n.sum()
    S = (n > 0).sum()

    # Importance ratio.
    d = lp - old  # 0 at masked positions
    d_tok = d if K is None else _clamp(d, -K, K)
    if importance_sampling == "token":
        r = torch.exp(d_tok)
    else:
        dbar = (d.sum(dim=1) / n.clamp(min=1).to(dtype)).unsqueeze(1)  # 0 for a row with no valid token
        if importance_sampling == "seq":
            log_r = dbar  # the gradient flows through the mean
        else:  # "seq-token": same value, gradient local to each token
            log_r = lp - lp.detach() + dbar.detach()
        if K is not None:
            log_r = _clamp(log_r, -K, K)
        r = torch.exp(log_r).expand(B, T)

    # Per-token loss.
    L1 = -A * (r if ratio_cap is None else torch.clamp(r, max=ratio_cap))
    L2 = -A * _clamp(r, 1 - eps_lo, 1 + eps_hi)
    l_clip = torch.maximum(L1, L2)
    l = l_clip
    if c is not None:
        l = torch.where(A < 0, torch.minimum(l, -A * c), l)
    l = torch.where(m, w * l, zero)

    # Aggregation.
    row_sum = l.sum(dim=1)
    total = row_sum.sum()
    if loss_agg_mode == "token-mean":
        loss = _safe_div(total, N if num_tokens is None else num_tokens)
    elif loss_agg_mode == "token-sum":
        loss = total
    elif loss_agg_mode == "seq-mean-token-mean":
        row_mean = torch.where(n > 0, row_sum / n.clamp(min=1).to(dtype), zero)
        loss = _safe_div(row_mean.sum(), S if num_seqs is None else num_seqs)
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = _safe_div(total, S if num_seqs is None else num_seqs)
    else:  # "seq-mean-token-sum-norm"
        seqs = torch.as_tensor(S if num_seqs is None else num_seqs, dtype=dtype, device=lp.device)
        scale = torch.as_tensor(T if loss_scale_factor is None else loss_scale_factor, dtype=dtype, device=lp.device)
        loss = _safe_div(total, seqs * scale)

    # Counters and metrics, over valid tokens only.
    with torch.no_grad():
        low = m & (r < 1 - eps_lo)
        high = m & (r > 1 + eps_hi)
        active = m & (L2 > L1)
        dual = m & (A < 0) & (l_clip > -A * c) if c is not None else torch.zeros_like(m)
        counts = torch.stack([N, S, low.sum(), high.sum(), active.sum(), dual.sum()]).to(torch.int64)
        Nf = N.to(torch.float64)

        def frac(x):
            return _safe_div(x.sum().to(torch.float64), Nf)

        any_valid = N > 0
        r_valid = torch.where(m, r.detach(), zero)
        metrics = {
            "clipfrac": frac(low) + frac(high),
            "clipfrac_low": frac(low),
            "clipfrac_high": frac(high),
            "clipfrac_active": frac(active),
            "dual_clipfrac": frac(dual),
            "approx_kl": _safe_div(torch.where(m, -d_tok.detach(), zero).sum(), N),
            "ratio_mean": torch.where(any_valid, _safe_div(r_valid.sum(), N), one),
            "ratio_min": torch.where(any_valid, torch.where(m, r.detach(), torch.inf).amin() if m.numel() else one, one),
            "ratio_max": torch.where(any_valid, torch.where(m, r.detach(), -torch.inf).amax() if m.numel() else one, one),
        }
        metrics = {k: v.to(torch.float32) for k, v in metrics.items()}
    return ReferenceOutput(loss, metrics, counts)
