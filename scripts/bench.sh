#!/usr/bin/env bash
# The main job from a fresh machine: sets up .venv (torch, the build), then benchmarks ppo_ext against
# eager PyTorch and torch.compile after checking that all of them compute the same numbers.
# Extra arguments go to the benchmark (e.g. --quick).
source "$(dirname "$0")/setup_env.sh"
"$PY" benchmarks/bench_policy_loss.py "$@"
