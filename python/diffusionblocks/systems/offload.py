"""Memory ÷ B for real: while a block is not training, its parameters and its
AdamW state leave the memory it trains in.

On a GPU (`offload=cpu`, HostOffload) they wait in pinned host memory, one buffer per
tensor allocated once; the active block's tensors are copies on the device, made when it
is entered and copied back (then freed) when another block is. Copies are exact, so
results are bit-identical to training without offload on the same device; the traffic is
one round trip of a block's weights and moments per swap, which `steps_per_swap`
amortises.

On the CPU (`offload=disk`, DiskOffload) they live in one memory-mapped file per block, created in
the run directory and unlinked at once, so the disk space is freed when the process ends. Every
parameter and state tensor of the block is a view of that mapping, so it keeps its shape
and address for the whole run and any access still reads the right values; evicting a
block only tells the kernel to drop its pages from this process (madvise DONTNEED: a
shared file mapping keeps the data in the file and the page cache, and pages come back on
the next touch). Correctness therefore never depends on when a block is evicted, only the
resident memory does, and results are bit-identical to training without offload."""

import contextlib
import mmap
import os
from pathlib import Path

import torch

ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels
STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments (its `step` is a scalar)


def _block_parameters(model: torch.nn.Module, plan, block: int) -> list[torch.nn.Parameter]:
    return [p for i in plan.layers(block) for p in model.layers[i].parameters()]


class _Slot:
    """One tensor that moves with a block: read and replaced through the object that holds
    it (a parameter's .data, an optimizer state entry, a per-block shared copy)."""

    def __init__(self, get, put):
        self.get, self.put = get, put


class HostOffload:
    """The blocks of a partition in host memory, the active one on `device`.

    A block is its layers' parameters and AdamW moments, and with `shared=per-block` its
    copy of the shared modules and that copy's moments too. Each such tensor has a host
    buffer (pinned when the device is a GPU, so copies run at full PCIe speed); it is on the
    device while its holder refers to a device copy, on the host while it refers to the
    buffer itself. With device=cpu the same swaps happen between two CPU copies: tests use
    that to check the bookkeeping without a GPU; training on the CPU uses DiskOffload."""

    def __init__(self, model: torch.nn.Module, plan, optimizers: dict, device: torch.device, shared_copies=None):
        self.device, self.optimizers, self.shared_copies = torch.device(device), optimizers, shared_copies
        self.pin = self.device.type == "cuda"
        self.params = [_block_parameters(model, plan, block) for block in range(plan.num_blocks)]
        self.slots = [self._block_slots(block) for block in range(plan.num_blocks)]
        self.buffers: dict[tuple, torch.Tensor] = {}  # slot key -> its host buffer
        self.adopt_all()
        plan.listeners.append(self.activate)  # training and inference alike

    def _moment_slots(self, block: int, optimizer: str, params) -> dict[tuple, _Slot]:
        """AdamW's moments of `params` in self.optimizers[optimizer] (looked up on each use:
        load_state_dict replaces the optimizer's state dict)."""
        state = lambda: self.optimizers[optimizer].state
        return {(block, optimizer, id(p), key): _Slot(lambda p=p, key=key: state().get(p, {}).get(key),
                                                      lambda t, p=p, key=key: state()[p].__setitem__(key, t))
                for p in params for key in STATE_KEYS}

    def _block_slots(self, block: int) -> dict[tuple, _Slot]:
        slots = {(block, "param", id(p)): _Slot(lambda p=p: p.data, lambda t, p=p: setattr(p, "data", t))
                 for p in self.params[block]}
        slots.update(self._moment_slots(block, f"block{block}", self.params[block]))
        if self.shared_copies is not None:
            copy = self.shared_copies.copies[block]
            slots.update({(block, "shared", name): _Slot(lambda name=name: copy[name],
                                                         lambda t, name=name: copy.__setitem__(name, t))
                          for name in copy})
            slots.update(self._moment_slots(block, f"shared{block}", self.shared_copies.params.values()))
        return slots

    def _to_host(self, block: int) -> None:
        for key, slot in self.slots[block].items():
            value = slot.get()
            if value is None:  # a moment AdamW has not created yet
                continue
            buffer = self.buffers.get(key)
            if buffer is None:
                buffer = self.buffers[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=self.pin)
            if buffer.data_ptr() != value.data_ptr():
                buffer.copy_(value)  # synchronous: the buffer is final when it returns
            slot.put(buffer)

    def _to_device(self, block: int) -> None:
        for slot in self.slots[block].values():
            value = slot.get()
            if value is not None:
                # non_blocking from pinned memory: the copies queue on the stream the block's
                # kernels then run on, so they are ordered without waiting here
                slot.put(value.to(self.device, non_blocking=True, copy=True))
        if self.shared_copies is not None:  # the shared modules on the copy now on the device
            self.shared_copies.repoint(block)

    def activate(self, block: int) -> None:
        if block != self.active:
            if self.active is not None:
                self._to_host(self.active)
            self._to_device(block)
            self.active = block

    def after_step(self, block: int) -> None:
        """The first step of a block creates its AdamW moments on the device, where they stay
        until the block is left; nothing to do."""

    def adopt_all(self) -> None:
        """Every block to the host (at the start, and after a resume loaded weights and
        optimizer state wherever each tensor was); the next block entered comes back."""
        for block in range(len(self.slots)):
            self._to_host(block)
        self.active = None
        if self.shared_copies is not None:
            self.shared_copies.repoint()  # at the active copy's host buffers

    def release(self) -> None:
        """Saving reads the tensors where they are; nothing is brought in."""

    def resident_parameters(self, block: int) -> list[torch.nn.Parameter]:
        return self.params[block]


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
            self.files.append(_BlockFile(folder / f"block{block}.bin", _block_parameters(model, plan, block)))
        with contextlib.suppress(OSError):
            folder.rmdir()  # empty: the files live on, unnamed, while mapped
        self.active = None
        self.adopt_all()
        plan.listeners.append(self.activate)  # training and inference alike

    def activate(self, block: int) -> None:
        """`block` is entered: every other block leaves memory (the one left included)."""
        if block != self.active:
            self.active = block
            self.release()

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

    def resident_parameters(self, block: int) -> list[torch.nn.Parameter]:
        return self.files[block].params
