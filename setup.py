"""Builds diffusionblocks_ext._C from csrc/ with torch.utils.cpp_extension + ninja.

The extension is compiled against the torch it will run with, so that torch must be
importable while building: install it first, then build without pip's isolation
(README, "Quick start"):
    pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation .
torch is deliberately not a build requirement: an isolated build would compile against a
second torch (on Linux PyPI's default is a multi-GB CUDA build) that need not be the one
installed. A build that cannot go on (no torch, no C++ compiler) stops at once with one
line that says what to run. Environment variables:
    DBX_SKIP_EXT=1     build nothing (the pure-PyTorch reference serves every op)
    DBX_FORCE_CPU=1    CPU kernels only, even with a CUDA torch and nvcc present
    DBX_PORTABLE=1     no -march flags: a binary for any x86-64 CPU
    DBX_SANITIZE=1     CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer
                       (scripts/sanitize.sh builds them into build/sanitize and runs the op tests)
    CXX                the C++ compiler (default c++)
    CUDA_HOME          defaults to /usr/local/cuda; TORCH_CUDA_ARCH_LIST defaults to the
                       visible GPUs' architectures, or 9.0 when none is visible
What was built (versions, instruction set, CUDA architectures) is compiled into the module:
`python -m diffusionblocks_ext` prints it.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(ROOT, "diffusionblocks_ext", "_version.py")).read()).group(1)
INSTALL_COMMAND = "pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation ."


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _stop(problem):
    """One line and a non-zero exit, never a traceback from inside the build backend."""
    sys.exit(f"diffusionblocks: {problem}; or `DBX_SKIP_EXT=1 pip install .` for the pure-PyTorch ops, "
             "nothing compiled")


def _import_torch():
    try:
        import torch
    except ImportError:
        _stop("cannot build: torch is not importable, and the compiled ops must be built against the torch "
              "they run with (pip's isolated build hides an installed one). "
              f"Run: {INSTALL_COMMAND}   (leave out torch==2.13.0 to keep your own torch)")
    return torch


def _check_compiler():
    command = os.environ.get("CXX") or "c++"  # what torch.utils.cpp_extension compiles with
    if shutil.which(command.split()[0]) is None:
        _stop(f"cannot build: no C++ compiler `{command}` (install one, e.g. `apt install g++`, or name yours in "
              "CXX)")


def _host_cpu_flags():
    """-march for the CPU we build on (at::vec then uses AVX2/AVX-512 code paths), unless
    DBX_PORTABLE asks for a binary that runs on any x86-64. Returns (flags, name)."""
    if _flag("DBX_PORTABLE") or os.uname().machine != "x86_64":
        return [], "portable-" + os.uname().machine
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return [], "baseline-x86_64"
    flags = set(next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "").split())
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "AVX2+FMA+F16C"
    return [], "baseline-x86_64"


def _cuda_arch_list(torch):
    """The architectures nvcc compiles for, made explicit so the build info can name them."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
                         if torch.cuda.is_available() else [])
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(visible) or "9.0"
    return os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";")


def _nvcc_release(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    found = re.search(r"release ([0-9.]+)", out)
    return found.group(1) if found else "unknown"


def _string_define(name, value):
    # ninja passes each flag through a shell: no spaces or quotes inside the value
    return f'-D{name}="{re.sub(r"[^A-Za-z0-9_.+;,-]", "_", value)}"'


def extensions():
    if _flag("DBX_SKIP_EXT"):
        return [], {}
    torch = _import_torch()
    from torch.utils import cpp_extension

    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ["CUDA_HOME"]
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    sanitize = _flag("DBX_SANITIZE")
    with_cuda = (not _flag("DBX_FORCE_CPU") and not sanitize and torch.version.cuda is not None
                 and (os.path.exists(nvcc) or shutil.which("nvcc") is not None))
    _check_compiler()
    cpu_flags, cpu_name = _host_cpu_flags()
    arch_list = _cuda_arch_list(torch) if with_cuda else ""
    build_options = [name for name in ("DBX_FORCE_CPU", "DBX_PORTABLE", "DBX_SANITIZE") if _flag(name)]

    sources = (["csrc/bindings.cpp", "csrc/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
               + (sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []))
    defines = [_string_define("DBX_VERSION", VERSION), _string_define("DBX_TORCH_BUILT", torch.__version__),
               _string_define("DBX_CPU_FLAGS", cpu_name), _string_define("DBX_CUDA_ARCHS", arch_list),
               _string_define("DBX_CUDA_TOOLKIT", _nvcc_release(nvcc) if with_cuda else ""),
               _string_define("DBX_BUILD_OPTIONS", ",".join(build_options))]
    defines += ["-DDBX_WITH_CUDA"] if with_cuda else []
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"] + defines + cpu_flags
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines
    link = ["-fopenmp"]
    if sanitize:
        # -O1 -g keeps the reports' stack traces readable; any undefined behaviour aborts
        # (instead of printing and going on), so a finding fails the run.
        checks = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = [flag for flag in cxx if flag != "-O3"] + ["-O1"] + checks
        link += checks
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind(
        name="diffusionblocks_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx},
        extra_link_args=link,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="diffusionblocks",
    version=VERSION,
    description="DiffusionBlocks: block-wise training of residual networks as denoisers, "
                "with fused C++/CUDA ops",
    python_requires=">=3.10",
    packages=find_packages(where=".", include=["diffusionblocks_ext", "diffusionblocks_ext.*"])
    + find_packages(where="python"),
    package_dir={"diffusionblocks": "python/diffusionblocks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # pillow: DiT's sample grids and image folders; mauve-text: the language models' MAUVE
    install_requires=["torch>=2.6", "numpy", "scikit-learn", "matplotlib", "tqdm", "safetensors", "pillow",
                      "mauve-text"],
    entry_points={"console_scripts": ["diffusionblocks = diffusionblocks.cli:main"]},
)
