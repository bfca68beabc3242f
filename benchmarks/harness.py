"""What every benchmark shares: the command line, the environment record, timing (CPU timer, CUDA events),
memory, ops / kernels / host synchronisations per call, progress, and writing the results (JSON, tables, plot).

A benchmark script defines its cases, contenders, checks and targets, and runs them with these.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict

import torch
import torch.utils.benchmark as tbench
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import ppo_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)


# ---------------------------------------------------------------------------------------------------------------
# Command line and setup
# ---------------------------------------------------------------------------------------------------------------


def parser(description, quick_help, outputs, formatter_class=argparse.HelpFormatter):
    """The options every benchmark takes; `outputs` names the files written into --out-dir."""
    p = argparse.ArgumentParser(description=description, formatter_class=formatter_class)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="default: every device present")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPU threads (default 2, the targets' setting)")
    p.add_argument("--out-dir", default=RESULTS, help=f"where {outputs} go (default: benchmarks/results)")
    return p


def devices(p, args):
    """The devices to run on: --device, less a GPU that is absent or that ppo_ext was built without."""
    chosen = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in chosen and not (torch.cuda.is_available() and ppo_ext.built_with_cuda()):
        why = "no GPU visible" if not torch.cuda.is_available() else "ppo_ext was built without its CUDA kernels"
        if args.device == "cuda":
            p.error(f"--device cuda: {why}")
        print(f"(no cuda run: {why})")
        chosen.remove("cuda")
    return chosen


def configure_torch(threads):
    import torch._dynamo

    torch.set_num_threads(threads)
    # one compile per shape and grad mode (dynamic=False), all of one code object: no fallback to eager after 8
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096


def l2_flush_buffer(device):
    """What cuda_times writes before each call to flush the L2 cache (None on the CPU)."""
    return torch.empty(256 << 20, dtype=torch.int8, device="cuda") if device == "cuda" else None


def environment(device, threads, quick):
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)

    def git(*cmd):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    meta = dict(
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else cpu_model,
        cpu_model=cpu_model, cpu_count=os.cpu_count(), threads=threads if device == "cpu" else None,
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        ppo_ext=ppo_ext.__version__, ppo_ext_built_with_cuda=ppo_ext.built_with_cuda(), git_commit=commit or None,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        mode="quick" if quick else "full", argv=sys.argv[1:],
        timer=("torch.utils.benchmark.Timer.blocked_autorange" if device == "cpu"
               else "CUDA events around each call, L2 flushed before each (as triton's do_bench)"),
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu_memory_GiB=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    return meta


def out_of_memory(exc):
    return f"out of memory: {str(exc).splitlines()[0][:100]}"


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total, desc):
        self.total, self.done, self.desc, self.t0 = total, 0, desc, time.time()
        self.tty = sys.stderr.isatty()

    def step(self, what):
        self.done += 1
        fill = 30 * self.done // self.total
        line = (f"{self.desc} [{'#' * fill}{'.' * (30 - fill)}] {self.done}/{self.total} "
                f"{time.time() - self.t0:4.0f}s {what}")
        sys.stderr.write("\r" + line[:120].ljust(120) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def quantile(xs, q):
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cpu_times(call, threads, budget_s):
    """Seconds per call, one sample per block of calls (torch.utils.benchmark picks the block size)."""
    timer = tbench.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
    return list(timer.blocked_autorange(min_run_time=budget_s).times)


def cuda_times(call, budget_s, flush):
    """Seconds per call from CUDA events around each call, as triton's do_bench measures: before each call 256 MiB
    are written to flush the L2 cache, and the call is enqueued behind that write, so that the host-side launch
    overhead of a call is hidden up to the write's duration (~0.1 ms on an H100), as it is in training where the
    loss is enqueued behind the model's forward; what a call launches beyond that, or after a host
    synchronisation of its own (.item()), shows. The GPU is drained after each call."""
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


class OtherLoad:
    """How busy other processes keep the CPUs while we time (Linux /proc/stat less this process's own CPU time),
    as a fraction of all CPUs: a shared machine makes timings noisy, and threads that wait for each other (an
    OpenMP barrier) lose whole scheduler ticks."""

    def __init__(self):
        self.busy = self.total = self.own = 0

    @staticmethod
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        t = os.times()
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks), (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    @contextlib.contextmanager
    def measure(self):
        try:
            start = self.sample()
        except (OSError, ValueError, AttributeError):
            start = None
        yield
        if start is not None:
            busy, total, own = (e - s for e, s in zip(self.sample(), start))
            self.busy, self.total, self.own = self.busy + busy, self.total + total, self.own + own

    def fraction(self):
        return max(0.0, (self.busy - self.own) / self.total) if self.total else None


def record_other_load(meta, load: OtherLoad):
    meta["other_cpu_load"] = load.fraction()
    if meta["other_cpu_load"] is not None and meta["other_cpu_load"] > 0.05:
        print(f"   WARNING: other processes kept {100 * meta['other_cpu_load']:.0f}% of the CPUs busy while timing: "
              "the times are noisy, rerun on a quiet machine", flush=True)


def time_interleaved(calls: Dict[str, Callable], device, threads, budget_s, rounds, flush):
    """Per-call times of each contender, in `rounds` rounds with the order rotated every round, so that a noisy
    machine does not bias a ratio."""
    names = list(calls)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if device == "cpu":
                samples[n] += cpu_times(calls[n], threads, budget_s / rounds)
            else:
                samples[n] += cuda_times(calls[n], budget_s / rounds, flush)
    return samples


def warm_up_and_time(calls: Dict[str, Callable], device, threads, budget_s, rounds, flush, load: OtherLoad):
    """Two warm-up calls of each contender, then time_interleaved, with the other processes' load measured."""
    for call in calls.values():
        for _ in range(2):
            call()
    with load.measure():
        return time_interleaved(calls, device, threads, budget_s, rounds, flush)


def add_speedups(row, bases):
    """speedup_vs_<base> (median over median) of every contender of a timing row, for the bases it has."""
    for n in row:
        for base in bases:
            if base in row:
                row[n][f"speedup_vs_{base}"] = row[base]["median_s"] / row[n]["median_s"]


def copy_bandwidth(device, threads, flush):
    """Measured copy bandwidth in bytes/s (read + write) of a 256 MiB buffer (1 GiB on a GPU)."""
    n = (1 << 30) if device == "cuda" else (256 << 20)
    x = torch.ones(n // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    if device == "cpu":
        sec = quantile(cpu_times(lambda: y.copy_(x), threads, 0.5), 0.5)
    else:
        for _ in range(3):
            y.copy_(x)
        sec = min(cuda_times(lambda: y.copy_(x), 0.5, flush))  # the best: what the memory sustains
    return 2 * n / sec


# ---------------------------------------------------------------------------------------------------------------
# Memory, ops and kernels, host synchronisations
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr():
    """The CPU-only torch's profiler prints two 'USDT: ... profiler_start/stop' lines to fd 2 per session."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def saved_bytes(fn, tensors, device):
    """Bytes the forward fn(*tensors) leaves allocated for its backward: what it allocated and did not free, less the
    storages of what it returns. Counted from the allocator (CUDA: memory_allocated; CPU: the profiler's allocation and
    free events), not from saved_tensors_hooks, which do not see what a custom autograd function keeps in its context
    (ppo_ext's per-token gradient, handed over to the backward in place)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = fn(*tensors)
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated() - base
    else:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*tensors)
        left = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    inputs = {t.untyped_storage().data_ptr() for t in tensors}
    returned = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
    del out
    return max(0, left - sum(n for ptr, n in returned.items() if ptr not in inputs))


def peak_extra_bytes(call, device):
    """Peak of the memory allocated during one call above what was allocated before it, the returned gradient
    included. CUDA: the caching allocator's statistics. CPU: the allocation and free events of PyTorch's CPU
    allocator recorded by the profiler (tensors only: no malloc of a kernel's own scratch), replayed in order."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_rss_extra_bytes(call):
    """CPU: the process's peak resident memory during one call above what it held before it (Linux: the peak is reset
    through /proc/self/clear_refs); None where that is not possible. Unlike peak_extra_bytes it sees every
    allocation (a GEMM's scratch, allocator slack), and memory the allocator frees but keeps is not seen again."""
    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS:")
    except (OSError, StopIteration):
        return None
    out = call()
    del out
    return (status_kib("VmHWM:") - before) * 1024


def count_cpu_ops(call):
    """Top-level dispatcher ops (aten::, ppo_ext::, ...) of one call: for eager, each one a pass over memory."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()

    def is_op(e):
        ns = e.name.split("::")[0] if "::" in e.name else None
        return ns is not None and ns not in ("autograd", "torch")

    n = 0
    for e in prof.events():
        if is_op(e):
            p = e.cpu_parent
            while p is not None and not is_op(p):
                p = p.cpu_parent
            n += p is None
    return dict(ops=n)


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def count_cuda_launches(call):
    """Kernels launched by one call (memsets included, copies apart), and host synchronisations: blocking CUDA
    runtime calls the profiler saw during the call, and torch.cuda's sync debug mode warnings (the larger)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("bench::call"):
            call()
        torch.cuda.synchronize()
    events = prof.events()
    window = next(e.time_range for e in events if e.name == "bench::call" and e.device_type == DeviceType.CPU)
    kernels = copies = runtime_syncs = 0
    for e in events:
        # (record_function ranges, ours and inductor's, are mirrored on the GPU as annotations: not kernels)
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            if e.name.startswith("Memcpy"):
                copies += 1
            else:
                kernels += 1
        elif e.name in SYNC_CALLS and window.start <= e.time_range.start <= window.end:
            runtime_syncs += 1

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    debug_syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    return dict(kernels=kernels, copies=copies, syncs=max(runtime_syncs, debug_syncs), runtime_syncs=runtime_syncs,
                sync_debug_warnings=debug_syncs)


def count_launches(call, device):
    return count_cpu_ops(call) if device == "cpu" else count_cuda_launches(call)


# ---------------------------------------------------------------------------------------------------------------
# Results: files, tables, plot
# ---------------------------------------------------------------------------------------------------------------


def result_stem(out_dir, name, device, quick):
    """<out_dir>/<name><device>-<date>[-quick], the directory made: the files of one run add their suffixes."""
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{name}{device}-{datetime.date.today().isoformat()}{'-quick' if quick else ''}")


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def setting(meta):
    """One line: where, what, when, and how busy the machine was."""
    where = (f"{meta['device_name']}, {meta['threads']} threads" if meta["device"] == "cpu"
             else f"{meta['device_name']}, CUDA {meta['cuda']}")
    load = meta.get("other_cpu_load")
    load = "" if load is None else f"; other processes' CPU load while timing {100 * load:.0f}%"
    return (f"{where}; torch {meta['torch']}; ppo_ext {meta['ppo_ext']} ({meta['git_commit']}); {meta['date']}; "
            f"{meta['mode']} run; measured copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s{load}.")


def markdown_table(headers, rows):
    """Lines of a GitHub table, cells as given."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def targets_table(targets, tablefmt):
    """The targets (dicts of target, measured, met: True / False / None for not measured) as a tabulate table."""
    from tabulate import tabulate

    verdict = {True: "met", False: "NOT met", None: "not measured in this run"}
    rows = [[t["target"], t["measured"] or "-", verdict[t["met"]]] for t in targets]
    return tabulate(rows, headers=["target", "measured", "verdict"], tablefmt=tablefmt, disable_numparse=True)


def plot_time_against_tokens(series, passes, styles, title, path):
    """Median time per call against tokens, log-log, a panel per pass and a line per contender (styles: name ->
    (colour, line style)), from the results of `series` (cases in token order). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("   matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    if not series:
        return None
    fig, axes = plt.subplots(1, len(passes), figsize=(12, 4.8), sharey=True)
    for ax, pas in zip(axes, passes):
        for n, (colour, line) in styles.items():
            pts = [(r["tokens"], r["timing"][pas][n]["median_s"] * 1e3) for r in series if n in r["timing"][pas]]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour, linestyle=line, label=n)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (B x T)")
        ax.set_title(pas)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_cases_per_device(args, devices, cases_of, run_case, table, name, title, extra_meta=None):
    """The main loop of a benchmark: per device, its environment record (plus ``extra_meta(device)``), every case of
    ``cases_of(quick, device)`` through ``run_case(case, device, threads, budget, rounds, flush, load)`` (a case out of
    memory is recorded as skipped), the tables of ``table(result)`` printed and written with the JSON to
    <out-dir>/<name><device>-<date>[-quick] (unless --no-write), headed ``title``. Returns the exit status."""
    mismatch = False
    t0 = time.time()
    for device in devices:
        meta = environment(device, args.threads, args.quick)
        flush = l2_flush_buffer(device)
        meta["copy_bandwidth_GBps"] = copy_bandwidth(device, args.threads, flush) / 1e9
        meta.update(extra_meta(device) if extra_meta else {})
        print(f"== {device}: {meta['device_name']}, torch {meta['torch']}, copy bandwidth "
              f"{meta['copy_bandwidth_GBps']:.1f} GB/s", flush=True)
        load = OtherLoad()
        budget, rounds = (0.3, 2) if args.quick else (1.0, 3)
        cases = []
        for case in cases_of(args.quick, device):
            print(f"   {case.name} ...", flush=True)
            try:
                cases.append(run_case(case, device, args.threads, budget, rounds, flush, load))
            except OUT_OF_MEMORY as exc:
                cases.append(dict(case=case.name, skipped=out_of_memory(exc)))
            if device == "cuda":
                torch.cuda.empty_cache()
        record_other_load(meta, load)
        result = dict(meta=meta, cases=cases)
        text = table(result)
        print(text)
        mismatch |= any(not c["ok"] for r in cases for c in r.get("check", {}).values() if "skipped" not in c)
        if not args.no_write:
            stem = result_stem(args.out_dir, name, device, args.quick)
            write_json(result, stem + ".json")
            with open(stem + ".md", "w") as f:
                f.write(f"# {title}: {setting(meta)}\n{text}\n")
            print(f"\nwrote {stem}.json, {stem}.md")
    return exit_status(mismatch, t0)


def exit_status(mismatch, t0):
    """2 when a contender did not match its reference, else 0 (after saying how long the run took)."""
    print(f"done in {time.time() - t0:.0f} s")
    return 2 if mismatch else 0
