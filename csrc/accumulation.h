// The per-row vectors every kernel reads in its accumulation type acc_t = at::opmath_type
// (σ, weights, upstream gradients, lse), converted once on the host. Shared by the CPU and
// CUDA host code; the matching runtime dtype is at::toOpMathType.
#pragma once
#include <ATen/core/Tensor.h>

namespace dbx {

// A per-row vector of any float dtype as a contiguous tensor of acc_t.
template <typename acc_t> at::Tensor acc_vector(const at::Tensor& v) {
  return v.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

}  // namespace dbx
