#!/usr/bin/env bash
# Builds csrc/ with CMake against the torch of .venv (made by setup_env.sh) and checks that the
# library loads with torch.ops.load_library and computes the loss with the schema's defaults, and that a
# C++ program linked with it (examples/cpp/policy_loss.cpp, through include/ppo_ext/ppo_ext.h) computes
# the loss, its gradient and log-probs from logits as ATen's ops do.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PPO_EXT_VENV:-$ROOT/.venv}/bin/python"
BUILD="$ROOT/build/cmake"
mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DPython3_EXECUTABLE="$PY" -DPPO_EXT_BUILD_EXAMPLES=ON > "$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}" >> "$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
test -f "$BUILD/compile_commands.json"
"$PY" - "$BUILD/libppo_ext_ops.so" <<'PYEOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
lp = torch.randn(4, 9, dtype=torch.float64)
old = lp + 0.3 * torch.randn_like(lp)
adv = torch.randn(4, dtype=torch.float64)
outs = torch.ops.ppo_ext.policy_loss(lp, old, adv)  # every option at the schema's default
ratio = (lp - old).exp()
expected = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2)).mean()
torch.testing.assert_close(outs[0], expected)
print(f"== CMake build: {sys.argv[1]} loads and computes the loss ({outs[0].item():.6f} == {expected.item():.6f})")
PYEOF
"$BUILD/ppo_ext_cpp_example"
