"""Pure-PyTorch implementation of every op: the fallback when the compiled extension is
absent and the oracle the kernels are tested against. Same signatures and semantics as
the public ops in diffusionblocks_ext; the formulas are named as in EDM / docs/method.md §2–§5
and written once here (the C++ copy is csrc/edm.h).

Conventions shared with the kernels:
- σ is a per-example tensor [N], broadcast over the trailing dims of [N, ...] inputs.
- Arithmetic runs in the accumulation dtype: float64 for float64 inputs, else float32;
  results are cast back to the input dtype (losses stay in the accumulation dtype).
- Noise is Philox4x32-10 keyed by (seed, offset, element index in row-major order),
  so it does not depend on strides or on the device.
"""

import math

import torch

from . import _checks as check
from . import _philox

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_rows(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-example [N] vector shaped to broadcast over x's trailing dims, in x's acc dtype."""
    return s.to(acc_dtype(x.dtype)).reshape((-1,) + (1,) * (x.dim() - 1))


def _per_row(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [N, M] (M = product of the trailing dims; also for N = 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# EDM preconditioning (docs/method.md §2); sigma is a tensor.
def c_skip(sigma, sigma_data=SIGMA_DATA):
    """EDM's skip scale: σ_d²/(σ² + σ_d²), the share of z kept in D = c_skip·z + c_out·F."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def one_minus_c_skip(sigma, sigma_data=SIGMA_DATA):
    """1 − c_skip = σ²/(σ² + σ_d²), computed as such: the difference cancels for σ ≪ σ_d
    (float32 keeps ~16 fewer bits at σ = 0.002), and the samplers scale it by (σ_next − σ)/σ."""
    return sigma**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data=SIGMA_DATA):
    """EDM's output scale: σ·σ_d/√(σ² + σ_d²), the network's share F of D."""
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma, sigma_data=SIGMA_DATA):
    """EDM's input scale: 1/√(σ² + σ_d²), which brings z = y + σ·ε to unit variance."""
    return 1 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma):
    """EDM's noise conditioning: ln(σ)/4, what the level embedding reads."""
    return torch.log(sigma) / 4


def loss_weight(sigma, sigma_data=SIGMA_DATA):
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out²."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def euler_coefficients(sigma, sigma_next, sigma_data=SIGMA_DATA, denoised=False):
    """(a_z, a_F) with z_next = a_z·z + a_F·F, for z_next = z + (σ_next − σ)(z − D)/σ.
    a_z = 1 + h·(1 − c_skip), h = (σ_next − σ)/σ, is computed as c_skip + (σ_next/σ)·(1 − c_skip):
    two positive terms, where 1 + h cancels for σ_next ≪ σ (as in csrc/edm.h)."""
    r, a_f = sigma_next / sigma, (sigma - sigma_next) / sigma
    if denoised:
        return r, a_f
    return c_skip(sigma, sigma_data) + r * one_minus_c_skip(sigma, sigma_data), a_f * c_out(sigma, sigma_data)


def heun_coefficients(sigma, sigma_next, sigma_data=SIGMA_DATA, denoised=False):
    """Coefficients on (z, F, z_euler, F_euler) of the Heun step (EDM Algorithm 1)."""
    half_dt = (sigma_next - sigma) / 2
    if denoised:
        one = torch.ones_like(sigma)
        ks1, kf1, ks2, kf2 = one, one, one, one
    else:
        ks1, kf1 = one_minus_c_skip(sigma, sigma_data), c_out(sigma, sigma_data)
        ks2, kf2 = one_minus_c_skip(sigma_next, sigma_data), c_out(sigma_next, sigma_data)
    return (1 + half_dt * ks1 / sigma, -half_dt * kf1 / sigma,
            half_dt * ks2 / sigma_next, -half_dt * kf2 / sigma_next)


def _lognormal_range(sigma_lo, sigma_hi, p_mean, p_std):
    """(s, p_lo, p_hi): Φ(s·ℓ) at the range ends, ℓ = (ln σ − p_mean)/p_std. A range above
    the median (s = −1) is sampled through Φ(−ℓ) = 1 − Φ(ℓ), which keeps the digits Φ(ℓ)
    loses as it rounds to 1 (csrc/lognormal.h does the same). Φ by erfc, as there:
    torch.special.ndtr returns 0 below ℓ ≈ −8.3 instead of the tail value."""
    ell = [(math.log(v) - p_mean) / p_std for v in (sigma_lo, sigma_hi)]
    s = -1.0 if ell[0] > 0 else 1.0
    p_lo, p_hi = (0.5 * math.erfc(-s * v / math.sqrt(2)) for v in ell)
    return s, p_lo, p_hi


def check_sample_sigma(n, sigma_lo, sigma_hi, p_mean, p_std, dtype):
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        check.fail(f"n: expected an integer >= 0, got {n!r}")
    check.number("sigma_lo", sigma_lo)
    check.number("sigma_hi", sigma_hi)
    finite = all(math.isfinite(v) for v in (sigma_lo, sigma_hi))
    if not finite or not 0 < sigma_lo <= sigma_hi:
        check.fail(f"sigma_lo, sigma_hi: expected 0 < sigma_lo <= sigma_hi, both finite, "
                   f"got sigma_lo={sigma_lo:g}, sigma_hi={sigma_hi:g}")
    check.number("p_mean", p_mean)
    if not math.isfinite(p_mean):
        check.fail(f"p_mean: expected a finite number, got {p_mean:g}")
    check.positive_number("p_std", p_std)
    _, p_lo, p_hi = _lognormal_range(sigma_lo, sigma_hi, p_mean, p_std)
    if p_lo == p_hi and sigma_lo < sigma_hi:  # no mass representable in float64: σ < 1e-20 or so
        check.fail(f"sigma_lo, sigma_hi: expected a range with probability > 0 under the log-normal, "
                   f"got sigma_lo={sigma_lo:g}, sigma_hi={sigma_hi:g}")
    if dtype not in check.FLOAT_DTYPES:
        check.fail(f"dtype: expected a floating-point dtype, got {check.dtype_name(dtype)}")


def sample_sigma(n, sigma_lo, sigma_hi, *, seed=None, offset=0, p_mean=P_MEAN, p_std=P_STD,
                 device=None, dtype=torch.float32, generator=None):
    """n draws of σ from the log-normal (ln σ ~ N(p_mean, p_std²)) truncated to
    [sigma_lo, sigma_hi], by inverse CDF in float64 (docs/method.md §3). Example i uses Philox
    counter (i, offset)."""
    check_sample_sigma(n, sigma_lo, sigma_hi, p_mean, p_std, dtype)
    seed = _philox.resolve_seed(seed, generator)
    device = torch.device("cpu") if device is None else torch.device(device)
    x = _philox.philox4x32_10(torch.arange(n, dtype=torch.int64, device=device), offset, seed)
    u = _philox.uniform53(x[0], x[1])
    s, p_lo, p_hi = _lognormal_range(sigma_lo, sigma_hi, p_mean, p_std)
    sigma = torch.exp(p_mean + p_std * s * torch.special.ndtri(p_lo + u * (p_hi - p_lo)))
    return sigma.clamp(sigma_lo, sigma_hi).to(dtype)


# `values=False` skips the data-dependent checks (σ > 0, class indices in range) for
# callers whose kernel makes them itself: the CPU kernels read the values anyway, and
# a check in Python costs more than the op at training sizes.
def _check_sigma(name, sigma, ref_name, ref, allow_zero=False, values=True):
    check.per_example(name, sigma, ref_name, ref)
    check.no_grad_wrt(name, sigma)
    if values:
        check.values_positive(name, sigma, allow_zero)


def check_add_noise(y, sigma, sigma_data, values=True):
    check.floating("y", y)
    check.batched("y", y)
    _check_sigma("sigma", sigma, "y", y, values=values)
    check.positive_number("sigma_data", sigma_data)


def add_noise(y, sigma, *, seed=None, offset=0, sigma_data=SIGMA_DATA, generator=None):
    """(z, z_in): z = y + σ·ε with ε ~ N(0, I) from Philox (seed, offset), z_in = c_in(σ)·z."""
    check_add_noise(y, sigma, sigma_data)
    seed = _philox.resolve_seed(seed, generator)
    eps = _philox.normal(y.numel(), seed, offset, y.device).reshape(y.shape)
    s = broadcast_rows(sigma, y)
    z = y.to(s.dtype) + s * eps.to(s.dtype)
    return z.to(y.dtype), (c_in(s, sigma_data) * z).to(y.dtype)


def _check_pair(first_name, first, second_name, second):
    check.floating(first_name, first)
    check.batched(first_name, first)
    check.like(second_name, second, first_name, first)


def check_denoise(F, z, sigma, sigma_data, values=True):
    _check_pair("F", F, "z", z)
    _check_sigma("sigma", sigma, "F", F, values=values)
    check.positive_number("sigma_data", sigma_data)


def denoise(F, z, sigma, *, sigma_data=SIGMA_DATA):
    """D = c_skip(σ)·z + c_out(σ)·F."""
    check_denoise(F, z, sigma, sigma_data)
    s = broadcast_rows(sigma, F)
    return (c_skip(s, sigma_data) * z.to(s.dtype) + c_out(s, sigma_data) * F.to(s.dtype)).to(F.dtype)


def check_euler_step(z, F, sigma, sigma_next, sigma_data, values=True):
    _check_pair("z", z, "F", F)
    _check_sigma("sigma", sigma, "z", z, values=values)
    _check_sigma("sigma_next", sigma_next, "z", z, allow_zero=True, values=values)
    check.positive_number("sigma_data", sigma_data)


def euler_step(z, F, sigma, sigma_next, *, sigma_data=SIGMA_DATA, denoised=False):
    """z + (σ_next − σ)·(z − D)/σ with D = denoise(F, z, σ), or D = F when `denoised`.
    σ_next may be 0 (the step then returns D)."""
    check_euler_step(z, F, sigma, sigma_next, sigma_data)
    a_z, a_f = euler_coefficients(broadcast_rows(sigma, z), broadcast_rows(sigma_next, z), sigma_data,
                                  denoised)
    return (a_z * z.to(a_z.dtype) + a_f * F.to(a_z.dtype)).to(z.dtype)


def check_heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data, values=True):
    _check_pair("z", z, "F", F)
    check.like("z_euler", z_euler, "z", z)
    check.like("F_euler", F_euler, "z", z)
    _check_sigma("sigma", sigma, "z", z, values=values)
    _check_sigma("sigma_next", sigma_next, "z", z, values=values)
    check.positive_number("sigma_data", sigma_data)


def heun_step(z, F, z_euler, F_euler, sigma, sigma_next, *, sigma_data=SIGMA_DATA, denoised=False):
    """Second-order (Heun) step from σ to σ_next > 0: averages the slope at (z, σ) and at
    the Euler prediction (z_euler, σ_next), whose network output is F_euler."""
    check_heun_step(z, F, z_euler, F_euler, sigma, sigma_next, sigma_data)
    coefs = heun_coefficients(broadcast_rows(sigma, z), broadcast_rows(sigma_next, z), sigma_data, denoised)
    out = sum(c * x.to(c.dtype) for c, x in zip(coefs, (z, F, z_euler, F_euler)))
    return out.to(z.dtype)


def check_edm_loss(F, z, y, sigma, sigma_data, values=True):
    _check_pair("F", F, "z", z)
    check.like("y", y, "F", F)
    _check_sigma("sigma", sigma, "F", F, values=values)
    check.positive_number("sigma_data", sigma_data)


def edm_loss(F, z, y, sigma, *, sigma_data=SIGMA_DATA):
    """Per-example [N] loss mean((F − (y − c_skip·z)/c_out)²) over the trailing dims,
    equal to λ(σ)·mean((D − y)²) (docs/method.md §2). float32 (float64 for float64 inputs)."""
    check_edm_loss(F, z, y, sigma, sigma_data)
    s = broadcast_rows(sigma, F)
    target = (y.to(s.dtype) - c_skip(s, sigma_data) * z.to(s.dtype)) / c_out(s, sigma_data)
    return _per_row((F.to(s.dtype) - target).square()).mean(dim=1)


def check_edm_loss_backward(grad, F, z, y, sigma):
    """The fused backward's arguments (the dispatcher op edm_loss_backward)."""
    _check_pair("F", F, "z", z)
    check.like("y", y, "F", F)
    check.per_example("sigma", sigma, "F", F)
    check.per_example("grad", grad, "F", F)


def _check_logits(logits):
    check.floating("logits", logits)
    if logits.dim() not in (2, 3):
        check.fail(f"logits: expected shape [N, C] or [N, T, C], got {list(logits.shape)}")


def _check_per_position(name, t, logits):
    check.tensor(name, t)
    check.same_device(name, t, "logits", logits)
    if t.shape != logits.shape[:-1]:
        check.fail(f"{name}: expected shape {list(logits.shape[:-1])} (logits without its class dim), "
                   f"got {list(t.shape)}")


def _check_target(target, logits):
    check.tensor("target", target)
    if target.dtype != torch.int64:
        check.fail(f"target: expected an int64 tensor of class indices, got {check.dtype_name(target.dtype)}")
    _check_per_position("target", target, logits)


def check_cross_entropy_backward(grad, logits, target, weight, lse):
    """The fused backward's arguments (the dispatcher op weighted_cross_entropy_backward)."""
    _check_logits(logits)
    _check_target(target, logits)
    check.floating("lse", lse)
    _check_per_position("lse", lse, logits)
    check.per_example("weight", weight, "logits", logits)
    check.per_example("grad", grad, "logits", logits)


def check_weighted_cross_entropy(logits, target, weight, ignore_index, values=True):
    _check_logits(logits)
    if logits.shape[-1] == 0:
        check.fail("logits: expected at least one class (C >= 1), got C = 0")
    _check_target(target, logits)
    check.per_example("weight", weight, "logits", logits)
    check.no_grad_wrt("weight", weight)
    if values and not torch.compiler.is_compiling() and not check.trusted() and target.numel() > 0 \
            and target.device.type != "meta":
        valid = ((target >= 0) & (target < logits.shape[-1])) | (target == ignore_index)
        if not bool(valid.all()):
            check.fail(f"target: expected class indices in [0, {logits.shape[-1]}) "
                       f"or ignore_index = {ignore_index}")


def weighted_cross_entropy(logits, target, weight, *, ignore_index=-100):
    """Per-example [N] weight·CE over logits [N, C] or [N, T, C]. With T positions the CE
    is summed over positions whose target is not ignore_index and divided by T (all
    positions), so masked-diffusion losses keep their per-token normalisation."""
    check_weighted_cross_entropy(logits, target, weight, ignore_index)
    acc = acc_dtype(logits.dtype)
    flat = logits.reshape(-1, logits.shape[-1]).to(acc)
    ce = torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none",
                                           ignore_index=ignore_index)
    per_example = _per_row(ce.reshape(logits.shape[:-1])).mean(dim=1)
    return weight.to(acc) * per_example
