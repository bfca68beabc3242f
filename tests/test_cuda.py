"""CUDA-only properties: agreement with the CPU kernels, determinism, no host synchronisation, CUDA
graphs, launch count, streams, grids beyond 65,535 rows. The device-generic suite (the other test
files) runs on CUDA too, through the `device` parametrisation."""

import itertools

import pytest
import torch

import ppo_ext
from helpers import AGG_MODES, IS_MODES, make_inputs, run_ext

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ppo_ext.built_with_cuda()),
    reason="needs a GPU and ppo_ext built with its CUDA kernels (CI has neither; run on a lent GPU)",
)


def _inputs(B, T, device, dtype=torch.float32, seed=0, adv_shape="BT", weights=False):
    """log_probs ~ -U(0, 5) in `dtype`; log ratios N(0, 0.3), no per-row offset, not moved off the clip
    boundaries; advantages N(0, 1); mask of density 0.8, row 1 empty; weights U(0.5, 1.5); the constants float32."""
    return make_inputs(B, T, seed=seed, device=device, dtype=dtype, old_dtype=torch.float32, adv_shape=adv_shape,
                       weights=weights, row_offset=0.0, row_jitter=0.0, weight_range=(0.5, 1.5), margin=None)


@pytest.mark.parametrize("importance_sampling,loss_agg_mode", list(itertools.product(IS_MODES, AGG_MODES)))
@pytest.mark.parametrize("dual_clip,log_ratio_clamp,weights,adv_shape", [
    (None, None, False, "BT"), (3.0, 0.5, True, "B"), (2.0, None, False, "B1")])
def test_cuda_matches_cpu(importance_sampling, loss_agg_mode, dual_clip, log_ratio_clamp, weights, adv_shape):
    opts = dict(importance_sampling=importance_sampling, loss_agg_mode=loss_agg_mode, dual_clip=dual_clip,
                log_ratio_clamp=log_ratio_clamp, clip_high=0.28)
    cpu = _inputs(7, 1000, "cpu", adv_shape=adv_shape, weights=weights)
    out_c, grad_c = run_ext(cpu, **opts)
    out_g, grad_g = run_ext(cpu.to("cuda"), **opts)
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=2e-5, atol=1e-7)
    assert torch.equal(out_g.counts.cpu(), out_c.counts)
    for k in ppo_ext.METRIC_NAMES:
        torch.testing.assert_close(out_g.metrics[k].cpu(), out_c.metrics[k], rtol=2e-5, atol=1e-6, msg=k)
        assert out_g.metrics[k].device.type == "cuda" and out_g.metrics[k].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("importance_sampling", IS_MODES)
def test_cuda_bitwise_deterministic(dtype, importance_sampling):
    inputs = _inputs(300, 777, "cuda", dtype=dtype)
    out1, grad1 = run_ext(inputs, importance_sampling=importance_sampling, dual_clip=3.0)
    out2, grad2 = run_ext(inputs, importance_sampling=importance_sampling, dual_clip=3.0)
    assert torch.equal(out1.loss, out2.loss) and torch.equal(grad1, grad2) and torch.equal(out1.counts, out2.counts)
    assert grad1.dtype == dtype
    for k in ppo_ext.METRIC_NAMES:
        assert torch.equal(out1.metrics[k], out2.metrics[k]), k


def test_no_host_synchronisation():
    inp = _inputs(64, 512, "cuda")
    lp, old, adv, mask = inp.lp.requires_grad_(True), inp.old, inp.adv, inp.mask
    num_tokens = mask.sum().float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kwargs in ({}, {"num_tokens": num_tokens}, {"num_tokens": 1234.0}, {"loss_agg_mode": "seq-mean-token-mean"}):
            out = ppo_ext.policy_loss(lp, old, adv, mask, dual_clip=3.0, **kwargs)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(lp.grad).all()


def test_launch_count():
    inp = _inputs(32, 1024, "cuda")
    lp, old, adv, mask = inp.lp.requires_grad_(True), inp.old, inp.adv, inp.mask
    one = torch.ones((), device="cuda")  # made here: .backward() would launch a fill kernel for it

    def step():
        return torch.autograd.grad(ppo_ext.policy_loss(lp, old, adv, mask).loss, lp, one)

    for _ in range(2):  # warm up
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e.name for e in events if "memset" not in e.name.lower()]
    memsets = [e.name for e in events if "memset" in e.name.lower()]
    # One kernel forward (after a 4-byte memset of its block counter), one backward.
    assert len(kernels) == 2 and len(memsets) <= 1, sorted(e.name for e in events)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_cuda(mode):
    inp = _inputs(16, 300, "cuda")
    lp, old, adv, mask = inp.lp, inp.old, inp.adv, inp.mask

    def step(lp):
        out = ppo_ext.policy_loss(lp, old, adv, mask, dual_clip=3.0, num_tokens=100.0)
        return out.loss, out.counts

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for _ in range(3):  # CUDA graphs record on a later call
        x = lp.detach().clone().requires_grad_(True)
        loss_c, counts_c = compiled(x)
        loss_c.backward()
    y = lp.detach().clone().requires_grad_(True)
    loss_e, counts_e = step(y)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(x.grad, y.grad)
    assert torch.equal(counts_c, counts_e)


def test_side_stream_and_second_device_guard():
    inp = _inputs(8, 257, "cuda")
    lp, old, adv, mask = inp.lp, inp.old, inp.adv, inp.mask
    expected = ppo_ext.policy_loss(lp, old, adv, mask).loss
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ppo_ext.policy_loss(lp, old, adv, mask).loss
    s.synchronize()
    assert torch.equal(got, expected)


def test_grid_beyond_65535_rows():
    B = 70_000
    inp = _inputs(B, 3, "cuda", adv_shape="B")
    out_g, grad_g = run_ext(inp, importance_sampling="seq")
    out_c, grad_c = run_ext(inp.to("cpu"), importance_sampling="seq")
    assert torch.equal(out_g.counts.cpu(), out_c.counts)
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=2e-5, atol=1e-8)
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=2e-5, atol=1e-7)


def test_normaliser_tensor_on_device_and_zero():
    inp = _inputs(4, 50, "cuda")
    lp = inp.lp.requires_grad_(True)
    out = ppo_ext.policy_loss(lp, inp.old, inp.adv, inp.mask, num_tokens=torch.zeros((), device="cuda"))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(lp.grad).item() == 0
