// CUDA kernels of the losses and their fused backwards:
//   edm_loss:               per example mean over the trailing dims of (F − f_target)²
//   weighted_cross_entropy: per example weight·(Σ_t CE_t)/T over logits [N, C] or [N, T, C]
// Reductions are deterministic: no float atomics; the work split depends only on the shape
// and the device's SM count, and partial results are combined in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "accumulation.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "edm.h"

namespace dbx::cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- edm_loss

// Per-row coefficients of the F-space target f = (y − c_skip·z)·inv_c_out.
template <typename acc_t> struct Target {
  acc_t c_skip, inv_c_out;
  __device__ Target(acc_t sigma, acc_t sigma_data)
      : c_skip(dbx::c_skip(sigma, sigma_data)), inv_c_out(acc_t(1) / dbx::c_out(sigma, sigma_data)) {}
};

// Σ (F − f_target)² over the flat range [a, b) of one row, this thread's share of nt.
template <int VEC, typename index_t, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t squared_residual_sum(const scalar_t* F, const scalar_t* z, const scalar_t* y,
                                                      index_t a, index_t b, index_t t, index_t nt,
                                                      const Target<acc_t>& k) {
  acc_t sum = 0;
  auto one = [&](acc_t f, acc_t zz, acc_t yy) {
    const acc_t r = f - dbx::f_target(yy, zz, k.c_skip, k.inv_c_out);
    sum += r * r;
  };
  for_range<VEC>(
      a, b, t, nt,
      [&](index_t e) { one(static_cast<acc_t>(F[e]), static_cast<acc_t>(z[e]), static_cast<acc_t>(y[e])); },
      [&](index_t e) {
        using P = Pack<scalar_t, VEC>;
        const P pf = *reinterpret_cast<const P*>(F + e);
        const P pz = *reinterpret_cast<const P*>(z + e);
        const P py = *reinterpret_cast<const P*>(y + e);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          one(static_cast<acc_t>(pf.v[j]), static_cast<acc_t>(pz.v[j]), static_cast<acc_t>(py.v[j]));
      });
  return sum;
}

// Short rows: one warp per row, the warp's sum is the row's.
template <int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    edm_loss_warp_kernel(const scalar_t* F, const scalar_t* z, const scalar_t* y, const acc_t* sigma,
                         acc_t sigma_data, index_t rows, index_t cols, acc_t* out) {
  const index_t lane = threadIdx.x % 32;
  const index_t warps = static_cast<index_t>(gridDim.x) * (kThreads / 32);
  // row is the same for the 32 lanes of a warp, so the shuffles see full warps.
  for (index_t row = (static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; row < rows; row += warps) {
    const Target<acc_t> k(sigma[row], sigma_data);
    const index_t a = row * cols;
    acc_t sum = squared_residual_sum<VEC>(F, z, y, a, a + cols, lane, index_t(32), k);
    sum = warp_sum(sum);
    if (lane == 0) out[row] = sum / static_cast<acc_t>(cols);
  }
}

// Long rows: block (s, r) sums columns [s·chunk, (s+1)·chunk) of row r. With one split the
// block writes the row's mean, else its partial sum (reduced by sum_rows_kernel).
template <int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    edm_loss_block_kernel(const scalar_t* F, const scalar_t* z, const scalar_t* y, const acc_t* sigma,
                          acc_t sigma_data, index_t rows, index_t cols, index_t chunk, acc_t* out, acc_t* partial) {
  __shared__ acc_t smem[32];
  const index_t c0 = static_cast<index_t>(blockIdx.x) * chunk;
  const index_t c1 = min(cols, c0 + chunk);
  for (index_t row = blockIdx.y; row < rows; row += gridDim.y) {  // uniform over the block
    const Target<acc_t> k(sigma[row], sigma_data);
    const index_t a = row * cols;
    acc_t sum = squared_residual_sum<VEC>(F, z, y, a + c0, a + c1, static_cast<index_t>(threadIdx.x),
                                          static_cast<index_t>(kThreads), k);
    sum = block_sum(sum, smem);
    if (threadIdx.x == 0) {
      if (gridDim.x == 1) {
        out[row] = sum / static_cast<acc_t>(cols);
      } else {
        partial[static_cast<int64_t>(row) * gridDim.x + blockIdx.x] = sum;
      }
    }
  }
}

// Rows up to this long take a warp each; longer ones a block (or several).
constexpr int64_t kWarpRowMax = 1024;

Tensor edm_loss(const Tensor& F, const Tensor& z, const Tensor& y, const Tensor& sigma, double sigma_data) {
  check::edm_loss_args(F, z, y, sigma, sigma_data);
  const c10::cuda::CUDAGuard guard(F.device());
  const Tensor Fc = F.contiguous(), zc = z.contiguous(), yc = y.contiguous();
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  Tensor out = at::empty({rows}, F.options().dtype(at::toOpMathType(F.scalar_type())));
  if (rows == 0) return out;
  if (cols == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing, like mean()
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "edm_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const Tensor s = acc_vector<acc_t>(sigma);
    const scalar_t *fp = Fc.const_data_ptr<scalar_t>(), *zp = zc.const_data_ptr<scalar_t>(),
                   *yp = yc.const_data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const bool aligned = is_aligned(fp, 16) && is_aligned(zp, 16) && is_aligned(yp, 16);

    if (cols <= kWarpRowMax) {
      auto go = [&](auto aligned_tag, auto index_tag) {
        constexpr int V = decltype(aligned_tag)::value ? kVec : 1;
        using index_t = typename decltype(index_tag)::type;
        const auto kernel = edm_loss_warp_kernel<V, index_t, scalar_t>;
        kernel<<<grid_blocks(kernel, rows, 32), kThreads, 0, stream>>>(
            fp, zp, yp, sp, sd, static_cast<index_t>(rows), static_cast<index_t>(cols), op);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dispatch_access(aligned, F.numel(), go);
      return;
    }

    // Split long rows so the grid fills the device, each block keeping >= 4 packs per thread.
    const int64_t slots = int64_t(sm_count()) * kBlocksPerSM;
    const int64_t max_splits = std::max<int64_t>(1, cols / (int64_t(kThreads) * kVec * 4));
    int64_t splits = std::min(max_splits, std::max<int64_t>(1, (slots + rows - 1) / rows));
    const int64_t chunk = ((cols + splits - 1) / splits + 7) / 8 * 8;  // a multiple of every pack width
    splits = (cols + chunk - 1) / chunk;
    Tensor partial = splits > 1 ? at::empty({rows * splits}, out.options()) : Tensor();
    acc_t* pp = splits > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr;
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    auto go = [&](auto aligned_tag, auto index_tag) {
      constexpr int V = decltype(aligned_tag)::value ? kVec : 1;
      using index_t = typename decltype(index_tag)::type;
      edm_loss_block_kernel<V, index_t><<<grid, kThreads, 0, stream>>>(
          fp, zp, yp, sp, sd, static_cast<index_t>(rows), static_cast<index_t>(cols), static_cast<index_t>(chunk),
          op, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_access(aligned, F.numel(), go);
    if (splits > 1) launch_sum_rows<acc_t>(pp, rows, splits, nullptr, static_cast<acc_t>(cols), op);
  });
  return out;
}

// ---------------------------------------------------------------- edm_loss_backward

// inputs (F, z, y), outputs (gF, gz, gy): gF = k·r with r = F − f_target and k = 2·grad/M;
// gz = gF·c_skip·inv_c_out; gy = −gF·inv_c_out (gz, gy skipped when not requested).
template <typename acc_t> struct EdmGradOp {
  const acc_t *sigma, *grad;
  acc_t sigma_data, two_over_m;
  struct Coef {
    acc_t c_skip, inv_c_out, k, ab, nb;
  };
  __device__ Coef coef(uint64_t row) const {
    const Target<acc_t> t(sigma[row], sigma_data);
    return {t.c_skip, t.inv_c_out, grad[row] * two_over_m, t.c_skip * t.inv_c_out, -t.inv_c_out};
  }
  __device__ void operator()(const Coef& c, uint64_t, float, const acc_t (&x)[3], acc_t (&out)[3]) const {
    const acc_t gF = c.k * (x[0] - dbx::f_target(x[2], x[1], c.c_skip, c.inv_c_out));
    out[0] = gF;
    out[1] = gF * c.ab;
    out[2] = gF * c.nb;
  }
};

std::tuple<Tensor, Tensor, Tensor> edm_loss_backward(const Tensor& grad, const Tensor& F, const Tensor& z,
                                                     const Tensor& y, const Tensor& sigma, double sigma_data,
                                                     bool need_z, bool need_y) {
  check::edm_loss_backward_args(grad, F, z, y, sigma);
  const c10::cuda::CUDAGuard guard(F.device());
  const Tensor Fc = F.contiguous(), zc = z.contiguous(), yc = y.contiguous();
  Tensor gF = at::empty_like(Fc);
  Tensor gz = need_z ? at::empty_like(Fc) : F.new_empty({0});
  Tensor gy = need_y ? at::empty_like(Fc) : F.new_empty({0});
  const int64_t rows = F.size(0), cols = rows ? F.numel() / rows : 0;
  if (F.numel() == 0) return {gF, gz, gy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "edm_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma), g = acc_vector<acc_t>(grad);
    const Streams<scalar_t, 3, 3> io{
        {Fc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>()},
        {gF.mutable_data_ptr<scalar_t>(), need_z ? gz.mutable_data_ptr<scalar_t>() : nullptr,
         need_y ? gy.mutable_data_ptr<scalar_t>() : nullptr}};
    const EdmGradOp<acc_t> op{s.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data),
                              acc_t(2) / static_cast<acc_t>(cols)};
    launch_rowwise(io, op, F.numel(), cols);
  });
  return {gF, gz, gy};
}

// ---------------------------------------------------------------- weighted_cross_entropy

// Online log-sum-exp state: the running max m and Σ exp(x − m).
template <typename acc_t> struct MaxSum {
  acc_t m, s;
};
template <typename acc_t> __device__ __forceinline__ MaxSum<acc_t> ms_empty() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}
// Adds n values: rescale once to the new max, then one exp per value. A −inf max (nothing
// finite seen yet) contributes nothing, so all −inf rows give lse = −inf without inf − inf.
template <typename acc_t, int N> __device__ __forceinline__ void ms_add(MaxSum<acc_t>& a, const acc_t (&v)[N]) {
  acc_t mx = v[0];
#pragma unroll
  for (int j = 1; j < N; ++j) mx = v[j] > mx ? v[j] : mx;
  if (mx > a.m) {
    a.s *= std::exp(a.m - mx);
    a.m = mx;
  }
  if (a.m == -std::numeric_limits<acc_t>::infinity()) return;
#pragma unroll
  for (int j = 0; j < N; ++j) a.s += std::exp(v[j] - a.m);
}
template <typename acc_t> __device__ __forceinline__ MaxSum<acc_t> ms_combine(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t sa = a.m == kNegInf ? acc_t(0) : a.s * std::exp(a.m - m);
  const acc_t sb = b.m == kNegInf ? acc_t(0) : b.s * std::exp(b.m - m);
  return {m, sa + sb};
}
template <typename acc_t> __device__ __forceinline__ MaxSum<acc_t> ms_warp_reduce(MaxSum<acc_t> a, int width) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    if (d < width) {
      const MaxSum<acc_t> b{__shfl_xor_sync(0xffffffffu, a.m, d, width), __shfl_xor_sync(0xffffffffu, a.s, d, width)};
      a = ms_combine(a, b);
    }
  }
  return a;
}

// The lse state of this thread's share of one row of C logits starting at flat index a.
template <int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ MaxSum<acc_t> row_share(const scalar_t* x, index_t a, index_t C, index_t t, index_t nt) {
  MaxSum<acc_t> st = ms_empty<acc_t>();
  for_range<VEC>(
      a, a + C, t, nt,
      [&](index_t e) {
        const acc_t v[1] = {static_cast<acc_t>(x[e])};
        ms_add(st, v);
      },
      [&](index_t e) {
        using P = Pack<scalar_t, VEC>;
        const P p = *reinterpret_cast<const P*>(x + e);
        acc_t v[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = static_cast<acc_t>(p.v[j]);
        ms_add(st, v);
      });
  return st;
}

// Position p's results from its lse state: lse[p], and ce (times weight[p] when weight is
// given: the T = 1 case, where the position is the example) into out[p]. An ignored target
// gives 0; one out of range (the Python layer rejects those) NaN rather than a wild read.
template <typename index_t, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_position(const scalar_t* x, const int64_t* target, index_t p, index_t C,
                                               int64_t ignore_index, const acc_t* weight, MaxSum<acc_t> st,
                                               acc_t* lse, acc_t* out) {
  const acc_t l = st.m + std::log(st.s);
  lse[p] = l;
  const int64_t t = target[p];
  acc_t ce;
  if (t == ignore_index) {
    ce = acc_t(0);
  } else if (t < 0 || t >= static_cast<int64_t>(C)) {
    ce = std::numeric_limits<acc_t>::quiet_NaN();
  } else {
    ce = l - static_cast<acc_t>(x[static_cast<index_t>(p * C + static_cast<index_t>(t))]);
  }
  out[p] = weight != nullptr ? weight[p] * ce : ce;
}

// Short rows: G (a power of 2, <= 32) threads per position.
template <int G, int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ce_group_kernel(const scalar_t* x, const int64_t* target, index_t positions, index_t C, int64_t ignore_index,
                    const acc_t* weight, acc_t* lse, acc_t* out) {
  constexpr index_t kPerWarp = 32 / G;
  const index_t lane = threadIdx.x % 32, sub = lane % G;
  const index_t warp = (static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const index_t stride = static_cast<index_t>(gridDim.x) * (kThreads / G);
  // The loop bound is the warp's first position, so all 32 lanes run the shuffles together.
  for (index_t base = warp * kPerWarp; base < positions; base += stride) {
    const index_t p = base + lane / G;
    MaxSum<acc_t> st = ms_empty<acc_t>();
    if (p < positions) st = row_share<VEC>(x, p * C, C, sub, static_cast<index_t>(G));
    st = ms_warp_reduce(st, G);
    if (p < positions && sub == 0) write_position(x, target, p, C, ignore_index, weight, st, lse, out);
  }
}

// Mid-size rows (C <= 32·E): one warp per position, the whole row in registers. Each lane
// loads its E values (N packs of VEC) before any arithmetic, so a warp keeps E/VEC loads
// in flight instead of one; then the exact max, one exp per value (no running rescale)
// and a warp sum. Padding slots hold −inf and add nothing. VEC > 1 needs rows that start
// on a pack boundary (C a multiple of VEC and an aligned base).
template <int E, int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ce_warp_kernel(const scalar_t* x, const int64_t* target, index_t positions, index_t C, int64_t ignore_index,
                   const acc_t* weight, acc_t* lse, acc_t* out) {
  static_assert(E % VEC == 0, "a lane holds whole packs");
  constexpr int N = E / VEC;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const index_t lane = threadIdx.x % 32;
  const index_t warps = static_cast<index_t>(gridDim.x) * (kThreads / 32);
  // p is the same for the 32 lanes of a warp, so the shuffles see full warps.
  for (index_t p = (static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; p < positions; p += warps) {
    const scalar_t* row = x + p * C;
    acc_t v[N][VEC];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const index_t c = (static_cast<index_t>(k) * 32 + lane) * VEC;
      if (c < C) {  // C % VEC == 0: a pack is all in or all out
        const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k][j] = static_cast<acc_t>(pk.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k][j] = kNegInf;
      }
    }
    acc_t m = kNegInf;
#pragma unroll
    for (int k = 0; k < N; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = v[k][j] > m ? v[k][j] : m;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const acc_t o = __shfl_xor_sync(0xffffffffu, m, d);
      m = o > m ? o : m;
    }
    // A row of −inf (nothing finite): shift by 0 so every term is exp(−inf) = 0, lse = −inf.
    const acc_t shift = m == kNegInf ? acc_t(0) : m;
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < N; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += std::exp(v[k][j] - shift);
    sum = warp_sum(sum);
    if (lane == 0) write_position(x, target, p, C, ignore_index, weight, MaxSum<acc_t>{m, sum}, lse, out);
  }
}

// Long rows: a block per position.
template <int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ce_block_kernel(const scalar_t* x, const int64_t* target, index_t positions, index_t C, int64_t ignore_index,
                    const acc_t* weight, acc_t* lse, acc_t* out) {
  __shared__ acc_t sm[32], ss[32];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  for (index_t p = blockIdx.x; p < positions; p += gridDim.x) {  // uniform over the block
    MaxSum<acc_t> st = row_share<VEC>(x, p * C, C, static_cast<index_t>(threadIdx.x), static_cast<index_t>(kThreads));
    st = ms_warp_reduce(st, 32);
    if (lane == 0) {
      sm[w] = st.m;
      ss[w] = st.s;
    }
    __syncthreads();
    if (w == 0) {
      st = lane < kThreads / 32 ? MaxSum<acc_t>{sm[lane], ss[lane]} : ms_empty<acc_t>();
      st = ms_warp_reduce(st, 32);
      if (lane == 0) write_position(x, target, p, C, ignore_index, weight, st, lse, out);
    }
    __syncthreads();
  }
}

// Rows of kCeWarpMin < C <= kCeWarpMax columns take a warp each, in registers (forward and
// backward); shorter rows share a warp, longer ones take a block (forward) or the row-wise
// elementwise kernel (backward).
constexpr int64_t kCeWarpMin = 64, kCeWarpMax = 1024;

// Calls go(std::integral_constant<int, E>{}) with E, the values each lane holds, enough for
// a row of C (kCeWarpMin < C <= kCeWarpMax) in one warp: the forward and backward agree.
template <typename Go> void with_lane_values(int64_t C, const Go& go) {
  if (C <= 256) {
    go(std::integral_constant<int, 8>{});
  } else {
    go(std::integral_constant<int, 32>{});
  }
}

std::tuple<Tensor, Tensor> weighted_cross_entropy(const Tensor& logits, const Tensor& target, const Tensor& weight,
                                                  int64_t ignore_index) {
  const check::LogitsShape shape = check::cross_entropy_args(logits, target, weight, ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  const int64_t N = shape.N, T = shape.T, C = shape.C, P = N * T;
  const auto acc = at::toOpMathType(logits.scalar_type());
  Tensor loss = at::empty({N}, logits.options().dtype(acc));
  Tensor lse = at::empty(target.sizes(), logits.options().dtype(acc));
  if (N == 0) return {loss, lse};
  if (P == 0) {  // T = 0: the mean over no positions, like mean()
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
    return {loss, lse};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "weighted_cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    const Tensor w = acc_vector<acc_t>(weight);
    // T = 1: the position is the example, write weight·ce straight into loss.
    Tensor ce = T == 1 ? loss : at::empty({P}, loss.options());
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const int64_t* tp = tc.const_data_ptr<int64_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* lp = lse.mutable_data_ptr<acc_t>();
    acc_t* cp = ce.mutable_data_ptr<acc_t>();
    const acc_t* first_weight = T == 1 ? wp : nullptr;
    // The warp kernel loads whole packs per row; the others handle each row's ends.
    const bool aligned = is_aligned(xp, 16) && (C > kCeWarpMax || C <= kCeWarpMin || C % kVec == 0);
    auto go = [&](auto aligned_tag, auto index_tag) {
      constexpr int V = decltype(aligned_tag)::value ? kVec : 1;
      using index_t = typename decltype(index_tag)::type;
      const auto P_ = static_cast<index_t>(P);
      const auto C_ = static_cast<index_t>(C);
      // A warp per position from 64 columns on; E values per lane hold rows up to 32·E.
      auto warp_per_row = [&](auto kernel) {
        kernel<<<grid_blocks(kernel, P, 32), kThreads, 0, stream>>>(xp, tp, P_, C_, ignore_index, first_weight, lp,
                                                                    cp);
      };
      if (C <= kCeWarpMin) {
        const auto kernel = ce_group_kernel<4, V, index_t, scalar_t>;
        kernel<<<grid_blocks(kernel, P, 4), kThreads, 0, stream>>>(xp, tp, P_, C_, ignore_index, first_weight, lp,
                                                                   cp);
      } else if (C <= kCeWarpMax) {
        with_lane_values(C, [&](auto e) { warp_per_row(ce_warp_kernel<decltype(e)::value, V, index_t, scalar_t>); });
      } else {
        const auto kernel = ce_block_kernel<V, index_t, scalar_t>;
        kernel<<<grid_blocks(kernel, P, kThreads), kThreads, 0, stream>>>(xp, tp, P_, C_, ignore_index, first_weight,
                                                                          lp, cp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_access(aligned, logits.numel(), go);
    if (T > 1) {
      launch_sum_rows<acc_t>(cp, N, T, wp, static_cast<acc_t>(T), loss.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, lse};
}

// grad_logits = g·(softmax(x) − onehot(target)) with g = grad_n·weight_n/T per position;
// rows whose target is ignore_index are 0, rows with a target out of range NaN.
template <typename acc_t> struct CeGradOp {
  const acc_t *lse, *grad, *weight;
  const int64_t* target;
  uint64_t T;
  int64_t C, ignore_index;
  struct Coef {
    acc_t lse, g;
    int64_t target;
    bool ignored;
  };
  __device__ Coef coef(uint64_t row) const {
    const int64_t t = target[row];
    if (t == ignore_index) return {acc_t(0), acc_t(0), -1, true};
    const uint64_t n = T == 1 ? row : row / T;  // skips a 64-bit division per chunk in the common case
    acc_t g = grad[n] * weight[n] / static_cast<acc_t>(T);
    if (t < 0 || t >= C) g = std::numeric_limits<acc_t>::quiet_NaN();
    return {lse[row], g, t, false};
  }
  __device__ void operator()(const Coef& k, uint64_t col, float, const acc_t (&x)[1], acc_t (&y)[1]) const {
    if (k.ignored) {
      y[0] = acc_t(0);
      return;
    }
    const acc_t p = std::exp(x[0] - k.lse);
    y[0] = k.g * (static_cast<int64_t>(col) == k.target ? p - acc_t(1) : p);
  }
};

// Mid-size rows (64 < C <= 32·E), the backward of ce_warp_kernel: one warp per position,
// its coefficients read once (not once per chunk of VEC as in rowwise_kernel) and each
// lane's E values loaded before any arithmetic, so E/VEC loads are in flight at once.
template <int E, int VEC, typename index_t, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ce_grad_warp_kernel(const scalar_t* x, CeGradOp<acc_t> op, index_t positions, index_t C, scalar_t* out) {
  static_assert(E % VEC == 0, "a lane holds whole packs");
  constexpr int N = E / VEC;
  using P = Pack<scalar_t, VEC>;
  const index_t lane = threadIdx.x % 32;
  const index_t warps = static_cast<index_t>(gridDim.x) * (kThreads / 32);
  for (index_t p = (static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; p < positions; p += warps) {
    const index_t row = p * C;
    P v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const index_t c = (static_cast<index_t>(k) * 32 + lane) * VEC;
      if (c < C) v[k] = *reinterpret_cast<const P*>(x + row + c);  // C % VEC == 0: whole packs
    }
    const auto coef = op.coef(p);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const index_t c = (static_cast<index_t>(k) * 32 + lane) * VEC;
      if (c >= C) continue;
      P g;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t in[1] = {static_cast<acc_t>(v[k].v[j])};
        acc_t res[1];
        op(coef, c + j, 0.f, in, res);
        g.v[j] = static_cast<scalar_t>(res[0]);
      }
      *reinterpret_cast<P*>(out + row + c) = g;
    }
  }
}

Tensor weighted_cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                                       const Tensor& weight, const Tensor& lse, int64_t ignore_index) {
  const check::LogitsShape shape = check::cross_entropy_backward_args(grad, logits, target, weight, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor xc = logits.contiguous(), tc = target.contiguous();
  Tensor out = at::empty_like(xc);
  const int64_t T = shape.T, C = shape.C;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "weighted_cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor w = acc_vector<acc_t>(weight), g = acc_vector<acc_t>(grad), l = acc_vector<acc_t>(lse);
    const Streams<scalar_t, 1, 1> io{{xc.const_data_ptr<scalar_t>()}, {out.mutable_data_ptr<scalar_t>()}};
    const CeGradOp<acc_t> op{l.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                             tc.const_data_ptr<int64_t>(), static_cast<uint64_t>(T), C, ignore_index};
    if (C <= kCeWarpMin || C > kCeWarpMax) {
      launch_rowwise(io, op, out.numel(), C);
      return;
    }
    constexpr int kVec = vec_width<scalar_t>();
    const scalar_t* xp = io.in[0];
    scalar_t* gp = io.out[0];
    const bool aligned = is_aligned(xp, 16) && is_aligned(gp, 16) && C % kVec == 0;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_access(aligned, out.numel(), [&](auto aligned_tag, auto index_tag) {
      constexpr int V = decltype(aligned_tag)::value ? kVec : 1;
      using index_t = typename decltype(index_tag)::type;
      auto launch = [&](auto kernel) {
        kernel<<<grid_blocks(kernel, shape.N * T, 32), kThreads, 0, stream>>>(
            xp, op, static_cast<index_t>(shape.N * T), static_cast<index_t>(C), gp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_lane_values(C, [&](auto e) { launch(ce_grad_warp_kernel<decltype(e)::value, V, index_t, scalar_t>); });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CUDA, m) {
  m.impl("edm_loss", &edm_loss);
  m.impl("edm_loss_backward", &edm_loss_backward);
  m.impl("weighted_cross_entropy", &weighted_cross_entropy);
  m.impl("weighted_cross_entropy_backward", &weighted_cross_entropy_backward);
}

}  // namespace dbx::cuda
