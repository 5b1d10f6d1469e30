// The only file that includes <torch/extension.h>: the pybind11 module `_C` (build facts)
// and the op schemas. Kernels register themselves per device in cpu/*.cpp and cuda/*.cu.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifndef DBX_VERSION
#define DBX_VERSION "0.0.0"
#endif

namespace {

bool has_cuda_kernels() {
#ifdef DBX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "Compiled kernels of diffusionblocks_ext; the ops are torch.ops.diffusionblocks.*";
  module.def("has_cuda_kernels", &has_cuda_kernels, "True when the CUDA kernels were compiled in");
  module.def("num_threads", [] { return at::get_num_threads(); },
             "Threads at::parallel_for uses (1 means OpenMP was not linked)");
  module.def("parallel_info", [] { return at::get_parallel_info(); }, "ATen's parallel backend summary");
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
