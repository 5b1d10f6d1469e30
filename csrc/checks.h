// Argument checks shared by the CPU and CUDA kernels. The text of every message is the
// same as in diffusionblocks_ext/_checks.py (argument name first, then what was expected,
// then what was given), so a bad input reads the same on every path. All raise ValueError.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

namespace dbx::check {

std::string dtype_name(c10::ScalarType dtype);
void floating(const char* name, const at::Tensor& t);
void batched(const char* name, const at::Tensor& t);
void same_device(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);
// Same device, dtype and shape as ref.
void like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);
// A floating [N] vector on ref's device with N = ref.size(0).
void per_example(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref);
void positive_number(const char* name, double value);
// Reads the values: only for CPU tensors (the Python layer checks CUDA ones, once per call).
void values_positive(const char* name, const at::Tensor& s, bool allow_zero);
// Checks of the σ vector of a step op: per_example + values_positive on CPU.
void sigma(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref,
           bool allow_zero = false);
// Checks of weighted_cross_entropy's (logits, target, weight); target values on CPU only.
void cross_entropy_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                        int64_t ignore_index);

}  // namespace dbx::check
