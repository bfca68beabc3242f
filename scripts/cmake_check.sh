#!/usr/bin/env bash
# Builds csrc/ with CMake against the torch of .venv (made by setup_env.sh) and checks that the
# library loads with torch.ops.load_library and computes the same loss as the Python build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PPO_EXT_VENV:-$ROOT/.venv}/bin/python"
BUILD="$ROOT/build/cmake"
mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DPython3_EXECUTABLE="$PY" > "$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}" >> "$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }
test -f "$BUILD/compile_commands.json"
"$PY" - "$BUILD/libppo_ext_ops.so" <<'PYEOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
lp = torch.randn(4, 9, dtype=torch.float64)
old = lp + 0.3 * torch.randn_like(lp)
adv = torch.randn(4, dtype=torch.float64)
outs = torch.ops.ppo_ext.policy_loss(lp, old, adv, None, None, None, None, None, None, None, None,
                                     0.2, 0.2, None, None, "token", "token-mean", True)
ratio = (lp - old).exp()
expected = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2)).mean()
torch.testing.assert_close(outs[0], expected)
print(f"== CMake build: {sys.argv[1]} loads and computes the loss ({outs[0].item():.6f} == {expected.item():.6f})")
PYEOF
