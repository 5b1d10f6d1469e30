// CPU kernels of the linear denoising updates: denoise, euler_step, heun_step.
// out = Σ_k a_k(σ, σ_next)·x_k per row, one fused vectorised pass (D never materialised).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "accumulation.h"
#include "checks.h"
#include "cpu/rows.h"
#include "edm.h"

namespace dbx::cpu {
namespace {

using at::Tensor;

Tensor denoise(const Tensor& F, const Tensor& z, const Tensor& sigma, double sigma_data) {
  check::denoise_args(F, z, sigma, sigma_data);
  const Tensor Fc = F.contiguous(), zc = z.contiguous();
  Tensor out = at::empty_like(Fc);
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "denoise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor s = acc_vector<acc_t>(sigma);
    const acc_t* sp = s.data_ptr<acc_t>();
    const scalar_t* fp = Fc.data_ptr<scalar_t>();
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    for_each_row_segment(rows, cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t i) {
      const Vec a_z(dbx::c_skip(sp[row], sd)), a_f(dbx::c_out(sp[row], sd));
      at::vec::map2([&](Vec zv, Vec fv) { return at::vec::fmadd(a_z, zv, a_f * fv); }, op + i, zp + i,
                    fp + i, c1 - c0);
    });
  });
  return out;
}

Tensor euler_step(const Tensor& z, const Tensor& F, const Tensor& sigma, const Tensor& sigma_next,
                  double sigma_data, bool denoised) {
  check::euler_step_args(z, F, sigma, sigma_next, sigma_data);
  const Tensor zc = z.contiguous(), Fc = F.contiguous();
  Tensor out = at::empty_like(zc);
  const int64_t rows = z.size(0), cols = rows ? z.numel() / rows : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "euler_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor s = acc_vector<acc_t>(sigma), sn = acc_vector<acc_t>(sigma_next);
    const acc_t *sp = s.data_ptr<acc_t>(), *snp = sn.data_ptr<acc_t>();
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const scalar_t* fp = Fc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    for_each_row_segment(rows, cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t i) {
      const auto k = dbx::euler_coefficients(sp[row], snp[row], sd, denoised);
      const Vec a_z(k.a_z), a_f(k.a_f);
      at::vec::map2([&](Vec zv, Vec fv) { return at::vec::fmadd(a_z, zv, a_f * fv); }, op + i, zp + i,
                    fp + i, c1 - c0);
    });
  });
  return out;
}

Tensor heun_step(const Tensor& z, const Tensor& F, const Tensor& z_euler, const Tensor& F_euler,
                 const Tensor& sigma, const Tensor& sigma_next, double sigma_data, bool denoised) {
  check::heun_step_args(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data);
  const Tensor zc = z.contiguous(), Fc = F.contiguous(), z2 = z_euler.contiguous(), F2 = F_euler.contiguous();
  Tensor out = at::empty_like(zc);
  const int64_t rows = z.size(0), cols = rows ? z.numel() / rows : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "heun_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const Tensor s = acc_vector<acc_t>(sigma), sn = acc_vector<acc_t>(sigma_next);
    const acc_t *sp = s.data_ptr<acc_t>(), *snp = sn.data_ptr<acc_t>();
    const scalar_t *zp = zc.data_ptr<scalar_t>(), *fp = Fc.data_ptr<scalar_t>();
    const scalar_t *z2p = z2.data_ptr<scalar_t>(), *f2p = F2.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    for_each_row_segment(rows, cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t i) {
      const auto k = dbx::heun_coefficients(sp[row], snp[row], sd, denoised);
      const Vec a_z(k.first.a_z), a_f(k.first.a_f), b_z(k.second.a_z), b_f(k.second.a_f);
      at::vec::map4(
          [&](Vec zv, Vec fv, Vec z2v, Vec f2v) {
            return at::vec::fmadd(a_z, zv, at::vec::fmadd(a_f, fv, at::vec::fmadd(b_z, z2v, b_f * f2v)));
          },
          op + i, zp + i, fp + i, z2p + i, f2p + i, c1 - c0);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CPU, m) {
  m.impl("denoise", &denoise);
  m.impl("euler_step", &euler_step);
  m.impl("heun_step", &heun_step);
}

}  // namespace dbx::cpu
