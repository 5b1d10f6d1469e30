"""What step s of a run is, as pure functions of (config, step), like nanoGPT's get_lr(it):
its random generator, the block it trains and its learning rate. A resumed run calls
them with the same arguments and so repeats the uninterrupted run bit for bit."""

import math

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """Every random draw of step `step` (block, batch, σ, noise, masks) comes from here."""
    return torch.Generator().manual_seed((seed << 32) + step)


def seed_global_rng(seed: int, step: int) -> None:
    """Seeds torch's global generators (CPU and every GPU) for step `step`: what dropout
    draws from. The task's own draws come from step_generator; this seed is derived
    without drawing from it, so models without dropout are unaffected."""
    torch.manual_seed(((seed << 32) + step) ^ 0x5DEECE66D)


def sequential_segment(config, step: int) -> tuple[int, int, int]:
    """(block, first step, end step) of the segment holding `step` when blocks train one
    after another (block_schedule=sequential): the steps cut into B equal segments."""
    total, blocks = config.total_steps, config.num_blocks
    for block in range(blocks):
        start, end = block * total // blocks, (block + 1) * total // blocks
        if step < end:
            return block, start, end
    return blocks - 1, (blocks - 1) * total // blocks, total


def choose_block(config, step: int, generator: torch.Generator) -> int:
    """The block `step` trains. It changes only every steps_per_swap steps (the segment's
    first step decides). The random schedule draws from `generator` on every step, so the
    rest of a step's draws do not depend on steps_per_swap."""
    blocks, swap = config.num_blocks, config.steps_per_swap
    if config.block_schedule == "round-robin":
        return step // swap % blocks
    if config.block_schedule == "sequential":
        return sequential_segment(config, step)[0]
    drawn = int(torch.randint(0, blocks, (), generator=generator))
    if step % swap:
        first = step - step % swap
        return int(torch.randint(0, blocks, (), generator=step_generator(config.seed, first)))
    return drawn


def learning_rate(config, step: int) -> float:
    """Linear warm-up then cosine decay to 0. The sequential schedule trains one block after
    another, so each block gets its own warm-up and decay."""
    start, end, warmup = 0, config.total_steps, config.warmup_steps
    if config.block_schedule == "sequential" and config.num_blocks > 1:
        _, start, end = sequential_segment(config, step)
        warmup = config.warmup_e2e_steps
    return config.lr * warmup_cosine(step - start, end - start, warmup)


def warmup_cosine(step: int, length: int, warmup: int) -> float:
    """The factor of the peak learning rate at `step` of `length`: linear warm-up over
    `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, length - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))
