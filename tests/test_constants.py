"""EDM coefficients against the spot values of docs/method.md §2, the same in the C++ header
(via the kernels) and in the reference."""

import math

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R


def test_coefficient_spot_values():
    sigma = torch.tensor([0.002, 80.0], dtype=torch.float64)
    assert R.c_skip(sigma).tolist() == pytest.approx([0.99998, 3.9e-5], rel=2e-2)
    assert R.c_skip(sigma)[0].item() == pytest.approx(0.25 / (0.002**2 + 0.25), rel=1e-15)
    assert R.c_out(sigma).tolist() == pytest.approx([0.0020, 0.49999], rel=1e-3)
    assert R.c_in(sigma).tolist() == pytest.approx([2.0, 0.0125], rel=1e-3)
    assert R.c_noise(sigma).tolist() == pytest.approx([math.log(0.002) / 4, math.log(80) / 4])


def test_loss_weight_is_inverse_c_out_squared():
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    torch.testing.assert_close(R.loss_weight(sigma) * R.c_out(sigma) ** 2, torch.ones_like(sigma))
    assert R.loss_weight(torch.tensor(0.002, dtype=torch.float64)).item() == pytest.approx(2.5e5, rel=1e-4)


def test_kernel_denoise_uses_the_same_coefficients(device):
    # D = c_skip·z + c_out·F, read back with unit inputs in float64.
    sigma = torch.tensor([0.002, 0.3012, 80.0], dtype=torch.float64, device=device)
    ones = torch.ones(3, 1, dtype=torch.float64, device=device)
    zeros = torch.zeros_like(ones)
    torch.testing.assert_close(dx.denoise(zeros, ones, sigma)[:, 0], R.c_skip(sigma), rtol=1e-15, atol=0)
    torch.testing.assert_close(dx.denoise(ones, zeros, sigma)[:, 0], R.c_out(sigma), rtol=1e-15, atol=0)
    _, z_in = dx.add_noise(zeros, sigma, seed=0)
    z, _ = dx.add_noise(zeros, sigma, seed=0)
    torch.testing.assert_close(z_in, z * R.c_in(sigma)[:, None], rtol=1e-14, atol=0)
