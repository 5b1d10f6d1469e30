"""Run configuration: a dataclass, a registry of named presets (as DiT names its models),
`key=value` overrides, and validation whose one-line errors start with the field name.
The fields here are the trainer's; `model` holds the task's own options (its `Config`
dataclass in tasks/: model shape and task knobs).

The task is a registered name (tasks.TASKS) or "module.path:ClassName", a task class of
your own (tasks.task_class). Presets: the built-in ones by name; a task of your own may
name its own (its class's `presets`), chosen with `preset(name, task=...)`; "custom" is
no preset: the task's Config() defaults and the trainer's."""

import dataclasses
import typing
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .partition import BlockPartition, PartitionError
from .tasks import TASKS, task_class, task_presets
from .tasks.vit import ViTConfig

MODES = ("blocks", "e2e")
BLOCK_SCHEDULES = ("random", "round-robin", "sequential")
OFFLOADS = ("none", "cpu", "disk")
PRECISIONS = ("fp32", "bf16")
ADAMW = ("auto", "fused", "foreach", "for-loop")
SHARED = ("global", "per-block")
CUSTOM = "custom"  # the preset field of a config built from a task's defaults, not a named preset
__all__ = ["ConfigError", "TrainConfig", "PRESETS", "CUSTOM", "preset", "preset_names", "override", "validate",
           "to_dict", "from_dict"]


@dataclass
class TrainConfig:
    """One run, in full: the trainer's fields below, and the task's options in `model` (its
    `Config`). Build one with `preset()`, change it with `override()` or attributes, check
    it with `validate()`; config.json holds it, so a run can be resumed and evaluated."""

    preset: str = "vit-digits"           # a preset of the task (see preset()), or "custom"
    task: str = "vit"                    # a key of tasks.TASKS, or "module.path:ClassName" (your own)
    model: typing.Any = field(default_factory=ViTConfig)  # task_class(task).Config
    mode: str = "blocks"                 # "blocks" (DiffusionBlocks) or "e2e" (the baseline)
    blocks: int = 3                      # B
    split: tuple[int, ...] | None = None  # layers per block, block 0 first; None = equal
    partition: str = "equi"              # "equi" (equi-probability) or "uniform" (in ln σ)
    gamma: float = 0.05                  # overlap of neighbouring σ ranges
    block_schedule: str = "random"       # "random", "round-robin" or "sequential"
    steps_per_swap: int = 1              # the block changes at most every K steps (amortises offload)
    parallel: str = "none"               # "blocks": block-parallel over torch.distributed (parallel.py)
    shared_sync_every: int = 0           # block-parallel, shared=global: average shared modules every K steps
    shared: str = "global"               # shared modules: one set ("global") or a copy per block ("per-block")
    device: str = "cpu"                  # where training runs: "cpu", "cuda" or "cuda:N"
    offload: str = "none"                # inactive blocks' weights + optimizer state: "none", "cpu"
                                         # (GPU -> host memory) or "disk" (CPU -> memory-mapped files)
    activation_checkpointing: bool = False  # recompute each layer in backward (torch.utils.checkpoint)
    e2e_steps: int = 1200                # end-to-end steps; block-wise runs as many layer evaluations (B× the steps)
    e2e_epochs: float = 0                # > 0: the budget in passes over the training set instead, end to end
                                         # (e2e_steps is then set from the task's epoch size when the run starts)
    steps: int = 0                       # 0: the budget above; else an explicit step count
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_e2e_steps: int = 50           # scaled like the steps
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0                  # steps between test evaluations; 0 = at the end only
    checkpoint_every: int = 500
    max_nonfinite_steps: int = 5         # consecutive non-finite losses that stop the run
    threads: int = 0                     # torch intra-op threads; 0 = leave torch's default
    precision: str = "fp32"              # "bf16": the residual layers under bf16 autocast (the rest fp32)
    compile: bool = False                # torch.compile each residual layer (once per layer, not per σ or step)
    adamw: str = "auto"                  # AdamW implementation: "fused", "foreach", "for-loop";
                                         # auto = fused on a GPU, for-loop on the CPU
    log_every: int = 0                   # steps between host reads of the step figures (loss, grad norm);
                                         # 0 = 1 on the CPU, 50 on a GPU. Above 1 the skip of a
                                         # non-finite step is decided on the device (needs fused AdamW)
    progress: bool = True                # tqdm progress bar

    @property
    def on_gpu(self) -> bool:
        return _device_type(self.device) == "cuda"

    @property
    def adamw_implementation(self) -> str:
        return self.adamw if self.adamw != "auto" else ("fused" if self.on_gpu else "for-loop")

    @property
    def settle_every(self) -> int:
        """Steps between host reads of the step figures (log_every, resolved)."""
        return self.log_every or (50 if self.on_gpu else 1)

    @property
    def num_blocks(self) -> int:
        """Blocks actually trained: B block-wise, 1 (the whole stack) end to end."""
        return self.blocks if self.mode == "blocks" else 1

    @property
    def steps_per_e2e_step(self) -> float:
        """Block-wise steps that cost one end-to-end step in layer evaluations: B (a block
        step runs 1/B of the layers), unless the task's options count otherwise (the
        recurrent baseline runs its core K times a step)."""
        if self.mode == "e2e":
            return 1
        ratio = getattr(self.model, "block_steps_per_e2e_step", None)
        return ratio() if ratio is not None else self.blocks

    @property
    def total_steps(self) -> int:
        return self.steps or round(self.steps_per_e2e_step * self.e2e_steps)

    @property
    def warmup_steps(self) -> int:
        return round(self.steps_per_e2e_step * self.warmup_e2e_steps)

    def partition_plan(self) -> BlockPartition:
        """The blocks of this run, on the task's axis of noise levels (σ, or masking t)."""
        axis = task_class(self.task).level_name
        if self.mode == "e2e":
            return BlockPartition(self.model.layers, 1, self.partition, 0.0, axis=axis)
        return BlockPartition(self.model.layers, self.blocks, self.partition, self.gamma, self.split, axis=axis)


def _preset_factory(name: str, task: str, make):
    return lambda: TrainConfig(preset=name, task=task, **make())


# Each task class names its presets (name -> a function returning TrainConfig fields).
PRESETS = {name: _preset_factory(name, task, make)
           for task, kind in TASKS.items() for name, make in kind.presets.items()}


def preset(name: str, task: str | None = None) -> TrainConfig:
    """The TrainConfig of a named preset. Without `task`: a built-in preset (PRESETS). With
    `task` (a registered name or "module.path:ClassName"): one of that task class's own
    `presets`, or "custom": the task's Config() defaults and TrainConfig's own (so are the
    task's options where its preset does not give `model`)."""
    if task is None:
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()
    options = task_class(task).Config
    presets = task_presets(task)
    if name not in presets and name != CUSTOM:
        raise ConfigError(f"preset: unknown preset {name!r} for task {task!r}; choose from "
                          f"{', '.join(preset_names(task))}")
    values = presets[name]() if name in presets else {}
    return TrainConfig(preset=name, task=task, **{"model": options(), **values})


def preset_names(task: str) -> list[str]:
    """The presets a config of `task` may name: any built-in one for a registered task (as
    before), a task of your own its class's `presets`; and "custom" for every task."""
    return sorted(PRESETS if task in TASKS else task_presets(task)) + [CUSTOM]


def _parse(name: str, kind, text: str):
    """A command-line string as a value of the field's type."""
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if kind in (int, float, str):
            return kind(text)
        if kind == tuple[int, ...] | None:
            return None if text.lower() in ("", "none") else tuple(int(n) for n in text.split(","))
    except ValueError:
        raise ConfigError(f"{name}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"{name}: cannot be set from the command line")


def override(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply `key=value` strings; model fields are `model.key` (or plain `key`)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"set: expected key=value, got {assignment!r}")
        key = key.strip()
        target, name = config, key.removeprefix("model.")
        top = typing.get_type_hints(TrainConfig)
        if key.startswith("model.") or (name not in top and name in typing.get_type_hints(type(config.model))):
            target = config.model
        hints = typing.get_type_hints(type(target))
        if name not in hints or name == "model":
            raise ConfigError(f"{key}: unknown config field")
        setattr(target, name, _parse(key, hints[name], text.strip()))
    return config


def validate(config: TrainConfig) -> TrainConfig:
    """`config` itself if every field is valid (the task's options checked by its
    `Config.check`); else raises ConfigError whose one line names the first bad field."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    names = preset_names(config.task)  # resolves the task first: a bad task is named as such
    need(config.preset in names, f"preset: unknown preset {config.preset!r}; choose from {', '.join(names)}")
    need(config.mode in MODES, f"mode: expected one of {', '.join(MODES)}, got {config.mode!r}")
    need(config.block_schedule in BLOCK_SCHEDULES,
         f"block_schedule: expected one of {', '.join(BLOCK_SCHEDULES)}, got {config.block_schedule!r}")
    need(config.steps_per_swap >= 1, f"steps_per_swap: expected at least 1, got {config.steps_per_swap}")
    need(config.parallel in ("none", "blocks"), f"parallel: expected none or blocks, got {config.parallel!r}")
    need(config.parallel == "none" or config.mode == "blocks",
         "parallel: block-parallel training needs mode=blocks (end to end there is one block)")
    need(config.shared_sync_every >= 0, f"shared_sync_every: expected >= 0, got {config.shared_sync_every}")
    need(config.shared in SHARED, f"shared: expected one of {', '.join(SHARED)}, got {config.shared!r}")
    need(_device_type(config.device) in ("cpu", "cuda"),
         f"device: expected cpu, cuda or cuda:N, got {config.device!r}")
    need(config.offload in OFFLOADS, f"offload: expected one of {', '.join(OFFLOADS)}, got {config.offload!r}")
    need(config.offload != "cpu" or config.on_gpu, "offload: cpu moves inactive blocks from the GPU to host memory; "
         "with device=cpu use offload=disk (memory-mapped files)")
    need(config.offload != "disk" or not config.on_gpu, "offload: disk keeps inactive blocks in memory-mapped files "
         "for CPU training; with device=cuda use offload=cpu (host memory)")
    need(config.blocks >= 1, f"blocks: expected at least 1, got {config.blocks}")
    need(config.gamma >= 0, f"gamma: expected an overlap >= 0, got {config.gamma:g}")
    options = task_class(config.task).Config
    need(isinstance(config.model, options), f"model: expected the options of task {config.task!r} "
         f"({_qualified(options)}), got {_qualified(type(config.model))}" + (
             "; the same class imported twice? A script's own classes live in __main__: take the options "
             "from the task the config names, e.g. preset('custom', task=...).model"
             if type(config.model).__qualname__ == options.__qualname__ else ""))
    config.model.check(config)
    need(config.e2e_steps >= 1, f"e2e_steps: expected at least 1, got {config.e2e_steps}")
    need(config.e2e_epochs >= 0, f"e2e_epochs: expected >= 0 (0 = use e2e_steps), got {config.e2e_epochs:g}")
    need(config.steps >= 0, f"steps: expected >= 0 (0 = the layer evaluations of e2e_steps), got {config.steps}")
    need(config.batch_size >= 1, f"batch_size: expected at least 1, got {config.batch_size}")
    need(config.lr > 0, f"lr: expected > 0, got {config.lr:g}")
    need(config.weight_decay >= 0, f"weight_decay: expected >= 0, got {config.weight_decay:g}")
    need(config.warmup_e2e_steps >= 0, f"warmup_e2e_steps: expected >= 0, got {config.warmup_e2e_steps}")
    need(config.grad_clip > 0, f"grad_clip: expected > 0, got {config.grad_clip:g}")
    need(config.eval_every >= 0, f"eval_every: expected >= 0, got {config.eval_every}")
    need(config.checkpoint_every >= 1, f"checkpoint_every: expected >= 1, got {config.checkpoint_every}")
    need(config.max_nonfinite_steps >= 1,
         f"max_nonfinite_steps: expected at least 1, got {config.max_nonfinite_steps}")
    need(config.threads >= 0, f"threads: expected >= 0, got {config.threads}")
    need(config.precision in PRECISIONS, f"precision: expected one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    need(config.adamw in ADAMW, f"adamw: expected one of {', '.join(ADAMW)}, got {config.adamw!r}")
    need(config.log_every >= 0, f"log_every: expected >= 0 (0 = 1 on the CPU, 50 on a GPU), got {config.log_every}")
    need(config.settle_every == 1 or config.adamw_implementation == "fused",
         f"log_every: {config.settle_every} steps between reads needs the non-finite skip decided on the device, "
         f"which needs adamw=fused (got adamw={config.adamw})")
    need(not (config.compile and config.activation_checkpointing),
         "compile: not with activation_checkpointing (the recomputation would run the compiled layer eagerly)")
    try:
        config.partition_plan()
    except PartitionError as error:
        raise ConfigError(str(error)) from None
    return config


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _device_type(name: str) -> str | None:
    try:
        return torch.device(name).type
    except (RuntimeError, TypeError):
        return None


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> TrainConfig:
    values = dict(values)
    options = task_class(values.get("task", "vit")).Config
    model_values = values.pop("model")
    unknown = sorted(set(model_values) - {f.name for f in dataclasses.fields(options)})
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: unknown config field")
    model = options(**model_values)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown config field")
    if values.get("split") is not None:
        values["split"] = tuple(values["split"])
    return TrainConfig(model=model, **values)
