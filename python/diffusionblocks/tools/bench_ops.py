"""Op benchmark (not a test): `python -m diffusionblocks.tools.bench_ops [--device cuda] [--markdown]`.

For each public op and size (fp32 elements, default 2^16 … 2^24) it times, in one process
and on the same inputs:
  eager     the PyTorch composite a user would write (coefficients computed inline);
  compiled  torch.compile(eager composite, dynamic=False), compile time excluded (a compile
            failure is reported per op and the run goes on);
  ours      the diffusionblocks_ext op, served by whatever backend serves the tensor
            (`backend` per row: ext-cpu, ext-cuda or reference);
  copy      the memory-bandwidth ceiling: dst.copy_(src) of a large tensor, bytes read +
            written per second (device-to-device on a GPU).
Medians after warm-up over many repeats (time-budgeted), the speedups ours/eager and
ours/compiled (>1 means ours is faster), the achieved GB/s counting the bytes the op must
minimally read and write, and that as a fraction of the copy bandwidth.

On CUDA the public ops check σ > 0 (a device-to-host sync); the timed loop therefore calls
torch.ops.diffusionblocks.* directly on inputs that were validated once, after checking
that the direct call returns the same result as the public op (`call` = dispatcher). On
the CPU the public op is timed (`call` = public). Results go to a JSON file with the
machine they ran on (--out, default results/bench_<device>.json).
"""

import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as Fn

import diffusionblocks_ext as dbx
from diffusionblocks_ext import build_report, reference

SD = 0.5  # sigma_data, written inline in the composites as a user would
SIGMA_LO, SIGMA_HI = 0.002, 80.0
P_MEAN, P_STD = -1.2, 1.2
SEED = 1234

ALL_OPS = ["sample_sigma", "add_noise", "denoise", "euler_step", "heun_step", "edm_loss",
           "edm_loss_fwd_bwd", "weighted_cross_entropy", "weighted_cross_entropy_fwd_bwd"]
# the dispatcher ops serving each benchmark entry (to tell whether kernels exist for the device)
DISPATCH_NAMES = {"sample_sigma": ["sample_sigma_"], "add_noise": ["add_noise"], "denoise": ["denoise"],
                  "euler_step": ["euler_step"], "heun_step": ["heun_step"], "edm_loss": ["edm_loss"],
                  "edm_loss_fwd_bwd": ["edm_loss", "edm_loss_backward"],
                  "weighted_cross_entropy": ["weighted_cross_entropy"],
                  "weighted_cross_entropy_fwd_bwd": ["weighted_cross_entropy",
                                                     "weighted_cross_entropy_backward"]}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
          "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- composites
# What a user would write with plain PyTorch ops; `s`, `sn` are per-example σ vectors [N].

def _eager_sample_sigma_on(device):
    def fn(n):
        cdf = lambda x: 0.5 * (1 + math.erf((math.log(x) - P_MEAN) / (P_STD * math.sqrt(2))))
        lo, hi = cdf(SIGMA_LO), cdf(SIGMA_HI)
        u = torch.rand(n, dtype=torch.float64, device=device)
        return torch.exp(P_MEAN + P_STD * torch.special.ndtri(lo + u * (hi - lo))).clamp(
            SIGMA_LO, SIGMA_HI).float()
    return fn


def eager_add_noise(y, s):
    eps = torch.randn_like(y)
    z = y + s[:, None] * eps
    z_in = z / torch.sqrt(s[:, None] ** 2 + SD ** 2)
    return z, z_in


def eager_denoise(F, z, s):
    s = s[:, None]
    c_skip = SD ** 2 / (s ** 2 + SD ** 2)
    c_out = s * SD / torch.sqrt(s ** 2 + SD ** 2)
    return c_skip * z + c_out * F


def eager_euler_step(z, F, s, sn):
    D = eager_denoise(F, z, s)
    return z + (sn - s)[:, None] * (z - D) / s[:, None]


def eager_heun_step(z, F, ze, Fe, s, sn):
    d1 = (z - eager_denoise(F, z, s)) / s[:, None]
    d2 = (ze - eager_denoise(Fe, ze, sn)) / sn[:, None]
    return z + (sn - s)[:, None] * (0.5 * d1 + 0.5 * d2)


def eager_edm_loss(F, z, y, s):
    s = s[:, None]
    c_skip = SD ** 2 / (s ** 2 + SD ** 2)
    c_out = s * SD / torch.sqrt(s ** 2 + SD ** 2)
    return ((F - (y - c_skip * z) / c_out) ** 2).mean(1)


def eager_weighted_cross_entropy(logits, target, w):
    return w * Fn.cross_entropy(logits, target, reduction="none")


# ----------------------------------------------------------------------------- timing

class Timer:
    """Median seconds per call after warm-up: samples until >= min_reps and >= min_time,
    or until max_time has passed with >= 3 samples. On CUDA each sample is a CUDA-event
    pair around `inner` calls (inner chosen so a sample lasts >= ~1 ms). With graphs=True
    those `inner` calls are first captured in a CUDA graph and the replay is timed: a call
    from Python costs ~20 us of host time, more than a 2^22-element kernel runs on a GPU,
    so timing eager launches measures the host. The graph times what the GPU does, for the
    composites and for our ops alike; a function that cannot be captured falls back to
    the launch loop, and `last_method` says which one timed the last call."""

    def __init__(self, device, min_reps=20, min_time=0.2, max_time=2.0, warmup=3, graphs=False):
        self.device, self.min_reps, self.min_time, self.max_time = device, min_reps, min_time, max_time
        self.warmup = warmup
        self.cuda = device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.last_method = self.capture_error = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _capture(self, fn, inner):
        """A CUDA graph of `inner` calls of fn, or None when fn cannot be captured."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # capture wants the work warmed up off the default stream
                fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._sync()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(inner):
                    fn()
            graph.replay()
            self._sync()
            return graph
        except Exception as error:  # noqa: BLE001 - e.g. a host sync inside fn
            self.capture_error = _brief(error)
            self._sync()
            return None

    def __call__(self, fn):
        started = time.perf_counter()
        for _ in range(self.warmup):  # at least one call, at most `warmup` or ~0.3 s
            t0 = time.perf_counter()
            fn()
            self._sync()
            estimate = max(time.perf_counter() - t0, 1e-7)  # of one call, for the CUDA inner loop
            if time.perf_counter() - started > 0.3:
                break
        inner = max(1, min(1000, int(1e-3 / estimate))) if self.cuda else 1
        self.capture_error = None
        graph = self._capture(fn, inner) if self.graphs else None
        self.last_method = "cuda graph" if graph is not None else "cuda events" if self.cuda else "perf_counter"
        samples, started = [], time.perf_counter()
        while True:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if graph is not None:
                    graph.replay()
                else:
                    for _ in range(inner):
                        fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            spent = time.perf_counter() - started
            if len(samples) >= self.min_reps and spent >= self.min_time:
                break
            if spent >= self.max_time and len(samples) >= 3:
                break
        del graph
        self.last_min = min(samples)
        return statistics.median(samples), len(samples) * inner


def steady_allocator():
    """CPU: keep freed large blocks in the heap (glibc mallopt) and say so, else None.

    By default glibc serves blocks over its mmap threshold with fresh pages, and moves
    that threshold as blocks are freed, so whether an op's 16 MiB output costs ~4,000
    page faults per call depended on which ops ran before it: euler_step measured 1.6,
    1.9 and 5.2 ms at 2^22 in runs of the same command. With the threshold pinned at
    1 GiB and trimming off, every variant (eager, compiled, ours) reuses warm memory,
    and the figures measure the kernels, not the page-fault path."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1):
            return "glibc mallopt: mmap threshold 1 GiB, trimming off (freed blocks are reused warm)"
    except (OSError, AttributeError):
        pass
    return None


def copy_bandwidth(device, numel, timer):
    """Bytes read + written per second by dst.copy_(src), fp32."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds, reps = timer(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / seconds / 1e9, seconds, reps


# ----------------------------------------------------------------------------- cases

def has_kernel(op_name, device):
    """Whether torch.ops.diffusionblocks.<op_name> has a kernel for the device's dispatch key."""
    if not dbx.HAS_EXT:
        return False
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"diffusionblocks::{op_name}", key))
    except Exception:  # noqa: BLE001 - older/newer torch without this helper: assume present
        return True


def sigmas(n, device, generator):
    s = torch.exp(P_MEAN + P_STD * torch.randn(n, generator=generator)).clamp(SIGMA_LO, SIGMA_HI)
    return s.to(device), (0.8 * s).to(device)


def _grad_fn(fn, wrt):
    """forward + backward to the tensors `wrt` (the loss's upstream gradient is ones)."""
    def run(*args):
        loss = fn(*args)
        return torch.autograd.grad(loss, wrt, torch.ones_like(loss))
    return run


def make_case(op, numel, dtype, device, rows, classes):
    """(shape, min_bytes, eager_fn, ours_public_fn, ours_direct_fn, args, check_fn, note).
    args are the positional inputs of the eager composite and of both 'ours' callables."""
    g = torch.Generator().manual_seed(SEED)
    esize = torch.empty((), dtype=dtype).element_size()
    raw = torch.ops.diffusionblocks if dbx.HAS_EXT else None

    if op == "sample_sigma":
        n = numel

        def ours(n):
            return dbx.sample_sigma(n, SIGMA_LO, SIGMA_HI, seed=SEED, device=device)
        # writes n float32 values; the kernel also writes float64 and casts (counted as minimal: 4n)
        return dict(shape=[n], bytes=4 * n, eager=_eager_sample_sigma_on(device), ours=ours,
                    direct=None, args=(n,), check=None,
                    note="compute-bound (Philox + inverse normal CDF in float64); GB/s = output bytes")

    if op.startswith("weighted_cross_entropy"):
        c = classes
        n = max(1, numel // c)
        logits = torch.randn(n, c, generator=g).to(device=device, dtype=dtype)
        target = torch.randint(0, c, (n,), generator=g).to(device)
        weight = (torch.rand(n, generator=g) + 0.5).to(device)
        ours = lambda x, t, w: dbx.weighted_cross_entropy(x, t, w)
        ours_raw = lambda x, t, w: raw.weighted_cross_entropy(x, t, w, -100)[0]
        eager = eager_weighted_cross_entropy
        fwd_bytes = n * c * esize + n * (8 + 4 + 4)
        if op.endswith("fwd_bwd"):
            logits.requires_grad_(True)
            eager, ours, ours_raw = (_grad_fn(f, [logits]) for f in (eager, ours, ours_raw))
            nbytes = fwd_bytes + 2 * n * c * esize + n * (8 + 4 + 4)  # bwd reads logits, writes grad
            note = "grad to logits; upstream grad = ones"
        else:
            nbytes = fwd_bytes
            note = ""
        return dict(shape=[n, c], bytes=nbytes, eager=eager, ours=ours, direct=ours_raw,
                    args=(logits, target, weight), check="allclose", note=note)

    n = min(rows, numel)
    d = numel // n
    shape = [n, d]
    s, sn = sigmas(n, device, g)
    rand = lambda: torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    E = n * d * esize

    if op == "add_noise":
        y = rand()
        ours = lambda y, s: dbx.add_noise(y, s, seed=SEED)
        ours_raw = lambda y, s: raw.add_noise(y, s, SEED, 0, SD)
        return dict(shape=shape, bytes=3 * E, eager=eager_add_noise, ours=ours, direct=ours_raw,
                    args=(y, s), check="z_in", note="noise: torch RNG in eager/compiled, Philox in ours")
    if op == "denoise":
        F, z = rand(), rand()
        ours = lambda F, z, s: dbx.denoise(F, z, s)
        ours_raw = lambda F, z, s: raw.denoise(F, z, s, SD)
        return dict(shape=shape, bytes=3 * E, eager=eager_denoise, ours=ours, direct=ours_raw,
                    args=(F, z, s), check="allclose", note="")
    if op == "euler_step":
        z, F = rand(), rand()
        ours = lambda z, F, s, sn: dbx.euler_step(z, F, s, sn)
        ours_raw = lambda z, F, s, sn: raw.euler_step(z, F, s, sn, SD, False)
        return dict(shape=shape, bytes=3 * E, eager=eager_euler_step, ours=ours, direct=ours_raw,
                    args=(z, F, s, sn), check="allclose", note="")
    if op == "heun_step":
        z, F, ze, Fe = rand(), rand(), rand(), rand()
        ours = lambda z, F, ze, Fe, s, sn: dbx.heun_step(z, F, ze, Fe, s, sn)
        ours_raw = lambda z, F, ze, Fe, s, sn: raw.heun_step(z, F, ze, Fe, s, sn, SD, False)
        return dict(shape=shape, bytes=5 * E, eager=eager_heun_step, ours=ours, direct=ours_raw,
                    args=(z, F, ze, Fe, s, sn), check="allclose", note="")
    if op.startswith("edm_loss"):
        F, z, y = rand(), rand(), rand()
        ours = lambda F, z, y, s: dbx.edm_loss(F, z, y, s)
        ours_raw = lambda F, z, y, s: raw.edm_loss(F, z, y, s, SD)
        eager = eager_edm_loss
        if op.endswith("fwd_bwd"):
            F.requires_grad_(True)
            eager, ours, ours_raw = (_grad_fn(f, [F]) for f in (eager, ours, ours_raw))
            # forward reads F, z, y; backward reads F, z, y and writes grad_F
            return dict(shape=shape, bytes=7 * E, eager=eager, ours=ours, direct=ours_raw,
                        args=(F, z, y, s), check="allclose",
                        note="grad to F only; upstream grad = ones")
        return dict(shape=shape, bytes=3 * E, eager=eager, ours=ours, direct=ours_raw,
                    args=(F, z, y, s), check="allclose", note="")
    raise ValueError(f"unknown op {op}")


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _compare(check, ours_out, eager_out, args, dtype):
    """A sanity check of ours against the eager composite (not a test: the tests are in tests/)."""
    if check is None:
        return "n/a"
    if check == "z_in":  # different RNGs: check z_in = c_in·z within ours
        z, z_in = ours_out
        s = args[1].to(torch.float32)[:, None]
        ok = torch.allclose(z_in.float(), z.float() / torch.sqrt(s ** 2 + SD ** 2), rtol=1e-3, atol=1e-4)
        return "ok" if ok else "MISMATCH"
    a, b = _first(ours_out).float(), _first(eager_out).float()
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    ok = a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    return "ok" if ok else "MISMATCH"


def _same(x, y):
    xs = x if isinstance(x, (tuple, list)) else (x,)
    ys = y if isinstance(y, (tuple, list)) else (y,)
    return len(xs) == len(ys) and all(torch.equal(a, b) for a, b in zip(xs, ys))


def _reset_compiler():
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def run_case(op, numel, args, timer, big_timer, ceiling_gbps):
    device, dtype = args.device, args.dtype
    case = make_case(op, numel, dtype, device, args.rows, args.classes)
    inputs = case["args"]
    t = big_timer if numel >= args.big_numel else timer
    row = dict(op=op, numel=numel, shape=case["shape"], dtype=str(dtype).removeprefix("torch."),
               bytes=case["bytes"], note=case["note"])

    # --- ours: pick the implementation that serves this device
    missing = [name for name in DISPATCH_NAMES[op] if not has_kernel(name, device)]
    if dbx.backend(torch.empty(0, device=device)) != "reference" and missing:
        row["backend"] = "reference"
        row["backend_note"] = f"no {device.type} kernel for {', '.join(missing)} yet: reference timed"
        ref = getattr(reference, op.replace("_fwd_bwd", ""))
        ours = _ref_variant(op, ref, case, device)
        call = "reference"
    else:
        row["backend"] = dbx.backend(torch.empty(0, device=device))
        ours, call = case["ours"], "public"
        if case["direct"] is not None and row["backend"] == f"ext-{device.type}" and device.type == "cuda":
            # the public op syncs to check σ > 0; time the dispatcher op after checking equality once
            public_out, direct_out = case["ours"](*inputs), case["direct"](*inputs)
            if not _same(public_out, direct_out):
                row["direct_check"] = "MISMATCH: direct call differs from the public op; public timed"
            else:
                row["direct_check"] = "ok"
                ours, call = case["direct"], "dispatcher"
    row["call"] = call

    # --- ours
    try:
        ours_out = ours(*inputs)
        row["check_vs_eager"] = _compare(case["check"], ours_out, case["eager"](*inputs), inputs, dtype)
        del ours_out
        row["ours_s"], row["ours_reps"] = t(lambda: ours(*inputs))
        row["ours_min_s"], row["ours_timing"] = t.last_min, t.last_method
        if t.capture_error:
            row["ours_capture_error"] = t.capture_error
    except Exception as error:  # noqa: BLE001
        row["ours_s"], row["ours_error"] = None, _brief(error)

    # --- eager
    row["eager_s"], row["eager_reps"] = t(lambda: case["eager"](*inputs))
    row["eager_min_s"], row["eager_timing"] = t.last_min, t.last_method
    if t.capture_error:
        row["eager_capture_error"] = t.capture_error

    # --- compiled (compile time excluded)
    row["compiled_s"] = None
    if not args.no_compile:
        _reset_compiler()
        try:
            compiled = torch.compile(case["eager"], dynamic=False)
            t0 = time.perf_counter()
            compiled(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            row["compiled_s"], row["compiled_reps"] = t(lambda: compiled(*inputs))
            row["compiled_min_s"], row["compiled_timing"] = t.last_min, t.last_method
            if t.capture_error:
                row["compiled_capture_error"] = t.capture_error
        except Exception as error:  # noqa: BLE001
            row["compile_error"] = _brief(error)
        _reset_compiler()

    nbytes = case["bytes"]
    for key in ("ours", "eager", "compiled"):
        sec = row.get(f"{key}_s")
        row[f"{key}_GBps"] = nbytes / sec / 1e9 if sec else None
    o = row.get("ours_s")
    row["speedup_vs_eager"] = row["eager_s"] / o if o else None
    row["speedup_vs_compiled"] = row["compiled_s"] / o if o and row["compiled_s"] else None
    row["frac_copy"] = row["ours_GBps"] / ceiling_gbps if row["ours_GBps"] else None
    return row


def _ref_variant(op, ref, case, device):
    """The reference op with the same call signature as case['ours']."""
    if op == "sample_sigma":
        return lambda n: ref(n, SIGMA_LO, SIGMA_HI, seed=SEED, device=device)
    if op == "add_noise":
        return lambda y, s: ref(y, s, seed=SEED)
    if op.startswith("weighted_cross_entropy"):
        fn = lambda x, t, w: ref(x, t, w)
        return _grad_fn(fn, [case["args"][0]]) if op.endswith("fwd_bwd") else fn
    if op.startswith("edm_loss") and op.endswith("fwd_bwd"):
        return _grad_fn(ref, [case["args"][0]])
    return ref


def _brief(error):
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# ----------------------------------------------------------------------------- output

def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device):
    """The machine and the build the figures came from: the build report, plus the load."""
    report = build_report.collect()
    info = {"loadavg_start": _loadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": report["platform"], "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "cpu": report["cpu"]}
    info["ext"] = {"backend": dbx.backend(torch.empty(0, device=device)),
                   **{name: report[name] for name in ("extension", "module", "build", "threads_kernels",
                                                      "environment")}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_GiB": round(p.total_memory / 2**30, 1),
                       "sms": p.multi_processor_count, "cuda": torch.version.cuda}
    return info


def _fmt_t(sec):
    if sec is None:
        return "—"
    if sec >= 1:
        return f"{sec:.2f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec * 1e6:.1f} us"


def _fmt_x(v):
    return "—" if v is None else f"{v:.2f}x"


def _fmt_g(v):
    return "—" if v is None else f"{v:.1f}"


def _fmt_p(v):
    return "—" if v is None else f"{100 * v:.0f}%"


def _size_label(numel):
    e = math.log2(numel)
    return f"2^{int(e)}" if e == int(e) else str(numel)


COLUMNS = ["op", "size", "shape", "backend", "eager", "compiled", "ours", "vs eager", "vs compiled",
           "GB/s", "% copy", "check"]


def table_rows(rows):
    out = []
    for r in rows:
        ours = _fmt_t(r.get("ours_s")) if r.get("ours_s") else "ERR"
        comp = _fmt_t(r.get("compiled_s")) if r.get("compiled_s") else ("fail" if r.get("compile_error") else "—")
        out.append([r["op"], _size_label(r["numel"]), "x".join(map(str, r["shape"])),
                    r["backend"] + ("*" if r.get("call") == "dispatcher" else ""),
                    _fmt_t(r["eager_s"]), comp, ours, _fmt_x(r.get("speedup_vs_eager")),
                    _fmt_x(r.get("speedup_vs_compiled")), _fmt_g(r.get("ours_GBps")),
                    _fmt_p(r.get("frac_copy")), r.get("check_vs_eager", "—")])
    return out


def print_table(rows, file=sys.stdout):
    body = table_rows(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    print(line(COLUMNS), file=file)
    print(line(["-" * w for w in widths]), file=file)
    last = None
    for cells in body:
        if last is not None and cells[0] != last:
            print(file=file)
        last = cells[0]
        print(line(cells), file=file)


def markdown(rows, info, ceiling, device, numel):
    measured = sorted({r["numel"] for r in rows})
    if numel not in measured and measured:  # the largest size measured below it, else the smallest
        numel = max([m for m in measured if m <= numel] or measured[:1])
    sel = [r for r in rows if r["numel"] == numel]
    size = _size_label(sel[0]["numel"]) if sel else _size_label(numel)
    where = info.get("gpu", {}).get("name") if device.type == "cuda" else \
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads"
    lines = [f"Op benchmark at {size} {sel[0]['dtype'] if sel else ''} elements on {where} "
             f"(torch {info['torch']}, {datetime.date.today().isoformat()}); copy ceiling "
             f"{ceiling:.1f} GB/s (read + write). Medians; speedup = other time / ours; "
             "GB/s counts the bytes each op must read and write.", ""]
    cols = ["op", "shape", "backend", "eager", "torch.compile", "ours", "vs eager", "vs compile",
            "GB/s", "% of copy"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|")
    for cells in table_rows(sel):
        lines.append("| " + " | ".join(str(c) for i, c in enumerate(cells) if i not in (1, 11)) + " |")
    methods = sorted({r.get(f"{k}_timing") for r in sel for k in ("eager", "compiled", "ours")} - {None})
    if device.type == "cuda" and methods:
        lines.append("")
        lines.append("GPU times: CUDA events around " + (
            "CUDA-graph replays of back-to-back calls, so host launch overhead is excluded for every "
            "column" if methods == ["cuda graph"] else
            f"a mix of methods ({', '.join(methods)}; per row in the JSON)" if "cuda graph" in methods else
            "launches from Python (host launch overhead included)") + ".")
    if any(r.get("call") == "dispatcher" for r in sel):
        lines.append("")
        lines.append("\\* timed through torch.ops.diffusionblocks.* directly (the public op adds a "
                     "σ-value check that syncs the GPU); results checked equal to the public op.")
    return "\n".join(lines)


def write_json(out, args, device, sizes, ops, info, copy_numel, ceiling, copy_s, copy_reps, rows, notes,
               started, complete):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    result = {
        "benchmark": "diffusionblocks.tools.bench_ops",
        "complete": complete,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "config": {"device": str(device), "dtype": str(args.dtype).removeprefix("torch."),
                   "sizes": sizes, "ops": ops, "rows": args.rows, "classes": args.classes,
                   "min_reps": args.min_reps, "big_min_reps": args.big_min_reps,
                   "min_time_s": args.min_time, "max_time_s": args.max_time,
                   "compile": not args.no_compile,
                   "timing": ("CUDA events around CUDA-graph replays of back-to-back calls (per row: "
                              "*_timing), median per call" if not args.no_graphs else
                              "CUDA events around launches from Python, median per call")
                   if device.type == "cuda"
                   else "time.perf_counter, median per call (min also recorded)",
                   "ours_call": "torch.ops.diffusionblocks.* on inputs validated once (CUDA, "
                                "checked equal to the public op), public op (CPU)",
                   "bytes": "minimal bytes read + written: add_noise 3E, denoise 3E, euler_step 3E, "
                            "heun_step 5E, edm_loss 3E, edm_loss_fwd_bwd 7E (grad to F), CE 1E, "
                            "CE_fwd_bwd 3E (grad to logits), sample_sigma 4 bytes/draw; E = bytes of one input"},
        "copy": {"numel": copy_numel, "GBps": ceiling, "seconds": copy_s, "reps": copy_reps},
        "results": rows,
        "notes": notes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    return result


# ----------------------------------------------------------------------------- main

def parse_sizes(text):
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("2^"):
            sizes.append(2 ** int(part[2:]))
        elif int(part) <= 40:  # an exponent
            sizes.append(2 ** int(part))
        else:
            sizes.append(int(part))
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusionblocks.tools.bench_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--sizes", default="16,20,22,24",
                   help="element counts: exponents of 2 (16,20), 2^N, or plain counts (default 16,20,22,24; "
                        "the full sweep is 16,18,20,22,24)")
    p.add_argument("--ops", default="all", help="comma-separated subset of: " + ", ".join(ALL_OPS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--rows", type=int, default=256, help="N (examples) of the [N, D] inputs (default 256)")
    p.add_argument("--classes", type=int, default=1024, help="C of the [N, C] cross-entropy logits")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: time launches from Python instead of CUDA-graph replays (host-bound "
                        "for small kernels)")
    p.add_argument("--min-reps", type=int, default=20)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement at least")
    p.add_argument("--max-time", type=float, default=1.5, help="seconds per measurement at most")
    p.add_argument("--big-numel", type=int, default=2 ** 24,
                   help="from this size on, measurements use --big-min-reps (default 2^24)")
    p.add_argument("--big-min-reps", type=int, default=10)
    p.add_argument("--copy-numel", type=int, default=None,
                   help="elements of the copy that sets the bandwidth ceiling (default 2^25 CPU, 2^28 CUDA)")
    p.add_argument("--out", default=None, help="JSON file (default results/bench_<device>.json)")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="FILE",
                   help="also print the table at 2^22 as markdown (to FILE if given)")
    p.add_argument("--markdown-size", default="22", help="size of the markdown table (default 2^22)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.device = device
    args.dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = ALL_OPS if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {ALL_OPS}")
    sizes = parse_sizes(args.sizes)
    try:
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.recompile_limit = 64
    except Exception:  # noqa: BLE001
        pass
    torch.manual_seed(SEED)
    allocator = steady_allocator() if device.type == "cpu" else None

    graphs = not args.no_graphs
    timer = Timer(device, min_reps=args.min_reps, min_time=args.min_time, max_time=args.max_time,
                  graphs=graphs)
    big_timer = Timer(device, min_reps=args.big_min_reps, min_time=args.min_time, max_time=args.max_time,
                      graphs=graphs)
    info = machine_info(device)
    info["allocator"] = allocator or "default"
    started = time.perf_counter()

    copy_numel = args.copy_numel or (2 ** 28 if device.type == "cuda" else 2 ** 25)
    ceiling, copy_s, copy_reps = copy_bandwidth(device, copy_numel, Timer(device, min_reps=20, min_time=0.5,
                                                                          max_time=3.0))
    print(f"# diffusionblocks_ext op benchmark on {device.type}: "
          f"{info.get('gpu', {}).get('name', info['cpu'])}, {info['cores']} cores, "
          f"{info['threads']} threads, torch {info['torch']}, backend {info['ext']['backend']}")
    load = info.get("loadavg_start")
    if device.type == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"# WARNING: load average {load[0]} on {os.cpu_count()} cores at the start: other processes "
              "compete for the CPU and inflate (and quantize) the timings")
    print(f"# copy ceiling: {ceiling:.1f} GB/s (dst.copy_(src), {copy_numel} fp32 elements, "
          f"read + write, median of {copy_reps})", flush=True)

    out = args.out or os.path.join("results", f"bench_{device.type}.json")
    rows = []
    for op in ops:
        for numel in sizes:
            t0 = time.perf_counter()
            try:
                row = run_case(op, numel, args, timer, big_timer, ceiling)
            except Exception as error:  # noqa: BLE001 - one broken op must not end the run
                traceback.print_exc()
                row = dict(op=op, numel=numel, shape=[numel], dtype=str(args.dtype), bytes=0,
                           backend="?", eager_s=None, error=_brief(error))
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            r = row
            print(f"  {op:32s} {_size_label(numel):>5s}  eager {_fmt_t(r.get('eager_s')):>10s}  "
                  f"compiled {_fmt_t(r.get('compiled_s')):>10s}  ours {_fmt_t(r.get('ours_s')):>10s}  "
                  f"[{r.get('backend')}] {r.get('check_vs_eager', '')} "
                  f"{'(compile failed)' if r.get('compile_error') else ''}({r['wall_s']} s)", flush=True)
            write_json(out, args, device, sizes, ops, info, copy_numel, ceiling, copy_s, copy_reps,
                       rows, [], started, complete=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print_table(rows)
    notes = sorted({f"{r['op']}: {r['backend_note']}" for r in rows if r.get("backend_note")}
                   | {f"{r['op']}: compile failed: {r['compile_error']}" for r in rows if r.get("compile_error")}
                   | {f"{r['op']}: {r['ours_error']}" for r in rows if r.get("ours_error")}
                   | {f"{r['op']}: {r['error']}" for r in rows if r.get("error")})
    print("\nspeedup = eager (or compiled) time / ours; GB/s = minimal bytes read + written / ours time; "
          f"% copy = of {ceiling:.1f} GB/s.")
    if any(r.get("call") == "dispatcher" for r in rows):
        print("* timed via torch.ops.diffusionblocks.* directly (public op adds a σ check that syncs "
              "the GPU); outputs checked equal to the public op once.")
    for n in notes:
        print("note:", n)

    info["loadavg_end"] = _loadavg()
    if device.type == "cpu" and info["loadavg_end"]:
        print(f"load average (1, 5, 15 min): {info.get('loadavg_start')} at the start, "
              f"{info['loadavg_end']} at the end, on {os.cpu_count()} cores")
    result = write_json(out, args, device, sizes, ops, info, copy_numel, ceiling, copy_s, copy_reps,
                        rows, notes, started, complete=True)
    print(f"\nwrote {out} ({result['wall_s']} s)")

    if args.markdown is not None:
        md = markdown(rows, info, ceiling, device, parse_sizes(args.markdown_size)[0])
        if args.markdown == "-":
            print()
            print(md)
        else:
            os.makedirs(os.path.dirname(args.markdown) or ".", exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(md + "\n")
            print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
