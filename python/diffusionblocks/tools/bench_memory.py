"""`diffusionblocks bench memory`: what one training step holds in memory, measured, for
end-to-end, end-to-end with activation checkpointing, block-wise, block-wise with offload
(and block-wise with offload and checkpointing), at several B.

Each configuration runs in a fresh subprocess, so the peak is its own. On the CPU it is
the process peak: ru_maxrss after the steps minus ru_maxrss once torch, the package, the
data and one step of the preset's tiny version have run; offload is `disk`. On a GPU
(--device cuda) it is torch.cuda.max_memory_allocated over the steps minus what was
allocated before the trainer was built (after the same warm-up); offload is `cpu`.
The breakdown comes from the trainer's own counters: parameters and optimizer state that
are resident (with offload, the shared modules and one block), gradients of one step, and
activations = bytes saved for backward (saved_tensors_hooks). Step time is the median
over the measured steps; every step changes block, so offload pays a swap each time.

    diffusionblocks bench memory --out results/memory        # L=12, width 256, B in 1,2,3,4,6
    diffusionblocks bench memory --device cuda --out results/memory-gpu
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    from .. import config as C, steps
    from ..systems.memory import optimizer_state_bytes, tensor_bytes
    from ..train import Trainer

    device = spec.get("device", "cpu")
    on_gpu = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    # The baseline: torch, the data and the runtime's lazily built pools (threads, kernels'
    # scratch, the CUDA context) in place, from one step of the preset's tiny version;
    # then the real run.
    tiny = spec["preset"] + "-tiny"
    if tiny in C.PRESETS:
        warm = C.preset(tiny)
        warm.progress, warm.threads, warm.device = False, spec["threads"], device
        with tempfile.TemporaryDirectory() as out:
            Trainer(warm, out).block_step(0, 0, torch.Generator().manual_seed(0))
        gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _peak_rss_bytes()
    config = C.override(C.preset(spec["preset"]), spec["overrides"])
    config.progress, config.threads, config.device = False, spec["threads"], device
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out)
        blocks = trainer.plan.num_blocks
        times = []
        for step in range(spec["steps_per_block"] * blocks):
            block = step % blocks  # every block in turn: the peak of the largest one counts
            sync()
            started = time.perf_counter()
            trainer.block_step(block, step, steps.step_generator(trainer.config.seed, step))
            sync()
            times.append(time.perf_counter() - started)
        peak = (torch.cuda.max_memory_allocated() if on_gpu else _peak_rss_bytes()) - baseline
        params = list(trainer.model.parameters())
        resident = params
        optimizers = list(trainer.optimizers.values())
        if trainer.offload is not None:  # shared modules + the largest block stay in memory
            on_block = [trainer.offload.resident_parameters(b) for b in range(blocks)]
            largest = max(range(blocks), key=lambda b: tensor_bytes(on_block[b]))
            offloaded = {id(p) for block_params in on_block for p in block_params}
            resident = [p for p in params if id(p) not in offloaded] + on_block[largest]
            optimizers = [trainer.optimizers["shared"], trainer.optimizers[f"block{largest}"]]
        counters = trainer.counters
        measured = times[blocks:] or times  # the first round allocates; time the rest
        return {
            "name": spec["name"], "blocks": blocks, "overrides": spec["overrides"],
            "param_bytes": tensor_bytes(resident),
            "param_bytes_total": tensor_bytes(params),
            "grad_bytes": counters["grad_bytes"],
            "optimizer_bytes": sum(optimizer_state_bytes(opt) for opt in optimizers),
            "activation_bytes": max(counters["activation_bytes_by_block"].values()),
            "peak_bytes": peak,
            "step_s": statistics.median(measured),
            "samples_per_s": config.batch_size / statistics.median(measured),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(trainer.device),
        }


def configurations(layers: int, width: int, heads: int, batch: int, blocks: list[int],
                   combined: int, offload: str = "disk") -> list[tuple[str, list]]:
    """(name, overrides) of every measured configuration; `offload` is disk on the CPU,
    cpu (host memory) on a GPU."""
    model = [f"model.layers={layers}", f"model.width={width}", f"model.heads={heads}", f"batch_size={batch}"]
    runs = [("end-to-end", model + ["mode=e2e"]),
            ("end-to-end + checkpointing", model + ["mode=e2e", "activation_checkpointing=true"])]
    for b in blocks:
        runs.append((f"blocks B={b}", model + [f"blocks={b}"]))
        runs.append((f"blocks B={b} + offload", model + [f"blocks={b}", f"offload={offload}"]))
    runs.append((f"blocks B={combined} + offload + checkpointing",
                 model + [f"blocks={combined}", f"offload={offload}", "activation_checkpointing=true"]))
    return runs


# glibc raises its mmap threshold as large blocks are freed, after which freed activations
# stay in the heap and the process peak reports fragmentation rather than what is live
# (measured: +190 MiB after one block step). A fixed threshold returns them; the same for
# every configuration. Set it for your own training runs too.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "diffusionblocks.tools.bench_memory", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **ALLOCATOR_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"{spec['name']}: worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_on_gpu(results: list[dict]) -> bool:
    return results[0].get("device", "cpu").startswith("cuda")


def table(results: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"
    e2e = results[0]
    peak = "GPU peak MiB" if measured_on_gpu(results) else "process peak MiB"
    lines = [f"| configuration | params MiB | grads MiB | optimizer MiB | activations MiB | {peak} "
             "| peak ÷ | activations ÷ | step s | samples/s |", "|---" * 10 + "|"]
    for r in results:
        lines.append(f"| {r['name']} | {mib(r['param_bytes'])} | {mib(r['grad_bytes'])} | {mib(r['optimizer_bytes'])} "
                     f"| {mib(r['activation_bytes'])} | {mib(r['peak_bytes'])} "
                     f"| {e2e['peak_bytes'] / r['peak_bytes']:.2f}x | {e2e['activation_bytes'] / r['activation_bytes']:.2f}x "
                     f"| {r['step_s']:.3f} | {r['samples_per_s']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # a file only: no pyplot state, no display backend

    parts = [("param_bytes", "parameters"), ("grad_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
             ("activation_bytes", "activations")]
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    names = [r["name"] for r in results]
    bottom = [0.0] * len(results)
    for key, label in parts:
        values = [r[key] / 2**20 for r in results]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(names, [r["peak_bytes"] / 2**20 for r in results], color="black", marker="_", s=400,
               label="GPU peak (max_memory_allocated)" if measured_on_gpu(results) else "process peak (RSS)",
               zorder=3)
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionblocks bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="vit-digits")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--blocks", default="1,2,3,4,6", help="comma-separated B's")
    parser.add_argument("--combine", type=int, default=4, help="the B of block-wise + offload + checkpointing")
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU's peak and offload=cpu")
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print(f"bench memory: --device {args.device}, but torch sees no GPU", file=sys.stderr)
        return 2
    from .. import config as C

    runs = configurations(args.layers, args.width, args.heads, args.batch, [int(b) for b in args.blocks.split(",")],
                          args.combine, "cpu" if on_gpu else "disk")
    for name, overrides in runs:  # every configuration checked before the first one runs
        try:
            C.validate(C.override(C.preset(args.preset), overrides + [f"device={args.device}"]))
        except C.ConfigError as error:
            print(f"bench memory: {name}: {error}", file=sys.stderr)
            return 2
    results = []
    for name, overrides in runs:
        spec = {"name": name, "preset": args.preset, "overrides": overrides,
                "steps_per_block": args.steps_per_block, "threads": args.threads, "device": args.device}
        results.append(run_subprocess(spec))
        print(f"{name}: peak {results[-1]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else None}
    (out / "memory.json").write_text(json.dumps({"machine": machine, "args": vars(args), "results": results},
                                                indent=2) + "\n")
    plot(results, out / "memory.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
