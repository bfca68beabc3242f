"""Property-based fuzzing of ppo_ext.policy_loss against the float64 reference (ppo_ext.reference).

Hypothesis draws the structure of a case (B and T including 0, 1, primes and sizes around the vector
width and the 512-token tile; the mask pattern; every option of the API; the dtype and the memory layout
of every tensor; the scale of the advantages and weights; garbage at masked positions) and a seed for
the values. The inputs are rounded to their dtypes first, and the reference runs in float64 on those
rounded values, so the only differences are the kernel's own float32 (float64) arithmetic and the final
rounding of the gradient to log_probs' dtype.

Stated tolerances (per lp dtype, L = the float64 reference, M = the float64 sum of |per-token term| / the
denominator, i.e. the size of what is summed; G = the same bound per gradient element):
- loss:     |ext - L| <= 1e-5 |L| + 4e-6 M  (float64 lp: 1e-10 |L| + 1e-12 M)
- gradient: |ext - ref| <= GRAD_RTOL[dtype] |ref| + 4e-6 G + the spacing of the dtype's subnormals
- metrics:  helpers.METRIC_TOL (kl, kl_loss: plus 4e-6 times the size of their terms); counts: exactly equal (values are kept 1e-4 away from every clip,
  dual-clip and clamp boundary in log space, so float32 and float64 agree on every comparison).

CI runs the derandomised "ci" hypothesis profile (a fixed number of examples); `pytest --slow` (or
PPO_EXT_HYPOTHESIS_PROFILE=slow) runs the "slow" profile with many more (see conftest.py).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ppo_ext  # noqa: E402
from helpers import (ADV_SHAPES, AGG_MODES, COUNT_NAMES, GRAD_RTOL, LOSS_TYPES, METRIC_TOL,  # noqa: E402
                     family_is_modes, same_bits)
from ppo_ext.names import KL_ESTIMATORS  # noqa: E402
from ppo_ext.reference import policy_loss_reference  # noqa: E402

LP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OTHER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64, torch.float16,
               torch.bfloat16)
# Sizes at the edges of the kernels' structure: empty, one, primes, around the AVX2/AVX-512 widths
# (8/16 float, 4/8 double lanes) and the 512-token tile.
EDGE_B = (0, 1, 2, 3, 5, 7, 13, 17, 31, 33)
EDGE_T = (0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 257, 511, 512, 513, 1021, 1024, 1031)
MAX_ELEMENTS = 40_000
MARGIN = 1e-4  # distance kept from every boundary, in log-ratio space

# Layouts: how a (B, T) tensor with given values is laid out in memory.
LAYOUTS = ("contiguous", "transposed", "column-sliced", "row-sliced")
BROADCAST = "expanded"  # stride 0 along T (advantages) or along B (old, mask, weights): same values repeated


# ----------------------------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw):
    B = draw(st.one_of(st.sampled_from(EDGE_B), st.integers(0, 40)))
    T = draw(st.one_of(st.sampled_from(EDGE_T), st.integers(0, 1100)))
    assume(B * T <= MAX_ELEMENTS)
    c = dict(B=B, T=T, seed=draw(st.integers(0, 2**31 - 1)))
    c["lp_dtype"] = draw(st.sampled_from(LP_DTYPES))
    c["old"] = draw(st.sampled_from(("given", "given", "given", "on-policy")))
    c["old_dtype"] = draw(st.sampled_from(OTHER_DTYPES))
    c["adv_shape"] = draw(st.sampled_from(ADV_SHAPES))
    c["adv_dtype"] = draw(st.sampled_from(OTHER_DTYPES))
    c["weights"] = draw(st.booleans())
    c["w_dtype"] = draw(st.sampled_from(OTHER_DTYPES))
    c["mask"] = draw(st.sampled_from(("random", "random", "none", "all-valid", "all-masked", "one-token-per-row",
                                      "empty-rows", "spans", "sparse")))
    c["density"] = draw(st.floats(0.05, 1.0))
    c["mask_dtype"] = draw(st.sampled_from(MASK_DTYPES))
    # the value that marks a valid token: any non-zero value, down to the dtype's smallest subnormal
    c["mask_value"] = draw(st.sampled_from((1, 1, 7, -3, 0.5, "tiny")))
    c["garbage"] = draw(st.sampled_from((None, None, "nan", "inf", "-inf", "huge", "mixed")))
    # Layouts (the advantages' "expanded" is (B, 1).expand(B, T); old/mask/weights' is (1, T).expand(B, T)).
    c["lp_layout"] = draw(st.sampled_from(LAYOUTS))
    c["old_layout"] = draw(st.sampled_from(LAYOUTS + (BROADCAST,)))
    c["adv_layout"] = draw(st.sampled_from(LAYOUTS + (BROADCAST,)))
    c["mask_layout"] = draw(st.sampled_from(LAYOUTS + (BROADCAST,)))
    c["w_layout"] = draw(st.sampled_from(LAYOUTS + (BROADCAST,)))
    # Values: log-ratio spread, and scales 2^k of advantages and weights (kept where the float32
    # arithmetic and, for float16 log_probs, the float16 gradient stay in their normal range).
    c["spread"] = draw(st.sampled_from((0.01, 0.3, 1.0, 3.0)))
    lo_k, hi_k = (-4, 4) if c["lp_dtype"] == torch.float16 else (-90, 70)
    if c["adv_dtype"] == torch.float16:
        lo_k, hi_k = max(lo_k, -10), min(hi_k, 12)
    c["adv_exp"] = draw(st.one_of(st.just(0), st.integers(lo_k, hi_k)))
    c["w_exp"] = draw(st.one_of(st.just(0), st.integers(-8, 8)))
    if c["w_dtype"] == torch.float16 or c["lp_dtype"] == torch.float16:
        c["w_exp"] = max(min(c["w_exp"], 4), -4)
    # Options: the loss family (vanilla drawn as often as all the others together), then its options.
    loss_type = draw(st.sampled_from(("vanilla",) * (len(LOSS_TYPES) - 1) + LOSS_TYPES[1:]))
    if loss_type == "value":  # returns squared: beyond 2^55 (times weights up to 2^8) they overflow float32
        c["adv_exp"] = min(c["adv_exp"], 55)
    opts = dict(
        loss_type=loss_type,
        importance_sampling=draw(st.sampled_from(family_is_modes(loss_type))),
        loss_agg_mode=draw(st.sampled_from(AGG_MODES)),
        clip_low=draw(st.one_of(st.sampled_from((0.0, 0.2, 0.1)), st.floats(0.0, 0.95))),
        clip_high=draw(st.one_of(st.none(), st.sampled_from((0.0, 0.28)), st.floats(0.0, 3.0))),
        dual_clip=draw(st.one_of(st.none(), st.sampled_from((3.0, 1.5)), st.floats(1.01, 10.0))),
        log_ratio_clamp=draw(st.one_of(st.none(), st.sampled_from((0.45, 20.0)), st.floats(0.05, 20.0))),
    )
    if loss_type != "vanilla":
        opts["dual_clip"] = None  # vanilla's alone
    if loss_type in ("value", "vespo"):
        opts["log_ratio_clamp"] = None  # no ratio (value), its own clamp (vespo)
    if loss_type == "vespo":
        opts.update({name: draw(st.floats(0.1, 4.0)) for name in
                     ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")})
    if loss_type == "sapo":
        opts.update(tau_pos=draw(st.floats(0.1, 5.0)), tau_neg=draw(st.floats(0.1, 5.0)))
    if loss_type == "dro":
        opts["dro_beta"] = draw(st.floats(0.01, 2.0))
    if loss_type in ("vanilla", "dppo_tv", "dppo_kl"):
        opts["ratio_cap"] = draw(st.one_of(st.none(), st.none(), st.floats(1.05, 5.0)))
    # No ties between the option-level boundaries themselves (a clamped log-ratio sits exactly at +-K, so
    # +-K must not be where a clip or the dual clip starts; nor may 1 + eps_hi be the dual-clip constant).
    eps_hi = opts["clip_low"] if opts["clip_high"] is None else opts["clip_high"]
    caps = [math.log1p(-opts["clip_low"]), math.log1p(eps_hi)]
    if opts["dual_clip"] is not None:
        assume(abs(math.log(opts["dual_clip"]) - math.log1p(eps_hi)) > 10 * MARGIN)
        caps.append(math.log(opts["dual_clip"]))
    if opts["log_ratio_clamp"] is not None:
        K = opts["log_ratio_clamp"]
        assume(all(abs(abs(b) - K) > 10 * MARGIN for b in caps))
    # The KL to a reference policy (not for the value loss): its estimator and options, ref = lp + noise.
    c["ref"] = draw(st.sampled_from((None, None, "given"))) if loss_type != "value" else None
    if c["ref"] is not None:
        c["ref_dtype"] = draw(st.sampled_from(OTHER_DTYPES))
        c["ref_layout"] = draw(st.sampled_from(LAYOUTS + (BROADCAST,)))
        c["ref_spread"] = draw(st.sampled_from((0.01, 0.5, 2.0)))
        opts.update(kl_coef=draw(st.one_of(st.just(0.0), st.floats(0.0, 2.0))),
                    kl_estimator=draw(st.sampled_from(KL_ESTIMATORS + tuple(e + "+" for e in KL_ESTIMATORS))),
                    kl_bias_correction=draw(st.booleans()),
                    kl_clamp=draw(st.one_of(st.none(), st.none(), st.just(math.inf), st.floats(0.5, 20.0))))
    for name in ("num_tokens", "num_seqs", "loss_scale_factor"):
        kind = draw(st.sampled_from((None, None, "number", "tensor")))
        if kind is not None:
            # (not below 1/2 except 0: 1e-93 would overflow the float32 loss, legitimately)
            value = draw(st.one_of(st.sampled_from((0, 1, 3, 1000)), st.floats(0.5, 1e4)))
            if kind == "tensor":
                value = ("tensor", value, draw(st.sampled_from((torch.float32, torch.float64, torch.int64))))
            opts[name] = value
    c["opts"] = opts
    return c


def _layout(values, kind, device):
    """`values` (B, T) in the given memory layout; returns (tensor, leaf, to_grad): the tensor to pass,
    the leaf holding its storage, and how to read a (B, T) gradient back out of the leaf's gradient."""
    B, T = values.shape
    if kind == "contiguous":
        leaf = values.clone().to(device)
        return leaf, leaf, lambda g: g
    if kind == "transposed":
        leaf = values.t().contiguous().to(device)
        return leaf.t(), leaf, lambda g: g.t()
    if kind == "column-sliced":
        leaf = torch.zeros(B, 2 * T + 1, dtype=values.dtype).to(device)
        leaf[:, 1::2] = values.to(device)
        return leaf[:, 1::2], leaf, lambda g: g[:, 1::2]
    if kind == "row-sliced":
        leaf = torch.zeros(2 * B + 1, T, dtype=values.dtype).to(device)
        leaf[1::2] = values.to(device)
        return leaf[1::2], leaf, lambda g: g[1::2]
    raise AssertionError(kind)


def _nudge(x, dtype, where):
    """x (float64) moved by a few units in the last place of `dtype` (at least 10 * MARGIN) where `where`."""
    finfo = torch.finfo(dtype)
    step = torch.clamp(4 * finfo.eps * x.abs(), min=10 * MARGIN)
    return torch.where(where, (x + step).to(dtype).double(), x)


def build(c, device):
    """The tensors of a case: values drawn from c['seed'], rounded to their dtypes, moved off boundaries."""
    B, T = c["B"], c["T"]
    opts = dict(c["opts"])
    g = torch.Generator().manual_seed(c["seed"])

    # Mask (valid positions).
    kind = c["mask"]
    if kind in ("none", "all-valid"):
        valid = torch.ones(B, T, dtype=torch.bool)
    elif kind == "all-masked":
        valid = torch.zeros(B, T, dtype=torch.bool)
    elif kind == "one-token-per-row":
        valid = torch.zeros(B, T, dtype=torch.bool)
        if T:
            valid[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    elif kind == "empty-rows":
        valid = torch.rand(B, T, generator=g) < c["density"]
        valid[torch.rand(B, generator=g) < 0.5] = False
    elif kind == "spans":  # prompt + response + padding: a contiguous span per row
        start = torch.randint(0, T + 1, (B,), generator=g)
        length = torch.randint(0, T + 1, (B,), generator=g)
        t = torch.arange(T)
        valid = (t[None] >= start[:, None]) & (t[None] < (start + length)[:, None])
    elif kind == "sparse":
        valid = torch.rand(B, T, generator=g) < 0.02
    else:
        valid = torch.rand(B, T, generator=g) < c["density"]
    if c["mask_layout"] == BROADCAST and B:  # every row the same mask
        valid = valid[:1].expand(B, T).clone()

    # Values in float64, then rounded to their dtypes.
    lp_dtype = c["lp_dtype"]
    lp = (-5 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(lp_dtype).double()
    old = None
    if c["old"] == "given":
        row = c["spread"] * (2 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 1)
        noise = c["spread"] * torch.randn(B, T, generator=g, dtype=torch.float64)
        old = lp - row - noise  # d = lp - old = row offset + noise
        if c["old_layout"] == BROADCAST and B:
            old = old[:1].expand(B, T).clone()
        old = old.to(c["old_dtype"]).double()
    adv_scale = 2.0 ** c["adv_exp"]
    adv_col = (torch.randn(B, 1, generator=g, dtype=torch.float64) * adv_scale).to(c["adv_dtype"]).double()
    adv_per_row = c["adv_shape"] != "BT" or c["adv_layout"] == BROADCAST
    if adv_per_row:
        adv = adv_col.expand(B, T).clone()
    else:
        adv = (torch.randn(B, T, generator=g, dtype=torch.float64) * adv_scale).to(c["adv_dtype"]).double()
    w_scale = 2.0 ** c["w_exp"]
    w = None
    if c["weights"]:
        w = 2 * torch.rand(B, T, generator=g, dtype=torch.float64) * w_scale
        if c["w_layout"] == BROADCAST and B:
            w = w[:1].expand(B, T).clone()
        w = w.to(c["w_dtype"]).double()

    # Keep every token's (and, for the sequence ratio, every row's) log ratio MARGIN away from the
    # boundaries, by nudging log_probs (the one tensor that is never broadcast).
    eps_lo = opts["clip_low"]
    eps_hi = eps_lo if opts["clip_high"] is None else opts["clip_high"]
    bounds = [math.log1p(-eps_lo), math.log1p(eps_hi)]
    if opts["loss_type"] in ("geo_mean", "value"):  # their bounds on the log-ratio (geo_mean) or v - v_old itself
        bounds += [-eps_lo, eps_hi]
    if opts.get("ratio_cap") is not None:
        bounds.append(math.log(opts["ratio_cap"]))
    if opts["dual_clip"] is not None:
        bounds.append(math.log(opts["dual_clip"]))
    if opts["log_ratio_clamp"] is not None:
        bounds += [opts["log_ratio_clamp"], -opts["log_ratio_clamp"]]
    if old is not None:
        for _ in range(200):
            d = lp - old
            near_tok = torch.zeros(B, T, dtype=torch.bool)
            dbar = torch.where(valid, d, 0).sum(1) / valid.sum(1).clamp(min=1)
            near_row = torch.zeros(B, dtype=torch.bool)
            for b in bounds:
                near_tok |= (d - b).abs() < MARGIN
                near_row |= (dbar - b).abs() < MARGIN
            # Token level: the tokens near a boundary; sequence level: every token of a row whose mean is.
            if c["opts"]["importance_sampling"] == "token":
                near = near_tok & valid
            else:
                near = near_row[:, None] & valid
            if not near.any():
                break
            lp = _nudge(lp, lp_dtype, near)
        else:
            raise AssertionError("could not move the inputs off the boundaries")

    # The reference policy's log-probs, rounded to their dtype, each k = lp - ref kept MARGIN (relative) off the
    # estimator's kinks and clamps (abs at 0, k3's first clamp at +-20, the value clamp) by moving ref.
    ref = None
    if c.get("ref") is not None:
        ref = lp + c["ref_spread"] * torch.randn(B, T, generator=g, dtype=torch.float64)
        if c["ref_layout"] == BROADCAST and B:
            ref = ref[:1].expand(B, T).clone()
        ref = ref.to(c["ref_dtype"]).double()
        for _ in range(200):
            k = lp - ref
            near = _near_kl_kink(k, opts) & valid
            if not near.any():
                break
            ref = torch.where(near.any(0, keepdim=True) if c["ref_layout"] == BROADCAST else near,
                              _nudge(ref, c["ref_dtype"], torch.ones_like(near)), ref)
        else:
            raise AssertionError("could not move the reference off the estimator's kinks")

    # Garbage at masked positions: it must change nothing.
    def spoil(x, broadcast):
        if c["garbage"] is None or x is None or broadcast:
            return x
        junk = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e300}.get(c["garbage"])
        if junk is None:  # mixed
            choice = torch.randint(0, 3, (B, T), generator=g)
            junk = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[choice]
        return torch.where(valid, x, junk)

    lp_g = spoil(lp, False)
    old_g = spoil(old, c["old_layout"] == BROADCAST)
    adv_g = adv if adv_per_row else spoil(adv, False)
    adv_col_g = adv_col
    if c["adv_shape"] != "BT" and c["garbage"] is not None:  # a per-row advantage is garbage only for empty rows
        adv_col_g = torch.where(valid.any(1, keepdim=True), adv_col, math.nan)
    w_g = spoil(w, c["w_layout"] == BROADCAST)

    # The tensors as given to ppo_ext (rounded garbage included), in their layouts.
    def rounded(x, dtype):
        return None if x is None else x.to(dtype)

    lp_t, lp_leaf, lp_to_grad = _layout(rounded(lp_g, lp_dtype), c["lp_layout"], device)
    old_t = None if old is None else _make(rounded(old_g, c["old_dtype"]), c["old_layout"], device)
    if c["adv_shape"] == "BT" and c["adv_layout"] == BROADCAST:
        adv_t = adv_col.to(c["adv_dtype"]).to(device).expand(B, T)
    elif c["adv_shape"] == "BT":
        adv_t = _make(rounded(adv_g, c["adv_dtype"]), c["adv_layout"], device)
    else:
        col = rounded(adv_col_g, c["adv_dtype"])
        adv_t = col.to(device) if c["adv_shape"] == "B1" else col[:, 0].to(device)
        if c["adv_layout"] in ("column-sliced", "row-sliced") and B:  # a strided (B,) / (B, 1) view
            wide = torch.zeros(2 * B + 1, *col.shape[1:], dtype=col.dtype).to(device)
            wide[1::2] = col.to(device) if c["adv_shape"] == "B1" else col[:, :1].to(device)
            adv_t = wide[1::2] if c["adv_shape"] == "B1" else wide[1::2, 0]
    mask_t = None
    if kind != "none":
        mask_values = valid.to(c["mask_dtype"])
        value = c.get("mask_value", 7)
        if c["mask_dtype"] == torch.bool or (c["mask_dtype"] == torch.uint8 and value == -3):
            value = 1
        elif value == "tiny":
            value = torch.finfo(c["mask_dtype"]).tiny * torch.finfo(c["mask_dtype"]).eps \
                if c["mask_dtype"].is_floating_point else 1
        elif not c["mask_dtype"].is_floating_point and value == 0.5:
            value = 2
        mask_values = torch.where(valid, torch.tensor(value, dtype=c["mask_dtype"]), torch.tensor(0, dtype=c["mask_dtype"]))
        mask_t = _make(mask_values, c["mask_layout"], device)
    w_t = None if w is None else _make(rounded(w_g, c["w_dtype"]), c["w_layout"], device)
    if ref is not None:
        opts["ref_log_probs"] = _make(rounded(spoil(ref, c["ref_layout"] == BROADCAST), c["ref_dtype"]),
                                      c["ref_layout"], device)

    for name in ("num_tokens", "num_seqs", "loss_scale_factor"):
        v = opts.get(name)
        if isinstance(v, tuple):
            _, value, dtype = v
            opts[name] = torch.tensor(int(value) if dtype == torch.int64 else value, dtype=dtype, device=device)
    return dict(lp=lp_t, lp_leaf=lp_leaf, lp_to_grad=lp_to_grad, old=old_t, adv=adv_t, mask=mask_t, w=w_t,
                valid=valid, opts=opts,
                clean=dict(lp=lp, old=old, adv=adv, w=w, ref=ref))  # float64, garbage-free, for the magnitudes


def _kl_value(k, opts):
    """The estimator's value before its clamps (k3: ref/pi - log(ref/pi) - 1), in float64."""
    estimator = opts["kl_estimator"].rstrip("+")
    if estimator in ("kl", "k1"):
        return k
    if estimator == "abs":
        return k.abs()
    if estimator in ("mse", "k2"):
        return 0.5 * k * k
    return torch.expm1(-k) + k


def _near_kl_kink(k, opts):
    """Tokens whose k = lp - ref (or the estimator's value) lies within MARGIN (relative) of a kink or a clamp."""
    near = k.abs() < MARGIN  # abs's kink (and every estimator's sign change)
    value = _kl_value(k, opts)
    clamp = opts.get("kl_clamp")
    if clamp is None and opts["kl_estimator"].rstrip("+") in ("low_var_kl", "k3"):
        near |= (k.abs() - 20).abs() < MARGIN * 20
        clamp = 10.0
    if clamp is not None and math.isfinite(clamp):
        near |= (value.abs() - clamp).abs() < MARGIN * clamp
    return near


def _make(values, layout, device):
    """`values` (B, T) in `layout`; BROADCAST is a stride-0 view of the first row."""
    if layout == BROADCAST:
        B, T = values.shape
        return values[:1].to(device).expand(B, T) if B else values.to(device)
    return _layout(values, layout, device)[0]


# ----------------------------------------------------------------------------------------------------------
# Comparison


def _denominator(mode, opts, n, T):
    N, S = float(n.sum()), float((n > 0).sum())

    def given(name, default):
        v = opts.get(name)
        return default if v is None else float(v)

    if mode == "token-mean":
        return given("num_tokens", N)
    if mode == "token-sum":
        return 1.0
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return given("num_seqs", S)
    return given("num_seqs", S) * given("loss_scale_factor", float(T))


def _magnitudes(x, valid, opts, T):
    """(M, G): the float64 sum of a bound of |per-token loss term| / denominator, and the per-element bound of
    |d loss / d lp| (what float32 rounding errors scale with), the bound of each family's per-token loss with
    |A| w (|lp|, |d|, ...) in place of every signed factor."""
    B = valid.shape[0]
    eps_lo = opts["clip_low"]
    eps_hi = eps_lo if opts["clip_high"] is None else opts["clip_high"]
    K = opts["log_ratio_clamp"]
    loss_type = opts["loss_type"]
    zero = torch.zeros((), dtype=torch.float64)
    A = torch.where(valid, x["adv"].abs(), zero)
    w = torch.ones(B, T, dtype=torch.float64) if x["w"] is None else x["w"].abs()
    Aw = torch.where(valid, A * w, zero)
    n = valid.sum(1)
    lp = torch.where(valid, x["lp"], zero)
    d = torch.zeros(B, T, dtype=torch.float64) if x["old"] is None else torch.where(valid, x["lp"] - x["old"], zero)
    q = d
    if loss_type == "geo_mean":
        q = torch.where(x["adv"] > 0, d.clamp(max=eps_hi), torch.where(x["adv"] < 0, d.clamp(min=-eps_lo), zero))
    if opts["importance_sampling"] == "token":
        r = torch.exp(d if K is None else d.clamp(-K, K))
    else:
        qbar = torch.where(valid, q, zero).sum(1, keepdim=True) / n.clamp(min=1)[:, None]
        r = torch.exp(qbar if K is None else qbar.clamp(-K, K)).expand(B, T)
    big_r = torch.maximum(r, torch.full_like(r, 1 + eps_hi))
    size = torch.maximum(lp.abs(), torch.ones_like(lp))
    if loss_type in ("vanilla", "geo_mean"):
        bound = Aw * big_r
    elif loss_type in ("cispo", "dppo_tv", "dppo_kl"):
        bound = Aw * big_r * size
    elif loss_type == "sapo":
        bound = Aw * torch.maximum(r, torch.full_like(r, 4 / min(opts["tau_pos"], opts["tau_neg"])))
    elif loss_type == "gpg":
        bound = Aw * size
    elif loss_type == "dro":
        # (the penalty's d = lp - old is computed from float32 roundings of lp and old: an error of eps |lp|)
        bound = w * (A * size + opts["dro_beta"] * (d * d + d.abs() + size))
    elif loss_type == "vespo":
        # -phi A lp, phi = exp(lam + k log w - lam w): an error e in the row's log-weight (a sum of |d|-sized
        # terms) changes phi by |k - lam w| e relative; below float32's smallest normal phi underflows (to 0)
        log_w = torch.where(valid, d.clamp(-20, 20), zero).sum(1, keepdim=True).clamp(math.log(1e-8), 20)
        nonneg = x["adv"] >= 0
        k = torch.where(nonneg, opts["vespo_k_pos"], opts["vespo_k_neg"])
        lam = torch.where(nonneg, opts["vespo_lambda_pos"], opts["vespo_lambda_neg"])
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).clamp(min=torch.finfo(torch.float32).tiny)
        spread = torch.where(valid, d.abs(), zero).sum(1, keepdim=True) + 1
        bound = Aw * size * phi * (1 + (k - lam * torch.exp(log_w)).abs() * spread)
    else:  # value: w (|v - R| + eps + 1)^2
        bound = w * (torch.where(valid, (x["lp"] - x["adv"]).abs(), zero) + eps_lo + eps_hi + 1) ** 2
    kl_bound = torch.zeros(B, T, dtype=torch.float64)
    if x.get("ref") is not None:
        # the estimator's value and derivative in float32, from k = lp - ref: rounding errors of the size of its
        # terms (e^-k, |k|, k^2), times the ratio when bias-corrected (and its derivative, r times the value)
        k = torch.where(valid, x["lp"] - x["ref"], zero)
        kl_bound = 1 + k.abs() + k * k + torch.exp((-k).clamp(max=30))
        if opts["kl_bias_correction"]:
            kl_bound = kl_bound * big_r * (1 + kl_bound)
        kl_bound = torch.where(valid, kl_bound, zero)
        bound = bound + opts["kl_coef"] * kl_bound
    bound = torch.where(valid, bound, zero)
    mode = opts["loss_agg_mode"]
    den = _denominator(mode, opts, n, T)
    inv = 0.0 if den == 0 else 1.0 / den
    agg = (1.0 / n.clamp(min=1).double())[:, None] if mode == "seq-mean-token-mean" else torch.ones(B, 1, dtype=torch.float64)
    term = bound * agg * inv
    M = float(term.sum())
    # the KL's metrics: kl_loss aggregated as the loss, kl the mean over valid tokens
    KL = dict(kl_loss=float((kl_bound * agg * inv).sum()), kl=float(kl_bound.sum()) / max(1, int(n.sum())))
    if opts["importance_sampling"] == "seq":
        G = (term.sum(1, keepdim=True) / n.clamp(min=1)[:, None]).expand(B, T)
        G = torch.where(valid, G + term, zero)  # through the mean, plus a direct term
    else:
        G = term
    return M, G, KL


def _decisions_clear(x, valid, opts):
    """Whether every valid token is clear of the decisions the log-ratio nudge does not cover (dppo's keep
    thresholds on probabilities, the value loss's choice between two terms outside the clip range), by a
    relative 1e-5: there float32 and float64 may decide differently, and a count or a term flips."""
    loss_type = opts["loss_type"]
    if x["old"] is None or loss_type not in ("dppo_tv", "dppo_kl", "value"):
        return True
    lp, old, adv = x["lp"], x["old"], x["adv"]
    eps_lo = opts["clip_low"]
    eps_hi = eps_lo if opts["clip_high"] is None else opts["clip_high"]
    if loss_type == "value":
        v_clip = torch.minimum(torch.maximum(lp, old - eps_lo), old + eps_hi)
        gap = ((lp - adv).abs() - (v_clip - adv).abs()).abs()
        ok = (gap > 1e-5 * (lp.abs() + adv.abs() + 1)) | (v_clip == lp)
        return bool(ok[valid].all())
    p, p_old = lp.exp(), old.exp()
    if loss_type == "dppo_tv":
        stats = [(p - p_old, eps_hi), (p - p_old, -eps_lo)]
    else:
        bkl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        # (a log-prob > 0 makes the binary KL NaN, in both precisions alike unless 1 - p is near 0)
        stats = [(bkl, eps_hi), (bkl, eps_lo), (p, p_old), (p, 1.0), (p_old, 1.0)]
    # not near (a NaN statistic is not near anything)
    return all(bool((~((stat - t).abs() <= 1e-5 * (t.abs() if torch.is_tensor(t) else abs(t)) + 1e-7))[valid].all())
               for stat, t in stats)


def _assert_within(actual, expected, rtol, atol, what):
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    both_nan = actual.isnan() & expected.isnan()
    same = actual == expected  # infinities of the same sign
    err = (actual - expected).abs()
    ok = both_nan | same | (err <= rtol * expected.abs() + atol)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        detail = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad] if actual.dim() else \
            [(actual.item(), expected.item())]
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} out of tolerance "
                             f"(rtol {rtol}, atol max {float(torch.as_tensor(atol).max()):.3g}); first: {detail}")


def _clear_or_fail(clear):
    assert clear, "a fixed case lies on a decision boundary of its family (pick another seed)"


def run_case(c, device, require=_clear_or_fail):
    """One case against the reference; `require` is given whether the case is clear of the decisions float32
    and float64 may take differently (hypothesis' assume in the property test: such draws are discarded)."""
    x = build(c, device)
    opts = x["opts"]
    lp_dtype = c["lp_dtype"]
    leaf = x["lp_leaf"].detach().requires_grad_(True)
    lp_view = {"contiguous": lambda t: t, "transposed": lambda t: t.t(),
               "column-sliced": lambda t: t[:, 1::2], "row-sliced": lambda t: t[1::2]}[c["lp_layout"]](leaf)
    inputs_before = [t.clone() for t in (x["old"], x["adv"], x["mask"], x["w"]) if t is not None]
    out = ppo_ext.policy_loss(lp_view, x["old"], x["adv"], x["mask"], token_weights=x["w"], **opts)
    out.loss.backward()
    ext_grad_full = leaf.grad
    ext_grad = x["lp_to_grad"](ext_grad_full)

    # The reference, in float64, on the rounded values (garbage included: it must ignore it too).
    f64 = lambda t: None if t is None else t.detach().cpu().to(torch.float64)  # noqa: E731
    ref_lp = f64(lp_view).requires_grad_(True)
    ref_opts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    ref = policy_loss_reference(ref_lp, f64(x["old"]), f64(x["adv"]), None if x["mask"] is None else x["mask"].cpu(),
                                token_weights=f64(x["w"]), **ref_opts)
    ref.loss.backward()

    T = c["T"]
    require(_decisions_clear(x["clean"], x["valid"], opts))
    M, G, KL = _magnitudes(x["clean"], x["valid"], opts, T)
    # loss
    assert out.loss.dtype == (torch.float64 if lp_dtype == torch.float64 else torch.float32)
    assert out.loss.shape == () and out.loss.device.type == torch.device(device).type
    if lp_dtype == torch.float64:
        _assert_within(out.loss, ref.loss.detach(), 1e-10, 1e-12 * M, "loss")
    else:
        _assert_within(out.loss, ref.loss.detach(), 1e-5, 4e-6 * M, "loss")
    assert torch.isfinite(out.loss), "garbage at masked positions, or nothing at all, gave a non-finite loss"
    # gradient: dtype, shape, values; zero at masked positions; nothing outside the view of the leaf
    assert ext_grad.dtype == lp_dtype and ext_grad.shape == (c["B"], T)
    finfo = torch.finfo(lp_dtype)
    sub = finfo.tiny * finfo.eps
    rtol = GRAD_RTOL[lp_dtype]
    atol = (1e-12 if lp_dtype == torch.float64 else 4e-6) * G + sub
    # (the reference gradient rounded to lp's dtype, as docs/SPEC.md returns it: both overflow float16 alike)
    _assert_within(ext_grad, ref_lp.grad.to(lp_dtype), rtol, atol, "gradient")
    assert bool((ext_grad.cpu()[~x["valid"]] == 0).all()), "non-zero gradient at a masked position"
    outside = torch.ones_like(ext_grad_full, dtype=torch.bool)
    x["lp_to_grad"](outside).fill_(False)
    assert bool((ext_grad_full[outside] == 0).all()), "gradient outside the view of log_probs"
    # metrics and counts
    for k in ppo_ext.METRIC_NAMES:
        v = out.metrics[k]
        assert v.dtype == torch.float32 and v.shape == () and not v.requires_grad, (k, v)
        # kl and kl_loss: sums of terms of either sign (k1), their rounding scales with the size of the terms
        atol = METRIC_TOL[1] + 4e-6 * KL.get(k, 0.0)
        _assert_within(v, ref.metrics[k], METRIC_TOL[0], atol, f"metric {k}")
    assert out.counts.dtype == torch.int64 and out.counts.shape == (len(COUNT_NAMES),)
    assert out.counts.cpu().tolist() == ref.counts.tolist(), \
        f"counts {out.counts.tolist()} != reference {ref.counts.tolist()} ({ppo_ext.COUNT_NAMES})"
    # the other inputs are not modified
    after = [t for t in (x["old"], x["adv"], x["mask"], x["w"]) if t is not None]
    for b, a in zip(inputs_before, after):
        assert same_bits(b, a), "an input was modified"


@settings(max_examples=5 * settings().max_examples)  # 300 in the "ci" profile, 15,000 in "slow"
@given(c=cases())
def test_fuzz_against_float64_reference(device, c):
    run_case(c, device, require=assume)


# Hand-picked cases hypothesis must always cover (explicit examples run in every profile).
def _case(**kw):
    base = dict(B=5, T=33, seed=1, lp_dtype=torch.float32, old="given", old_dtype=torch.float32, adv_shape="BT",
                adv_dtype=torch.float32, weights=True, w_dtype=torch.float32, mask="random", density=0.7,
                mask_dtype=torch.bool, garbage=None, lp_layout="contiguous", old_layout="contiguous",
                adv_layout="contiguous", mask_layout="contiguous", w_layout="contiguous", spread=0.3, adv_exp=0,
                w_exp=0, opts=dict(loss_type="vanilla", importance_sampling="token", loss_agg_mode="token-mean", clip_low=0.2,
                                   clip_high=0.28, dual_clip=None, log_ratio_clamp=None))
    opts = dict(base["opts"])
    opts.update(kw.pop("opts", {}))
    base.update(kw)
    base["opts"] = opts
    return base


FIXED = {
    "empty-batch": _case(B=0, T=0),
    **{f"family-{f}": _case(B=7, T=65, spread=1.0, mask="empty-rows", opts=dict(
        loss_type=f, importance_sampling=family_is_modes(f)[-1], loss_agg_mode="seq-mean-token-mean",
        **dict(sapo=dict(tau_pos=0.7, tau_neg=1.6), dro=dict(dro_beta=0.3),
               vespo=dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)).get(f, {})))
       for f in LOSS_TYPES[1:]},
    # (found by the fuzz) vespo's weight below float32's range: 0 in float32, 5e-66 in float64
    "vespo-weight-underflow": _case(B=5, T=36, seed=4857, weights=False, mask="empty-rows", density=0.25,
                                    old_layout="expanded", spread=0.01, opts=dict(
                                        loss_type="vespo", clip_low=0.0, clip_high=None, vespo_k_pos=1.0,
                                        vespo_lambda_pos=1.0, vespo_k_neg=1.0, vespo_lambda_neg=1.0)),
    **{f"ref-kl-{e}": _case(B=6, T=70, ref="given", ref_dtype=torch.float32, ref_layout="transposed", ref_spread=2.0,
                            garbage="nan", opts=dict(importance_sampling=("token", "seq", "seq-token")[i % 3],
                                                     loss_agg_mode=AGG_MODES[i % len(AGG_MODES)], kl_coef=0.7,
                                                     kl_estimator=e, kl_bias_correction=i % 2 == 1,
                                                     kl_clamp=(None, None, math.inf, 3.0)[i % 4]))
       for i, e in enumerate(KL_ESTIMATORS + ("k3+", "kl+"))},
    "no-tokens": _case(B=4, T=0),
    "no-rows": _case(B=0, T=17),
    "all-masked-seq-mean": _case(mask="all-masked", opts=dict(loss_agg_mode="seq-mean-token-mean")),
    "one-token": _case(B=1, T=1, mask="all-valid", opts=dict(importance_sampling="seq")),
    "tile-edge-transposed": _case(B=3, T=513, lp_layout="transposed", old_layout="column-sliced",
                                  adv_layout="expanded", mask_layout="row-sliced", w_layout="expanded"),
    "bf16-seq-dual-clamp": _case(lp_dtype=torch.bfloat16, old_dtype=torch.bfloat16, spread=1.0,
                                 opts=dict(importance_sampling="seq", dual_clip=3.0, log_ratio_clamp=0.45)),
    "f16-seq-token-garbage": _case(lp_dtype=torch.float16, old_dtype=torch.float16, garbage="mixed",
                                   mask_dtype=torch.float32, opts=dict(importance_sampling="seq-token")),
    "f64-everything": _case(lp_dtype=torch.float64, old_dtype=torch.float64, adv_dtype=torch.float64,
                            w_dtype=torch.float64, mask_dtype=torch.float64, adv_shape="B", garbage="nan",
                            opts=dict(dual_clip=2.0, log_ratio_clamp=0.3,
                                      loss_agg_mode="seq-mean-token-sum-norm", num_seqs=4, loss_scale_factor=64)),
    "zero-normalisers": _case(opts=dict(num_tokens=0, num_seqs=0, loss_scale_factor=0.0)),
    "huge-adv": _case(adv_exp=90, opts=dict(loss_agg_mode="token-sum")),
    "tiny-adv": _case(adv_exp=-90, opts=dict(loss_agg_mode="seq-mean-token-mean")),
    "on-policy-eps-zero": _case(old="on-policy", opts=dict(clip_low=0.0, clip_high=0.0)),
    "spans-int-mask": _case(B=17, T=1031, mask="spans", mask_dtype=torch.int64, adv_shape="B1"),
    # docs/SPEC.md: "m: bool, uint8, integer or floating (non-zero = valid)": 5e-324 is non-zero.
    "f64-mask-subnormal-values": _case(mask_dtype=torch.float64, mask_value="tiny"),
    "f32-mask-subnormal-values": _case(mask_dtype=torch.float32, mask_value="tiny", opts=dict(importance_sampling="seq")),
    "negative-mask-values": _case(mask_dtype=torch.int8, mask_value=-3, opts=dict(loss_agg_mode="seq-mean-token-mean")),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_cases_against_float64_reference(device, name):
    run_case(FIXED[name], device)
