#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <sstream>

#include "lognormal.h"

namespace dbx::check {

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Long: return "int64";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Short: return "int16";
    case c10::ScalarType::Char: return "int8";
    case c10::ScalarType::Byte: return "uint8";
    case c10::ScalarType::Bool: return "bool";
    case c10::ScalarType::ComplexFloat: return "complex64";
    case c10::ScalarType::ComplexDouble: return "complex128";
    default: return c10::toString(dtype);
  }
}

std::string num(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", value);  // what operator<< prints at its default precision
  return text;
}

std::string num(int64_t value) { return std::to_string(value); }

std::string shape(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

static bool is_floating(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
         dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
}

void floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(is_floating(t.scalar_type()), name,
                    ": expected a floating-point tensor (float32, float64, bfloat16 or float16), got ",
                    dtype_name(t.scalar_type()));
}

void batched(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() > 0, name, ": expected at least 1 dimension [N, ...], got a 0-d tensor");
}

void same_device(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected a tensor on ", ref.device().str(),
                    " like ", ref_name, ", got ", t.device().str());
}

void like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  same_device(name, t, ref_name, ref);
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
                    dtype_name(ref.scalar_type()), " like ", ref_name, ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", shape(ref.sizes()), " like ", ref_name,
                    ", got ", shape(t.sizes()));
}

void per_example(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref) {
  floating(name, s);
  same_device(name, s, ref_name, ref);
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == ref.size(0), name, ": expected shape [N] with N = ",
                    num(ref.size(0)), " (the leading dim of ", ref_name, "), got ", shape(s.sizes()));
}

void positive_number(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, name, ": expected a positive finite number, got ",
                    num(value));
}

// The largest σ accepted (same as _checks.SIGMA_LIMIT): beyond 1.8e19 σ² overflows float32
// and c_out = σ·σ_d/sqrt(σ² + σ_d²) becomes 0, which would give silently wrong results.
constexpr double kSigmaLimit = 1e18;

void values_positive(const char* name, const at::Tensor& s, bool allow_zero) {
  if (!s.device().is_cpu() || s.numel() == 0) return;
  // A plain loop: σ has one value per example, and ATen ops here would cost more than
  // the kernels they guard at training sizes.
  const at::Tensor values = s.to(c10::ScalarType::Double).contiguous();
  const double* v = values.const_data_ptr<double>();
  bool ok = true, bounded = true;
  for (int64_t i = 0; i < values.numel(); ++i) {
    ok &= std::isfinite(v[i]) && (allow_zero ? v[i] >= 0 : v[i] > 0);
    bounded &= v[i] <= kSigmaLimit;
  }
  TORCH_CHECK_VALUE(ok, name, ": expected every value ", allow_zero ? ">= 0" : "> 0", " and finite");
  TORCH_CHECK_VALUE(bounded, name, ": expected every value <= 1e+18 (larger values overflow float32 arithmetic)");
}

void sigma(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref,
           bool allow_zero) {
  per_example(name, s, ref_name, ref);
  values_positive(name, s, allow_zero);
}

void sample_sigma_args(const at::Tensor& out, double sigma_lo, double sigma_hi, double p_mean, double p_std) {
  floating("out", out);
  // An expanded out has one memory location for several draws: the last write would win.
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                    "out: expected a tensor whose elements do not share memory, got an expanded one");
  TORCH_CHECK_VALUE(std::isfinite(sigma_lo) && std::isfinite(sigma_hi) && 0 < sigma_lo && sigma_lo <= sigma_hi,
                    "sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, got sigma_lo=", num(sigma_lo),
                    ", sigma_hi=", num(sigma_hi));
  TORCH_CHECK_VALUE(std::isfinite(p_mean), "p_mean: expected a finite number, got ", num(p_mean));
  positive_number("p_std", p_std);
  const LognormalRange range = lognormal_range(sigma_lo, sigma_hi, p_mean, p_std);
  TORCH_CHECK_VALUE(range.p_lo != range.p_hi || sigma_lo == sigma_hi,  // σ < 1e-20 or so: no mass in float64
                    "sigma_lo, sigma_hi: expected a range with probability > 0 under the log-normal, got sigma_lo=",
                    num(sigma_lo), ", sigma_hi=", num(sigma_hi));
}

void add_noise_args(const at::Tensor& y, const at::Tensor& sigma, double sigma_data) {
  floating("y", y);
  batched("y", y);
  check::sigma("sigma", sigma, "y", y);
  positive_number("sigma_data", sigma_data);
}

void denoise_args(const at::Tensor& F, const at::Tensor& z, const at::Tensor& sigma, double sigma_data) {
  floating("F", F);
  batched("F", F);
  like("z", z, "F", F);
  check::sigma("sigma", sigma, "F", F);
  positive_number("sigma_data", sigma_data);
}

void euler_step_args(const at::Tensor& z, const at::Tensor& F, const at::Tensor& sigma,
                     const at::Tensor& sigma_next, double sigma_data) {
  floating("z", z);
  batched("z", z);
  like("F", F, "z", z);
  check::sigma("sigma", sigma, "z", z);
  check::sigma("sigma_next", sigma_next, "z", z, /*allow_zero=*/true);  // stepping to 0 returns D
  positive_number("sigma_data", sigma_data);
}

void heun_step_args(const at::Tensor& z, const at::Tensor& F, const at::Tensor& z_euler, const at::Tensor& F_euler,
                    const at::Tensor& sigma, const at::Tensor& sigma_next, double sigma_data) {
  floating("z", z);
  batched("z", z);
  like("F", F, "z", z);
  like("z_euler", z_euler, "z", z);
  like("F_euler", F_euler, "z", z);
  check::sigma("sigma", sigma, "z", z);
  check::sigma("sigma_next", sigma_next, "z", z);  // the slope at σ_next divides by it
  positive_number("sigma_data", sigma_data);
}

void edm_loss_args(const at::Tensor& F, const at::Tensor& z, const at::Tensor& y, const at::Tensor& sigma,
                   double sigma_data) {
  floating("F", F);
  batched("F", F);
  like("z", z, "F", F);
  like("y", y, "F", F);
  check::sigma("sigma", sigma, "F", F);
  positive_number("sigma_data", sigma_data);
}

void edm_loss_backward_args(const at::Tensor& grad, const at::Tensor& F, const at::Tensor& z, const at::Tensor& y,
                            const at::Tensor& sigma) {
  floating("F", F);
  batched("F", F);
  like("z", z, "F", F);
  like("y", y, "F", F);
  per_example("sigma", sigma, "F", F);
  per_example("grad", grad, "F", F);
}

static LogitsShape logits_shape(const at::Tensor& logits) {
  floating("logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3,
                    "logits: expected shape [N, C] or [N, T, C], got ", shape(logits.sizes()));
  return {logits.size(0), logits.dim() == 3 ? logits.size(1) : 1, logits.size(-1)};
}

static void per_position(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  same_device(name, t, "logits", logits);
  const auto expected = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", shape(expected),
                    " (logits without its class dim), got ", shape(t.sizes()));
}

static void class_indices(const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(target.scalar_type() == c10::ScalarType::Long,
                    "target: expected an int64 tensor of class indices, got ", dtype_name(target.scalar_type()));
  per_position("target", target, logits);
}

LogitsShape cross_entropy_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               int64_t ignore_index) {
  const LogitsShape accepted = logits_shape(logits);
  const int64_t classes = accepted.C;
  TORCH_CHECK_VALUE(classes > 0, "logits: expected at least one class (C >= 1), got C = 0");
  class_indices(target, logits);
  per_example("weight", weight, "logits", logits);
  if (target.device().is_cpu() && target.numel() > 0) {
    const at::Tensor indices = target.contiguous();
    const int64_t* t = indices.const_data_ptr<int64_t>();
    bool ok = true;
    for (int64_t i = 0; i < indices.numel(); ++i) ok &= (t[i] >= 0 && t[i] < classes) || t[i] == ignore_index;
    TORCH_CHECK_VALUE(ok, "target: expected class indices in [0, ", num(classes), ") or ignore_index = ",
                      num(ignore_index));
  }
  return accepted;
}

LogitsShape cross_entropy_backward_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& weight, const at::Tensor& lse) {
  const LogitsShape accepted = logits_shape(logits);
  class_indices(target, logits);
  floating("lse", lse);
  per_position("lse", lse, logits);
  per_example("weight", weight, "logits", logits);
  per_example("grad", grad, "logits", logits);
  return accepted;
}

}  // namespace dbx::check
