"""Crash-safe checkpoints that resume bit-exactly on CPU.

    OUT/checkpoint/step-00000120/   model.safetensors, state.pt, manifest.json
    OUT/checkpoint/step-00000240/   the newest complete one
    OUT/checkpoint/latest           "step-00000240"

A checkpoint is written into `step-N.tmp/`, every file fsynced, then a manifest with the
step, the run's config and the SHA-256 of each file, then the folder is renamed into
place and `latest` is replaced atomically (write, fsync, rename). Only then are older
checkpoints removed, keeping the previous one: a crash at any moment leaves at least one
complete checkpoint. Loading verifies the hashes and falls back to the newest checkpoint
that is intact, saying so.

The state holds the optimizer states, the step, the trainer's counters and torch's global
RNG state. Training draws its randomness from per-step generators (steps.py), so
(weights, optimizers, step) already fix the rest of the run; the global RNG is restored
too so that any other code drawing from it also continues identically."""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError

DIRNAME = "checkpoint"
KEEP = 2  # the newest checkpoint and the one before it
FILES = ("model.safetensors", "state.pt")


class CheckpointError(ConfigError):
    """No intact checkpoint to load; the message says what is wrong with each one."""


@dataclass
class Checkpoint:
    folder: Path
    step: int
    config: dict
    weights: dict[str, torch.Tensor]
    state: dict | None  # None from load_weights, which never reads state.pt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _step_folders(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    folders = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(folders, key=lambda p: p.name, reverse=True)


def save(out_dir, weights: dict[str, torch.Tensor], state: dict, config: dict) -> Path:
    root = Path(out_dir) / DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    name = f"step-{step:08d}"
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    tmp.mkdir()
    save_file({k: t.detach().cpu().contiguous() for k, t in weights.items()}, str(tmp / FILES[0]),
              metadata={"step": str(step)})
    torch.save(state, tmp / FILES[1])
    for file in FILES:
        _fsync(tmp / file)
    manifest = {"step": step, "config": config, "sha256": {file: _sha256(tmp / file) for file in FILES}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp / "manifest.json")
    _fsync(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a finished run re-evaluated)
    os.replace(tmp, final)
    _fsync(root)
    _write_atomically(root / "latest", name + "\n")
    for old in _step_folders(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def exists(out_dir) -> bool:
    root = Path(out_dir) / DIRNAME
    return root.is_dir() and bool(_step_folders(root))


def _verify(folder: Path) -> dict:
    """The manifest of an intact checkpoint; raises ValueError saying what is damaged."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"unreadable manifest.json ({error.__class__.__name__})") from None
    for file, expected in manifest.get("sha256", {}).items():
        path = folder / file
        if not path.exists():
            raise ValueError(f"{file} is missing")
        if _sha256(path) != expected:
            raise ValueError(f"{file} does not match its SHA-256 (truncated or corrupted)")
    if set(manifest.get("sha256", {})) != set(FILES):
        raise ValueError("manifest.json does not list the checkpoint's files")
    return manifest


def _candidates(root: Path) -> list[Path]:
    """`latest` first (if it names a folder), then every other folder, newest first."""
    folders = _step_folders(root)
    try:
        named = root / (root / "latest").read_text().strip()
    except OSError:
        return folders
    return ([named] if named in folders else []) + [f for f in folders if f != named]


def _newest_intact(out_dir, read, warn) -> tuple[Path, dict, object]:
    """(folder, manifest, read(folder)) of the newest checkpoint whose hashes verify and that
    `read` can read; damaged ones are reported through `warn` and skipped."""
    root = Path(out_dir) / DIRNAME
    problems = []
    for folder in _candidates(root):
        try:
            manifest = _verify(folder)
            return folder, manifest, read(folder)
        except Exception as error:  # any damage: report it, fall back to an older checkpoint
            problems.append(f"{folder.name}: {error}")
            warn(f"diffusionblocks: warning: checkpoint {folder} is damaged ({error}); trying an older one")
    detail = "; ".join(problems) if problems else "none found"
    raise CheckpointError(f"checkpoint: no intact checkpoint in {root} ({detail})")


def _warn_on_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load(out_dir, warn=_warn_on_stderr) -> Checkpoint:
    """The newest intact checkpoint of a run; damaged ones are reported through `warn` and skipped."""
    def read(folder: Path):
        weights = load_file(str(folder / FILES[0]))
        # on the CPU whatever device trained the run: load_state_dict puts each tensor back
        # beside its parameter, and a GPU run can be evaluated on a machine without one
        return weights, torch.load(folder / FILES[1], weights_only=True, map_location="cpu")

    folder, manifest, (weights, state) = _newest_intact(out_dir, read, warn)
    return Checkpoint(folder, manifest["step"], manifest["config"], weights, state)


def load_weights(out_dir, warn=_warn_on_stderr) -> Checkpoint:
    """The model weights (on the CPU) of the checkpoint `load` would choose, with its step and
    config; `state` is None. It reads model.safetensors and the manifest only: state.pt (a torch
    pickle of the optimizer state) is hashed, as every file is, but never unpickled, so a run
    directory from anywhere can be loaded for inference without running code from it."""
    folder, manifest, weights = _newest_intact(out_dir, lambda folder: load_file(str(folder / FILES[0])), warn)
    return Checkpoint(folder, manifest["step"], manifest["config"], weights, None)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def refuse_structure_change(saved: Checkpoint, config: dict, state_dict: dict[str, torch.Tensor],
                            field: str = "resume") -> None:
    """A checkpoint restores only into the model and the blocks it was trained as: raises
    ConfigError naming the changed fields when `config` (the run's, as a dict) or the
    shapes of `state_dict` (the model's) differ from what was saved. `field` begins the
    message (the command or config field that asked)."""
    before, now = _flatten(saved.config), _flatten(json.loads(json.dumps(config)))  # as saved: tuples are lists
    structural = [k for k in ("task", "mode", "blocks", "split", "shared") if before.get(k) != now.get(k)]
    shapes = {name: tuple(t.shape) for name, t in saved.weights.items()}
    if shapes != {name: tuple(t.shape) for name, t in state_dict.items()}:
        structural += [k for k in now if k.startswith("model.") and before.get(k) != now.get(k)] or ["model"]
    if structural:
        changes = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in structural)
        raise ConfigError(f"{field}: the checkpoint in {saved.folder} was trained with another model "
                          f"or partition; changed: {changes}")
