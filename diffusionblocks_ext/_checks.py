"""Argument checks shared by the public ops and the reference. The C++ kernels raise the
same text from csrc/checks.h, so a bad input reads the same on every path. Messages
name the argument first, then what was expected, then what was given."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fail(message: str):
    raise ValueError(message)


def tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        fail(f"{name}: expected a tensor, got {type(t).__name__}")


def floating(name: str, t: torch.Tensor) -> None:
    tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name}: expected a floating-point tensor (float32, float64, bfloat16 or float16), "
             f"got {dtype_name(t.dtype)}")


def batched(name: str, t: torch.Tensor) -> None:
    if t.dim() == 0:
        fail(f"{name}: expected at least 1 dimension [N, ...], got a 0-d tensor")


def like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same device, dtype and shape as `ref`."""
    same_device(name, t, ref_name, ref)
    if t.dtype != ref.dtype:
        fail(f"{name}: expected dtype {dtype_name(ref.dtype)} like {ref_name}, got {dtype_name(t.dtype)}")
    if t.shape != ref.shape:
        fail(f"{name}: expected shape {list(ref.shape)} like {ref_name}, got {list(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        fail(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {t.device}")


def per_example(name: str, s: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """A per-example vector [N] matching the leading dim of `ref`, on its device."""
    floating(name, s)
    same_device(name, s, ref_name, ref)
    if s.dim() != 1 or s.shape[0] != ref.shape[0]:
        fail(f"{name}: expected shape [N] with N = {ref.shape[0]} (the leading dim of {ref_name}), "
             f"got {list(s.shape)}")


def no_grad_wrt(name: str, t: torch.Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        fail(f"{name}: gradients with respect to {name} are not supported; pass {name}.detach()")


def positive_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(f"{name}: expected a positive finite number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        fail(f"{name}: expected a positive finite number, got {value:g}")


def values_positive(name: str, s: torch.Tensor, allow_zero: bool = False) -> None:
    """Data-dependent check (a device sync on CUDA); skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or s.numel() == 0:
        return
    ok = (s >= 0) if allow_zero else (s > 0)
    if not bool((ok & torch.isfinite(s)).all()):
        fail(f"{name}: expected every value {'>= 0' if allow_zero else '> 0'} and finite")
