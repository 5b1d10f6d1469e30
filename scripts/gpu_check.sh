#!/usr/bin/env bash
# GPU check: one command for a machine with an NVIDIA GPU and no network (torch with CUDA
# already installed). From the repository root or anywhere:
#
#     scripts/gpu_check.sh RESULTS_DIR
#
#   0. environment   -> RESULTS_DIR/env.log          (nvidia-smi, python, torch, nvcc, ninja, pytest)
#   1. build         -> RESULTS_DIR/build.log        (in place, CUDA kernels for the visible GPU)
#   2. cross-check   -> RESULTS_DIR/crosscheck.log   (CUDA vs CPU kernel vs reference, same seeds;
#                                                      plain python, runs with or without pytest)
#   3. op tests      -> RESULTS_DIR/tests.log        (the op tests, DBX_REQUIRE_EXT=1, xdist if present)
#   4. op benchmark  -> RESULTS_DIR/bench_cuda.{json,md,log}  (2^22 and 2^24 elements)
#  4b. kernel counters -> RESULTS_DIR/ncu.log         (Nsight Compute on the cross-entropy and
#                                                      add_noise kernels; informs, never fails)
#   5. trainer tests -> RESULTS_DIR/trainer_tests.log (every task trains, evaluates, samples on the GPU;
#                                                      offload=cpu; the memory bench worker)
#   6. memory bench  -> RESULTS_DIR/memory_gpu/{memory.json,memory.png}, memory_gpu.log
#                       (`bench memory --device cuda`, L=12 width 256, B=4)
#  6a. paper presets -> RESULTS_DIR/presets_gpu/presets.json, presets_gpu.log
#                       (`bench presets --device cuda`: 20 steps each, both modes, their own batches)
#  6b. training speed -> RESULTS_DIR/train_gpu_{fp32,bf16compile}/train.json and .log
#                       (`bench train vit-cifar100 --device cuda`, fp32 eager and bf16 + compile)
#  6c. main command  -> RESULTS_DIR/main_gpu.log, main_gpu_report.json (`train --device cuda`)
#   7. summary       -> RESULTS_DIR/summary.md
#
# Every step runs under `timeout` against one overall deadline (GPU_CHECK_BUDGET seconds,
# default 330, so the whole script ends inside 6 minutes); a failed or timed-out step is
# recorded and the script goes on. Exit status: 0 when every step passed, else 1. With the
# default the last steps get what is left (the benchmark may drop torch.compile, the last
# steps may be skipped); GPU_CHECK_BUDGET=560 gives every step its full time on an H200.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET, MAX_JOBS, TORCH_CUDA_ARCH_LIST,
# CUDA_HOME (default: from `command -v nvcc`, else /usr/local/cuda).

set -u
set -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
RESULTS=$(cd "$1" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-330}
START=$(date +%s)
SUMMARY="$RESULTS/summary.md"
STATUS_LINES=()
FAILED=0
export PYTHONUNBUFFERED=1

section() {
    echo
    echo "================================================================================"
    echo "== $*   [t+$(( $(date +%s) - START ))s]"
    echo "================================================================================"
}

# seconds left before the overall deadline, minus a reserve for what must still run
left() {
    local reserve=${1:-0}
    echo $(( BUDGET - ($(date +%s) - START) - reserve ))
}

# cap MAX RESERVE: a step's time limit, at most MAX, leaving RESERVE seconds for later steps
cap() {
    local l
    l=$(left "$2")
    echo $(( l < $1 ? l : $1 ))
}

# run_step NAME LIMIT LOG CMD...: runs CMD under timeout, tees to LOG, records the outcome
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [ "$limit" -lt 10 ]; then
        echo "SKIPPED: no time left (${limit}s)" | tee "$log"
        STATUS_LINES+=("| $name | SKIPPED (no time left) | 0 | $(basename "$log") |")
        FAILED=1
        return 124
    fi
    echo "\$ $*   (timeout ${limit}s, log $log)"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    local verdict=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMEOUT after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAIL (exit $rc)"
    fi
    [ "$verdict" = PASS ] || FAILED=1
    echo "--> $name: $verdict in ${dt}s"
    STATUS_LINES+=("| $name | $verdict | $dt | $(basename "$log") |")
    return "$rc"
}

# ------------------------------------------------------------------------------ 0. environment
section "0. environment"
{
    echo "date: $(date -Is)"
    echo "host: $(uname -a)"
    echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
    echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
    "$PY" - <<'EOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"capability {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
          f"{p.multi_processor_count} SMs")
print("cpu cores", os.cpu_count(), "torch threads", torch.get_num_threads())
EOF
    echo "nvcc: $(command -v nvcc || echo 'not on PATH')"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    if command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null; then
        echo "ninja: $(ninja --version 2>/dev/null || "$PY" -m ninja --version 2>/dev/null)"
    else
        echo "ninja: NOT FOUND (torch falls back to the slow serial distutils build)"
    fi
    "$PY" -m pytest --version 2>&1 || echo "pytest: NOT INSTALLED (the cross-check still runs)"
} 2>&1 | tee "$RESULTS/env.log"

GPU_OK=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && GPU_OK=1
[ "$GPU_OK" -eq 1 ] || echo "WARNING: torch sees no GPU; CUDA steps will fail or skip"
HAVE_PYTEST=0
"$PY" -m pytest --version >/dev/null 2>&1 && HAVE_PYTEST=1

# ------------------------------------------------------------------------------ 1. build
section "1. build in place with CUDA"
# CUDA_HOME: as given, else /usr/local/cuda when it holds nvcc, else the toolkit around the
# nvcc on PATH (a wrapper script outside a toolkit is skipped: no include/cuda_runtime.h there)
if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=/usr/local/cuda
    if [ ! -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
        candidate=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        [ -f "$candidate/include/cuda_runtime.h" ] && CUDA_HOME=$candidate
    fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$GPU_OK" -eq 1 ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset DBX_SKIP_EXT DBX_FORCE_CPU DBX_DISABLE_EXT
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} MAX_JOBS=$MAX_JOBS"
# stale extensions from another Python/torch would shadow or confuse the fresh build
rm -f diffusionblocks_ext/_C*.so
# build_ext --inplace: no pip, no network, no dependency resolution
run_step "build" "$(cap 180 180)" "$RESULTS/build.log" \
    "$PY" setup.py build_ext --inplace
{
    echo "--- extension after the build:"
    ls -l diffusionblocks_ext/_C*.so 2>&1
    echo "--- the build report (python -m diffusionblocks_ext):"
    "$PY" -m diffusionblocks_ext 2>&1
} | tee -a "$RESULTS/build.log"
if ! "$PY" -c "import sys, diffusionblocks_ext as d; sys.exit(0 if d.HAS_CUDA_KERNELS else 1)" 2>/dev/null; then
    echo "WARNING: the extension has no CUDA kernels (HAS_CUDA_KERNELS is False)"
    STATUS_LINES+=("| CUDA kernels loaded | NO (HAS_CUDA_KERNELS False) | - | build.log |")
    FAILED=1
else
    STATUS_LINES+=("| CUDA kernels loaded | yes | - | build.log |")
fi

# ------------------------------------------------------------------------------ 2. cross-check
section "2. cross-check: CUDA kernel vs CPU kernel vs reference (same seeds)"
CROSSCHECK=$(cat <<'EOF'
"""Each public op on CUDA against the reference and the CPU kernel, same inputs and seeds.
Runs with plain python (no pytest needed). Exit 1 on any mismatch."""
import os, sys
import torch
import diffusionblocks_ext as dbx
from diffusionblocks_ext import reference as ref

DEV = os.environ.get("XCHECK_DEVICE", "cuda")  # cpu: a dry run of this script without a GPU
assert DEV != "cuda" or torch.cuda.is_available(), "no GPU visible"
print("HAS_EXT", dbx.HAS_EXT, "HAS_CUDA_KERNELS", dbx.HAS_CUDA_KERNELS,
      f"backend({DEV})", dbx.backend(torch.empty(0, device=DEV)),
      "backend(cpu)", dbx.backend(torch.empty(0)))
failures, skipped = [], []
g = torch.Generator().manual_seed(0)


def tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def compare(name, got, want, t, where):
    gs = got if isinstance(got, (tuple, list)) else (got,)
    ws = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for a, b in zip(gs, ws):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            failures.append(f"{name} [{where}]: shape {list(a.shape)} vs {list(b.shape)}")
            return
        err = ((a - b).abs() / (b.abs() + 1)).max().item() if a.numel() else 0.0
        worst = max(worst, err)
    ok = worst <= t
    print(f"  {'ok  ' if ok else 'FAIL'} {name:58s} {where:18s} max rel err {worst:.2e} (tol {t:.0e})")
    if not ok:
        failures.append(f"{name} [{where}]: max rel err {worst:.2e} > {t:.0e}")


def run(name, fn, inputs, dtype, grad_wrt=(), floor=0.0):
    """fn(*inputs) on CUDA vs the reference on CUDA vs the public op on CPU (the CPU kernel)."""
    def call(f, xs):
        xs = [x.detach().clone().requires_grad_(i in grad_wrt) if isinstance(x, torch.Tensor) else x
              for i, x in enumerate(xs)]
        out = f(*xs)
        if grad_wrt:
            first = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(first, [xs[i] for i in grad_wrt], torch.ones_like(first))
            return (out if isinstance(out, tuple) else (out,)) + tuple(grads)
        return out
    t = max(tol(dtype), floor)
    cuda_in = [x.to(DEV) if isinstance(x, torch.Tensor) else x for x in inputs]
    try:
        got = call(fn(dbx), cuda_in)
        if DEV == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        failures.append(f"{name} [cuda]: {type(e).__name__}: {e}".splitlines()[0])
        print(f"  FAIL {name}: cuda raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    compare(name, got, call(fn(ref), cuda_in), t, f"{DEV} vs reference")
    try:
        cpu = call(fn(dbx), [x for x in inputs])
    except NotImplementedError as e:
        skipped.append(f"{name}: no CPU kernel ({str(e).splitlines()[0][:100]})")
        print(f"  skip {name:58s} {DEV} vs cpu kernel: no CPU kernel")
        return
    compare(name, got, cpu, t, f"{DEV} vs cpu")


SD = 0.5
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for shape in ((1, 5), (7, 33), (64, 1000), (3, 4, 37)):
        n = shape[0]
        r = lambda: torch.randn(*shape, generator=g).to(dtype)
        s = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=g)).clamp(0.002, 80).to(dtype)
        sn = (0.7 * s).to(dtype)
        tag = f"{str(dtype)[6:]} {list(shape)}"
        run(f"add_noise {tag}", lambda m: (lambda y, s: m.add_noise(y, s, seed=123, offset=7)),
            (r(), s), dtype, grad_wrt=(0,), floor=2e-5)  # noise is float32 for every dtype
        run(f"denoise {tag}", lambda m: (lambda F, z, s: m.denoise(F, z, s)), (r(), r(), s), dtype,
            grad_wrt=(0, 1))
        for den in (False, True):
            run(f"euler_step denoised={den} {tag}",
                lambda m, den=den: (lambda z, F, s, sn: m.euler_step(z, F, s, sn, denoised=den)),
                (r(), r(), s, sn), dtype, grad_wrt=(0, 1))
            run(f"heun_step denoised={den} {tag}",
                lambda m, den=den: (lambda z, F, ze, Fe, s, sn: m.heun_step(z, F, ze, Fe, s, sn, denoised=den)),
                (r(), r(), r(), r(), s, sn), dtype, grad_wrt=(0, 1))
        run(f"edm_loss {tag}", lambda m: (lambda F, z, y, s: m.edm_loss(F, z, y, s)), (r(), r(), r(), s),
            dtype, grad_wrt=(0, 1, 2))
    for shape in ((1, 3), (6, 200), (5, 1000), (4, 3, 37), (3, 2000)):
        logits = (3 * torch.randn(*shape, generator=g)).to(dtype)
        target = torch.randint(0, shape[-1], shape[:-1], generator=g)
        if len(shape) == 3:
            target[0, 0] = -100
        w = torch.rand(shape[0], generator=g) + 0.5
        run(f"weighted_cross_entropy {str(dtype)[6:]} {list(shape)}",
            lambda m: (lambda x, t, w: m.weighted_cross_entropy(x, t, w)), (logits, target, w), dtype,
            grad_wrt=(0,))
for n in (1, 1000, 4097):
    def sample(m, device):
        return m.sample_sigma(n, 0.002, 80.0, seed=5, offset=3, device=device, dtype=torch.float64)
    try:
        got = sample(dbx, DEV)
        compare(f"sample_sigma n={n}", got, sample(ref, DEV), 1e-7, f"{DEV} vs reference")
        try:
            compare(f"sample_sigma n={n}", got, sample(dbx, "cpu"), 1e-7, f"{DEV} vs cpu")
        except NotImplementedError:
            skipped.append(f"sample_sigma n={n}: no CPU kernel")
    except Exception as e:
        failures.append(f"sample_sigma n={n}: {type(e).__name__}: {e}".splitlines()[0])
# bad σ must raise on CUDA as on the CPU
try:
    dbx.denoise(torch.randn(2, 3, device=DEV), torch.randn(2, 3, device=DEV),
                torch.tensor([1.0, -1.0], device=DEV))
    failures.append(f"denoise with sigma <= 0 on {DEV} did not raise")
except (ValueError, RuntimeError) as e:
    print(f"  ok   denoise rejects sigma <= 0 on {DEV}:", str(e).splitlines()[0][:120])

print(f"\n{len(failures)} failure(s), {len(skipped)} skipped comparison(s)")
for f in failures:
    print("FAIL:", f)
for s in skipped:
    print("skipped:", s)
sys.exit(1 if failures else 0)
EOF
)
run_step "cross-check (cuda vs cpu vs reference)" "$(cap 60 150)" \
    "$RESULTS/crosscheck.log" env DBX_REQUIRE_EXT=1 "$PY" -c "$CROSSCHECK"

# ------------------------------------------------------------------------------ 3. tests
section "3. op tests (DBX_REQUIRE_EXT=1; CUDA tests run since a GPU is visible)"
# The op tests are the ones with CUDA cases (the trainer's are step 5); the CPU-only rest
# of the suite is CI's job. pytest-xdist spreads them over the cores when it is installed.
OP_TESTS=(tests/test_ops.py tests/test_noise.py tests/test_bad_inputs.py tests/test_dispatcher.py
          tests/test_constants.py tests/test_errors.py)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
if [ "$HAVE_PYTEST" -eq 1 ]; then
    run_step "pytest op tests" "$(cap 150 140)" "$RESULTS/tests.log" \
        env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m pytest "${OP_TESTS[@]}" "${XDIST[@]}" -q -rfE --maxfail=10 \
        -p no:cacheprovider --durations=10
else
    echo "pytest is not installed: only the cross-check (step 2) ran" | tee "$RESULTS/tests.log"
    STATUS_LINES+=("| pytest tests | NOT RUN (pytest missing; see cross-check) | 0 | tests.log |")
fi

# ------------------------------------------------------------------------------ 4. benchmark
section "4. op benchmark on CUDA"
# 2^22 and 2^24 only (the README's sizes): each size costs a torch.compile per op.
BENCH_LIMIT=$(cap 150 100)
BENCH_ARGS=(--device cuda --sizes "22,24" --min-time 0.1 --max-time 0.5
            --out "$RESULTS/bench_cuda.json" --markdown "$RESULTS/bench_cuda.md")
if [ "$BENCH_LIMIT" -lt 100 ]; then
    echo "only ${BENCH_LIMIT}s left: benchmark without the torch.compile variant"
    BENCH_ARGS+=(--no-compile)
fi
run_step "benchmark (cuda)" "$BENCH_LIMIT" "$RESULTS/bench_cuda.log" \
    env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m diffusionblocks.tools.bench_ops "${BENCH_ARGS[@]}"

# ------------------------------------------------------------------------------ 4b. kernel counters
section "4b. kernel counters of the ops furthest from copy bandwidth (ncu, where it reads them)"
# Nsight Compute reads the hardware counters on some machines only (not under gVisor).
# Where it cannot, the step says so and the check goes on: it informs, it does not gate.
PROFILE=$(cat <<'EOF'
import torch
import diffusionblocks_ext as dbx
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(16384, 1024, device="cuda", generator=g, requires_grad=True)
t = torch.randint(0, 1024, (16384,), device="cuda", generator=g)
w = torch.rand(16384, device="cuda", generator=g)
loss = dbx.weighted_cross_entropy(x, t, w)          # ce_warp_kernel
loss.backward(torch.ones_like(loss))                  # ce_grad_warp_kernel
y = torch.randn(256, 65536, device="cuda", generator=g)
dbx.add_noise(y, torch.rand(256, device="cuda", generator=g) + 0.5, seed=1)  # rowwise_kernel
torch.cuda.synchronize()
EOF
)
# informative: its outcome is recorded but does not fail the check
FAILED_BEFORE=$FAILED
if command -v ncu >/dev/null; then
    run_step "ncu kernel counters (informs only)" "$(cap 60 110)" "$RESULTS/ncu.log" \
        env DBX_REQUIRE_EXT=1 ncu --clock-control none \
        --kernel-name regex:'ce_grad_warp_kernel|ce_warp_kernel|rowwise_kernel' \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        "$PY" -c "$PROFILE"
else
    echo "ncu not on PATH" | tee "$RESULTS/ncu.log"
    STATUS_LINES+=("| ncu kernel counters (informs only) | not available (no ncu) | - | ncu.log |")
fi
FAILED=$FAILED_BEFORE

# ------------------------------------------------------------------------------ 5. trainer tests
section "5. trainer on the GPU (device=cuda, offload=cpu)"
if [ "$HAVE_PYTEST" -eq 1 ]; then
    run_step "pytest trainer on cuda" "$(cap 100 40)" "$RESULTS/trainer_tests.log" \
        env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m pytest tests/test_device.py tests/test_speed_features.py \
        "${XDIST[@]}" -q -rfEs --maxfail=10 -p no:cacheprovider --durations=10
fi

# ------------------------------------------------------------------------------ 6. memory bench
section "6. memory benchmark on the GPU"
run_step "bench memory (cuda)" "$(cap 120 80)" "$RESULTS/memory_gpu.log" \
    env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m diffusionblocks bench memory \
    --device cuda --blocks 4 --out "$RESULTS/memory_gpu"

# ------------------------------------------------------------------------------ 6a. paper presets
section "6a. the paper presets' first steps on the GPU"
# `bench presets --device cuda`: 20 steps of each paper preset at its own batch size, both
# modes, on stand-in files of the full shape; steps/s and peak memory for the README.
run_step "bench presets (cuda)" "$(cap 150 40)" "$RESULTS/presets_gpu.log" \
    env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m diffusionblocks bench presets \
    --device cuda --steps 20 --out "$RESULTS/presets_gpu"

# ------------------------------------------------------------------------------ 6b. training speed
section "6b. training speed on the GPU"
# `bench train vit-cifar100`: the paper's ViT shape at its batch size, fp32 eager and bf16 +
# compile; step times per block against end to end (ratio_to_ideal) and samples/s.
for variant in "fp32" "bf16 --compile"; do
    name=$(echo "$variant" | tr -d ' -')
    run_step "bench train vit-cifar100 ($variant)" "$(cap 90 30)" "$RESULTS/train_gpu_$name.log" \
        env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m diffusionblocks bench train vit-cifar100 \
        --device cuda --precision $variant --steps 50 --warmup 10 --profile-steps 5 --out "$RESULTS/train_gpu_$name"
done

# ------------------------------------------------------------------------------ 6c. main command
section "6c. the README's main command on the GPU"
# `diffusionblocks train --device cuda`: the default preset end to end (about 65 s on an
# H200), for the README's GPU line; the run directory stays out of RESULTS (checkpoints).
MAIN_RUN=$(mktemp -d)
run_step "main command on the GPU" "$(left 8)" "$RESULTS/main_gpu.log" \
    env DBX_REQUIRE_EXT=1 PYTHONPATH="$ROOT/python:$ROOT" "$PY" -m diffusionblocks train --device cuda \
    --out "$MAIN_RUN/run" --set progress=false
cp "$MAIN_RUN/run/report.json" "$RESULTS/main_gpu_report.json" 2>/dev/null
rm -rf "$MAIN_RUN"

# ------------------------------------------------------------------------------ 7. summary
section "7. summary"
{
    echo "# GPU check $(date -Is)"
    echo
    echo "repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), total $(( $(date +%s) - START ))s of a ${BUDGET}s budget"
    echo
    grep -E '^(torch|gpu|cpu cores)' "$RESULTS/env.log" | sed 's/^/    /'
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${STATUS_LINES[@]}"
    echo
    echo "## cross-check"
    if grep -q 'failure(s)' "$RESULTS/crosscheck.log" 2>/dev/null; then
        grep -E 'failure\(s\)|^FAIL|^skipped' "$RESULTS/crosscheck.log" | head -30 | sed 's/^/    /'
    else
        tail -n 5 "$RESULTS/crosscheck.log" 2>/dev/null | sed 's/^/    /'
    fi
    echo
    echo "## tests"
    { grep -E '^(FAILED|ERROR)' "$RESULTS/tests.log"; tail -n 1 "$RESULTS/tests.log"; } 2>/dev/null \
        | head -30 | sed 's/^/    /'
    echo
    echo "## trainer tests"
    { grep -E '^(FAILED|ERROR)' "$RESULTS/trainer_tests.log"; tail -n 1 "$RESULTS/trainer_tests.log"; } \
        2>/dev/null | head -20 | sed 's/^/    /'
    echo
    echo "## main command on the GPU"
    grep -E 'test_accuracy|error' "$RESULTS/main_gpu.log" 2>/dev/null | tail -n 2 | sed 's/^/    /' \
        || echo "    not run (see main_gpu.log)"
    echo
    echo "## paper presets (bench presets --device cuda)"
    grep -E '^\|' "$RESULTS/presets_gpu.log" 2>/dev/null | tail -n 10 || echo "no table (see presets_gpu.log)"
    echo
    echo "## training speed (bench train vit-cifar100 --device cuda)"
    for name in fp32 bf16compile; do
        echo "### $name"
        grep -E '^\|' "$RESULTS/train_gpu_$name.log" 2>/dev/null | head -n 6 || echo "no table (see train_gpu_$name.log)"
    done
    echo
    echo "## memory (bench memory --device cuda)"
    grep -E '^\|' "$RESULTS/memory_gpu.log" 2>/dev/null || echo "no table (see memory_gpu.log)"
    echo
    echo "## benchmark"
    if [ -s "$RESULTS/bench_cuda.md" ]; then
        cat "$RESULTS/bench_cuda.md"
    else
        echo "no markdown table (see bench_cuda.log; bench_cuda.json holds the rows measured so far)"
    fi
    grep '^note:' "$RESULTS/bench_cuda.log" 2>/dev/null | sed 's/^/    /'
} > "$SUMMARY"
cat "$SUMMARY"
echo
echo "results in $RESULTS; total $(( $(date +%s) - START ))s"
exit "$FAILED"
