"""The optimizers of a run: AdamW for each block's layers and for the shared modules, so a
block's optimizer state can live wherever its weights live (offload). AdamW keeps
per-parameter state, so this steps exactly as one optimizer over all parameters would."""

import torch
from torch import nn

from .task import shared_parameters


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config,
                    no_decay_names: set[str]) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), not on biases, norms or the
    parameters the task names (e.g. positions)."""
    decays = {n: p.dim() >= 2 and n not in no_decay_names for n, p in named_params}
    groups = [{"params": [p for n, p in named_params if decays[n]], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named_params if not decays[n]], "weight_decay": 0.0}]
    implementation = config.adamw_implementation
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=implementation == "fused" or None,
                             foreach=implementation == "foreach" if implementation != "fused" else None)


def shared_optimizer_key(block: int, per_block: bool) -> str:
    """"shared", or "shared<b>" when each block has its own copy of the shared modules."""
    return f"shared{block}" if per_block else "shared"


def block_optimizers(model: nn.Module, plan, config, no_decay_names: set[str]) -> dict[str, torch.optim.AdamW]:
    """"block<b>" for each block's layers, and one or B (shared=per-block) for the shared modules."""
    optimizers = {}
    for block in range(plan.num_blocks):
        named = [(f"layers.{i}.{n}", p) for i in plan.layers(block) for n, p in model.layers[i].named_parameters()]
        optimizers[f"block{block}"] = build_optimizer(named, config, no_decay_names)
    per_block = config.shared == "per-block"
    for key in dict.fromkeys(shared_optimizer_key(b, per_block) for b in range(plan.num_blocks)):
        optimizers[key] = build_optimizer(shared_parameters(model), config, no_decay_names)
    return optimizers


def skip_where(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
    """The next step() of a fused AdamW leaves everything (weights, moments, step count)
    unchanged where found_inf is 1: the skip of a non-finite step decided on the device,
    without a host read (the mechanism mixed-precision loss scaling uses). None: steps normally."""
    optimizer.found_inf = found_inf


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
