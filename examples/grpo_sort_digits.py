#!/usr/bin/env python
"""A small, self-contained GRPO training run on the CPU, its policy loss computed by ppo_ext.

A tiny causal transformer (built here, nothing is downloaded) learns to answer a prompt of 3 to 5
random digits with the same digits in sorted order. The reward is verifiable: the fraction of the
answer's positions that hold the right digit. Each step samples a group of answers per prompt, keeps
their log-probs as the old policy's, computes group-relative advantages (GRPO), and runs several PPO
epochs over minibatches with ``ppo_ext.policy_loss`` (clip-higher, token-mean, masked: the answer is
as long as its prompt, so the shorter rows are padded). ``--loss eager`` runs the same training with
the eager float-for-float reference of the loss (``ppo_ext.reference``): same seed, same samples,
the same numbers within float rounding for the first steps; ``--loss both`` runs the two and plots
them together. ``--loss hidden`` computes the loss from the transformer's last hidden states and its
LM head with ``ppo_ext.policy_loss_from_hidden`` (no logits built): the same training again.

    python examples/grpo_sort_digits.py                   # 200 steps, ~20-30 s on 2 CPU cores
    python examples/grpo_sort_digits.py --loss both       # ppo_ext and the eager reference, one plot
    python examples/grpo_sort_digits.py --steps 20 --no-plot

Prints a progress bar and the reward curve, and saves a PNG of reward and clip fraction against the
step (matplotlib, if installed) and the history as JSON, in --out-dir (default examples/output/).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # a checkout where ppo_ext was built in place

import ppo_ext  # noqa: E402
from ppo_ext.reference import policy_loss_reference  # noqa: E402

DIGITS, SEP, BOS, PAD = 10, 10, 11, 12
VOCAB = 13


@dataclass
class Config:
    steps: int = 200
    seed: int = 0
    loss: str = "ppo_ext"  # "ppo_ext" | "eager" | "hidden"
    min_digits: int = 3
    max_digits: int = 5
    prompts_per_step: int = 32
    group_size: int = 8
    ppo_epochs: int = 2
    minibatches: int = 2
    lr: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg_mode: str = "token-mean"
    importance_sampling: str = "token"
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    threads: int = 1


@dataclass
class History:
    reward: List[float] = field(default_factory=list)
    clipfrac: List[float] = field(default_factory=list)
    approx_kl: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    seconds: float = 0.0


class TinyCausalLM(nn.Module):
    """Token and position embeddings, a few pre-norm causal transformer layers, a linear head."""

    def __init__(self, max_len: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, DIGITS)  # the answer is made of digits only

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, L, d_model), the LM head's input."""
        L = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(L, device=tokens.device))
        causal = torch.triu(torch.full((L, L), float("-inf"), device=tokens.device), diagonal=1)
        return self.norm(self.body(x, mask=causal, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))  # (B, L, DIGITS) logits


def make_prompts(cfg: Config, g: torch.Generator):
    """Left-padded prompts [PAD.. BOS d1..dK SEP], their lengths K, and the sorted digits (the answers)."""
    n, K = cfg.prompts_per_step, cfg.max_digits
    lengths = torch.randint(cfg.min_digits, cfg.max_digits + 1, (n,), generator=g)
    digits = torch.randint(0, DIGITS, (n, K), generator=g)
    pos = torch.arange(K)
    valid = pos[None, :] >= (K - lengths[:, None])  # the last K_i of the K slots hold the digits
    prompts = torch.full((n, K + 2), PAD, dtype=torch.long)
    prompts[:, 1:K + 1] = torch.where(valid, digits, PAD)
    prompts[torch.arange(n), K - lengths] = BOS
    prompts[:, K + 1] = SEP
    # sorted digits, left-aligned: the answer's first K_i positions count
    keys = torch.where(valid, digits, DIGITS)  # padding sorts last
    answers = keys.sort(dim=1).values
    return prompts, lengths, answers


def response_log_probs(model: nn.Module, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log pi(response_t | prompt, response_<t), (B, T)."""
    tokens = torch.cat([prompts, responses], dim=1)
    logits = model(tokens[:, :-1])[:, prompts.shape[1] - 1:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    tokens = prompts
    for _ in range(length):
        probs = torch.softmax(model(tokens)[:, -1].float(), dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], dim=1)
    return tokens[:, prompts.shape[1]:]


def policy_loss(cfg: Config, model: nn.Module, prompts, responses, old_log_probs, advantages, mask):
    """The PPO loss of the responses under the model (its output's loss, metrics)."""
    options = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_agg_mode=cfg.loss_agg_mode,
                   importance_sampling=cfg.importance_sampling)
    if cfg.loss == "hidden":  # from the hidden states at the positions that predict the responses, and the head
        hidden = model.hidden(torch.cat([prompts, responses], dim=1)[:, :-1])[:, prompts.shape[1] - 1:]
        return ppo_ext.policy_loss_from_hidden(hidden, model.head.weight, responses, old_log_probs, advantages,
                                               mask, bias=model.head.bias, **options)
    log_probs = response_log_probs(model, prompts, responses)
    fn = ppo_ext.policy_loss if cfg.loss == "ppo_ext" else policy_loss_reference
    return fn(log_probs, old_log_probs, advantages, mask, **options)


class Progress:
    """A one-line progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.quiet = total, label, quiet
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str):
        if self.quiet:
            return
        done = step + 1
        if not self.tty and done % max(1, self.total // 10) and done != self.total:
            return
        width = 30
        filled = int(width * done / self.total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text} eta {eta:4.0f}s"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and done == self.total:
            print(file=sys.stderr)


def train(cfg: Config, quiet: bool = False) -> History:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    K = cfg.max_digits
    model = TinyCausalLM(max_len=2 * K + 2, d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    hist = History()
    bar = Progress(cfg.steps, f"{cfg.loss:>7}", quiet)
    start = time.monotonic()
    for step in range(cfg.steps):
        prompts, lengths, answers = make_prompts(cfg, g)
        G = cfg.group_size
        prompts, lengths, answers = (x.repeat_interleave(G, dim=0) for x in (prompts, lengths, answers))
        model.eval()
        responses = sample(model, prompts, K, g)
        mask = torch.arange(K)[None, :] < lengths[:, None]  # (B, T): the first K_i answer tokens count
        with torch.no_grad():
            old_log_probs = response_log_probs(model, prompts, responses)
        reward = ((responses == answers) & mask).sum(1) / lengths  # verifiable: fraction of right positions
        grouped = reward.view(-1, G)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)

        model.train()
        B = prompts.shape[0]
        stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=g)
            for idx in order.chunk(cfg.minibatches):
                out = policy_loss(cfg, model, prompts[idx], responses[idx], old_log_probs[idx], advantages[idx],
                                  mask[idx])
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                stats.append(torch.stack([out.loss.detach().float(), out.metrics["clipfrac"],
                                          out.metrics["approx_kl"]]))
        loss, clipfrac, kl = torch.stack(stats).mean(0).tolist()  # one host sync per step
        hist.reward.append(reward.mean().item())
        hist.clipfrac.append(clipfrac)
        hist.approx_kl.append(kl)
        hist.loss.append(loss)
        bar.update(step, f"reward {hist.reward[-1]:.3f} clipfrac {clipfrac:.3f}")
    hist.seconds = time.monotonic() - start
    return hist


def moving_average(xs: List[float], k: int = 10) -> List[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


def print_curve(name: str, hist: History, points: int = 10):
    smooth = moving_average(hist.reward)
    n = len(smooth)
    ticks = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)}) if n else []
    bars = " ▁▂▃▄▅▆▇█"
    spark = "".join(bars[min(8, int(v * 8.999))] for v in smooth)
    print(f"\n{name}: reward (moving average over 10 steps), {hist.seconds:.1f} s")
    print("  step  " + " ".join(f"{t:>6d}" for t in ticks))
    print("  reward" + " ".join(f"{smooth[t]:6.3f}" for t in ticks))
    print("  clip  " + " ".join(f"{hist.clipfrac[t]:6.3f}" for t in ticks))
    if len(spark) > 100:
        spark = "".join(spark[round(i * (len(spark) - 1) / 99)] for i in range(100))
    print("  " + spark)


def compare(a: History, b: History, first: int = 5) -> Dict[str, float]:
    """The largest differences between two runs over their first steps."""
    k = min(first, len(a.reward), len(b.reward))
    return {key: max((abs(x - y) for x, y in zip(getattr(a, key)[:k], getattr(b, key)[:k])), default=0.0)
            for key in ("reward", "loss", "clipfrac", "approx_kl")}


def plot(histories: Dict[str, History], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for (name, h), style, color in zip(histories.items(), ("-", "--"), ("tab:blue", "tab:orange")):
        steps = range(len(h.reward))
        ax1.plot(steps, h.reward, style, color=color, alpha=0.3, label=f"{name} (per step)")
        ax1.plot(steps, moving_average(h.reward), style, color=color, label=f"{name} (moving average of 10)")
        ax2.plot(steps, h.clipfrac, style, color=color, label=name)
    ax1.set_ylabel("reward (fraction of digits in place)")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("clip fraction")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.suptitle("GRPO on 'sort the digits', policy loss by ppo_ext")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--loss", choices=["ppo_ext", "eager", "hidden", "both"], default="ppo_ext",
                   help="both: ppo_ext and eager")
    p.add_argument("--loss-agg-mode", default=Config.loss_agg_mode)
    p.add_argument("--importance-sampling", default=Config.importance_sampling, choices=["token", "seq", "seq-token"])
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    losses = ["ppo_ext", "eager"] if args.loss == "both" else [args.loss]
    histories = {}
    for loss in losses:
        cfg = Config(steps=args.steps, seed=args.seed, loss=loss, loss_agg_mode=args.loss_agg_mode,
                     importance_sampling=args.importance_sampling, threads=args.threads)
        histories[loss] = train(cfg, quiet=args.quiet)
        print_curve(loss, histories[loss])
    if len(histories) == 2:
        diff = compare(histories["ppo_ext"], histories["eager"])
        print("\nppo_ext vs eager reference, largest difference over the first 5 steps: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"grpo_sort_digits_{args.loss}")
    with open(stem + ".json", "w") as f:
        json.dump({"config": asdict(Config(steps=args.steps, seed=args.seed, loss=args.loss)),
                   "history": {k: asdict(v) for k, v in histories.items()}}, f)
    print(f"\nhistory: {stem}.json")
    if not args.no_plot and plot(histories, stem + ".png"):
        print(f"plot:    {stem}.png")
    return histories


if __name__ == "__main__":
    main()
