"""ppo_ext.policy_loss_from_logits and the token_log_probs ops against eager float64 log_softmax + gather +
the reference loss: log-probs, entropy, loss, metrics, counts and the gradient w.r.t. the logits; vocabulary
sizes 1 to 151,936, strided rows, temperature, masked rows, bf16/fp16, in-place backward, label errors,
the entropy's gradient and the entropy bonus, opcheck, gradcheck, torch.compile."""

import functools

import pytest
import torch

import ppo_ext
from helpers import (AGG_MODES, CLIP_HIGH, CLIP_LOW, DUAL_CLIP, make_inputs, options, run_with_cpu_capability,
                     same_bits)
from ppo_ext.reference import policy_loss_reference

LP_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5),
          torch.float64: (1e-10, 1e-10)}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float64: 1e-9}


def make_logits(B, T, V, *, seed, dtype=torch.float32, device="cpu", scale=3.0, extra_t=0):
    """Random logits (B, T + extra_t, V) with a few large ones, as a policy's; labels drawn from their softmax
    (and some uniformly) so that log-probs range from ~0 to very negative."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, T + extra_t, V, generator=g, dtype=torch.float64)
    logits += 8 * (torch.rand(B, T + extra_t, V, generator=g, dtype=torch.float64) > 0.999)
    probs = torch.softmax(logits[:, :T].reshape(-1, V), -1)
    labels = torch.multinomial(probs, 1, generator=g).view(B, T)
    uniform = torch.randint(0, V, (B, T), generator=g)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, uniform, labels)
    return logits.to(dtype).to(device), labels.to(device)


def reference_log_probs(logits, labels, temperature=1.0):
    """Eager float64: log_softmax + gather, and the entropy (-inf logits, p = 0, contribute 0: a double where, so
    that neither the value nor the gradient is 0 * -inf)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    finite = logp > -torch.inf
    safe = torch.where(finite, logp, 0)
    entropy = -torch.where(finite, safe.exp() * safe, 0).sum(-1)
    return lp, entropy


def reference_aggregate(x, mask, *, loss_agg_mode="token-mean", num_tokens=None, num_seqs=None,
                        loss_scale_factor=None, **_):
    """x (B, T) aggregated as docs/SPEC.md aggregates the per-token loss (no weights): the reference's gpg loss
    -A lp with A = -1 and lp = x is x itself, through the reference's aggregation."""
    return policy_loss_reference(x, None, -torch.ones(x.shape[0], dtype=x.dtype), mask, loss_type="gpg",
                                 loss_agg_mode=loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                 loss_scale_factor=loss_scale_factor).loss


def loss_inputs(B, T, seed, device, **kw):
    inp = make_inputs(B, T, seed=seed, device=device, **kw)
    return inp.old, inp.adv, inp.mask, inp.weights


def check_from_logits(logits, labels, old, adv, mask, weights, *, temperature=1.0, what="", **kw):
    """policy_loss_from_logits on logits (any layout) against the float64 eager reference, gradient included."""
    dtype = logits.dtype
    x = logits.detach().clone() if logits.is_contiguous() else logits.detach()  # a strided view stays strided
    x.requires_grad_(True)
    out = ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, token_weights=weights, temperature=temperature,
                                          return_entropy=True, **kw)
    out.loss.backward()

    x64 = logits.detach().double().cpu().requires_grad_(True)
    ref_lp, ref_entropy = reference_log_probs(x64, labels.cpu().reshape(logits.shape[:-1]), temperature)
    f = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    entropy_coef = kw.pop("entropy_coef", 0.0)
    cpu_mask = None if mask is None else mask.cpu()
    ref = policy_loss_reference(ref_lp.reshape(labels.shape), f(old), f(adv), cpu_mask, token_weights=f(weights), **kw)
    ref_loss = ref.loss
    if entropy_coef:
        ref_entropy_loss = reference_aggregate(ref_entropy.reshape(labels.shape), cpu_mask, **kw)
        ref_loss = ref_loss - entropy_coef * ref_entropy_loss
        torch.testing.assert_close(out.metrics["entropy_loss"].double().cpu(), ref_entropy_loss.detach(), rtol=5e-5,
                                   atol=1e-5, msg=lambda m: f"{what}: entropy_loss\n{m}")
    ref_loss.backward()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = LP_TOL[dtype]
    assert out.log_probs.dtype == acc and out.log_probs.shape == labels.shape and not out.log_probs.requires_grad
    torch.testing.assert_close(out.log_probs.double().cpu(), ref_lp.detach().reshape(labels.shape), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: log_probs\n{m}")
    torch.testing.assert_close(out.entropy.double().cpu(), ref_entropy.detach().reshape(labels.shape), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: entropy\n{m}")
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss.detach(), rtol=5e-5 if acc == torch.float32 else 1e-9,
                               atol=1e-6, msg=lambda m: f"{what}: loss\n{m}")
    for k in ppo_ext.METRIC_NAMES:
        torch.testing.assert_close(out.metrics[k].cpu(), ref.metrics[k].cpu(), rtol=5e-5, atol=1e-5,
                                   msg=lambda m: f"{what}: metric {k}\n{m}")
    valid = torch.ones(labels.shape, dtype=torch.bool) if mask is None else mask.cpu() != 0
    ref_entropy_mean = ref_entropy.detach().reshape(labels.shape)[valid].sum() / max(int(valid.sum()), 1)
    torch.testing.assert_close(out.metrics["entropy"].double().cpu(), ref_entropy_mean, rtol=5e-5, atol=1e-5)
    assert torch.equal(out.counts.cpu(), ref.counts)
    grad = x.grad
    assert grad.dtype == dtype and grad.shape == logits.shape
    scale = x64.grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), x64.grad, rtol=GRAD_RTOL[dtype],
                               atol=1e-6 * scale + (1e-12 if dtype == torch.float64 else 2e-9),
                               msg=lambda m: f"{what}: grad_logits\n{m}")
    return out, grad


# --------------------------------------------------------------------------------------------
# Values and gradients against the reference.


@pytest.mark.parametrize("V", [1, 7, 32000, 151936])
def test_vocabulary_sizes(device, V):
    B, T = {1: (4, 9), 7: (5, 13), 32000: (3, 5), 151936: (2, 3)}[V]
    logits, labels = make_logits(B, T, V, seed=V, device=device)
    old, adv, mask, w = loss_inputs(B, T, seed=V, device=device)
    check_from_logits(logits, labels, old, adv, mask, w, what=f"V={V}", **options("token", dual=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes(device, dtype):
    # V = 1000 is not a multiple of the CPU tile (2048) nor of 16/32: tail lanes, one tile; 5000: several tiles.
    for V in (1000, 5000):
        logits, labels = make_logits(4, 7, V, seed=V, dtype=dtype, device=device)
        old, adv, mask, w = loss_inputs(4, 7, seed=V, device=device)
        check_from_logits(logits, labels, old, adv, mask, w, what=f"{dtype} V={V}", **options("seq-token", dual=True))


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(device, temperature):
    logits, labels = make_logits(3, 11, 3001, seed=7, device=device)
    old, adv, mask, w = loss_inputs(3, 11, seed=7, device=device)
    check_from_logits(logits, labels, old, adv, mask, w, temperature=temperature,
                      **options("seq", "seq-mean-token-mean", clamp=True))


def test_strided_rows_slice_of_longer_sequence(device):
    """logits[:, :-1] of a (B, T + 1, V) tensor, and labels that are a slice too: no copy is needed."""
    full, labels = make_logits(3, 8, 515, seed=8, device=device, extra_t=1)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    full_labels = torch.cat([labels, labels[:, :1]], 1)
    labels = full_labels[:, :-1]
    assert not labels.is_contiguous()
    old, adv, mask, w = loss_inputs(3, 8, seed=8, device=device)
    check_from_logits(logits, labels, old, adv, mask, w, **options("token"))


def test_strided_rows_flat(device):
    """(N, V) logits whose rows are longer than V (a [:, :V] slice), with (B, T) labels, N = B * T."""
    wide, labels = make_logits(1, 24, 700, seed=9, device=device)
    logits = wide[0][:, :600]
    labels = labels.clamp(max=599).view(4, 6)
    old, adv, mask, w = loss_inputs(4, 6, seed=9, device=device)
    check_from_logits(logits, labels, old, adv, mask, w, **options("token", dual=True))


@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 0, 10), (0, 0, 0), (2, 3, 1)], ids=str)
def test_empty_and_tiny_shapes(device, shape):
    B, T, V = shape
    g = torch.Generator().manual_seed(25)
    x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    labels = torch.zeros(B, T, dtype=torch.int64, device=device)
    old, adv = torch.zeros(B, T, device=device), torch.ones(B, T, device=device)
    out = ppo_ext.policy_loss_from_logits(x, labels, old, adv, return_entropy=True)
    out.loss.backward()
    assert out.log_probs.shape == (B, T) and out.entropy.shape == (B, T) and x.grad.shape == shape
    if V == 1:  # one token: log-prob 0, entropy 0, gradient 0
        assert torch.count_nonzero(out.log_probs) == 0 and torch.count_nonzero(out.entropy) == 0
        assert torch.count_nonzero(x.grad) == 0


def test_masked_rows_get_zero_gradient(device):
    logits, labels = make_logits(4, 10, 257, seed=10, device=device)
    old, adv, mask, w = loss_inputs(4, 10, seed=10, device=device)  # row 1 fully masked
    out, grad = check_from_logits(logits, labels, old, adv, mask, w, **options("token"))
    invalid = (mask == 0).cpu()
    assert invalid[1].all()
    assert torch.count_nonzero(grad.cpu()[invalid]) == 0
    # Every row masked: loss 0, gradient all zeros.
    x = logits.clone().requires_grad_(True)
    out = ppo_ext.policy_loss_from_logits(x, labels, old, adv, torch.zeros_like(mask))
    out.loss.backward()
    assert out.loss.item() == 0 and torch.count_nonzero(x.grad) == 0


def test_inplace_backward(device):
    """inplace_backward=True writes the same gradient, bitwise, into the logits' buffer."""
    for dtype in (torch.float32, torch.bfloat16):
        full, labels = make_logits(3, 6, 1030, seed=11, dtype=dtype, device=device, extra_t=1)
        old, adv, mask, w = loss_inputs(3, 6, seed=11, device=device)
        kw = dict(token_weights=w, temperature=0.9, dual_clip=DUAL_CLIP, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)

        x = full[:, :-1].clone().requires_grad_(True)
        ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, **kw).loss.backward()

        h = full.clone()  # stands for the model's output: a non-leaf the gradient flows back through
        leaf = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
        logits = (h + leaf)[:, :-1]
        out = ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, inplace_backward=True, **kw)
        grads = {}
        logits.register_hook(lambda g: grads.setdefault("g", g))
        out.loss.backward()
        g = grads["g"]
        assert g.data_ptr() == logits.data_ptr(), "the gradient is not in the logits' buffer"
        assert same_bits(g.contiguous(), x.grad)
        assert same_bits(logits.detach().contiguous(), x.grad)  # the logits are gone
        torch.testing.assert_close(leaf.grad.double(), x.grad.double().sum(), rtol=1e-3, atol=1e-3)


def test_inplace_backward_is_refused_where_logits_are_needed(device):
    """Another use of the logits that saved them for its backward fails autograd's version check."""
    logits, labels = make_logits(2, 4, 50, seed=12, device=device)
    old, adv, mask, w = loss_inputs(2, 4, seed=12, device=device)
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    other = (y * y).sum()  # saves y; its backward runs after ours (created first), so it sees the gradient
    out = ppo_ext.policy_loss_from_logits(y, labels, old, adv, mask, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


def test_log_probs_from_logits(device):
    logits, labels = make_logits(3, 5, 300, seed=13, device=device)
    lp, entropy = ppo_ext.log_probs_from_logits(logits, labels, temperature=1.3, return_entropy=True)
    ref_lp, ref_entropy = reference_log_probs(logits.cpu(), labels.cpu(), 1.3)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=2e-5, atol=2e-5)
    lp2, none = ppo_ext.log_probs_from_logits(logits, labels, temperature=1.3)
    assert none is None and same_bits(lp, lp2)
    # Plain autograd of a sum (an expanded gradient).
    x = logits.clone().requires_grad_(True)
    ppo_ext.log_probs_from_logits(x, labels)[0].sum().backward()
    x64 = logits.double().cpu().requires_grad_(True)
    reference_log_probs(x64, labels.cpu())[0].sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=2e-5, atol=2e-6)


def test_extreme_logits(device):
    """Large logits (no overflow), -inf entries (masked vocabulary: 0 probability, entropy finite), NaN rows."""
    logits, labels = make_logits(2, 3, 100, seed=14, device=device)
    logits = logits * 1000
    logits[0, 0, 5:50] = float("-inf")
    labels[0, 0] = 2
    lp, entropy = ppo_ext.log_probs_from_logits(logits, labels, return_entropy=True)
    ref_lp, ref_entropy = reference_log_probs(logits.cpu(), labels.cpu())
    ref_entropy = torch.nan_to_num(ref_entropy)  # 0 * -inf in the eager formula
    torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=1e-5, atol=1e-3)
    logits[1, 2, 7] = float("nan")
    lp, entropy = ppo_ext.log_probs_from_logits(logits, labels, return_entropy=True)
    assert lp[1, 2].isnan() and entropy[1, 2].isnan() and not lp[1, :2].isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_logits_exp(device, dtype):
    """16-bit logits take a faster exp on the CPU (csrc/cpu/vec_ops.h, FastExpVecOps: within 1.63e-7 of float32's
    exp with AVX-512, 4e-7 without): at a 152K vocabulary the log-probs and entropies are still float32-accurate
    (a 1e-4 exp would be 20x off here) and the gradient within a 16-bit rounding of the float64 one; a NaN logit
    gives NaN log-prob, entropy and gradient (ATen's exp_u20 alone gives inf for NaN)."""
    logits, labels = make_logits(2, 3, 151936, seed=31, dtype=dtype, device=device)
    x = logits.clone().requires_grad_(True)
    lp, entropy = ppo_ext.log_probs_from_logits(x, labels, return_entropy=True)
    (lp.sum() + 0.3 * entropy.sum()).backward()
    x64 = logits.double().cpu().requires_grad_(True)
    ref_lp, ref_entropy = reference_log_probs(x64, labels.cpu())
    (ref_lp.sum() + 0.3 * ref_entropy.sum()).backward()
    torch.testing.assert_close(lp.double().cpu(), ref_lp.detach(), rtol=0, atol=5e-6)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy.detach(), rtol=0, atol=5e-6)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=GRAD_RTOL[dtype], atol=1e-6)
    logits[1, 2, 7] = float("nan")
    x = logits.clone().requires_grad_(True)
    lp, entropy = ppo_ext.log_probs_from_logits(x, labels, return_entropy=True)
    (lp.sum() + 0.3 * entropy.sum()).backward()
    assert lp[1, 2].isnan() and entropy[1, 2].isnan() and not lp[1, :2].isnan().any()
    assert x.grad[1, 2].isnan().all() and x.grad[1, :2].isfinite().all()
    x.grad = None
    ppo_ext.log_probs_from_logits(x, labels)[0].sum().backward()  # the log-prob's gradient alone: exp(x - NaN)
    assert x.grad[1, 2].isnan().all() and x.grad[1, :2].isfinite().all()


def check_16bit_exp(device):
    """The exp of the 16-bit logits' kernels, through rows [0, x] whose log-prob at 0 is -log(1 + exp(x)):
    bfloat16 / float16 x in [-4, 1.5] on a grid of 2^-9 (the exp sees -|x|: the polynomial's whole reduced range,
    2^n for n in -6..0), x in the vector lane of the 0 (on the CPU the lanes' stats are combined by the scalar exp).
    Measured |error| 1.23e-7 on the CPU, whichever instruction set: float32's roundings of 1 + exp(x) and its log
    dominate (a correctly rounded exp gives 1.22e-7), so exps within ~1.5e-7 all pass; an exp 3.7e-7 off at the
    ends of its reduced range (its last coefficient 1.3% off) gives 3.4e-7. On CUDA the exp is ex2.approx of the
    float32 product x log2(e) (2 ulp, and that product's rounding): within 4.5e-7 by its error bounds."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.arange(-4, 1.5, 2 ** -9, dtype=torch.float64).to(dtype).unique()
        logits = torch.full((x.numel(), 32), float("-inf"), dtype=dtype, device=device)
        logits[:, 0], logits[:, 16] = 0, x.to(device)
        labels = torch.zeros(x.numel(), dtype=torch.long, device=device)
        lp = ppo_ext.log_probs_from_logits(logits, labels)[0]
        torch.testing.assert_close(lp.double().cpu(), -torch.log1p(x.double().exp()), rtol=0,
                                   atol=2e-7 if device == "cpu" else 6e-7)


def test_16bit_logits_exp_accuracy(device):
    check_16bit_exp(device)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e30), (torch.float32, 2e9), (torch.bfloat16, 1e30),
                                       (torch.float16, 6e4), (torch.float64, 1e300)])
@pytest.mark.parametrize("temperature", [0.7, 1.9])
def test_huge_logits_at_a_temperature(device, dtype, big, temperature):
    """Logits of 1e30 (float64: 1e300) at T != 1: finite log-probs <= 0 and entropies, as eager
    log_softmax(x / T). (The max used to be scaled before the offsets were taken, unrounded: the largest
    offset was half an ulp of max / T, not 0, and its exp overflowed: a log-prob of +1.2e22 for float32.)"""
    logits, labels = make_logits(2, 3, 50, seed=18, device=device, dtype=dtype)
    logits[0, 0, 7], labels[0, 0] = big, 7         # the max, taken
    logits[0, 1, 7], labels[0, 1] = big, 8         # the max, not taken
    logits[0, 2, 9] = -big
    logits[1, 0, :] = big                          # a uniform row
    logits[1, 1, :2] = big                         # two tied maxima
    lp, entropy = ppo_ext.log_probs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    ref = torch.log_softmax(logits.double().cpu() / temperature, -1)
    ref_lp = ref.gather(-1, labels.cpu()[..., None])[..., 0]
    ref_entropy = -(ref.exp() * ref).nan_to_num().sum(-1)
    assert torch.isfinite(entropy).all() and (lp <= 0).all(), (lp, entropy)
    torch.testing.assert_close(lp.double().cpu().clamp(min=-1e6), ref_lp.clamp(min=-1e6), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=1e-5, atol=1e-4)


def test_bitwise_deterministic_and_thread_independent(device):
    logits, labels = make_logits(5, 7, 4099, seed=15, device=device, dtype=torch.bfloat16)
    old, adv, mask, w = loss_inputs(5, 7, seed=15, device=device)

    def run(entropy_coef):
        x = logits.clone().requires_grad_(True)
        out = ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, return_entropy=True,
                                              entropy_coef=entropy_coef)
        out.loss.backward()
        return out.loss, out.log_probs, out.entropy.detach(), x.grad

    for entropy_coef in (0.0, 0.1):  # (the entropy's gradient in the backward too)
        _check_deterministic(device, functools.partial(run, entropy_coef))


def _check_deterministic(device, run):
    first = run()
    threads = [1, 2] if device == "cpu" else [torch.get_num_threads()]
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            for a, b in zip(first, run()):
                assert same_bits(a, b)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Errors.


def test_labels_out_of_range(device):
    logits, labels = make_logits(2, 3, 10, seed=16, device=device)
    old, adv, mask, _ = loss_inputs(2, 3, seed=16, device=device)
    for bad in (10, -1):
        bad_labels = labels.clone()
        bad_labels[1, 2] = bad
        if device == "cpu":
            with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V\) with V = 10.*labels\[1, 2\]"):
                ppo_ext.policy_loss_from_logits(logits, bad_labels, old, adv, mask)
        else:  # no host synchronisation: a NaN log-prob, unless check_labels
            lp, _ = ppo_ext.log_probs_from_logits(logits, bad_labels)
            assert lp[1, 2].isnan().item() and not lp[0].isnan().any().item()
        with pytest.raises(ValueError, match=r"labels\[1, 2\] = " + str(bad)):
            ppo_ext.policy_loss_from_logits(logits, bad_labels, old, adv, mask, check_labels=True)


def test_argument_errors(device):
    logits, labels = make_logits(2, 3, 10, seed=17, device=device)
    lp_op = torch.ops.ppo_ext.token_log_probs
    with pytest.raises(TypeError, match="labels must be int64"):
        lp_op(logits, labels.int(), 1.0, False, False)
    with pytest.raises(ValueError, match="labels must have the shape"):
        lp_op(logits, labels[:, :2], 1.0, False, False)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        lp_op(logits, labels, 0.0, False, False)
    with pytest.raises(ValueError, match="contiguous along the vocabulary"):
        lp_op(logits.transpose(1, 2).contiguous().transpose(1, 2), labels, 1.0, False, False)
    with pytest.raises(TypeError, match="logits must be float32"):
        lp_op(logits.int(), labels, 1.0, False, False)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, T, V\) or \(N, V\)"):
        lp_op(logits[0, 0], labels[0, 0], 1.0, False, False)
    with pytest.raises(TypeError, match="temperature must be a number"):
        ppo_ext.log_probs_from_logits(logits, labels, temperature="hot")
    with pytest.raises(ValueError, match="N = B \\* T"):
        ppo_ext.log_probs_from_logits(logits[0], labels)
    with pytest.raises(ValueError, match="overlapping rows"):
        expanded = logits[:, :1].expand(2, 3, 10)
        lp, lse, _ = lp_op(expanded, labels, 1.0, False, False)
        torch.ops.ppo_ext.token_log_probs_backward_inplace(torch.ones_like(lp), expanded, labels, lse, 1.0)


# --------------------------------------------------------------------------------------------
# The entropy's gradient and the entropy bonus.


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_entropy_gradient(device, dtype, temperature):
    """d(sum w_lp lp + sum w_H H)/dlogits against eager float64 autograd: the entropy's term alone, with the
    log-probs', in place; a -inf logit (masked vocabulary, p = 0) gets gradient 0, not NaN; rows whose two upstream
    gradients are 0 are zeros."""
    for V in (7, 1030):
        logits, labels = make_logits(3, 5, V, seed=V, dtype=dtype, device=device)
        logits[0, 1, 3] = -torch.inf
        g = torch.Generator().manual_seed(V)
        w_lp, w_h = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                                     dtype=torch.float64)
        w_lp[2], w_h[2] = 0, 0  # a row with no upstream gradient
        w_lp[1, :2] = 0  # the entropy's term alone
        x64 = logits.double().cpu().clone().requires_grad_(True)
        ref_lp, ref_h = reference_log_probs(x64, labels.cpu(), temperature)
        ((ref_lp * w_lp).sum() + (ref_h * w_h).sum()).backward()
        for inplace in (False, True):
            x = logits.clone().requires_grad_(True)
            y = x * 1.0 if inplace else x  # in place: a non-leaf whose buffer the gradient takes
            lp, h = ppo_ext.log_probs_from_logits(y, labels, temperature=temperature, return_entropy=True,
                                                  inplace_backward=inplace)
            assert lp.requires_grad and h.requires_grad
            ((lp * w_lp.to(device)).sum() + (h * w_h.to(device)).sum()).backward()
            assert torch.isfinite(x.grad).all() and x.grad[0, 1, 3] == 0
            assert torch.count_nonzero(x.grad[2]) == 0
            scale = x64.grad.abs().max().item()
            torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=GRAD_RTOL[dtype],
                                       atol=1e-6 * scale + (1e-12 if dtype == torch.float64 else 2e-9),
                                       msg=lambda m: f"V={V} inplace={inplace}\n{m}")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_entropy_bonus(device, agg):
    """policy_loss_from_logits' entropy_coef: loss - entropy_coef * agg(H), aggregated as the loss (normalisers
    included, token_weights not), against the reference; entropy_loss its aggregated value."""
    for k, dtype in enumerate((torch.float32, torch.float64, torch.bfloat16)):
        logits, labels = make_logits(4, 6, 301, seed=30 + k, dtype=dtype, device=device)
        old, adv, mask, w = loss_inputs(4, 6, seed=30 + k, device=device)
        normalisers = [{}, dict(num_tokens=50.0, num_seqs=7, loss_scale_factor=9.0)][k % 2]
        check_from_logits(logits, labels, old, adv, mask, w, temperature=0.8, what=f"{agg} {dtype}",
                          entropy_coef=0.05, **options("token", agg, dual=True), **normalisers)


def test_entropy_bonus_without_return_entropy(device):
    """entropy_coef works without return_entropy (the entropy is computed, not returned); no entropy_coef and no
    return_entropy: nothing of the entropy is computed, and an entropy that gets no gradient changes nothing in
    the backward (bitwise)."""
    logits, labels = make_logits(3, 5, 97, seed=33, device=device)
    old, adv, mask, _ = loss_inputs(3, 5, seed=33, device=device)
    with_h = ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, entropy_coef=0.1, return_entropy=True)
    without = ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, entropy_coef=0.1)
    assert without.entropy is None and same_bits(without.loss, with_h.loss)
    assert same_bits(without.metrics["entropy_loss"], with_h.metrics["entropy_loss"])
    plain = ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask)
    assert "entropy" not in plain.metrics and "entropy_loss" not in plain.metrics and plain.entropy is None
    grads = []
    for return_entropy in (False, True):
        x = logits.clone().requires_grad_(True)
        ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, return_entropy=return_entropy).loss.backward()
        grads.append(x.grad)
    assert same_bits(grads[0], grads[1])
    with pytest.raises(TypeError, match="entropy_coef must be a number"):
        ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, entropy_coef="0.1")
    with pytest.raises(TypeError, match="unexpected keyword"):
        ppo_ext.policy_loss_from_logits(logits, labels, old, adv, mask, no_such_option=1)


def test_entropy_backward_errors(device):
    logits, labels = make_logits(2, 3, 10, seed=34, device=device)
    lp, lse, h = torch.ops.ppo_ext.token_log_probs(logits, labels, 1.0, True, False)
    g = torch.ones_like(lp)
    with pytest.raises(ValueError, match="grad_entropy and entropy go together"):
        torch.ops.ppo_ext.token_log_probs_backward(g, logits, labels, lse, 1.0, g, None)
    with pytest.raises(ValueError, match="grad_entropy must have the shape of labels"):
        torch.ops.ppo_ext.token_log_probs_backward(g, logits, labels, lse, 1.0, g[:1], h)
    with pytest.raises(TypeError, match="entropy must be the"):
        torch.ops.ppo_ext.token_log_probs_backward(g, logits, labels, lse, 1.0, g, h.double())


# --------------------------------------------------------------------------------------------
# The ops as PyTorch sees them.


@pytest.mark.parametrize("layout", ["contiguous", "strided", "flat"])
def test_opcheck_token_log_probs(device, layout):
    full, labels = make_logits(3, 5, 37, seed=19, device=device, extra_t=1)
    logits = {"contiguous": full[:, :-1].contiguous(), "strided": full[:, :-1],
              "flat": full[:, :-1].reshape(-1, 37)}[layout]
    if layout == "flat":
        labels = labels.reshape(-1)
    logits = logits.detach().requires_grad_(True)
    for entropy in (False, True):
        torch.library.opcheck(torch.ops.ppo_ext.token_log_probs.default, (logits, labels, 0.8, entropy, False))


def test_opcheck_backward_ops(device):
    full, labels = make_logits(3, 5, 37, seed=20, device=device, extra_t=1, dtype=torch.bfloat16)
    logits = full[:, :-1]
    lp, lse, _ = torch.ops.ppo_ext.token_log_probs(logits, labels, 0.8, False, False)
    grad = torch.randn(lp.shape, device=device)
    grad[1] = 0
    torch.library.opcheck(torch.ops.ppo_ext.token_log_probs_backward.default, (grad, logits, labels, lse, 0.8))
    torch.library.opcheck(torch.ops.ppo_ext.token_log_probs_backward_inplace.default,
                          (grad, logits.clone(), labels, lse, 0.8))
    _, _, entropy = torch.ops.ppo_ext.token_log_probs(logits, labels, 0.8, True, False)
    grad_entropy = torch.randn(lp.shape, device=device)
    grad_entropy[1] = 0
    torch.library.opcheck(torch.ops.ppo_ext.token_log_probs_backward.default,
                          (grad, logits, labels, lse, 0.8, grad_entropy, entropy))
    torch.library.opcheck(torch.ops.ppo_ext.token_log_probs_backward_inplace.default,
                          (grad, logits.clone(), labels, lse, 0.8, grad_entropy, entropy))
    expected = torch.ops.ppo_ext.token_log_probs_backward(grad, logits, labels, lse, 0.8)
    target = full.clone()[:, :-1]
    version = target._version
    torch.ops.ppo_ext.token_log_probs_backward_inplace(grad, target, labels, lse, 0.8)
    assert target._version > version
    assert same_bits(target.contiguous(), expected)
    assert torch.count_nonzero(expected[1]) == 0


def test_backward_of_a_vocabulary_block(device):
    """The backward ops on a block of the vocabulary's columns (what hidden_log_probs' backward computes for 16-bit
    weights): labels shifted by the block's start (outside the block: no onehot term), the full rows' logsumexp and
    entropy; the block's columns of the full rows' gradient (to rounding: a column's place in the vectorised loop or
    its scalar tail differs)."""
    logits, labels = make_logits(3, 5, 301, seed=25, device=device)
    _, lse, entropy = torch.ops.ppo_ext.token_log_probs(logits, labels, 0.8, True, False)
    g = torch.Generator().manual_seed(4)
    grad, grad_entropy = (torch.randn(labels.shape, generator=g).to(device) for _ in range(2))
    full = torch.ops.ppo_ext.token_log_probs_backward(grad, logits, labels, lse, 0.8, grad_entropy, entropy)
    for start, stop in ((0, 64), (64, 250), (250, 301)):
        block = logits[..., start:stop].contiguous()
        got = torch.ops.ppo_ext.token_log_probs_backward(grad, block, labels - start, lse, 0.8, grad_entropy, entropy)
        torch.testing.assert_close(got, full[..., start:stop], rtol=1e-6, atol=1e-9, msg=lambda m: f"{start}:{stop} {m}")


def test_gradcheck(device):
    logits, labels = make_logits(3, 4, 7, seed=21, device=device, dtype=torch.float64)
    old, adv, mask, w = loss_inputs(3, 4, seed=21, device=device, dtype=torch.float64, margin=1e-3)
    kw = options("token", "seq-mean-token-mean", dual=True, clamp=True)

    def loss(x):
        return ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, token_weights=w, temperature=0.7, **kw).loss

    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-7)

    def log_probs(x):
        return ppo_ext.log_probs_from_logits(x, labels, temperature=1.3)[0]

    assert torch.autograd.gradcheck(log_probs, (x,), eps=1e-6, atol=1e-7)

    def log_probs_and_entropy(x):
        return ppo_ext.log_probs_from_logits(x, labels, temperature=1.3, return_entropy=True)

    assert torch.autograd.gradcheck(log_probs_and_entropy, (x,), eps=1e-6, atol=1e-7)

    def loss_with_bonus(x):
        return ppo_ext.policy_loss_from_logits(x, labels, old, adv, mask, token_weights=w, temperature=0.7,
                                               entropy_coef=0.3, **kw).loss

    assert torch.autograd.gradcheck(loss_with_bonus, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_torch_compile_fullgraph(device, inplace):
    torch._dynamo.reset()
    kw = options("token", "token-mean", dual=True)

    def step(logits, labels, old, adv, mask):
        if inplace:  # a non-leaf whose buffer the gradient may take, as a model's output
            logits = logits * 1.0
        out = ppo_ext.policy_loss_from_logits(logits[:, :-1], labels, old, adv, mask, temperature=0.9,
                                              return_entropy=True, entropy_coef=0.02, inplace_backward=inplace, **kw)
        return out.loss * 2, out.metrics["entropy"], out.log_probs, out.counts

    compiled = torch.compile(step, fullgraph=True)
    for seed in (22, 23):  # the second call re-uses the compiled graph
        full, labels = make_logits(3, 6, 301, seed=seed, device=device, extra_t=1)
        old, adv, mask, _ = loss_inputs(3, 6, seed=seed, device=device)
        x1 = full.clone().requires_grad_(True)
        x2 = full.clone().requires_grad_(True)
        a = compiled(x1, labels, old, adv, mask)
        b = step(x2, labels, old, adv, mask)
        a[0].backward()
        b[0].backward()
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)


def test_no_grad(device):
    logits, labels = make_logits(2, 3, 20, seed=24, device=device)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        lp, _ = ppo_ext.log_probs_from_logits(x, labels)
    assert not lp.requires_grad


@pytest.mark.skipif(not (torch.cuda.is_available() and ppo_ext.built_with_cuda()),
                    reason="needs a GPU and ppo_ext's CUDA kernels")
def test_cuda_no_host_synchronisation():
    full, labels = make_logits(4, 16, 4096, seed=26, device="cuda", dtype=torch.bfloat16, extra_t=1)
    old, adv, mask, w = loss_inputs(4, 16, seed=26, device="cuda")
    x = full.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ppo_ext.policy_loss_from_logits(x[:, :-1], labels, old, adv, mask, token_weights=w, return_entropy=True)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None


_ISA_SCRIPT = r"""
import torch
from test_logits import make_logits, loss_inputs, check_from_logits, check_16bit_exp
from helpers import options
check_16bit_exp("cpu")
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for V in (7, 33, 2100):
        logits, labels = make_logits(3, 4, V, seed=V, dtype=dtype)
        old, adv, mask, w = loss_inputs(3, 4, seed=V, device="cpu")
        check_from_logits(logits, labels, old, adv, mask, w, temperature=0.8, **options("token", dual=True))
        check_from_logits(logits, labels, old, adv, mask, w, temperature=0.8, entropy_coef=0.1,
                          **options("seq", "seq-mean-token-mean"))
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_instruction_sets(capability):
    """The scalar and AVX2 CPU kernels (the widest one runs in every other test) against the reference."""
    run_with_cpu_capability(capability, _ISA_SCRIPT)
