#!/usr/bin/env python
"""Benchmark ppo_ext.policy_loss against the frameworks' own eager PyTorch code and torch.compile of it.

The eager contender is verl 0.9.1's compute_policy_loss_vanilla / compute_policy_loss_gspo (and, for the
sequence-level ratio with the gradient through the mean, OpenRLHF 0.11.2's GSPO PolicyLoss; for the other loss
families, verl's compute_policy_loss_cispo / _sapo / _gpg / _dro / _dppo_tv / _dppo_kl / _geo_mean, the critic's
compute_value_loss and TRL 1.16's VESPO (GRPOTrainer.get_gamma_weights and its loss lines)), loaded from the
installed packages by tests/frameworks.py and called as the frameworks' actors call them. Every contender is
first checked against the float64 reference (ppo_ext.reference): loss, metrics, clip counters and gradient,
with and without autograd. Then forward alone and forward + backward are timed, contenders interleaved in one
process, inputs rotated. Also measured: effective bandwidth against the minimum bytes the op must move, bytes
saved for backward, peak extra memory, ops / CUDA kernels per call, host synchronisations (CUDA).

    python benchmarks/bench_policy_loss.py --quick            # about a minute on a 2-core CPU
    python benchmarks/bench_policy_loss.py                    # the reference run, a few minutes
    python benchmarks/bench_policy_loss.py --device cuda      # cpu | cuda | all (default: all that exist)

Writes benchmarks/results/<device>-<date>[-quick].{json,md,png} and exits with 2 if a contender does not match
the reference (or cannot run: verl / OpenRLHF not installed). See benchmarks/README.md.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a checkout where ppo_ext was built in place; the benchmarks package

import ppo_ext  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.baselines import frameworks  # noqa: E402
from ppo_ext.reference import policy_loss_reference  # noqa: E402

CONTENDERS = ("eager", "compiled", "ppo_ext")
PASSES = ("fwd+bwd", "fwd")


# ---------------------------------------------------------------------------------------------------------------
# Contenders: the frameworks' own eager code as their users run it ("eager"), torch.compile of it, ppo_ext
# ---------------------------------------------------------------------------------------------------------------

# The losses benchmarked: the framework's function and its options, the names of its metrics in ppo_ext's terms
# (`metrics`: the framework's key -> ppo_ext's metric; every key the framework returns must be there), and the
# ppo_ext options that compute the same thing. (ppo_ext's log_ratio_clamp=10 clamps to [-10, 10] where verl's GSPO
# clamps to (-inf, 10]: the same here, where |log ratio| stays far below 10.)
VERL_METRICS = {"actor/pg_clipfrac": "clipfrac_active", "actor/ppo_kl": "approx_kl",
                "actor/pg_clipfrac_lower": "dual_clipfrac"}
KINDS = {
    "ppo": dict(
        label="token", framework="verl", function="compute_policy_loss_vanilla",
        config=dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                    loss_agg_mode="token-mean"),
        metrics=VERL_METRICS,
        options=dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0,
                     importance_sampling="token", loss_agg_mode="token-mean")),
    "gspo": dict(
        label="seq-token (GSPO)", framework="verl", function="compute_policy_loss_gspo",
        config=dict(clip_ratio=3e-4, clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean"),
        metrics=VERL_METRICS,
        options=dict(clip_low=3e-4, clip_high=4e-4, log_ratio_clamp=10.0,
                     importance_sampling="seq-token", loss_agg_mode="seq-mean-token-mean")),
    "seq": dict(
        label="seq", framework="openrlhf",
        config=dict(clip_eps_low=3e-4, clip_eps_high=4e-4, policy_loss_type="gspo"),
        metrics={"clip_ratio": "clipfrac_active", "ppo_kl": "approx_kl"},  # PolicyLoss's 2nd and 3rd outputs
        options=dict(clip_low=3e-4, clip_high=4e-4, log_ratio_clamp=None,
                     importance_sampling="seq", loss_agg_mode="seq-mean-token-mean")),
    # The other loss families verl registers (ppo_ext's loss_type), verl's defaults where it has them.
    # cispo: -sg(clip(r, 0.8, 1.28)) A lp; verl's pg_clipfrac counts r outside the bounds (ppo_ext's clipfrac),
    # its pg_clipfrac_lower is a constant 0 (ppo_ext's dual_clipfrac is 0 for cispo: checked equal).
    "cispo": dict(
        label="cispo", framework="verl", function="compute_policy_loss_cispo",
        config=dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-mean"),
        metrics={"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                 "actor/pg_clipfrac_lower": "dual_clipfrac"},
        options=dict(loss_type="cispo", clip_low=0.2, clip_high=0.28, log_ratio_clamp=20.0,
                     loss_agg_mode="token-mean")),
    # sapo: verl aggregates with seq-mean-token-mean whatever loss_agg_mode it is given (here token-mean, its
    # default); its two clipfracs are constant 0s, checked against ppo_ext's clipfrac / dual_clipfrac (0 for sapo).
    "sapo": dict(
        label="sapo", framework="verl", function="compute_policy_loss_sapo",
        config=dict(tau_pos=1.0, tau_neg=1.05, loss_agg_mode="token-mean"),
        metrics={"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                 "actor/pg_clipfrac_lower": "dual_clipfrac"},
        options=dict(loss_type="sapo", tau_pos=1.0, tau_neg=1.05, log_ratio_clamp=20.0,
                     loss_agg_mode="seq-mean-token-mean")),
    # gpg: -A lp; verl returns no metrics.
    "gpg": dict(
        label="gpg", framework="verl", function="compute_policy_loss_gpg",
        config=dict(loss_agg_mode="token-mean"), metrics={},
        options=dict(loss_type="gpg", loss_agg_mode="token-mean")),
    # dro: -(A lp - beta/2 (lp - old)^2), beta from config.policy_loss.dro_beta, no clamp; verl's one metric is
    # ppo_kl (the mean of old - lp, unclamped).
    "dro": dict(
        label="dro", framework="verl", function="compute_policy_loss_dro",
        config=dict(loss_agg_mode="token-mean"), policy_loss=dict(loss_mode="dro", dro_beta=0.1),
        metrics={"actor/ppo_kl": "approx_kl"},
        options=dict(loss_type="dro", dro_beta=0.1, loss_agg_mode="token-mean")),
    # dppo_tv / dppo_kl: clip_ratio_low / high are the divergence thresholds (verl's defaults 0.2 / 0.28: here
    # 0.5% (tv) and 1.1% (kl) of the tokens are dropped), clip_ratio_c the truncation of the ratio (verl reads
    # config.get("clip_ratio_c", 20.0); ActorConfig has the field, set to 20 here: ~130 kept tokens per 1M are
    # truncated). verl's pg_clipfrac is the dropped fraction (ppo_ext's clipfrac_active), its pg_clipfrac_lower
    # the truncated kept fraction (ppo_ext's dual_clipfrac).
    "dppo_tv": dict(
        label="dppo_tv", framework="verl", function="compute_policy_loss_dppo_tv",
        config=dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=20.0,
                    loss_agg_mode="token-mean"),
        metrics=VERL_METRICS,
        options=dict(loss_type="dppo_tv", clip_low=0.2, clip_high=0.28, ratio_cap=20.0, log_ratio_clamp=20.0,
                     loss_agg_mode="token-mean")),
    "dppo_kl": dict(
        label="dppo_kl", framework="verl", function="compute_policy_loss_dppo_kl",
        config=dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=20.0,
                    loss_agg_mode="token-mean"),
        metrics=VERL_METRICS,
        options=dict(loss_type="dppo_kl", clip_low=0.2, clip_high=0.28, ratio_cap=20.0, log_ratio_clamp=20.0,
                     loss_agg_mode="token-mean")),
    # vespo: TRL's, with its default Gamma parameters and dapo aggregation (one process, no accumulation: the
    # valid tokens); TRL's one metric (vespo/phi_seq_mean) is not a kernel metric. Its inputs are near on-policy
    # (log-ratios N(0, 0.01): a row's sum over ~7400 tokens is ~N(0, 0.86), where the weight varies; off-policy
    # rows of 8192 tokens would all have weight ~0).
    "vespo": dict(
        label="vespo", framework="trl", config=dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0),
        metrics={}, spread=(0.01, 0.01),
        options=dict(loss_type="vespo", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                     loss_agg_mode="token-mean")),
    # geo_mean (GMPO): verl averages -A exp(mean of the sign-aware clipped log-ratios) over all rows whatever
    # loss_agg_mode says (seq-mean-token-mean over the B rows here, none empty), GMPO's clip range (-0.4, 0.4) on the
    # unclamped log-ratio; its pg_clipfrac / pg_clipfrac_lower count log-ratios outside it with A > 0 / A < 0.
    "geo_mean": dict(
        label="geo_mean", framework="verl", function="compute_policy_loss_geo_mean",
        config=dict(clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.4, loss_agg_mode="token-mean"),
        metrics={"actor/pg_clipfrac": "clipfrac_high", "actor/ppo_kl": "approx_kl",
                 "actor/pg_clipfrac_lower": "clipfrac_low"},
        options=dict(loss_type="geo_mean", importance_sampling="seq", loss_agg_mode="seq-mean-token-mean",
                     clip_low=0.4, clip_high=0.4)),
    # value: the critic's clipped value loss, verl's compute_value_loss with verl's default cliprange_value 0.5 (the
    # values in log_probs' place, the old values in old_log_probs', the returns, one per token, in the advantages');
    # its vf_clipfrac is where the clipped term is the larger (ppo_ext's clipfrac_active).
    "value": dict(
        label="value", framework="verl", function="compute_value_loss", adv="BT",
        config=dict(cliprange_value=0.5, loss_agg_mode="token-mean"), metrics={"vf_clipfrac": "clipfrac_active"},
        options=dict(loss_type="value", clip_low=0.5, clip_high=0.5, loss_agg_mode="token-mean")),
}
# the kinds with a loss_type but vanilla
FAMILIES = ("cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "vespo", "value")


def verl_config(verl, spec):
    """verl's ActorConfig of a kind: its `config` fields, and `policy_loss` (verl's PolicyLossConfig, the class of
    ActorConfig's policy_loss field: dro reads config.policy_loss.dro_beta) when the kind sets any of its fields."""
    fields = dict(spec["config"])
    if "policy_loss" in spec:
        (field,) = [f for f in dataclasses.fields(verl.ActorConfig) if f.name == "policy_loss"]
        fields["policy_loss"] = field.default_factory(**spec["policy_loss"])
    return verl.actor_config(**fields)


def framework_loss(kind):
    """The framework's loss of `kind` as a function (lp, old, adv, mask) -> (loss, metrics by ppo_ext's names).

    verl: verl's function with verl's ActorConfig, called as verl's ppo_loss calls it; it ends with .item() calls
    on its metrics (a host synchronisation each on a GPU), which are part of verl's function and so of its
    time. OpenRLHF: its PolicyLoss module, called as its actor calls it; it returns tensors (no synchronisation).
    The metrics are renamed by the kind's `metrics` map (a metric it does not name is an error).
    Raises frameworks().FrameworkMissing when the package is not installed."""
    spec = KINDS[kind]
    names = spec["metrics"]
    if spec["framework"] == "verl" and spec["function"] == "compute_value_loss":
        fn = frameworks().verl().core_algos.compute_value_loss

        def verl_value_loss(lp, old, adv, mask):  # as verl's critic calls it
            vf_loss, vf_clipfrac = fn(vpreds=lp, returns=adv, values=old, response_mask=mask, **spec["config"])
            return vf_loss, {names["vf_clipfrac"]: vf_clipfrac}

        return verl_value_loss
    if spec["framework"] == "verl":
        verl = frameworks().verl()
        config = verl_config(verl, spec)
        fn = getattr(verl.core_algos, spec["function"])

        def verl_loss(lp, old, adv, mask):
            pg_loss, m = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                            loss_agg_mode=config.loss_agg_mode, config=config)
            return pg_loss, {names[k]: v for k, v in m.items()}

        return verl_loss
    if spec["framework"] == "trl":
        gamma_weights = frameworks().trl().GRPOTrainer.get_gamma_weights

        def trl_loss(lp, old, adv, mask):
            # GRPOTrainer._compute_loss for loss_type="vespo" (one process, no accumulation): TRL's own
            # get_gamma_weights, then its two lines of loss and dapo aggregation
            phi_seq = gamma_weights(advantages=adv, log_ratio_per_token=lp - old, mask=mask,
                                    importance_sampling_ratio=None, **spec["config"])
            per_token_loss = -phi_seq * adv * lp
            return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0), {}

        return trl_loss
    module = frameworks().openrlhf().loss.PolicyLoss(**spec["config"])

    def openrlhf_loss(lp, old, adv, mask):
        loss, clip_ratio, ppo_kl, _, _ = module(lp, old, adv, action_mask=mask)
        return loss, {names["clip_ratio"]: clip_ratio, names["ppo_kl"]: ppo_kl}

    return openrlhf_loss


def make_eager(kind):
    try:
        fn = framework_loss(kind)
    except frameworks().FrameworkMissing as exc:
        reason = str(exc)

        def missing(*args):
            raise RuntimeError(reason)

        return missing

    def eager(lp, old, adv, mask):
        if adv.dim() == 1:  # the frameworks' advantages are (B, T); a (B,) one is broadcast, the cheapest way
            adv = adv.unsqueeze(-1)
        return fn(lp, old, adv, mask)

    return eager


def make_ppo_ext(kind):
    options = KINDS[kind]["options"]

    def fused(lp, old, adv, mask):
        out = ppo_ext.policy_loss(lp, old, adv, mask, **options)
        return out.loss, out.metrics, out.counts

    return fused


def make_contenders(kind):
    eager = make_eager(kind)
    return {
        "eager": eager,
        "compiled": torch.compile(eager, dynamic=False),
        "ppo_ext": make_ppo_ext(kind),
    }


# ---------------------------------------------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    B: int
    T: int
    kind: str = "ppo"  # key of KINDS
    adv: str = "BT"  # "BT": advantages (B, T); "B": (B,)
    mask: str = "0.9"  # "0.9": Bernoulli(0.9); "empty-rows": right padding, every 4th row empty
    series: bool = False  # one of the points of the plot (time against tokens)

    @property
    def tokens(self):
        return self.B * self.T

    @property
    def name(self):
        adv = "A(B,T)" if self.adv == "BT" else "A(B,)"
        return f"{self.B}x{self.T} {KINDS[self.kind]['label']} {adv} m:{self.mask}"


# launch-bound, middle, bandwidth-bound
SERIES_SHAPES = [(8, 1024), (32, 1024), (1, 24000), (64, 2048), (16, 8192), (128, 8192), (512, 8192)]
VARIANTS = [
    Case(16, 8192, adv="B"),
    Case(128, 8192, adv="B"),
    Case(64, 2048, mask="empty-rows"),
    Case(16, 4097),  # odd T
    Case(32, 1024, kind="gspo", adv="B"),
    Case(16, 8192, kind="gspo", adv="B"),
    Case(128, 8192, kind="gspo", adv="B"),
    Case(16, 8192, kind="seq", adv="B"),
    Case(16, 8192, kind="seq"),
]
# the other loss families at 1M tokens, with advantages (B,): they are the critic-free (GRPO-style) losses, whose
# advantage is one number per sequence (the value loss: returns (B, T))
FAMILY_CASES = [Case(128, 8192, kind=kind, adv=KINDS[kind].get("adv", "B")) for kind in FAMILIES]


def all_cases(quick, device):
    if not quick:
        return [Case(B, T, series=True) for B, T in SERIES_SHAPES] + VARIANTS + FAMILY_CASES
    # the shapes of the targets (CPU: 8K and 1M tokens; GPU: 32K and 4M tokens), a middle one, and one variant of
    # everything else: GSPO, advantages (B,), odd T, empty rows (a torch.compile costs ~4 s a case on 2 cores);
    # on the CPU also the other families at 1M tokens (their targets)
    shapes = [(8, 1024), (64, 2048), (128, 8192)] if device == "cpu" else [(8, 1024), (32, 1024), (128, 8192),
                                                                             (512, 8192)]
    return ([Case(B, T, series=True) for B, T in shapes] + [Case(16, 4097, kind="gspo", adv="B", mask="empty-rows")]
            + (FAMILY_CASES if device == "cpu" else []))


@dataclass
class Inputs:
    lp: torch.Tensor  # leaf, requires grad
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor  # bool
    grad_out: torch.Tensor  # d(loss): 1, made once so that the backward launches nothing of the harness's

    def tensors(self):
        return (self.lp, self.old, self.adv, self.mask)


def make_inputs(case: Case, device, seed):
    """log-probs off the old ones by N(0, 0.15), 1% of tokens far off-policy (N(0, 1.5): the dual clip acts); the
    kind's `spread` (near, far) where it sets one."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T = case.B, case.T
    near_sd, far_sd = KINDS[case.kind].get("spread", (0.15, 1.5))
    old = -4.0 * torch.rand(B, T, generator=g)
    far = torch.rand(B, T, generator=g) < 0.01
    lp = old + torch.where(far, far_sd, near_sd) * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g) if case.adv == "BT" else torch.randn(B, generator=g)
    if case.mask == "0.9":
        mask = torch.rand(B, T, generator=g) < 0.9
    else:  # "empty-rows"
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        lengths[3::4] = 0
        mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = lp.to(device).requires_grad_(True)
    return Inputs(lp, old.to(device), adv.to(device), mask.to(device), torch.ones((), device=device))


def min_bytes(inp: Inputs, backward: bool):
    """The least the op must move: every input read once in its dtype, and (backward) the gradient written once."""
    n = sum(t.numel() * t.element_size() for t in inp.tensors())
    if backward:
        n += inp.lp.numel() * inp.lp.element_size()
    return n


def make_call(fn, sets: List[Inputs], backward: bool):
    """A no-argument callable running one contender on the next input set (rotating through `sets`)."""
    state = {"i": 0}

    def call():
        s = sets[state["i"]]
        state["i"] = (state["i"] + 1) % len(sets)
        if backward:
            out = fn(s.lp, s.old, s.adv, s.mask)
            return out, torch.autograd.grad(out[0], s.lp, s.grad_out)
        with torch.no_grad():
            return fn(s.lp, s.old, s.adv, s.mask)

    return call


# ---------------------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ---------------------------------------------------------------------------------------------------------------

FRACTIONS = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_active", "dual_clipfrac")


def per_token_advantages(inp):
    """The inputs' advantages as a float64 (B, T) tensor (a (B,) one broadcast along each row)."""
    adv = inp.adv.double()
    return (adv if adv.dim() == 2 else adv[:, None]).expand(inp.lp.shape)


def boundary_tokens(case, inp):
    """Valid tokens that float32 may put on the other side of a threshold than float64, which flips their clip
    counters and, where the threshold is a discontinuity of the loss, their gradient (with a sequence ratio, the
    whole row's). They are left out of the gradient comparison and allowed for in the counters. The thresholds
    are the family's: the ratio's clip bounds (and the dual clip) for vanilla and cispo (within 2e-6 relative);
    for dppo_* the divergence thresholds (tv: p - p_old within 2e-6; kl: the binary KL within 2e-6 (1 + |(1 - p_old
    + 1e-8) / (1 - p + 1e-8)|), float32's error of its log term) and the truncation C (the counter only); for
    geo_mean the log-ratio's clip range; for the value loss the value's clip range and a tie of the two squared
    errors (its clipfrac_active). sapo, gpg, dro and vespo have none."""
    opts = KINDS[case.kind]["options"]
    loss_type = opts.get("loss_type", "vanilla")
    lp, old, m = inp.lp.detach().double(), inp.old.double(), inp.mask
    d = lp - old
    K = opts.get("log_ratio_clamp")
    K = math.inf if K is None else K
    if opts.get("importance_sampling", "token") == "token":
        r = torch.exp(d.clamp(-K, K))
    else:
        dbar = torch.where(m, d, 0).sum(-1) / m.sum(-1).clamp(min=1)
        r = torch.exp(dbar.clamp(-K, K))[:, None].expand_as(d)
    near = torch.zeros_like(m)
    if loss_type in ("vanilla", "cispo"):
        bounds = [1 - opts["clip_low"], 1 + opts["clip_high"]] + ([opts["dual_clip"]] if "dual_clip" in opts else [])
        for b in bounds:
            near |= (r - b).abs() <= 2e-6 * b
    elif loss_type in ("dppo_tv", "dppo_kl"):
        p, p_old = torch.exp(lp), torch.exp(old)
        if loss_type == "dppo_tv":
            divergence, bounds, tol = p - p_old, [opts["clip_high"], -opts["clip_low"]], 2e-6
        else:
            num, den = 1 - p_old + 1e-8, 1 - p + 1e-8
            divergence = p_old * (old - lp) + (1 - p_old) * torch.log(num / den)
            bounds, tol = [opts["clip_low"], opts["clip_high"]], 2e-6 * (1 + (num / den).abs())
        for b in bounds:
            near |= (divergence - b).abs() <= tol  # NaN (p > 1 in kl): False, as on both sides
        if opts.get("ratio_cap") is not None:
            near |= (r - opts["ratio_cap"]).abs() <= 2e-6 * opts["ratio_cap"]
    elif loss_type == "geo_mean":  # float32's lp - old within an ulp or two of the clip range's ends
        for b in (opts["clip_high"], -opts["clip_low"]):
            near |= (d - b).abs() <= 2e-6 * (1 + old.abs())
    elif loss_type == "value":  # v at the clip range's ends, or the two squared errors within float32's rounding
        R = per_token_advantages(inp)
        lo, hi = old - opts["clip_low"], old + opts["clip_high"]
        for b in (lo, hi):
            near |= (lp - b).abs() <= 2e-6 * (1 + b.abs())
        err, clipped_err = (lp - R) ** 2, (torch.minimum(torch.maximum(lp, lo), hi) - R) ** 2
        near |= (err - clipped_err).abs() <= 1e-5 * (1 + err + clipped_err)
    return near & m


def grad_rtol(case, inp):
    """The gradient's relative tolerance per token: 1e-4, and for sapo 4 eps32 / (1 - gate) more, where its gate
    sigmoid(tau (r - 1)) saturates: float32 holds 1 - gate (in the derivative 4 gate (1 - gate)) only to ~eps32
    absolute, so a token whose gate is within 1e-6 of 1 has its gradient right to ~10% at best, and
    none at all (0) once the gate rounds to 1 (every contender alike, eager's torch.sigmoid included)."""
    opts = KINDS[case.kind]["options"]
    if opts.get("loss_type") != "sapo":
        return 1e-4
    d = (inp.lp.detach().double() - inp.old.double())
    K = opts.get("log_ratio_clamp")
    r = torch.exp(d if K is None else d.clamp(-K, K))
    tau = torch.where(per_token_advantages(inp) > 0, opts["tau_pos"], opts["tau_neg"]).double()
    return 1e-4 + 4 * 2.0 ** -23 / torch.sigmoid(-tau * (r - 1))  # 1 - gate, in float64


def reference_result(case, inp):
    lp = inp.lp.detach().double().requires_grad_(True)
    adv = inp.adv.double()
    out = policy_loss_reference(lp, inp.old.double(), adv, inp.mask, **KINDS[case.kind]["options"])
    (grad,) = torch.autograd.grad(out.loss, lp)
    n = max(int(inp.mask.sum()), 1)
    # the size of one token's loss, for an absolute tolerance on a loss that may sum to ~0
    scale = float(per_token_advantages(inp).abs()[inp.mask].sum()) / n
    return dict(loss=float(out.loss.detach()), metrics={k: float(v) for k, v in out.metrics.items()},
                counts=out.counts.tolist(), grad=grad, grad_rtol=grad_rtol(case, inp), scale=scale, n=n)


def as_float(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)  # verl's are floats already


def compare_outputs(out, ref, n_near, errs, prefix=""):
    """Problems with a contender's (loss, metrics[, counts]) against the reference."""
    problems = []
    loss = as_float(out[0])
    errs[prefix + "loss_abs_err"] = abs(loss - ref["loss"])
    if not abs(loss - ref["loss"]) <= 1e-4 * abs(ref["loss"]) + 1e-5 * ref["scale"]:  # also catches NaN
        problems.append(prefix + "loss")
    for k, v in out[1].items():
        v, r = as_float(v), ref["metrics"][k]
        if k in FRACTIONS:
            tol = 1e-5 * abs(r) + 1e-6 + n_near / ref["n"]
        elif k in ("ratio_min", "ratio_max"):
            tol = 1e-6 * abs(r)
        else:  # approx_kl, ratio_mean
            tol = 1e-4 * abs(r) + 1e-6
        errs[f"{prefix}{k}_abs_err"] = abs(v - r)
        if not abs(v - r) <= tol:
            problems.append(prefix + k)
    if len(out) > 2:  # ppo_ext's counters: exact, but for the boundary tokens
        counts = out[2].tolist()
        errs[prefix + "counts"] = counts
        for i, (c, r) in enumerate(zip(counts, ref["counts"])):
            if abs(c - r) > (n_near if i >= 2 else 0):
                problems.append(f"{prefix}counts[{ppo_ext.COUNT_NAMES[i]}]")
    return problems


def check_contender(fn, inp, ref, near):
    """Compare one contender's loss, metrics, counters and gradient with the reference, with autograd, then
    its loss, metrics and counters without (a compiled function has another graph for that)."""
    errs = {}
    n_near = int(near.sum())
    out = fn(*inp.tensors())
    (grad,) = torch.autograd.grad(out[0], inp.lp)
    problems = compare_outputs(out, ref, n_near, errs)

    diff = (grad.double() - ref["grad"]).abs()
    gmax = float(ref["grad"].abs().max()) if grad.numel() else 0.0
    errs["grad_max_abs_err"] = float(diff[~near].max()) if bool((~near).any()) else 0.0
    errs["grad_max_abs"] = gmax
    rtol = ref["grad_rtol"]
    if isinstance(rtol, torch.Tensor):  # the tokens whose tolerance is widened beyond 2x (sapo's saturated gates)
        errs["grad_ill_conditioned_tokens"] = int(((rtol > 2e-4) & inp.mask).sum())
    if not bool((diff <= rtol * ref["grad"].abs() + 1e-6 * gmax)[~near].all()):  # also catches NaN
        problems.append("grad")

    with torch.no_grad():
        problems += compare_outputs(fn(*inp.tensors()), ref, n_near, errs, prefix="no_grad:")
    return dict(ok=not problems, problems=problems, boundary_tokens=n_near, **errs)


# ---------------------------------------------------------------------------------------------------------------
# Running the cases of one device
# ---------------------------------------------------------------------------------------------------------------

STEPS_PER_CASE = 4  # checked, timed fwd+bwd, timed fwd, memory and launches


def run_case(case, seed, device, threads, budget, rounds, flush, load, res, progress):
    fns = make_contenders(case.kind)
    first = make_inputs(case, device, seed)
    # enough input sets to rotate through that the last-level cache (CPU: >= 64 MiB) cannot hold them all
    n_sets = max(2, min(8, math.ceil((64 << 20) / min_bytes(first, True))))
    sets = [first] + [make_inputs(case, device, seed + k) for k in range(1, n_sets)]
    res["input_sets"] = n_sets
    res["valid_tokens"] = int(first.mask.sum())

    # 1. correctness (this also compiles the compiled contender: forward+backward, and forward alone)
    ref = reference_result(case, first)
    near = boundary_tokens(case, first)
    res["reference"] = dict(loss=ref["loss"], metrics=ref["metrics"], counts=ref["counts"])
    check = {}
    for name, fn in fns.items():
        t0 = time.time()
        try:
            check[name] = check_contender(fn, first, ref, near)
        except Exception as exc:  # a contender that fails is reported, not fatal
            check[name] = dict(ok=False, problems=[f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"])
        check[name]["first_call_s"] = time.time() - t0
    res["check"] = check
    progress.step(f"{case.name}: checked")
    runnable = [n for n in fns if not any(p.startswith("error") for p in check[n]["problems"])]

    # 2. timing, forward+backward then forward alone
    res["timing"] = {}
    for pas in PASSES:
        backward = pas == "fwd+bwd"
        calls = {n: make_call(fns[n], sets, backward) for n in runnable}
        samples = harness.warm_up_and_time(calls, device, threads, budget, rounds, flush, load)
        nbytes = min_bytes(first, backward)
        row = {}
        for n, xs in samples.items():
            med = harness.quantile(xs, 0.5)
            row[n] = dict(median_s=med, p25_s=harness.quantile(xs, 0.25), p75_s=harness.quantile(xs, 0.75),
                          min_s=min(xs), n_samples=len(xs), min_bytes=nbytes, GBps=nbytes / med / 1e9,
                          copy_bw_fraction=nbytes / med / res["copy_bandwidth"], ns_per_token=med / case.tokens * 1e9)
        harness.add_speedups(row, ("eager", "compiled"))
        res["timing"][pas] = row
        progress.step(f"{case.name}: timed {pas}")

    # 3. memory (forward+backward), ops or kernels and host synchronisations (forward+backward, and forward)
    resources = {}
    for n in runnable:
        r = dict(saved_bytes=harness.saved_bytes(fns[n], first.tensors(), device),
                 peak_extra_bytes=harness.peak_extra_bytes(make_call(fns[n], sets[:1], True), device))
        r["saved_bytes_per_token"] = r["saved_bytes"] / case.tokens
        r["peak_extra_bytes_per_token"] = r["peak_extra_bytes"] / case.tokens
        r.update(harness.count_launches(make_call(fns[n], sets[:1], True), device))
        r.update({f"fwd_{k}": v for k, v in harness.count_launches(make_call(fns[n], sets[:1], False), device).items()})
        resources[n] = r
    res["resources"] = resources
    progress.step(f"{case.name}: memory and launches")


def run_device(device, args, cases):
    threads = args.threads
    budget = 0.2 if args.quick else 0.8  # seconds of timing per contender and pass
    rounds = 3 if args.quick else 4
    flush = harness.l2_flush_buffer(device)

    meta = harness.environment(device, threads, args.quick)
    where = f"CUDA {meta['cuda']}" if device == "cuda" else f"{threads} threads"
    print(f"== {device}: {meta['device_name']}, torch {meta['torch']}, {where}", flush=True)
    bw = harness.copy_bandwidth(device, threads, flush)
    meta["copy_bandwidth_GBps"] = bw / 1e9
    print(f"   measured copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)

    results = []
    load = harness.OtherLoad()
    progress = harness.Progress(len(cases) * STEPS_PER_CASE, device)
    for ci, case in enumerate(cases):
        res = dict(case=case.name, B=case.B, T=case.T, tokens=case.tokens, kind=case.kind, adv=case.adv,
                   mask=case.mask, series=case.series, ppo_ext_options=KINDS[case.kind]["options"], copy_bandwidth=bw)
        results.append(res)
        try:
            run_case(case, 1000 * ci, device, threads, budget, rounds, flush, load, res, progress)
        except harness.OUT_OF_MEMORY as exc:  # the bandwidth-bound shapes, as far as memory allows
            res["skipped"] = harness.out_of_memory(exc)
            res.pop("timing", None)
            res.pop("resources", None)
            if device == "cuda":
                torch.cuda.empty_cache()
        while progress.done < STEPS_PER_CASE * (ci + 1):
            progress.step(f"{case.name}: skipped")
    progress.close()
    harness.record_other_load(meta, load)
    result = dict(meta=meta, cases=results)
    result["targets"] = targets(result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Targets, tables, plot, files
# ---------------------------------------------------------------------------------------------------------------


def find_case(result, B, T, kind="ppo", adv="BT"):
    """The case of a shape and kind with mask density 0.9 (by default the plain one: token ratio, advantages (B, T))."""
    for res in result["cases"]:
        if (res["B"], res["T"], res["kind"], res["adv"], res["mask"]) == (B, T, kind, adv, "0.9") and "timing" in res:
            return res
    return None


def targets(result):
    """The issue's targets, measured: each one with what was measured and met (True / False / None: not measured)."""
    out = []

    def add(target, value, goal, fmt="{:.2f}x", res=None):
        if res is not None and not res["check"]["ppo_ext"]["ok"]:  # a fast wrong answer meets nothing
            measured = ("" if value is None else fmt.format(value) + ", but ") + "ppo_ext does not match the reference"
            out.append(dict(target=target, measured=measured, met=False))
        elif value is None:
            out.append(dict(target=target, measured=None, met=None))
        else:
            out.append(dict(target=target, measured=fmt.format(value), met=value >= goal))

    def add_speedup(target, B, T, base, goal, kind="ppo", adv="BT"):
        res = find_case(result, B, T, kind, adv)
        value = res["timing"]["fwd+bwd"].get("ppo_ext", {}).get(f"speedup_vs_{base}") if res else None
        add(target, value, goal, res=res)

    with_resources = [r["resources"] for r in result["cases"] if "ppo_ext" in r.get("resources", {})]
    if result["meta"]["device"] == "cpu":
        add_speedup("fwd+bwd >= 10x eager at 1M tokens (128x8192)", 128, 8192, "eager", 10)
        add_speedup("fwd+bwd >= 1.5x torch.compile at 1M tokens (128x8192)", 128, 8192, "compiled", 1.5)
        add_speedup("fwd+bwd >= 3x eager at 8K tokens (8x1024)", 8, 1024, "eager", 3)
        for case in FAMILY_CASES:  # the same bar at 1M tokens for the other families (advantages (B,))
            label, where = KINDS[case.kind]["label"], f"{case.B}x{case.T}, {'A(B,)' if case.adv == 'B' else 'A(B,T)'}"
            add_speedup(f"{label}: fwd+bwd >= 10x eager at 1M tokens ({where})", case.B, case.T, "eager", 10,
                        case.kind, case.adv)
            add_speedup(f"{label}: fwd+bwd >= 1.5x torch.compile at 1M tokens ({where})", case.B, case.T,
                        "compiled", 1.5, case.kind, case.adv)
    else:
        add_speedup("fwd+bwd >= 15x eager at 32K tokens (32x1024)", 32, 1024, "eager", 15)
        add_speedup("fwd+bwd >= 2x torch.compile at 32K tokens (32x1024)", 32, 1024, "compiled", 2)
        big = find_case(result, 512, 8192)
        frac = big["timing"]["fwd+bwd"].get("ppo_ext", {}).get("copy_bw_fraction") if big else None
        add("fwd+bwd >= 80% of the measured copy bandwidth at 4M tokens (512x8192)",
            None if frac is None else 100 * frac, 80, "{:.0f}%", res=big)
        launches = max((r["ppo_ext"]["kernels"] for r in with_resources), default=None)
        out.append(dict(target="<= 2 kernel launches per fwd+bwd (memsets included)",
                        measured=None if launches is None else f"at most {launches}",
                        met=None if launches is None else launches <= 2))
        syncs = max((r["ppo_ext"]["syncs"] for r in with_resources), default=None)
        out.append(dict(target="no host synchronisation (fwd+bwd)",
                        measured=None if syncs is None else f"at most {syncs}",
                        met=None if syncs is None else syncs == 0))
    saved = max((r["ppo_ext"]["saved_bytes_per_token"] for r in with_resources), default=None)
    eager = max((r["eager"]["saved_bytes_per_token"] for r in with_resources if "eager" in r), default=float("nan"))
    out.append(dict(target="saved for backward <= 4 B/token (eager: tens)",
                    measured=None if saved is None else f"at most {saved:.2f} B/token (eager: up to {eager:.1f})",
                    met=None if saved is None else saved <= 4.0 + 0.01))  # + the 0-dim grad scale
    checks = [c["ok"] for r in result["cases"] for c in r.get("check", {}).values()]
    out.append(dict(target="every contender matches the float64 reference", measured=f"{sum(checks)}/{len(checks)} ok",
                    met=all(checks) if checks else None))
    return out


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def cell_time(res, pas, name):
    t = res["timing"][pas].get(name)
    if t is None:
        return "error"
    spread = (t["p75_s"] - t["p25_s"]) / 2 / t["median_s"] * 100
    return f"{fmt_time(t['median_s'])} ±{spread:.0f}%" + ("" if res["check"][name]["ok"] else " ✗")


def check_summary(res):
    """'ok', or the contenders that do not match the reference with their first problems (all of them in the JSON)."""
    bad = [f"{n}: {', '.join(c['problems'][:3])}{', ...' if len(c['problems']) > 3 else ''}"
           for n, c in res["check"].items() if not c["ok"]]
    return "ok" if not bad else "MISMATCH " + "; ".join(bad)


def timing_table(result):
    rows = []
    for res in result["cases"]:
        if "skipped" in res:
            rows.append([res["case"], f"{res['tokens']:,}", "-"] + ["-"] * (len(CONTENDERS) + 4) + [res["skipped"]])
            continue
        for pas in PASSES:
            f = res["timing"][pas].get("ppo_ext", {})
            rows.append([
                res["case"], f"{res['tokens']:,}", pas, *[cell_time(res, pas, n) for n in CONTENDERS],
                fmt_ratio(f.get("speedup_vs_eager")), fmt_ratio(f.get("speedup_vs_compiled")),
                f"{f['GBps']:.1f}" if f else "-",
                f"{100 * f['copy_bw_fraction']:.0f}%" if f else "-",
                check_summary(res) if pas == PASSES[0] else "",
            ])
    headers = ["case", "tokens", "pass", *CONTENDERS, "ppo_ext vs eager", "vs compiled", "ppo_ext GB/s",
               "% copy bw", "check"]
    return headers, rows


def resource_table(result):
    cpu = result["meta"]["device"] == "cpu"
    mem = CONTENDERS
    rows = []
    for res in result["cases"]:
        r = res.get("resources")
        if not r:
            continue

        def cell(n, fmt):
            return fmt(r[n]) if n in r else "-"

        row = [res["case"]]
        row += [cell(n, lambda x: f"{x['saved_bytes_per_token']:.1f}") for n in mem]
        row += [cell(n, lambda x: f"{x['peak_extra_bytes_per_token']:.1f}") for n in mem]
        if cpu:
            row += [cell(n, lambda x: f"{x['ops']} / {x['fwd_ops']}") if n != "compiled" else "-" for n in CONTENDERS]
        else:
            row += [cell(n, lambda x: f"{x['kernels']} / {x['fwd_kernels']}") for n in CONTENDERS]
            row += [cell(n, lambda x: f"{x['syncs']} / {x['fwd_syncs']}") for n in CONTENDERS]
        rows.append(row)
    headers = (["case (fwd+bwd)"] + [f"saved B/tok {n}" for n in mem] + [f"peak extra B/tok {n}" for n in mem]
               + ([f"ops {n}" for n in CONTENDERS] if cpu else
                  [f"kernels {n}" for n in CONTENDERS] + [f"syncs {n}" for n in CONTENDERS]))
    return headers, rows


def render(result, tablefmt):
    from tabulate import tabulate

    parts = []
    for headers, rows in (timing_table(result), resource_table(result)):
        parts.append(tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True))
    parts.append("Targets\n\n" + harness.targets_table(result["targets"], tablefmt))
    return "\n\n".join(parts)


def legend(meta):
    launches = ("ops fwd+bwd / fwd: top-level dispatcher ops per call (compiled: inductor's fused C++ loops are "
                "not ops, not counted)" if meta["device"] == "cpu" else
                "kernels and syncs fwd+bwd / fwd: CUDA kernels launched per call, memsets included (torch.profiler); "
                "host synchronisations per call (blocking CUDA runtime calls, sync debug mode)")
    return ("Times: median per call ± half the interquartile range; ✗: this contender does not match the float64 "
            "reference (see 'check'). Speed-ups: median over median, fwd+bwd against fwd+bwd. GB/s: minimum bytes "
            "(inputs read once, gradient written once) / median time.\n"
            f"B/tok: bytes per token, saved for backward beyond the inputs, and peak allocated during one fwd+bwd "
            f"(gradient included). {launches}.")


def plot(result, path):
    series = sorted((r for r in result["cases"] if r["series"] and "timing" in r), key=lambda r: r["tokens"])
    meta = result["meta"]
    where = f"{meta['threads']} threads" if meta["device"] == "cpu" else f"CUDA {meta['cuda']}"
    styles = {"eager": ("tab:blue", "-"), "compiled": ("tab:orange", "-"), "ppo_ext": ("tab:green", "-")}
    title = (f"PPO policy loss (token ratio, dual clip, A (B,T), mask 0.9): {meta['device_name']}, {where}, "
             f"torch {meta['torch']}")
    return harness.plot_time_against_tokens(series, PASSES, styles, title, path)


def write_markdown(result, path, png):
    meta = result["meta"]
    lines = [f"# ppo_ext policy loss benchmark: {meta['device']} ({meta['mode']} run)", "", harness.setting(meta), "",
             f"Command: `python benchmarks/bench_policy_loss.py {' '.join(meta['argv'])}`. "
             "Method and columns: [benchmarks/README.md](../README.md).", "",
             legend(meta).replace("\n", "\n\n"), "", render(result, "github"), ""]
    if png:
        lines += [f"![time against tokens]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = harness.parser(__doc__.split("\n\n")[0], "10 cases (5 on a GPU), short timings: about a minute on 2 CPU cores",
                       "<device>-<date>[-quick].{json,md,png}")
    p.add_argument("--cases", help="only the cases whose name contains this, e.g. '128x8192'")
    args = p.parse_args(argv)
    devices = harness.devices(p, args)
    harness.configure_torch(args.threads)
    # verl's functions end with .item() on their metrics: captured into the compiled graph (one graph, the floats
    # read at its end) instead of a graph break after which dynamo specialises on each float's value and
    # recompiles for every new batch
    torch._dynamo.config.capture_scalar_outputs = True

    t0 = time.time()
    mismatch = False
    for device in devices:
        cases = [c for c in all_cases(args.quick, device) if not args.cases or args.cases in c.name]
        if not cases:
            p.error(f"no case of the {'quick' if args.quick else 'full'} run matches --cases {args.cases!r}")
        result = run_device(device, args, cases)
        stem = harness.result_stem(args.out_dir, "", device, args.quick)
        png = plot(result, stem + ".png")
        harness.write_json(result, stem + ".json")
        write_markdown(result, stem + ".md", png)
        print()
        print(harness.setting(result["meta"]))
        print(legend(result["meta"]))
        print()
        print(render(result, "simple_grid" if sys.stdout.isatty() else "github"))
        print(f"\nwrote {stem}.json, {stem}.md" + (f", {png}" if png else ""))
        mismatch |= any(not c["ok"] for r in result["cases"] for c in r.get("check", {}).values())
    return harness.exit_status(mismatch, t0)


if __name__ == "__main__":
    sys.exit(main())
