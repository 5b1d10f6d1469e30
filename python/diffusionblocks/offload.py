"""Memory ÷ B for real (issue 6): while a block is not training, its parameters and its
AdamW state leave memory.

On the CPU they live in one memory-mapped file per block (`--offload disk`), created in
the run directory and unlinked at once, so the disk space is freed when the process ends. Every
parameter and state tensor of the block is a view of that mapping, so it keeps its shape
and address for the whole run and any access still reads the right values; evicting a
block only tells the kernel to drop its pages from this process (madvise DONTNEED: a
shared file mapping keeps the data in the file and the page cache, and pages come back on
the next touch). Correctness therefore never depends on when a block is evicted, only the
resident memory does, and results are bit-identical to training without offload.

`--offload cpu` (weights from a GPU to host memory) needs training on a GPU, which this
trainer does not do yet; the config refuses it with a message."""

import contextlib
import mmap
import os
from pathlib import Path

import torch

ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels
STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments (its `step` is a scalar)


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class _BlockFile:
    """One block's parameters and moments, laid out in one memory-mapped file."""

    def __init__(self, path: Path, params: list[torch.nn.Parameter]):
        self.params = params
        size = max(ALIGN, sum(_aligned(p.nbytes) for p in params) * (1 + len(STATE_KEYS)))
        path.unlink(missing_ok=True)  # a new inode: a mapping of an older file stays valid
        with open(path, "wb") as file:
            file.truncate(size)
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            path.unlink()  # the mapping keeps the file alive; the system frees it when the process ends
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.offset = 0
        for p in params:
            p.data = self._place(p.data)
        self.state_slots = {(id(p), key): self._slot(p) for p in params for key in STATE_KEYS}

    def _slot(self, like: torch.Tensor) -> torch.Tensor:
        view = self.bytes[self.offset:self.offset + like.nbytes].view(like.dtype).view(like.shape)
        self.offset += _aligned(like.nbytes)
        return view

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        view = self._slot(tensor)
        view.copy_(tensor)
        return view

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Move state the optimizer created (or loaded) in ordinary memory into the file.
        AdamW updates its moments in place, so once moved they stay there."""
        for p in self.params:
            state = optimizer.state.get(p, {})
            for key in STATE_KEYS:
                slot = self.state_slots[(id(p), key)]
                if key in state and state[key].data_ptr() != slot.data_ptr():
                    slot.copy_(state[key])
                    state[key] = slot

    def evict(self) -> None:
        self.map.madvise(mmap.MADV_DONTNEED)


class DiskOffload:
    """The blocks of a partition, each in its own file under `folder`; one is active."""

    def __init__(self, model: torch.nn.Module, plan, optimizers: dict, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.optimizers = optimizers
        self.files = []
        for block in range(plan.num_blocks):
            params = [p for i in plan.layer_range(block) for p in model.layers[i].parameters()]
            self.files.append(_BlockFile(folder / f"block{block}.bin", params))
        with contextlib.suppress(OSError):
            folder.rmdir()  # empty: the files live on, unnamed, while mapped
        self.active = None
        self.adopt_all()
        plan.listeners.append(self.activate)  # training and inference alike
    def activate(self, block: int) -> None:
        if block != self.active:
            self.release()
            self.active = block

    def after_step(self, block: int) -> None:
        """The first step of a block creates its AdamW moments: move them into its file."""
        self.files[block].adopt(self.optimizers[f"block{block}"])

    def adopt_all(self) -> None:
        """After a resume loaded optimizer state into ordinary memory."""
        for block, file in enumerate(self.files):
            file.adopt(self.optimizers[f"block{block}"])
        self.release()

    def release(self) -> None:
        """Drop every block except the active one from memory (e.g. after a checkpoint read them all)."""
        for block, file in enumerate(self.files):
            if block != self.active:
                file.evict()
