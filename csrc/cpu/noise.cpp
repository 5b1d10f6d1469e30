// CPU kernels of the two random ops: sample_sigma_ (the truncated log-normal σ sampler)
// and add_noise (z = y + σ·ε, z_in = c_in(σ)·z with ε drawn in-kernel). Both are pure
// functions of (seed, offset, index): element e of add_noise takes normal e%4 of Philox
// group e/4, so the noise does not depend on the thread count or on the chunking.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define DBX_PHILOX_AVX2 1
#endif

#include "accumulation.h"
#include "checks.h"
#include "cpu/acc_io.h"
#include "cpu/rows.h"
#include "edm.h"
#include "lognormal.h"
#include "philox.h"

namespace dbx::cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- sample_sigma_

#ifdef DBX_PHILOX_AVX2
// σ of draws [i, i + 32) into out (defined below): the Philox words of 32 groups at once
// (philox_x8), their uniforms, and Φ⁻¹ on 4 float64 lanes. Every lane evaluates all three of
// AS 241's ranges and keeps its own (blend), as truncated_lognormal picks it by branch;
// log/sqrt/exp are SLEEF's (1 ulp), so values match the scalar path to a few ulp.
template <typename scalar_t>
void block_sigmas(uint64_t i, uint64_t offset, uint64_t seed, const dbx::LognormalRange& range, scalar_t* out);
#endif

void sample_sigma_(Tensor& out, double sigma_lo, double sigma_hi, int64_t seed, int64_t offset, double p_mean,
                   double p_std) {
  check::sample_sigma_args(out, sigma_lo, sigma_hi, p_mean, p_std);
  const int64_t n = out.numel();
  if (n == 0) return;
  const dbx::LognormalRange range = dbx::lognormal_range(sigma_lo, sigma_hi, p_mean, p_std);
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  Tensor dst = out.is_contiguous() ? out : at::empty({n}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sample_sigma_cpu", [&] {
    scalar_t* op = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
#ifdef DBX_PHILOX_AVX2
      for (; i + 32 <= end; i += 32) block_sigmas(static_cast<uint64_t>(i), off, key, range, op + i);
#endif
      for (; i < end; ++i) {
        const U32x4 r = dbx::philox4x32_10(static_cast<uint64_t>(i), off, key);
        const double u = dbx::uniform53(r.x[0], r.x[1]);
        op[i] = static_cast<scalar_t>(dbx::truncated_lognormal(u, range));
      }
    });
  });
  if (!dst.is_same(out)) out.copy_(dst.view(out.sizes()));
}

// ---------------------------------------------------------------- normals

// Normals of Philox groups [g, g + count) in element order (4 per group) into out, which
// holds 4*round_up(count, 8) floats. Same arithmetic as dbx::normal4 (uniforms are exact;
// log/sqrt/sin/cos differ from libm by at most an ulp or so).
constexpr int64_t kBlockGroups = 64;  // groups per block: 256 normals, 1 KiB on the stack

#ifdef DBX_PHILOX_AVX2
// (hi, lo) 32-bit halves of the lane-wise products m*x (8 lanes).
inline void mulhilo8(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                          // lanes 0,2,4,6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);    // lanes 1,3,5,7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 uniform24x8(__m256i bits) {
  const __m256 f = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8));
  return _mm256_mul_ps(_mm256_add_ps(f, _mm256_set1_ps(0.5f)), _mm256_set1_ps(5.9604644775390625e-8f));
}

// Philox words of groups g..g+8*kLanes-1: kLanes independent 8-lane vectors run in
// lockstep, so the multiply latency of one round overlaps across them.
constexpr int kLanes = 4;
struct PhiloxX8 {
  __m256i c[4][kLanes];
};
inline PhiloxX8 philox_x8(uint64_t g, uint64_t offset, uint64_t seed) {
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(dbx::kPhiloxMul0));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(dbx::kPhiloxMul1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  PhiloxX8 p;
  for (int v = 0; v < kLanes; ++v, g += 8) {
    // The high counter word is uniform across the 8 lanes unless the low one wraps.
    const uint32_t g_lo = static_cast<uint32_t>(g), g_hi = static_cast<uint32_t>(g >> 32);
    p.c[0][v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g_lo)), iota);
    p.c[1][v] = _mm256_set1_epi32(static_cast<int>(g_hi));
    if (g_lo > 0xFFFFFFF8u) {
      alignas(32) uint32_t hi[8];
      for (int k = 0; k < 8; ++k) hi[k] = static_cast<uint32_t>((g + k) >> 32);
      p.c[1][v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    }
    p.c[2][v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    p.c[3][v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kLanes; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(mul0, p.c[0][v], hi0, lo0);
      mulhilo8(mul1, p.c[2][v], hi1, lo1);
      p.c[0][v] = _mm256_xor_si256(_mm256_xor_si256(hi1, p.c[1][v]), key0);
      p.c[1][v] = lo1;
      p.c[2][v] = _mm256_xor_si256(_mm256_xor_si256(hi0, p.c[3][v]), key1);
      p.c[3][v] = lo0;
    }
    k0 += dbx::kPhiloxWeyl0;
    k1 += dbx::kPhiloxWeyl1;
  }
  return p;
}

template <typename scalar_t>
void block_sigmas(uint64_t i, uint64_t offset, uint64_t seed, const dbx::LognormalRange& range, scalar_t* out) {
  using VecD = at::vec::Vectorized<double>;
  const PhiloxX8 p = philox_x8(i, offset, seed);
  const VecD p_lo(range.p_lo), width(range.p_hi - range.p_lo), half(0.5), one(1.0), zero(0.0);
  const VecD s(range.s), mean(range.p_mean), std_(range.p_std), lo(range.sigma_lo), hi(range.sigma_hi);
  const VecD inf(std::numeric_limits<double>::infinity());
  for (int v = 0; v < kLanes; ++v) {
    // dbx::uniform53 of words 0 and 1, 8 lanes as two halves of 4: exact in float64.
    const __m256i a = _mm256_srli_epi32(p.c[0][v], 5), b = _mm256_srli_epi32(p.c[1][v], 6);
    for (int h = 0; h < 2; ++h) {
      const __m128i a4 = h ? _mm256_extracti128_si256(a, 1) : _mm256_castsi256_si128(a);
      const __m128i b4 = h ? _mm256_extracti128_si256(b, 1) : _mm256_castsi256_si128(b);
      const VecD bits = VecD(_mm256_cvtepi32_pd(a4)) * VecD(67108864.0) + VecD(_mm256_cvtepi32_pd(b4));
      const VecD u = (bits + half) * VecD(1.1102230246251565e-16);
      // dbx::truncated_lognormal, with normal_icdf's branches as blends.
      const VecD pr = p_lo + u * width, q = pr - half;
      VecD x = dbx::normal_icdf_central(q);
      const VecD in_tail = q.abs() > VecD(0.425);
      if (_mm256_movemask_pd(in_tail)) {  // about half the vectors have no tail lane: skip
        const VecD below = q < zero;      // all-ones lanes where q < 0
        const VecD r = (VecD::blendv(one - pr, pr, below)).log().neg().sqrt();
        const VecD far = r > VecD(5.0);   // p within ~1e-11 of an end: hardly ever
        VecD tail = dbx::normal_icdf_tail_near(r);
        if (_mm256_movemask_pd(far)) tail = VecD::blendv(tail, dbx::normal_icdf_tail_far(r), far);
        x = VecD::blendv(x, VecD::blendv(tail, tail.neg(), below), in_tail);
      }
      x = VecD::blendv(x, inf.neg(), pr <= zero);
      x = VecD::blendv(x, inf, pr >= one);
      const VecD sigma = at::vec::minimum(at::vec::maximum((mean + std_ * (s * x)).exp(), lo), hi);
      scalar_t* dst = out + 8 * v + 4 * h;
      if constexpr (std::is_same_v<scalar_t, double>) {
        sigma.store(dst);
      } else {
        alignas(32) double tmp[4];
        sigma.store(tmp);
        for (int k = 0; k < 4; ++k) dst[k] = static_cast<scalar_t>(tmp[k]);
      }
    }
  }
}

void block_normals(uint64_t g, int64_t count, uint64_t offset, uint64_t seed, float* out) {
  const __m256 minus_two = _mm256_set1_ps(-2.0f), two_pi = _mm256_set1_ps(6.2831853071795864769f);
  for (int64_t j = 0; j < count; j += 8 * kLanes, g += 8 * kLanes) {
    const PhiloxX8 p = philox_x8(g, offset, seed);
    for (int v = 0; v < kLanes && j + 8 * v < count; ++v, out += 32) {
      const __m256 rad0 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10(uniform24x8(p.c[0][v]))));
      const __m256 rad1 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10(uniform24x8(p.c[2][v]))));
      const Sleef___m256_2 sc0 = Sleef_sincosf8_u10(_mm256_mul_ps(two_pi, uniform24x8(p.c[1][v])));
      const Sleef___m256_2 sc1 = Sleef_sincosf8_u10(_mm256_mul_ps(two_pi, uniform24x8(p.c[3][v])));
      const __m256 n0 = _mm256_mul_ps(rad0, sc0.y), n1 = _mm256_mul_ps(rad0, sc0.x);
      const __m256 n2 = _mm256_mul_ps(rad1, sc1.y), n3 = _mm256_mul_ps(rad1, sc1.x);
      // 4x8 -> 8x4 transpose: group j's four normals become elements 4j..4j+3.
      const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
      const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
      const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
      const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
      const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
      const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
      _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
      _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
    }
  }
}
#else
void block_normals(uint64_t g, int64_t count, uint64_t offset, uint64_t seed, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    const Normal4 n = dbx::normal4(g + j, offset, seed);
    std::copy(n.n, n.n + 4, out + 4 * j);
  }
}
#endif

// ---------------------------------------------------------------- add_noise

// z = y + s·ε and z_in = c·z over n elements of one row, in the accumulation type.
template <typename scalar_t>
void noise_segment(const scalar_t* y, const float* eps, scalar_t* z, scalar_t* z_in, int64_t n,
                   at::opmath_type<scalar_t> s, at::opmath_type<scalar_t> c) {
  using IO = AccIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec sv(s), cv(c);
  auto eps_vec = [&](const float* e, int64_t k) -> Vec {
    if constexpr (std::is_same_v<acc_t, float>) {
      return Vec::loadu(e + k * Vec::size());
    } else {
      alignas(64) acc_t tmp[Vec::size()];
      for (int64_t l = 0; l < Vec::size(); ++l) tmp[l] = static_cast<acc_t>(e[k * Vec::size() + l]);
      return Vec::loadu(tmp);
    }
  };
  int64_t i = 0;
  for (; i + IO::kSize <= n; i += IO::kSize) {
    Vec v[IO::kVecs], w[IO::kVecs];
    IO::load(y + i, v);
    for (int64_t k = 0; k < IO::kVecs; ++k) {
      v[k] = v[k] + sv * eps_vec(eps + i, k);
      w[k] = cv * v[k];
    }
    IO::store(z + i, v);
    IO::store(z_in + i, w);
  }
  for (; i < n; ++i) {
    const acc_t zi = static_cast<acc_t>(y[i]) + s * static_cast<acc_t>(eps[i]);
    z[i] = static_cast<scalar_t>(zi);
    z_in[i] = static_cast<scalar_t>(c * zi);
  }
}

std::tuple<Tensor, Tensor> add_noise(const Tensor& y, const Tensor& sigma, int64_t seed, int64_t offset,
                                     double sigma_data) {
  check::add_noise_args(y, sigma, sigma_data);
  const Tensor yc = y.contiguous();
  Tensor z = at::empty_like(yc), z_in = at::empty_like(yc);
  const int64_t numel = yc.numel(), rows = y.size(0), cols = rows ? numel / rows : 0;
  if (numel == 0) return {z, z_in};
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "add_noise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor s = acc_vector<acc_t>(sigma);
    const Tensor c = at::empty({rows}, s.options());
    const acc_t* sp = s.data_ptr<acc_t>();
    acc_t* cp = c.data_ptr<acc_t>();
    const acc_t sd = static_cast<acc_t>(sigma_data);
    for (int64_t r = 0; r < rows; ++r) cp[r] = dbx::c_in(sp[r], sd);
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* zip = z_in.data_ptr<scalar_t>();
    // Threads own whole Philox groups, so a group never straddles two threads.
    const int64_t groups = (numel + 3) / 4;
    at::parallel_for(0, groups, kGrain / 4, [&](int64_t g_begin, int64_t g_end) {
      alignas(64) float eps[4 * kBlockGroups];
      for (int64_t g = g_begin; g < g_end; g += kBlockGroups) {
        const int64_t count = std::min(kBlockGroups, g_end - g);
        block_normals(static_cast<uint64_t>(g), count, off, key, eps);
        const int64_t e_begin = 4 * g, e_end = std::min(4 * (g + count), numel);
        int64_t row = e_begin / cols;
        for (int64_t e = e_begin; e < e_end; ++row) {
          const int64_t len = std::min((row + 1) * cols, e_end) - e;
          noise_segment<scalar_t>(yp + e, eps + (e - e_begin), zp + e, zip + e, len, sp[row], cp[row]);
          e += len;
        }
      }
    });
  });
  return {z, z_in};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusionblocks, CPU, m) {
  m.impl("sample_sigma_", &sample_sigma_);
  m.impl("add_noise", &add_noise);
}

}  // namespace dbx::cpu
