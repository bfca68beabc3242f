#!/usr/bin/env bash
# The main job from a fresh machine: sets up .venv (torch, the build), then runs every benchmark in turn
# (benchmarks/bench_*.py: the policy loss first, then the others by name), each of which checks that ppo_ext,
# eager PyTorch and torch.compile compute the same numbers before it times them.
# Extra arguments go to each benchmark: the options they share (--quick, --device, --threads, --out-dir).
# Exit status: that of the first benchmark that failed (2: a contender does not match the reference), else 0.
source "$(dirname "$0")/setup_env.sh"
benchmarks=(benchmarks/bench_policy_loss.py)
for bench in benchmarks/bench_*.py; do
  [ "$bench" = benchmarks/bench_policy_loss.py ] || benchmarks+=("$bench")
done
status=0
for bench in "${benchmarks[@]}"; do
  rc=0
  "$PY" "$bench" "$@" || rc=$?
  if [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
