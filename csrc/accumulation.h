// The ops' accumulation dtype (float64 for float64 inputs, float32 for the others, as
// at::opmath_type) and the per-row vectors every kernel reads in it (σ, weights, upstream
// gradients, lse), converted once on the host. Shared by the CPU and CUDA host code.
#pragma once
#include <ATen/core/Tensor.h>

namespace dbx {

inline c10::ScalarType acc_dtype(c10::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// A per-row vector of any float dtype as a contiguous tensor of acc_t.
template <typename acc_t> at::Tensor acc_vector(const at::Tensor& v) {
  return v.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

}  // namespace dbx
