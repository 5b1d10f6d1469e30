"""Inference (SPEC §5): chain the blocks by Euler steps from pure noise down to σ_min.
Each noise level runs only the block whose interval holds it; with N = B levels every
block runs exactly once, i.e. one forward pass of the full depth."""

from typing import Protocol

import torch

import diffusionblocks_ext as dx

from . import schedule
from .partition import BlockPartition


class Denoiser(Protocol):
    """What the chain needs from a task (vit.py is an example)."""

    def denoise(self, inputs: torch.Tensor, z: torch.Tensor, z_in: torch.Tensor, sigma: torch.Tensor,
                layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs only `layers` on (clean inputs x, noisy target z with z_in = c_in·z, σ [N]);
        returns (D, output): the denoised estimate of y and the task's output (e.g. logits)."""

    def sampler_estimate(self, D: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What the Euler step treats as the denoised y (D itself, or e.g. the expected
        label embedding for classification)."""


def _per_example(value: float, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32)


@torch.no_grad()
def denoise_chain(task: Denoiser, partition: BlockPartition, inputs: torch.Tensor,
                  target_shape: tuple[int, ...], num_steps: int, generator: torch.Generator,
                  levels: str = "cdf") -> torch.Tensor:
    """The task's output at the last (cleanest) level, after num_steps Euler steps over the
    `levels` schedule ("cdf": SPEC §5; "karras": the ρ=7 baseline)."""
    sigmas = schedule.INFERENCE_SCHEDULES[levels](num_steps).tolist()
    n = len(inputs)
    sigma = _per_example(sigmas[0], n)
    z, z_in = dx.add_noise(torch.zeros((n,) + tuple(target_shape)), sigma, generator=generator)  # z_0 = σ_0·ε
    output = None
    for i, level in enumerate(sigmas):
        block = int(partition.block_of(torch.tensor([level]))[0])
        D, output = task.denoise(inputs, z, z_in, sigma, partition.layers(block))
        if i + 1 == len(sigmas):
            break
        sigma_next = _per_example(sigmas[i + 1], n)
        z = dx.euler_step(z, task.sampler_estimate(D, output), sigma, sigma_next, denoised=True)
        sigma = sigma_next
        z_in = dx.c_in(sigma).reshape((-1,) + (1,) * (z.dim() - 1)) * z
    return output
