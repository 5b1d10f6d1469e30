"""Measured memory (docs/measuring.md): activation bytes are what autograd saves for
backward, counted with saved_tensors_hooks, so the figure is exact on any device and
needs no allocator. Parameters, gradients and optimizer state are counted separately."""

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SavedActivations:
    """Context manager: bytes of the distinct storages saved for backward inside it.
    Storages of `parameters` (saved by e.g. linear layers) are not activations and are
    left out; a storage saved several times, or through several views, counts once."""

    def __init__(self, parameters):
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameter_storages and storage.nbytes() > 0:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Tensors held in the optimizer's state (AdamW: exp_avg, exp_avg_sq and step per parameter)."""
    return tensor_bytes(value for state in optimizer.state.values() for value in state.values()
                        if isinstance(value, torch.Tensor))
