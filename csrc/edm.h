// EDM preconditioning (Karras et al. 2022, docs/method.md §2) and the sampler-step
// coefficients derived from it. The only C++ copy of these formulas: the CPU and
// CUDA kernels both include this file. The Python copy is diffusionblocks_ext/reference.py.
#pragma once
#include <cmath>

#include "macros.h"

namespace dbx {

// T is the kernel's accumulation type (float for fp32/bf16/fp16 inputs, double for fp64).
template <typename T> DBX_HOST_DEVICE T c_skip(T sigma, T sigma_data) {
  return sigma_data * sigma_data / (sigma * sigma + sigma_data * sigma_data);
}
template <typename T> DBX_HOST_DEVICE T c_out(T sigma, T sigma_data) {
  return sigma * sigma_data / std::sqrt(sigma * sigma + sigma_data * sigma_data);
}
template <typename T> DBX_HOST_DEVICE T c_in(T sigma, T sigma_data) {
  return T(1) / std::sqrt(sigma * sigma + sigma_data * sigma_data);
}

// 1 − c_skip = σ²/(σ² + σ_d²), computed as such: the difference 1 − c_skip cancels for σ ≪ σ_d
// (float32 keeps ~16 fewer bits at σ = 0.002), and the samplers multiply it by (σ_next − σ)/σ.
template <typename T> DBX_HOST_DEVICE T one_minus_c_skip(T sigma, T sigma_data) {
  return sigma * sigma / (sigma * sigma + sigma_data * sigma_data);
}

// A step z_next = a_z*z + a_f*F is linear in (z, F); the samplers are written as such
// coefficient pairs so one fused pass computes them without materialising D.
template <typename T> struct Affine2 {
  T a_z, a_f;
};

// Euler, docs/method.md §5 (sign as in the authors' code):
//   z_next = z + (sigma_next - sigma) * (z - D) / sigma,  D = c_skip*z + c_out*F.
// With `denoised` the second input already is D (discrete targets: softmax(logits)·E).
// a_z = 1 + h·(1 − c_skip) with h = (sigma_next − sigma)/sigma is written as the sum of two
// positive terms, c_skip + r·(1 − c_skip) with r = sigma_next/sigma: 1 + h cancels when
// sigma_next ≪ sigma (float32 kept ~1e-3 relative at sigma = 1e6 → sigma_next = 1).
template <typename T>
DBX_HOST_DEVICE Affine2<T> euler_coefficients(T sigma, T sigma_next, T sigma_data, bool denoised) {
  const T r = sigma_next / sigma, a_f = (sigma - sigma_next) / sigma;  // a_f = −h
  if (denoised) return {r, a_f};
  return {c_skip(sigma, sigma_data) + r * one_minus_c_skip(sigma, sigma_data), a_f * c_out(sigma, sigma_data)};
}

// Heun (EDM Algorithm 1): with d(z, D, s) = (z - D)/s,
//   z_next = z + (sigma_next - sigma)/2 * (d(z, D, sigma) + d(z_euler, D_euler, sigma_next)),
// where z_euler is the Euler prediction at sigma_next and D_euler the denoiser output there.
// The first pair's coefficients act on (z, F), the second on (z_euler, F_euler).
template <typename T> struct Affine4 {
  Affine2<T> first, second;
};
template <typename T>
DBX_HOST_DEVICE Affine4<T> heun_coefficients(T sigma, T sigma_next, T sigma_data, bool denoised) {
  const T half_dt = (sigma_next - sigma) / T(2);
  // d(z, D, s) contributes (1 - c_skip)/s on z and -c_out/s on F (or 1/s and -1/s if denoised).
  const T ks1 = denoised ? T(1) : one_minus_c_skip(sigma, sigma_data);
  const T kf1 = denoised ? T(1) : c_out(sigma, sigma_data);
  const T ks2 = denoised ? T(1) : one_minus_c_skip(sigma_next, sigma_data);
  const T kf2 = denoised ? T(1) : c_out(sigma_next, sigma_data);
  return {{T(1) + half_dt * ks1 / sigma, -half_dt * kf1 / sigma},
          {half_dt * ks2 / sigma_next, -half_dt * kf2 / sigma_next}};
}

}  // namespace dbx

namespace dbx {
// The score-matching loss in F-space (docs/method.md §2): λ(σ)·(D − y)² == (F − f_target)² exactly,
// because λ·c_out² = 1. The F-space form stays bounded where λ reaches 2.5e5 (σ = 0.002).
template <typename T>
DBX_HOST_DEVICE T f_target(T y, T z, T c_skip_sigma, T inv_c_out_sigma) {
  return (y - c_skip_sigma * z) * inv_c_out_sigma;
}
}  // namespace dbx
