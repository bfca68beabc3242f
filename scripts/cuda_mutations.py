"""Shows that the simulated CUDA tests can fail: applies each mutation below to a copy of csrc/ (one kernel
bug each), builds the CUDA simulator from the copy and runs tests/test_cuda_simulated.py, which must fail.

    .venv/bin/python scripts/cuda_mutations.py [NAME ...]     # all mutations, or those named

Exit status 0 when every mutation is caught; prints, for each, the first test that failed. About a minute a
mutation on 2 cores (the build dominates).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file under csrc/, the exact text, its replacement, what the bug is)
MUTATIONS = {
    "barrier_removed_block_sum": (
        "cuda/policy_loss_kernels.cuh",
        "  __syncthreads();  // scratch may still be read by a previous call\n",
        "",
        "block_sum's first __syncthreads removed: a warp's partial overwrites the previous total before every thread read it",
    ),
    "barrier_removed_block_stats": (
        "cuda/log_probs_kernels.cuh",
        "  if (lane == 0) scratch[warp] = s;\n  __syncthreads();\n",
        "  if (lane == 0) scratch[warp] = s;\n",
        "block_stats' __syncthreads after the warp results are written removed",
    ),
    "shuffle_in_divergent_branch": (
        "cuda/policy_loss_kernels.cuh",
        "  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);\n",
        "  for (int offset = 16; offset > 0; offset /= 2) {\n"
        "    if (threadIdx.x % 32 < 16) v += __shfl_down_sync(0xffffffffu, v, offset);\n  }\n",
        "block_sum's warp shuffle moved into a branch half the warp takes",
    ),
    "ticket_off_by_one": (
        "cuda/policy_loss_kernels.cuh",
        "const bool last = atomicAdd(a.blocks_done, 1u) == gridDim.x - 1;",
        "const bool last = atomicAdd(a.blocks_done, 1u) == gridDim.x - 2;",
        "the last-block ticket compared off by one: the finalize runs early, or never",
    ),
    "grid_stride_step": (
        "cuda/policy_loss_kernels.cuh",
        "for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x) {",
        "for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x + 1) {",
        "the forward's grid-stride step one too large: rows beyond the grid are skipped",
    ),
    "shuffle_mask_narrowed": (
        "cuda/log_probs_kernels.cuh",
        "const softmax::Stats<acc_t> other{__shfl_down_sync(0xffffffffu, s.max, offset),",
        "const softmax::Stats<acc_t> other{__shfl_down_sync(0x0000ffffu, s.max, offset),",
        "block_stats' shuffle of the max with a mask of half the warp",
    ),
    "vector_tail_off_by_one": (
        "cuda/log_probs_kernels.cuh",
        "const int64_t v_vec = aligned16(x) ? V / P::kSize * P::kSize : 0;",
        "const int64_t v_vec = aligned16(x) ? (V + P::kSize - 1) / P::kSize * P::kSize : 0;",
        "the forward's 16-byte loads run one pack past the row when V is not a multiple of the pack",
    ),
    "seq_direct_term_overwritten": (
        "cuda/policy_loss_kernels.cuh",
        "grad_row[t] += term_derivative ? coefficient * seq_term<acc_t>(a, i, t).derivative : coefficient;",
        "grad_row[t] = term_derivative ? coefficient * seq_term<acc_t>(a, i, t).derivative : coefficient;",
        "the \"seq\" pass 3 overwrites the direct term of pass 2 (cispo's gradient at the sequence level lost)",
    ),
    "ratio_gradient_always": (
        "cuda/policy_loss_kernels.cuh",
        "grad_row[t] = ratio_grad ? agg_weight * dloss_dratio * dratio + direct : direct;",
        "grad_row[t] = agg_weight * dloss_dratio * dratio + direct;",
        "a direct-gradient family multiplied by d ratio / d lp: 0 * inf = NaN where the ratio overflows",
    ),
    "vespo_rollout_weights_the_loss": (
        "cuda/policy_loss_kernels.cuh",
        "if (weighting) weight *= rw.weight;",
        "weight *= rw.weight;",
        "vespo's rollout weight multiplies the loss too (it belongs in the row's log-weight only)",
    ),
    "ref_kl_sum_weighted": (
        "cuda/policy_loss_kernels.cuh",
        "ref_kl_agg += agg_weight * kl.value;",
        "ref_kl_agg += agg_weight * weight * kl.value;",
        "the KL to the reference weighted by the token weights (verl and TRL add it unweighted)",
    ),
    "zero_row_alignment_ignored": (
        "cuda/log_probs_kernels.cuh",
        "const int64_t v_vec = out_aligned ? V / P::kSize * P::kSize : 0;",
        "const int64_t v_vec = V / P::kSize * P::kSize;",
        "a masked row's zeros stored 16 bytes at a time whatever the row's alignment (a fault on the GPU)",
    ),
    "entropy_row_skipped": (
        "cuda/log_probs_kernels.cuh",
        "if (g == acc_t(0) && g_entropy == acc_t(0)) {",
        "if (g == acc_t(0)) {",
        "a row whose log-prob has no upstream gradient written as zeros though its entropy has one",
    ),
}


def run(name, python):
    path, old, new, what = MUTATIONS[name]
    work = tempfile.mkdtemp(prefix=f"ppo_ext_mutation_{name}_")
    try:
        csrc = os.path.join(work, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        target = os.path.join(csrc, path)
        text = open(target).read()
        if text.count(old) != 1:
            return False, f"the text to mutate occurs {text.count(old)} times in csrc/{path} (expected once)"
        open(target, "w").write(text.replace(old, new))
        env = dict(os.environ, PPO_EXT_SIM_CSRC=csrc, PPO_EXT_SIM_BUILD_DIR=os.path.join(work, "build"))
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_cuda_simulated.py"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return False, "NOT CAUGHT: the simulated tests pass with the bug"
        if "error: " in out and "FAILED" not in out and "ERROR" not in out:
            return False, "the mutated copy does not build:\n" + out[-2000:]
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", out, re.M)
        if not failed:
            return False, "pytest failed without a failing test:\n" + out[-2000:]
        errors = re.findall(r"^E +(\S.*)$", out, re.M)
        return True, f"caught by {failed[0][0]}: {(errors[0] if errors else failed[0][1] or '')[:200]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv):
    names = argv or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        sys.exit(f"unknown mutation(s) {unknown}; known: {list(MUTATIONS)}")
    python = sys.executable
    # The tests import ppo_ext (its float64 reference): an in-place build for another torch fails every run
    # with an ImportError that would read as "mutation missed".
    probe = subprocess.run([python, "-c", "import ppo_ext"], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"MUTATIONS: cannot start: `import ppo_ext` fails with {python} (build ppo_ext for this "
                 f"interpreter's torch first, e.g. ./scripts/test.sh):\n{probe.stderr[-1500:]}")
    all_caught = True
    for name in names:
        start = time.time()
        caught, detail = run(name, python)
        all_caught &= caught
        print(f"{'caught' if caught else 'MISSED'}  {name} ({time.time() - start:.0f} s): {MUTATIONS[name][3]}\n"
              f"        {detail}", flush=True)
    print("MUTATIONS: every mutation caught" if all_caught else "MUTATIONS: FAIL (a mutation was not caught)")
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
