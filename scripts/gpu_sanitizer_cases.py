"""Every CUDA kernel of ppo_ext, launched once or twice on small inputs and checked against the CPU op: the
workload that scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).
Small enough to finish in seconds under each tool; covers the aligned and unaligned (odd V, sliced rows)
paths, the grid-stride loops (more rows than blocks), every importance-sampling level, loss families of each
kind with the rollout correction at each of its levels, the KL to a reference policy, entropy on and off,
the in-place backward, the entropy's gradient and rows with zero upstream gradient, and the hidden-state log-probs
(chunks of rows, blocks of the vocabulary). Exit status 1 on a mismatch."""

import sys

import torch

import ppo_ext


def close(a, b, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}\n{m}")


def policy_loss_cases():
    g = torch.Generator().manual_seed(0)
    B, T = 700, 37  # more rows than 4 blocks per multiprocessor on an H100 (528): the grid-stride loop runs
    lp = -3 * torch.rand(B, T, generator=g)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[3] = False
    rollout = old + 0.1 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    # every importance-sampling level, then a loss family of each kind (direct gradient, sequence-level term,
    # the value loss) with the rollout correction at each of its levels
    cases = [dict(importance_sampling=level, dual_clip=3.0) for level in ("token", "seq", "seq-token")]
    cases += [dict(loss_type="cispo", importance_sampling="seq", rollout_is="seq", rollout_is_high=2.0),
              dict(loss_type="geo_mean", importance_sampling="seq", rollout_is="token", rollout_is_mode="mask",
                   rollout_is_low=0.8, rollout_is_high=1.25),
              dict(loss_type="dppo_kl", ratio_cap=2.0, rollout_is="seq-mean", rollout_is_mode="mask",
                   rollout_is_mask_weight="token", rollout_is_low=0.9, rollout_is_high=1.1),
              dict(loss_type="vespo", rollout_is="token", rollout_is_high=1.5),
              dict(loss_type="value", clip_low=0.1),
              # the KL to the reference: direct gradient, and through the sequence ratio (pass 3)
              dict(kl_coef=0.1, kl_estimator="k3+"),
              dict(loss_type="sapo", importance_sampling="seq", kl_coef=0.1, kl_estimator="k3", kl_bias_correction=True)]
    for options in cases:
        for dtype in (torch.float32, torch.bfloat16):
            outs = []
            for device in ("cpu", "cuda"):
                x = lp.to(device, dtype).detach().clone().requires_grad_(True)  # a fresh leaf per run
                correction = {"rollout_log_probs": rollout.to(device)} if "rollout_is" in options else {}
                if "kl_coef" in options:
                    correction["ref_log_probs"] = ref.to(device)
                out = ppo_ext.policy_loss(x, old.to(device), adv.to(device), mask.to(device),
                                          loss_agg_mode="seq-mean-token-mean",
                                          num_tokens=torch.tensor(float(mask.sum()), device=device), **correction,
                                          **options)
                out.loss.backward()
                outs.append((out.loss, out.counts, x.grad))
            what = f"policy_loss {options} {dtype}"
            close(outs[1][0], outs[0][0], what)
            assert torch.equal(outs[1][1].cpu(), outs[0][1]), what
            close(outs[1][2].float(), outs[0][2].float(), what, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def log_probs_cases():
    g = torch.Generator().manual_seed(1)
    for V, dtype, sliced in ((32000, torch.bfloat16, False), (1031, torch.float16, True), (7, torch.float32, False),
                             (4096, torch.float64, True)):
        full = (3 * torch.randn(3, 6, V, generator=g)).to(dtype)
        labels = torch.randint(0, V, (3, 5), generator=g)
        grad = torch.randn(3, 5, generator=g)
        grad[0] = 0  # rows the backward writes as zeros without reading them
        results = []
        for device in ("cpu", "cuda"):
            logits = full.to(device)
            logits = logits[:, :-1] if sliced else logits[:, 1:].contiguous()
            x = logits.clone().requires_grad_(True)
            lp, entropy = ppo_ext.log_probs_from_logits(x, labels.to(device), temperature=0.7, return_entropy=True)
            (lp * grad.to(device, lp.dtype)).sum().backward()
            y = logits.clone().requires_grad_(True)
            lp2, entropy2 = ppo_ext.log_probs_from_logits(y, labels.to(device), inplace_backward=True,
                                                          return_entropy=True)
            # with the entropy's gradient (an entropy bonus), in place; row 0 then has an entropy gradient only
            ((lp2 * grad.to(device, lp2.dtype)).sum() - 0.1 * entropy2.sum()).backward()
            results.append((lp, entropy, x.grad, lp2, y.grad))
        for name, c, d in zip(("log_probs", "entropy", "grad", "log_probs T=1", "grad in place, entropy bonus"),
                              *results):
            tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) and "grad" in name else 1e-4
            close(d.float(), c.float(), f"token_log_probs V={V} {dtype} {name}", rtol=tol, atol=1e-4)


def hidden_cases():
    """hidden_log_probs: the chunked GEMMs and the log-probs kernels on chunks of rows and, for a bf16 head, the
    backward on blocks of the vocabulary's columns (labels outside the block: no onehot term, no read there); and
    policy_loss_from_hidden's gradients formed in the forward pass."""
    g = torch.Generator().manual_seed(2)
    for dtype, V in ((torch.bfloat16, 1000), (torch.float32, 333)):
        hidden = torch.randn(2, 301, 64, generator=g).to(dtype)
        weight = (0.3 * torch.randn(V, 64, generator=g)).to(dtype)
        bias = torch.randn(V, generator=g).to(dtype)
        labels = torch.randint(0, V, (2, 300), generator=g)
        grad = torch.randn(2, 300, generator=g)
        grad[1, :50] = 0
        results = []
        for device in ("cpu", "cuda"):
            h, w, b = (t.to(device).requires_grad_(True) for t in (hidden, weight, bias))
            lp, entropy = ppo_ext.log_probs_from_hidden(h[:, :-1], w, labels.to(device), bias=b, return_entropy=True,
                                                        chunk_tokens=64)
            ((lp * grad.to(device)).sum() + 0.1 * entropy.sum()).backward()
            results.append((lp, entropy, h.grad, w.grad, b.grad))
        for name, c, d in zip(("log_probs", "entropy", "grad_hidden", "grad_weight", "grad_bias"), *results):
            tol = 2e-2 if dtype == torch.bfloat16 and name.startswith("grad") else 1e-4
            close(d.float(), c.float(), f"hidden_log_probs {dtype} {name}", rtol=tol, atol=tol)
        # policy_loss_from_hidden with its gradients formed in the forward pass (pieces of rows)
        old, adv, mask = -3 + grad.abs(), grad.flip(1), grad != 0
        results = []
        for device in ("cpu", "cuda"):
            h, w, b = (t.to(device).requires_grad_(True) for t in (hidden, weight, bias))
            out = ppo_ext.policy_loss_from_hidden(h[:, :-1], w, labels.to(device), old.to(device), adv.to(device),
                                                  mask.to(device), bias=b, entropy_coef=0.01, chunk_tokens=64,
                                                  grad_in_forward=True)
            (3 * out.loss).backward()
            results.append((out.loss, out.log_probs, h.grad, w.grad, b.grad))
        for name, c, d in zip(("loss", "log_probs", "grad_hidden", "grad_weight", "grad_bias"), *results):
            tol = 2e-2 if dtype == torch.bfloat16 and name.startswith("grad") else 1e-4
            close(d.float(), c.float(), f"policy_loss_from_hidden {dtype} {name}", rtol=tol, atol=tol)


if __name__ == "__main__":
    assert torch.cuda.is_available() and ppo_ext.built_with_cuda(), "needs a GPU and ppo_ext built with CUDA"
    policy_loss_cases()
    log_probs_cases()
    hidden_cases()
    torch.cuda.synchronize()
    print("gpu_sanitizer_cases: every CUDA kernel ran and matched the CPU")
    sys.exit(0)
