// Shared machinery of the CUDA kernels: launch geometry, aligned vector packs, and the
// row-wise elementwise kernel that serves every op whose per-element formula depends only
// on the element, its row's σ (and its column): add_noise, denoise, euler_step, heun_step,
// edm_loss_backward, weighted_cross_entropy_backward (rows of C <= 64 or > 1024; between,
// a warp per row, in losses.cu). The formulas live in edm.h/philox.h;
// each op is a small functor that computes its row coefficients and applies them.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "philox.h"

namespace dbx::cuda {

constexpr int kThreads = 256;         // threads per block of every kernel
constexpr int kBlocksPerSM = 2048 / kThreads;  // resident blocks per SM at full occupancy (sm_80+)

inline int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Blocks of `kernel` (kThreads threads each) that one SM holds at once: kBlocksPerSM up to
// 32 registers a thread, fewer above. Asked once per kernel and cached: the answer depends
// only on the kernel and the architecture (a process's GPUs are taken to be one model; a
// wrong guess would cost speed, never correctness).
inline int blocks_per_sm(const void* kernel) {
  static std::mutex mutex;
  static std::unordered_map<const void*, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(kernel);
  if (found != cache.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return cache[kernel] = std::max(1, blocks);
}

// Blocks of a grid-stride launch of `kernel`: one full wave (every block resident at once),
// no more than the work needs. A fixed kBlocksPerSM per SM, for a kernel that fits fewer,
// leaves the excess blocks to a second wave on an almost idle device (with that grid, on
// an H200, the kernels above 32 registers, euler, heun and edm_loss, reached 89–92% of copy
// bandwidth; denoise, at 32, 96%).
template <typename Kernel>
int64_t grid_blocks(Kernel kernel, int64_t work_items, int64_t threads_per_item = 1) {
  const int64_t needed = (work_items * threads_per_item + kThreads - 1) / kThreads;
  const int64_t wave = int64_t(sm_count()) * blocks_per_sm(reinterpret_cast<const void*>(kernel));
  return std::max<int64_t>(1, std::min<int64_t>(needed, wave));
}

// 32-bit index arithmetic when every flat index (plus a pack) fits, else 64-bit.
inline bool fits_int32(int64_t numel) { return numel <= std::numeric_limits<int32_t>::max() - 64; }

// N elements loaded and stored as one aligned access (16 bytes; 32 as two for fp64 x 4).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool is_aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Elements per 16-byte access.
template <typename scalar_t> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(scalar_t)); }

// The pointers an elementwise op streams over; an output may be null (not requested).
template <typename scalar_t, int NIN, int NOUT> struct Streams {
  const scalar_t* in[NIN];
  scalar_t* out[NOUT];
};

// One pass over numel = rows * cols elements in row-major order. Each thread takes chunks
// of VEC consecutive elements (one aligned pack per stream when ALIGNED, else element by
// element); the row's coefficients are computed from σ[row] at the chunk start and again
// whenever the chunk crosses into the next row. With NOISE, element e receives the normal
// dbx::normal4(e / 4, offset, seed).n[e % 4]; VEC is then a multiple of 4 so a chunk
// draws whole Philox groups. The last numel % VEC elements are done one per thread.
//   op.coef(row) -> Coef;  op(coef, col, eps, const acc_t (&x)[NIN], acc_t (&y)[NOUT])
// (The add_noise instance takes 40 registers on sm_90, so 6 blocks per SM, not 8. Forcing 8
// with __launch_bounds__ spills and measured slower on an H200: 68% of copy bandwidth
// against 82% at 2^24 elements.)
template <int VEC, bool ALIGNED, bool NOISE, typename index_t, typename scalar_t, int NIN, int NOUT,
          typename Op>
__global__ void __launch_bounds__(kThreads)
    rowwise_kernel(Streams<scalar_t, NIN, NOUT> s, Op op, index_t numel, index_t cols, uint64_t seed,
                   uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(!NOISE || VEC % 4 == 0, "noise chunks must hold whole Philox groups");
  const index_t chunks = numel / VEC;
  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t chunk = tid; chunk < chunks; chunk += stride) {
    const index_t e0 = chunk * VEC;
    acc_t x[NIN][VEC];
#pragma unroll
    for (int j = 0; j < NIN; ++j) {
      if constexpr (ALIGNED) {
        const Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(s.in[j] + e0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[j][k] = static_cast<acc_t>(p.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[j][k] = static_cast<acc_t>(s.in[j][e0 + k]);
      }
    }
    float eps[VEC];
    if constexpr (NOISE) {
#pragma unroll
      for (int g = 0; g < VEC / 4; ++g) {
        const Normal4 n = normal4(static_cast<uint64_t>(e0 / 4 + g), offset, seed);
#pragma unroll
        for (int k = 0; k < 4; ++k) eps[4 * g + k] = n.n[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) eps[k] = 0.f;
    }
    index_t row = e0 / cols, col = e0 - row * cols;
    auto c = op.coef(row);
    acc_t y[NOUT][VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (col == cols) {  // the chunk crossed into the next row
        ++row;
        col = 0;
        c = op.coef(row);
      }
      acc_t xk[NIN], yk[NOUT];
#pragma unroll
      for (int j = 0; j < NIN; ++j) xk[j] = x[j][k];
      op(c, col, eps[k], xk, yk);
#pragma unroll
      for (int j = 0; j < NOUT; ++j) y[j][k] = yk[j];
      ++col;
    }
#pragma unroll
    for (int j = 0; j < NOUT; ++j) {
      if (s.out[j] == nullptr) continue;
      if constexpr (ALIGNED) {
        Pack<scalar_t, VEC> p;
#pragma unroll
        for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<scalar_t>(y[j][k]);
        *reinterpret_cast<Pack<scalar_t, VEC>*>(s.out[j] + e0) = p;
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) s.out[j][e0 + k] = static_cast<scalar_t>(y[j][k]);
      }
    }
  }
  // Tail: fewer than VEC elements, one per thread of the first block.
  const index_t tail = numel - chunks * VEC;
  if (tid < tail) {
    const index_t e = chunks * VEC + tid;
    const index_t row = e / cols, col = e - row * cols;
    acc_t xk[NIN], yk[NOUT];
#pragma unroll
    for (int j = 0; j < NIN; ++j) xk[j] = static_cast<acc_t>(s.in[j][e]);
    float eps = 0.f;
    if constexpr (NOISE) eps = normal4(static_cast<uint64_t>(e / 4), offset, seed).n[e % 4];
    op(op.coef(row), col, eps, xk, yk);
#pragma unroll
    for (int j = 0; j < NOUT; ++j)
      if (s.out[j] != nullptr) s.out[j][e] = static_cast<scalar_t>(yk[j]);
  }
}

// Calls go(aligned_tag, index_tag) once, with aligned_tag a std::bool_constant (vector
// access allowed) and index_tag::type the narrowest index type that numel allows, so
// each launch site instantiates its kernel four ways in one place.
template <typename IndexT> struct IndexTag { using type = IndexT; };
template <typename Go>
void dispatch_access(bool aligned, int64_t numel, const Go& go) {
  if (fits_int32(numel)) {
    aligned ? go(std::true_type{}, IndexTag<uint32_t>{}) : go(std::false_type{}, IndexTag<uint32_t>{});
  } else {
    aligned ? go(std::true_type{}, IndexTag<uint64_t>{}) : go(std::false_type{}, IndexTag<uint64_t>{});
  }
}

// Launches rowwise_kernel on the current stream with the widest access every pointer
// allows and the narrowest index type the size allows.
template <bool NOISE = false, typename scalar_t, int NIN, int NOUT, typename Op>
void launch_rowwise(const Streams<scalar_t, NIN, NOUT>& s, const Op& op, int64_t numel, int64_t cols,
                    uint64_t seed = 0, uint64_t offset = 0) {
  if (numel == 0) return;
  constexpr int VEC = NOISE ? std::max(4, vec_width<scalar_t>()) : vec_width<scalar_t>();
  bool aligned = true;
  for (int j = 0; j < NIN; ++j) aligned = aligned && is_aligned(s.in[j], VEC * sizeof(scalar_t));
  for (int j = 0; j < NOUT; ++j) aligned = aligned && is_aligned(s.out[j], VEC * sizeof(scalar_t));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_access(aligned, numel, [&](auto aligned_tag, auto index_tag) {
    constexpr bool kAligned = decltype(aligned_tag)::value;
    using index_t = typename decltype(index_tag)::type;
    const auto kernel = rowwise_kernel<VEC, kAligned, NOISE, index_t, scalar_t, NIN, NOUT, Op>;
    kernel<<<grid_blocks(kernel, (numel + VEC - 1) / VEC), kThreads, 0, stream>>>(
        s, op, static_cast<index_t>(numel), static_cast<index_t>(cols), seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Products and sums rounded separately (never contracted into an fma), where a result
// should round exactly as the reference's separate tensor ops do.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---- reductions --------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ T warp_sum(T v, int width = 32) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1)
    if (d < width) v += __shfl_xor_sync(0xffffffffu, v, d, width);
  return v;
}

// Sum over the block, valid in thread 0. smem holds 32 values. Fixed order: deterministic.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? smem[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();  // smem may be reused right after
  return v;
}

// Visits the flat range [a, b) with nt cooperating threads (this one is t): VEC-aligned
// packs in the middle (when VEC > 1 the base pointers are VEC-aligned), single elements
// at both ends. scalar_fn(e) and pack_fn(e) get flat indices.
template <int VEC, typename index_t, typename ScalarFn, typename PackFn>
__device__ __forceinline__ void for_range(index_t a, index_t b, index_t t, index_t nt, ScalarFn scalar_fn,
                                          PackFn pack_fn) {
  if constexpr (VEC == 1) {
    for (index_t e = a + t; e < b; e += nt) scalar_fn(e);
  } else {
    const index_t head = min(b, (a + VEC - 1) / VEC * VEC);
    const index_t body = max(head, b / VEC * VEC);
    for (index_t e = a + t; e < head; e += nt) scalar_fn(e);
    for (index_t e = head + t * VEC; e < body; e += nt * VEC) pack_fn(e);
    for (index_t e = body + t; e < b; e += nt) scalar_fn(e);
  }
}

// out[r] = (weight ? weight[r] : 1) * (Σ_k in[r*K + k]) / denom, one warp per row in a fixed
// order (the deterministic second pass of the row reductions).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_rows_kernel(const acc_t* in, int64_t rows, int64_t K, const acc_t* weight, acc_t denom, acc_t* out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
    acc_t sum = 0;
    for (int64_t k = lane; k < K; k += 32) sum += in[r * K + k];
    sum = warp_sum(sum);
    if (lane == 0) {
      const acc_t v = sum / denom;
      out[r] = weight != nullptr ? weight[r] * v : v;
    }
  }
}

template <typename acc_t>
void launch_sum_rows(const acc_t* in, int64_t rows, int64_t K, const acc_t* weight, acc_t denom, acc_t* out) {
  if (rows == 0) return;
  const auto kernel = sum_rows_kernel<acc_t>;
  kernel<<<grid_blocks(kernel, rows, 32), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(in, rows, K, weight,
                                                                                         denom, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dbx::cuda
