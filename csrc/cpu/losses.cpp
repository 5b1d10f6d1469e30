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
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#endif

#include "accumulation.h"
#include "checks.h"
#include "cpu/acc_io.h"
#include "cpu/rows.h"
#include "edm.h"

namespace dbx::cpu {
namespace {

using at::Tensor;

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
  const auto acc = at::toOpMathType(F.scalar_type());
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
//
// Per row of C logits x: lse = m + ln Σ exp(x − m) with m the row max, CE = lse − x[target],
// and the backward g·(exp(x − lse) − onehot(target)). Each direction costs one exp per logit,
// and that exp, more than memory, bounds these kernels (a row is read from memory once; the
// second pass over it finds it in L1). Hence a lean exp, one vector log per G rows rather
// than a scalar log per row, and for small C tiles of G rows with lanes across rows: vectors
// along a row of 10 logits would be mostly tail.

// Shifts |s| below this keep the fast exp's rounding correction within ±¼ (see ExpShifted);
// rows with larger or non-finite shifts take a scalar path.
constexpr double kMaxShift = 1 << 22;

// exp(x − s)·2^bias for x ≤ s, lane-wise; bias = 0 but for the float version below.
template <typename acc_t> struct ExpShifted {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec s;
  explicit ExpShifted(const Vec& shift) : s(shift) {}
  Vec operator()(const Vec& x) const { return (x - s).exp_u20(); }
  Vec log_factor() const { return Vec(acc_t(0)); }  // ln 2^bias
  Vec inv_factor() const { return Vec(acc_t(1)); }  // 2^−bias
};

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
// 2^t for t ≤ ~0 in float: t = n + f with n integer and |f| ≤ ½; 2^f by a degree-5 minimax
// polynomial with p(0) = 1 (relative error 2e-7 as evaluated), times 2^n made in the exponent
// bits: ATen's exp_u20 is no more accurate and takes 1.5x the instructions. t is clamped at
// −125: the result is ≥ 2e-38 instead of 0 (negligible beside a softmax's largest term, ~1,
// and never denormal). A NaN passes the clamp (max returns its second operand) and the product.
inline __m256 exp2_nonpositive(__m256 t) {
  // Adding 1.5·2^23 rounds t to the integer n; the extra 127 leaves n + 127, the biased
  // exponent of 2^n, in the low mantissa bits of r.
  const __m256 kRound = _mm256_set1_ps(12583039.f);  // 1.5·2^23 + 127
  t = _mm256_max_ps(_mm256_set1_ps(-125.f), t);
  const __m256 r = _mm256_add_ps(t, kRound);
  const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(r, kRound));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.32029818e-3f), f, _mm256_set1_ps(9.67495236e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.55104725e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.40221664e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.93146586e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(r), 23)));
}

// float: the exponent (x − s)·log2(e) taken in one FMA as x·log2(e) + c, c = −s·log2(e)
// rounded to float (7% faster than a subtraction and a product). The rounding, bias =
// c + s·log2(e) (exact by FMA), is the same for every x: results are exp(x − s)·2^bias, and
// callers undo that factor once per row, so that precision does not depend on |s| (6e-7
// relative for x − s ≥ −10, as exp of the rounded difference x − s in float).
template <> struct ExpShifted<float> {
  using Vec = at::vec::Vectorized<float>;
  __m256 c, bias;
  explicit ExpShifted(const Vec& s) {
    c = _mm256_mul_ps(s, _mm256_set1_ps(-1.44269504f));
    bias = _mm256_fmadd_ps(s, _mm256_set1_ps(1.44269504f), c);
  }
  Vec operator()(const Vec& x) const { return exp2_nonpositive(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), c)); }
  Vec log_factor() const { return _mm256_mul_ps(bias, _mm256_set1_ps(0.693147181f)); }
  Vec inv_factor() const { return exp2_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), bias)); }
};
#endif

// ln s for s ≥ ~1 (a sum of exps whose largest term is ~1): float takes Sleef's 3.5-ULP log,
// 1.6x faster than the 1-ULP one behind Vectorized::log.
template <typename Vec> Vec sum_log(const Vec& s) { return s.log(); }
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
inline at::vec::Vectorized<float> sum_log(const at::vec::Vectorized<float>& s) { return Sleef_logf8_u35(s); }
#endif

// Lane-wise max in one instruction (ATen's maximum takes three to propagate NaN): a NaN
// logit that it drops still turns Σ exp into NaN.
template <typename Vec> Vec fast_max(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }

// G rows of C ≤ kMaxC logits transposed into C vectors of acc_t (vector c holds class c of
// each row). Rows past `rows` read as 0. Below kMaxC this beats lanes along the rows.
template <typename scalar_t> struct Tile {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t G = Vec::size();
  static constexpr int64_t kMaxC = 32;
  alignas(64) acc_t v[kMaxC][G];

  // Full float tiles move as G×G blocks transposed in registers (the last block overlapping
  // its predecessor when G does not divide C): element copies would stall the vector loads
  // that follow them (no store-to-load forwarding from several stores) and cost 2x overall.
  static bool blocked(int64_t rows, int64_t C) { return std::is_same_v<scalar_t, float> && rows == G && C >= G; }

  void load(const scalar_t* x, int64_t rows, int64_t C) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (blocked(rows, C)) {
        for (int64_t c0 = 0; c0 < C; c0 += G) {
          const int64_t c = std::min(c0, C - G);
          at::vec::transpose_mxn<float, G, G>(x + c, C, v[c], G);
        }
        return;
      }
    }
    for (int64_t j = 0; j < G; ++j)
      for (int64_t c = 0; c < C; ++c) v[c][j] = j < rows ? static_cast<acc_t>(x[j * C + c]) : acc_t(0);
  }
  void store(scalar_t* out, int64_t rows, int64_t C) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (blocked(rows, C)) {
        for (int64_t c0 = 0; c0 < C; c0 += G) {
          const int64_t c = std::min(c0, C - G);
          at::vec::transpose_mxn<float, G, G>(v[c], G, out + c, C);
        }
        return;
      }
    }
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < C; ++c) out[j * C + c] = static_cast<scalar_t>(v[c][j]);
  }
  Vec column(int64_t c) const { return Vec::loadu(v[c]); }
  void set_column(int64_t c, const Vec& col) { col.store(v[c]); }
};

// Row max m and s = Σ exp(x − m)·2^bias (bias: ExpShifted(m)'s): lanes for the rows of a
// tile, or scalars for one row.
template <typename T> struct MaxSum {
  T m, s;
};

template <typename scalar_t>
MaxSum<at::vec::Vectorized<at::opmath_type<scalar_t>>> tile_sums(const Tile<scalar_t>& tile, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  auto m = tile.column(0);
  for (int64_t c = 1; c < C; ++c) m = fast_max(m, tile.column(c));
  const ExpShifted<acc_t> exp_shifted(m);
  auto s = exp_shifted(tile.column(0));
  for (int64_t c = 1; c < C; ++c) s = s + exp_shifted(tile.column(c));
  return {m, s};
}

// One row of C > Tile::kMaxC logits, lanes along the row; s = 0 where m is beyond kMaxShift.
template <typename scalar_t> MaxSum<at::opmath_type<scalar_t>> row_sums(const scalar_t* x, int64_t C) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // The max pass keeps four accumulators taking turns over the packs: with one, each max
  // waits on the previous one's latency (the forward took 1.2x as long at C = 1024). The exp
  // pass is bound by the exp's throughput, so one accumulator does there.
  constexpr int64_t kChains = 4;
  Vec mx[kChains][IO::kVecs], v[IO::kVecs];
  for (auto& chain : mx)
    for (auto& m : chain) m = Vec(kNegInf);
  int64_t i = 0;
  for (; i + kChains * IO::kSize <= C; i += kChains * IO::kSize) {
    for (int64_t q = 0; q < kChains; ++q) {
      IO::load(x + i + q * IO::kSize, v);
      for (int64_t k = 0; k < IO::kVecs; ++k) mx[q][k] = fast_max(mx[q][k], v[k]);
    }
  }
  for (; i + IO::kSize <= C; i += IO::kSize) {
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) mx[0][k] = fast_max(mx[0][k], v[k]);
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    IO::mask_tail(v, C - i, kNegInf);
    for (int64_t k = 0; k < IO::kVecs; ++k) mx[0][k] = fast_max(mx[0][k], v[k]);
  }
  for (int64_t q = 0; q < kChains; ++q)
    for (int64_t k = 0; k < IO::kVecs; ++k) mx[0][0] = fast_max(mx[0][0], mx[q][k]);
  const acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return fast_max(a, b); }, mx[0][0]);
  if (!(std::abs(m) < kMaxShift)) return {m, acc_t(0)};
  const ExpShifted<acc_t> exp_shifted{Vec(m)};
  Vec sum[IO::kVecs];
  for (auto& s : sum) s = Vec(acc_t(0));
  for (i = 0; i + IO::kSize <= C; i += IO::kSize) {
    // The max pass waits on memory, this one on the exp: fetch the next row meanwhile (a
    // prefetch never faults, so past the last row too).
    __builtin_prefetch(x + C + i);
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) sum[k] = sum[k] + exp_shifted(v[k]);
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) v[k] = exp_shifted(v[k]);
    IO::mask_tail(v, C - i, acc_t(0));
    for (int64_t k = 0; k < IO::kVecs; ++k) sum[k] = sum[k] + v[k];
  }
  for (int64_t k = 1; k < IO::kVecs; ++k) sum[0] = sum[0] + sum[k];
  return {m, at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum[0])};
}

// A row whose max is not finite or not below kMaxShift, in double: lse = shift + ln Σ exp(x −
// shift), shifted by the max when finite, else by 0 as torch.logsumexp does (NaN if the row
// holds one, else ±inf). Returns {shift, ln Σ}.
template <typename scalar_t> std::pair<double, double> scalar_shift_log_sum(const scalar_t* x, int64_t C) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(x[c]));  // skips NaN
  const double shift = std::isfinite(m) ? m : 0.0;
  double sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += std::exp(static_cast<double>(x[c]) - shift);
  return {shift, std::log(sum)};
}

// Rows per block: a multiple of G (the tiles then never straddle blocks, whatever the thread
// count) whose per-row values fit in small stack arrays.
constexpr int64_t kBlockRows = 64;

// fn(first_row, rows) for the blocks of the R rows, in parallel.
template <typename Fn> void for_each_row_block(int64_t R, int64_t C, const Fn& fn) {
  const int64_t blocks = (R + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / (kBlockRows * C)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b * kBlockRows, std::min(kBlockRows, R - b * kBlockRows));
  });
}

std::tuple<Tensor, Tensor> weighted_cross_entropy(const Tensor& logits, const Tensor& target, const Tensor& weight,
                                                  int64_t ignore_index) {
  const check::LogitsShape shape = check::cross_entropy_args(logits, target, weight, ignore_index);
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  const int64_t N = shape.N, T = shape.T, C = shape.C, R = N * T;
  const auto acc = at::toOpMathType(logits.scalar_type());
  Tensor loss = at::empty({N}, logits.options().dtype(acc));
  Tensor lse = at::empty(target.sizes(), logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "weighted_cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t G = Vec::size();
    const Tensor w = acc_vector<acc_t>(weight);
    const acc_t* wp = w.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    // With T = 1 the loss is w·CE row by row; else the CEs are kept for the mean over T.
    const Tensor ce_rows = T == 1 ? Tensor() : at::empty({R}, logits.options().dtype(acc));
    acc_t* ce = T == 1 ? loss.data_ptr<acc_t>() : ce_rows.data_ptr<acc_t>();
    const acc_t* row_weight = T == 1 ? wp : nullptr;
    for_each_row_block(R, C, [&](int64_t r0, int64_t rows) {
      // First m and s of every row of the block, then lse and CE G rows at a time: in a loop of
      // their own, the vector logs overlap one another instead of each waiting on its sums.
      alignas(64) acc_t m[kBlockRows], s[kBlockRows], xt[kBlockRows], counted[kBlockRows];
      for (int64_t j0 = 0; j0 < rows; j0 += G) {
        const scalar_t* x = xp + (r0 + j0) * C;
        if (C <= Tile<scalar_t>::kMaxC) {
          Tile<scalar_t> tile;
          tile.load(x, std::min(G, rows - j0), C);
          const auto sums = tile_sums(tile, C);
          sums.m.store(m + j0);
          sums.s.store(s + j0);
        } else {
          for (int64_t j = 0; j < std::min(G, rows - j0); ++j) {
            const auto sums = row_sums(x + j * C, C);
            m[j0 + j] = sums.m;
            s[j0 + j] = sums.s;
          }
        }
      }
      const int64_t lanes = (rows + G - 1) / G * G;
      for (int64_t j = 0; j < lanes; ++j) {  // lanes past the last row: any finite values
        const int64_t t = j < rows ? tp[r0 + j] : ignore_index;
        counted[j] = t != ignore_index;
        xt[j] = t != ignore_index ? static_cast<acc_t>(xp[(r0 + j) * C + t]) : acc_t(0);
        if (j >= rows) m[j] = 0, s[j] = 1;
      }
      for (int64_t j0 = 0; j0 < rows; j0 += G) {
        const int64_t n = std::min(G, rows - j0), r = r0 + j0;
        const Vec mv = Vec::loadu(m + j0);
        const Vec ln_sum = sum_log(Vec::loadu(s + j0)) - ExpShifted<acc_t>(mv).log_factor();
        (mv + ln_sum).store(lp + r, n);
        // (m − x_t) + ln s, not lse − x_t: exact where m dwarfs ln s (logits of −1e30)
        const Vec row_ce = (mv - Vec::loadu(xt + j0)) + ln_sum;
        Vec ce_v = Vec::blendv(Vec(acc_t(0)), row_ce, Vec::loadu(counted + j0) != Vec(acc_t(0)));
        if (row_weight) ce_v = ce_v * Vec::loadu(row_weight + r, n);
        ce_v.store(ce + r, n);
      }
      for (int64_t j = 0; j < rows; ++j) {
        if (std::abs(m[j]) < kMaxShift) continue;
        const int64_t r = r0 + j;
        const auto [shift, ln_sum] = scalar_shift_log_sum(xp + r * C, C);
        lp[r] = static_cast<acc_t>(shift + ln_sum);
        const acc_t ce_r = counted[j] ? static_cast<acc_t>((shift - xt[j]) + ln_sum) : acc_t(0);
        ce[r] = row_weight ? row_weight[r] * ce_r : ce_r;
      }
    });
    if (T != 1) {
      acc_t* out = loss.data_ptr<acc_t>();
      at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, T)), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          double sum = 0;
          for (int64_t t = 0; t < T; ++t) sum += static_cast<double>(ce[n * T + t]);
          out[n] = wp[n] * static_cast<acc_t>(sum / static_cast<double>(T));  // T = 0: nan, like mean()
        }
      });
    }
  });
  return {loss, lse};
}

// One logit's gradient g·(exp(x − lse) − [it is the target's]), scalar and exact.
template <typename acc_t> acc_t ce_grad(acc_t x, acc_t lse, acc_t g, bool is_target) {
  return g * (std::exp(x - lse) - (is_target ? acc_t(1) : acc_t(0)));
}

// One row: out = g·(exp(x − lse) − onehot(target)), lanes along the row.
template <typename scalar_t>
void ce_grad_row(const scalar_t* x, scalar_t* out, int64_t C, int64_t target, at::opmath_type<scalar_t> lse,
                 at::opmath_type<scalar_t> g) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  if (!(std::abs(lse) < kMaxShift)) {
    for (int64_t c = 0; c < C; ++c)
      out[c] = static_cast<scalar_t>(ce_grad(static_cast<acc_t>(x[c]), lse, g, c == target));
    return;
  }
  const ExpShifted<acc_t> exp_shifted{Vec(lse)};
  const Vec gv = Vec(g) * exp_shifted.inv_factor();
  Vec v[IO::kVecs];
  int64_t i = 0;
  for (; i + IO::kSize <= C; i += IO::kSize) {
    IO::load(x + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) v[k] = gv * exp_shifted(v[k]);
    IO::store(out + i, v);
  }
  if (i < C) {
    IO::load(x + i, C - i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) v[k] = gv * exp_shifted(v[k]);
    IO::store(out + i, C - i, v);
  }
  out[target] = static_cast<scalar_t>(ce_grad(static_cast<acc_t>(x[target]), lse, g, true));
}

Tensor weighted_cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                                       const Tensor& weight, const Tensor& lse, int64_t ignore_index) {
  const check::LogitsShape shape = check::cross_entropy_backward_args(grad, logits, target, weight, lse);
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  Tensor out = at::empty_like(xc);
  const int64_t T = shape.T, C = shape.C, R = shape.N * T;
  if (out.numel() == 0) return out;
  std::atomic<bool> bad_target{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "weighted_cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t G = Vec::size();
    const Tensor w = acc_vector<acc_t>(weight), g = acc_vector<acc_t>(grad), l = acc_vector<acc_t>(lse);
    const acc_t *wp = w.data_ptr<acc_t>(), *gp = g.data_ptr<acc_t>(), *lp = l.data_ptr<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_row_block(R, C, [&](int64_t r0, int64_t rows) {
      // Per row: g = grad_n·weight_n/T, the target as acc_t (for the tiles' one-hot), and
      // whether the gradient is nonzero: not for ignore_index, nor for a bad target, reported
      // after the loop (never after a checked forward; no out-of-bounds write).
      alignas(64) acc_t coef[kBlockRows], tgt[kBlockRows];
      bool live[kBlockRows];
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t r = r0 + j, t = tp[r], n = T == 1 ? r : r / T;
        live[j] = t != ignore_index && t >= 0 && t < C;
        if (t != ignore_index && !live[j]) bad_target = true;
        coef[j] = gp[n] * wp[n] / static_cast<acc_t>(T);
        tgt[j] = static_cast<acc_t>(t);
      }
      for (int64_t j0 = 0; j0 < rows; j0 += G) {
        const int64_t n = std::min(G, rows - j0), r = r0 + j0;
        const scalar_t* x = xp + r * C;
        scalar_t* o = op + r * C;
        bool tiled = C <= Tile<scalar_t>::kMaxC;
        for (int64_t j = 0; j < n; ++j) tiled &= std::abs(lp[r + j]) < kMaxShift;
        if (tiled) {
          Tile<scalar_t> tile;
          tile.load(x, n, C);
          const ExpShifted<acc_t> exp_shifted{Vec::loadu(lp + r, n)};
          const Vec gv = Vec::loadu(coef + j0, n), tv = Vec::loadu(tgt + j0, n);
          const Vec gv_unbiased = gv * exp_shifted.inv_factor();
          for (int64_t c = 0; c < C; ++c) {
            const Vec onehot = Vec::blendv(Vec(acc_t(0)), gv, tv == Vec(static_cast<acc_t>(c)));
            tile.set_column(c, gv_unbiased * exp_shifted(tile.column(c)) - onehot);
          }
          tile.store(o, n, C);
        } else {
          for (int64_t j = 0; j < n; ++j)
            if (live[j0 + j]) ce_grad_row(x + j * C, o + j * C, C, tp[r + j], lp[r + j], coef[j0 + j]);
        }
        for (int64_t j = 0; j < n; ++j)
          if (!live[j0 + j]) std::fill(o + j * C, o + (j + 1) * C, scalar_t(0));
      }
    });
  });
  TORCH_CHECK_VALUE(!bad_target, "target: expected class indices in [0, ", check::num(C), ") or ignore_index = ",
                    check::num(ignore_index));
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
