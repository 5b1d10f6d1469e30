"""Block-parallel training on torch.distributed: blocks never exchange
gradients, so they can train on different processes with no communication at all.

    torchrun --nproc-per-node P -m diffusionblocks train PRESET --parallel blocks --set shared=per-block

Every rank walks the same sequence of steps (the block of each step comes from the step's
own generator, steps.py) and runs only the steps of the blocks it owns:
- P <= B: rank r owns blocks {b : b mod P = r}.
- P > B (P a multiple of B): the ranks {r : r mod B = b} are data-parallel replicas of
  block b; each takes its share of the step's batch and their gradients are averaged
  within the block's group: one all_reduce of the flattened gradients per step, what
  DDP's bucketed reducer does. DDP itself would need every block's forward to go
  through one wrapped module; a block here is a slice of the model's layers plus the
  shared modules, driven by the task.
Shared modules: with `shared=per-block` each block has its own copy and no rank ever
talks to another while training (the result equals the serial per-block run bit for bit
on CPU); with `shared=global` every rank trains its own copy of the one set and the
copies are averaged across all ranks every `shared_sync_every` steps.
At each checkpoint rank 0 gathers every block's weights, optimizer state, counters and
log records into one ordinary checkpoint, which `--resume` (on every rank), `eval` and
`sample` use like any other. gloo on CPU; NCCL with device=cuda, each process on the GPU
of its local rank (devices.py), everything it sends to rank 0 moved to the CPU first.
The bookkeeping lives here: counters that add up over ranks, the ranks' agreement on a
signal, and the gather; the training loop calls after_step and gather, nothing else."""

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import ConfigError

SUMMED_COUNTERS = ("train_layer_evals", "nonfinite_steps")  # each rank counts its own steps; they add up
SIGNAL_POLL = 10  # steps between the ranks' agreement on a pending SIGINT/SIGTERM


def _on_cpu(value):
    """Tensors inside nested dicts/lists moved to the CPU: what gather_object pickles must
    not name another process's GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _average(tensors: list[torch.Tensor], count: int, group) -> None:
    """In place: the mean over the group's ranks, in one all_reduce of one flat buffer (as
    DDP buckets its gradients) rather than one collective per tensor."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    flat /= count
    for tensor, mean in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(mean)


class BlockParallel:
    def __init__(self, num_blocks: int, config):
        if config.shared == "global" and config.shared_sync_every < 1:
            raise ConfigError("shared_sync_every: block-parallel training with shared=global needs the "
                              "shared modules averaged every K >= 1 steps (or use shared=per-block)")
        self.on_gpu = config.on_gpu
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.on_gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world > num_blocks and self.world % num_blocks:
            raise ConfigError(f"parallel: {self.world} processes cannot split evenly over B={num_blocks} "
                              "blocks; use at most B processes or a multiple of B")
        self.num_blocks, self.sync_every = num_blocks, config.shared_sync_every
        self.synced = dict.fromkeys(SUMMED_COUNTERS, 0)  # counters every rank agreed on (start_counting)
        self.shared_global = config.shared == "global"
        self.replicas = max(1, self.world // num_blocks)
        self.replica = self.rank // num_blocks if self.world > num_blocks else 0
        # One process group per block: its replicas (every rank must create every group).
        self.groups = [dist.new_group([r for r in range(self.world) if self.owner_rank(r, b)])
                       for b in range(num_blocks)]

    def owner_rank(self, rank: int, block: int) -> bool:
        return (rank % self.num_blocks == block) if self.world > self.num_blocks else (block % self.world == rank)

    def owns(self, block: int) -> bool:
        return self.owner_rank(self.rank, block)

    def leads(self, block: int) -> bool:
        """The replica whose copy of the block goes into checkpoints."""
        return self.owns(block) and self.replica == 0

    def shard(self, batch, generator: torch.Generator):
        """This replica's rows of every tensor in the batch, and a generator of its own for
        the noise it draws next (replicas must not draw the same σ's and ε's)."""
        if self.replicas == 1:
            return batch, generator
        take = lambda t: t[self.replica::self.replicas] if isinstance(t, torch.Tensor) else t
        batch = tuple(take(t) for t in batch) if isinstance(batch, (tuple, list)) else take(batch)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return batch, torch.Generator().manual_seed(seed + self.replica)

    def average_gradients(self, block: int, params: list[torch.nn.Parameter]) -> None:
        if self.replicas > 1:
            _average([p.grad for p in params], self.replicas, self.groups[block])

    def maybe_sync_shared(self, step: int, shared: list[torch.nn.Parameter]) -> None:
        """Average the global shared modules over all ranks every K steps."""
        if self.shared_global and step % self.sync_every == 0:
            _average([p.data for p in shared], self.world, None)

    def after_step(self, step: int, shared: list[torch.nn.Parameter], signum: int | None) -> int | None:
        """After every step (`step` steps done): the shared modules' sync when due, and every
        SIGNAL_POLL steps the ranks' agreement on a signal; returns the signal to act on."""
        self.maybe_sync_shared(step, shared)
        return self.agree_on_stop(signum) if step % SIGNAL_POLL == 0 else signum

    def start_counting(self, counters: dict) -> None:
        """The run's counters as they stand (0, or as resumed): what every rank has agreed on."""
        self.synced = {key: counters[key] for key in SUMMED_COUNTERS}

    def _take_increments(self, counters: dict) -> dict:
        """This rank's counts since the last gather; they leave this rank (rank 0 adds them up)."""
        increments = {key: counters[key] - self.synced[key] for key in SUMMED_COUNTERS}
        counters.update(self.synced)
        if self.replica:  # the leader speaks for its group: same steps, each call on a share of the batch
            increments.update(dict.fromkeys(SUMMED_COUNTERS, 0))
        increments.update(activation_bytes_by_block=dict(counters["activation_bytes_by_block"]),
                          grad_bytes=counters["grad_bytes"])
        return increments

    def _merge(self, counters: dict, parts: list[dict]) -> None:
        """On rank 0: every rank's increments since the last gather, its own included."""
        for key in SUMMED_COUNTERS:
            counters[key] = self.synced[key] + sum(part[key] for part in parts)
        for part in parts:
            counters["activation_bytes_by_block"].update(part["activation_bytes_by_block"])
            counters["grad_bytes"] = max(counters["grad_bytes"], part["grad_bytes"])
        self.synced = {key: counters[key] for key in SUMMED_COUNTERS}

    def gather(self, records: list[dict], counters: dict, model, plan, optimizers: dict,
               shared_copies) -> list[dict] | None:
        """Rank 0 receives every rank's blocks (their layers in model.layers), optimizer states,
        per-block shared copies, counter increments and log records, and merges them into its
        own model, optimizers and counters; returns the merged records on rank 0, None elsewhere."""
        increments = self._take_increments(counters)
        if self.replica:
            records = []
        mine = {"records": records, "blocks": {}, "optimizers": {}, "shared_copies": {}, "counters": increments}
        for block in range(self.num_blocks):
            if not self.leads(block):
                continue
            mine["blocks"][block] = {name: p.detach() for i in plan.layers(block)
                                     for name, p in model.layers[i].named_parameters(prefix=f"{i}")}
            keys = [f"block{block}"] + ([] if shared_copies is None else [f"shared{block}"])
            mine["optimizers"].update({key: optimizers[key].state_dict() for key in keys})
            if shared_copies is not None:
                mine["shared_copies"][block] = dict(shared_copies.copies[block])
        received = [None] * self.world if self.rank == 0 else None
        # No copies above: gather_object pickles every rank's object, rank 0's own included.
        dist.gather_object(_on_cpu(mine), received, dst=0)
        if self.rank != 0:
            return None
        merged = []
        self._merge(counters, [part["counters"] for part in received])
        layers = dict(model.layers.named_parameters())
        for part in received:
            merged += part["records"]
            for tensors in part["blocks"].values():
                for name, value in tensors.items():
                    layers[name].data.copy_(value)
            for key, state in part["optimizers"].items():
                optimizers[key].load_state_dict(state)
            for block, copy in part["shared_copies"].items():
                for name, value in copy.items():
                    shared_copies.copies[block][name].copy_(value)
        return sorted(merged, key=lambda r: r["step"])

    def agree_on_stop(self, signum: int | None) -> int | None:
        """A signal that reached any rank stops all of them at the same step."""
        flag = torch.tensor([signum or 0], device=torch.cuda.current_device() if self.on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def barrier(self) -> None:
        dist.barrier()
