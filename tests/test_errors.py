"""Bad calls: every wrong shape, dtype, device, mode, epsilon, clamp and normaliser raises an error that
names the argument (docs/SPEC.md "Dtypes, shapes, devices": "a mismatch, a wrong shape, a bad dtype, an unknown
mode, eps < 0, c <= 1, K <= 0 raise a clear error naming the argument"), never a crash, a garbage result
or an error from deep inside the kernels. Accepted-but-unusual inputs (every floating dtype of docs/SPEC.md,
every integer mask dtype) must work or be refused by name."""

import math

import numpy as np
import pytest
import torch

import ppo_ext
from helpers import make_inputs
from ppo_ext.reference import policy_loss_reference

B, T = 3, 5
ERRORS = (TypeError, ValueError, RuntimeError)
NOT_OUR_ERRORS = (NotImplementedError, AttributeError)  # "not implemented for 'X'", "'list' has no attribute"


def _inputs(device):
    """Good float32 arguments, by name: log-probs -U(0, 1), log ratios N(0, 0.1), advantages N(0, 1), a bool mask
    of density 0.8, weights U(0, 1)."""
    x = make_inputs(B, T, seed=0, device=device, lp_scale=1.0, row_offset=0.0, row_jitter=0.0, token_noise=0.1,
                    empty_row=False, weight_range=(0.0, 1.0), margin=None)
    return dict(log_probs=x.lp, old_log_probs=x.old, advantages=x.adv, mask=x.mask, token_weights=x.weights)


def _call(kw):
    kw = dict(kw)
    return ppo_ext.policy_loss(kw.pop("log_probs"), kw.pop("old_log_probs"), kw.pop("advantages"), kw.pop("mask"),
                               **kw)


def _assert_names(excinfo, name):
    err = excinfo.value
    assert not isinstance(err, NOT_OUR_ERRORS), f"{type(err).__name__} from inside the library: {err}"
    assert name in str(err), f"the error does not name {name!r}: {type(err).__name__}: {err}"


def _other_device(device):
    """A device the argument must not be on: the CPU for CUDA inputs; 'meta' for CPU inputs (the only
    other device a CPU-only machine has)."""
    return "cpu" if device == "cuda" else "meta"


# (id, argument that must be named, overrides as a function of the good inputs)
BAD_TENSORS = [
    # shapes
    ("lp-1d", "log_probs", lambda x: dict(log_probs=x["log_probs"][0], old_log_probs=None, mask=None,
                                          token_weights=None, advantages=x["advantages"][:1, 0])),
    ("lp-3d", "log_probs", lambda x: dict(log_probs=x["log_probs"][None])),
    ("lp-0d", "log_probs", lambda x: dict(log_probs=x["log_probs"][0, 0])),
    ("old-T+1", "old_log_probs", lambda x: dict(old_log_probs=torch.cat([x["old_log_probs"], x["old_log_probs"][:, :1]], 1))),
    ("old-B-1", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"][1:])),
    ("old-transposed-shape", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].t().contiguous())),
    ("old-1d", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].reshape(-1))),
    ("adv-B2", "advantages", lambda x: dict(advantages=x["advantages"][:, :2])),
    ("adv-T", "advantages", lambda x: dict(advantages=x["advantages"][0])),
    ("adv-0d", "advantages", lambda x: dict(advantages=x["advantages"][0, 0])),
    ("adv-B+1", "advantages", lambda x: dict(advantages=torch.cat([x["advantages"][:, 0], x["advantages"][:1, 0]]))),
    ("adv-1T", "advantages", lambda x: dict(advantages=x["advantages"][:1])),
    ("adv-3d", "advantages", lambda x: dict(advantages=x["advantages"][..., None])),
    ("mask-B1", "mask", lambda x: dict(mask=x["mask"][:, :1])),
    ("mask-1d", "mask", lambda x: dict(mask=x["mask"][0])),
    ("mask-T+1", "mask", lambda x: dict(mask=torch.cat([x["mask"], x["mask"][:, :1]], 1))),
    ("w-B", "token_weights", lambda x: dict(token_weights=x["token_weights"][:, 0])),
    ("w-T-1", "token_weights", lambda x: dict(token_weights=x["token_weights"][:, 1:])),
    # dtypes
    ("lp-int64", "log_probs", lambda x: dict(log_probs=x["log_probs"].long())),
    ("lp-bool", "log_probs", lambda x: dict(log_probs=x["log_probs"].bool())),
    ("lp-uint8", "log_probs", lambda x: dict(log_probs=x["log_probs"].to(torch.uint8))),
    ("lp-complex", "log_probs", lambda x: dict(log_probs=x["log_probs"].to(torch.complex64))),
    ("old-int", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].int())),
    ("old-bool", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].bool())),
    ("old-complex", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].to(torch.complex64))),
    ("adv-int", "advantages", lambda x: dict(advantages=x["advantages"].long())),
    ("adv-bool", "advantages", lambda x: dict(advantages=x["advantages"].bool())),
    ("adv-complex", "advantages", lambda x: dict(advantages=x["advantages"].to(torch.complex128))),
    ("mask-complex", "mask", lambda x: dict(mask=x["mask"].to(torch.complex64))),
    ("w-int", "token_weights", lambda x: dict(token_weights=x["token_weights"].long())),
    ("w-bool", "token_weights", lambda x: dict(token_weights=x["token_weights"].bool())),
    ("w-complex", "token_weights", lambda x: dict(token_weights=x["token_weights"].to(torch.complex64))),
    # not tensors at all
    ("lp-list", "log_probs", lambda x: dict(log_probs=x["log_probs"].tolist())),
    ("lp-numpy", "log_probs", lambda x: dict(log_probs=np.zeros((B, T), dtype=np.float32))),
    ("lp-None", "log_probs", lambda x: dict(log_probs=None)),
    ("old-list", "old_log_probs", lambda x: dict(old_log_probs=x["old_log_probs"].tolist())),
    ("adv-float", "advantages", lambda x: dict(advantages=1.0)),
    ("adv-None", "advantages", lambda x: dict(advantages=None)),
    ("mask-list", "mask", lambda x: dict(mask=x["mask"].tolist())),
    ("w-numpy", "token_weights", lambda x: dict(token_weights=np.ones((B, T), dtype=np.float32))),
]


@pytest.mark.parametrize("name,make", [pytest.param(n, m, id=i) for i, n, m in BAD_TENSORS])
def test_bad_tensor_argument(device, name, make):
    kw = _inputs(device)
    kw.update(make(kw))
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    _assert_names(excinfo, name)


@pytest.mark.parametrize("name", ["old_log_probs", "advantages", "mask", "token_weights"])
def test_tensor_on_wrong_device(device, name):
    kw = _inputs(device)
    kw[name] = kw[name].to(_other_device(device))
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    _assert_names(excinfo, name)


@pytest.mark.parametrize("name", ["old_log_probs", "advantages", "mask", "token_weights"])
def test_log_probs_on_another_device_than(device, name):
    """The other way round: log_probs elsewhere, the argument on the device of the rest."""
    kw = _inputs(device)
    other = _other_device(device)
    kw = {k: (v.to(other) if k != name else v) for k, v in kw.items()}
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    assert name in str(excinfo.value) or "log_probs" in str(excinfo.value), excinfo.value
    assert not isinstance(excinfo.value, NOT_OUR_ERRORS), excinfo.value


BAD_OPTIONS = [
    ("importance_sampling", "Token"), ("importance_sampling", ""), ("importance_sampling", "sequence"),
    ("importance_sampling", None), ("importance_sampling", 1),
    ("loss_agg_mode", "mean"), ("loss_agg_mode", "token_mean"), ("loss_agg_mode", "TOKEN-MEAN"),
    ("loss_agg_mode", None),
    ("clip_low", -0.1), ("clip_low", -1e-12), ("clip_low", math.nan), ("clip_low", math.inf), ("clip_low", -math.inf),
    ("clip_low", None),
    ("clip_high", -0.2), ("clip_high", math.nan), ("clip_high", math.inf),
    ("dual_clip", 1.0), ("dual_clip", 1), ("dual_clip", 0.5), ("dual_clip", -3.0), ("dual_clip", math.nan),
    ("dual_clip", -math.inf),
    ("log_ratio_clamp", 0.0), ("log_ratio_clamp", -1.0), ("log_ratio_clamp", math.nan), ("log_ratio_clamp", -math.inf),
    ("ratio_cap", 0.0), ("ratio_cap", -1.0), ("ratio_cap", math.nan), ("ratio_cap", math.inf), ("ratio_cap", "2"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_option(device, name, value):
    kw = _inputs(device)
    kw[name] = value
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    _assert_names(excinfo, name)


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_option_in_module_constructor(name, value):
    """PolicyLoss validates its options when it is built, not at the first forward."""
    with pytest.raises(ERRORS) as excinfo:
        ppo_ext.PolicyLoss(**{name: value})
    _assert_names(excinfo, name)


def test_per_call_option_in_module_constructor():
    for name in ("token_weights", "num_tokens", "num_seqs", "loss_scale_factor"):
        with pytest.raises(TypeError) as excinfo:
            ppo_ext.PolicyLoss(**{name: 1.0})
        _assert_names(excinfo, name)


NORMALISERS = ("num_tokens", "num_seqs", "loss_scale_factor")
BAD_NORMALISER_VALUES = [
    ("-1", lambda d: -1), ("-1e-9", lambda d: -1e-9), ("nan", lambda d: math.nan), ("inf", lambda d: math.inf),
    ("-inf", lambda d: -math.inf), ("True", lambda d: True), ("str", lambda d: "3"), ("list", lambda d: [3.0]),
    ("tensor-1", lambda d: torch.tensor([3.0], device=d)), ("tensor-2x2", lambda d: torch.ones(2, 2, device=d)),
    ("tensor-bool", lambda d: torch.tensor(True, device=d)),
    ("tensor-complex", lambda d: torch.tensor(3 + 0j, device=d)),
    ("tensor-wrong-device", lambda d: torch.tensor(3.0, device=_other_device(d))),
]


@pytest.mark.parametrize("which", NORMALISERS)
@pytest.mark.parametrize("value", [v for _, v in BAD_NORMALISER_VALUES], ids=[i for i, _ in BAD_NORMALISER_VALUES])
def test_bad_normaliser(device, which, value):
    agg = {"num_tokens": "token-mean", "num_seqs": "seq-mean-token-mean", "loss_scale_factor": "seq-mean-token-sum-norm"}
    kw = _inputs(device)
    kw.update({which: value(device), "loss_agg_mode": agg[which]})
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    _assert_names(excinfo, which)


@pytest.mark.parametrize("which", NORMALISERS)
@pytest.mark.parametrize("value", [-1.0, -3, math.nan, math.inf, -math.inf])
def test_bad_normaliser_tensor_value_on_cpu(which, value):
    """A 0-dim *tensor* normaliser holding a negative, NaN or infinite value is refused like the same
    number is (the issue: "normaliser (negative, NaN, ...) gives an error naming the argument"). On the
    CPU the kernel reads the value anyway, so the check costs nothing. (On CUDA reading it would need a
    host synchronisation, which docs/SPEC.md forbids, so this test is CPU-only.)"""
    agg = {"num_tokens": "token-mean", "num_seqs": "seq-mean-token-mean", "loss_scale_factor": "seq-mean-token-sum-norm"}
    kw = _inputs("cpu")
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    kw.update({which: torch.tensor(value, dtype=dtype), "loss_agg_mode": agg[which]})
    with pytest.raises(ERRORS) as excinfo:
        _call(kw)
    _assert_names(excinfo, which)


# Every floating dtype docs/SPEC.md accepts for old/A/w ("any floating dtype") and every integer dtype for the
# mask ("bool, uint8, integer or floating"): each must either work (and agree with the reference) or,
# where the library chooses not to support it, be refused with an error naming the argument; never
# fail inside the kernel's dtype dispatch.
EXOTIC_FLOAT = [d for d in (getattr(torch, n, None) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None]
EXOTIC_INT = [d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64", "int8", "int16", "int32"))
              if d is not None]


def _exotic_cases():
    for dtype in EXOTIC_FLOAT:
        for name in ("old_log_probs", "advantages", "token_weights", "mask"):
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
    for dtype in EXOTIC_INT:
        yield pytest.param("mask", dtype, id=f"mask-{str(dtype)[6:]}")


@pytest.mark.parametrize("name,dtype", list(_exotic_cases()))
def test_unusual_dtype_works_or_is_refused_by_name(device, name, dtype):
    kw = _inputs(device)
    if name == "mask":
        kw["mask"] = kw["mask"].to(torch.uint8).to(dtype)  # 0/1, exactly representable everywhere
    elif name == "token_weights":
        kw[name] = torch.ones(B, T, device=device).to(dtype)  # 1 is exact in every float8 format
    else:
        kw[name] = kw[name].to(dtype)
    try:
        out = _call(kw)
    except ERRORS as err:
        assert not isinstance(err, NOT_OUR_ERRORS) and name in str(err), \
            f"{name} of dtype {dtype}: {type(err).__name__}: {err}"
        return
    # Accepted: it must then compute the loss of the values as given.
    as64 = {k: (v.cpu().to(torch.float64) if k != "mask" else v.cpu()) for k, v in kw.items()}
    ref = policy_loss_reference(as64.pop("log_probs"), as64.pop("old_log_probs"), as64.pop("advantages"),
                                as64.pop("mask"), **as64)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.counts.cpu(), ref.counts)


def test_mask_of_every_standard_dtype_agrees(device):
    """The supported mask dtypes give identical results (non-zero = valid)."""
    kw = _inputs(device)
    base = _call(kw)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                  torch.float32, torch.float64):
        out = _call({**kw, "mask": kw["mask"].to(dtype) * 3})  # 3, not 1: any non-zero value is valid
        assert torch.equal(out.loss, base.loss) and torch.equal(out.counts, base.counts), dtype


def test_errors_leave_no_state_behind(device):
    """A valid call after a series of refused ones gives bitwise the result it gives before them."""
    kw = _inputs(device)
    before = _call(kw)
    for _, _, make in BAD_TENSORS[:20]:
        bad = dict(kw)
        bad.update(make(bad))
        with pytest.raises(ERRORS):
            _call(bad)
    for name, value in BAD_OPTIONS[:10]:
        with pytest.raises(ERRORS):
            _call({**kw, name: value})
    after = _call(kw)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.counts, after.counts)
    for k in ppo_ext.METRIC_NAMES:
        assert torch.equal(before.metrics[k], after.metrics[k]), k


# The raw ops are reachable as torch.ops.ppo_ext.*; they must not crash or return garbage either.
def test_raw_backward_op_bad_arguments(device):
    bw, inplace = torch.ops.ppo_ext.policy_loss_backward, torch.ops.ppo_ext.policy_loss_backward_inplace
    one = torch.tensor(1.0, device=device)
    tg = torch.ones(4, 3, device=device)
    cases = [
        ("grad_loss", lambda: bw(torch.ones(2, device=device), tg, one, torch.float32)),
        ("token_grad", lambda: bw(one, torch.ones(5, device=device), one, torch.float32)),
        ("token_grad", lambda: bw(one, torch.ones(3, 4, device=device).t(), one, torch.float32)),
        ("token_grad", lambda: bw(one, tg.int(), one.int(), torch.float32)),
        ("grad_scale", lambda: bw(one, tg, one.double(), torch.float32)),
        ("grad_scale", lambda: bw(one, tg, torch.ones(2, device=device), torch.float32)),
        ("dtype", lambda: bw(one, tg, one, torch.int32)),
        ("dtype", lambda: bw(one, tg, one, torch.complex64)),
        ("grad_loss", lambda: bw(torch.tensor(1.0, device=_other_device(device)), tg, one, torch.float32)),
        ("grad_scale", lambda: bw(one, tg, torch.tensor(1.0, device=_other_device(device)), torch.float32)),
        # the in-place backward: the same checks, token_grad's dtype its own
        ("token_grad", lambda: inplace(one, torch.ones(5, device=device), one)),
        ("token_grad", lambda: inplace(one, torch.ones(3, 4, device=device).t(), one)),
        ("token_grad", lambda: inplace(one, tg.bfloat16(), one.bfloat16())),
        ("grad_scale", lambda: inplace(one, tg, one.double())),
        ("grad_loss", lambda: inplace(torch.tensor(1.0, device=_other_device(device)), tg, one)),
    ]
    failures = []
    for name, fn in cases:
        try:
            fn()
            failures.append(f"{name}: no error")
        except ERRORS as err:
            if isinstance(err, NOT_OUR_ERRORS) or name not in str(err):
                failures.append(f"{name}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)
