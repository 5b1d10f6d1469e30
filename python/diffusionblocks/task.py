"""The interface through which a task plugs into the trainer (docs/trainer.md): its data, the
loss of one block on one batch, the end-to-end baseline's loss, and its evaluation.
The trainer owns everything else: which block trains, the optimizer and its schedule,
gradient clipping, memory and compute counters, checkpoints, logs and the report.

A task class also names its options dataclass (`Config`: model shape and task knobs,
the `model.*` fields of a run's config, with a `check(config)` that raises ConfigError),
its presets (`presets`: name -> function returning TrainConfig fields), and is
registered in tasks/__init__.py.

Blocks are entered explicitly (partition.py): the trainer enters the block before it calls
block_loss, which then reads its layers with `plan.layers(block)`; code that runs a block
on its own (evaluation, sampling) calls `plan.enter(block)`, as the sampler does."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .partition import BlockPartition


def shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Everything outside the residual layers (`model.layers`, if any): embeddings,
    σ-embedder, head."""
    layers = getattr(model, "layers", None)
    in_layers = {id(p) for p in layers.parameters()} if isinstance(layers, nn.Module) else set()
    return [(name, p) for name, p in model.named_parameters() if id(p) not in in_layers]


def device_of(model: nn.Module) -> torch.device:
    """Where the model computes (the trainer's `device`): every tensor a task makes for the
    model goes there. Read off the shared modules, which never leave it (offload=cpu keeps
    inactive layers on the host). Random draws stay on CPU generators and move after, so a
    run draws the same batches, σ's and masks on any device."""
    return next((p.device for _, p in shared_parameters(model)), torch.device("cpu"))


def to_device(batch, device: torch.device):
    """A batch (a tensor, or a tuple or list of them) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(item, device) for item in batch)


@dataclass
class SampleRequest:
    """What `diffusionblocks sample` asks of a generative task; None = the task's default."""
    steps: int | None = None        # N noise levels (or unmasking steps)
    sampler: str = "euler"          # "euler" or "heun" where the task has both
    cfg: float | None = None        # classifier-free guidance scale
    label: int | None = None        # one class to sample (None: every class, one row each)
    count: int | None = None        # samples per class / sequences
    prompt: str | None = None       # text tasks: the prompt to continue
    tokens: int | None = None       # text tasks: how many tokens to generate
    decoding: str | None = None     # autoregressive text tasks: "greedy", "ancestral" or "top-p"
    seed: int = 0
    out: Path | None = None         # where the task writes its samples (PNG, text); None: in run_dir
    run_dir: Path | None = None     # the run being sampled


class Task(Protocol):
    """What the trainer calls; the five built-in tasks in tasks/ implement it."""

    model: nn.Module  # residual layers in model.layers (what the partition cuts), plus shared modules
    level_name: str   # the partition's axis of noise levels: "sigma", or "t" for masking

    def train_batch(self, step: int, batch_size: int, seed: int, generator: torch.Generator) -> Any:
        """Batch `step` of the run: a pure function of (seed, step) and draws from `generator`,
        on the CPU (the trainer moves it to the model's device)."""

    def block_loss(self, batch, block: int, plan: BlockPartition,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs only `block`'s layers on noise levels drawn from its range; returns the
        per-example weighted loss [N] and the levels drawn [N]."""

    def end_to_end_loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        """The baseline: every layer, the task's ordinary objective; per-example loss [N]."""

    def no_weight_decay(self) -> set[str]:
        """Names of matrix-shaped parameters that AdamW must not decay (e.g. positions)."""

    def evaluate(self, plan: BlockPartition, mode: str) -> dict[str, float]:
        """Test metrics of the model as it is, named test_*."""

    def finish(self, plan: BlockPartition, mode: str, out_dir: Path) -> dict[str, Any]:
        """At the end of a run, after evaluate(): further metrics for the report, and any
        files the task writes into out_dir (samples, grids)."""

    # Generative tasks only (`diffusionblocks sample DIR`):
    # def sample(self, plan: BlockPartition, mode: str, request: SampleRequest) -> dict[str, Any]:
    #     """Writes the samples to request.out (a default name in the run directory if None)
    #     and returns a JSON-able summary (files written, layer evaluations, seconds)."""
