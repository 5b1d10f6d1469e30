"""Every op against the reference: values across dtypes, odd sizes and layouts, gradients
(forward and fused backward), gradcheck in float64. Run with the compiled extension these
compare C++/CUDA kernels with the pure-PyTorch oracle; with DBX_DISABLE_EXT=1 the same
tests exercise the fallback path."""

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R

from conftest import FLOAT_DTYPES, TOLERANCE, rand, rand_sigma

# (leading N, trailing shape): N = 1, widths that are not a multiple of any vector width,
# a single trailing element, 3-d and 4-d inputs.
SHAPES = [(1, (1,)), (1, (4099,)), (5, (37,)), (8, (3, 11)), (2, (3, 8, 8)), (33, (1,)), (3, ())]


def layouts(x):
    """The same values as x in other memory layouts: contiguous, transposed copy, expanded."""
    yield x
    if x.dim() >= 2 and x.shape[-1] > 1:
        yield x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if x.shape[0] > 0:
        yield x[:1].expand_as(x) if x.shape[0] > 1 else x


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def inputs(count, n, trailing, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [rand(n, *trailing, dtype=dtype, device=device, generator=g) for _ in range(count)]
    sigma_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return xs, rand_sigma(n, device, g, dtype=sigma_dtype), rand_sigma(n, device, g, high=40.0, dtype=sigma_dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, trailing", SHAPES)
def test_denoise_and_steps_match_reference(device, dtype, n, trailing):
    (F, z, F2, z2), sigma, sigma_next = inputs(4, n, trailing, dtype, device, seed=n)
    for layout in layouts(F):
        assert_close(dx.denoise(layout, z, sigma), R.denoise(layout, z, sigma), dtype)
    for denoised in (False, True):
        assert_close(dx.euler_step(z, F, sigma, sigma_next, denoised=denoised),
                     R.euler_step(z, F, sigma, sigma_next, denoised=denoised), dtype)
        assert_close(dx.heun_step(z, F, z2, F2, sigma, sigma_next, denoised=denoised),
                     R.heun_step(z, F, z2, F2, sigma, sigma_next, denoised=denoised), dtype)


def test_euler_step_is_the_paper_update_with_the_corrected_sign(device):
    (F, z), sigma, sigma_next = inputs(2, 6, (10,), torch.float64, device, seed=0)
    D = R.c_skip(sigma)[:, None] * z + R.c_out(sigma)[:, None] * F
    expected = z + (sigma_next - sigma)[:, None] * (z - D) / sigma[:, None]
    torch.testing.assert_close(dx.euler_step(z, F, sigma, sigma_next), expected)
    torch.testing.assert_close(dx.euler_step(z, D, sigma, sigma_next, denoised=True), expected)
    # Stepping to σ_next = 0 lands exactly on the denoised estimate.
    torch.testing.assert_close(dx.euler_step(z, F, sigma, torch.zeros_like(sigma)), D)


def test_heun_beats_euler_on_a_linear_denoiser(device):
    # For y ~ N(0, σ_d²) the ideal denoiser is D(z; σ) = σ_d²/(σ² + σ_d²)·z and the
    # probability-flow ODE has the solution z(σ) = z0·sqrt(σ² + σ_d²)/sqrt(σ0² + σ_d²).
    sd = R.SIGMA_DATA
    z0 = rand(4, 16, dtype=torch.float64, device=device)
    sigmas = torch.logspace(1, -1, 17, dtype=torch.float64)  # geometric, as EDM spaces them
    z_euler, z_heun = z0.clone(), z0.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig, sig_next = torch.full((4,), s.item(), dtype=torch.float64, device=device), \
            torch.full((4,), s_next.item(), dtype=torch.float64, device=device)
        ideal = lambda z, s_: sd**2 / (s_**2 + sd**2) * z  # noqa: E731
        z_euler = dx.euler_step(z_euler, ideal(z_euler, s), sig, sig_next, denoised=True)
        predictor = dx.euler_step(z_heun, ideal(z_heun, s), sig, sig_next, denoised=True)
        z_heun = dx.heun_step(z_heun, ideal(z_heun, s), predictor, ideal(predictor, s_next), sig, sig_next,
                              denoised=True)
    exact = z0 * (torch.sqrt(sigmas[-1] ** 2 + sd**2) / torch.sqrt(sigmas[0] ** 2 + sd**2)).item()
    error_euler, error_heun = (z_euler - exact).abs().max(), (z_heun - exact).abs().max()
    assert error_heun < error_euler / 4


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, trailing", SHAPES)
def test_add_noise_matches_reference(device, dtype, n, trailing):
    (y,), sigma, _ = inputs(1, n, trailing, dtype, device, seed=n)
    for layout in layouts(y):
        ours = dx.add_noise(layout, sigma, seed=42, offset=n)
        ref = R.add_noise(layout, sigma, seed=42, offset=n)
        for a, b in zip(ours, ref):
            assert a.dtype == dtype and a.shape == y.shape
            # ε is float32 for every dtype, and libm/Sleef/CUDA round log, sin, cos
            # differently in the last ulp: float64 outputs match to float32 precision.
            assert_close(a, b, torch.float32 if dtype == torch.float64 else dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, trailing", SHAPES)
def test_edm_loss_matches_reference(device, dtype, n, trailing):
    (F, z, y), sigma, _ = inputs(3, n, trailing, dtype, device, seed=n)
    loss = dx.edm_loss(F, z, y, sigma)
    assert loss.shape == (n,) and loss.dtype == R.acc_dtype(dtype)
    # Inputs are exactly representable in dtype, so the fp32 accumulation matches tightly.
    torch.testing.assert_close(loss, R.edm_loss(F, z, y, sigma), rtol=1e-5 if dtype != torch.float64 else 1e-12,
                               atol=1e-6)
    for layout in layouts(F):
        torch.testing.assert_close(dx.edm_loss(layout, z, y, sigma), R.edm_loss(layout, z, y, sigma),
                                   rtol=1e-5, atol=1e-6)


def test_edm_loss_equals_weighted_denoising_loss(device):
    (F, z, y), sigma, _ = inputs(3, 7, (30,), torch.float64, device, seed=1)
    D = dx.denoise(F, z, sigma)
    expected = R.loss_weight(sigma) * ((D - y) ** 2).mean(dim=1)
    torch.testing.assert_close(dx.edm_loss(F, z, y, sigma), expected, rtol=1e-9, atol=0)


def test_edm_loss_stays_finite_in_half_precision_at_the_smallest_sigma(device):
    # λ(0.002) = 2.5e5 would overflow float16 in the D-space form; the F-space form does not.
    F = torch.randn(4, 64, device=device).half()
    y = torch.randn(4, 64, device=device).half()
    sigma = torch.full((4,), 0.002, device=device)
    z, _ = dx.add_noise(y, sigma, seed=0)
    assert torch.isfinite(dx.edm_loss(F, z, y, sigma)).all()


def _grads(fn, tensors, upstream):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    outputs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outputs, upstream)
    return [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_edm_loss_backward_matches_reference(device, dtype):
    (F, z, y), sigma, _ = inputs(3, 6, (129,), dtype, device, seed=3)
    upstream = rand(6, dtype=R.acc_dtype(dtype), device=device)
    for needs in [(True, True, True), (True, False, False), (False, True, False), (True, False, True)]:
        def ours(F_, z_, y_):
            return dx.edm_loss(F_ if needs[0] else F_.detach(), z_ if needs[1] else z_.detach(),
                               y_ if needs[2] else y_.detach(), sigma)

        def ref(F_, z_, y_):
            return R.edm_loss(F_ if needs[0] else F_.detach(), z_ if needs[1] else z_.detach(),
                              y_ if needs[2] else y_.detach(), sigma)
        for g_ours, g_ref, needed in zip(_grads(ours, [F, z, y], upstream), _grads(ref, [F, z, y], upstream), needs):
            if needed:
                assert g_ours.dtype == dtype
                assert_close(g_ours, g_ref, dtype)
            else:
                assert g_ours is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_op_gradients_match_reference(device, dtype):
    (F, z, F2, z2, y), sigma, sigma_next = inputs(5, 4, (3, 5), dtype, device, seed=4)
    up = rand(4, 3, 5, dtype=dtype, device=device)
    cases = [
        (lambda a, b: dx.denoise(a, b, sigma), lambda a, b: R.denoise(a, b, sigma), [F, z], up),
        (lambda a, b: dx.euler_step(a, b, sigma, sigma_next), lambda a, b: R.euler_step(a, b, sigma, sigma_next),
         [z, F], up),
        (lambda a, b, c, d: dx.heun_step(a, b, c, d, sigma, sigma_next),
         lambda a, b, c, d: R.heun_step(a, b, c, d, sigma, sigma_next), [z, F, z2, F2], up),
        (lambda a: dx.add_noise(a, sigma, seed=1), lambda a: R.add_noise(a, sigma, seed=1), [y], (up, 2 * up)),
    ]
    for ours, ref, tensors, upstream in cases:
        for g_ours, g_ref in zip(_grads(ours, tensors, upstream), _grads(ref, tensors, upstream)):
            assert g_ours.dtype == dtype
            assert_close(g_ours, g_ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# C <= 64, 64 < C <= 256 and 256 < C <= 1024 (each with and without whole 16-byte packs
# per row), and longer rows: every CUDA kernel variant.
@pytest.mark.parametrize("shape", [(1, 1), (4, 10), (3, 1001), (2, 5, 7), (3, 17, 130), (4, 3, 256), (2, 520),
                                   (2, 1500)])
def test_weighted_cross_entropy_matches_reference(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = rand(*shape, dtype=dtype, device=device, generator=g, low=-8, high=8)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    if len(shape) == 3:
        target[0, 0] = -100  # ignored position
    weight = rand(shape[0], dtype=torch.float32, device=device, generator=g, low=0.1, high=3.0)
    loss = dx.weighted_cross_entropy(logits, target, weight)
    assert loss.shape == (shape[0],) and loss.dtype == R.acc_dtype(dtype)
    torch.testing.assert_close(loss, R.weighted_cross_entropy(logits, target, weight), rtol=1e-5, atol=1e-5)
    upstream = rand(shape[0], dtype=R.acc_dtype(dtype), device=device, generator=g)
    (g_ours,) = _grads(lambda x: dx.weighted_cross_entropy(x, target, weight), [logits], upstream)
    (g_ref,) = _grads(lambda x: R.weighted_cross_entropy(x, target, weight), [logits], upstream)
    assert g_ours.dtype == dtype
    assert_close(g_ours, g_ref, dtype)


def test_weighted_cross_entropy_counts_ignored_positions_in_the_mean(device):
    logits = rand(2, 4, 6, dtype=torch.float64, device=device)
    target = torch.tensor([[1, -100, 2, -100], [0, 1, 2, 3]], device=device)
    weight = torch.tensor([2.0, 0.5], dtype=torch.float64, device=device)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 6), target.reshape(-1), reduction="none",
                                           ignore_index=-100).reshape(2, 4)
    torch.testing.assert_close(dx.weighted_cross_entropy(logits, target, weight), weight * ce.sum(1) / 4)


def test_empty_batches(device):
    empty = torch.empty(0, 5, device=device)
    sigma = torch.empty(0, device=device)
    assert dx.denoise(empty, empty, sigma).shape == (0, 5)
    assert dx.euler_step(empty, empty, sigma, sigma).shape == (0, 5)
    assert all(t.shape == (0, 5) for t in dx.add_noise(empty, sigma, seed=0))
    assert dx.edm_loss(empty, empty, empty, sigma).shape == (0,)
    assert dx.weighted_cross_entropy(empty, torch.empty(0, dtype=torch.int64, device=device), sigma).shape == (0,)


def test_gradcheck_float64(device):
    (F, z, y, F2, z2), sigma, sigma_next = inputs(5, 3, (4,), torch.float64, device, seed=5)
    F, z, y, F2, z2 = (t.requires_grad_(True) for t in (F, z, y, F2, z2))
    check = lambda fn, *args: torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)  # noqa: E731
    assert check(lambda a, b: dx.denoise(a, b, sigma), F, z)
    assert check(lambda a, b: dx.euler_step(a, b, sigma, sigma_next), z, F)
    assert check(lambda a, b: dx.euler_step(a, b, sigma, sigma_next, denoised=True), z, F)
    assert check(lambda a, b, c, d: dx.heun_step(a, b, c, d, sigma, sigma_next), z, F, z2, F2)
    assert check(lambda a: dx.add_noise(a, sigma, seed=3), y)
    assert check(lambda a, b, c: dx.edm_loss(a, b, c, sigma), F, z, y)
    logits = rand(3, 2, 5, dtype=torch.float64, device=device).requires_grad_(True)
    target = torch.tensor([[0, 4], [2, -100], [1, 1]], device=device)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    assert check(lambda a: dx.weighted_cross_entropy(a, target, weight), logits)
