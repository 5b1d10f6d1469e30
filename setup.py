"""Builds diffusionblocks_ext._C from csrc/ with torch.utils.cpp_extension + ninja.

Install torch first (the README's dependency step), then
    pip install --no-build-isolation .        (or -e . for development)
torch is deliberately not a build requirement: pip would put a 5.6 GB CUDA torch into an
isolated build environment. Environment variables:
    DBX_SKIP_EXT=1     build nothing (the pure-PyTorch reference serves every op)
    DBX_FORCE_CPU=1    CPU kernels only, even with a CUDA torch and nvcc present
    DBX_PORTABLE=1     no -march flags: a binary for any x86-64 CPU
    DBX_SANITIZE=1     CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer
                       (scripts/sanitize.sh builds them into build/sanitize and runs the op tests)
    CUDA_HOME          defaults to /usr/local/cuda; TORCH_CUDA_ARCH_LIST defaults to 9.0
                       when no GPU is visible at build time
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _host_cpu_flags():
    """-march for the CPU we build on (at::vec then uses AVX2/AVX-512 code paths), unless
    DBX_PORTABLE asks for a binary that runs on any x86-64."""
    if _flag("DBX_PORTABLE") or os.uname().machine != "x86_64":
        return []
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = set(next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "").split())
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extensions():
    if _flag("DBX_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ["CUDA_HOME"]
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    sanitize = _flag("DBX_SANITIZE")
    with_cuda = (not _flag("DBX_FORCE_CPU") and not sanitize and torch.version.cuda is not None
                 and (os.path.exists(nvcc) or shutil.which("nvcc") is not None))
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    sources = (["csrc/bindings.cpp", "csrc/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
               + (sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []))
    defines = [f'-DDBX_VERSION="{VERSION}"'] + (["-DDBX_WITH_CUDA"] if with_cuda else [])
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"] + defines + _host_cpu_flags()
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
    install_requires=["torch>=2.6", "numpy", "scikit-learn", "matplotlib", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "scipy", "hypothesis"]},
    entry_points={"console_scripts": ["diffusionblocks = diffusionblocks.cli:main"]},
)
