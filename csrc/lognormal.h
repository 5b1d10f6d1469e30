// The truncated log-normal σ sampler of SPEC §3, by inverse CDF:
//   u ~ U(Φ(ℓ_lo), Φ(ℓ_hi)),  ℓ = (ln σ − P_mean)/P_std,  σ = exp(P_mean + P_std·Φ⁻¹(u)).
// In float64 throughout: Φ(ℓ_hi) is 1 − 1.6e−6 at σ_max = 80.
#pragma once
#include <cmath>

#include "macros.h"

namespace dbx {

DBX_HOST_DEVICE double normal_cdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }

// Φ⁻¹ by Acklam's rational approximation (relative error 1.2e-9) refined by one Halley
// step on Φ, which brings it to full double precision. The upper half is mirrored onto
// the lower one: 1 − p is exact for p ≥ 0.5 (Sterbenz), and Φ(x) = erfc(−x/√2)/2 has no
// cancellation for x ≤ 0, so the tail near σ_max keeps all its digits. One copy for
// host and device.
DBX_HOST_DEVICE double normal_icdf_lower(double p) {  // p in (0, 0.5], result <= 0
  const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                       1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
  const double b[5] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                       6.680131188771972e+01, -1.328068155288572e+01};
  const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                       -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
  const double d[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                       3.754408661907416e+00};
  double x;
  if (p < 0.02425) {
    const double q = std::sqrt(-2.0 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  } else {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
  }
  // Halley step: e = Φ(x) − p, u = e·√(2π)·exp(x²/2).
  const double e = normal_cdf(x) - p;
  const double u = e * 2.50662827463100050242 * std::exp(0.5 * x * x);
  return x - u / (1.0 + 0.5 * x * u);
}

DBX_HOST_DEVICE double normal_icdf(double p) {
  return p <= 0.5 ? normal_icdf_lower(p) : -normal_icdf_lower(1.0 - p);
}

// Maps a uniform u in (0, 1) to σ in [sigma_lo, sigma_hi]. cdf_lo/cdf_hi are Φ(ℓ) at the
// range ends, computed once per call by the caller. The clamp absorbs the last ulp.
DBX_HOST_DEVICE double truncated_lognormal(double u, double cdf_lo, double cdf_hi, double sigma_lo,
                                           double sigma_hi, double p_mean, double p_std) {
  const double sigma = std::exp(p_mean + p_std * normal_icdf(cdf_lo + u * (cdf_hi - cdf_lo)));
  return sigma < sigma_lo ? sigma_lo : (sigma > sigma_hi ? sigma_hi : sigma);
}

}  // namespace dbx
