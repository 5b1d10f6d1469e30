"""Checkpoints that resume bit-exactly on CPU: model weights in safetensors, and beside
them the optimizer state, the step, the trainer's counters and torch's global RNG state.
Training draws its randomness from per-step generators (train.py), so (weights,
optimizer, step) already fix the rest of the run; the global RNG state is restored too
so that any other code drawing from it also continues identically."""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DIRNAME = "checkpoint"


def _replace(write, path: Path):
    """Write to a temporary name, then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(out_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, counters: dict):
    folder = Path(out_dir) / DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    _replace(lambda p: save_file(weights, str(p), metadata={"step": str(step)}), folder / "model.safetensors")
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "counters": counters}
    _replace(lambda p: torch.save(state, p), folder / "state.pt")


def exists(out_dir) -> bool:
    return (Path(out_dir) / DIRNAME / "state.pt").exists()


def load_weights(out_dir, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(Path(out_dir) / DIRNAME / "model.safetensors")))


def load(out_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restores model, optimizer and global RNG; returns the saved state (step, counters)."""
    folder = Path(out_dir) / DIRNAME
    state = torch.load(folder / "state.pt", weights_only=True)
    load_weights(out_dir, model)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state
