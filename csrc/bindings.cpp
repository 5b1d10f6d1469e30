// The only file that includes <torch/extension.h>: the pybind11 module `_C` (build facts)
// and the op schemas. Kernels register themselves per device in cpu/*.cpp and cuda/*.cu.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <string>

// setup.py defines these from what it built (diffusionblocks_ext/_version.py, the torch it
// compiled against, the instruction set, the CUDA architectures and toolkit); a build that
// does not (CMake) reports what the headers know.
#ifndef DBX_VERSION
#define DBX_VERSION "unknown"
#endif
#ifndef DBX_TORCH_BUILT
#define DBX_TORCH_BUILT ""
#endif
#ifndef DBX_CPU_FLAGS
#define DBX_CPU_FLAGS "compiler-default"
#endif
#ifndef DBX_CUDA_ARCHS
#define DBX_CUDA_ARCHS ""
#endif
#ifndef DBX_CUDA_TOOLKIT
#define DBX_CUDA_TOOLKIT ""
#endif
#ifndef DBX_BUILD_OPTIONS
#define DBX_BUILD_OPTIONS ""
#endif

namespace {

bool has_cuda_kernels() {
#ifdef DBX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

std::string torch_built() {
  std::string from_setup = DBX_TORCH_BUILT;
  if (!from_setup.empty()) return from_setup;
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

// What was compiled in, for `python -m diffusionblocks_ext` (the build report).
pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = DBX_VERSION;
  info["torch"] = torch_built();
  info["cpu_flags"] = DBX_CPU_FLAGS;
  info["cuda_kernels"] = has_cuda_kernels();
  info["cuda_archs"] = DBX_CUDA_ARCHS;
  info["cuda_toolkit"] = DBX_CUDA_TOOLKIT;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["openmp"] = openmp_version();
  info["build_options"] = DBX_BUILD_OPTIONS;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "Compiled kernels of diffusionblocks_ext; the ops are torch.ops.diffusionblocks.*";
  module.def("has_cuda_kernels", &has_cuda_kernels, "True when the CUDA kernels were compiled in");
  module.def("num_threads", [] { return at::get_num_threads(); },
             "Threads at::parallel_for uses (1 means OpenMP was not linked)");
  module.def("parallel_info", [] { return at::get_parallel_info(); }, "ATen's parallel backend summary");
  module.def("build_info", &build_info, "What was compiled in: versions, instruction set, CUDA archs, OpenMP");
  module.attr("__version__") = DBX_VERSION;
}

// σ is a per-example Tensor [N], never a float: a float argument would make torch.compile
// recompile for every new value. seed/offset are uint64 values carried as int64.
TORCH_LIBRARY(diffusionblocks, m) {
  m.def("sample_sigma_(Tensor(a!) out, float sigma_lo, float sigma_hi, int seed, int offset, "
        "float p_mean, float p_std) -> ()");
  m.def("add_noise(Tensor y, Tensor sigma, int seed, int offset, float sigma_data) -> (Tensor, Tensor)");
  m.def("denoise(Tensor F, Tensor z, Tensor sigma, float sigma_data) -> Tensor");
  m.def("euler_step(Tensor z, Tensor F, Tensor sigma, Tensor sigma_next, float sigma_data, "
        "bool denoised) -> Tensor");
  m.def("heun_step(Tensor z, Tensor F, Tensor z_euler, Tensor F_euler, Tensor sigma, "
        "Tensor sigma_next, float sigma_data, bool denoised) -> Tensor");
  m.def("edm_loss(Tensor F, Tensor z, Tensor y, Tensor sigma, float sigma_data) -> Tensor");
  m.def("edm_loss_backward(Tensor grad, Tensor F, Tensor z, Tensor y, Tensor sigma, float sigma_data, "
        "bool need_z, bool need_y) -> (Tensor, Tensor, Tensor)");
  m.def("weighted_cross_entropy(Tensor logits, Tensor target, Tensor weight, int ignore_index) "
        "-> (Tensor, Tensor)");
  m.def("weighted_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, Tensor weight, "
        "Tensor lse, int ignore_index) -> Tensor");
}
