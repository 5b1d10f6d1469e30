#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

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
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " like ", ref_name,
                    ", got ", t.sizes());
}

void per_example(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref) {
  floating(name, s);
  same_device(name, s, ref_name, ref);
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == ref.size(0), name, ": expected shape [N] with N = ",
                    ref.size(0), " (the leading dim of ", ref_name, "), got ", s.sizes());
}

void positive_number(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, name, ": expected a positive finite number, got ",
                    value);
}

void values_positive(const char* name, const at::Tensor& s, bool allow_zero) {
  if (!s.device().is_cpu() || s.numel() == 0) return;
  const auto ok = (allow_zero ? s.ge(0) : s.gt(0)).logical_and_(s.isfinite());
  TORCH_CHECK_VALUE(ok.all().item<bool>(), name, ": expected every value ", allow_zero ? ">= 0" : "> 0",
                    " and finite");
}

void sigma(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref,
           bool allow_zero) {
  per_example(name, s, ref_name, ref);
  values_positive(name, s, allow_zero);
}

void cross_entropy_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                        int64_t ignore_index) {
  floating("logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3,
                    "logits: expected shape [N, C] or [N, T, C], got ", logits.sizes());
  const int64_t classes = logits.size(-1);
  TORCH_CHECK_VALUE(classes > 0, "logits: expected at least one class (C >= 1), got C = 0");
  TORCH_CHECK_VALUE(target.scalar_type() == c10::ScalarType::Long,
                    "target: expected an int64 tensor of class indices, got ", dtype_name(target.scalar_type()));
  same_device("target", target, "logits", logits);
  const auto expected = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == expected, "target: expected shape ", expected,
                    " (logits without its class dim), got ", target.sizes());
  per_example("weight", weight, "logits", logits);
  if (target.device().is_cpu() && target.numel() > 0) {
    const auto valid = target.ge(0).logical_and_(target.lt(classes)).logical_or_(target.eq(ignore_index));
    TORCH_CHECK_VALUE(valid.all().item<bool>(), "target: expected class indices in [0, ", classes,
                      ") or ignore_index = ", ignore_index);
  }
}

}  // namespace dbx::check
