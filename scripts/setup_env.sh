# Sourced by the scripts in this folder: creates (or reuses) a virtual environment with torch and
# the test/benchmark dependencies, and builds ppo_ext in place in this checkout for that torch.
#
#   PPO_EXT_VENV   where the environment lives (default: .venv in the checkout)
#   PPO_EXT_TORCH  the torch version (default: 2.14.1, a CUDA 13.0 build, when nvcc is installed so
#                  the CUDA kernels get compiled; else 2.13.0, a CPU build)
#
# A second run is quick: nothing is installed that is there already, and the build is skipped when the
# sources, setup.py, torch and the build settings are those of the last build (ppo_ext/.build-stamp);
# otherwise ninja recompiles only what changed (the CUDA objects: when a CUDA source or a header they
# include changed), in a build folder kept per environment (build/ext-<environment>), so switching
# between environments relinks rather than recompiles.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -z "${PPO_EXT_TORCH:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then PPO_EXT_TORCH=2.14.1; else PPO_EXT_TORCH=2.13.0; fi
fi
VENV="${PPO_EXT_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ ! -x "$PY" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
  "${PIP[@]}" --upgrade "pip>=23" >/dev/null 2>&1 || true
fi
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$PPO_EXT_TORCH')" 2>/dev/null; then
  echo "== installing torch==$PPO_EXT_TORCH (the first time: a large download)"
  "${PIP[@]}" "torch==$PPO_EXT_TORCH"
fi
if ! "$PY" -c "import ninja, setuptools, wheel, pytest, numpy, expecttest, hypothesis, tabulate, matplotlib" \
    2>/dev/null; then
  "${PIP[@]}" ninja setuptools wheel pytest numpy expecttest hypothesis tabulate matplotlib 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
fi
# The frameworks whose own loss code the adapter tests run (tests/test_compat_*.py): their packages alone,
# without their dependencies (the tests stub the heavy imports their loss code does not use).
mapfile -t FRAMEWORKS < "$ROOT/scripts/frameworks.txt"
if ! "$PY" - "${FRAMEWORKS[@]}" <<'PYEOF' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (spec.split("==") for spec in sys.argv[1:])))
PYEOF
  "${PIP[@]}" --no-deps "${FRAMEWORKS[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
# `import ppo_ext` from anywhere finds this checkout (as an editable install would).
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ "$(cat "$SITE/ppo_ext_checkout.pth" 2>/dev/null)" = "$ROOT" ] || echo "$ROOT" > "$SITE/ppo_ext_checkout.pth"

# CUDA kernels are compiled (not run: there may be no GPU) wherever torch is a CUDA build and nvcc exists.
if [ -x /usr/local/cuda/bin/nvcc ] && "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  export CUDA_HOME=/usr/local/cuda
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
SETTINGS="$TORCH_VERSION ${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST:-} ${PPO_EXT_BUILD_CUDA:-}"
hash_of() { { echo "$SETTINGS"; find "$@" -type f | LC_ALL=C sort | xargs sha1sum; } | sha1sum | cut -d' ' -f1; }
STAMP="$(hash_of setup.py csrc include)"
# What the CUDA objects are compiled from: ninja does not see their headers (nvcc's dependency files
# come out empty through cpp_extension's rules), so they are removed when any of these changed.
CUDA_STAMP="$(hash_of csrc/cuda include $(ls csrc/*.h))"
BUILD_TEMP="build/ext-$(basename "$VENV")"
if [ "$(head -1 ppo_ext/.build-stamp 2>/dev/null)" = "$STAMP" ] && ls ppo_ext/_C*.so >/dev/null 2>&1; then
  echo "== ppo_ext is up to date (torch $TORCH_VERSION)"
else
  echo "== building ppo_ext (torch $TORCH_VERSION; MAX_JOBS=${MAX_JOBS:-2})"
  if [ "$(sed -n 2p "$BUILD_TEMP/.cuda-stamp" 2>/dev/null)" != "$CUDA_STAMP" ]; then
    rm -f "$BUILD_TEMP"/csrc/cuda/*.o
  fi
  rm -f ppo_ext/.build-stamp
  # --force: setuptools' own up-to-date check ignores headers; ninja then rebuilds only what is stale.
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace --force --build-temp "$BUILD_TEMP" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  printf '%s\n%s\n' "$STAMP" "$CUDA_STAMP" > ppo_ext/.build-stamp
  cp ppo_ext/.build-stamp "$BUILD_TEMP/.cuda-stamp"
fi
"$PY" -c "import ppo_ext; print('== ppo_ext', ppo_ext.__version__, 'built with CUDA:', ppo_ext.built_with_cuda())"
