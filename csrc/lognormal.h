// The truncated log-normal σ sampler of docs/method.md §3, by inverse CDF:
//   u ~ U(Φ(ℓ_lo), Φ(ℓ_hi)),  ℓ = (ln σ − P_mean)/P_std,  σ = exp(P_mean + P_std·Φ⁻¹(u)),
// computed from the tail the range lies in (LognormalRange below).
// In float64 throughout: Φ(ℓ_hi) is 1 − 1.6e−6 at σ_max = 80.
#pragma once
#include <cmath>
#include <limits>

#include "macros.h"

namespace dbx {

DBX_HOST_DEVICE double normal_cdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }

// Φ⁻¹ by Wichura's algorithm AS 241 (PPND16, Applied Statistics 37, 1988): rational
// approximations in three ranges, relative error about 1e-16, with only log and sqrt in
// the tails (no erfc/exp refinement), so it costs little more than the Philox draw.
// 1 − p is exact for p ≥ 0.5 (Sterbenz), so the upper tail near σ_max keeps its digits.
// One copy for host and device, and for scalars and vectors: the three ranges are
// templates over the number type, so the CPU kernel can evaluate all of them on
// at::vec::Vectorized<double> lanes and blend (noise.cpp). Coefficients in ascending
// powers, as published.
template <typename T>
DBX_HOST_DEVICE T horner8(const double* c, T x) {
  return ((((((T(c[7]) * x + T(c[6])) * x + T(c[5])) * x + T(c[4])) * x + T(c[3])) * x + T(c[2])) * x +
          T(c[1])) * x + T(c[0]);
}

// |q| ≤ 0.425 with q = p − 0.5.
template <typename T>
DBX_HOST_DEVICE T normal_icdf_central(T q) {
  const double a[8] = {3.3871328727963666080e0, 1.3314166789178437745e+2, 1.9715909503065514427e+3,
                       1.3731693765509461125e+4, 4.5921953931549871457e+4, 6.7265770927008700853e+4,
                       3.3430575583588128105e+4, 2.5090809287301226727e+3};
  const double b[8] = {1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2, 5.3941960214247511077e+3,
                       2.1213794301586595867e+4, 3.9307895800092710610e+4, 2.8729085735721942674e+4,
                       5.2264952788528545610e+3};
  const T r = T(0.180625) - q * q;
  return q * horner8(a, r) / horner8(b, r);
}

// The tails in r = sqrt(−ln min(p, 1 − p)): |Φ⁻¹(p)| for r ≤ 5 ...
template <typename T>
DBX_HOST_DEVICE T normal_icdf_tail_near(T r) {
  const double c[8] = {1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
                       3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
                       2.27238449892691845833e-2, 7.74545014278341407640e-4};
  const double d[8] = {1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
                       1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
                       1.05075007164441684324e-9};
  return horner8(c, r - T(1.6)) / horner8(d, r - T(1.6));
}

// ... and for r > 5 (p below about 1e-11 from either end).
template <typename T>
DBX_HOST_DEVICE T normal_icdf_tail_far(T r) {
  const double e[8] = {6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
                       2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
                       2.71155556874348757815e-5, 2.01033439929228813265e-7};
  const double f[8] = {1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
                       7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                       2.04426310338993978564e-15};
  return horner8(e, r - T(5.0)) / horner8(f, r - T(5.0));
}

DBX_HOST_DEVICE double normal_icdf(double p) {
  // The ends map to ∓inf like torch.special.ndtri (the rational tails would give inf/inf = NaN).
  if (p <= 0.0) return -std::numeric_limits<double>::infinity();
  if (p >= 1.0) return std::numeric_limits<double>::infinity();
  const double q = p - 0.5;
  if (std::fabs(q) <= 0.425) return normal_icdf_central(q);
  const double r = std::sqrt(-std::log(q < 0 ? p : 1.0 - p));
  const double x = r <= 5.0 ? normal_icdf_tail_near(r) : normal_icdf_tail_far(r);
  return q < 0 ? -x : x;
}

// A range [sigma_lo, sigma_hi] prepared for sampling, once per call (on the host).
// p_lo/p_hi are Φ(s·ℓ) at the range ends with s = −1 for a range above the median
// (ℓ_lo > 0): there Φ(−ℓ) = 1 − Φ(ℓ) keeps the digits that Φ(ℓ) loses as it rounds to 1
// (from σ ≈ 1e5 on Φ(ℓ_lo) = Φ(ℓ_hi) = 1, and every draw would collapse onto sigma_hi).
struct LognormalRange {
  double p_lo, p_hi, s, sigma_lo, sigma_hi, p_mean, p_std;
};

DBX_HOST_DEVICE LognormalRange lognormal_range(double sigma_lo, double sigma_hi, double p_mean, double p_std) {
  const double l_lo = (std::log(sigma_lo) - p_mean) / p_std, l_hi = (std::log(sigma_hi) - p_mean) / p_std;
  const double s = l_lo > 0 ? -1.0 : 1.0;
  return {normal_cdf(s * l_lo), normal_cdf(s * l_hi), s, sigma_lo, sigma_hi, p_mean, p_std};
}

// Maps a uniform u in (0, 1) to σ in [sigma_lo, sigma_hi]: ℓ = s·Φ⁻¹(p_lo + u·(p_hi − p_lo))
// increases with u in both cases. The clamp absorbs the last ulp.
DBX_HOST_DEVICE double truncated_lognormal(double u, const LognormalRange& r) {
  const double l = r.s * normal_icdf(r.p_lo + u * (r.p_hi - r.p_lo));
  const double sigma = std::exp(r.p_mean + r.p_std * l);
  return sigma < r.sigma_lo ? r.sigma_lo : (sigma > r.sigma_hi ? r.sigma_hi : sigma);
}

}  // namespace dbx
