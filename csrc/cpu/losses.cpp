// CPU kernels of the losses and their fused backwards:
//   edm_loss:               per example mean over the trailing dims of (F − f_target)²
//   weighted_cross_entropy: per example weight·(Σ_t CE_t)/T over logits [N, C] or [N, T, C]
// Reductions are deterministic: work is cut into pieces that depend only on the shape
// (never on the thread count) and the partial sums are combined in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/acc_io.h"
#include "cpu/rows.h"
#include "edm.h"

namespace dbx::cpu {
namespace {

using at::Tensor;

template <typename acc_t> Tensor acc_vector(const Tensor& s) {
  return s.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// Per-row coefficients of the F-space target f = (y − c_skip·z)·inv_c_out.
template <typename acc_t> struct Target {
  acc_t c_skip, inv_c_out;
  Target(acc_t sigma, acc_t sigma_data)
      : c_skip(dbx::c_skip(sigma, sigma_data)), inv_c_out(acc_t(1) / dbx::c_out(sigma, sigma_data)) {}
};

// ---------------------------------------------------------------- edm_loss

// Elements per reduction piece; a row longer than this is cut into equal pieces.
constexpr int64_t kPiece = 16384;
// Elements summed in the accumulation vectors before they are flushed into a double.
constexpr int64_t kFlush = 512;

// Σ (F − f_target)² over n elements of one row, in double.
template <typename scalar_t>
double squared_residual_sum(const scalar_t* F, const scalar_t* z, const scalar_t* y, int64_t n,
                            const Target<at::opmath_type<scalar_t>>& t) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec a(t.c_skip), b(t.inv_c_out);
  double total = 0;
  int64_t i = 0;
  while (i < n) {
    const int64_t stop = std::min(n, i + kFlush);
    Vec sum[IO::kVecs];
    for (auto& s : sum) s = Vec(acc_t(0));
    for (; i + IO::kSize <= stop; i += IO::kSize) {
      Vec fv[IO::kVecs], zv[IO::kVecs], yv[IO::kVecs];
      IO::load(F + i, fv);
      IO::load(z + i, zv);
      IO::load(y + i, yv);
      for (int64_t k = 0; k < IO::kVecs; ++k) {
        const Vec r = fv[k] - (yv[k] - a * zv[k]) * b;
        sum[k] = at::vec::fmadd(r, r, sum[k]);
      }
    }
    if (i < stop && stop == n) {  // the row's tail (zero lanes give r = 0)
      Vec fv[IO::kVecs], zv[IO::kVecs], yv[IO::kVecs];
      IO::load(F + i, n - i, fv);
      IO::load(z + i, n - i, zv);
      IO::load(y + i, n - i, yv);
      for (int64_t k = 0; k < IO::kVecs; ++k) {
        const Vec r = fv[k] - (yv[k] - a * zv[k]) * b;
        sum[k] = at::vec::fmadd(r, r, sum[k]);
      }
      i = n;
    }
    alignas(64) acc_t lanes[Vec::size()];
    for (int64_t k = 0; k < IO::kVecs; ++k) {
      sum[k].store(lanes);
      for (int64_t l = 0; l < Vec::size(); ++l) total += static_cast<double>(lanes[l]);
    }
  }
  return total;
}

Tensor edm_loss(const Tensor& F, const Tensor& z, const Tensor& y, const Tensor& sigma, double sigma_data) {
  check::edm_loss_args(F, z, y, sigma, sigma_data);
  const Tensor Fc = F.contiguous(), zc = z.contiguous(), yc = y.contiguous();
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  const auto acc = F.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({rows}, F.options().dtype(acc));
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "edm_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma);
    const acc_t* sp = s.data_ptr<acc_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    const scalar_t *fp = Fc.data_ptr<scalar_t>(), *zp = zc.data_ptr<scalar_t>(), *yp = yc.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    // Each row is cut into `pieces` pieces of `len` elements (the last may be shorter).
    const int64_t pieces = std::max<int64_t>(1, (cols + kPiece - 1) / kPiece);
    const int64_t len = (cols + pieces - 1) / pieces;
    std::vector<double> partial(rows * pieces, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, len));
    at::parallel_for(0, rows * pieces, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / pieces, c0 = (task - row * pieces) * len;
        const int64_t c1 = std::min(cols, c0 + len);
        if (c0 >= c1) continue;
        const int64_t at = row * cols + c0;
        partial[task] = squared_residual_sum<scalar_t>(fp + at, zp + at, yp + at, c1 - c0, Target<acc_t>(sp[row], sd));
      }
    });
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0;
      for (int64_t p = 0; p < pieces; ++p) sum += partial[row * pieces + p];
      op[row] = static_cast<acc_t>(sum / static_cast<double>(cols));  // cols = 0: nan, like mean()
    }
  });
  return out;
}

// ---------------------------------------------------------------- edm_loss_backward

// gF = k·r with r = F − f_target and k = 2·grad/M; gz = gF·c_skip·inv_c_out; gy = −gF·inv_c_out.
template <typename scalar_t, bool kZ, bool kY>
void edm_grad_segment(const scalar_t* F, const scalar_t* z, const scalar_t* y, scalar_t* gF, scalar_t* gz,
                      scalar_t* gy, int64_t n, at::opmath_type<scalar_t> k, const Target<at::opmath_type<scalar_t>>& t) {
  using IO = AccIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec a(t.c_skip), b(t.inv_c_out), kv(k), ab(t.c_skip * t.inv_c_out), nb(-t.inv_c_out);
  auto body = [&](int64_t i, int64_t m) {
    Vec fv[IO::kVecs], zv[IO::kVecs], yv[IO::kVecs], gzv[IO::kVecs], gyv[IO::kVecs];
    const bool full = m == IO::kSize;
    if (full) {
      IO::load(F + i, fv), IO::load(z + i, zv), IO::load(y + i, yv);
    } else {
      IO::load(F + i, m, fv), IO::load(z + i, m, zv), IO::load(y + i, m, yv);
    }
    for (int64_t j = 0; j < IO::kVecs; ++j) {
      fv[j] = kv * (fv[j] - (yv[j] - a * zv[j]) * b);
      if constexpr (kZ) gzv[j] = fv[j] * ab;
      if constexpr (kY) gyv[j] = fv[j] * nb;
    }
    if (full) {
      IO::store(gF + i, fv);
      if constexpr (kZ) IO::store(gz + i, gzv);
      if constexpr (kY) IO::store(gy + i, gyv);
    } else {
      IO::store(gF + i, m, fv);
      if constexpr (kZ) IO::store(gz + i, m, gzv);
      if constexpr (kY) IO::store(gy + i, m, gyv);
    }
  };
  int64_t i = 0;
  for (; i + IO::kSize <= n; i += IO::kSize) body(i, IO::kSize);
  if (i < n) body(i, n - i);
}

std::tuple<Tensor, Tensor, Tensor> edm_loss_backward(const Tensor& grad, const Tensor& F, const Tensor& z,
                                                     const Tensor& y, const Tensor& sigma, double sigma_data,
                                                     bool need_z, bool need_y) {
  check::edm_loss_backward_args(grad, F, z, y, sigma);
  const Tensor Fc = F.contiguous(), zc = z.contiguous(), yc = y.contiguous();
  Tensor gF = at::empty_like(Fc);
  Tensor gz = need_z ? at::empty_like(Fc) : F.new_empty({0});
  Tensor gy = need_y ? at::empty_like(Fc) : F.new_empty({0});
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  if (F.numel() == 0) return {gF, gz, gy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "edm_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma), g = acc_vector<acc_t>(grad);
    const acc_t *sp = s.data_ptr<acc_t>(), *gp = g.data_ptr<acc_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data), two_over_m = acc_t(2) / static_cast<acc_t>(cols);
    const scalar_t *fp = Fc.data_ptr<scalar_t>(), *zp = zc.data_ptr<scalar_t>(), *yp = yc.data_ptr<scalar_t>();
    scalar_t* gfp = gF.data_ptr<scalar_t>();
    scalar_t* gzp = need_z ? gz.data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = need_y ? gy.data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto kernel) {
      for_each_row_segment(rows, cols, [&](int64_t row, int64_t c0, int64_t c1, int64_t i) {
        kernel(fp + i, zp + i, yp + i, gfp + i, gzp ? gzp + i : nullptr, gyp ? gyp + i : nullptr, c1 - c0,
               gp[row] * two_over_m, Target<acc_t>(sp[row], sd));
      });
    };
    if (need_z && need_y) run(edm_grad_segment<scalar_t, true, true>);
    else if (need_z) run(edm_grad_segment<scalar_t, true, false>);
    else if (need_y) run(edm_grad_segment<scalar_t, false, true>);
    else run(edm_grad_segment<scalar_t, false, false>);
  });
  return {gF, gz, gy};
}

// ---------------------------------------------------------------- weighted_cross_entropy

// log Σ_c exp(x_c) over one row of C logits, vectorised: a max pass, then a sum-exp pass.
template <typename scalar_t> at::opmath_type<scalar_t> row_logsumexp(const scalar_t* x, int64_t C) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  Vec mx[IO::kVecs], v[IO::kVecs];
  for (auto& m : mx) m = Vec(kNegInf);
  int64_t i = 0;
  for (; i + IO::kSize <= C; i += IO::kSize) {
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) mx[k] = at::vec::maximum(mx[k], v[k]);
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    IO::mask_tail(v, C - i, kNegInf);
    for (int64_t k = 0; k < IO::kVecs; ++k) mx[k] = at::vec::maximum(mx[k], v[k]);
  }
  for (int64_t k = 1; k < IO::kVecs; ++k) mx[0] = at::vec::maximum(mx[0], mx[k]);
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, mx[0]);
  // An all −inf row (or one with +inf) must not produce inf − inf; torch shifts by 0 there.
  const acc_t shift = std::isinf(m) ? acc_t(0) : m;
  const Vec sv(shift);
  Vec sum[IO::kVecs];
  for (auto& s : sum) s = Vec(acc_t(0));
  for (i = 0; i + IO::kSize <= C; i += IO::kSize) {
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) sum[k] = sum[k] + (v[k] - sv).exp_u20();
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    IO::mask_tail(v, C - i, kNegInf);
    for (int64_t k = 0; k < IO::kVecs; ++k) sum[k] = sum[k] + (v[k] - sv).exp_u20();
  }
  for (int64_t k = 1; k < IO::kVecs; ++k) sum[0] = sum[0] + sum[k];
  const acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum[0]);
  return shift + std::log(total);
}

// Rows of [R, C] logits with their example index n = r / T.
struct CeShape {
  int64_t N, T, C;
};
CeShape ce_shape(const Tensor& logits) {
  const int64_t N = logits.size(0), C = logits.size(-1);
  return {N, logits.dim() == 3 ? logits.size(1) : 1, C};
}

std::tuple<Tensor, Tensor> weighted_cross_entropy(const Tensor& logits, const Tensor& target, const Tensor& weight,
                                                  int64_t ignore_index) {
  check::cross_entropy_args(logits, target, weight, ignore_index);
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  const CeShape shape = ce_shape(logits);
  const int64_t N = shape.N, T = shape.T, C = shape.C, R = N * T;
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = at::empty({N}, logits.options().dtype(acc));
  Tensor lse = at::empty(target.sizes(), logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "weighted_cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor w = acc_vector<acc_t>(weight);
    const acc_t* wp = w.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    std::vector<acc_t> ce(R);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrain / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = xp + r * C;
        const acc_t l = row_logsumexp(x, C);
        lp[r] = l;
        ce[r] = tp[r] == ignore_index ? acc_t(0) : l - static_cast<acc_t>(x[tp[r]]);
      }
    });
    acc_t* out = loss.data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int64_t t = 0; t < T; ++t) sum += static_cast<double>(ce[n * T + t]);
      out[n] = wp[n] * static_cast<acc_t>(sum / static_cast<double>(T));  // T = 0: nan, like mean()
    }
  });
  return {loss, lse};
}

// grad_logits = g·(softmax(x) − onehot(target)) with g = grad_n·weight_n/T; 0 on ignored rows.
template <typename scalar_t>
void ce_grad_row(const scalar_t* x, scalar_t* out, int64_t C, int64_t target, at::opmath_type<scalar_t> lse,
                 at::opmath_type<scalar_t> g) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec lv(lse), gv(g);
  Vec v[IO::kVecs];
  int64_t i = 0;
  for (; i + IO::kSize <= C; i += IO::kSize) {
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) v[k] = gv * (v[k] - lv).exp_u20();
    IO::store(out + i, v);
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) v[k] = gv * (v[k] - lv).exp_u20();
    IO::store(out + i, C - i, v);
  }
  out[target] = static_cast<scalar_t>(g * (std::exp(static_cast<acc_t>(x[target]) - lse) - acc_t(1)));
}

Tensor weighted_cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                                       const Tensor& weight, const Tensor& lse, int64_t ignore_index) {
  check::cross_entropy_backward_args(grad, logits, target, weight, lse);
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  Tensor out = at::empty_like(xc);
  const CeShape shape = ce_shape(logits);
  const int64_t T = shape.T, C = shape.C, R = shape.N * T;
  if (out.numel() == 0) return out;
  std::atomic<bool> bad_target{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "weighted_cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor w = acc_vector<acc_t>(weight), g = acc_vector<acc_t>(grad), l = acc_vector<acc_t>(lse);
    const acc_t *wp = w.data_ptr<acc_t>(), *gp = g.data_ptr<acc_t>(), *lp = l.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, kGrain / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / T;
        if (tp[r] == ignore_index) {
          std::fill(op + r * C, op + (r + 1) * C, scalar_t(0));
          continue;
        }
        if (tp[r] < 0 || tp[r] >= C) {  // never after a checked forward; no out-of-bounds write
          bad_target = true;
          continue;
        }
        const acc_t gr = gp[n] * wp[n] / static_cast<acc_t>(T);
        ce_grad_row(xp + r * C, op + r * C, C, tp[r], lp[r], gr);
      }
    });
  });
  TORCH_CHECK_VALUE(!bad_target, "target: expected class indices in [0, ", C, ") or ignore_index = ", ignore_index);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CPU, m) {
  m.impl("edm_loss", &edm_loss);
  m.impl("edm_loss_backward", &edm_loss_backward);
  m.impl("weighted_cross_entropy", &weighted_cross_entropy);
  m.impl("weighted_cross_entropy_backward", &weighted_cross_entropy_backward);
}

}  // namespace dbx::cpu
