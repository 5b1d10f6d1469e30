"""BlockPartition: which layers and which range of noise levels belong to block b
(docs/method.md §1, §3).

Layers are cut into B contiguous blocks. Block 0 holds the first layers and the noisiest
range: a forward pass goes from noise to data. The noise levels live on an axis: σ for
the continuous tasks (SigmaAxis: equi-probability or log-uniform intervals, widened by
the overlap γ), or the masking time t of masked diffusion (MaskingAxis: equal widths in
α = 1 − t). Every task asks the partition the same questions: a block's training range,
and which block owns a level.

Running a block is explicit: `enter(b)` brings b's state in (offload, per-block shared
copies: the listeners) and returns its layers; `layers(b)` only reads the range."""

from typing import Callable

import torch

from . import schedule


class PartitionError(ValueError):
    """A partition that cannot be built; the message names the config field."""


def equal_split(num_layers: int, num_blocks: int) -> tuple[int, ...]:
    if num_blocks < 1:
        raise PartitionError(f"blocks: expected at least 1 block, got {num_blocks}")
    if num_blocks > num_layers:
        raise PartitionError(f"blocks: B={num_blocks} exceeds the number of layers L={num_layers}")
    if num_layers % num_blocks:
        raise PartitionError(f"split: L={num_layers} layers do not divide into B={num_blocks} equal "
                             f"blocks; give an explicit split, e.g. --set split=" +
                             ",".join(str(n) for n in _near_equal(num_layers, num_blocks)))
    return (num_layers // num_blocks,) * num_blocks


def _near_equal(num_layers: int, num_blocks: int) -> list[int]:
    base, extra = divmod(num_layers, num_blocks)
    return [base + (1 if b < extra else 0) for b in range(num_blocks)]


def check_split(split, num_layers: int, num_blocks: int) -> tuple[int, ...]:
    split = tuple(split)
    if len(split) != num_blocks:
        raise PartitionError(f"split: expected {num_blocks} layer counts (one per block), got {len(split)}")
    if any(n < 1 for n in split):
        raise PartitionError(f"split: every block needs at least one layer, got {list(split)}")
    if sum(split) != num_layers:
        raise PartitionError(f"split: layer counts {list(split)} sum to {sum(split)}, not L={num_layers}")
    return split


class SigmaAxis:
    """σ in [σ_min, σ_max] cut into B intervals; layer-block k covers ascending interval
    B−1−k. Intervals are half-open (schedule.interval_index says which way)."""

    def __init__(self, num_blocks: int, partition: str = "equi", gamma: float = 0.0):
        if gamma < 0:
            raise PartitionError(f"gamma: expected an overlap >= 0, got {gamma:g}")
        if partition not in schedule.PARTITIONS:
            raise PartitionError(f"partition: expected one of {sorted(schedule.PARTITIONS)}, got {partition!r}")
        self.num_blocks, self.gamma = num_blocks, gamma
        self.boundaries = schedule.PARTITIONS[partition](num_blocks)  # ascending, float64

    def level_range(self, block: int) -> tuple[float, float]:
        """Block's own interval (ascending σ_lo < σ_hi), without overlap."""
        k = self.num_blocks - 1 - block
        return float(self.boundaries[k]), float(self.boundaries[k + 1])

    def training_range(self, block: int) -> tuple[float, float]:
        """The interval widened by γ: where block's training σ's are drawn."""
        return schedule.widen(*self.level_range(block), self.gamma)

    def block_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The block whose (half-open, non-widened) interval holds each σ."""
        return self.num_blocks - 1 - schedule.interval_index(sigma, self.boundaries)


class MaskingAxis:
    """Masked diffusion's time t in [0, 1] (t = 1: all masked), cut into B ranges of equal
    width in α = 1 − t; block 0 takes the most-masked range. Boundaries are 1 − b/B in
    float64, the expression the sampler's grid uses, so a grid point on a boundary is
    recognised exactly. Block b holds (1 − (b+1)/B, 1 − b/B], the last block also t = 0: a
    t on a boundary belongs to the less masked block, so a sampler walking t down a grid
    of B steps runs every block exactly once."""

    def __init__(self, num_blocks: int, gamma: float = 0.0):
        if gamma < 0:
            raise PartitionError(f"gamma: expected an overlap >= 0, got {gamma:g}")
        self.num_blocks, self.gamma = num_blocks, gamma
        self.boundaries = [1 - b / num_blocks for b in range(num_blocks + 1)]  # descending: 1 ... 0

    def level_range(self, block: int) -> tuple[float, float]:
        """(lo, hi) of block's own range, without overlap."""
        return self.boundaries[block + 1], self.boundaries[block]

    def training_range(self, block: int) -> tuple[float, float]:
        """The range widened by γ·width on each side (the α-axis analogue of the overlap in
        ln σ), clamped to [0, 1]."""
        lo, hi = self.level_range(block)
        pad = self.gamma * (hi - lo)
        return max(lo - pad, 0.0), min(hi + pad, 1.0)

    def block_of(self, t: torch.Tensor) -> torch.Tensor:
        """Block whose half-open range holds each t [N] (t >= 1 -> block 0, t <= 0 -> the last)."""
        interior = torch.tensor(self.boundaries[1:-1], dtype=torch.float64, device=t.device)
        return (t.to(torch.float64)[:, None] <= interior[None, :]).sum(dim=1)


class BlockPartition:
    """The B blocks of a run: block b's contiguous layers (`layers(b)`, `enter(b)`), its
    range of noise levels on the task's axis (`level_range(b)`, widened by γ:
    `training_range(b)`) and the block that owns a level (`block_of`). Built by
    `TrainConfig.partition_plan()`; tasks receive it as `plan`."""

    def __init__(self, num_layers: int, num_blocks: int, partition: str = "equi", gamma: float = 0.0,
                 split=None, axis: str = "sigma"):
        if axis == "sigma":
            self.axis = SigmaAxis(num_blocks, partition, gamma)
        elif axis == "t" and partition == "equi":
            self.axis = MaskingAxis(num_blocks, gamma)
        elif axis == "t":
            raise PartitionError(f"partition: the masking-time axis is cut equally in α (partition=equi), "
                                 f"got {partition!r}")
        else:
            raise PartitionError(f"axis: expected 'sigma' or 't', got {axis!r}")
        if num_blocks > num_layers:
            raise PartitionError(f"blocks: B={num_blocks} exceeds the number of layers L={num_layers}")
        self.num_layers, self.num_blocks = num_layers, num_blocks
        self.split = equal_split(num_layers, num_blocks) if split is None else \
            check_split(split, num_layers, num_blocks)
        starts = [sum(self.split[:b]) for b in range(num_blocks)]
        self._layers = [range(s, s + n) for s, n in zip(starts, self.split)]
        # Called with the block about to run: offload brings its weights in, per-block
        # shared copies point the shared modules at its copy.
        self.listeners: list[Callable[[int], None]] = []

    def enter(self, block: int) -> range:
        """`block` is about to run (training or inference): the listeners bring its state in.
        Returns its layers."""
        for listener in self.listeners:
            listener(block)
        return self._layers[block]

    def layers(self, block: int) -> range:
        """The layers of `block` (reads the range; enters nothing)."""
        return self._layers[block]

    def level_range(self, block: int) -> tuple[float, float]:
        """Block's own range of noise levels (ascending), without overlap."""
        return self.axis.level_range(block)

    def training_range(self, block: int) -> tuple[float, float]:
        """The range widened by γ: where block's training levels are drawn."""
        return self.axis.training_range(block)

    def block_of(self, levels: torch.Tensor) -> torch.Tensor:
        """The block whose (half-open, non-widened) range holds each level."""
        return self.axis.block_of(levels)
