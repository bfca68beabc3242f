"""No hidden state, no leaks, autograd hygiene, inputs never modified.

- Calls from several Python threads at once give bitwise the results of serial calls.
- 10,000 repeated calls (and 2,000 refused ones) do not grow memory: RSS flat on the CPU, allocated
  memory exactly flat on CUDA.
- Autograd: double backward works or raises a clear error; retain_graph works; no gradient reaches
  old_log_probs, advantages, mask, token_weights or the normalisers, and a loss whose log_probs need no
  gradient is a constant; under torch.no_grad() (or with log_probs not requiring grad) the op is asked
  for no gradient and returns none (how much faster that is, is measured by the benchmark, not here).
- No input is modified in place (values and version counters unchanged).
- One list of names (ppo_ext.names): the reference's own copy is the same, the C++ op refuses an unknown mode
  with an error listing exactly those names, and returns one metric and one count per name.
- policy_loss hands each of its keywords on under its own name (spelled out: torch.compile of torch 2.11 cannot
  trace locals()).
"""

import gc
import os
import re
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ppo_ext
import ppo_ext.names
import ppo_ext.reference
from helpers import AGG_MODES, IS_MODES, make_inputs, op_args, options, run_ext, same_bits
from ppo_ext.reference import policy_loss_reference

UNDER_SANITIZER = os.environ.get("PPO_EXT_SANITIZER") == "1"


def _assert_same(a, b, what):
    (out_a, grad_a), (out_b, grad_b) = a, b
    assert same_bits(out_a.loss, out_b.loss), f"{what}: loss {out_a.loss} != {out_b.loss}"
    assert torch.equal(out_a.counts, out_b.counts), what
    for k in ppo_ext.METRIC_NAMES:
        assert same_bits(out_a.metrics[k], out_b.metrics[k]), f"{what}: {k}"
    assert same_bits(grad_a, grad_b), f"{what}: gradient"


# ----------------------------------------------------------------------------------------------------------
# Threads


def _thread_cases(device):
    cases = []
    for k, (is_mode, agg, dtype) in enumerate([
            ("token", "token-mean", torch.float32), ("seq", "seq-mean-token-mean", torch.bfloat16),
            ("seq-token", "seq-mean-token-sum-norm", torch.float16), ("token", "token-sum", torch.float64),
            ("seq", "seq-mean-token-sum", torch.float32), ("token", "seq-mean-token-mean", torch.bfloat16)]):
        B, T = (48, 1500) if k % 2 == 0 else (5, 37)  # 72,000 tokens: several parallel chunks; or one
        inp = make_inputs(B, T, seed=100 + k, device=device, dtype=dtype, old_dtype=torch.float32,
                          adv_shape=("BT", "B", "B1")[k % 3])
        cases.append((inp, options(is_mode, agg, dual=k % 2 == 0, clamp=k % 3 == 0)))
    return cases


def test_concurrent_calls_match_serial_calls(device):
    cases = _thread_cases(device)
    serial = [run_ext(inp, **kw) for inp, kw in cases]
    n_threads, rounds = 6, 5
    barrier = threading.Barrier(n_threads)
    results, errors = {}, []

    def worker(tid):
        try:
            barrier.wait()
            for r in range(rounds):
                for j in range(len(cases)):
                    c = (j + tid + r) % len(cases)  # every thread runs every case, in a different order
                    inp, kw = cases[c]
                    results[(tid, r, c)] = run_ext(inp, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads * rounds * len(cases)
    for (tid, r, c), res in results.items():
        _assert_same(res, serial[c], f"thread {tid} round {r} case {c}")


def test_calls_with_other_threads_busy_match(device):
    """Results do not depend on what other threads run at the same time (intra-op pool shared)."""
    inp, kw = _thread_cases(device)[0]
    expected = run_ext(inp, **kw)
    stop = threading.Event()

    def noise():
        big = make_inputs(64, 2000, seed=1, device=device)
        while not stop.is_set():
            run_ext(big, **options("seq", "token-sum"))

    threads = [threading.Thread(target=noise) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            _assert_same(run_ext(inp, **kw), expected, "with busy threads")
    finally:
        stop.set()
        for t in threads:
            t.join()


# ----------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(UNDER_SANITIZER, reason="ASan's quarantine grows RSS by design")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_repeated_calls_do_not_grow_memory_rss(device):
    inp = make_inputs(8, 300, seed=4, device=device)
    kws = [options(m, a, dual=True) for m, a in zip(IS_MODES, AGG_MODES)]

    def many(n):
        for k in range(n):
            run_ext(inp, **kws[k % len(kws)])
            with torch.no_grad():
                ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, num_tokens=torch.tensor(100.0, device=device))

    many(500)  # warm up: allocator caches, lazy initialisation
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
    before = _rss_bytes()
    many(10_000)
    gc.collect()
    after = _rss_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, "CUDA memory grew over 10,000 calls"
    assert after - before < 8 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 10,000 calls"


@pytest.mark.skipif(UNDER_SANITIZER, reason="ASan's quarantine grows RSS by design")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_refused_calls_do_not_grow_memory_rss(device):
    inp = make_inputs(4, 50, seed=4, device=device)
    bad = [dict(loss_agg_mode="nope"), dict(clip_low=-1.0), dict(dual_clip=0.5), dict(num_tokens=-1)]

    def many(n):
        for k in range(n):
            with pytest.raises((ValueError, TypeError)):
                ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, **bad[k % len(bad)])
            with pytest.raises(ValueError):
                ppo_ext.policy_loss(inp.lp, inp.old[:, 1:], inp.adv, inp.mask)

    many(300)
    gc.collect()
    before = _rss_bytes()
    many(2_000)
    gc.collect()
    after = _rss_bytes()
    assert after - before < 4 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 4,000 refused calls"


# ----------------------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_double_backward_works_or_raises_clearly(device, importance_sampling):
    """create_graph=True must give either a differentiable gradient whose second derivative matches the
    reference's, or a clear error naming the op / double backward; never a gradient that silently does
    not depend on log_probs (a Hessian-vector product or gradient penalty would silently be 0)."""
    inp = make_inputs(3, 11, seed=6, device=device, dtype=torch.float64)
    kw = options(importance_sampling, "token-mean", dual=True)
    lp = inp.lp.detach().clone().requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **kw)
    v = torch.randn_like(lp)
    try:
        (g,) = torch.autograd.grad(out.loss, lp, create_graph=True)
        if not g.requires_grad:
            raise AssertionError("torch.autograd.grad(create_graph=True) returned a gradient that silently does "
                                 "not require grad: second derivatives through ppo_ext would be silently 0")
        (hvp,) = torch.autograd.grad((g * v).sum(), lp)
    except RuntimeError as err:
        msg = str(err).lower()
        assert any(s in msg for s in ("double backward", "twice", "ppo_ext", "second derivative", "create_graph")), \
            f"double backward raised an unclear error: {err}"
        return
    ref_lp = inp.lp.detach().cpu().clone().requires_grad_(True)
    f64 = lambda t: None if t is None else t.cpu()  # noqa: E731
    ref = policy_loss_reference(ref_lp, f64(inp.old), f64(inp.adv), f64(inp.mask), token_weights=f64(inp.weights), **kw)
    (ref_g,) = torch.autograd.grad(ref.loss, ref_lp, create_graph=True)
    (ref_hvp,) = torch.autograd.grad((ref_g * v.cpu()).sum(), ref_lp)
    torch.testing.assert_close(hvp.cpu(), ref_hvp, rtol=1e-8, atol=1e-12)


def test_retain_graph(device):
    inp = make_inputs(4, 30, seed=8, device=device)
    lp = inp.lp.detach().clone().requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights, **options("seq"))
    (g1,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    assert same_bits(g1, g2)
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    assert torch.equal(lp.grad, g1 + g1)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.loss.backward()


def test_gradient_scales_with_grad_output_and_reuse(device):
    inp = make_inputs(4, 30, seed=8, device=device, dtype=torch.float64)
    lp = inp.lp.detach().clone().requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, **options("token", "token-sum"))
    (g,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss, lp, grad_outputs=torch.tensor(3.0, dtype=out.loss.dtype, device=device),
                                retain_graph=True)
    (g_twice,) = torch.autograd.grad(out.loss + 0.5 * out.loss, lp)
    torch.testing.assert_close(g3, 3 * g, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_twice, 1.5 * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_no_gradient_reaches_the_constants(device, importance_sampling):
    inp = make_inputs(4, 30, seed=9, device=device)
    lp = inp.lp.detach().clone().requires_grad_(True)
    old = inp.old.detach().clone().requires_grad_(True)
    adv = inp.adv.detach().clone().requires_grad_(True)
    mask = inp.mask.float().requires_grad_(True)
    w = inp.weights.detach().clone().requires_grad_(True)
    num_tokens = torch.tensor(50.0, device=device, requires_grad=True)
    out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w, num_tokens=num_tokens,
                              **options(importance_sampling))
    for k, v in out.metrics.items():
        assert not v.requires_grad and v.grad_fn is None, k
    assert not out.counts.requires_grad
    out.loss.backward()
    assert lp.grad is not None
    for name, t in [("old_log_probs", old), ("advantages", adv), ("mask", mask), ("token_weights", w),
                    ("num_tokens", num_tokens)]:
        assert t.grad is None, f"a gradient reached {name}"


@pytest.mark.parametrize("name", ["old_log_probs", "advantages", "token_weights", "num_tokens"])
def test_loss_is_constant_when_log_probs_need_no_grad(device, name):
    """log_probs without requires_grad and a constant argument that happens to require grad (advantages
    from an undetached value head, say): the loss is a constant, as in eager (docs/SPEC.md: old, A, w are
    constants), so a backward through a sum that contains it works and reaches nothing of ppo_ext's."""
    inp = make_inputs(4, 30, seed=9, device=device)
    args = dict(old_log_probs=inp.old.clone(), advantages=inp.adv.clone(), token_weights=inp.weights.clone(),
                num_tokens=torch.tensor(50.0, device=device))
    args[name] = args[name].requires_grad_(True)
    out = ppo_ext.policy_loss(inp.lp, args.pop("old_log_probs"), args.pop("advantages"), inp.mask, **args)
    other = torch.ones(3, device=device, requires_grad=True)
    total = out.loss + other.sum()
    total.backward()  # must not raise
    assert torch.equal(other.grad, torch.ones_like(other))


class _RecordPolicyLossCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.ppo_ext.policy_loss.default:
            # compute_grad (trailing arguments equal to their default are not passed), elements of token_grad
            given = dict(zip([a.name for a in func._schema.arguments], args), **(kwargs or {}))
            self.calls.append((given.get("compute_grad", True), out[3].numel()))
        return out


def test_no_grad_asks_for_no_gradient(device):
    inp = make_inputs(8, 100, seed=10, device=device)
    lp = inp.lp.detach().clone().requires_grad_(True)
    rec = _RecordPolicyLossCalls()
    with rec:
        ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask)  # needs the gradient
        with torch.no_grad():
            out_ng = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask)
        with torch.inference_mode():
            ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask)
        ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask)  # log_probs need no gradient
    assert rec.calls == [(True, 8 * 100), (False, 0), (False, 0), (False, 0)], rec.calls
    assert not out_ng.loss.requires_grad and out_ng.loss.grad_fn is None


# ----------------------------------------------------------------------------------------------------------
# Inputs are never modified


@pytest.mark.parametrize("importance_sampling", IS_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_inputs_are_not_modified(device, importance_sampling, dtype):
    inp = make_inputs(6, 45, seed=12, device=device, dtype=dtype, old_dtype=torch.float32)
    valid = inp.mask != 0
    # non-contiguous views, garbage at masked positions, normalisers as tensors
    lp = torch.where(valid, inp.lp, float("nan")).t().contiguous().t().requires_grad_(True)
    old = torch.where(valid, inp.old, float("inf"))
    adv = inp.adv[:, :1].expand(6, 45)
    w = torch.cat([inp.weights, inp.weights], 1)[:, ::2]
    mask = inp.mask
    norms = dict(num_tokens=torch.tensor(40.0, device=device), num_seqs=torch.tensor(5, device=device),
                 loss_scale_factor=torch.tensor(45.0, dtype=torch.float64, device=device))
    tensors = dict(lp=lp, old=old, adv=adv, w=w, mask=mask, **norms)
    snapshot = {k: (t.detach().clone(), t._version, t.stride()) for k, t in tensors.items()}
    for agg in AGG_MODES:
        out = ppo_ext.policy_loss(lp, old, adv, mask, token_weights=w,
                                  **options(importance_sampling, agg, dual=True, clamp=True), **norms)
        out.loss.backward()
    for k, t in tensors.items():
        before, version, stride = snapshot[k]
        assert same_bits(t.detach(), before), f"{k} was modified"
        assert t._version == version, f"{k} was written in place (version {version} -> {t._version})"
        assert t.stride() == stride


# ----------------------------------------------------------------------------------------------------------
# One list of names (ppo_ext.names): the reference's copy and the C++ op agree with it


NAME_LISTS = ("ROLLOUT_IS_LEVELS", "ROLLOUT_IS_MODES", "ROLLOUT_IS_MASK_WEIGHTS", "LOSS_TYPES", "LOSS_AGG_MODES", "IMPORTANCE_SAMPLING_LEVELS", "METRIC_NAMES", "COUNT_NAMES")


def test_reference_names_are_ppo_ext_names():
    """ppo_ext.reference keeps its own copy (it imports nothing but torch): the same names in the same order;
    ppo_ext exports the names module's tuples, and its indices follow them."""
    for name in NAME_LISTS:
        names = getattr(ppo_ext.names, name)
        assert getattr(ppo_ext.reference, name) == names, name
        assert isinstance(names, tuple) and len(set(names)) == len(names) and all(isinstance(n, str) for n in names)
    assert ppo_ext.METRIC_NAMES is ppo_ext.names.METRIC_NAMES and ppo_ext.COUNT_NAMES is ppo_ext.names.COUNT_NAMES
    assert ppo_ext.LOSS_TYPES is ppo_ext.names.LOSS_TYPES
    assert ppo_ext.names.METRIC_INDEX == {n: i for i, n in enumerate(ppo_ext.names.METRIC_NAMES)}
    assert ppo_ext.names.COUNT_INDEX == {n: i for i, n in enumerate(ppo_ext.names.COUNT_NAMES)}


def _op_args(inp, **options):
    return op_args(inp.lp, inp.old, inp.adv, inp.mask, inp.weights, compute_grad=False, clip_high=0.28, **options)


OPTION_NAMES = {"loss_type": ppo_ext.names.LOSS_TYPES, "loss_agg_mode": ppo_ext.names.LOSS_AGG_MODES,
                "rollout_is": ppo_ext.names.ROLLOUT_IS_LEVELS, "rollout_is_mode": ppo_ext.names.ROLLOUT_IS_MODES,
                "rollout_is_mask_weight": ppo_ext.names.ROLLOUT_IS_MASK_WEIGHTS,
                "importance_sampling": ppo_ext.names.IMPORTANCE_SAMPLING_LEVELS}


@pytest.mark.parametrize("option", list(OPTION_NAMES))
def test_op_refuses_an_unknown_name_listing_the_names(device, option):
    """The C++ op's own list of names (csrc/checks.cpp) is ppo_ext.names': its error for an unknown name says
    `<option> must be one of "a", "b", got "x"`, listing exactly those names, in order."""
    names = OPTION_NAMES[option]
    inp = make_inputs(3, 5, seed=20, device=device)
    with pytest.raises(ValueError) as excinfo:
        torch.ops.ppo_ext.policy_loss(*_op_args(inp, **{option: "no-such-name"}))
    match = re.search(f'{option} must be one of ((?:"[^"]*", )*"[^"]*"), got "no-such-name"', str(excinfo.value))
    assert match, f"unexpected message: {excinfo.value}"
    assert tuple(re.findall(r'"([^"]*)"', match.group(1))) == names, match.group(1)
    for name in names:  # and it takes every one of them
        needs = {"dro": {"dro_beta": 0.1}, "geo_mean": {"importance_sampling": "seq"}}.get(name, {}) \
            if option == "loss_type" else {}
        if option.startswith("rollout_is") and name != "none":  # a correction needs its log-probs and a bound
            needs = dict(rollout_log_probs=inp.old, rollout_is_high=2.0, rollout_is="token")
        torch.ops.ppo_ext.policy_loss(*_op_args(inp, **{**needs, option: name}))


def test_op_returns_a_metric_and_a_count_per_name(device):
    inp = make_inputs(3, 5, seed=21, device=device)
    _, metrics, counts, _, _ = torch.ops.ppo_ext.policy_loss(*_op_args(inp))
    assert metrics.shape == (len(ppo_ext.names.METRIC_NAMES),) and metrics.dtype == torch.float32
    assert counts.shape == (len(ppo_ext.names.COUNT_NAMES),) and counts.dtype == torch.int64
    out = ppo_ext.policy_loss(inp.lp, inp.old, inp.adv, inp.mask, token_weights=inp.weights)
    assert tuple(out.metrics) == ppo_ext.names.METRIC_NAMES


def test_policy_loss_passes_every_keyword_on(monkeypatch):
    """policy_loss names each of its keywords in its call (torch.compile of torch 2.11 cannot trace locals()): each
    reaches _policy_loss under its own name, none dropped or swapped."""
    import ppo_ext.functional as functional

    seen = {}

    def record(log_probs, old_log_probs, advantages, mask, **o):
        seen.update(o, positional=(log_probs, old_log_probs, advantages, mask))
        return None, None

    monkeypatch.setattr(functional, "_policy_loss", record)
    sentinels = {name: object() for name in functional._POLICY_LOSS_KEYWORDS}
    ppo_ext.policy_loss("lp", "old", "adv", "mask", **sentinels)
    assert seen.pop("positional") == ("lp", "old", "adv", "mask")
    assert seen.keys() == sentinels.keys()
    for name, value in sentinels.items():
        assert seen[name] is value, name
