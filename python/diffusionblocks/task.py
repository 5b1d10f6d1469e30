"""The interface through which a task plugs into the trainer and the sampler (DESIGN.md):
how to make the clean target y, how a block reads out a denoised prediction, which loss.
The trainer owns everything else (σ draws, noise, block choice, optimizer)."""

from typing import Protocol

import torch
from torch import nn


class DenoisingTask(Protocol):
    model: nn.Module          # residual layers in model.layers, plus shared modules
    num_layers: int

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """Clean target y [N, ...] the blocks learn to denoise (may carry gradients)."""

    def denoise(self, inputs: torch.Tensor, z: torch.Tensor, z_in: torch.Tensor, sigma: torch.Tensor,
                layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Run only `layers` on (clean inputs x, noisy target z with z_in = c_in·z, σ [N]);
        returns (D, output): the denoised estimate of y and the task's output (e.g. logits)."""

    def denoising_loss(self, output: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-example λ(σ)-weighted loss [N] of a block's output."""

    def sampler_estimate(self, D: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What the Euler step treats as the denoised y at inference (D itself, or e.g. the
        expected label embedding for classification)."""

    def end_to_end(self, inputs: torch.Tensor) -> torch.Tensor:
        """The baseline: every layer on the clean inputs, without σ; returns the output."""

    def end_to_end_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss [N] of the end-to-end baseline."""

    def metrics(self, output: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Evaluation metrics of a final output (e.g. accuracy)."""
