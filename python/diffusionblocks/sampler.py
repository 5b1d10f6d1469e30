"""Inference (SPEC §5): chain the blocks by Euler steps from pure noise down to σ_min.
Each noise level runs only the block whose interval holds it; with N = B levels every
block runs exactly once, i.e. one forward pass of the full depth."""

import torch

import diffusionblocks_ext as dx

from . import schedule
from .partition import BlockPartition
from .task import DenoisingTask


def _per_example(value: float, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32)


@torch.no_grad()
def denoise_chain(task: DenoisingTask, partition: BlockPartition, inputs: torch.Tensor,
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
