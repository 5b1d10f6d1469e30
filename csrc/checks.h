// Argument checks shared by the CPU and CUDA kernels. The text of every message is the
// same as in diffusionblocks_ext/_checks.py (argument name first, then what was expected,
// then what was given), so a bad input reads the same on every path. All raise ValueError.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

namespace dbx::check {

std::string dtype_name(c10::ScalarType dtype);
// Numbers and shapes as message text, written without iostreams: a toolchain that links a
// private copy of libstdc++ into the module (seen on a GPU machine's g++ wrapper) leaves
// that copy's number formatting uninitialised, and formatting a double or an int64 with
// operator<< there crashed the process while it built an error message. Same text as <<.
std::string num(double value);
std::string num(int64_t value);
std::string shape(at::IntArrayRef sizes);
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
// Checks of a σ vector: per_example + values_positive on CPU.
void sigma(const char* name, const at::Tensor& s, const char* ref_name, const at::Tensor& ref,
           bool allow_zero = false);

// The whole argument check of each op, called first by its CPU and its CUDA kernel.
void sample_sigma_args(const at::Tensor& out, double sigma_lo, double sigma_hi, double p_mean, double p_std);
void add_noise_args(const at::Tensor& y, const at::Tensor& sigma, double sigma_data);
void denoise_args(const at::Tensor& F, const at::Tensor& z, const at::Tensor& sigma, double sigma_data);
void euler_step_args(const at::Tensor& z, const at::Tensor& F, const at::Tensor& sigma,
                     const at::Tensor& sigma_next, double sigma_data);
void heun_step_args(const at::Tensor& z, const at::Tensor& F, const at::Tensor& z_euler, const at::Tensor& F_euler,
                    const at::Tensor& sigma, const at::Tensor& sigma_next, double sigma_data);
void edm_loss_args(const at::Tensor& F, const at::Tensor& z, const at::Tensor& y, const at::Tensor& sigma,
                   double sigma_data);
void edm_loss_backward_args(const at::Tensor& grad, const at::Tensor& F, const at::Tensor& z, const at::Tensor& y,
                            const at::Tensor& sigma);
// Logits [N, C] or [N, T, C] read as N examples of T positions (T = 1 for [N, C]) of C
// classes; the cross-entropy checks return the shape they accepted.
struct LogitsShape {
  int64_t N, T, C;
};
// Target values are checked on CPU only (the Python layer checks CUDA ones).
LogitsShape cross_entropy_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                               int64_t ignore_index);
LogitsShape cross_entropy_backward_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& weight, const at::Tensor& lse);

}  // namespace dbx::check
