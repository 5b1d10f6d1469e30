"""Property-based tests (hypothesis): random shapes, dtypes (float32/float64/bfloat16/
float16), strides (transposed, strided, expanded, offset), σ ranges and gradient subsets,
drawn from the fuzz space of diffusionblocks.tools.op_cases.fuzz_case, each op checked
forward and backward against the float64 reference within the output dtype's rounding.
With the extension loaded this compares the compiled kernels (public op and dispatcher op)
with the reference; with DBX_DISABLE_EXT=1 it checks the reference in low precision
against itself in float64, and the algebraic identities below hold on either path.

The default profile is small, derandomized and fast (the normal suite); set
DBX_FUZZ_EXAMPLES=N for N examples per test (the CI's long fuzz step)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R
from diffusionblocks.tools import op_cases as oc

EXAMPLES = int(os.environ.get("DBX_FUZZ_EXAMPLES", "0"))
# derandomize: the same examples on every run, so CI is deterministic; no example database
# (it would write .hypothesis/ into the checkout and replay old failures out of order).
FUZZ = settings(max_examples=EXAMPLES or 20, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class HypothesisPick:
    """robustness.fuzz_case's source of choices, drawn (and shrunk) by hypothesis."""

    def __init__(self, data):
        self.data = data

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))


@pytest.mark.parametrize("op", oc.OPS)
@FUZZ
@given(data=st.data())
def test_op_matches_the_float64_reference(op, data):
    case = oc.fuzz_case(op, HypothesisPick(data))
    for path in oc.available_paths():
        outcome = oc.run(case, path)
        assert outcome.kind == "correct", f"{path}: {outcome.kind}: {outcome.detail}"


def _state(data, count, dtype=None):
    """count tensors [N, ...] of one random shape, dtype and layout each, and σ [N]."""
    pick = HypothesisPick(data)
    gen = torch.Generator().manual_seed(pick.integer(0, 2**31 - 1))
    n, trailing = pick.integer(1, 6), tuple(pick.integer(1, 9) for _ in range(pick.integer(0, 2)))
    dtype = dtype or pick.choice(oc.FLOAT_DTYPES)
    xs = [oc.make((n, *trailing), dtype, pick.choice(oc.LAYOUTS), gen) for _ in range(count)]
    return xs, oc.make_sigma(n, gen, *pick.choice(oc.SIGMA_RANGES[:3]))


def _assert_close(actual, expected):
    tolerance = torch.finfo(actual.dtype).eps * 8
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


@FUZZ
@given(data=st.data())
def test_euler_step_to_zero_noise_is_the_denoised_estimate(data):
    (z, F), sigma = _state(data, 2, torch.float64)
    _assert_close(dx.euler_step(z, F, sigma, torch.zeros_like(sigma)), dx.denoise(F, z, sigma))


@FUZZ
@given(data=st.data())
def test_a_step_of_zero_length_returns_its_input(data):
    (z, F, z2, F2), sigma = _state(data, 4, torch.float64)
    for denoised in (False, True):
        _assert_close(dx.euler_step(z, F, sigma, sigma, denoised=denoised), z.contiguous())
        _assert_close(dx.heun_step(z, F, z2, F2, sigma, sigma, denoised=denoised), z.contiguous())


@FUZZ
@given(data=st.data())
def test_edm_loss_is_the_weighted_denoising_loss(data):
    (F, z, y), sigma = _state(data, 3, torch.float64)
    D = dx.denoise(F, z, sigma)
    expected = R.loss_weight(sigma.double()) * R._per_row((D - y).square()).mean(dim=1)
    torch.testing.assert_close(dx.edm_loss(F, z, y, sigma), expected, rtol=1e-9, atol=1e-12)


@FUZZ
@given(data=st.data())
def test_noise_depends_on_seed_and_position_only(data):
    # z − y = σ·ε with ε fixed by (seed, offset, element index): not by y, its dtype or layout.
    (y,), sigma = _state(data, 1)
    seed = HypothesisPick(data).integer(0, 2**64 - 1)
    z, z_in = dx.add_noise(y, sigma, seed=seed, offset=7)
    eps, _ = dx.add_noise(torch.zeros(y.shape, dtype=torch.float64), torch.ones_like(sigma), seed=seed, offset=7)
    expected = y.double() + R.broadcast_rows(sigma, eps) * eps
    tolerance = torch.finfo(y.dtype).eps * 4
    torch.testing.assert_close(z.double(), expected, rtol=tolerance, atol=tolerance * sigma.max().item())
    torch.testing.assert_close(z_in.double(), R.c_in(R.broadcast_rows(sigma, eps)) * z.double(),
                               rtol=tolerance, atol=tolerance)
