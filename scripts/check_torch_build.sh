#!/usr/bin/env bash
# Compiles every C++ and CUDA source of ppo_ext against the headers of another torch release, without installing
# it (its wheel alone, no CUDA libraries): a GPU lease must never be lost to a compile error against the torch
# the GPU machines run.
#
#   scripts/check_torch_build.sh [VERSION]      # default 2.11.0 (+cu130, the GPU machines' torch)
#
# Downloads torch==VERSION's wheel with pip (cached in $PPO_EXT_TORCH_WHEELS, default ~/.cache/ppo_ext/wheels),
# unpacks its headers, and compiles csrc/*.cpp, csrc/cpu/*.cpp (g++, the C++ standard torch's cpp_extension
# uses for that release) and csrc/cuda/*.cu (nvcc of CUDA_HOME, sm_90, the flags cpp_extension passes) to
# object files, in parallel (MAX_JOBS, default 2), and links them into one shared library (torch's symbols
# undefined). Exit status 0 and "TORCH BUILD: PASS" when all compile and link.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${1:-2.11.0}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
WHEELS="${PPO_EXT_TORCH_WHEELS:-$HOME/.cache/ppo_ext/wheels}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ppo_ext_torch_${VERSION}_XXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="${PY:-python3}"
mkdir -p "$WHEELS"

WHEEL="$(ls "$WHEELS"/torch-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$WHEEL" ]; then
  echo "== downloading torch==$VERSION (wheel only)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps "torch==$VERSION" -d "$WHEELS" \
    2>&1 | { grep -v "^WARNING: Location" || true; }
  WHEEL="$(ls "$WHEELS"/torch-"$VERSION"-*.whl | head -1)"
fi
echo "== headers of $(basename "$WHEEL")"
"$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('torch/include/') or n == 'torch/version.py'])" "$WHEEL" "$WORK"
INC="$WORK/torch/include"
grep -E "^__version__|^cuda" "$WORK/torch/version.py"
# torch 2.14's headers need C++20 (README); earlier releases build with C++17, as their cpp_extension does
STD=c++17
case "$VERSION" in 2.1[4-9]*|2.[2-9][0-9]*|[3-9]*) STD=c++20 ;; esac
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
COMMON=(-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 -I"$INC"
        -I"$INC/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$PYINC" -I"$ROOT/include")
CXX_FLAGS=("${COMMON[@]}" -std=$STD -O1 -fPIC -fopenmp -Wall -Wno-unknown-pragmas)
NVCC_FLAGS=("${COMMON[@]}" -std=$STD -O1 -Xcompiler -fPIC --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
            -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            -gencode=arch=compute_90,code=sm_90)

cd "$ROOT"
SOURCES=(csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu)
echo "== compiling ${#SOURCES[@]} sources against torch $VERSION ($STD, nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
compile() {
  local src="$1" obj="$WORK/obj/${1//\//_}.o"
  mkdir -p "$WORK/obj"
  if [[ "$src" == *.cu ]]; then
    "$CUDA_HOME/bin/nvcc" "${NVCC_FLAGS[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1
  else
    g++ "${CXX_FLAGS[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1
  fi && echo "   ok  $src" || { echo "   FAILED  $src"; head -40 "$obj.log"; return 1; }
}
STATUS=0
running=0  # one background job per source, MAX_JOBS at a time
for src in "${SOURCES[@]}"; do
  compile "$src" &
  running=$((running + 1))
  if [ "$running" -ge "${MAX_JOBS:-2}" ]; then
    wait -n || STATUS=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || STATUS=1
  running=$((running - 1))
done
if [ "$STATUS" -ne 0 ]; then echo "TORCH BUILD: FAIL (against torch $VERSION)"; exit 1; fi
# Linked into one shared library (torch's symbols left undefined): catches a definition made twice.
if ! g++ -shared -fopenmp "$WORK"/obj/*.o -o "$WORK/libppo_ext_check.so" >"$WORK/link.log" 2>&1; then
  head -20 "$WORK/link.log"
  echo "TORCH BUILD: FAIL (the objects do not link)"
  exit 1
fi
echo "TORCH BUILD: PASS (every source compiles against torch $VERSION, and the objects link)"
