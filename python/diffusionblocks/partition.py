"""BlockPartition: which layers and which noise range belong to block b (SPEC §1, §3).

Layers are cut into B contiguous blocks. Block 0 holds the first layers and the noisiest
σ interval: a forward pass goes from noise to data, so layer-block k covers ascending
σ-interval B−1−k."""

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


class BlockPartition:
    def __init__(self, num_layers: int, num_blocks: int, partition: str = "equi", gamma: float = 0.0,
                 split=None):
        if gamma < 0:
            raise PartitionError(f"gamma: expected an overlap >= 0, got {gamma:g}")
        if partition not in schedule.PARTITIONS:
            raise PartitionError(f"partition: expected one of {sorted(schedule.PARTITIONS)}, got {partition!r}")
        if num_blocks > num_layers:
            raise PartitionError(f"blocks: B={num_blocks} exceeds the number of layers L={num_layers}")
        self.num_layers, self.num_blocks, self.gamma = num_layers, num_blocks, gamma
        self.split = equal_split(num_layers, num_blocks) if split is None else \
            check_split(split, num_layers, num_blocks)
        starts = [sum(self.split[:b]) for b in range(num_blocks)]
        self._layers = [range(s, s + n) for s, n in zip(starts, self.split)]
        self.boundaries = schedule.PARTITIONS[partition](num_blocks)  # ascending, float64
        self.listeners = []  # called with the block about to run (offload, per-block shared copies)

    def enter(self, block: int) -> None:
        """`block` is about to run: listeners bring its state in (its weights from disk,
        its copy of the shared modules). The trainer calls this before a block's training
        step, since a task may touch shared modules before it asks for the layers."""
        for listener in self.listeners:
            listener(block)

    def layers(self, block: int) -> range:
        """The layers of `block`, about to run (samplers ask here first, so this enters it)."""
        self.enter(block)
        return self._layers[block]

    def layer_range(self, block: int) -> range:
        """The layers of `block`, for bookkeeping (tells no listener)."""
        return self._layers[block]

    def sigma_range(self, block: int) -> tuple[float, float]:
        """Block's own interval (ascending σ_lo < σ_hi), without overlap."""
        k = self.num_blocks - 1 - block
        return float(self.boundaries[k]), float(self.boundaries[k + 1])

    def training_range(self, block: int) -> tuple[float, float]:
        """The interval widened by γ: where block's training σ's are drawn."""
        return schedule.widen(*self.sigma_range(block), self.gamma)

    def block_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The block whose (half-open, non-widened) interval holds each σ."""
        return self.num_blocks - 1 - schedule.interval_index(sigma, self.boundaries)
