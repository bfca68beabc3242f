#!/usr/bin/env bash
# The test suite against another CUDA build of torch, on the CPU kernels (default 2.11.0: the GPU machines'
# torch, whose torch.compile and torch.library differ from 2.14's), in .venv-<version>:
#
#   scripts/test_cuda_torch.sh [VERSION] [pytest arguments]
#
# Its wheel alone is installed (pip --no-deps), with torch's pure-Python dependencies: the CUDA 13 libraries it
# loads at import (cuDNN, cuBLAS...) are .venv's, torch 2.14.1's (CUDA 13.0 too), linked in rather than downloaded
# at the versions that torch pins (which this machine's package index lacks). No GPU is used: the CUDA kernels
# are not built (PPO_EXT_BUILD_CUDA=0). Needs .venv (./scripts/test.sh makes it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VERSION="2.11.0"
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  VERSION="$1"
  shift
fi
VENV="$ROOT/.venv-$VERSION"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
LIBS="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -d "$LIBS/nvidia" ] || { echo "no CUDA libraries in .venv ($LIBS/nvidia): run ./scripts/test.sh first" >&2; exit 1; }

if [ ! -x "$PY" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for lib in nvidia cuda cuda_bindings cuda_pathfinder; do
  [ -e "$LIBS/$lib" ] && [ ! -e "$SITE/$lib" ] && ln -s "$LIBS/$lib" "$SITE/$lib"
done
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; then
  echo "== installing torch==$VERSION (the wheel alone) and its pure-Python dependencies"
  # (pip reports the CUDA packages torch pins as missing: expected, they are linked above)
  { "${PIP[@]}" --no-deps "torch==$VERSION" && "${PIP[@]}" numpy typing_extensions filelock sympy networkx jinja2 fsspec; } \
    >"$VENV/install.log" 2>&1 || { cat "$VENV/install.log"; exit 1; }
fi
PPO_EXT_VENV="$VENV" PPO_EXT_TORCH="$VERSION" PPO_EXT_BUILD_CUDA=0 ./scripts/test.sh "$@"
