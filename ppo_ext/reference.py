"""A plain eager PyTorch implementation of the loss defined in docs/SPEC.md.

It is written for reading, not for speed: every line is a formula of docs/SPEC.md, with the usual eager
ops (torch.maximum, torch.minimum, torch.where, and a clamp whose gradient passes at its bounds), so
that ties, NaN and autograd behave as they do in eager PyTorch. The tests compare ppo_ext's kernels with it (on
float64 copies of the inputs) and the benchmarks check every contender against it (their eager baselines are the
frameworks' own code). It imports nothing but torch.

Arithmetic is done in float32 for float32/bfloat16/float16 log_probs and in float64 for float64 ones,
like the kernels. The gradient w.r.t. log_probs comes from ordinary autograd.
"""

import math
from typing import Dict, NamedTuple, Optional, Union

import torch

# Its own copy of ppo_ext.names (this module imports nothing but torch); tests/test_hygiene.py checks they agree.
METRIC_NAMES = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_active", "dual_clipfrac",
                "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "rollout_weight_mean", "rollout_weight_min",
                "rollout_weight_max", "rollout_filtered_frac", "kl", "kl_loss")
COUNT_NAMES = ("valid_tokens", "valid_seqs", "clipped_low", "clipped_high", "clipped_active", "dual_clipped",
               "rollout_filtered_tokens", "rollout_filtered_seqs")
ROLLOUT_IS_LEVELS = ("none", "token", "seq", "seq-mean")
ROLLOUT_IS_MODES = ("truncate", "mask")
ROLLOUT_IS_MASK_WEIGHTS = ("unit", "token")
KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "seq", "seq-token")
LOSS_TYPES = ("vanilla", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "vespo", "value")
RATIO_LOSS_TYPES = ("vanilla", "cispo", "sapo")  # the families defined at every importance-sampling level
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")

Normaliser = Union[None, int, float, torch.Tensor]


class ReferenceOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. log_probs
    metrics: Dict[str, torch.Tensor]  # 0-dim float32 tensors, keys METRIC_NAMES
    counts: torch.Tensor  # int64 (8,), in COUNT_NAMES order


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
    loss_type: str = "vanilla",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    rollout_log_probs: Optional[torch.Tensor] = None,
    rollout_is: str = "none",
    rollout_is_mode: str = "truncate",
    rollout_is_low: Optional[float] = None,
    rollout_is_high: Optional[float] = None,
    rollout_is_mask_weight: str = "unit",
    ref_log_probs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
    kl_clamp: Optional[float] = None,
    kl_bias_correction: bool = False,
    token_weights: Optional[torch.Tensor] = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
    loss_scale_factor: Normaliser = None,
) -> ReferenceOutput:
    if importance_sampling not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "geo_mean" and importance_sampling == "token":
        raise ValueError("loss_type 'geo_mean' is a sequence-level loss: importance_sampling 'seq' or 'seq-token'")
    if importance_sampling != "token" and loss_type not in RATIO_LOSS_TYPES + ("geo_mean",):
        raise ValueError(f"loss_type {loss_type!r} is defined at the token level only")
    if loss_type in ("value", "vespo") and log_ratio_clamp is not None:
        raise ValueError(f"log_ratio_clamp does not apply to loss_type {loss_type!r}")
    if loss_type == "vespo" and rollout_is not in ("none", "token"):
        raise ValueError("loss_type 'vespo' takes a token-level rollout correction only")
    if loss_type == "dro" and not (dro_beta is not None and dro_beta > 0):
        raise ValueError(f"dro_beta must be > 0 with loss_type 'dro', got {dro_beta!r}")
    straight_through = kl_estimator.endswith("+")
    estimator = kl_estimator[:-1] if straight_through else kl_estimator
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS} (each may end in '+'), got {kl_estimator!r}")
    if not math.isfinite(kl_coef) or not (kl_clamp is None or kl_clamp > 0):
        raise ValueError(f"kl_coef must be finite and kl_clamp > 0 or None, got {kl_coef!r}, {kl_clamp!r}")
    if ref_log_probs is None and (kl_coef != 0 or kl_clamp is not None or kl_bias_correction):
        raise ValueError("kl_coef, kl_clamp and kl_bias_correction need ref_log_probs")
    if ref_log_probs is not None and loss_type == "value":
        raise ValueError("ref_log_probs does not apply to loss_type 'value'")
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

    # Rollout correction: a constant weight from e = old - rollout per token, or per row (its sum: the product
    # of the ratios; or its mean: their geometric mean), truncated to the bounds or zero outside them.
    if (rollout_is == "none") != (rollout_log_probs is None):
        raise ValueError("rollout_is and rollout_log_probs go together")
    rollout_w = torch.ones(B, T, dtype=dtype, device=log_probs.device)
    filtered = torch.zeros(B, T, dtype=torch.bool, device=log_probs.device)
    if rollout_is != "none":
        lo = -torch.inf if rollout_is_low is None else rollout_is_low
        hi = torch.inf if rollout_is_high is None else rollout_is_high
        e = torch.where(m, old.detach() - rollout_log_probs.detach().to(dtype), zero)
        if rollout_is == "token":
            unit = e
        else:
            unit = e.sum(dim=1, keepdim=True)
            if rollout_is == "seq-mean":
                unit = unit / m.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
            unit = unit.expand(B, T)
        u = torch.exp(unit)
        if rollout_is_mode == "truncate":
            rollout_w = torch.clamp(u, lo, hi)
            filtered = (u < lo) | (u > hi)
        else:
            keep = (u >= lo) & (u <= hi)
            rollout_w = torch.where(keep, torch.exp(e) if rollout_is_mask_weight == "token" else u, zero)
            filtered = ~keep
        if loss_type != "vespo":  # vespo's row log-weight takes the log of the weight instead
            w = w * rollout_w

    n = m.sum(dim=1)  # n_i, valid tokens of row i
    N = n.sum()
    S = (n > 0).sum()

    # Importance ratio.
    d = lp - old  # 0 at masked positions
    d_tok = d if K is None else _clamp(d, -K, K)
    if loss_type == "value":  # the values' exp(v - v_old) would mean nothing: no ratio, 1
        r = torch.ones_like(d_tok)
    elif importance_sampling == "token":
        r = torch.exp(d_tok)
    else:
        # q: the token's term of the sequence log-ratio: d, or geo_mean's (GMPO's) sign-aware clip of it, and
        # dq/dd (1 where q = d, torch.minimum's tie and the clamp's bound included)
        q, dq = d, one
        if loss_type == "geo_mean":
            s = torch.sign(A)
            q = s * torch.minimum(s * d, s * _clamp(d, -eps_lo, eps_hi))
            dq = torch.where(A > 0, d <= eps_hi, torch.where(A < 0, d >= -eps_lo, False)).to(dtype)
        qbar = (q.sum(dim=1) / n.clamp(min=1).to(dtype)).unsqueeze(1)  # 0 for a row with no valid token
        if importance_sampling == "seq":
            log_r = qbar  # the gradient flows through the mean
        else:  # "seq-token": same value, gradient local to each token (0 + dq * (lp - sg(lp)): no inf - inf)
            log_r = dq * (lp - lp.detach()) + qbar.detach()
        if K is not None:
            log_r = _clamp(log_r, -K, K)
        r = torch.exp(log_r).expand(B, T)

    # Per-token loss, and the family's counters (docs/SPEC.md "Loss families").
    no = torch.zeros_like(m)
    low = high = active = dual = no
    if loss_type == "vanilla":
        L1 = -A * (r if ratio_cap is None else torch.clamp(r, max=ratio_cap))
        L2 = -A * _clamp(r, 1 - eps_lo, 1 + eps_hi)
        l_clip = torch.maximum(L1, L2)
        l = l_clip
        if c is not None:
            l = torch.where(A < 0, torch.minimum(l, -A * c), l)
        low, high, active = r < 1 - eps_lo, r > 1 + eps_hi, L2 > L1
        if c is not None:
            dual = (A < 0) & (l_clip > -A * c)
    elif loss_type == "cispo":  # the gradient flows through lp, not through the (stopped) clipped ratio
        l = -torch.clamp(r, 1 - eps_lo, 1 + eps_hi).detach() * A * lp
        low, high = r < 1 - eps_lo, r > 1 + eps_hi
        active = (high & (A > 0)) | (low & (A < 0))
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=dtype), torch.tensor(tau_neg, dtype=dtype))
        l = -A * torch.sigmoid(tau * (r - 1)) * 4 / tau
    elif loss_type == "gpg":
        l = -A * lp
    elif loss_type == "dro":  # on the unclamped log-ratio
        l = -(lp * A - 0.5 * dro_beta * (lp - old) ** 2)
    elif loss_type == "geo_mean":  # -A R, the row's ratio R of the clipped terms; eps are log-ratio bounds
        l = -A * r
        outside = (d < -eps_lo) | (d > eps_hi)
        low, high = outside & (A < 0), outside & (A > 0)
        active = ((d > eps_hi) & (A > 0)) | ((d < -eps_lo) & (A < 0))
    elif loss_type == "value":  # lp: the values, old: the old values, A: the returns
        lo, hi = old - eps_lo, old + eps_hi
        V1, V2 = (lp - A) ** 2, (_clamp(lp, lo, hi) - A) ** 2
        l = 0.5 * torch.maximum(V1, V2)
        low, high, active = lp < lo, lp > hi, V2 > V1
    elif loss_type == "vespo":  # TRL's VESPO: a constant Gamma weight of the row's log-weight, times -A lp
        with torch.no_grad():
            terms = torch.clamp(d, -20.0, 20.0)
            if rollout_is != "none":
                terms = terms + torch.clamp(torch.log(rollout_w), math.log(1e-8), 20.0)
            log_w = torch.clamp(torch.where(m, terms, zero).sum(dim=1, keepdim=True), math.log(1e-8), 20.0)
            nonneg = A >= 0
            k = torch.where(nonneg, torch.tensor(vespo_k_pos, dtype=dtype), torch.tensor(vespo_k_neg, dtype=dtype))
            lam = torch.where(nonneg, torch.tensor(vespo_lambda_pos, dtype=dtype),
                              torch.tensor(vespo_lambda_neg, dtype=dtype))
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        l = -phi * A * lp
    else:  # "dppo_tv", "dppo_kl": eps_lo / eps_hi are divergence thresholds
        p, p_old = torch.exp(lp), torch.exp(old)
        if loss_type == "dppo_tv":
            keep_pos, keep_neg = (p - p_old) <= eps_hi, (p - p_old) >= -eps_lo
        else:
            binary_kl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            keep_pos = (binary_kl <= eps_hi) | (p <= p_old)
            keep_neg = (binary_kl <= eps_lo) | (p >= p_old)
        keep = torch.where(A > 0, keep_pos, keep_neg).detach()
        truncated = (r if ratio_cap is None else torch.clamp(r, max=ratio_cap)).detach()
        l = -A * truncated * lp * keep.to(dtype)
        low, high, active = ~keep & ~(A > 0), ~keep & (A > 0), ~keep
        if ratio_cap is not None:
            dual = keep & (r > ratio_cap)
    l = torch.where(m, w * l, zero)

    # KL to the reference policy, per token, from k = lp - ref (verl's kl_penalty; TRL's bias correction): not
    # weighted by w, aggregated as the loss, kl_coef times it added to the loss.
    kl = torch.zeros_like(lp)
    if ref_log_probs is not None:
        k = lp - torch.where(m, ref_log_probs.detach().to(dtype), zero)
        if estimator in ("kl", "k1"):
            kl = k
        elif estimator == "abs":
            kl = k.abs()
        elif estimator in ("mse", "k2"):
            kl = 0.5 * k.square()
        else:  # k3 = ref/pi - log(ref/pi) - 1; verl's own clamps unless kl_clamp is given
            x = -k if kl_clamp is not None else -_clamp(k, -20.0, 20.0)
            kl = torch.exp(x) - x - 1
        bound = 10.0 if kl_clamp is None and estimator in ("low_var_kl", "k3") else kl_clamp
        if bound is not None:
            kl = _clamp(kl, -bound, bound)
        if straight_through:  # the value of the estimator, the gradient of k2
            kl = 0.5 * k.square() - (0.5 * k.square()).detach() + kl.detach()
        if kl_bias_correction:
            kl = kl * r
        kl = torch.where(m, kl, zero)

    def aggregate(x):
        row_sum = x.sum(dim=1)
        total = row_sum.sum()
        if loss_agg_mode == "token-mean":
            return _safe_div(total, N if num_tokens is None else num_tokens)
        if loss_agg_mode == "token-sum":
            return total
        if loss_agg_mode == "seq-mean-token-mean":
            row_mean = torch.where(n > 0, row_sum / n.clamp(min=1).to(dtype), zero)
            return _safe_div(row_mean.sum(), S if num_seqs is None else num_seqs)
        if loss_agg_mode == "seq-mean-token-sum":
            return _safe_div(total, S if num_seqs is None else num_seqs)
        # "seq-mean-token-sum-norm"
        seqs = torch.as_tensor(S if num_seqs is None else num_seqs, dtype=dtype, device=lp.device)
        scale = torch.as_tensor(T if loss_scale_factor is None else loss_scale_factor, dtype=dtype, device=lp.device)
        return _safe_div(total, seqs * scale)

    kl_loss = aggregate(kl)
    loss = aggregate(l) + kl_coef * kl_loss if kl_coef != 0 else aggregate(l)

    # Counters and metrics, over valid tokens only.
    with torch.no_grad():
        low, high, active, dual = m & low, m & high, m & active, m & dual
        filtered_tokens = (m & filtered).sum()
        row_filtered = (n > 0) & filtered.any(dim=1) if rollout_is in ("seq", "seq-mean") else torch.zeros_like(n > 0)
        counts = torch.stack([N, S, low.sum(), high.sum(), active.sum(), dual.sum(), filtered_tokens,
                              row_filtered.sum()]).to(torch.int64)
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
            "rollout_weight_mean": torch.where(any_valid, _safe_div(torch.where(m, rollout_w, zero).sum(), N), one),
            "rollout_weight_min": torch.where(any_valid, torch.where(m, rollout_w, torch.inf).amin() if m.numel() else one,
                                              one),
            "rollout_weight_max": torch.where(any_valid, torch.where(m, rollout_w, -torch.inf).amax() if m.numel()
                                              else one, one),
            "rollout_filtered_frac": _safe_div(filtered_tokens.to(torch.float64), Nf),
            "kl": _safe_div(kl.detach().sum(), N),
            "kl_loss": kl_loss.detach(),
        }
        metrics = {k: v.to(torch.float32) for k, v in metrics.items()}
    return ReferenceOutput(loss, metrics, counts)
