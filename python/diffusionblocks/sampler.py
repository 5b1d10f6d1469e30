"""Inference (docs/method.md §5): chain the blocks from pure noise down to σ_min. Each network
evaluation at level σ runs only the block whose interval holds σ; with N = B levels every
block runs exactly once, i.e. one forward pass of the full depth.

One loop, `integrate`, serves every task: classification and the language models
(tasks/vit.py, ar.py, recurrent.py: Euler, N = B, through `denoise_chain`) and generation
(tasks/dit.py, Euler or Heun, N = 50, with classifier-free guidance inside the task's
estimate, see `guided`). Each evaluation enters the block it runs (partition.enter). The updates are the fused ops:
`dx.euler_step` z + (σ' − σ)(z − D)/σ, and `dx.heun_step`, EDM's second-order step
(Algorithm 1), whose second evaluation at (z_euler, σ') runs the block that owns σ'."""

from typing import Callable

import torch

import diffusionblocks_ext as dx

from . import schedule
from .partition import BlockPartition

SAMPLERS = ("euler", "heun")

# estimate(z, z_in, σ [N], layers) -> (D, output): the denoised estimate the step uses
# and what the task wants back from the last level (logits, or D itself).
Estimate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, range], tuple[torch.Tensor, torch.Tensor]]
# denoise(inputs, z, z_in, σ [N], layers) -> (D, output): runs only `layers` on the clean
# inputs x and the noisy target z (z_in = c_in·z); D is the denoised estimate of y and
# output what the task reads out (e.g. logits).
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, range], tuple[torch.Tensor, torch.Tensor]]
# to_estimate(D, output) -> what the Euler step treats as the denoised y (D itself, or e.g.
# the expected label embedding for classification).
ToEstimate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example(value: float, n: int, device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=device)


def _scaled_input(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return dx.c_in(sigma).reshape((-1,) + (1,) * (z.dim() - 1)) * z


@torch.no_grad()
def integrate(estimate: Estimate, partition: BlockPartition, shape: tuple[int, ...], sigmas: list[float],
              generator: torch.Generator, method: str = "euler", device=None) -> tuple[torch.Tensor, list[int]]:
    """From z_0 = σ_0·ε (ε from `generator`, z on `device`) through the descending levels `sigmas`; returns
    the output of the evaluation at the last level and the block of every evaluation made.

    Euler makes N evaluations; Heun 2N − 1: each of the N − 1 steps adds a second
    evaluation at (z_euler, σ_next), and the last level, like EDM's final step to σ = 0,
    is a plain Euler step (its result is D, so it is the last level's output itself)."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {method!r}")
    n = shape[0]
    blocks: list[int] = []

    def evaluate(z, z_in, sigma, level):
        block = int(partition.block_of(torch.tensor([level]))[0])
        blocks.append(block)
        return estimate(z, z_in, sigma, partition.enter(block))

    sigma = _per_example(sigmas[0], n, device)
    z, z_in = dx.add_noise(torch.zeros(shape, device=device), sigma, generator=generator)  # z_0 = σ_0·ε
    output = None
    for i, level in enumerate(sigmas):
        D, output = evaluate(z, z_in, sigma, level)
        if i + 1 == len(sigmas):
            break
        sigma_next = _per_example(sigmas[i + 1], n, device)
        z_next = dx.euler_step(z, D, sigma, sigma_next, denoised=True)
        if method == "heun":
            D_euler, _ = evaluate(z_next, _scaled_input(z_next, sigma_next), sigma_next, sigmas[i + 1])
            z_next = dx.heun_step(z, D, z_next, D_euler, sigma, sigma_next, denoised=True)
        z, sigma = z_next, sigma_next
        z_in = _scaled_input(z, sigma)
    return output, blocks


def expected_embedding(logits: torch.Tensor, embedding: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The estimate a discrete target hands to the next level: softmax(logits)·E over the
    target embedding table E [V, d], with E's rows of unit norm when `normalized` (the
    project's default; False is the raw table, as the authors' ViT code does)."""
    if normalized:
        embedding = torch.nn.functional.normalize(embedding, dim=-1)
    return logits.softmax(dim=-1) @ embedding


def guided(D_cond: torch.Tensor, D_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the denoised estimate: D_u + s·(D_c − D_u). s = 0 is the
    unconditional model, s = 1 the conditional one, s > 1 pushes further towards the class."""
    return D_uncond + scale * (D_cond - D_uncond)


@torch.no_grad()
def denoise_chain(denoise: Denoise, to_estimate: ToEstimate, partition: BlockPartition, inputs: torch.Tensor,
                  target_shape: tuple[int, ...], num_steps: int, generator: torch.Generator,
                  levels: str = "cdf") -> torch.Tensor:
    """The task's output at the last (cleanest) level, after num_steps Euler steps over the
    `levels` schedule ("cdf": docs/method.md §5; "karras": the ρ=7 baseline)."""
    sigmas = schedule.INFERENCE_SCHEDULES[levels](num_steps).tolist()

    def estimate(z, z_in, sigma, layers):
        D, output = denoise(inputs, z, z_in, sigma, layers)
        return to_estimate(D, output), output

    output, _ = integrate(estimate, partition, (len(inputs),) + tuple(target_shape), sigmas, generator,
                          device=inputs.device)
    return output
