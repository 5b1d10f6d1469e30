// CUDA kernels of the linear denoising updates: denoise, euler_step, heun_step.
// out = Σ_k a_k(σ, σ_next)·x_k per row, one fused vectorised pass (D never materialised);
// the coefficients come from edm.h, computed per chunk from the row's σ.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "accumulation.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "edm.h"

namespace dbx::cuda {
namespace {

using at::Tensor;

template <typename acc_t> struct DenoiseOp {  // inputs (F, z)
  const acc_t* sigma;
  acc_t sigma_data;
  __device__ Affine2<acc_t> coef(uint64_t row) const {
    const acc_t s = sigma[row];
    return {dbx::c_skip(s, sigma_data), dbx::c_out(s, sigma_data)};
  }
  __device__ void operator()(const Affine2<acc_t>& k, uint64_t, float, const acc_t (&x)[2], acc_t (&y)[1]) const {
    y[0] = k.a_z * x[1] + k.a_f * x[0];
  }
};

template <typename acc_t> struct EulerOp {  // inputs (z, F)
  const acc_t *sigma, *sigma_next;
  acc_t sigma_data;
  bool denoised;
  __device__ Affine2<acc_t> coef(uint64_t row) const {
    return dbx::euler_coefficients(sigma[row], sigma_next[row], sigma_data, denoised);
  }
  __device__ void operator()(const Affine2<acc_t>& k, uint64_t, float, const acc_t (&x)[2], acc_t (&y)[1]) const {
    y[0] = k.a_z * x[0] + k.a_f * x[1];
  }
};

template <typename acc_t> struct HeunOp {  // inputs (z, F, z_euler, F_euler)
  const acc_t *sigma, *sigma_next;
  acc_t sigma_data;
  bool denoised;
  __device__ Affine4<acc_t> coef(uint64_t row) const {
    return dbx::heun_coefficients(sigma[row], sigma_next[row], sigma_data, denoised);
  }
  __device__ void operator()(const Affine4<acc_t>& k, uint64_t, float, const acc_t (&x)[4], acc_t (&y)[1]) const {
    y[0] = k.first.a_z * x[0] + (k.first.a_f * x[1] + (k.second.a_z * x[2] + k.second.a_f * x[3]));
  }
};

Tensor denoise(const Tensor& F, const Tensor& z, const Tensor& sigma, double sigma_data) {
  check::denoise_args(F, z, sigma, sigma_data);
  const c10::cuda::CUDAGuard guard(F.device());
  const Tensor Fc = F.contiguous(), zc = z.contiguous();
  Tensor out = at::empty_like(Fc);
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "denoise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma);
    const Streams<scalar_t, 2, 1> io{{Fc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>()},
                                     {out.mutable_data_ptr<scalar_t>()}};
    launch_rowwise(io, DenoiseOp<acc_t>{s.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data)},
                   out.numel(), cols);
  });
  return out;
}

Tensor euler_step(const Tensor& z, const Tensor& F, const Tensor& sigma, const Tensor& sigma_next,
                  double sigma_data, bool denoised) {
  check::euler_step_args(z, F, sigma, sigma_next, sigma_data);
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous(), Fc = F.contiguous();
  Tensor out = at::empty_like(zc);
  const int64_t rows = z.size(0), cols = rows ? z.numel() / rows : 0;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "euler_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma), sn = acc_vector<acc_t>(sigma_next);
    const Streams<scalar_t, 2, 1> io{{zc.const_data_ptr<scalar_t>(), Fc.const_data_ptr<scalar_t>()},
                                     {out.mutable_data_ptr<scalar_t>()}};
    launch_rowwise(io,
                   EulerOp<acc_t>{s.const_data_ptr<acc_t>(), sn.const_data_ptr<acc_t>(),
                                  static_cast<acc_t>(sigma_data), denoised},
                   out.numel(), cols);
  });
  return out;
}

Tensor heun_step(const Tensor& z, const Tensor& F, const Tensor& z_euler, const Tensor& F_euler,
                 const Tensor& sigma, const Tensor& sigma_next, double sigma_data, bool denoised) {
  check::heun_step_args(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data);
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous(), Fc = F.contiguous(), z2 = z_euler.contiguous(), F2 = F_euler.contiguous();
  Tensor out = at::empty_like(zc);
  const int64_t rows = z.size(0), cols = rows ? z.numel() / rows : 0;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "heun_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma), sn = acc_vector<acc_t>(sigma_next);
    const Streams<scalar_t, 4, 1> io{{zc.const_data_ptr<scalar_t>(), Fc.const_data_ptr<scalar_t>(),
                                      z2.const_data_ptr<scalar_t>(), F2.const_data_ptr<scalar_t>()},
                                     {out.mutable_data_ptr<scalar_t>()}};
    launch_rowwise(io,
                   HeunOp<acc_t>{s.const_data_ptr<acc_t>(), sn.const_data_ptr<acc_t>(),
                                 static_cast<acc_t>(sigma_data), denoised},
                   out.numel(), cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CUDA, m) {
  m.impl("denoise", &denoise);
  m.impl("euler_step", &euler_step);
  m.impl("heun_step", &heun_step);
}

}  // namespace dbx::cuda
