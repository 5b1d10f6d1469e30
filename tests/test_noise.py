"""Counter-based randomness: Philox4x32-10 known answers, one noise stream for every
implementation and device, and the distributions it feeds (ε ~ N(0, I), truncated
log-normal σ)."""

import math

import pytest
import torch
from scipy import stats

import diffusionblocks_ext as dx
from diffusionblocks_ext import _philox
from diffusionblocks_ext import reference as R

from conftest import FLOAT_DTYPES, requires_ext


def _as_int64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


@pytest.mark.parametrize("group, offset, seed, expected", [
    (0, 0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (2**64 - 1, 2**64 - 1, 2**64 - 1, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (0x85A308D3243F6A88, 0x0370734413198A2E, 0x299F31D0A4093822,
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_reference_philox_known_answers(group, offset, seed, expected):
    # Random123's published test vectors for philox4x32-10 (counter, key) -> output.
    words = _philox.philox4x32_10(torch.tensor([_as_int64(group)]), offset, seed)
    assert [int(w) for w in words] == expected


def noise(n_rows, n_cols, seed, offset=0, dtype=torch.float32, device="cpu", impl=dx):
    """ε read back through add_noise with y = 0 and σ = 1."""
    y = torch.zeros(n_rows, n_cols, dtype=dtype, device=device)
    z, _ = impl.add_noise(y, torch.ones(n_rows, device=device), seed=seed, offset=offset)
    return z


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_same_noise_as_reference(device, dtype):
    for shape in [(1, 1), (3, 5), (7, 33), (2, 4099)]:
        ours = noise(*shape, seed=1234, offset=7, dtype=dtype, device=device)
        ref = noise(*shape, seed=1234, offset=7, dtype=dtype, device=device, impl=R)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_same_noise_on_every_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cpu = noise(5, 1001, seed=99, offset=3)
    torch.testing.assert_close(noise(5, 1001, seed=99, offset=3, device="cuda").cpu(), cpu, rtol=1e-5, atol=1e-5)
    cpu_ref = noise(5, 1001, seed=99, offset=3, impl=R)
    torch.testing.assert_close(cpu, cpu_ref, rtol=1e-5, atol=1e-5)


def test_seed_and_offset_select_the_stream(device):
    a = noise(4, 256, seed=5, offset=0, device=device)
    assert torch.equal(a, noise(4, 256, seed=5, offset=0, device=device))
    assert not torch.isclose(a, noise(4, 256, seed=5, offset=1, device=device)).any()
    assert not torch.isclose(a, noise(4, 256, seed=6, offset=0, device=device)).any()


def test_noise_does_not_depend_on_thread_count_or_layout():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = noise(3, 70001, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, noise(3, 70001, seed=11))
    # A transposed (non-contiguous) y is noised by logical index, like its contiguous copy.
    y = torch.zeros(64, 3).t()
    z, _ = dx.add_noise(y, torch.ones(3), seed=11)
    z_contig, _ = dx.add_noise(y.contiguous(), torch.ones(3), seed=11)
    assert torch.equal(z, z_contig)


def test_manual_seed_reproduces_unseeded_calls():
    y, sigma = torch.zeros(2, 100), torch.ones(2)
    torch.manual_seed(3)
    first = dx.add_noise(y, sigma)[0]
    torch.manual_seed(3)
    assert torch.equal(first, dx.add_noise(y, sigma)[0])
    assert not torch.equal(first, dx.add_noise(y, sigma)[0])
    g = torch.Generator().manual_seed(3)
    assert torch.equal(dx.add_noise(y, sigma, generator=g)[0],
                       dx.add_noise(y, sigma, generator=torch.Generator().manual_seed(3))[0])


def test_noise_is_standard_normal(device):
    eps = noise(16, 65536, seed=2024, device=device).double().flatten().cpu()
    assert abs(eps.mean().item()) < 4 / math.sqrt(eps.numel())
    assert abs(eps.var().item() - 1) < 6 * math.sqrt(2 / eps.numel())
    assert stats.kstest(eps[:200_000].numpy(), "norm").pvalue > 1e-3
    # Neighbouring elements (same Philox group, and across groups) are uncorrelated.
    for lag in (1, 2, 4):
        r = torch.corrcoef(torch.stack([eps[:-lag], eps[lag:]]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(eps.numel())


def test_noise_scales_with_sigma_per_example(device):
    y = torch.full((3, 50000), 2.0, device=device)
    sigma = torch.tensor([0.01, 1.0, 50.0], device=device)
    z, z_in = dx.add_noise(y, sigma, seed=1)
    spread = (z - y).std(dim=1) / sigma
    torch.testing.assert_close(spread.cpu(), torch.ones(3), rtol=0.02, atol=0)
    torch.testing.assert_close(z_in, z * R.c_in(sigma)[:, None])


def truncated_lognormal_cdf(sigma, lo, hi, p_mean=R.P_MEAN, p_std=R.P_STD):
    phi = lambda s: stats.norm.cdf((math.log(s) - p_mean) / p_std)  # noqa: E731
    return (stats.norm.cdf((torch.log(sigma).numpy() - p_mean) / p_std) - phi(lo)) / (phi(hi) - phi(lo))


@pytest.mark.parametrize("lo, hi", [(0.002, 80.0), (0.002, 0.17963), (0.50504, 80.0), (0.3, 0.31)])
def test_sample_sigma_follows_truncated_lognormal(device, lo, hi):
    sigma = dx.sample_sigma(20000, lo, hi, seed=17, device=device, dtype=torch.float64)
    assert sigma.device.type == device and sigma.shape == (20000,)
    assert bool(((sigma >= lo) & (sigma <= hi)).all())
    result = stats.kstest(sigma.cpu(), lambda s: truncated_lognormal_cdf(torch.as_tensor(s), lo, hi))
    assert result.pvalue > 1e-3


def test_sample_sigma_matches_reference(device):
    for lo, hi in [(0.002, 80.0), (0.67665, 80.0), (0.002, 0.002)]:
        ours = dx.sample_sigma(1000, lo, hi, seed=3, offset=9, device=device, dtype=torch.float64)
        ref = R.sample_sigma(1000, lo, hi, seed=3, offset=9, device=device, dtype=torch.float64)
        torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    assert dx.sample_sigma(0, 0.1, 1.0, seed=0, device=device).shape == (0,)
    assert dx.sample_sigma(5, 0.1, 1.0, seed=0, device=device, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sample_sigma_extreme_tails_keep_full_precision():
    # Range [79, 80]: Φ(ℓ) is within 2e-6 of 1, where a naive Φ⁻¹ loses its digits.
    sigma = dx.sample_sigma(5000, 79.0, 80.0, seed=1, dtype=torch.float64)
    assert bool(((sigma >= 79.0) & (sigma <= 80.0)).all())
    assert sigma.unique().numel() > 4900
    assert stats.kstest(sigma, lambda s: truncated_lognormal_cdf(torch.as_tensor(s), 79.0, 80.0)).pvalue > 1e-3


@requires_ext
def test_sample_sigma_cpu_and_cuda_agree():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cpu = dx.sample_sigma(4096, 0.002, 80.0, seed=8, dtype=torch.float64)
    torch.testing.assert_close(dx.sample_sigma(4096, 0.002, 80.0, seed=8, device="cuda", dtype=torch.float64).cpu(),
                               cpu, rtol=1e-13, atol=0)
