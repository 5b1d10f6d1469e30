"""Use a trained run from Python:

    import diffusionblocks
    run = diffusionblocks.load("runs/vit-digits-blocks-B3-seed0")
    run.evaluate()                      # the metrics `diffusionblocks eval DIR` writes
    logits = run.predict(images)        # ViT: float images [N, C, H, W] in [0, 1] -> [N, classes]
    run.sample(seed=1, count=4)         # generative tasks: what `diffusionblocks sample DIR` does

`load` reads the run's config.json and the model weights of its newest intact checkpoint
(model.safetensors, hash-verified against the checkpoint's manifest). It runs no code from
the run directory: state.pt (the optimizer state, a torch pickle) is hashed like every
checkpoint file but not read, except for a run with shared=per-block, whose blocks' copies
of the shared modules are saved there; that file is then read with
torch.load(weights_only=True), whose unpickler builds only tensors and plain containers. The model is built exactly as `diffusionblocks eval` builds it (the trainer's
construction: the task from the config's `task`, precision, compile, offload), so
`evaluate()` returns eval's metrics bit for bit."""

import json
import sys
from pathlib import Path

import torch

from .config import TrainConfig, from_dict, to_dict, validate
from .errors import ConfigError, one_of
from .systems import checkpoint
from .systems.checkpoint import CheckpointError
from .sampler import SAMPLERS
from .task import SampleRequest, device_of
from .tasks.charlm import DECODINGS

__all__ = ["load", "read_config", "TrainedModel", "CheckpointError", "ConfigError"]

PREDICT_BATCH = 1000  # images per chain: evaluation's (tasks/vit.py EVAL_BATCH), so predict matches it


def read_config(run_dir) -> TrainConfig:
    """The validated config of the run in `run_dir` (its config.json); ConfigError, one line
    beginning "dir:", when there is none or it cannot be read as a run's config."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"dir: {run_dir} holds no run (no config.json)")
    try:
        values = json.loads(path.read_text())
        return validate(from_dict(values))
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(f"dir: {path} is not a readable run config ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None


def place(config: TrainConfig, device) -> None:
    """`config` set up to serve on `device` as `diffusionblocks eval --device` does: one
    process, and a run that needed offload to train keeps it (host memory from a GPU,
    memory-mapped files on the CPU). No device: the run's own, or the CPU when the run
    trained on a GPU that this machine lacks."""
    config.parallel = "none"  # a block-parallel run's checkpoint holds every block: one process serves it
    if device is None and config.on_gpu and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        config.device = str(device)
        if config.offload != "none":  # a model that needed offload to train needs it to run too
            config.offload = "cpu" if config.on_gpu else "disk"
        validate(config)


class TrainedModel:
    """A trained run, ready for inference (made by `load`).

    Attributes:
        run_dir:  the run directory (Path).
        config:   its TrainConfig (config.json; `device`, `offload`, `parallel` as served).
        task:     the task object (tasks/: ViTClassification, DiTGeneration, ...).
        model:    the nn.Module, in eval mode, on `device`, with the checkpoint's weights.
        plan:     the BlockPartition (blocks of layers and their noise-level ranges).
        mode:     "blocks" or "e2e".
        step:     the training step of the checkpoint loaded.
        checkpoint: the checkpoint folder whose model.safetensors was loaded.
        warnings: the damaged checkpoints skipped (empty when the newest one was loaded).
        device:   where the model computes (torch.device)."""

    def __init__(self, run_dir: Path, trainer, saved: checkpoint.Checkpoint, warnings: list[str]):
        self.run_dir = run_dir
        self._trainer = trainer  # holds the offload and per-layer hooks the model relies on
        self.config, self.task, self.model, self.plan = trainer.config, trainer.task, trainer.model, trainer.plan
        self.mode, self.step, self.checkpoint, self.warnings = trainer.config.mode, saved.step, saved.folder, warnings

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def __repr__(self) -> str:
        return (f"TrainedModel({str(self.run_dir)!r}, task={self.config.task!r}, mode={self.mode!r}, "
                f"blocks={self.plan.num_blocks}, step={self.step}, device={str(self.device)!r})")

    def evaluate(self) -> dict:
        """The test metrics of the task (names test_*; floats), exactly the `metrics` that
        `diffusionblocks eval RUN_DIR` writes to eval.json."""
        self.model.eval()
        with torch.no_grad():
            return self.task.evaluate(self.plan, self.mode)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Classification tasks (ViT): logits [N, classes] (float32, on the model's device) of
        float images [N, C, H, W] with pixel values in [0, 1] (C, H, W: the dataset's; digits:
        1×8×8, CIFAR: 3×32×32), computed as evaluation does: block-wise, the Euler chain from
        σ_max down through the blocks (model.inference_steps levels, default B); end to end,
        one pass of every layer. The chain's starting noise is drawn from a generator seeded
        alike for each run of PREDICT_BATCH images, as evaluation does, so the test images in
        their order give the test accuracy of `evaluate()` exactly (an image's logits depend
        on its position in that run of images; the argmax rarely does)."""
        if not hasattr(self.task, "predict"):
            raise ConfigError(f"predict: the {self.config.task!r} task of {self.run_dir} is not a classifier; "
                              f"{'use sample()' if hasattr(self.task, 'sample') else 'use evaluate()'}")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 \
                or len(images) == 0:
            got = f"{images.dtype} tensor of shape {list(images.shape)}" if isinstance(images, torch.Tensor) \
                else type(images).__name__
            raise ConfigError(f"images: expected float images [N, C, H, W] in [0, 1] with N >= 1, got a {got}")
        data = getattr(self.task, "data", None)
        if data is not None:
            expected = (data.channels, data.image_size, data.image_size)
            if tuple(images.shape[1:]) != expected:
                raise ConfigError(f"images: expected [N, {', '.join(map(str, expected))}] (the run's dataset), "
                                  f"got {list(images.shape)}")
        self.model.eval()
        with torch.no_grad():
            parts = [self.task.predict(part, self.plan, self.mode) for part in images.split(PREDICT_BATCH)]
        return torch.cat(parts)

    def sample(self, *, steps: int | None = None, sampler: str = "euler", cfg: float | None = None,
               label: int | None = None, count: int | None = None, prompt: str | None = None,
               tokens: int | None = None, decoding: str | None = None, seed: int = 0, out=None) -> dict:
        """Generative tasks (dit, mdm, ar, recurrent): what `diffusionblocks sample RUN_DIR`
        does with the same options (None: the task's default), returning its JSON-able
        summary (the file written under "out" or "file", layer evaluations, seconds, and the
        text for text tasks). Files go to `out`, else to the task's default name in the run
        directory, as the command writes them.

        steps: noise levels N (or unmasking steps); sampler: "euler" or "heun" (DiT);
        cfg: guidance scale (DiT); label: sample this class only (DiT; None: every class);
        count: samples per class, or sequences; prompt, tokens: text to continue and how many
        characters (text tasks); decoding: "greedy", "ancestral" or "top-p" (ar, recurrent);
        seed: the sampler's generator seed."""
        if not hasattr(self.task, "sample"):
            raise ConfigError(f"sample: the {self.config.task!r} task of {self.run_dir} generates nothing to sample"
                              f"{'; use predict()' if hasattr(self.task, 'predict') else ''}")
        for name, value in (("steps", steps), ("count", count), ("tokens", tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}: expected at least 1, got {value}")
        checks = [one_of("sampler", sampler, SAMPLERS)]
        if decoding is not None:
            checks.append(one_of("decoding", decoding, DECODINGS))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        request = SampleRequest(steps=steps, sampler=sampler, cfg=cfg, label=label, count=count, prompt=prompt,
                                tokens=tokens, decoding=decoding, seed=seed, out=Path(out) if out else None,
                                run_dir=self.run_dir)
        self.model.eval()
        with torch.no_grad():
            return self.task.sample(self.plan, self.mode, request)


def load(run_dir, device: str | torch.device | None = None) -> TrainedModel:
    """The model of the run in `run_dir` at its newest intact checkpoint, in eval mode, on
    `device` ("cpu", "cuda", "cuda:N"; default: the device the run trained on, or the CPU
    when that is a GPU this machine lacks). A run that trained with offload keeps it, as
    `diffusionblocks eval --device` does (offload=disk maps temporary files, never files in
    the run directory).

    Reads config.json and the checkpoint's manifest.json and model.safetensors only: nothing
    is unpickled. The checkpoint is the one `diffusionblocks eval` would use: the one named
    by checkpoint/latest if every file matches the SHA-256 in its manifest, else the newest
    intact older one, which is then reported on stderr and in the result's `warnings` (and
    its `step` is older): weights that fail their hash are never loaded.

    Like the trainer, it sets torch's intra-op threads to the run's `threads` when the
    config sets them; torch's global random state is left as it was.

    Raises ConfigError (one line beginning with the field): no config.json, or one that is
    not a valid config ("dir: ..."); a device this machine lacks ("device: ...").
    CheckpointError (a ConfigError): no intact checkpoint in the run directory, or
    weights that do not fit the config's model ("checkpoint: ..." / "load: ...")."""
    from .train import Trainer  # torch and the tasks' modules load only here

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    place(config, device)
    warnings = []

    def warn(message: str) -> None:
        warnings.append(message)
        print(message, file=sys.stderr)

    # shared=per-block: the blocks' copies of the shared modules are saved with the optimizer
    # state (state.pt), read with torch.load(weights_only=True), whose unpickler builds only
    # tensors and plain containers and runs no code from the file.
    per_block = config.shared == "per-block"
    saved = checkpoint.load(run_dir, warn) if per_block else checkpoint.load_weights(run_dir, warn)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if config.on_gpu else []):
        trainer = Trainer(config)  # no run directory: nothing is written there (disk offload: a temp folder)
    checkpoint.refuse_structure_change(saved, to_dict(config), trainer.model.state_dict(), field="load")
    expected = trainer.model.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(saved.weights)), sorted(set(saved.weights) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"load: {saved.folder / checkpoint.FILES[0]} does not hold the weights of the "
                              f"{config.task!r} model of {run_dir / 'config.json'} ({detail})")
    trainer.model.load_state_dict(saved.weights, strict=True)
    if per_block:
        trainer.shared_copies.load_state_dict(saved.state["shared_copies"])
    if trainer.offload is not None:
        trainer.offload.adopt_all()  # as after a resume: every block to its offloaded home
    trainer.model.eval()
    return TrainedModel(run_dir, trainer, saved, warnings)
