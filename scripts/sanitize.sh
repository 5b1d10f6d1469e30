#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer into
# build/sanitize (the in-place and installed builds are left alone) and runs the op tests
# against them. Any report ends the run with an error. Usage: scripts/sanitize.sh [PYTHON]
# (default: python3 on PATH; its pytest is used). Takes about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-python3}
PYTEST=$(dirname "$(command -v "$PY")")/pytest
OUT=$ROOT/build/sanitize
mkdir -p "$OUT"

echo "building the sanitized CPU kernels into $OUT"
DBX_SANITIZE=1 "$PY" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
cp diffusionblocks_ext/*.py "$OUT/lib/diffusionblocks_ext/"

# The sanitizer runtime must be the first library loaded; libstdc++ is preloaded with it
# because python does not link it, and ASan's __cxa_throw interceptor must find it at
# start-up (else the first C++ exception aborts). The interpreter keeps objects alive at
# exit, so leak detection would only report those.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# PYTHONPATH comes before site-packages and the in-tree package's .pth entry; the plain
# pytest executable (not python -m pytest) keeps the checkout itself off sys.path.
export PYTHONPATH=$OUT/lib DBX_REQUIRE_EXT=1
(cd / && "$PY" -c "
import diffusionblocks_ext.ops as ops
assert ops._C.__file__.startswith('$OUT/'), ops._C.__file__
print('testing', ops._C.__file__)")

# The op tests; test_dispatcher's inductor case is left out (it compiles C++ with g++
# under the preloaded runtime: minutes, and none of our code).
# --capture=sys: a sanitizer report goes to the terminal even when the process aborts.
"$PYTEST" -q -p no:cacheprovider --capture=sys tests/test_ops.py tests/test_errors.py tests/test_noise.py tests/test_dispatcher.py \
  tests/test_bad_inputs.py tests/test_fuzz.py -k "not inductor"
echo "sanitizers: clean"
