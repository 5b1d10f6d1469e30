"""Argument checks shared by the public ops and the reference. The C++ kernels raise the
same text from csrc/checks.h, so a bad input reads the same on every path. Messages
name the argument first, then what was expected, then what was given."""

import contextlib
import contextvars
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
        refuse_gradient(name)


def refuse_gradient(name: str) -> None:
    fail(f"{name}: gradients with respect to {name} are not supported; pass {name}.detach()")


def number(name: str, value) -> None:
    """A Python int or float (not bool, not a tensor: the schemas take float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(f"{name}: expected a number, got {type(value).__name__}")


def positive_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(f"{name}: expected a positive finite number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        fail(f"{name}: expected a positive finite number, got {value:g}")


# The largest σ the ops accept: σ² must stay finite in float32 arithmetic (beyond 1.8e19
# c_out = σ·σ_d/sqrt(σ² + σ_d²) becomes 0 and results silently 0 or NaN). 1e18 is 16
# orders past σ_max = 80, and one bound for every dtype keeps the message the same.
SIGMA_LIMIT = 1e18


_VALUES_TRUSTED = contextvars.ContextVar("values_trusted", default=False)


@contextlib.contextmanager
def values_trusted():
    """Inside, the ops do not read σ (and weight) values to check them: for callers whose
    values are valid by construction, such as a training loop that draws σ from a range
    checked once. On a GPU each such check is a wait for the device. Shapes, dtypes and
    devices are still checked, and the CPU kernels still check values (it costs nothing there).
    Class indices of weighted_cross_entropy are trusted alike."""
    token = _VALUES_TRUSTED.set(True)
    try:
        yield
    finally:
        _VALUES_TRUSTED.reset(token)


def trusted() -> bool:
    """Whether the caller is inside values_trusted()."""
    return _VALUES_TRUSTED.get()


def values_positive(name: str, s: torch.Tensor, allow_zero: bool = False) -> None:
    """Data-dependent check (a device sync on CUDA); skipped while torch.compile traces,
    for meta tensors, which have no values, and inside values_trusted()."""
    if torch.compiler.is_compiling() or s.numel() == 0 or s.device.type == "meta" or trusted():
        return
    ok = ((s >= 0) if allow_zero else (s > 0)) & torch.isfinite(s)  # NaN fails the comparison
    # One sync when all is well. isfinite above is needed: in float16 the bound rounds to inf.
    if bool((ok & (s <= SIGMA_LIMIT)).all()):
        return
    if not bool(ok.all()):
        fail(f"{name}: expected every value {'>= 0' if allow_zero else '> 0'} and finite")
    fail(f"{name}: expected every value <= 1e+18 (larger values overflow float32 arithmetic)")
