#!/usr/bin/env bash
# The GPU run, in one command, for a lent H100/H200 machine (its own Python with torch 2.11+cu130, pytest,
# hypothesis, matplotlib; no network; compute-sanitizer installed):
#
#   scripts/gpu_check.sh OUTDIR
#
# 1. builds ppo_ext in place for that GPU (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16),
# 2. runs the CUDA tests (tests/test_cuda.py, then every test's CUDA parametrisation),
# 3. runs compute-sanitizer memcheck, racecheck, synccheck and initcheck over scripts/gpu_sanitizer_cases.py,
# 4. runs the benchmarks' GPU quick runs (results into OUTDIR),
# then the rest of the suite if time is left. The frameworks the adapter tests and the benchmarks' baselines
# run (scripts/frameworks.txt, Liger-Kernel for bench_hidden's `liger` among them) cannot be downloaded there:
# carry their wheels as .wheels/ (5 MB: `carry: [".wheels"]`), made here with
#   pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
#     -d .wheels $(cat scripts/frameworks.txt)
# and they are installed without dependencies into build/frameworks (without them those tests and Liger skip).
# Every log and result goes into OUTDIR, with summary.txt
# (step, exit status, seconds) and env.txt (GPU, driver, versions). The whole run stays within
# PPO_EXT_GPU_BUDGET_S seconds (default 540): each step gets what is left, and a step that would overrun is
# stopped (status 124) and the script goes on to write what it has. Exit status: 0 when every step passed.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
BUDGET="${PPO_EXT_GPU_BUDGET_S:-540}"
START=$SECONDS
FAILED=0
: >"$OUT/summary.txt"

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME RESERVE_S CMD...: runs CMD with what is left of the budget minus RESERVE_S (kept for later steps).
step() {
  local name="$1" reserve="$2"
  shift 2
  local limit=$(($(left) - reserve))
  if [ "$limit" -lt 10 ]; then
    echo "$name skipped (no time left)" | tee -a "$OUT/summary.txt"
    return
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && FAILED=1
  printf '%-28s rc=%-4s %4d s\n' "$name" "$rc" $((SECONDS - t0)) | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1
  compute-sanitizer --version 2>&1 | tail -1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
  git -C "$ROOT" status --short 2>/dev/null | head -20
} >"$OUT/env.txt"
cat "$OUT/env.txt"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PPO_EXT_BUILD_CUDA=1
step build 300 "$PY" setup.py build_ext --inplace
if ! "$PY" -c "import ppo_ext, sys; sys.exit(not ppo_ext.built_with_cuda())" >>"$OUT/build.log" 2>&1; then
  echo "the build failed: see $OUT/build.log" | tee -a "$OUT/summary.txt"
  exit 1
fi

if ls "$ROOT"/.wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index --target "$ROOT/build/frameworks" "$ROOT"/.wheels/*.whl \
    >"$OUT/frameworks.log" 2>&1 || echo "installing .wheels failed: see $OUT/frameworks.log" | tee -a "$OUT/summary.txt"
fi
export PYTHONPATH="$ROOT:$ROOT/build/frameworks${PYTHONPATH:+:$PYTHONPATH}"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra")
step test_cuda 270 "${PYTEST[@]}" tests/test_cuda.py --junitxml="$OUT/test_cuda.xml"
step suite_on_cuda 200 "${PYTEST[@]}" tests -k cuda --ignore=tests/test_cuda.py --ignore=tests/test_cuda_simulated.py \
  --junitxml="$OUT/suite_on_cuda.xml"
reserve=150
for tool in memcheck racecheck synccheck initcheck; do
  step "sanitizer_$tool" $reserve compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    "$PY" scripts/gpu_sanitizer_cases.py
  reserve=$((reserve - 30))
done
step bench_policy_loss 30 "$PY" benchmarks/bench_policy_loss.py --quick --device cuda --out-dir "$OUT"
step bench_logits 20 "$PY" benchmarks/bench_logits.py --quick --device cuda --out-dir "$OUT"
step bench_hidden 0 "$PY" benchmarks/bench_hidden.py --quick --device cuda --out-dir "$OUT"
step suite_rest 0 "${PYTEST[@]}" tests -k "not cuda" -x --junitxml="$OUT/suite_rest.xml"

echo "== gpu_check: $((SECONDS - START)) s of $BUDGET; $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'a step FAILED')" \
  | tee -a "$OUT/summary.txt"
exit $FAILED
