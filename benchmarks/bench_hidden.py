#!/usr/bin/env python
"""Benchmark the PPO loss from the hidden states and the LM head (no logits): ppo_ext.policy_loss_from_hidden against
eager PyTorch, torch.compile, TRL's chunked LM-head log-probs and the GEMMs alone.

Each contender computes the log-probs of the taken tokens from hidden (N, H) and the LM head's weight (V, H), then
verl 0.9's vanilla PPO loss (clip 0.2 / 0.28, dual clip 3, token-mean), then the gradients w.r.t. hidden and weight:

  eager        logits = hidden @ weight.T, logits.float() -> log_softmax -> gather, then verl's loss (verl 0.9.1's own
               compute_policy_loss_vanilla, loaded from the installed package by tests/frameworks.py)
  compiled     torch.compile of eager (dynamic=False)
  trl-chunked  TRL 1.16's own ChunkedLogProbFunction (trl/kernels/chunked_logprob.py: tiles of 4096 tokens x 32768
               vocabulary entries through cuBLAS/oneDNN, Triton kernels on a GPU and torch ops on the CPU, the backward
               recomputing each tile and accumulating both gradients in float32), then verl's loss
  ppo_ext      ppo_ext.policy_loss_from_hidden (the same loss, ppo_ext's metrics, the default chunking; its gradients
               formed in the forward pass, grad_in_forward)
  ppo_ext-recompute  the same with grad_in_forward=False: the backward pass recomputes each chunk's logits
  gemms        the GEMMs ppo_ext runs, alone, with its chunking: chunk by chunk the logits and grad_hidden (and, for
               float32 / float64 weights, grad_weight accumulated); for 16-bit weights then the logits again block
               of columns by block for all tokens and grad_weight. The floor of ppo_ext's time: ppo_ext's target is
               at most 1.2x this.
  liger        Liger-Kernel 0.8.5's own LigerFusedLinearGRPOLoss (liger_kernel/chunked_loss: the log-probs by tiles of
               tokens x vocabulary through ATen's matmul in an autograd function, its backward recomputing them; the
               loss's math under torch.compile; no Triton kernel, so it runs on the CPU too), DAPO's token-level
               normalisation (verl's token-mean here), no dual clip (never reached by these inputs' ratios); skipped
               when liger-kernel is not installed (./scripts/bench.sh installs it: scripts/frameworks.txt)

Every contender is first checked against a float64 reference (the log-probs and the gradients built row chunk by row
chunk: no float64 logits whole): the loss, grad_hidden and grad_weight. Then timed, interleaved, forward+backward.
Then the memory of one forward+backward beyond what existed before it, less the returned gradients (hidden's and
weight's size), as a fraction of the logits' size (N x V in the inputs' dtype): the allocator's peak (tensors; on
a GPU the caching allocator's statistics) and, on the CPU, the process's peak resident memory.

    python benchmarks/bench_hidden.py --quick           # ~2 minutes on 2 CPU cores
    python benchmarks/bench_hidden.py                   # CPU: N = 8192 at V = 32000 (H 1024) and 151936 (H 512)
    python benchmarks/bench_hidden.py --device cuda     # GPU: N = 8192, 32768 at V = 32000, 151936, H = 4096
    python benchmarks/bench_hidden.py --device cpu --shape 8192,896,151936 --contenders ppo_ext,ppo_ext-recompute
                                                        # one shape (Qwen2.5-0.5B's head), those contenders and gemms

Writes <out-dir>/hidden-<device>-<date>[-quick].{json,md} (with --shape: hidden-N<N>-H<H>-V<V>-<device>-<date>...;
out-dir: benchmarks/results) unless --no-write, and exits with 2 if a contender does not match the reference.
"""

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a checkout where ppo_ext was built in place; the benchmarks package

import ppo_ext  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.baselines import frameworks  # noqa: E402
from benchmarks.bench_logits import OPTIONS, eager_log_probs, verl_vanilla  # noqa: E402
from benchmarks.bench_logits import Case as LogitsCase  # noqa: E402
from ppo_ext.hidden import chunk_ranges, default_chunk_tokens  # noqa: E402
from ppo_ext.reference import policy_loss_reference  # noqa: E402

CONTENDERS = ("eager", "compiled", "trl-chunked", "liger", "ppo_ext", "ppo_ext-recompute", "gemms")
TARGET_MEMORY_FRACTION, TARGET_GEMM_RATIO = 0.05, 1.2
# The fewest columns of a block of the 16-bit weights' gradient pass (csrc/hidden.cpp kMinColumns), for the gemms
# contender.
MIN_COLUMNS = 64


# ---------------------------------------------------------------------------------------------------------------
# Contenders: (hidden, weight, labels, old, adv, mask) -> loss
# ---------------------------------------------------------------------------------------------------------------


def eager_loss():
    verl = verl_vanilla()

    def loss(hidden, weight, labels, old, adv, mask):
        return verl(old, eager_log_probs(hidden @ weight.T, labels), adv, mask)

    return loss


def trl_chunked_loss():
    trl = frameworks().trl_chunked_logprob()
    verl = verl_vanilla()

    def loss(hidden, weight, labels, old, adv, mask):
        B, T, H = hidden.shape
        lp = trl.ChunkedLogProbFunction.apply(hidden.reshape(-1, H), weight, None, labels.reshape(-1), 1.0,
                                              trl.chunk_size, None, 1.0, ())[0]
        return verl(old, lp.view(B, T), adv, mask)

    return loss


def liger():
    """tests/frameworks.py's Liger-Kernel (the version pinned in scripts/frameworks.txt), or None."""
    try:
        return frameworks().liger_grpo()
    except frameworks().FrameworkMissing:
        return None


def liger_loss():
    """Liger-Kernel's fused linear GRPO loss (PPO's clipped loss, token-level, its default aggregation), or None."""
    lib = liger()
    if lib is None:
        return None
    fn = lib.LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                                      use_ref_model=False)

    def loss(hidden, weight, labels, old, adv, mask):
        return fn(hidden, weight, labels, mask, adv[:, 0] if adv.dim() == 2 else adv, old_per_token_logps=old)[0]

    return loss


def ppo_ext_loss(grad_in_forward):
    def loss(hidden, weight, labels, old, adv, mask):
        return ppo_ext.policy_loss_from_hidden(hidden, weight, labels, old, adv, mask, grad_in_forward=grad_in_forward,
                                               **OPTIONS).loss

    return loss


def gemms_call(inp):
    """The GEMMs of ppo_ext's forward and backward with its chunking (ppo_ext.hidden), alone, into buffers as ppo_ext
    writes them."""
    B, T, H = inp.hidden.shape
    hidden, weight = inp.hidden.detach().reshape(-1, H), inp.weight.detach()
    N, V = hidden.shape[0], weight.shape[0]
    chunk = min(default_chunk_tokens(V, weight.dtype), N)
    chunks = [(start, n) for start, n, _ in chunk_ranges(B, T, chunk, False)]
    by_columns = weight.dtype in (torch.bfloat16, torch.float16) and N > chunk
    fit = chunk * V // N
    columns = V if fit >= V else min(V, max(MIN_COLUMNS, fit // MIN_COLUMNS * MIN_COLUMNS))

    def row_stride(cols):
        return torch.ops.ppo_ext.hidden_logits_row_stride(cols, weight.element_size())

    def call():
        buffer = torch.empty(max(chunk * row_stride(V), N * row_stride(columns) if by_columns else 0),
                             dtype=weight.dtype, device=weight.device)
        rows_buffer = buffer[:chunk * row_stride(V)].view(chunk, -1)[:, :V]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.empty_like(weight) if by_columns else torch.zeros_like(weight)
        with torch.no_grad():
            for begin, n in chunks:  # the logits, grad_hidden (and grad_weight) chunk by chunk
                torch.mm(hidden[begin:begin + n], weight.T, out=rows_buffer[:n])
                torch.mm(rows_buffer[:n], weight, out=grad_hidden[begin:begin + n])
                if not by_columns:
                    grad_weight.addmm_(rows_buffer[:n].T, hidden[begin:begin + n])
            if by_columns:
                for start in range(0, V, columns):
                    n = min(columns, V - start)
                    block = buffer[:N * row_stride(n)].view(N, -1)[:, :n]
                    torch.mm(hidden, weight[start:start + n].T, out=block)
                    torch.mm(block.T, hidden, out=grad_weight[start:start + n])
        return grad_hidden, grad_weight

    return call


def make_contenders(device, only=None):
    """The contenders (only: those named, None: all) but gemms."""
    fns = {}
    if only is None or {"eager", "compiled", "trl-chunked"} & set(only):
        eager = eager_loss()
        fns = {"eager": eager, "compiled": torch.compile(eager, dynamic=False), "trl-chunked": trl_chunked_loss()}
    liger = liger_loss()
    if liger is not None:
        fns["liger"] = liger
    fns["ppo_ext"] = ppo_ext_loss(None)
    fns["ppo_ext-recompute"] = ppo_ext_loss(False)
    return {name: fn for name, fn in fns.items() if only is None or name in only}


# ---------------------------------------------------------------------------------------------------------------
# Cases, inputs, reference
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case(LogitsCase):
    """bench_logits' case (B, T, V, dtype: the logits it stands for, their size) with the hidden size H."""

    H: int = 4096

    @property
    def name(self):
        return f"N={self.tokens} H={self.H} V={self.V} {self.dtype}"


def all_cases(quick, device):
    if device == "cpu":
        if quick:
            return [Case(2, 1024, 32000, "bf16", H=512)]
        return [Case(8, 1024, 32000, "bf16", H=1024), Case(8, 1024, 151936, "bf16", H=512)]
    if quick:
        return [Case(8, 1024, 32000, "bf16"), Case(8, 1024, 151936, "bf16")]
    return [Case(N // 1024, 1024, V, "bf16") for N in (8192, 32768) for V in (32000, 151936)]


@dataclass
class Inputs:
    hidden: torch.Tensor  # (B, T, H) leaf
    weight: torch.Tensor  # (V, H) leaf
    labels: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor

    def args(self):
        return (self.hidden, self.weight, self.labels, self.old, self.adv, self.mask)


def make_inputs(case, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(case.B, case.T, case.H, generator=g, device=device).to(case.torch_dtype)
    weight = (torch.randn(case.V, case.H, generator=g, device=device) * (2.0 / case.H ** 0.5)).to(case.torch_dtype)
    labels = torch.randint(0, case.V, (case.B, case.T), generator=g, device=device)
    with torch.no_grad():
        lp = ppo_ext.log_probs_from_hidden(hidden, weight, labels)[0]
    old = lp + 0.1 * torch.randn(lp.shape, generator=g, device=device)
    # one advantage a sequence (GRPO's), as Liger's GRPO loss takes them
    adv = torch.randn(lp.shape[0], 1, generator=g, device=device).expand(lp.shape)
    mask = torch.rand(lp.shape, generator=g, device=device) < 0.9
    return Inputs(hidden.requires_grad_(True), weight.requires_grad_(True), labels, old, adv, mask)


def reference(inp, rows):
    """float64, `rows` tokens at a time: the loss and the gradients w.r.t. hidden and weight (the logits rounded to
    the inputs' dtype, as every contender's GEMM writes them)."""
    B, T, H = inp.hidden.shape
    h = inp.hidden.detach().reshape(-1, H)
    w64 = inp.weight.detach().double()
    labels = inp.labels.reshape(-1)
    N = h.shape[0]

    def logp_of(r0):
        logits = (h[r0:r0 + rows].double() @ w64.T).to(h.dtype).double()  # rounded as a GEMM writes them
        return torch.log_softmax(logits, -1)

    lp = torch.cat([logp_of(r0).gather(-1, labels[r0:r0 + rows, None])[:, 0] for r0 in range(0, N, rows)])
    lp = lp.view(B, T).requires_grad_(True)
    loss = policy_loss_reference(lp, inp.old.double(), inp.adv.double(), inp.mask, **OPTIONS).loss
    (g_lp,) = torch.autograd.grad(loss, (lp,))
    g_lp = g_lp.reshape(-1)
    grad_h = torch.empty(N, H, dtype=torch.float64, device=h.device)
    grad_w = torch.zeros_like(w64)
    for r0 in range(0, N, rows):
        grad = -logp_of(r0).exp() * g_lp[r0:r0 + rows, None]
        grad.scatter_add_(1, labels[r0:r0 + rows, None], g_lp[r0:r0 + rows, None])
        grad_h[r0:r0 + rows] = grad @ w64
        grad_w += grad.T @ h[r0:r0 + rows].double()
    return loss.item(), grad_h.view(B, T, H), grad_w


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def fwd_bwd_call(fn, inp):
    def call():
        inp.hidden.grad = inp.weight.grad = None
        fn(*inp.args()).backward()
        return inp.hidden.grad, inp.weight.grad

    return call


def check(fn, inp, ref):
    inp.hidden.grad = inp.weight.grad = None
    loss = fn(*inp.args())
    loss.backward()
    loss_err = abs(loss.item() - ref[0]) / max(abs(ref[0]), 1e-12)
    h_err, w_err = rel_err(inp.hidden.grad, ref[1]), rel_err(inp.weight.grad, ref[2])
    inp.hidden.grad = inp.weight.grad = None
    tol = 3e-2 if inp.hidden.dtype == torch.bfloat16 else 1e-4
    return dict(ok=loss_err < 1e-3 and h_err < tol and w_err < tol, loss_rel_err=loss_err, grad_hidden_rel_err=h_err,
                grad_weight_rel_err=w_err, grad_tol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def run_case(case, device, threads, budget, rounds, flush, load, only=None):
    res = dict(case=case.name, B=case.B, T=case.T, H=case.H, V=case.V, dtype=case.dtype, tokens=case.tokens,
               logits_bytes=case.logits_bytes(), chunk_tokens=default_chunk_tokens(case.V, case.torch_dtype))
    fns = make_contenders(device, only)
    inp = make_inputs(case, device, seed=case.tokens + case.V)
    ref = reference(inp, max(1, (256 << 20) // (8 * case.V)))
    checks = {}
    for name, fn in fns.items():
        t0 = time.time()
        try:
            checks[name] = check(fn, inp, ref)
        except Exception as exc:  # noqa: BLE001  (a third party's code failing on a case: report, go on)
            if name != "liger" and not isinstance(exc, harness.OUT_OF_MEMORY):
                raise
            checks[name] = dict(ok=False, skipped=harness.out_of_memory(exc) if isinstance(
                exc, harness.OUT_OF_MEMORY) else f"{type(exc).__name__}: {str(exc)[:100]}")
            inp.hidden.grad = inp.weight.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
        checks[name]["first_call_s"] = time.time() - t0
    res["check"] = checks
    runnable = [n for n in fns if "skipped" not in checks[n]]

    calls = {n: fwd_bwd_call(fns[n], inp) for n in runnable}
    calls["gemms"] = gemms_call(inp)
    samples = harness.warm_up_and_time(calls, device, threads, budget, rounds, flush, load)
    row = {}
    for n, xs in samples.items():
        row[n] = dict(median_s=harness.quantile(xs, 0.5), p25_s=harness.quantile(xs, 0.25),
                      p75_s=harness.quantile(xs, 0.75), n_samples=len(xs))
    harness.add_speedups(row, ("eager", "compiled", "trl-chunked", "liger", "ppo_ext-recompute", "gemms"))
    res["timing"] = row

    grads_bytes = (inp.hidden.numel() + inp.weight.numel()) * inp.hidden.element_size()
    memory = {}
    for n in runnable:
        inp.hidden.grad = inp.weight.grad = None
        peak = harness.peak_extra_bytes(calls[n], device)
        inp.hidden.grad = inp.weight.grad = None
        entry = dict(peak_extra_bytes=peak, beyond_grads_fraction=(peak - grads_bytes) / case.logits_bytes())
        if device == "cpu":
            rss = harness.peak_rss_extra_bytes(calls[n])
            inp.hidden.grad = inp.weight.grad = None
            if rss is not None:
                entry.update(rss_extra_bytes=rss, rss_beyond_grads_fraction=(rss - grads_bytes) / case.logits_bytes())
        memory[n] = entry
    res["memory"] = memory
    return res


def fmt_time(s):
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def targets(result):
    out = []
    for res in result["cases"]:
        if "timing" not in res:
            continue
        p, mem = res["timing"].get("ppo_ext", {}), res["memory"].get("ppo_ext", {})
        fraction = mem.get("rss_beyond_grads_fraction", mem.get("beyond_grads_fraction"))
        out.append(dict(target=f"{res['case']}: peak extra memory <= {TARGET_MEMORY_FRACTION:.0%} of the logits",
                        measured=None if fraction is None else f"{fraction:.2%}",
                        met=None if fraction is None else fraction <= TARGET_MEMORY_FRACTION))
        ratio = 1 / p["speedup_vs_gemms"] if "speedup_vs_gemms" in p else None
        out.append(dict(target=f"{res['case']}: fwd+bwd <= {TARGET_GEMM_RATIO}x its GEMMs alone",
                        measured=None if ratio is None else f"{ratio:.2f}x",
                        met=None if ratio is None else ratio <= TARGET_GEMM_RATIO))
        for base in ("eager", "compiled", "liger"):
            key = f"speedup_vs_{base}"
            if key in p:
                out.append(dict(target=f"{res['case']}: faster than {base}", measured=f"{p[key]:.2f}x",
                                met=p[key] > 1))
    return out


def table(result):
    lines = ["\n### fwd+bwd: median time (ppo_ext's speed-up against each; ppo_ext / gemms: the floor's ratio)\n"]
    rows = []
    for res in result["cases"]:
        row = res.get("timing", {})
        p = row.get("ppo_ext", {})
        cells = [fmt_time(row[n]["median_s"]) if n in row else "-" for n in CONTENDERS]
        ratios = [f"{p[k]:.2f}x" if k in p else "-" for k in ("speedup_vs_eager", "speedup_vs_compiled",
                                                               "speedup_vs_trl-chunked",
                                                               "speedup_vs_ppo_ext-recompute")]
        floor = f"{1 / p['speedup_vs_gemms']:.2f}x" if "speedup_vs_gemms" in p else "-"
        rows.append([res["case"], *cells, *ratios, floor])
    lines += harness.markdown_table(["case", *CONTENDERS, "vs eager", "vs compiled", "vs trl-chunked",
                                     "vs ppo_ext-recompute", "ppo_ext / gemms"], rows)
    lines.append("\n### fwd+bwd: peak extra memory beyond the returned gradients / logits size (allocator; "
                 "CPU: resident memory in brackets)\n")
    rows = []
    for res in result["cases"]:
        mem = res.get("memory", {})
        cells = []
        for n in CONTENDERS:
            m = mem.get(n)
            cell = "-" if m is None else f"{m['beyond_grads_fraction']:.3f}"
            if m is not None and "rss_beyond_grads_fraction" in m:
                cell += f" ({m['rss_beyond_grads_fraction']:.3f})"
            cells.append(cell)
        rows.append([res["case"], *cells])
    lines += harness.markdown_table(["case", *CONTENDERS], rows)
    lines.append("\n### check against float64 (relative error: loss; grad_hidden; grad_weight, max over max)\n")
    rows = []
    for res in result["cases"]:
        c = res.get("check", {})
        cells = [("ok " if c[n]["ok"] else "FAIL ") + (
            f"{c[n]['loss_rel_err']:.0e}; {c[n]['grad_hidden_rel_err']:.0e}; {c[n]['grad_weight_rel_err']:.0e}"
            if "loss_rel_err" in c[n] else c[n].get("skipped", "")) if n in c else "-" for n in CONTENDERS]
        rows.append([res["case"], *cells])
    lines += harness.markdown_table(["case", *CONTENDERS], rows)
    lines.append("\n### targets\n")
    lines.append(harness.targets_table(targets(result), "github"))
    return "\n".join(lines)


def main():
    p = harness.parser(__doc__, "one case per device, short timings", "hidden-<device>-<date>[-quick].{json,md}",
                       argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--shape", help="one bf16 case N,H,V (N a multiple of 1024: rows of 1024 tokens) instead of the "
                                   "default ones, e.g. 8192,896,151936")
    p.add_argument("--contenders", help="only these (comma-separated, of " + ", ".join(
        c for c in CONTENDERS if c != "gemms") + "); gemms always runs")
    args = p.parse_args()
    devices = harness.devices(p, args)
    cases_of, name = all_cases, "hidden-"
    if args.shape:
        try:
            N, H, V = (int(x) for x in args.shape.split(","))
            assert N > 0 and N % 1024 == 0 and H > 0 and V > 0
        except (ValueError, AssertionError):
            p.error(f"--shape takes N,H,V (N a positive multiple of 1024), got {args.shape!r}")
        cases_of, name = (lambda quick, device: [Case(N // 1024, 1024, V, "bf16", H=H)]), f"hidden-N{N}-H{H}-V{V}-"
    only = None
    if args.contenders:
        only = args.contenders.split(",")
        unknown = [c for c in only if c not in CONTENDERS or c == "gemms"]
        if unknown:
            p.error(f"--contenders: unknown {unknown}")
    torch._dynamo.config.capture_scalar_outputs = True  # verl's .item() calls inside the compiled graph
    try:
        frameworks().verl()
        frameworks().trl_chunked_logprob()
    except frameworks().FrameworkMissing as exc:
        p.error(f"the eager and TRL contenders run the frameworks' own code: {exc}")
    harness.configure_torch(args.threads)

    return harness.run_cases_per_device(
        args, devices, cases_of, functools.partial(run_case, only=only), table, name, "ppo_ext.policy_loss_from_hidden",
        extra_meta=lambda device: dict(liger_kernel="not installed" if liger() is None else liger().version))


if __name__ == "__main__":
    sys.exit(main())
