# Sourced by the scripts in this folder: creates (or reuses) a virtual environment with torch and
# the test/benchmark dependencies, and builds ppo_ext into it from this checkout.
#
#   PPO_EXT_VENV   where the environment lives (default: .venv in the checkout)
#   PPO_EXT_TORCH  the torch version (default: 2.14.1, a CUDA 13.0 build, when nvcc is installed so
#                  the CUDA kernels get compiled; else 2.13.0, a CPU build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -z "${PPO_EXT_TORCH:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then PPO_EXT_TORCH=2.14.1; else PPO_EXT_TORCH=2.13.0; fi
fi
VENV="${PPO_EXT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade "pip>=23" >/dev/null 2>&1 || true
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$PPO_EXT_TORCH')" 2>/dev/null; then
  echo "== installing torch==$PPO_EXT_TORCH"
  "$PY" -m pip install -q --disable-pip-version-check "torch==$PPO_EXT_TORCH"
fi
"$PY" -m pip install -q --disable-pip-version-check ninja setuptools wheel pytest numpy expecttest hypothesis \
  tabulate matplotlib 2>&1 | { grep -v "^WARNING: Location" || true; }

# CUDA kernels are compiled (not run: there may be no GPU) wherever torch is a CUDA build and nvcc exists.
if [ -x /usr/local/cuda/bin/nvcc ] && "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  export CUDA_HOME=/usr/local/cuda
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
fi
echo "== building ppo_ext (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
# pip's exit status counts (pipefail); grep only drops the noise of the offline index.
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  2>&1 | { grep -v "^WARNING: Location" || true; }
"$PY" -c "import ppo_ext; print('== ppo_ext', ppo_ext.__version__, 'built with CUDA:', ppo_ext.built_with_cuda())"
