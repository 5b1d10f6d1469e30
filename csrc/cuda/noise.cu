// CUDA kernels of the two random ops: sample_sigma_ (the truncated log-normal σ sampler)
// and add_noise (z = y + σ·ε, z_in = c_in(σ)·z with ε drawn in-kernel). Both are pure
// functions of (seed, offset, index), with the same Philox stream and transforms as the
// CPU kernels (philox.h, lognormal.h): element e of add_noise takes normal e%4 of Philox
// group e/4, so CUDA, CPU and reference draw the same noise.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "accumulation.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "edm.h"
#include "lognormal.h"
#include "philox.h"

namespace dbx::cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- sample_sigma_

// Example i uses Philox counter (i, offset): words 0 and 1 give a 53-bit uniform.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_sigma_kernel(scalar_t* out, int64_t n, LognormalRange range, uint64_t offset, uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const U32x4 r = philox4x32_10(static_cast<uint64_t>(i), offset, seed);
    const double u = uniform53(r.x[0], r.x[1]);
    out[i] = static_cast<scalar_t>(
        truncated_lognormal(u, range));
  }
}

void sample_sigma_(Tensor& out, double sigma_lo, double sigma_hi, int64_t seed, int64_t offset, double p_mean,
                   double p_std) {
  check::sample_sigma_args(out, sigma_lo, sigma_hi, p_mean, p_std);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // Φ at the range ends, once per call on the host in double.
  const LognormalRange range = dbx::lognormal_range(sigma_lo, sigma_hi, p_mean, p_std);
  Tensor dst = out.is_contiguous() ? out : at::empty({n}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sample_sigma_cuda", [&] {
    const auto kernel = sample_sigma_kernel<scalar_t>;
    kernel<<<grid_blocks(kernel, n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dst.mutable_data_ptr<scalar_t>(), n, range, static_cast<uint64_t>(offset), static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dst.is_same(out)) out.copy_(dst.view(out.sizes()));
}

// ---------------------------------------------------------------- add_noise

// inputs (y), outputs (z, z_in): z = y + σ·ε in acc type, z_in = c_in(σ)·z from the unrounded z.
template <typename acc_t> struct AddNoiseOp {
  const acc_t* sigma;
  acc_t sigma_data;
  struct Coef {
    acc_t sigma, c_in;
  };
  __device__ Coef coef(uint64_t row) const {
    const acc_t s = sigma[row];
    return {s, dbx::c_in(s, sigma_data)};
  }
  __device__ void operator()(const Coef& k, uint64_t, float eps, const acc_t (&x)[1], acc_t (&y)[2]) const {
    // Rounded as the reference rounds it (σ·ε, then + y): no fused multiply-add.
    const acc_t z = add_rn(x[0], mul_rn(k.sigma, static_cast<acc_t>(eps)));
    y[0] = z;
    y[1] = k.c_in * z;
  }
};

std::tuple<Tensor, Tensor> add_noise(const Tensor& y, const Tensor& sigma, int64_t seed, int64_t offset,
                                     double sigma_data) {
  check::add_noise_args(y, sigma, sigma_data);
  const c10::cuda::CUDAGuard guard(y.device());
  const Tensor yc = y.contiguous();
  Tensor z = at::empty_like(yc), z_in = at::empty_like(yc);
  const int64_t numel = yc.numel(), rows = y.size(0), cols = rows ? numel / rows : 0;
  if (numel == 0) return {z, z_in};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "add_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma);
    const Streams<scalar_t, 1, 2> io{{yc.const_data_ptr<scalar_t>()},
                                     {z.mutable_data_ptr<scalar_t>(), z_in.mutable_data_ptr<scalar_t>()}};
    launch_rowwise</*NOISE=*/true>(io, AddNoiseOp<acc_t>{s.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data)},
                                   numel, cols, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  return {z, z_in};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CUDA, m) {
  m.impl("sample_sigma_", &sample_sigma_);
  m.impl("add_noise", &add_noise);
}

}  // namespace dbx::cuda
