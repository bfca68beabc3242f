#!/usr/bin/env python
"""Benchmark the PPO loss from logits: ppo_ext.policy_loss_from_logits against eager PyTorch, torch.compile and
a chunked eager variant; and the actor's whole loss (loss "actor": the PPO loss plus verl's k3 KL loss to a
reference policy and an entropy bonus, as verl's actor computes them) against eager and torch.compile of verl's code.

Contenders, each computing the log-probs of the taken tokens from (B, T, V) logits and verl 0.9's vanilla PPO loss
(clip 0.2 / 0.28, dual clip 3, token-mean), then its gradient w.r.t. the logits:

  eager            logits.float() -> log_softmax -> gather, then verl's loss (verl 0.9.1's own
                   compute_policy_loss_vanilla, loaded from the installed package by tests/frameworks.py,
                   its three .item() calls on the metrics included)
  compiled         torch.compile of eager (dynamic=False, one compile per shape)
  chunked          TRL's selective_log_softmax (baselines/trl.py: logsumexp row by row for float32 logits;
                   log_softmax row by row, here upcast to float32 per row, for bf16 ones), then verl's loss
  ppo_ext          ppo_ext.policy_loss_from_logits (same loss; plus all of ppo_ext's metrics and the log-probs)
  ppo_ext-inplace  the same with inplace_backward=True: the gradient is written over the logits

The "actor" cases (verl's use_kl_loss with kl_loss_type=low_var_kl, kl_loss_coef 0.05, entropy_coeff 0.01):

  eager            logits.float() -> log_softmax -> gather and verl's entropy_from_logits, then verl's loss,
                   verl's kl_penalty + agg_loss and agg_loss of the entropy (verl 0.9.1's own functions, as its
                   ppo_loss combines them)
  compiled         torch.compile of eager
  ppo_ext          policy_loss_from_logits(ref_log_probs=, kl_coef=, entropy_coef=): the KL in the loss's kernel
                   pass, the entropy's gradient in the log-probs' backward pass
  ppo_ext-inplace  the same in place

First every contender is checked against a float64 reference (log_softmax in float64, computed in row chunks):
loss and gradient. Then timed, interleaved, forward+backward ("fwd+bwd") and the log-probs alone under no_grad
("logprobs", as for the old policy's log-probs; eager/compiled/chunked without the loss, ppo_ext's
log_probs_from_logits). Then the peak memory allocated during one fwd+bwd beyond what existed before, with and
without the gradient (which every contender returns: logits-sized, except in place), as a fraction of the logits.

    python benchmarks/bench_logits.py --quick            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_logits.py                    # CPU: N = 1024, 4096 at V = 32000 (and 151936)
    python benchmarks/bench_logits.py --device cuda      # GPU: N = 8192, 32768 at V = 32000, 128256, 151936

Writes <out-dir>/logits-<device>-<date>[-quick].{json,md} (out-dir: benchmarks/results) unless --no-write, and
exits with 2 if a contender does not match the reference.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a checkout where ppo_ext was built in place; the benchmarks package

import ppo_ext  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.baselines import frameworks  # noqa: E402
from benchmarks.baselines.trl import selective_log_softmax  # noqa: E402
from ppo_ext.reference import policy_loss_reference  # noqa: E402

VERL_CONFIG = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode="token-mean")
OPTIONS = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, importance_sampling="token",
               loss_agg_mode="token-mean")
CONTENDERS = ("eager", "compiled", "chunked", "ppo_ext", "ppo_ext-inplace")
PASSES = ("fwd+bwd", "logprobs")
# The actor loss: verl's use_kl_loss (kl_loss_type, kl_loss_coef) and entropy_coeff.
KL_LOSS_TYPE, KL_COEF, ENTROPY_COEF = "low_var_kl", 0.05, 0.01


# ---------------------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------------------


def eager_log_probs(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_vanilla():
    """verl's compute_policy_loss_vanilla as verl's actor calls it (verl's ActorConfig, keyword arguments)."""
    verl = frameworks().verl()
    config = verl.actor_config(**VERL_CONFIG)
    fn = verl.core_algos.compute_policy_loss_vanilla

    def loss(old, lp, adv, mask):
        return fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                  loss_agg_mode=config.loss_agg_mode, config=config)[0]

    return loss


def with_verl_loss(log_probs_fn):
    verl_loss = verl_vanilla()

    def loss(logits, labels, old, adv, mask):
        return verl_loss(old, log_probs_fn(logits, labels), adv, mask)

    return loss


def verl_actor_loss():
    """verl's actor loss on the logits, as its ppo_loss combines verl's own functions: the vanilla loss, plus
    kl_loss_coef * agg_loss(kl_penalty(lp, ref, kl_loss_type)), minus entropy_coeff * agg_loss(entropy_from_logits)."""
    verl = frameworks().verl()
    pg_loss = verl_vanilla()
    core, entropy_from_logits = verl.core_algos, verl.torch_functional.entropy_from_logits

    def loss(logits, labels, old, adv, mask, ref):
        lp = eager_log_probs(logits, labels)
        entropy = entropy_from_logits(logits.float())
        kl = core.agg_loss(loss_mat=core.kl_penalty(lp, ref, KL_LOSS_TYPE), loss_mask=mask,
                           loss_agg_mode=OPTIONS["loss_agg_mode"])
        ent = core.agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=OPTIONS["loss_agg_mode"])
        return pg_loss(old, lp, adv, mask) + KL_COEF * kl - ENTROPY_COEF * ent

    return loss


def ppo_ext_loss(inplace, actor):
    def loss(logits, labels, old, adv, mask, ref=None):
        extra = dict(ref_log_probs=ref, kl_coef=KL_COEF, kl_estimator=KL_LOSS_TYPE, entropy_coef=ENTROPY_COEF) \
            if actor else {}
        return ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, inplace_backward=inplace,
                                               **OPTIONS, **extra).loss

    return loss


def ppo_ext_log_probs(logits, labels):
    return ppo_ext.log_probs_from_logits(logits, labels)[0]


def make_contenders(loss):
    if loss == "actor":  # (no chunked variant: TRL's chunking is for the log-probs alone)
        eager = verl_actor_loss()
        return {
            "eager": (eager, None),
            "compiled": (torch.compile(eager, dynamic=False), None),
            "ppo_ext": (ppo_ext_loss(False, True), None),
            "ppo_ext-inplace": (ppo_ext_loss(True, True), None),
        }
    eager = with_verl_loss(eager_log_probs)
    return {
        "eager": (eager, eager_log_probs),
        "compiled": (torch.compile(eager, dynamic=False), torch.compile(eager_log_probs, dynamic=False)),
        "chunked": (with_verl_loss(selective_log_softmax), selective_log_softmax),
        "ppo_ext": (ppo_ext_loss(False, False), ppo_ext_log_probs),
        "ppo_ext-inplace": (ppo_ext_loss(True, False), None),
    }


# ---------------------------------------------------------------------------------------------------------------
# Cases, inputs, reference
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    B: int
    T: int
    V: int
    dtype: str  # "bf16" | "fp32"
    loss: str = "ppo"  # "ppo" | "actor" (with the KL loss and the entropy bonus)

    @property
    def tokens(self):
        return self.B * self.T

    @property
    def name(self):
        return f"N={self.tokens} V={self.V} {self.dtype}" + (" actor" if self.loss == "actor" else "")

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def logits_bytes(self):
        return self.tokens * self.V * self.torch_dtype.itemsize


def all_cases(quick, device):
    if device == "cpu":
        if quick:
            return [Case(2, 512, 32000, "fp32"), Case(2, 512, 32000, "bf16"), Case(2, 512, 32000, "bf16", "actor")]
        return [Case(B, 512, 32000, dt) for B in (2, 8) for dt in ("fp32", "bf16")] + \
            [Case(2, 512, 151936, "bf16")] + [Case(B, 512, 32000, "bf16", "actor") for B in (2, 8)]
    if quick:
        return [Case(16, 512, 32000, "bf16"), Case(16, 512, 151936, "bf16"), Case(16, 512, 151936, "bf16", "actor")]
    return [Case(N // 1024, 1024, V, "bf16") for N in (8192, 32768) for V in (32000, 128256, 151936)] + \
        [Case(N // 1024, 1024, 151936, "bf16", "actor") for N in (8192, 32768)]


@dataclass
class Inputs:
    logits: torch.Tensor  # leaf, requires grad
    labels: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    ref: Optional[torch.Tensor] = None  # the reference policy's log-probs ("actor" cases)

    def loss_args(self):
        return (self.labels, self.old, self.adv, self.mask) + (() if self.ref is None else (self.ref,))


def make_inputs(case, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.T, case.V)
    logits = (2.0 * torch.randn(shape, generator=g, device=device, dtype=torch.float32)).to(case.torch_dtype)
    labels = torch.randint(0, case.V, (case.B, case.T), generator=g, device=device)
    with torch.no_grad():
        lp = ppo_ext.log_probs_from_logits(logits, labels)[0]
    old = lp + 0.1 * torch.randn(lp.shape, generator=g, device=device)
    adv = torch.randn(lp.shape, generator=g, device=device)
    mask = torch.rand(lp.shape, generator=g, device=device) < 0.9
    ref = lp + 0.3 * torch.randn(lp.shape, generator=g, device=device) if case.loss == "actor" else None
    return Inputs(logits.requires_grad_(True), labels, old, adv, mask, ref)


def reference(inp, rows_per_chunk):
    """float64: the loss, the log-probs and entropies, and the upstream gradients w.r.t. them (of the logits:
    grad_error), built in row chunks (no float64 copy of the whole logits). The actor loss adds the reference's KL
    (verl's k3) and subtracts ENTROPY_COEF times the entropy aggregated as the loss (the reference's gpg loss with
    A = -1 is the entropy itself)."""
    B, T, V = inp.logits.shape
    flat = inp.logits.detach().view(-1, V)
    labels = inp.labels.reshape(-1)
    lp = torch.empty(B * T, dtype=torch.float64, device=flat.device)
    entropy = torch.empty(B * T, dtype=torch.float64, device=flat.device)
    for r0 in range(0, B * T, rows_per_chunk):
        logp = torch.log_softmax(flat[r0:r0 + rows_per_chunk].double(), -1)
        lp[r0:r0 + rows_per_chunk] = logp.gather(-1, labels[r0:r0 + rows_per_chunk, None])[:, 0]
        entropy[r0:r0 + rows_per_chunk] = -(logp.exp() * logp).sum(-1)
    lp = lp.view(B, T).requires_grad_(True)
    entropy = entropy.view(B, T).requires_grad_(True)
    kl = {} if inp.ref is None else dict(ref_log_probs=inp.ref.double(), kl_coef=KL_COEF, kl_estimator=KL_LOSS_TYPE)
    loss = policy_loss_reference(lp, inp.old.double(), inp.adv.double(), inp.mask, **OPTIONS, **kl).loss
    if inp.ref is not None:
        minus_one = -torch.ones(B, dtype=torch.float64, device=flat.device)
        loss = loss - ENTROPY_COEF * policy_loss_reference(entropy, None, minus_one, inp.mask, loss_type="gpg",
                                                           loss_agg_mode=OPTIONS["loss_agg_mode"]).loss
    g_lp, g_h = torch.autograd.grad(loss, (lp, entropy), allow_unused=True)
    g_h = torch.zeros_like(entropy) if g_h is None else g_h
    return loss.item(), (lp.detach(), entropy.detach()), (g_lp.reshape(-1), g_h.reshape(-1))


def grad_error(grad, inp, ref, rows_per_chunk):
    """max |grad - reference| / max |reference| over the logits, chunk by chunk: g_lp (onehot - p) - g_H p (log p +
    H) per row."""
    V = inp.logits.shape[-1]
    flat = inp.logits.detach().view(-1, V)
    labels = inp.labels.reshape(-1)
    grad = grad.reshape(-1, V)
    entropy = ref[1][1].reshape(-1)
    g_lp, g_h = ref[2]
    err = scale = 0.0
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        logp = torch.log_softmax(flat[rows].double(), -1)
        p = logp.exp()
        ref = -p * (g_lp[rows, None] + g_h[rows, None] * (logp + entropy[rows, None]))
        ref.scatter_add_(1, labels[rows, None], g_lp[rows, None])
        err = max(err, (grad[r0:r0 + rows_per_chunk].double() - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return err / max(scale, 1e-30)


def fwd_bwd_call(fn, inp):
    """One forward + backward; returns the gradient."""

    def call():
        inp.logits.grad = None
        loss = fn(inp.logits, *inp.loss_args())
        loss.backward()
        return inp.logits.grad

    return call


def logprobs_call(fn, inp):
    def call():
        with torch.no_grad():
            return fn(inp.logits, inp.labels)

    return call


def check(name, loss_fn, inp, ref, device, rows_per_chunk):
    source = inp.logits.detach().clone()
    with torch.no_grad():
        inp.logits.copy_(source)
    inp.logits.grad = None
    loss = loss_fn(inp.logits, *inp.loss_args())
    loss.backward()
    grad = inp.logits.grad.clone() if name != "ppo_ext-inplace" else inp.logits.detach().clone()
    with torch.no_grad():
        inp.logits.copy_(source)  # the in-place contender overwrote them
    inp.logits.grad = None
    ref_loss = ref[0]
    loss_err = abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-12)
    g_err = grad_error(grad, inp, ref, rows_per_chunk)
    tol = 1e-2 if inp.logits.dtype == torch.bfloat16 else 1e-4
    ok = loss_err < 1e-4 and g_err < tol
    return dict(ok=ok, loss_rel_err=loss_err, grad_rel_err=g_err, grad_tol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def run_case(case, device, threads, budget, rounds, flush, load):
    res = dict(case=case.name, B=case.B, T=case.T, V=case.V, dtype=case.dtype, tokens=case.tokens,
               logits_bytes=case.logits_bytes())
    fns = make_contenders(case.loss)
    inp = make_inputs(case, device, seed=case.tokens + case.V)
    rows_per_chunk = max(1, (64 << 20) // (8 * case.V))
    ref = reference(inp, rows_per_chunk)
    source = inp.logits.detach().clone()

    checks = {}
    for name, (loss_fn, _) in fns.items():
        t0 = time.time()
        try:
            checks[name] = check(name, loss_fn, inp, ref, device, rows_per_chunk)
        except harness.OUT_OF_MEMORY as exc:
            checks[name] = dict(ok=False, skipped=harness.out_of_memory(exc))
            if device == "cuda":
                torch.cuda.empty_cache()
        checks[name]["first_call_s"] = time.time() - t0
    res["check"] = checks
    runnable = [n for n in fns if "skipped" not in checks[n]]

    res["timing"] = {}
    for pas in PASSES:
        if pas == "fwd+bwd":
            # (the in-place contender leaves its gradient in the logits: later calls read those values instead,
            # which costs the same; they are restored after the pass)
            calls = {n: fwd_bwd_call(fns[n][0], inp) for n in runnable}
        else:
            calls = {n: logprobs_call(fns[n][1], inp) for n in runnable if fns[n][1] is not None}
            if not calls:  # the actor loss: no log-probs-alone contenders
                continue
        samples = harness.warm_up_and_time(calls, device, threads, budget, rounds, flush, load)
        # the bytes the op must move: the logits read once forward; backward read once more and the gradient written
        floor_bytes = case.logits_bytes() * (3 if pas == "fwd+bwd" else 1)
        row = {}
        for n, xs in samples.items():
            med = harness.quantile(xs, 0.5)
            row[n] = dict(median_s=med, p25_s=harness.quantile(xs, 0.25), p75_s=harness.quantile(xs, 0.75),
                          n_samples=len(xs),
                          floor_bytes=floor_bytes, GBps=floor_bytes / med / 1e9)
        harness.add_speedups(row, ("eager", "compiled", "chunked"))
        res["timing"][pas] = row
        with torch.no_grad():
            inp.logits.copy_(source)

    memory = {}
    grad_bytes = case.logits_bytes()
    for n in runnable:
        inp.logits.grad = None  # freed before, not during, the measured call
        peak = harness.peak_extra_bytes(fwd_bwd_call(fns[n][0], inp), device)
        with torch.no_grad():
            inp.logits.copy_(source)
        beyond_grad = peak - (0 if n == "ppo_ext-inplace" else grad_bytes)
        size = case.logits_bytes()
        memory[n] = dict(peak_extra_bytes=peak, peak_extra_fraction=peak / size, peak_beyond_grad_bytes=beyond_grad,
                         peak_beyond_grad_fraction=beyond_grad / size)
    res["memory"] = memory
    inp.logits.grad = None
    return res


def fmt_time(s):
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def table(result):
    lines = []
    for pas in PASSES:
        lines.append(f"\n### {pas}: median time (speed-up of ppo_ext vs eager / compiled / chunked)\n")
        rows = []
        for res in result["cases"]:
            row = res.get("timing", {}).get(pas, {})
            if "timing" in res and not row:  # a pass the case does not time (the actor loss: no logprobs)
                continue
            cells = [fmt_time(row[n]["median_s"]) if n in row else "-" for n in CONTENDERS]
            p = row.get("ppo_ext", {})
            ratios = [f"{p[k]:.2f}x" if k in p else "-" for k in ("speedup_vs_eager", "speedup_vs_compiled",
                                                                   "speedup_vs_chunked")]
            rows.append([res["case"], *cells, *ratios])
        lines += harness.markdown_table(["case", *CONTENDERS, "ppo_ext vs eager", "vs compiled", "vs chunked"], rows)
    lines.append("\n### fwd+bwd: peak extra memory / logits size (beyond the logits-sized gradient in brackets)\n")
    rows = []
    for res in result["cases"]:
        mem = res.get("memory", {})
        cells = [f"{mem[n]['peak_extra_fraction']:.2f} ({mem[n]['peak_beyond_grad_fraction']:+.3f})" if n in mem
                 else "-" for n in CONTENDERS]
        rows.append([res["case"], *cells])
    lines += harness.markdown_table(["case", *CONTENDERS], rows)
    lines.append("\n### check against float64 (relative error of the loss; of the gradient, max over max)\n")
    rows = []
    for res in result["cases"]:
        c = res.get("check", {})
        cells = [("ok " if c[n]["ok"] else "FAIL ") + (f"{c[n]['loss_rel_err']:.1e} / {c[n]['grad_rel_err']:.1e}"
                                                        if "loss_rel_err" in c[n] else c[n].get("skipped", ""))
                 if n in c else "-" for n in CONTENDERS]
        rows.append([res["case"], *cells])
    lines += harness.markdown_table(["case", *CONTENDERS], rows)
    return "\n".join(lines)


def main():
    p = harness.parser(__doc__, "two cases, short timings", "logits-<device>-<date>[-quick].{json,md}",
                       argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args()
    devices = harness.devices(p, args)
    torch._dynamo.config.capture_scalar_outputs = True  # verl's .item() calls inside the compiled graph (README)
    try:
        frameworks().verl()
    except frameworks().FrameworkMissing as exc:
        p.error(f"the eager contenders run verl's own loss: {exc}")
    harness.configure_torch(args.threads)

    return harness.run_cases_per_device(args, devices, all_cases, run_case, table, "logits-", "ppo_ext.policy_loss_from_logits")


if __name__ == "__main__":
    sys.exit(main())
