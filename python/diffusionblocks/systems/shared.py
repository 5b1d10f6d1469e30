"""Per-block copies of the shared modules. By default every block trains the
same embeddings, σ-embedder and head. With `shared=per-block` block b has its own copy
of them, trained only on b's steps and used whenever b runs: the blocks then share
nothing at all, which is what lets block-parallel training run with no communication
(parallel.py) and still equal this serial run bit for bit.

The copies are swapped in by pointing each shared parameter's data at the active block's
copy (no copying); each block also has its own optimizer for them (optim.py)."""

import torch


class SharedCopies:
    def __init__(self, shared: list[tuple[str, torch.nn.Parameter]], num_blocks: int):
        self.params = dict(shared)
        self.copies = [{name: p.detach().clone() for name, p in shared} for _ in range(num_blocks)]
        self.active = None
        self.activate(0)

    def activate(self, block: int) -> None:
        if block != self.active:
            self.repoint(block)

    def repoint(self, block: int | None = None) -> None:
        """Point the shared parameters at `block`'s copies (default: the active block's) even
        when they already were: HostOffload replaces the copies' tensors when it moves them
        between host and GPU."""
        if block is not None:
            self.active = block
        for name, p in self.params.items():
            p.data = self.copies[self.active][name]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {str(block): dict(copy) for block, copy in enumerate(self.copies)}

    def load_state_dict(self, state: dict) -> None:
        for block, copy in enumerate(self.copies):
            for name, tensor in copy.items():
                tensor.copy_(state[str(block)][name])
