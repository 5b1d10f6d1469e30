// Counter-based randomness shared by the CPU and CUDA kernels (the pure-PyTorch copy
// is diffusionblocks_ext/_philox.py). Philox4x32-10 (Salmon et al., SC'11):
// key = seed (64 bits), counter = (group lo, group hi, offset lo, offset hi).
// An op's output is a pure function of (seed, offset, element index), so the same
// (seed, offset) gives the same noise on every device and in every implementation.
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace dbx {

struct U32x4 {
  uint32_t x[4];
};

DBX_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // Two 32-bit multiplies: nvcc turns the 64-bit product below into 64-bit multiplies,
  // masks and xors through all ten rounds (seen in the PTX), doubling Philox's cost.
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Round multipliers and key increments (Weyl sequence) of Philox4x32.
constexpr uint32_t kPhiloxMul0 = 0xD2511F53u, kPhiloxMul1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u, kPhiloxWeyl1 = 0xBB67AE85u;

DBX_HOST_DEVICE U32x4 philox4x32_10(uint64_t group, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxMul0, c0, hi0, lo0);
    mulhilo32(kPhiloxMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform in the open interval (0, 1) from the top 24 bits: exact in float32.
DBX_HOST_DEVICE float uniform24(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * 5.9604644775390625e-8f;  // 2^-24
}

// Uniform in (0, 1) with 53 random bits, for the σ sampler (the tails of Φ⁻¹ need them).
DBX_HOST_DEVICE double uniform53(uint32_t a, uint32_t b) {
  const double bits = static_cast<double>(a >> 5) * 67108864.0 + static_cast<double>(b >> 6);
  return (bits + 0.5) * 1.1102230246251565e-16;  // 2^-53
}

// Box–Muller in float32 for every input dtype, so all paths round the same way.
// Element 4g+k of a tensor takes normal k of group g.
struct Normal4 {
  float n[4];
};
DBX_HOST_DEVICE Normal4 normal4(uint64_t group, uint64_t offset, uint64_t seed) {
  const U32x4 r = philox4x32_10(group, offset, seed);
  constexpr float kTwoPi = 6.2831853071795864769f;
  const float rad0 = std::sqrt(-2.0f * std::log(uniform24(r.x[0])));
  const float th0 = kTwoPi * uniform24(r.x[1]);
  const float rad1 = std::sqrt(-2.0f * std::log(uniform24(r.x[2])));
  const float th1 = kTwoPi * uniform24(r.x[3]);
  float s0, c0, s1, c1;
#if defined(__CUDA_ARCH__)
  // One argument reduction for both (sinf and cosf apart each reduce): the same values.
  sincosf(th0, &s0, &c0);
  sincosf(th1, &s1, &c1);
#else
  s0 = std::sin(th0), c0 = std::cos(th0), s1 = std::sin(th1), c1 = std::cos(th1);
#endif
  return {{rad0 * c0, rad0 * s0, rad1 * c1, rad1 * s1}};
}

}  // namespace dbx
