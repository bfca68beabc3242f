#!/usr/bin/env bash
# Runs ppo_ext's CPU tests, and the CUDA kernels in the CPU simulator (tests/test_cuda_simulated.py: out-of-bounds
# reads and writes by the kernels), under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh                      # the default subset (below)
#   scripts/sanitize.sh tests/test_errors.py -k meta   # any pytest arguments instead
#
# It copies the checkout (tracked and untracked, non-ignored files; never the built ppo_ext/_C*.so)
# to $PPO_EXT_SANITIZE_DIR (default /tmp/ppo_ext_sanitize), builds the CPU kernels there with
# -fsanitize=address,undefined, and runs pytest in that copy with libasan preloaded into Python.
# The in-place build of the checkout (ppo_ext/_C.abi3.so, build/) is not touched.
#
#   PY        the Python with torch (default: python3 on PATH; use the venv you test with)
#   CC, CXX   the compiler (default gcc/g++; its libasan is the one preloaded)
#   MAX_JOBS  parallel compile jobs (default 2)
#
# Exit status 0 and "SANITIZE: PASS" when the tests pass and no sanitizer report was printed;
# otherwise "SANITIZE: FAIL" and the first sanitizer report. The full log is $PPO_EXT_SANITIZE_DIR/pytest.log.
# UBSan is built with -fno-sanitize-recover, so undefined behaviour aborts the test that hits it.
# Leak detection is off: CPython and torch keep allocations alive until exit by design.
# The RSS/timing tests skip themselves (ASan's quarantine and slowdown make them meaningless), and so
# do the slow tests (no --slow). Tests that fail because of a known bug make pytest fail, but only a
# sanitizer report makes the run a sanitizer failure: the last line says which.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${PPO_EXT_SANITIZE_DIR:-${TMPDIR:-/tmp}/ppo_ext_sanitize}"
PY="${PY:-python3}"
CC="${CC:-gcc}"
CXX="${CXX:-g++}"
SRC="$WORK/src"
LOG="$WORK/pytest.log"

echo "== copying $ROOT to $SRC"
rm -rf "$SRC"
mkdir -p "$SRC" "$WORK/build"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -z |
     while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
     tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
  (cd "$ROOT" && tar --exclude='./build' --exclude='*.so' --exclude='./.venv*' --exclude='./.git' -cf - .) |
    tar -xf - -C "$SRC"
fi
rm -f "$SRC"/ppo_ext/_C*.so

SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "== building ppo_ext with $SAN_FLAGS (CPU kernels only) in $SRC"
(cd "$SRC" && CC="$CC" CXX="$CXX" CFLAGS="$SAN_FLAGS" LDFLAGS="$SAN_FLAGS" PPO_EXT_BUILD_CUDA=0 \
   MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build") >"$WORK/build.log" 2>&1 ||
  { tail -50 "$WORK/build.log"; echo "SANITIZE: FAIL (build failed, log $WORK/build.log)"; exit 1; }

# The CUDA simulator (tests/cuda_sim), instrumented too; built now, before libasan is preloaded, and imported
# prebuilt by the tests. (Importing it here without the preload fails after the build: that is expected.)
echo "== building the CUDA simulator with the same flags"
(cd "$SRC/tests" && PPO_EXT_SANITIZER=1 ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 \
   MAX_JOBS="${MAX_JOBS:-2}" "$PY" -c "import cuda_sim; cuda_sim.load()") >"$WORK/build_sim.log" 2>&1 || true
SIM_SO="$(ls "$SRC"/build/cuda_sim-*-asan/ppo_ext_cuda_sim_asan.so 2>/dev/null || true)"
[ -n "$SIM_SO" ] || { tail -50 "$WORK/build_sim.log"; echo "SANITIZE: FAIL (the CUDA simulator did not build, log $WORK/build_sim.log)"; exit 1; }
grep -q __asan_report <<<"$(nm -D "$SIM_SO")" || { echo "SANITIZE: FAIL ($SIM_SO is not instrumented)"; exit 1; }
export PPO_EXT_SIM_PREBUILT=1

SO="$(ls "$SRC"/ppo_ext/_C*.so)"
SYMS="$(nm -D "$SO")"  # (not piped into grep -q: under pipefail, nm's SIGPIPE would read as a failure)
if ! grep -q __asan_report <<<"$SYMS" || ! grep -q __ubsan_handle <<<"$SYMS"; then
  echo "SANITIZE: FAIL ($SO is not instrumented: the sanitizer flags did not reach the compiler)"
  exit 1
fi
LIBASAN="$("$CC" -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "SANITIZE: FAIL (no libasan.so for $CC)"; exit 1; }
# libstdc++ is preloaded too: python itself does not link it, and ASan must find the real __cxa_throw
# when it starts ("CHECK failed: ... real___cxa_throw != 0" at the first C++ exception otherwise).
LIBSTDCXX="$(readlink -f "$("$CXX" -print-file-name=libstdc++.so)")"

# Reports go to files, not only to stderr: pytest captures fd 2, and a process that a sanitizer stops
# would take its report with it.
rm -f "$WORK"/asan.* "$WORK"/ubsan.*
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_odr_violation=0:strict_init_order=0:log_path=$WORK/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/ubsan:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$SRC"
export PPO_EXT_SANITIZER=1  # tests that measure RSS or time skip themselves under it
export CUDA_VISIBLE_DEVICES=""  # the CPU kernels only: this build has no CUDA kernels

cd "$SRC"
"$PY" -c "import ppo_ext, sys; assert ppo_ext._C.__file__.startswith('$SRC'), ppo_ext._C.__file__; print('== testing', ppo_ext._C.__file__)"
if [ $# -gt 0 ]; then
  TESTS=("$@")
else
  # The tests that drive the kernels hardest (every option, dtype, layout, extreme and bad call), in the
  # bounded "ci" hypothesis profile; the RSS/timing tests skip themselves under PPO_EXT_SANITIZER=1.
  TESTS=(tests/test_policy_loss.py tests/test_errors.py tests/test_extremes.py tests/test_fuzz.py
         tests/test_hygiene.py tests/test_cuda_simulated.py)
fi
echo "== LD_PRELOAD=$LD_PRELOAD $PY -m pytest ${TESTS[*]}"
set +e
"$PY" -m pytest -p no:cacheprovider -q "${TESTS[@]}" >"$LOG" 2>&1
STATUS=$?
set -e
tail -15 "$LOG"
REPORTS="$(ls "$WORK"/asan.* "$WORK"/ubsan.* 2>/dev/null || true)"
if [ -n "$REPORTS" ] || grep -q -E "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|AddressSanitizer: CHECK" "$LOG"; then
  echo "== sanitizer report:"
  for f in $REPORTS; do head -60 "$f"; done
  grep -m1 -A40 -E "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|AddressSanitizer: CHECK" "$LOG" || true
  echo "SANITIZE: FAIL (sanitizer report: ${REPORTS:-in $LOG}; pytest log $LOG)"
  exit 1
fi
if [ "$STATUS" -ne 0 ]; then
  echo "SANITIZE: FAIL (pytest exit status $STATUS; no sanitizer report; full log $LOG)"
  exit "$STATUS"
fi
echo "SANITIZE: PASS (no AddressSanitizer/UBSan report; full log $LOG)"
