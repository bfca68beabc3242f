"""ppo_ext.log_probs_from_hidden and policy_loss_from_hidden (the hidden_log_probs ops: the LM head chunk by chunk,
no logits) against eager float64 matmul + log_softmax + gather + the reference loss: log-probs, entropy, loss,
metrics, counts, and the gradients w.r.t. hidden, weight and bias; dtypes, layouts (strided hidden, flat rows),
chunk sizes, temperature, frozen weights, what autograd saves, opcheck, gradcheck, torch.compile, determinism,
errors."""

import pytest
import torch

import ppo_ext
from helpers import AGG_MODES, family_is_modes, family_options, make_inputs, options
from ppo_ext.hidden import default_chunk_tokens
from ppo_ext.reference import policy_loss_reference
from test_logits import loss_inputs, reference_aggregate, reference_log_probs

ACC = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32,
       torch.float64: torch.float64}
# log-probs / entropy and gradients (relative to the largest reference gradient). 16-bit: the GEMM rounds each
# logit to the dtype (as the eager model's LM head does), the gradients are rounded to it before their GEMMs.
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 0.1, torch.float16: 0.02, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 0.015, torch.float16: 0.003, torch.float64: 1e-10}


def make_head(B, T, H, V, *, seed, dtype=torch.float32, device="cpu", bias=True, extra_t=0):
    """hidden (B, T + extra_t, H), weight (V, H), bias (V,), scaled so that the logits spread as a policy's
    (standard deviation ~3); labels drawn from the float64 softmax (and some uniformly)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T + extra_t, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3 / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    logits = hidden[:, :T] @ weight.T + (0 if b is None else b)
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=g).view(B, T)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, torch.randint(0, V, (B, T), generator=g), labels)
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def reference(hidden, weight, bias, labels, temperature=1.0, dtype=None):
    """float64 eager: the logits (rounded to `dtype`, default the inputs', as its GEMM writes them), log_softmax,
    gather."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    dtype = dtype or hidden.dtype
    if dtype != torch.float64:
        logits = logits + (logits.detach().to(dtype).double() - logits.detach())  # the value rounded
    return reference_log_probs(logits, labels.reshape(logits.shape[:-1]), temperature)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def assert_grads(got, ref, dtype, what):
    for name, a, b in zip(("hidden", "weight", "bias"), got, ref):
        if b is None:
            continue
        assert a is not None and a.dtype == dtype and a.shape == b.shape, f"{what}: grad {name}"
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=GRAD_TOL[dtype] * scale + 1e-12,
                                   msg=lambda m: f"{what}: grad {name}\n{m}")


def check_log_probs(hidden, weight, bias, labels, *, temperature=1.0, chunk_tokens=None, what=""):
    """log_probs_from_hidden (log-probs and entropy, a loss of both) against the float64 reference."""
    dtype = hidden.dtype
    h, w, b = leaves(hidden, weight, bias)
    lp, entropy = ppo_ext.log_probs_from_hidden(h, w, labels, bias=b, temperature=temperature, return_entropy=True,
                                                chunk_tokens=chunk_tokens)
    g = torch.Generator().manual_seed(1)
    c_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    c_h = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    (lp * c_lp.to(lp.device, lp.dtype) + entropy * c_h.to(lp.device, lp.dtype)).sum().backward()

    h64, w64, b64 = leaves(*(None if t is None else t.detach().double().cpu() for t in (hidden, weight, bias)))
    ref_lp, ref_entropy = reference(h64, w64, b64, labels.cpu(), temperature)
    (ref_lp.reshape(labels.shape) * c_lp + ref_entropy.reshape(labels.shape) * c_h).sum().backward()
    assert lp.dtype == ACC[dtype] and lp.shape == labels.shape and entropy.shape == labels.shape
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(lp.double().cpu(), ref_lp.detach().reshape(labels.shape), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: log_probs\n{m}")
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy.detach().reshape(labels.shape), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: entropy\n{m}")
    grads = (h.grad, w.grad, None if b is None else b.grad)
    assert_grads(grads, (h64.grad, w64.grad, None if b64 is None else b64.grad), dtype, what)
    return lp, entropy, grads


# --------------------------------------------------------------------------------------------
# Values and gradients against the reference.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_dtypes(device, dtype, bias):
    hidden, weight, b, labels = make_head(3, 7, 16, 301, seed=1, dtype=dtype, device=device, bias=bias)
    check_log_probs(hidden, weight, b, labels, chunk_tokens=4, what=f"{dtype} bias={bias}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_head_gradient_rounded_once(device, dtype):
    """A 16-bit weight's and bias' gradients over 250 chunks of rows are each one GEMM over all rows (rounded to 16
    bits once), not a sum of 250 per-chunk GEMMs rounded after each (bf16: 4 times the error here, which biases
    training); grad_hidden per chunk is one GEMM anyway."""
    hidden, weight, b, labels = make_head(8, 250, 32, 64, seed=3, dtype=dtype, device=device)
    check_log_probs(hidden, weight, b, labels, chunk_tokens=8, what=f"{dtype} 250 chunks")


def test_16bit_head_gradient_column_blocks(device):
    """The 16-bit head's second pass over blocks of columns with a partial last block: 150 columns fit the buffer,
    rounded down to a multiple of 64 (rows 16-byte aligned): blocks of 128, 128 and 45."""
    hidden, weight, b, labels = make_head(2, 6, 16, 301, seed=4, dtype=torch.bfloat16, device=device, bias=True)
    check_log_probs(hidden, weight, b, labels, chunk_tokens=6, what="bf16 column blocks")


@pytest.mark.parametrize("chunk_tokens", [None, 1, 5, 21, 1000])
def test_chunk_sizes(device, chunk_tokens):
    """Every chunking gives the reference's numbers, including a last, partial chunk and one chunk of all rows."""
    hidden, weight, b, labels = make_head(3, 7, 24, 97, seed=2, device=device)
    check_log_probs(hidden, weight, b, labels, chunk_tokens=chunk_tokens, what=f"chunk {chunk_tokens}")


def test_float64_chunking_does_not_change_the_numbers(device):
    hidden, weight, b, labels = make_head(2, 9, 12, 50, seed=3, dtype=torch.float64, device=device)
    results = [check_log_probs(hidden, weight, b, labels, chunk_tokens=c)[2] for c in (1, 4, 18)]
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature(device, temperature):
    hidden, weight, b, labels = make_head(2, 6, 16, 64, seed=4, device=device)
    check_log_probs(hidden, weight, b, labels, temperature=temperature, chunk_tokens=5, what=f"T={temperature}")


@pytest.mark.parametrize("layout", ["strided", "flat", "flat-BT-labels", "transposed-weight"])
def test_layouts(device, layout):
    """hidden[:, :-1] of a (B, T + 1, H) model output (not copied whole), (N, H) rows with (N,) or (B, T) labels, a
    weight that is a transposed view (e.g. a tied embedding stored as (H, V))."""
    B, T, H, V = 3, 5, 16, 40
    full, weight, b, labels = make_head(B, T, H, V, seed=5, device=device, extra_t=1)
    h, w, bb = leaves(full, weight, b)
    x, lab = h[:, :-1], labels
    if layout.startswith("flat"):
        x = h[:, :-1].reshape(B * T, H)
        lab = labels if layout == "flat-BT-labels" else labels.reshape(-1)
    if layout == "transposed-weight":
        w = weight.T.contiguous().detach().requires_grad_(True)
    w_used = w.T if layout == "transposed-weight" else w
    lp, entropy = ppo_ext.log_probs_from_hidden(x, w_used, lab, bias=bb, return_entropy=True, chunk_tokens=4)
    assert lp.shape == lab.shape
    (lp.sum() + 0.5 * entropy.sum()).backward()
    h64, w64, b64 = leaves(*(t.detach().double() for t in (full[:, :-1], weight, b)))
    ref_lp, ref_entropy = reference(h64, w64, b64, labels)
    (ref_lp.sum() + 0.5 * ref_entropy.sum()).backward()
    torch.testing.assert_close(lp.double().cpu().reshape(B, T), ref_lp.detach().cpu(), rtol=2e-5, atol=2e-5)
    grad_w = w.grad.T if layout == "transposed-weight" else w.grad
    assert_grads((h.grad[:, :-1], grad_w, bb.grad), (h64.grad, w64.grad, b64.grad), torch.float32, layout)
    assert torch.count_nonzero(h.grad[:, -1]) == 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_from_hidden(device, agg):
    """The loss, metrics, counts and gradients of policy_loss_from_hidden, entropy bonus included, against the
    float64 reference loss of the reference log-probs."""
    B, T, H, V = 4, 6, 16, 120
    hidden, weight, b, labels = make_head(B, T, H, V, seed=6, device=device)
    old, adv, mask, weights = loss_inputs(B, T, seed=6, device=device)
    kw = options("token", agg, dual=True, clamp=True)
    h, w, bb = leaves(hidden, weight, b)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, token_weights=weights,
                                          temperature=0.9, return_entropy=True, entropy_coef=0.03, chunk_tokens=7, **kw)
    out.loss.backward()
    h64, w64, b64 = leaves(*(t.detach().double().cpu() for t in (hidden, weight, b)))
    ref_lp, ref_entropy = reference(h64, w64, b64, labels.cpu(), 0.9)
    f = lambda t: t.detach().double().cpu()  # noqa: E731
    ref = policy_loss_reference(ref_lp, f(old), f(adv), mask.cpu(), token_weights=f(weights), **kw)
    ref_entropy_loss = reference_aggregate(ref_entropy, mask.cpu(), **kw)
    (ref.loss - 0.03 * ref_entropy_loss).backward()
    torch.testing.assert_close(out.loss.double().cpu(), (ref.loss - 0.03 * ref_entropy_loss).detach(), rtol=5e-5,
                               atol=1e-6)
    torch.testing.assert_close(out.log_probs.double().cpu(), ref_lp.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.metrics["entropy_loss"].double().cpu(), ref_entropy_loss.detach(), rtol=5e-5,
                               atol=1e-5)
    for k in ppo_ext.METRIC_NAMES:
        torch.testing.assert_close(out.metrics[k].cpu(), ref.metrics[k].cpu(), rtol=5e-5, atol=1e-5, msg=k)
    assert torch.equal(out.counts.cpu(), ref.counts)
    assert_grads((h.grad, w.grad, bb.grad), (h64.grad, w64.grad, b64.grad), torch.float32, agg)


def test_same_as_from_logits(device):
    """policy_loss_from_hidden is policy_loss_from_logits of hidden @ weight.T + bias (float64: to rounding)."""
    B, T, H, V = 3, 5, 8, 33
    hidden, weight, b, labels = make_head(B, T, H, V, seed=7, dtype=torch.float64, device=device)
    old, adv, mask, _ = loss_inputs(B, T, seed=7, device=device, dtype=torch.float64)
    kw = options("seq", "seq-mean-token-sum", clamp=True)
    h1, w1, b1 = leaves(hidden, weight, b)
    h2, w2, b2 = leaves(hidden, weight, b)
    a = ppo_ext.policy_loss_from_hidden(h1, w1, labels, old, adv, mask, bias=b1, entropy_coef=0.1, chunk_tokens=4, **kw)
    c = ppo_ext.policy_loss_from_logits(h2 @ w2.T + b2, labels, old, adv, mask, entropy_coef=0.1, **kw)
    a.loss.backward()
    c.loss.backward()
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-12, atol=1e-12)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], c.metrics[k], rtol=1e-6, atol=1e-7)
    for u, v in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-10, atol=1e-12)


def test_frozen_weight_and_hidden_only(device):
    """A frozen LM head (weight and bias without grad): only grad_hidden is computed, the same values; hidden without
    grad (a LoRA'd head): only the head's gradients."""
    hidden, weight, b, labels = make_head(2, 5, 8, 30, seed=8, device=device)
    h, w, bb = leaves(hidden, weight, b)
    lp, _ = ppo_ext.log_probs_from_hidden(h, w, labels, bias=bb, chunk_tokens=3)
    lp.sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    lp2, _ = ppo_ext.log_probs_from_hidden(h2, weight, labels, bias=b, chunk_tokens=3)
    lp2.sum().backward()
    assert torch.equal(h2.grad, h.grad)
    w3, b3 = leaves(weight, b)
    lp3, _ = ppo_ext.log_probs_from_hidden(hidden, w3, labels, bias=b3, chunk_tokens=3)
    lp3.sum().backward()
    assert torch.equal(w3.grad, w.grad) and torch.equal(b3.grad, bb.grad)
    grads = torch.ops.ppo_ext.hidden_log_probs_backward(
        torch.ones_like(lp), hidden, weight, labels, torch.ops.ppo_ext.hidden_log_probs(hidden, weight, labels, b)[1],
        b, 1.0, 3, output_mask=[True, False, False])
    assert torch.equal(grads[0], h.grad) and grads[1].shape == (0,) and grads[2].shape == (0,)


def test_autocast(device):
    """Under torch.autocast (bf16) a float32 head and float32 hidden states run as bf16, as F.linear would: the same
    numbers as the bf16 inputs given directly; the gradients reach the float32 leaves in float32."""
    hidden, weight, b, labels = make_head(2, 9, 16, 70, seed=19, device=device)
    h, w, bb = leaves(hidden, weight, b)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        lp, entropy = ppo_ext.log_probs_from_hidden(h, w, labels, bias=bb, return_entropy=True, chunk_tokens=5)
    (lp.sum() + entropy.sum()).backward()
    h16, w16, b16 = leaves(hidden.bfloat16(), weight.bfloat16(), b.bfloat16())
    lp16, entropy16 = ppo_ext.log_probs_from_hidden(h16, w16, labels, bias=b16, return_entropy=True, chunk_tokens=5)
    (lp16.sum() + entropy16.sum()).backward()
    assert torch.equal(lp, lp16) and torch.equal(entropy, entropy16)
    for leaf, leaf16 in ((h, h16), (w, w16), (bb, b16)):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, leaf16.grad.float())


def test_autocast_leaves_float64(device):
    """autocast does not cast float64 (F.linear runs in float64 there): neither does log_probs_from_hidden."""
    hidden, weight, b, labels = make_head(2, 5, 8, 30, seed=20, dtype=torch.float64, device=device)
    plain = ppo_ext.log_probs_from_hidden(hidden, weight, labels, bias=b)[0]
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        cast = ppo_ext.log_probs_from_hidden(hidden, weight, labels, bias=b)[0]
    assert cast.dtype == torch.float64 and torch.equal(cast, plain)


def test_strided_hidden_copies_only_a_chunk():
    """hidden[:, :-1] of a (B, T + 1, H) tensor: a chunk across two sequences copies its own rows, not the two
    sequences (the largest allocation stays far below one sequence's hidden states)."""
    from torch.profiler import ProfilerActivity, profile

    B, T, H, V = 2, 8192, 64, 100
    full, weight, _, labels = make_head(B, T, H, V, seed=21, bias=False, extra_t=1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ppo_ext.log_probs_from_hidden(full[:, :-1], weight, labels, chunk_tokens=100)
    largest = max(e.cpu_memory_usage for e in prof.events())
    one_sequence = T * H * 4
    assert largest < one_sequence / 8, (largest, one_sequence)


def test_saves_no_logits(device):
    """What autograd keeps between forward and backward: hidden, weight and bias themselves (no copies) and a few
    numbers a token, never anything of the (tokens x vocabulary) size."""
    B, T, H, V = 4, 64, 8, 500
    hidden, weight, b, labels = make_head(B, T, H, V, seed=9, device=device)
    h, w, bb = leaves(hidden, weight, b)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, entropy = ppo_ext.log_probs_from_hidden(h, w, labels, bias=bb, return_entropy=True, chunk_tokens=16)
    inputs = {h.data_ptr(), w.data_ptr(), bb.data_ptr()}
    assert {t.data_ptr() for t in saved} >= inputs, [tuple(t.shape) for t in saved]
    assert max(t.numel() for t in saved if t.data_ptr() not in inputs) <= B * T, [tuple(t.shape) for t in saved]
    (lp.sum() + entropy.sum()).backward()


def test_masked_and_zero_upstream_rows(device):
    """Rows whose upstream gradient is 0 (masked tokens) contribute nothing: grad_hidden 0 there."""
    B, T, H, V = 3, 6, 8, 40
    hidden, weight, b, labels = make_head(B, T, H, V, seed=10, device=device)
    old, adv, mask, _ = loss_inputs(B, T, seed=10, device=device)
    h, w, bb = leaves(hidden, weight, b)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, chunk_tokens=5)
    out.loss.backward()
    assert torch.count_nonzero(h.grad[mask == 0]) == 0
    assert torch.count_nonzero(h.grad[mask != 0]) > 0


def test_bitwise_deterministic(device):
    hidden, weight, b, labels = make_head(4, 16, 32, 200, seed=11, dtype=torch.bfloat16, device=device)
    runs = []
    for _ in range(2):
        h, w, bb = leaves(hidden, weight, b)
        lp, entropy = ppo_ext.log_probs_from_hidden(h, w, labels, bias=bb, return_entropy=True, chunk_tokens=9)
        (lp.sum() + entropy.sum()).backward()
        runs.append((lp, entropy, h.grad, w.grad, bb.grad))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# The ops as PyTorch sees them.


@pytest.mark.parametrize("layout", ["contiguous", "strided", "flat"])
def test_opcheck(device, layout):
    full, weight, b, labels = make_head(3, 5, 8, 37, seed=12, device=device, extra_t=1)
    hidden = {"contiguous": full[:, :-1].contiguous(), "strided": full[:, :-1],
              "flat": full[:, :-1].reshape(-1, 8)}[layout]
    if layout == "flat":
        labels = labels.reshape(-1)
    h, w, bb = leaves(hidden, weight, b)
    for bias, entropy in ((None, False), (bb, True)):
        torch.library.opcheck(torch.ops.ppo_ext.hidden_log_probs.default, (h, w, labels, bias, 0.8, entropy, 4))
    _, lse, ent = torch.ops.ppo_ext.hidden_log_probs(hidden, weight, labels, b, 0.8, True, 4)
    grad = torch.randn(lse.shape, device=device)
    for mask in ([True, True, True], [True, False, True], [False, True, False]):
        torch.library.opcheck(torch.ops.ppo_ext.hidden_log_probs_backward.default,
                              (grad, hidden, weight, labels, lse, b, 0.8, 4, grad, ent, mask))
    torch.library.opcheck(torch.ops.ppo_ext.hidden_log_probs_backward.default,
                          (grad, hidden, weight, labels, lse, None, 0.8, 0))


def test_gradcheck(device):
    hidden, weight, b, labels = make_head(2, 3, 4, 7, seed=13, dtype=torch.float64, device=device)
    old, adv, mask, w = loss_inputs(2, 3, seed=13, device=device, dtype=torch.float64, margin=1e-3)
    kw = options("token", "token-mean", dual=True)
    args = leaves(hidden, weight, b)

    def log_probs_and_entropy(h, wt, bias):
        return ppo_ext.log_probs_from_hidden(h, wt, labels, bias=bias, temperature=1.3, return_entropy=True,
                                             chunk_tokens=2)

    assert torch.autograd.gradcheck(log_probs_and_entropy, args, eps=1e-6, atol=1e-7)

    for grad_in_forward in (False, True):
        def loss(h, wt, bias):
            return ppo_ext.policy_loss_from_hidden(h, wt, labels, old, adv, mask, bias=bias, token_weights=w,
                                                   entropy_coef=0.2, chunk_tokens=4, grad_in_forward=grad_in_forward,
                                                   **kw).loss

        # (gradcheck's second backward through one graph recomputes what the first formed in the forward pass: the
        # same to rounding)
        assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-7, nondet_tol=1e-13 if grad_in_forward else 0)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    kw = options("token", "token-mean", dual=True)

    def step(hidden, weight, bias, labels, old, adv, mask, grad_in_forward=None):
        out = ppo_ext.policy_loss_from_hidden(hidden[:, :-1], weight, labels, old, adv, mask, bias=bias,
                                              temperature=0.9, return_entropy=True, entropy_coef=0.02,
                                              chunk_tokens=8, grad_in_forward=grad_in_forward, **kw)
        return out.loss * 2, out.metrics["entropy"], out.log_probs, out.counts

    # traced: the generic path (the gradients formed in the forward pass are eager-only), compared with it eager
    compiled = torch.compile(step, fullgraph=True)
    for seed in (14, 15):  # the second call re-uses the compiled graph
        full, weight, b, labels = make_head(3, 6, 16, 101, seed=seed, device=device, extra_t=1)
        old, adv, mask, _ = loss_inputs(3, 6, seed=seed, device=device)
        first, second = leaves(full, weight, b), leaves(full, weight, b)
        a = compiled(*first, labels, old, adv, mask)
        c = step(*second, labels, old, adv, mask, False)
        a[0].backward()
        c[0].backward()
        for u, v in zip(a, c):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)
        for u, v in zip(first, second):
            torch.testing.assert_close(u.grad, v.grad, rtol=1e-6, atol=1e-9)


def test_no_grad(device):
    hidden, weight, b, labels = make_head(2, 3, 8, 20, seed=16, device=device)
    h, w, bb = leaves(hidden, weight, b)
    with torch.no_grad():
        lp, _ = ppo_ext.log_probs_from_hidden(h, w, labels, bias=bb)
    assert not lp.requires_grad


def test_argument_errors(device):
    hidden, weight, b, labels = make_head(2, 3, 8, 20, seed=17, device=device)
    cases = [
        (dict(hidden=hidden[0, 0]), ValueError, "hidden must have shape"),
        (dict(weight=weight[:, :4]), ValueError, r"weight must have shape \(V, H\) with H = 8"),
        (dict(weight=weight.double()), TypeError, "weight must have the dtype of hidden"),
        (dict(bias=b[:5]), ValueError, r"bias must have shape \(V,\) with V = 20"),
        (dict(bias=b.double()), TypeError, "bias must have the dtype of hidden"),
        (dict(labels=labels.int()), TypeError, "labels must be int64"),
        (dict(labels=labels[:, :2]), ValueError, "labels must have the shape of hidden"),
        (dict(hidden=hidden.int()), TypeError, "hidden must be float32"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens must be an integer >= 1"),
        (dict(chunk_tokens=2.5), ValueError, "chunk_tokens must be an integer >= 1"),
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    ]
    for change, error, match in cases:
        kw = dict(hidden=hidden, weight=weight, labels=labels, bias=b, temperature=1.0, chunk_tokens=None, **{})
        kw.update(change)
        with pytest.raises(error, match=match):
            ppo_ext.log_probs_from_hidden(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)
    bad = labels.clone()
    bad[1, 2] = 20
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V\) with V = 20"):
        ppo_ext.log_probs_from_hidden(hidden, weight, bad, check_labels=True)
    if device == "cpu":  # the CPU kernel checks the range always (CUDA: a NaN log-prob, no synchronisation)
        with pytest.raises(ValueError, match="labels must be token ids"):
            ppo_ext.log_probs_from_hidden(hidden, weight, bad)
    with pytest.raises(TypeError, match="inplace_backward"):
        ppo_ext.policy_loss_from_hidden(hidden, weight, labels, None, torch.zeros(2, device=device),
                                        inplace_backward=True)


@pytest.mark.skipif(not (torch.cuda.is_available() and ppo_ext.built_with_cuda()),
                    reason="needs a GPU and ppo_ext's CUDA kernels")
def test_cuda_no_host_synchronisation():
    full, weight, b, labels = make_head(4, 64, 32, 500, seed=18, dtype=torch.bfloat16, device="cuda", extra_t=1)
    old, adv, mask, w = loss_inputs(4, 64, seed=18, device="cuda")
    h, wt, bb = leaves(full, weight, b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ppo_ext.policy_loss_from_hidden(h[:, :-1], wt, labels, old, adv, mask, bias=bb, token_weights=w,
                                              return_entropy=True, entropy_coef=0.01, chunk_tokens=50)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert h.grad is not None and wt.grad is not None


# --------------------------------------------------------------------------------------------
# The gradients formed in the forward pass (grad_in_forward): the generic path's numbers.

# What makes a token's loss gradient read its whole row (docs/SPEC.md): the sequence-level ratio, GMPO, VESPO's row
# weight, a sequence-level rollout correction (seq-mean-token-mean's row token count is known from the mask).
def reads_its_row(loss_type, importance_sampling, rollout_is):
    return importance_sampling != "token" or loss_type in ("geo_mean", "vespo") or rollout_is in ("seq", "seq-mean")


def run_both(hidden, weight, bias, labels, old, adv, mask, *, upstream=1.0, entropy_weight=0.0,
             requires_grad=(True, True, True), **kw):
    """policy_loss_from_hidden with grad_in_forward True and False: (output, grads) of each, or the ValueError each
    raised; backward of upstream * loss (+ entropy_weight * the returned entropy's sum) w.r.t. hidden, weight and bias
    where requires_grad says."""
    runs = []
    for grad_in_forward in (True, False):
        h, w, b = (None if t is None else t.detach().clone().requires_grad_(r)
                   for t, r in zip((hidden, weight, bias), requires_grad))
        try:
            out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=b, grad_in_forward=grad_in_forward,
                                                  **kw)
        except ValueError as exc:
            runs.append(exc)
            continue
        total = out.loss * upstream
        if entropy_weight:
            total = total + entropy_weight * out.entropy.sum()
        total.backward()
        runs.append((out, (h.grad, w.grad, None if b is None else b.grad)))
    return runs


def assert_same(fused, generic, grad_rtol, what=""):
    """The same outputs, bitwise (both paths run the same GEMMs on the same chunks), and gradients to grad_rtol of the
    largest."""
    (a, grads_a), (c, grads_c) = fused, generic
    assert a.metrics.keys() == c.metrics.keys()
    for name, u, v in (("loss", a.loss, c.loss), ("log_probs", a.log_probs, c.log_probs),
                       *((k, a.metrics[k], c.metrics[k]) for k in a.metrics)):
        assert torch.equal(u, v), (what, name)
    assert torch.equal(a.counts, c.counts), what
    for name, u, v in zip(("hidden", "weight", "bias"), grads_a, grads_c):
        assert (u is None) == (v is None), (what, name)
        if v is not None:
            assert u.dtype == v.dtype and u.shape == v.shape, (what, name)
            torch.testing.assert_close(u.double(), v.double(), rtol=0, atol=grad_rtol * v.double().abs().max().item(),
                                       msg=lambda m: f"{what}: grad {name}\n{m}")


FAMILY_LEVELS = [(t, level) for t in ppo_ext.LOSS_TYPES for level in family_is_modes(t)]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type,level", FAMILY_LEVELS, ids=[f"{t}-{s}" for t, s in FAMILY_LEVELS])
@pytest.mark.parametrize("extra", ["plain", "rollout-token", "rollout-seq", "rollout-seq-mean", "kl-entropy"])
def test_grad_in_forward_every_loss(loss_type, level, agg, extra):
    """Every family, level, aggregation, rollout correction, KL and entropy bonus, float64: the gradients formed in
    the forward pass are the generic path's (to rounding), the loss, metrics and counts bitwise, over chunks that
    split rows (where the loss does not read its row; else grad_in_forward=True refuses them) and whole rows."""
    B, T, H, V = 4, 6, 8, 40
    hidden, weight, b, labels = make_head(B, T, H, V, seed=21, dtype=torch.float64)
    inp = make_inputs(B, T, seed=21, dtype=torch.float64)
    kw = family_options(loss_type, level, agg)
    g = torch.Generator().manual_seed(22)
    if extra.startswith("rollout"):
        kw.update(rollout_is=extra[len("rollout-"):], rollout_log_probs=inp.old + 0.2 * torch.randn(B, T, generator=g,
                                                                                                  dtype=torch.float64),
                  rollout_is_high=1.5)
    if extra == "kl-entropy":
        kw.update(ref_log_probs=inp.old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), kl_coef=0.05,
                  entropy_coef=0.02, return_entropy=True)
    rollout_is = kw.get("rollout_is", "none")
    for chunk_tokens in (4, 12):  # pieces of rows; two whole rows a chunk
        runs = run_both(hidden, weight, b, labels, inp.old, inp.adv, inp.mask, token_weights=inp.weights,
                        chunk_tokens=chunk_tokens, upstream=1.7, **kw)
        what = f"{loss_type} {level} {agg} {extra} chunk {chunk_tokens}"
        if isinstance(runs[1], ValueError):  # an option set the loss refuses: refused either way
            assert isinstance(runs[0], ValueError) and str(runs[0]) == str(runs[1]), what
            continue
        if chunk_tokens < T and reads_its_row(loss_type, level, rollout_is):
            assert isinstance(runs[0], ValueError) and "whole row" in str(runs[0]), what
            continue
        assert not isinstance(runs[0], ValueError), (what, runs[0])
        assert_same(*runs, grad_rtol=1e-12, what=what)  # the same chunks as the generic path: bitwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "flat"])
def test_grad_in_forward_dtypes_and_layouts(device, dtype, layout):
    """The gradients formed in the forward pass against the float64 reference and the generic path, at each dtype's
    tolerance: strided and flat hidden, bias, an upstream gradient != 1, the returned entropy in the caller's loss."""
    B, T, H, V = 3, 10, 16, 150
    full, weight, b, labels = make_head(B, T, H, V, seed=23, dtype=dtype, device=device, extra_t=1)
    hidden = {"contiguous": full[:, :-1].contiguous(), "strided": full[:, :-1],
              "flat": full[:, :-1].reshape(-1, H)}[layout]
    old, adv, mask, weights = loss_inputs(B, T, seed=23, device=device)
    kw = dict(options("token", "token-mean", dual=True, clamp=True), token_weights=weights, temperature=0.8,
              entropy_coef=0.03, return_entropy=True, chunk_tokens=2 * T)
    fused, generic = run_both(hidden, weight, b, labels, old, adv, mask, upstream=2.5, entropy_weight=0.1, **kw)
    assert_same(fused, generic, grad_rtol=GRAD_TOL[dtype], what=str(dtype))
    h64, w64, b64 = leaves(*(t.detach().double().cpu() for t in (hidden, weight, b)))
    ref_lp, ref_entropy = reference(h64, w64, b64, labels.cpu(), 0.8, dtype=dtype)
    f = lambda t: t.detach().double().cpu()  # noqa: E731
    kw.pop("chunk_tokens"), kw.pop("return_entropy"), kw.pop("temperature"), kw.pop("entropy_coef")
    kw["token_weights"] = f(weights)
    ref = policy_loss_reference(ref_lp.view(B, T), f(old), f(adv), mask.cpu(), **kw)
    ref_loss = ref.loss - 0.03 * reference_aggregate(ref_entropy.view(B, T), mask.cpu(), **kw)
    (2.5 * ref_loss + 0.1 * ref_entropy.sum()).backward()
    assert_grads(fused[1], (h64.grad, w64.grad, b64.grad), dtype, f"{dtype} {layout}")


def test_grad_in_forward_retain_graph_and_frozen_head(device):
    """A second backward through the same graph recomputes (the same gradients); a frozen head or hidden without
    grad: only the gradients asked for."""
    hidden, weight, b, labels = make_head(2, 8, 8, 30, seed=24, device=device)
    old, adv, mask, _ = loss_inputs(2, 8, seed=24, device=device)
    h, w, bb = leaves(hidden, weight, b)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, chunk_tokens=3, entropy_coef=0.1,
                                          grad_in_forward=True)
    first = torch.autograd.grad(out.loss, (h, w, bb), retain_graph=True)
    second = torch.autograd.grad(out.loss * 3, (h, w, bb))
    for u, v in zip(first, second):
        torch.testing.assert_close(3 * u, v, rtol=1e-5, atol=1e-7)
    for requires_grad in ((True, False, False), (False, True, True), (False, True, False)):
        fused, generic = run_both(hidden, weight, b, labels, old, adv, mask, chunk_tokens=3,
                                  requires_grad=requires_grad)
        assert_same(fused, generic, grad_rtol=1e-6)
        assert [g is not None for g in fused[1]] == list(requires_grad)


def test_grad_in_forward_when_it_applies(device):
    """None: the forward forms the gradients where it applies (allocating nothing of the logits' size), else the
    generic path; True: a ValueError saying why; no-grad: no gradient work."""
    from torch.profiler import ProfilerActivity, profile

    B, T, H, V = 2, 16, 8, 2000
    hidden, weight, b, labels = make_head(B, T, H, V, seed=25, device=device)
    old, adv, mask, _ = loss_inputs(B, T, seed=25, device=device)
    h, w, bb = leaves(hidden, weight, b)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, chunk_tokens=8)
        out.loss.backward()
    assert type(out.loss.grad_fn).__name__ == "_GradInForwardBackward"
    largest, logits = max(e.cpu_memory_usage for e in prof.events()), B * T * V * 4
    if device == "cpu":
        assert largest < logits / 3, (largest, logits)  # the chunk's buffer (and what an op allocates within)
    with torch.no_grad():
        out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=8)
    assert out.loss.grad_fn is None
    cases = [(dict(importance_sampling="seq"), "reads its whole row"),
             (dict(importance_sampling="seq-token", loss_agg_mode="seq-mean-token-mean"), "reads its whole row")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=8, grad_in_forward=True, **kw)
        out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=8, **kw)
        assert type(out.loss.grad_fn).__name__ != "_GradInForwardBackward"
        out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=16, grad_in_forward=True,
                                              **kw)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=8, grad_in_forward=True,
                                          loss_agg_mode="seq-mean-token-mean")  # pieces of rows
    with torch.no_grad(), pytest.raises(ValueError, match="no gradient is asked for"):
        ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, grad_in_forward=True)


def test_default_chunk_tokens():
    """The default chunk (README, docs/SPEC.md): a (chunk, V) buffer of about 64 MiB within 256 to 384 rows."""
    for V, dtype, rows in ((32000, torch.bfloat16, 384), (151936, torch.bfloat16, 256), (100000, torch.float32, 256),
                           (60000, torch.bfloat16, 384), (100, torch.float64, 384)):
        assert min(384, max(256, (64 << 20) // (V * dtype.itemsize))) == rows
        assert torch.ops.ppo_ext.hidden_default_chunk_tokens(V, dtype.itemsize) == rows
        assert default_chunk_tokens(V, dtype) == rows


def test_logits_buffer_rows_aligned(monkeypatch):
    """The chunk buffer's rows start 16-byte aligned whatever V (csrc/checks.h logits_row_stride: V rounded up to
    16 bytes), so that the kernels take their vector path on every row: rows V apart left 7 in 8 of a 16-bit buffer
    misaligned at V = 50257. The rule, and the logits that policy_loss_from_hidden's grad_in_forward hands to the
    from-logits kernel (recorded), at V = 301."""
    for cols, size, stride in ((50257, 2, 50264), (50257, 4, 50260), (50257, 8, 50258), (32000, 2, 32000),
                               (301, 2, 304), (1, 2, 8), (64, 4, 64)):
        assert torch.ops.ppo_ext.hidden_logits_row_stride(cols, size) == stride
    seen = []
    kernel = torch.ops.ppo_ext.token_log_probs

    def recording(logits, *args):
        seen.append((logits.shape, logits.stride(), logits.data_ptr() % 16))
        return kernel(logits, *args)

    monkeypatch.setattr(torch.ops.ppo_ext, "token_log_probs", recording)
    for dtype in (torch.bfloat16, torch.float32):
        hidden, weight, b, labels = make_head(2, 5, 16, 301, seed=30, dtype=dtype)
        old, adv, mask, _ = loss_inputs(2, 5, seed=30, device="cpu")
        h, w = leaves(hidden, weight)
        seen.clear()
        ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, chunk_tokens=4, grad_in_forward=True)
        step = 16 // dtype.itemsize
        assert [shape[1] for shape, _, _ in seen] == [301] * 3, seen
        assert all(stride == (-(-301 // step) * step, 1) and address == 0 for _, stride, address in seen), seen


@pytest.mark.parametrize("adv_shape", ["BT", "B1", "B"])
def test_grad_in_forward_optional_inputs_and_normalisers(adv_shape):
    """No mask, no old log-probs (on-policy), advantages (B, T) / (B, 1) / (B,), the global normalisers (a tensor, a
    number): the gradients formed in the forward pass are the generic path's."""
    B, T, H, V = 3, 8, 8, 50
    hidden, weight, b, labels = make_head(B, T, H, V, seed=27, dtype=torch.float64)
    inp = make_inputs(B, T, seed=27, dtype=torch.float64, adv_shape=adv_shape)
    for agg, extra in (("token-mean", dict(num_tokens=torch.tensor(40.0, dtype=torch.float64))),
                       ("seq-mean-token-sum-norm", dict(num_seqs=5, loss_scale_factor=torch.tensor(16.0))),
                       ("token-sum", {})):
        for old, mask in ((inp.old, None), (None, inp.mask)):
            fused, generic = run_both(hidden, weight, b, labels, old, inp.adv, mask, chunk_tokens=3, upstream=0.7,
                                      entropy_coef=0.05, loss_agg_mode=agg, **extra)
            assert_same(fused, generic, grad_rtol=1e-12, what=f"{adv_shape} {agg} {old is None}")


def test_grad_in_forward_not_for_float16(device):
    """float16 (also under autocast): the recomputing path, whose logits' gradient has the upstream gradient (a loss
    scaler's factor) in it; grad_in_forward=True says why not. Its gradients under a loss scaler (2^16) with a large
    normaliser: no underflow."""
    hidden, weight, b, labels = make_head(2, 8, 8, 50, seed=28, dtype=torch.float16, device=device)
    old, adv, mask, _ = loss_inputs(2, 8, seed=28, device=device)
    h, w, bb = leaves(hidden, weight, b)
    out = ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, chunk_tokens=5, num_tokens=1e8)
    assert type(out.loss.grad_fn).__name__ != "_GradInForwardBackward"
    (out.loss * 65536.0).backward()
    assert all(torch.count_nonzero(g) > 0 for g in (h.grad, w.grad, bb.grad))
    with pytest.raises(ValueError, match="float16"):
        ppo_ext.policy_loss_from_hidden(h, w, labels, old, adv, mask, bias=bb, grad_in_forward=True)
    if device == "cpu":
        h32, w32 = leaves(hidden.float(), weight.float())
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="float16"):
            ppo_ext.policy_loss_from_hidden(h32, w32, labels, old, adv, mask, grad_in_forward=True)


def test_grad_in_forward_argument_errors(device):
    """Bad arguments get the generic path's errors (the argument named), whatever grad_in_forward says."""
    hidden, weight, b, labels = make_head(2, 6, 8, 30, seed=29, device=device)
    old, adv, mask, _ = loss_inputs(2, 6, seed=29, device=device)
    h = hidden.clone().requires_grad_(True)
    cases = [dict(advantages=None), dict(token_weights=[1.0]), dict(labels=labels[:, :5]), dict(weight=weight[:, :4]),
             dict(weight=weight.double()), dict(bias=b.double()), dict(labels=labels.int()), dict(mask=mask[:, :3])]
    for change in cases:
        raised = []
        for grad_in_forward in (False, None, True):
            kw = dict(hidden=h, weight=weight, labels=labels, old_log_probs=old, advantages=adv, mask=mask, bias=b,
                      grad_in_forward=grad_in_forward)
            kw.update(change)
            with pytest.raises((TypeError, ValueError)) as info:
                ppo_ext.policy_loss_from_hidden(**kw)
            raised.append((type(info.value), str(info.value)))
        assert raised[0] == raised[1] == raised[2], (change, raised)
    with pytest.raises(TypeError, match="grad_in_forward must be True, False or None"):
        ppo_ext.policy_loss_from_hidden(h, weight, labels, old, adv, mask, grad_in_forward=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_in_forward_bitwise(device, dtype):
    """Under an upstream gradient of 1, token-level options and no entropy bonus, the gradients formed in the forward
    pass are bitwise the recomputing path's (1 / denominator is in the per-token gradients before the GEMMs)."""
    hidden, weight, b, labels = make_head(3, 7, 16, 90, seed=30, dtype=dtype, device=device)
    old, adv, mask, weights = loss_inputs(3, 7, seed=30, device=device)
    fused, generic = run_both(hidden, weight, b, labels, old, adv, mask, chunk_tokens=5, token_weights=weights,
                              **options("token", "token-mean", dual=True, clamp=True))
    for name, u, v in zip(("hidden", "weight", "bias"), fused[1], generic[1]):
        assert torch.equal(u, v), name
