"""The training loop (docs/method.md §4), block-wise or end-to-end, read top to bottom:

    every step: pick block b -> batch -> the task's loss of block b: σ per example from
    b's range, z = y + σ·ε (op), only b's layers, λ(σ)-weighted loss (op) -> backward ->
    clip 1.0 -> AdamW step (only b and the shared modules have gradients)

End to end (--mode e2e) the same model runs all its layers with the task's ordinary
objective. The task (task.py, registered in tasks/) supplies data, losses and metrics.
Every random draw of step s comes from a generator seeded by (seed, s) (steps.py), so a
run is a pure function of its config and a resumed run repeats the uninterrupted one bit
for bit. The systems features (offload, per-block shared copies, block-parallel,
checkpoints, memory measurement, logs) live in systems/.
"""

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

import torch
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint as checkpoint_layer
from tqdm import tqdm

import diffusionblocks_ext as dx

from . import steps
from .config import ConfigError, TrainConfig, to_dict, validate
from .optim import block_optimizers, set_learning_rate, shared_optimizer_key, skip_where
from .systems import checkpoint
from .systems.devices import place_model, training_device
from .systems.logs import MetricsLog, plot_loss_by_block
from .systems.memory import SavedActivations, optimizer_state_bytes, tensor_bytes
from .systems.offload import DiskOffload, HostOffload
from .systems.parallel import BlockParallel
from .systems.shared import SharedCopies
from .systems.signals import Interrupted, deferred_signals
from .task import shared_parameters, to_device
from .tasks import task_class

__all__ = ["Trainer", "TrainingError", "Interrupted"]

OFFLOAD_DIR = "offload"  # in the run directory: the blocks' memory-mapped files


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. the loss stays non-finite); the message says where."""


def recompute_in_backward(layers: torch.nn.ModuleList) -> None:
    """Activation checkpointing: each layer keeps only its input for backward and runs
    again there (non-reentrant). Module hooks still fire once per call."""
    for layer in layers:
        forward = layer.forward
        layer.forward = lambda *args, forward=forward: checkpoint_layer(forward, *args, use_reentrant=False)


def autocast_layers(layers: torch.nn.ModuleList, device_type: str) -> None:
    """precision=bf16: each residual layer runs under bf16 autocast (its matrix products in
    bf16); what enters and leaves a layer stays float32, so the shared modules, the fused
    ops and the loss see float32 as before."""
    for layer in layers:
        forward = layer.forward

        def in_bf16(*args, forward=forward):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return forward(*args).float()

        layer.forward = in_bf16


def compile_layers(layers: torch.nn.ModuleList) -> None:
    """compile=true: torch.compile of each residual layer. Shapes are fixed within a run and
    σ enters as a tensor, so each layer compiles once (the layers share one graph, which
    the compiler's cache reuses)."""
    for layer in layers:
        layer.compile(dynamic=False)


@dataclass
class PendingStep:
    """A step done on the device whose figures the host has not read yet."""
    step: int
    block: int
    lr: float
    figures: torch.Tensor         # float64 [2] or [5]: loss, grad norm (, levels min, median, max)
    skipped: bool | None = None   # decided on the host (None: on the device, read with the figures)


def epochs_to_steps(config: TrainConfig, task) -> int:
    """End-to-end steps of config.e2e_epochs passes over the task's training set (at least 1)."""
    size = getattr(task, "examples_per_epoch", None)
    if size is None:
        raise ConfigError(f"e2e_epochs: the {config.task!r} task has no epoch size; set e2e_steps instead")
    return max(1, round(config.e2e_epochs * size() / config.batch_size))


class Trainer:
    """The one training loop, block-wise or end to end (config.mode), of the task the config
    names (a registered name or "module.path:ClassName"): `run()` trains, evaluates and
    writes the run directory `out_dir` (config, log, checkpoints, report); `evaluate()`
    gives the test metrics of the model as it is; `resume()` loads the last checkpoint."""

    def __init__(self, config: TrainConfig, out_dir=None):
        self.config = validate(config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if config.threads:
            torch.set_num_threads(config.threads)
        self.parallel = BlockParallel(config.num_blocks, config) if config.parallel == "blocks" else None
        self.is_main = self.parallel is None or self.parallel.rank == 0  # writes logs, checkpoints, report
        self.device = training_device(config, self.parallel)
        torch.manual_seed(config.seed)  # the initial weights: drawn on the CPU, the same on any device
        self.task = task_class(config.task)(config.model)
        if config.e2e_epochs:
            config.e2e_steps = epochs_to_steps(config, self.task)
        self.model = self.task.model
        self.plan = config.partition_plan()
        host_offload = config.offload == "cpu" and config.mode == "blocks"
        place_model(self.model, self.device, layers_too=not host_offload)
        self.optimizers = block_optimizers(self.model, self.plan, config, self.task.no_weight_decay())
        self.shared_copies = None
        if config.shared == "per-block":
            self.shared_copies = SharedCopies(shared_parameters(self.model), self.plan.num_blocks)
            self.plan.listeners.append(self.shared_copies.activate)
        self.offload = None
        if config.offload == "disk" and config.mode == "blocks":
            rank = "" if self.parallel is None else f"-rank{self.parallel.rank}"
            folder = (self.out_dir or Path(tempfile.mkdtemp(prefix="diffusionblocks-"))) / (OFFLOAD_DIR + rank)
            self.offload = DiskOffload(self.model, self.plan, self.optimizers, folder)
        elif host_offload:
            self.offload = HostOffload(self.model, self.plan, self.optimizers, self.device, self.shared_copies)
        if config.precision == "bf16":
            autocast_layers(self.model.layers, self.device.type)
        if config.activation_checkpointing:
            recompute_in_backward(self.model.layers)
        if config.compile:
            compile_layers(self.model.layers)
        self.step = 0
        # Counters that a checkpoint carries: layer forward calls (each over one batch),
        # seconds spent, the measured memory, and skipped (non-finite) steps.
        self.counters = {"train_layer_evals": 0, "inference_layer_evals": 0, "wall_s": 0.0,
                         "activation_bytes_by_block": {}, "grad_bytes": 0,
                         "nonfinite_steps": 0, "consecutive_nonfinite": 0}
        self.stop_signal = None  # set by SIGINT/SIGTERM during run(): checkpoint, then stop
        for layer in self.model.layers:
            layer.register_forward_pre_hook(self._count_layer_call)

    def _count_layer_call(self, module, args):
        self.counters["train_layer_evals" if torch.is_grad_enabled() else "inference_layer_evals"] += 1

    # --- one step ----------------------------------------------------------------------
    def train_step(self, step: int) -> dict | None:
        """Step `step` of the run, its record read back: its block, batch and noise all come
        from its own generator. None when block-parallel and another process owns the block."""
        pending = self.start_step(step)
        return None if pending is None else self.settle([pending])[0]

    def start_step(self, step: int) -> PendingStep | None:
        """Step `step`, its figures left on the device (the loop reads them every log_every steps)."""
        generator = steps.step_generator(self.config.seed, step)
        steps.seed_global_rng(self.config.seed, step)
        block = steps.choose_block(self.config, step, generator)
        if self.parallel is not None and not self.parallel.owns(block):
            return None
        return self.launch_block_step(block, step, generator)

    def block_step(self, block: int, step: int, generator: torch.Generator) -> dict:
        """One optimizer step of `block` (see launch_block_step), its record read back."""
        return self.settle([self.launch_block_step(block, step, generator)])[0]

    def launch_block_step(self, block: int, step: int, generator: torch.Generator) -> PendingStep:
        """One optimizer step that runs and updates only `block` (and the shared modules):
        its gradients, then the update, or none where the loss or gradient is not finite.
        With fused AdamW that choice is made on the device; otherwise the host reads the
        figures first (a wait for the GPU, nothing on the CPU)."""
        loss, levels, params = self.compute_gradients(block, step, generator)
        with record_function("diffusionblocks.optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip) if params else \
                torch.tensor(float("nan"), device=loss.device)
            # float64 holds the float32 values exactly.
            figures = [loss.detach(), grad_norm] + ([] if levels is None else [levels.min(), levels.median(),
                                                                               levels.max()])
            figures = torch.stack([f.to(loss.device, torch.float64) for f in figures])
            lr = steps.learning_rate(self.config, step)
            pending = PendingStep(step, block, lr, figures)
            # A finite loss can still overflow the gradient: both are checked.
            if self.config.adamw_implementation == "fused":
                self.apply_update(block, lr, found_inf=(~torch.isfinite(figures[:2]).all()).float())
            else:
                with record_function("diffusionblocks.settle"):
                    pending.skipped = not all(math.isfinite(v) for v in figures[:2].tolist())
                if not pending.skipped:
                    self.apply_update(block, lr)
            for p in params:
                p.grad = None  # None, not 0: AdamW then skips parameters this step did not use
        return pending

    def settle(self, pending: list[PendingStep]) -> list[dict]:
        """The records of steps done (one host read for all), in order; counts the skipped
        ones and stops the run after max_nonfinite_steps in a row, naming the step."""
        with record_function("diffusionblocks.settle"):
            values = torch.cat([p.figures for p in pending]).tolist()
        records, name, at = [], self.task.level_name, 0
        for p in pending:
            v, at = values[at:at + len(p.figures)], at + len(p.figures)
            record = {"step": p.step + 1, "block": p.block, "lr": p.lr, "loss": v[0], "grad_norm": v[1]}
            if len(v) == 5:
                record.update({f"{name}_min": v[2], f"{name}_median": v[3], f"{name}_max": v[4]})
            skipped = p.skipped if p.skipped is not None else not (math.isfinite(v[0]) and math.isfinite(v[1]))
            if skipped:
                record["skipped"] = True
                self.count_nonfinite(record)
            else:
                self.counters["consecutive_nonfinite"] = 0
            records.append(record)
        return records

    def compute_gradients(self, block: int, step: int, generator: torch.Generator):
        """Forward and backward of `block` on batch `step`: (mean loss, the noise levels drawn
        or None end to end, the parameters that got gradients)."""
        config = self.config
        with record_function("diffusionblocks.data"):
            batch = self.task.train_batch(step, config.batch_size, config.seed, generator)
            if self.parallel is not None:
                batch, generator = self.parallel.shard(batch, generator)
            batch = to_device(batch, self.device)
        self.plan.enter(block)
        # Batches are always full, so a block's memory is the same at every step: measure
        # its first step only and keep the hooks off the hot path afterwards.
        measured = self.counters["activation_bytes_by_block"]
        measure = str(block) not in measured
        saved = SavedActivations(self.model.parameters()) if measure else contextlib.nullcontext()
        # σ comes from the sampler, inside its block's range by construction: the ops need not
        # check its values again (on a GPU each check is a wait for the device).
        with saved, record_function("diffusionblocks.forward"), dx.values_trusted():
            loss, levels = self.forward_loss(block, batch, generator)
        # Backward even through a non-finite loss: its gradient is non-finite too (or the
        # loss is checked later), the step is skipped either way, and data-parallel replicas
        # all reach the gradient all-reduce.
        with record_function("diffusionblocks.backward"):
            loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.parallel is not None:
            self.parallel.average_gradients(block, params)
        if measure and params:
            measured[str(block)] = saved.bytes
            self.counters["grad_bytes"] = max(self.counters["grad_bytes"], tensor_bytes(p.grad for p in params))
        return loss, levels, params

    def forward_loss(self, block: int, batch, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean training loss of one batch for `block` and the noise levels drawn (None end to end)."""
        if self.config.mode == "e2e":
            return self.task.end_to_end_loss(batch, generator).mean(), None
        loss, levels = self.task.block_loss(batch, block, self.plan, generator)
        return loss.mean(), levels

    def apply_update(self, block: int, lr: float, found_inf: torch.Tensor | None = None) -> None:
        """AdamW steps of the block's layers and of the shared modules it used (fused AdamW:
        none where found_inf is 1)."""
        for key in (shared_optimizer_key(block, self.shared_copies is not None), f"block{block}"):
            optimizer = self.optimizers[key]
            set_learning_rate(optimizer, lr)
            skip_where(optimizer, found_inf)
            optimizer.step()
            skip_where(optimizer, None)
        if self.offload is not None:
            self.offload.after_step(block)

    def count_nonfinite(self, record: dict) -> None:
        """A step skipped for a non-finite loss or gradient; too many in a row end the run."""
        self.counters["nonfinite_steps"] += 1
        self.counters["consecutive_nonfinite"] += 1
        if self.counters["consecutive_nonfinite"] >= self.config.max_nonfinite_steps:
            name = self.task.level_name
            where = f"block {record['block']}" if f"{name}_min" not in record else \
                f"block {record['block']}, {name} in [{record[name + '_min']:.4g}, {record[name + '_max']:.4g}]"
            raise TrainingError(f"step {record['step']}: {self.counters['consecutive_nonfinite']} consecutive "
                                f"non-finite losses or gradients (last: {where}); lower lr or check the data")

    # --- evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The task's test metrics (test_*) of the model as it is, in eval mode."""
        self.model.eval()
        try:
            return self.task.evaluate(self.plan, self.config.mode)
        finally:
            self.model.train()

    # --- checkpoints ---------------------------------------------------------------------
    def save(self):
        state = {"step": self.step, "counters": self.counters, "torch_rng": torch.get_rng_state(),
                 "optimizers": {key: opt.state_dict() for key, opt in self.optimizers.items()}}
        if self.shared_copies is not None:
            state["shared_copies"] = self.shared_copies.state_dict()
        checkpoint.save(self.out_dir, self.model.state_dict(), state, to_dict(self.config))
        if self.offload is not None:
            self.offload.release()  # saving read every block back in

    def resume(self):
        """Continue from the newest intact checkpoint; refuse one whose model differs."""
        saved = checkpoint.load(self.out_dir)
        checkpoint.refuse_structure_change(saved, to_dict(self.config), self.model.state_dict())
        self.model.load_state_dict(saved.weights)
        for key, opt in self.optimizers.items():
            opt.load_state_dict(saved.state["optimizers"][key])
        torch.set_rng_state(saved.state["torch_rng"])
        if self.shared_copies is not None:
            self.shared_copies.load_state_dict(saved.state["shared_copies"])
        self.step, self.counters = saved.state["step"], saved.state["counters"]
        if self.offload is not None:
            self.offload.adopt_all()

    # --- the run -----------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict | None:
        """Trains to the end (or until `stop_after` steps, then checkpoints and returns None,
        as an interruption would); returns the report."""
        config, out = self.config, self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        if self.parallel is not None:
            self.parallel.start_counting(self.counters)
        log = None
        if self.is_main:
            # On resume too: fields a resume may change (e.g. steps) are the run's config from now on.
            (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
            log = MetricsLog(out / "metrics.jsonl", resume_step=self.step if resume else None)
        end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
        bar = tqdm(total=config.total_steps, initial=self.step, disable=not (config.progress and self.is_main),
                   desc=f"{config.mode} B={self.plan.num_blocks}", dynamic_ncols=True)
        try:
            with deferred_signals(self._on_signal):
                self._loop(log, bar, end)
                if self.step < config.total_steps or not self.is_main:
                    return None
                return self.finish(log)
        finally:
            bar.close()
            if log is not None:
                log.close()

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    def _loop(self, log: MetricsLog | None, bar, end: int) -> None:
        """Steps until `end`, writing the log and a checkpoint every checkpoint_every steps;
        raises Interrupted after the checkpoint that follows a signal."""
        config, parallel = self.config, self.parallel
        records = []  # written at each checkpoint (block-parallel: gathered from every rank first)
        pending = []  # steps whose figures the host has not read yet (read every log_every steps)
        shared = [p for _, p in shared_parameters(self.model)]  # the same Parameter objects all run long
        started = time.perf_counter()
        while self.step < end:
            step = self.start_step(self.step)
            self.step += 1
            bar.update(1)
            if parallel is not None:
                self.stop_signal = parallel.after_step(self.step, shared, self.stop_signal)
            if step is not None:
                pending.append(step)
            evaluate = config.eval_every and parallel is None and self.step % config.eval_every == 0 \
                and self.step < config.total_steps
            checkpoint = self.step % config.checkpoint_every == 0 or self.step == end or self.stop_signal
            if pending and (self.step % config.settle_every == 0 or evaluate or checkpoint):
                records += self.settle(pending)
                pending = []
                bar.set_postfix(loss=f"{records[-1]['loss']:.3g}", block=records[-1]["block"], refresh=False)
            if evaluate:
                records.append({"step": self.step, "eval": self.evaluate()})
            if checkpoint:
                if parallel is not None:
                    records = parallel.gather(records, self.counters, self.model, self.plan, self.optimizers,
                                              self.shared_copies) or []
                self.counters["wall_s"] += time.perf_counter() - started
                started = time.perf_counter()
                if self.is_main:
                    for r in records:
                        log.write(r)
                    self.save()
                    log.flush()
                records = []
                if parallel is not None:
                    parallel.barrier()
            if self.stop_signal:
                raise Interrupted(self.stop_signal, self.step)

    def finish(self, log: MetricsLog) -> dict:
        """Final evaluation, plot and report.json."""
        started = time.perf_counter()
        self.counters["inference_layer_evals"] = 0  # report the layer calls of one evaluation
        metrics = self.evaluate()
        inference_layer_evals = self.counters["inference_layer_evals"]
        self.model.eval()
        metrics.update(self.task.finish(self.plan, self.config.mode, self.out_dir))
        self.model.train()
        self.counters["inference_layer_evals"] = inference_layer_evals
        self.counters["wall_s"] += time.perf_counter() - started
        log.write({"step": self.step, "eval": metrics})
        log.flush()
        plot_loss_by_block(self.out_dir / "metrics.jsonl", self.out_dir / "loss_by_block.png",
                           self.plan.num_blocks, self.config.mode == "e2e")
        report = self.report(metrics)
        (self.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    def report(self, metrics: dict) -> dict:
        config, counters = self.config, self.counters
        activations = counters["activation_bytes_by_block"]
        parameters = list(self.model.parameters())
        return {
            "preset": config.preset, "task": config.task, "mode": config.mode, "blocks": self.plan.num_blocks,
            "partition": config.partition if config.mode == "blocks" else None,
            "gamma": config.gamma if config.mode == "blocks" else None,
            "block_schedule": config.block_schedule, "seed": config.seed,
            "steps": self.step, "e2e_steps": config.e2e_steps, "batch_size": config.batch_size,
            "metrics": metrics,
            "layer_evals": counters["train_layer_evals"],
            "inference_layer_evals": counters["inference_layer_evals"],
            "wall_s": round(counters["wall_s"], 3),
            "memory": {
                "activation_bytes_per_step": max(activations.values()),
                "activation_bytes_by_block": activations,
                "param_bytes": tensor_bytes(parameters),
                "grad_bytes": counters["grad_bytes"],
                "optimizer_bytes": sum(optimizer_state_bytes(opt) for opt in self.optimizers.values()),
            },
            "device": str(self.device),
            "backend": dx.backend(parameters[0]),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
