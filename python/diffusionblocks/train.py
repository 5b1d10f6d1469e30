"""The training loop (SPEC §4), block-wise or end-to-end, read top to bottom:

    every step: pick block b -> batch -> the task's loss of block b: σ per example from
    b's range, z = y + σ·ε (op), only b's layers, λ(σ)-weighted loss (op) -> backward ->
    clip 1.0 -> AdamW step (only b and the shared modules have gradients)

End to end (--mode e2e) the same model runs all its layers with the task's ordinary
objective. The task (task.py, registered in tasks.py) supplies data, losses and metrics.
Every random draw of step s comes from a generator seeded by (seed, s), so a run is a
pure function of its config and a resumed run repeats the uninterrupted one bit for bit.
"""

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as checkpoint_layer
from tqdm import tqdm

import diffusionblocks_ext as dx

from .systems import checkpoint
from .config import TrainConfig, to_dict, validate
from .errors import ConfigError
from .systems.logs import MetricsLog, plot_loss_by_block
from .systems.memory import SavedActivations, optimizer_state_bytes, tensor_bytes
from .systems.offload import DiskOffload, HostOffload
from .systems.parallel import BlockParallel
from .systems.shared import SharedCopies
from .task import shared_parameters, to_device
from .tasks import TASKS

OFFLOAD_DIR = "offload"  # in the run directory: the blocks' memory-mapped files
SUMMED_COUNTERS = ("train_layer_evals", "nonfinite_steps")  # block-parallel ranks' counts add up
SIGNAL_POLL = 10  # block-parallel: steps between the ranks' agreement on a pending SIGINT/SIGTERM


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig,
                    no_decay_names: set[str]) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), not on biases, norms or the
    parameters the task names (e.g. positions)."""
    decays = {n: p.dim() >= 2 and n not in no_decay_names for n, p in named_params}
    groups = [{"params": [p for n, p in named_params if decays[n]], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named_params if not decays[n]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


def block_optimizers(model: torch.nn.Module, plan, config: TrainConfig,
                     no_decay_names: set[str]) -> dict[str, torch.optim.AdamW]:
    """One optimizer per block (its layers) and one for the shared modules ("shared", or
    "shared<b>" per block when each block has its own copy of them), so a block's optimizer
    state can live wherever its weights live. AdamW keeps per-parameter state, so this
    steps exactly as one optimizer over all parameters would."""
    optimizers = {}
    for block in range(plan.num_blocks):
        named = [(f"layers.{i}.{n}", p) for i in plan.layer_range(block) for n, p in model.layers[i].named_parameters()]
        optimizers[f"block{block}"] = build_optimizer(named, config, no_decay_names)
    keys = [f"shared{b}" for b in range(plan.num_blocks)] if config.shared == "per-block" else ["shared"]
    for key in keys:
        optimizers[key] = build_optimizer(shared_parameters(model), config, no_decay_names)
    return optimizers


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def refuse_structure_change(saved: checkpoint.Checkpoint, config: TrainConfig, model: torch.nn.Module):
    """A checkpoint restores only into the model and the blocks it was trained as."""
    before, now = _flatten(saved.config), _flatten(json.loads(json.dumps(to_dict(config))))  # as saved: tuples are lists
    structural = [k for k in ("task", "mode", "blocks", "split", "shared") if before.get(k) != now.get(k)]
    shapes = {name: tuple(t.shape) for name, t in saved.weights.items()}
    if shapes != {name: tuple(t.shape) for name, t in model.state_dict().items()}:
        structural += [k for k in now if k.startswith("model.") and before.get(k) != now.get(k)] or ["model"]
    if structural:
        changes = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in structural)
        raise ConfigError(f"resume: the checkpoint in {saved.folder} was trained with another model "
                          f"or partition; changed: {changes}")


def recompute_in_backward(layers: torch.nn.ModuleList) -> None:
    """Activation checkpointing: each layer keeps only its input for backward and runs
    again there (non-reentrant). Module hooks still fire once per call."""
    for layer in layers:
        forward = layer.forward
        layer.forward = lambda *args, forward=forward: checkpoint_layer(forward, *args, use_reentrant=False)


def training_device(config: TrainConfig, parallel: BlockParallel | None) -> torch.device:
    """The device named by config.device; "cuda" without an index is the current GPU, or
    under torchrun the GPU of the process's local rank."""
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


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. the loss stays non-finite); the message says where."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved a checkpoint at `step` and stopped."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


@contextlib.contextmanager
def stop_on_signals(trainer: "Trainer"):
    """While training, SIGINT/SIGTERM only set a flag: the loop finishes its step, writes a
    checkpoint and raises Interrupted, so a kill never loses more than one step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    def handler(signum, frame):
        trainer.stop_signal = signum
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, config: TrainConfig, out_dir=None):
        self.config = validate(config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if config.threads:
            torch.set_num_threads(config.threads)
        self.parallel = BlockParallel(config.num_blocks, config) if config.parallel == "blocks" else None
        self.device = training_device(config, self.parallel)
        torch.manual_seed(config.seed)  # the initial weights: drawn on the CPU, the same on any device
        self.task = TASKS[config.task](config.model)
        self.model = self.task.model
        self.plan = config.partition_plan()
        host_offload = config.offload == "cpu" and config.mode == "blocks"
        place_model(self.model, self.device, layers_too=not host_offload)
        self.optimizers = block_optimizers(self.model, self.plan, config, self.task.no_weight_decay())
        self.shared_copies = None
        if config.shared == "per-block":
            self.shared_copies = SharedCopies(shared_parameters(self.model), self.plan.num_blocks)
            self.plan.listeners.append(self.shared_copies.activate)
        self.is_main = self.parallel is None or self.parallel.rank == 0  # writes logs, checkpoints, report
        self._synced = dict.fromkeys(SUMMED_COUNTERS, 0)  # counters at the last gather (parallel.py)
        self.offload = None
        if config.offload == "disk" and config.mode == "blocks":
            rank = "" if self.parallel is None else f"-rank{self.parallel.rank}"
            folder = (self.out_dir or Path(tempfile.mkdtemp(prefix="diffusionblocks-"))) / (OFFLOAD_DIR + rank)
            self.offload = DiskOffload(self.model, self.plan, self.optimizers, folder)
        elif host_offload:
            self.offload = HostOffload(self.model, self.plan, self.optimizers, self.device, self.shared_copies)
        if config.activation_checkpointing:
            recompute_in_backward(self.model.layers)
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

    # --- the schedule of one run ---------------------------------------------------------
    def step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.config.seed << 32) + step)

    def _segment(self, step: int) -> tuple[int, int, int]:
        """(block, first step, end step) of the sequential schedule's segment holding `step`."""
        total, blocks = self.config.total_steps, self.plan.num_blocks
        for block in range(blocks):
            start, end = block * total // blocks, (block + 1) * total // blocks
            if step < end:
                return block, start, end
        return blocks - 1, (blocks - 1) * total // blocks, total

    def choose_block(self, step: int, generator: torch.Generator) -> int:
        """Block of `step`; it changes only every steps_per_swap steps (the segment's first
        step decides). The random schedule draws on every step so the rest of a step's
        draws do not depend on K."""
        blocks, swap = self.plan.num_blocks, self.config.steps_per_swap
        if self.config.block_schedule == "round-robin":
            return step // swap % blocks
        if self.config.block_schedule == "sequential":
            return self._segment(step)[0]
        drawn = int(torch.randint(0, blocks, (), generator=generator))
        if step % swap:
            return int(torch.randint(0, blocks, (), generator=self.step_generator(step - step % swap)))
        return drawn

    def lr_at(self, step: int) -> float:
        """Linear warm-up then cosine decay to 0. The sequential schedule trains one block
        after another, so each block gets its own warm-up and decay."""
        start, end, warmup = 0, self.config.total_steps, self.config.warmup_steps
        if self.config.block_schedule == "sequential" and self.plan.num_blocks > 1:
            _, start, end = self._segment(step)
            warmup = self.config.warmup_e2e_steps
        local, length = step - start, end - start
        if local < warmup:
            return self.config.lr * (local + 1) / warmup
        progress = (local - warmup) / max(1, length - warmup)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    # --- one step ----------------------------------------------------------------------
    def forward_loss(self, block: int, batch, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean training loss of one batch for `block` and the noise levels drawn (None end to end)."""
        if self.config.mode == "e2e":
            return self.task.end_to_end_loss(batch, generator).mean(), None
        loss, levels = self.task.block_loss(batch, block, self.plan, generator)
        return loss.mean(), levels

    def train_step(self, step: int) -> dict | None:
        """Step `step` of the run: its block, batch and noise all come from its own generator.
        None when block-parallel and another process owns the block."""
        generator = self.step_generator(step)
        block = self.choose_block(step, generator)
        if self.parallel is not None and not self.parallel.owns(block):
            return None
        return self.block_step(block, step, generator)

    def block_step(self, block: int, step: int, generator: torch.Generator) -> dict:
        """One optimizer step that runs and updates only `block` (and the shared modules)."""
        config = self.config
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
        with saved:
            loss, levels = self.forward_loss(block, batch, generator)
        # Backward even through a non-finite loss: its gradient is non-finite too (or the
        # loss is checked below), the step is skipped either way, and data-parallel replicas
        # all reach the gradient all-reduce.
        loss.backward()
        with_grad = [p for p in self.model.parameters() if p.grad is not None]
        if self.parallel is not None:
            self.parallel.average_gradients(block, with_grad)
        if measure and with_grad:
            measured[str(block)] = saved.bytes
            self.counters["grad_bytes"] = max(self.counters["grad_bytes"], tensor_bytes(p.grad for p in with_grad))
        grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, config.grad_clip) if with_grad else \
            torch.tensor(float("nan"))
        # Everything the host needs from this step in one transfer: each .item() would wait
        # for the GPU on its own. float64 holds the float32 values exactly.
        figures = [loss.detach(), grad_norm] + ([] if levels is None else [levels.min(), levels.median(), levels.max()])
        values = torch.stack([f.to(loss.device, torch.float64) for f in figures]).tolist()
        lr = self.lr_at(step)
        record = {"step": step + 1, "block": block, "lr": lr, "loss": values[0], "grad_norm": values[1]}
        if math.isfinite(values[0]) and math.isfinite(values[1]):  # a finite loss can still overflow the gradient
            self.counters["consecutive_nonfinite"] = 0
            for key in (self.shared_optimizer(block), f"block{block}"):
                for group in self.optimizers[key].param_groups:
                    group["lr"] = lr
                self.optimizers[key].step()
            if self.offload is not None:
                self.offload.after_step(block)
        else:
            self.skip_nonfinite(step, block, levels)
            record["skipped"] = True
        for p in with_grad:
            p.grad = None  # None, not 0: AdamW then skips parameters this step did not use
        if levels is not None:
            name = self.task.level_name
            record.update({f"{name}_min": values[2], f"{name}_median": values[3], f"{name}_max": values[4]})
        return record

    def shared_optimizer(self, block: int) -> str:
        return f"shared{block}" if self.shared_copies is not None else "shared"

    def skip_nonfinite(self, step: int, block: int, levels: torch.Tensor | None):
        """A non-finite loss or gradient: no update; too many in a row end the run."""
        self.counters["nonfinite_steps"] += 1
        self.counters["consecutive_nonfinite"] += 1
        if self.counters["consecutive_nonfinite"] >= self.config.max_nonfinite_steps:
            where = f"block {block}" if levels is None else \
                f"block {block}, {self.task.level_name} in [{levels.min().item():.4g}, {levels.max().item():.4g}]"
            raise TrainingError(f"step {step + 1}: {self.counters['consecutive_nonfinite']} consecutive "
                                f"non-finite losses or gradients (last: {where}); lower lr or check the data")

    # --- evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.model.eval()
        try:
            return self.task.evaluate(self.plan, self.config.mode)
        finally:
            self.model.train()

    # --- the run -----------------------------------------------------------------------
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
        refuse_structure_change(saved, self.config, self.model)
        self.model.load_state_dict(saved.weights)
        for key, opt in self.optimizers.items():
            opt.load_state_dict(saved.state["optimizers"][key])
        torch.set_rng_state(saved.state["torch_rng"])
        if self.shared_copies is not None:
            self.shared_copies.load_state_dict(saved.state["shared_copies"])
        self.step, self.counters = saved.state["step"], saved.state["counters"]
        if self.offload is not None:
            self.offload.adopt_all()
        self._synced = {key: self.counters[key] for key in SUMMED_COUNTERS}

    # --- block-parallel bookkeeping (parallel.py) ---------------------------------------
    def take_counter_increments(self) -> dict:
        """This rank's counts since the last gather; they leave this rank (rank 0 adds them up)."""
        increments = {key: self.counters[key] - self._synced[key] for key in SUMMED_COUNTERS}
        self.counters.update(self._synced)
        increments.update(activation_bytes_by_block=dict(self.counters["activation_bytes_by_block"]),
                          grad_bytes=self.counters["grad_bytes"])
        return increments

    def merge_counters(self, parts: list[dict]) -> None:
        """On rank 0: every rank's increments since the last gather, its own included."""
        for key in SUMMED_COUNTERS:
            self.counters[key] = self._synced[key] + sum(part[key] for part in parts)
        for part in parts:
            self.counters["activation_bytes_by_block"].update(part["activation_bytes_by_block"])
            self.counters["grad_bytes"] = max(self.counters["grad_bytes"], part["grad_bytes"])
        self._synced = {key: self.counters[key] for key in SUMMED_COUNTERS}

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict | None:
        """Trains to the end (or until `stop_after` steps, then checkpoints and returns None,
        as an interruption would); returns the report."""
        config, out = self.config, self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        log = None
        if self.is_main:
            # On resume too: fields a resume may change (e.g. steps) are the run's config from now on.
            (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
            log = MetricsLog(out / "metrics.jsonl", resume_step=self.step if resume else None)
        end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
        bar = tqdm(total=config.total_steps, initial=self.step, disable=not (config.progress and self.is_main),
                   desc=f"{config.mode} B={self.plan.num_blocks}", dynamic_ncols=True)
        started = time.perf_counter()
        with stop_on_signals(self):
            return self._loop(log, bar, end, started)

    def _loop(self, log: MetricsLog | None, bar, end: int, started: float) -> dict | None:
        config, parallel = self.config, self.parallel
        records = []  # written at each checkpoint (block-parallel: gathered from every rank first)
        try:
            while self.step < end:
                record = self.train_step(self.step)
                self.step += 1
                bar.update(1)
                if parallel is not None:
                    parallel.maybe_sync_shared(self.step, [p for _, p in shared_parameters(self.model)])
                    if self.step % SIGNAL_POLL == 0:
                        self.stop_signal = parallel.agree_on_stop(self.stop_signal)
                if record is not None:
                    records.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.3g}", block=record["block"], refresh=False)
                if config.eval_every and parallel is None and self.step % config.eval_every == 0 \
                        and self.step < config.total_steps:
                    records.append({"step": self.step, "eval": self.evaluate()})
                if self.step % config.checkpoint_every == 0 or self.step == end or self.stop_signal:
                    if parallel is not None:
                        records = parallel.gather(self, records) or []
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
            if self.step < config.total_steps or not self.is_main:
                return None
            return self.finish(log)
        finally:
            bar.close()
            if log is not None:
                log.close()

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


def train(config: TrainConfig, out_dir, resume: bool = False, stop_after: int | None = None) -> dict | None:
    return Trainer(config, out_dir).run(resume=resume, stop_after=stop_after)
