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
import time
from pathlib import Path

import torch
from tqdm import tqdm

import diffusionblocks_ext as dx

from . import checkpoint
from .config import TrainConfig, to_dict, validate
from .logs import MetricsLog, plot_loss_by_block
from .memory import SavedActivations, optimizer_state_bytes, tensor_bytes
from .tasks import TASKS


def build_optimizer(model: torch.nn.Module, config: TrainConfig, no_decay_names: set[str]) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), not on biases, norms or the
    parameters the task names (e.g. positions)."""
    decays = {n: p.dim() >= 2 and n not in no_decay_names for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


class Trainer:
    def __init__(self, config: TrainConfig, out_dir=None):
        self.config = validate(config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)  # the initial weights
        self.task = TASKS[config.task](config.model)
        self.model = self.task.model
        self.plan = config.partition_plan()
        self.optimizer = build_optimizer(self.model, config, self.task.no_weight_decay())
        self.step = 0
        # Counters that a checkpoint carries: layer forward calls (each over one batch),
        # seconds spent, and the measured memory.
        self.counters = {"train_layer_evals": 0, "inference_layer_evals": 0, "wall_s": 0.0,
                         "activation_bytes_by_block": {}, "grad_bytes": 0}
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
        blocks = self.plan.num_blocks
        if self.config.block_schedule == "round-robin":
            return step % blocks
        if self.config.block_schedule == "sequential":
            return self._segment(step)[0]
        return int(torch.randint(0, blocks, (), generator=generator))

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

    def train_step(self, step: int) -> dict:
        """Step `step` of the run: its block, batch and noise all come from its own generator."""
        generator = self.step_generator(step)
        return self.block_step(self.choose_block(step, generator), step, generator)

    def block_step(self, block: int, step: int, generator: torch.Generator) -> dict:
        """One optimizer step that runs and updates only `block` (and the shared modules)."""
        config = self.config
        batch = self.task.train_batch(step, config.batch_size, config.seed, generator)
        # Batches are always full, so a block's memory is the same at every step: measure
        # its first step only and keep the hooks off the hot path afterwards.
        measured = self.counters["activation_bytes_by_block"]
        measure = str(block) not in measured
        saved = SavedActivations(self.model.parameters()) if measure else contextlib.nullcontext()
        with saved:
            loss, levels = self.forward_loss(block, batch, generator)
        loss.backward()
        with_grad = [p for p in self.model.parameters() if p.grad is not None]
        if measure:
            measured[str(block)] = saved.bytes
            self.counters["grad_bytes"] = max(self.counters["grad_bytes"], tensor_bytes(p.grad for p in with_grad))
        grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, config.grad_clip)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # None, not 0: AdamW then skips inactive blocks
        record = {"step": step + 1, "block": block, "lr": lr, "loss": loss.item(), "grad_norm": grad_norm.item()}
        if levels is not None:
            name = self.task.level_name
            record.update({f"{name}_min": levels.min().item(), f"{name}_median": levels.median().item(),
                           f"{name}_max": levels.max().item()})
        return record

    # --- evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.model.eval()
        try:
            return self.task.evaluate(self.plan, self.config.mode)
        finally:
            self.model.train()

    # --- the run -----------------------------------------------------------------------
    def save(self):
        checkpoint.save(self.out_dir, self.model, self.optimizer, self.step, self.counters)

    def resume(self):
        state = checkpoint.load(self.out_dir, self.model, self.optimizer)
        self.step, self.counters = state["step"], state["counters"]

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict | None:
        """Trains to the end (or until `stop_after` steps, then checkpoints and returns None,
        as an interruption would); returns the report."""
        config, out = self.config, self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        log = MetricsLog(out / "metrics.jsonl", resume_step=self.step if resume else None)
        end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
        bar = tqdm(total=config.total_steps, initial=self.step, disable=not config.progress,
                   desc=f"{config.mode} B={self.plan.num_blocks}", dynamic_ncols=True)
        started = time.perf_counter()
        try:  # an interruption (Ctrl-C) leaves the last checkpoint as the place to resume from
            while self.step < end:
                record = self.train_step(self.step)
                self.step += 1
                log.write(record)
                bar.update(1)
                if self.step % 10 == 0:
                    bar.set_postfix(loss=f"{record['loss']:.3g}", block=record["block"])
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.total_steps:
                    log.write({"step": self.step, "eval": self.evaluate()})
                if self.step % config.checkpoint_every == 0 or self.step == end:
                    self.counters["wall_s"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save()
                    log.flush()
            if self.step < config.total_steps:
                return None
            return self.finish(log)
        finally:
            bar.close()
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
                "optimizer_bytes": optimizer_state_bytes(self.optimizer),
            },
            "backend": dx.backend(parameters[0]),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }


def train(config: TrainConfig, out_dir, resume: bool = False, stop_after: int | None = None) -> dict | None:
    return Trainer(config, out_dir).run(resume=resume, stop_after=stop_after)
