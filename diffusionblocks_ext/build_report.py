"""The build report: what a bug report about the ops needs, in one paste. Which
implementation serves CPU and CUDA tensors, what the compiled module was built from
(versions, instruction set, CUDA architectures and toolkit, OpenMP), where it was loaded
from, and what the environment variables changed. `python -m diffusionblocks_ext` prints
it (`--json` for a machine); `diffusionblocks info` adds the trainer's side."""

import json
import os
import platform
import sys

import torch

from . import _loader, ops
from ._version import __version__

# Every variable the package reads, and what setting it does. Build-time ones act when
# the extension is compiled: set at run time they change nothing.
VARIABLES = {
    "DBX_DISABLE_EXT": ("run", "the compiled module is not loaded: the reference serves every op"),
    "DBX_REQUIRE_EXT": ("run", "a compiled module that does not load is an error instead of a fallback"),
    "DBX_SKIP_EXT": ("build", "nothing is compiled: a pure-PyTorch install"),
    "DBX_FORCE_CPU": ("build", "CPU kernels only, even with a CUDA torch and nvcc"),
    "DBX_PORTABLE": ("build", "no -march flags: a binary for any x86-64 CPU"),
    "DBX_SANITIZE": ("build", "CPU kernels under AddressSanitizer + UBSan"),
    "DBX_FUZZ_EXAMPLES": ("tests", "examples per property-based fuzz test"),
    "DBX_ROBUSTNESS_CRASH": ("tests", "a case id the robustness runner dies on"),
}
# Not ours, but they change what the ops do or how they were built.
RELATED = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "CXX")
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")


def _cpu() -> tuple[str, list[str]]:
    name, features = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return name, features
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            features = [flag for flag in CPU_FEATURES if flag in present]
            break
    return name, features


def _effect(name: str, value: str) -> str:
    when, what = VARIABLES.get(name, (None, "not a variable this package reads"))
    if when in ("run", "build") and not _loader._flag(name):
        return f"{value!r}: off (1, true, yes or on switch it on)"
    if when == "build":
        return f"{value!r}: acts when building, none on this run ({what})"
    return f"{value!r}: {what}"


def _environment() -> dict:
    ours = {name: _effect(name, os.environ[name]) for name in sorted(os.environ) if name.startswith("DBX_")}
    return {"dbx": ours, "related": {name: os.environ[name] for name in RELATED if name in os.environ}}


def _problems(build: dict | None) -> list[str]:
    """What a user should fix before anything else."""
    found = [] if _loader.STATUS in _loader.FINE else [_loader.STATUS]
    if build is not None and build["openmp"] == 0:
        found.append("built without OpenMP: the CPU kernels run on one thread")
    return found


def collect() -> dict:
    """The report as a plain dict (the same fields in the compiled and the fallback install)."""
    module = ops._C
    build = dict(module.build_info()) if module is not None and hasattr(module, "build_info") else None
    cpu_name, cpu_features = _cpu()
    gpus = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "diffusionblocks_ext": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_name,
        "cpu_features": cpu_features,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpus": gpus,
        "extension": _loader.STATUS,
        "module": module.__file__ if module is not None else None,
        "backend_cpu": ops._backend_for(torch.device("cpu")),
        "backend_cuda": ops._backend_for(torch.device("cuda")),
        "build": build,
        "threads_kernels": module.num_threads() if module is not None else None,
        "threads_torch": torch.get_num_threads(),
        "environment": _environment(),
        "problems": _problems(build),
    }


def render(info: dict) -> str:
    """The report as text, one fact per line."""
    build = info["build"]
    lines = [
        f"diffusionblocks_ext  {info['diffusionblocks_ext']}",
        f"python               {info['python']}",
        f"platform             {info['platform']}",
        f"torch                {info['torch']} (CUDA {info['torch_cuda'] or 'none: a CPU build'})",
        f"cpu                  {info['cpu']}; {' '.join(info['cpu_features']) or 'no SIMD flags read'}; "
        f"ATen dispatches {info['torch_cpu_capability']}",
        f"gpus                 {', '.join(info['gpus']) or 'none visible'}",
        f"compiled extension   {info['extension']}",
        f"module file          {info['module'] or '-'}",
        f"CPU tensors          {info['backend_cpu']}",
        f"CUDA tensors         {info['backend_cuda']}" + ("" if info["gpus"] else " (no GPU visible)"),
    ]
    if build is not None:
        lines += [
            f"built version        {build['version']}",
            f"built against torch  {build['torch']}",
            f"built for CPU        {build['cpu_flags']}",
            f"CUDA kernels         " + (f"yes, archs {build['cuda_archs']}, toolkit {build['cuda_toolkit']}"
                                        if build["cuda_kernels"] else "no"),
            f"compiler             {build['compiler']}",
            f"OpenMP               " + (f"{build['openmp']}" if build["openmp"] else "not linked"),
            f"build options        {build['build_options'] or 'none'}",
        ]
    lines.append(f"threads              kernels {info['threads_kernels'] or '-'}, torch {info['threads_torch']}")
    environment = info["environment"]
    lines += [f"{'env ' + name:<20} {effect}" for name, effect in environment["dbx"].items()] or \
             ["env DBX_*            none set"]
    lines += [f"{'env ' + name:<20} {value}" for name, value in environment["related"].items()]
    lines += [f"PROBLEM              {problem}" for problem in info["problems"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--json"]):
        print("usage: python -m diffusionblocks_ext [--json]", file=sys.stderr)
        return 2
    info = collect()
    print(json.dumps(info, indent=2) if argv else render(info))
    return 0
