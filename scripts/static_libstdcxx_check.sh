#!/usr/bin/env bash
# Builds the CPU kernels with a private, statically linked copy of libstdc++ (as some
# toolchains' g++ wrappers do: one on a GPU machine we use did) into build/static-libstdcxx
# and runs the error-message tests against them. That copy's number formatting is never
# initialised: `stream << 3.0` wrote nothing here and crashed the process there, so every
# number in a message must be formatted without iostreams (csrc/checks.h). Usage:
# scripts/static_libstdcxx_check.sh [PYTHON] (default python3; its pytest is used). About
# a minute and a half on 2 cores from scratch, 30 s after a plain build (CI: 92 -> 26 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-python3}
PYTEST=$(dirname "$(command -v "$PY")")/pytest
OUT=$ROOT/build/static-libstdcxx
mkdir -p "$OUT"

# Only the link differs from a plain CPU build, so the objects of an earlier one (pip's
# build/temp.*, as in CI) are reused when the compile flags match: ninja compiles nothing
# again and this takes seconds, not a minute. Otherwise ninja rebuilds what differs.
TEMP=$(ls -d "$ROOT"/build/temp.*/ 2>/dev/null | head -n 1)
TEMP=${TEMP:-$OUT/temp}
echo "building the CPU kernels with -static-libstdc++ into $OUT (objects in $TEMP)"
LDFLAGS=-static-libstdc++ DBX_FORCE_CPU=1 "$PY" setup.py -q build_ext --build-temp "$TEMP" \
  --build-lib "$OUT/lib" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp diffusionblocks_ext/*.py "$OUT/lib/diffusionblocks_ext/"
# The check means something only if the module really carries its own ostream code.
SYMBOLS=$(nm -D --defined-only "$OUT"/lib/diffusionblocks_ext/_C*.so)
grep -q '_M_insert' <<< "$SYMBOLS" || { echo "the build did not link libstdc++ statically: nothing to check"; exit 1; }

export PYTHONPATH=$OUT/lib DBX_REQUIRE_EXT=1
(cd / && "$PY" -c "
import diffusionblocks_ext.ops as ops
assert ops._C.__file__.startswith('$OUT/'), ops._C.__file__
print('testing', ops._C.__file__)")
"$PYTEST" -q -p no:cacheprovider tests/test_errors.py tests/test_bad_inputs.py
echo "static libstdc++: every message intact"
