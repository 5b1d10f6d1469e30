"""The ops as dispatcher citizens: torch.library.opcheck (schema, fake tensor, autograd
registration) and torch.compile(fullgraph=True) through them without graph breaks."""

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks_ext import reference as R

from conftest import requires_ext, rand, rand_sigma

OPS = torch.ops.diffusionblocks if dx.HAS_EXT else None


def sample_calls(device):
    F, z, y, F2, z2 = (rand(3, 5, dtype=torch.float64, device=device).requires_grad_(True) for _ in range(5))
    sigma, sigma_next = rand_sigma(3, device, dtype=torch.float64), rand_sigma(3, device, high=40.0, dtype=torch.float64)
    logits = rand(3, 4, 6, dtype=torch.float64, device=device).requires_grad_(True)
    target = torch.tensor([[0, 1, 5, -100], [2, 2, 2, 2], [5, 4, 3, 2]], device=device)
    grad = rand(3, dtype=torch.float64, device=device)
    yield "add_noise", (F, sigma, 7, 3, 0.5)
    yield "denoise", (F, z, sigma, 0.5)
    yield "euler_step", (z, F, sigma, sigma_next, 0.5, False)
    yield "euler_step", (z, F, sigma, sigma_next, 0.5, True)
    yield "heun_step", (z, F, z2, F2, sigma, sigma_next, 0.5, False)
    yield "edm_loss", (F, z, y, sigma, 0.5)
    yield "edm_loss_backward", (grad, F.detach(), z.detach(), y.detach(), sigma, 0.5, True, False)
    yield "weighted_cross_entropy", (logits, target, sigma, -100)
    lse = torch.logsumexp(logits.detach(), dim=-1)
    yield "weighted_cross_entropy_backward", (grad, logits.detach(), target, sigma, lse, -100)
    yield "sample_sigma_", (torch.empty(16, dtype=torch.float64, device=device), 0.01, 5.0, 1, 2, -1.2, 1.2)


@requires_ext
def test_opcheck(device):
    if device == "cuda" and not dx.HAS_CUDA_KERNELS:
        pytest.skip("CUDA kernels not compiled")
    for name, args in sample_calls(device):
        torch.library.opcheck(getattr(OPS, name).default, args)


def training_step(y, F_weight, sigma):
    """A miniature block step: noise, a linear 'network', denoise, loss."""
    z, z_in = dx.add_noise(y, sigma, seed=123, offset=0)
    F = z_in @ F_weight
    D = dx.denoise(F, z, sigma)
    loss = dx.edm_loss(F, z, y, sigma).mean() + dx.weighted_cross_entropy(D, torch.zeros(
        D.shape[0], dtype=torch.int64, device=D.device), sigma).mean()
    return loss, dx.euler_step(z, F, sigma, sigma / 2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    y = rand(8, 16, device=device)
    sigma = rand_sigma(8, device)
    weight_eager = torch.randn(16, 16, device=device, requires_grad=True)
    weight_compiled = weight_eager.detach().clone().requires_grad_(True)
    loss, step = training_step(y, weight_eager, sigma)
    loss.backward()
    compiled = torch.compile(training_step, fullgraph=True, backend=backend)
    loss_c, step_c = compiled(y, weight_compiled, sigma)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_c, step, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_compiled.grad, weight_eager.grad, rtol=1e-4, atol=1e-5)


def test_compile_does_not_recompile_for_new_sigma_values(device):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda F, z, s: dx.denoise(F, z, s), backend=counter, fullgraph=True)
    F, z = rand(4, 8, device=device), rand(4, 8, device=device)
    for _ in range(3):
        fn(F, z, rand_sigma(4, device))
    assert counter.frame_count == 1


def test_backend_reports_the_serving_implementation(device):
    t = torch.zeros(1, device=device)
    expected = "reference"
    if dx.HAS_EXT and device == "cpu":
        expected = "ext-cpu"
    elif dx.HAS_CUDA_KERNELS and device == "cuda":
        expected = "ext-cuda"
    assert dx.backend(t) == expected
    assert R.acc_dtype(torch.bfloat16) == torch.float32
