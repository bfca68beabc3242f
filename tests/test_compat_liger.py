"""ppo_ext.policy_loss_from_hidden against Liger-Kernel 0.8.5's own LigerFusedLinearGRPOLoss (the fused LM head and
GRPO loss that TRL's GRPOTrainer runs with use_liger_kernel=True): a user who moves from Liger to ppo_ext gets the
same loss and gradients with the options the TRL adapter (ppo_ext/compat/trl.py) maps TRL's, and so Liger's, onto:
the test takes them from the adapter's own mapping.

Liger's module comes from the installed package (tests/frameworks.liger_grpo; its chunked losses are torch code, no
Triton, so they run on the CPU), built with compiled=False (the same math without torch.compile, which would compile
it again for every configuration). Liger computes its log-probs in float32 whatever the inputs' dtype, so float64
inputs are compared to float32's precision too. Compared, for float64 and float32 inputs: the loss, the gradients
w.r.t. hidden and the LM head's weight, Liger's KL metric and its clip ratio (the valid tokens whose clipped term is
the active one: ppo_ext's clipfrac_active; not with delta, where the two count differently). Every loss type Liger
shares with TRL, at the token level and, where Liger allows it, the sequence level (GSPO); luspo at the sequence
level only (TRL's recommended setting: at the token level Liger 0.8.5 does not mask its per-token loss, so padding
counts, unlike TRL's); with and without the KL to a reference (beta, and TRL's bias correction), at a temperature
and with two-sided clipping (delta).
"""

import pytest
import torch

import frameworks
import ppo_ext
from ppo_ext.compat import trl

B, T, H, V = 4, 9, 16, 50
EPS_LOW, EPS_HIGH, CISPO_EPS_HIGH, MAX_LEN = 0.2, 0.28, 1.3, 12
TAU_POS, TAU_NEG = 1.0, 1.05
TOL = dict(rtol=2e-5, atol=2e-6)  # Liger's float32 log-probs

# (loss_type, importance_sampling_level, beta, extra Liger options)
CASES = [
    ("grpo", "token", 0.0, {}),
    ("grpo", "sequence", 0.0, {}),
    ("bnpo", "token", 0.04, {}),
    ("dr_grpo", "token", 0.0, {}),
    ("dapo", "token", 0.04, {"use_bias_correction_kl": True}),
    ("dapo", "sequence", 0.04, {"use_bias_correction_kl": True}),
    ("dapo", "token", 0.0, {"delta": 1.05}),  # ratios above 1.05 capped (some with A > 0 here)
    ("bnpo", "token", 0.0, {"temperature": 0.7}),
    ("cispo", "token", 0.0, {}),
    ("sapo", "token", 0.04, {}),
    ("luspo", "sequence", 0.0, {}),
    ("vespo", "token", 0.0, {}),
]


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1, 5:] = False  # a short row
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        lp = ppo_ext.log_probs_from_hidden(hidden.double(), weight.double(), labels)[0]
    old = (lp + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)  # ratios clip both ways
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    return hidden, weight, labels, mask, adv, old, ref


def _ppo_ext_options(loss_type, level, beta, extra, ref, mask):
    """The TRL adapter's own mapping (ppo_ext/compat/trl.py) of the TRL options Liger shares: Liger's GRPO loss types
    are TRL's (one process, no gradient accumulation, no vLLM correction)."""
    opts = trl._options({
        "loss_type": loss_type, "importance_sampling_level": level, "beta": beta, "epsilon": EPS_LOW,
        "epsilon_high": CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH, "delta": extra.get("delta"),
        "use_bias_correction_kl": extra.get("use_bias_correction_kl", False), "sapo_temperature_pos": TAU_POS,
        "sapo_temperature_neg": TAU_NEG, "max_completion_length": MAX_LEN, "use_vllm": False})
    importance_sampling = "token" if loss_type == "vespo" else trl._LEVELS[level]
    return dict(importance_sampling=importance_sampling, **trl._family(opts), **trl._kl(opts, ref),
                **trl._aggregation(opts, B, mask, None, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join([*map(str, c[:3]), *c[3]]))
def test_policy_loss_from_hidden_matches_liger(case, dtype):
    liger = frameworks.load_or_skip(frameworks.liger_grpo)
    loss_type, level, beta, extra = case
    hidden, weight, labels, mask, adv, old, ref = _inputs(dtype)
    temperature = extra.get("temperature", 1.0)

    module = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=bool(beta), epsilon_low=EPS_LOW,
        epsilon_high=CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH, loss_type=loss_type,
        max_completion_length=MAX_LEN, importance_sampling_level=level, sapo_temperature_pos=TAU_POS,
        sapo_temperature_neg=TAU_NEG, **extra)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected, metrics = module(h, w, labels, mask.to(dtype), adv, ref_per_token_logps=ref if beta else None,
                               old_per_token_logps=old)
    expected.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = ppo_ext.policy_loss_from_hidden(h2, w2, labels, old, adv, mask, temperature=temperature,
                                          **_ppo_ext_options(loss_type, level, beta, extra, ref, mask))
    out.loss.backward()

    def close(actual, wanted, what):
        torch.testing.assert_close(actual.double(), wanted.double(), **TOL, msg=lambda m: f"{what}\n{m}")

    close(out.loss, expected.detach(), "loss")
    close(h2.grad, h.grad, "grad hidden")
    close(w2.grad, w.grad, "grad weight")
    if beta:
        close(out.metrics["kl"], metrics[0], "kl")
    # Liger logs no clipping for sapo and vespo, cispo's upper bound alone, and with delta its bounds on the uncapped
    # ratio (ppo_ext's clipfrac_active: where the clipped term is the larger, L2 > L1 with L1 capped; docs/SPEC.md)
    if loss_type not in ("sapo", "cispo", "vespo") and "delta" not in extra:
        close(out.metrics["clipfrac_active"], metrics[-1], "clip ratio")
