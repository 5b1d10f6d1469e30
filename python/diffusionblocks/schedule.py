"""Noise levels (docs/method.md §2-§5): how the σ axis is cut into block intervals, how a block
draws its training σ's, and which σ's the sampler visits. Boundaries are computed in
float64 because Φ⁻¹ is evaluated within 2e-6 of 1 at σ_max. Constants and the
log-normal sampler come from the op layer, so each formula lives in one place."""

import torch

import diffusionblocks_ext as dx

KARRAS_RHO = 7.0


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _cdf_of_sigma(sigma) -> torch.Tensor:
    """Φ((ln σ − P_mean)/P_std): where σ sits in the training density, in float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return _std_normal_cdf((torch.log(sigma) - dx.P_MEAN) / dx.P_STD)


def _sigma_of_cdf(q: torch.Tensor) -> torch.Tensor:
    return torch.exp(dx.P_MEAN + dx.P_STD * torch.special.ndtri(q))


def _cdf_range() -> tuple[float, float]:
    q = _cdf_of_sigma([dx.SIGMA_MIN, dx.SIGMA_MAX])
    return float(q[0]), float(q[1])


def _pin_ends(boundaries: torch.Tensor) -> torch.Tensor:
    """exp(ndtri(Φ(ln σ))) returns σ_min and σ_max only up to rounding; pin them exactly."""
    boundaries[0], boundaries[-1] = dx.SIGMA_MIN, dx.SIGMA_MAX
    return boundaries


def equi_probability_boundaries(num_blocks: int) -> torch.Tensor:
    """B+1 ascending σ's; each of the B intervals holds 1/B of the training density."""
    q_lo, q_hi = _cdf_range()
    fractions = torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks
    return _pin_ends(_sigma_of_cdf(q_lo + fractions * (q_hi - q_lo)))


def log_uniform_boundaries(num_blocks: int) -> torch.Tensor:
    """B+1 ascending σ's with equal widths in ln σ (the ablation baseline)."""
    ends = torch.tensor([dx.SIGMA_MIN, dx.SIGMA_MAX], dtype=torch.float64).log()
    fractions = torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks
    return _pin_ends(torch.exp(ends[0] + fractions * (ends[1] - ends[0])))


PARTITIONS = {"equi": equi_probability_boundaries, "uniform": log_uniform_boundaries}


def widen(sigma_lo: float, sigma_hi: float, gamma: float) -> tuple[float, float]:
    """The overlap γ: [σ_lo/a, a·σ_hi] with a = (σ_hi/σ_lo)^γ, clamped to [σ_min, σ_max]."""
    a = (sigma_hi / sigma_lo) ** gamma
    return max(sigma_lo / a, dx.SIGMA_MIN), min(sigma_hi * a, dx.SIGMA_MAX)


def sample_sigmas(n: int, sigma_range: tuple[float, float], generator=None, device=None) -> torch.Tensor:
    """n training σ's (float32 [n] on `device`) from the log-normal restricted to sigma_range;
    the same values on every device for the same generator state (the op's Philox stream)."""
    return dx.sample_sigma(n, sigma_range[0], sigma_range[1], generator=generator, device=device)


def inference_sigmas(num_steps: int) -> torch.Tensor:
    """num_steps σ's spaced equally in the CDF from q_hi down to q_lo (descending, float64):
    the first is σ_max, the last σ_min. With num_steps = B each block's interval holds one."""
    q_lo, q_hi = _cdf_range()
    if num_steps == 1:
        return torch.tensor([dx.SIGMA_MIN], dtype=torch.float64)  # one step: the cleanest level
    fractions = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return _pin_ends(_sigma_of_cdf(q_lo + fractions * (q_hi - q_lo))).flip(0)


def midpoint_sigmas(num_steps: int) -> torch.Tensor:
    """σ_max, then the CDF midpoints of intervals 2..N of N equal-probability intervals
    (descending, float64). With num_steps = B every block runs once, in the middle of its
    own interval, and the last level stays above σ_min: for discrete targets a level at
    σ_min only returns the character z already names, so its block would do nothing."""
    q_lo, q_hi = _cdf_range()
    fractions = (torch.arange(num_steps, dtype=torch.float64) + 0.5) / num_steps
    sigmas = _sigma_of_cdf(q_lo + fractions * (q_hi - q_lo)).flip(0)
    sigmas[0] = dx.SIGMA_MAX  # the chain starts from pure noise
    return sigmas


def karras_sigmas(num_steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """The EDM schedule (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, descending;
    for baselines only (it ignores the training density the partition follows)."""
    if num_steps == 1:
        return torch.tensor([dx.SIGMA_MIN], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = dx.SIGMA_MIN ** (1 / rho), dx.SIGMA_MAX ** (1 / rho)
    return (hi + i * (lo - hi)) ** rho


def interval_index(sigma: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Ascending interval of each σ. Intervals are half-open [σ_k, σ_k+1), the top one closed
    [σ_B−1, σ_B]; a σ exactly on a boundary belongs to the noisier interval above it. σ's
    outside [σ_min, σ_max] clamp to the end intervals."""
    interior = boundaries[1:-1].to(sigma.device, torch.float64)
    return torch.searchsorted(interior, sigma.to(torch.float64).contiguous(), right=True)


INFERENCE_SCHEDULES = {"cdf": inference_sigmas, "midpoint": midpoint_sigmas, "karras": karras_sigmas}
