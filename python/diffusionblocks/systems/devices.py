"""Where a run computes: the device named by the config (under torchrun, each process's own
GPU), and the model placed on it. Random draws stay on CPU generators and move after, so a
run draws the same batches, σ's and masks on any device."""

import os

import torch

from ..errors import ConfigError
from ..task import shared_parameters


def training_device(config, parallel=None) -> torch.device:
    """The device named by config.device; "cuda" without an index is the current GPU, or
    under torchrun the GPU of the process's local rank (parallel: its BlockParallel)."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device} requested, but torch sees no GPU (torch "
                          f"{torch.__version__}, cuda {torch.version.cuda}); use device=cpu "
                          "(eval and sample of a GPU run: --device cpu)")
    count = torch.cuda.device_count()
    if device.index is None:
        local = int(os.environ.get("LOCAL_RANK", parallel.rank)) if parallel is not None else None
        device = torch.device("cuda", torch.cuda.current_device() if local is None else local % count)
    if device.index >= count:
        raise ConfigError(f"device: {config.device} requested, but torch sees {count} GPU(s)")
    torch.cuda.set_device(device)
    return device


def place_model(model: torch.nn.Module, device: torch.device, layers_too: bool = True) -> None:
    """Parameters and buffers on `device`. layers_too=False leaves the residual layers'
    parameters where they are (offload=cpu keeps them on the host and brings in one block
    at a time), so a model larger than the GPU never has to fit on it whole."""
    if layers_too:
        model.to(device)
        return
    for _, p in shared_parameters(model):
        p.data = p.data.to(device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
