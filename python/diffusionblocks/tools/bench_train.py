"""`diffusionblocks bench train PRESET`: where training time goes, end to end and per block.

Two trainers are built from the preset: end to end (mode e2e, the whole stack is block 0)
and block-wise (mode blocks, B = --blocks or the preset's). For each configuration (e2e,
then block 0 .. B-1) the tool runs `--warmup` untimed steps, then `--steps` timed ones, each
`trainer.block_step(b, step, steps.step_generator(seed, step))`: one optimizer step of
block b, its figures read back (the step index runs on across the configurations of a
trainer). Each step is timed on its own with time.perf_counter, between
torch.cuda.synchronize() calls on a GPU; the table gives seconds per step (median, p10,
p90, min, max), samples/s = batch / median, and on a GPU the peak of
torch.cuda.max_memory_allocated over the timed steps (reset before them). On the CPU no
peak is reported: ru_maxrss only ever grows within a process (`bench memory` measures the
CPU's peaks, one fresh process per configuration).

The headline, ratio to ideal = block median / (e2e median / B): 1 when a block step costs
exactly its share of an end-to-end step; above 1 is the per-step cost that does not shrink
with the block (data, shared modules, optimizer launches, host reads).

The breakdown comes from torch.profiler over `--profile-steps` further steps of each
configuration, after the timed ones, so the profiler's overhead touches no timing. Per
configuration, in ms per step and as a share of the profiled step's wall time: the
trainer's ranges diffusionblocks.data / .forward / .backward / .optimizer / .settle (CPU
time of the range, i.e. host wall time inside it; on a GPU also the device time of the
kernels whose launch falls inside it, from any thread), "our ops" (self time of the
diffusionblocks:: dispatcher ops, host and device) and "host waits" (host time only: the
union of the settle ranges and the cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy*,
aten::item and aten::_local_scalar_dense events within the trainer's steps, so nested waits
count once and the benchmark's own synchronize between steps not at all). Ranges nest (the for-loop AdamW path reads the figures inside .optimizer, so
that .settle is inside .optimizer too): shares need not add up to 1. A range the trainer
does not mark counts 0.

Paper presets (CIFAR, text8) read fixture data of the full shape (bench_presets.write_fixtures),
written into a temporary folder. Output: a markdown table on stdout and DIR/train.json.

    diffusionblocks bench train vit-digits --steps 50 --warmup 10 --out results/train-cpu
    diffusionblocks bench train vit-cifar100 --device cuda --precision bf16 --compile --out results/train-gpu
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .bench_presets import write_fixtures

FIXTURE_DATASETS = ("cifar10", "cifar100", "text8")  # the datasets write_fixtures stands in for
RANGES = ("data", "forward", "backward", "optimizer", "settle")  # diffusionblocks.<name>
STEP_RANGE = "bench_train.step"  # around each trainer step: what lies outside is the benchmark's own
WAIT_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")


def is_wait(name: str) -> bool:
    """An event in which the host waits for the device (or reads a value back)."""
    return name in WAIT_EVENTS or name.startswith("cudaMemcpy") or name == "diffusionblocks.settle"


def build_config(args, mode: str, data: dict[str, str]):
    """The preset's TrainConfig for `mode`, with the command line's changes."""
    from .. import config as C

    config = C.override(C.preset(args.preset), [item for group in args.set for item in group])
    config.mode, config.device, config.progress = mode, args.device, False
    if args.blocks:
        config.blocks = args.blocks
    if args.batch_size:
        config.batch_size = args.batch_size
    if getattr(config.model, "dataset", None) in data:
        config.model.data = data[config.model.dataset]
    for name, value in (("precision", args.precision), ("compile", args.compile or None)):
        if value is not None:
            if not hasattr(config, name):  # measuring without it would mislabel the numbers
                raise C.ConfigError(f"{name}: this version's TrainConfig has no {name} field")
            setattr(config, name, value)
    return C.validate(config)


def spread(times: list[float]) -> dict:
    """Seconds per step: median, p10, p90, min, max."""
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median": statistics.median(times), "p10": deciles[0], "p90": deciles[8],
            "min": min(times), "max": max(times)}


def covered_us(spans) -> float:
    """Length of the union of (start, end) spans: nested or overlapping time counts once."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def breakdown(events, steps: int, step_s: float, on_gpu: bool) -> dict:
    """Per part: ms per step and share of the profiled step (`step_s`, seconds); on a GPU also
    device_ms_per_step. `events`: torch.profiler's FunctionEvents (times in µs)."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type == DeviceType.CPU]  # not the GPU-side copies of ranges
    spans = lambda chosen: [(e.time_range.start, e.time_range.end) for e in chosen]
    parts = {name: [e for e in host if e.name == f"diffusionblocks.{name}"] for name in RANGES}
    ours = [e for e in host if e.name.startswith("diffusionblocks::")]
    # Waits inside the trainer's steps only (not the benchmark's own synchronize between steps),
    # by time rather than by the event tree: the CUDA runtime's events nest under torch's ops
    # (aten::item > aten::_local_scalar_dense > cudaMemcpyAsync), and the union counts them once.
    in_steps = spans(e for e in host if e.name == STEP_RANGE)
    waits = [(max(a, c), min(b, d)) for a, b in spans(e for e in host if is_wait(e.name)) for c, d in in_steps]
    cpu_us = {name: sum(e.cpu_time_total for e in chosen) for name, chosen in parts.items()}
    cpu_us["our_ops"] = sum(e.self_cpu_time_total for e in ours)
    cpu_us["host_waits"] = covered_us(waits)
    device_us = {}
    if on_gpu:  # a kernel belongs to the range its launch falls in (backward launches from another thread)
        launches = [(e.time_range.start, sum(k.duration for k in e.kernels)) for e in host if e.kernels]
        device_us = {name: sum(us for at, us in launches if any(a <= at < b for a, b in spans(chosen)))
                     for name, chosen in parts.items()}
        device_us["our_ops"] = sum(e.self_device_time_total for e in ours)
    result = {}
    for name, us in cpu_us.items():
        ms = us / 1e3 / steps
        result[name] = {"ms_per_step": ms, "share": ms / (step_s * 1e3)}
        if name in device_us:
            result[name]["device_ms_per_step"] = device_us[name] / 1e3 / steps
    return result


def measure(trainer, name: str, block: int, start: int, args) -> tuple[dict, int]:
    """Warm-up, timed and profiled steps of `block`: (its row, the next step index)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .. import steps

    on_gpu = trainer.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(trainer.device)) if on_gpu else (lambda: None)
    step = start

    def run(count: int) -> list[float]:  # seconds of each step
        nonlocal step
        times = []
        for _ in range(count):
            generator = steps.step_generator(trainer.config.seed, step)
            sync()
            begin = time.perf_counter()
            with record_function(STEP_RANGE):  # microseconds when no profiler listens
                trainer.block_step(block, step, generator)
            sync()
            times.append(time.perf_counter() - begin)
            step += 1
        return times

    run(args.warmup)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    times = run(args.steps)
    row = {"configuration": name, "mode": trainer.config.mode, "block": block, "steps": args.steps,
           "batch_size": trainer.config.batch_size, "step_s": spread(times),
           "samples_per_s": trainer.config.batch_size / statistics.median(times),
           "peak_bytes": torch.cuda.max_memory_allocated(trainer.device) if on_gpu else None}
    if args.profile_steps:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            profiled = run(args.profile_steps)
        row["breakdown"] = breakdown(prof.events(), args.profile_steps, sum(profiled) / len(profiled), on_gpu)
    return row, step


def measure_mode(args, mode: str, data: dict[str, str]) -> list[dict]:
    """The rows of one trainer: e2e (block 0), or every block."""
    import torch

    from ..train import Trainer

    trainer = Trainer(build_config(args, mode, data), None)
    on_gpu = trainer.device.type == "cuda"
    rows, step = [], 0
    for block in range(trainer.plan.num_blocks):
        row, step = measure(trainer, "e2e" if mode == "e2e" else f"block {block}", block, step, args)
        rows.append(row)
        print(f"{row['configuration']}: {row['step_s']['median'] * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
    del trainer
    if on_gpu:
        torch.cuda.empty_cache()  # the next trainer's peak is its own
    return rows


def table(rows: list[dict]) -> str:
    """Step times and the ratio to ideal; then the breakdown in ms per step (share)."""
    peak = lambda r: "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
    ratio = lambda r: "–" if r.get("ratio_to_ideal") is None else f"{r['ratio_to_ideal']:.2f}"
    lines = ["| configuration | ms/step median | p10 | p90 | min | max | samples/s | peak MiB | ratio to ideal |",
             "|---" * 9 + "|"]
    for r in rows:
        ms = {k: f"{v * 1e3:.2f}" for k, v in r["step_s"].items()}
        lines.append(f"| {r['configuration']} | {ms['median']} | {ms['p10']} | {ms['p90']} | {ms['min']} | "
                     f"{ms['max']} | {r['samples_per_s']:.0f} | {peak(r)} | {ratio(r)} |")
    if all("breakdown" in r for r in rows):
        parts = list(rows[0]["breakdown"])
        lines += ["", "| configuration | " + " | ".join(p.replace("_", " ") for p in parts) + " |",
                  "|---" * (len(parts) + 1) + "|"]
        for r in rows:
            cells = [f"{r['breakdown'][p]['ms_per_step']:.2f} ({r['breakdown'][p]['share']:.0%})" for p in parts]
            lines.append(f"| {r['configuration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionblocks bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: the preset's")
    parser.add_argument("--compile", action="store_true", help="torch.compile the residual layers")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--blocks", type=int, default=0, help="B of the block-wise run; 0: the preset's")
    parser.add_argument("--profile-steps", type=int, default=10, help="profiled steps per configuration; 0: none")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set model.layers=12 model.width=256")
    parser.add_argument("--out", default="results/train")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        parser.error("--steps must be at least 1, --warmup and --profile-steps at least 0")
    import torch

    from .. import config as C

    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print(f"bench train: --device {args.device}, but torch sees no GPU", file=sys.stderr)
        return 2
    try:  # both configurations checked before anything runs
        configs = [build_config(args, mode, {}) for mode in ("e2e", "blocks")]
        dataset = getattr(configs[0].model, "dataset", None)
    except C.ConfigError as error:
        print(f"bench train: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="diffusionblocks-fixtures-") as folder:
        data = write_fixtures(Path(folder), {dataset}) if dataset in FIXTURE_DATASETS else {}
        rows = measure_mode(args, "e2e", data) + measure_mode(args, "blocks", data)
    e2e, blocks = rows[0], rows[1:]
    ideal = e2e["step_s"]["median"] / len(blocks)  # a block's share of an end-to-end step
    for row in blocks:
        row["ratio_to_ideal"] = row["step_s"]["median"] / ideal
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": args.device,
               "device_name": torch.cuda.get_device_name(torch.device(args.device)) if on_gpu
               else platform.processor() or platform.machine()}
    report = {"machine": machine, "arguments": vars(args), "preset": args.preset, "blocks": len(blocks),
              "timing": "cuda-synchronized perf_counter per step" if on_gpu else "perf_counter per step",
              "peak": "torch.cuda.max_memory_allocated" if on_gpu else None,
              "breakdown_time": "host (CPU) time and device time of kernels" if on_gpu else "host (CPU) time",
              "rows": rows, "ratio_to_ideal": [r["ratio_to_ideal"] for r in blocks]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
