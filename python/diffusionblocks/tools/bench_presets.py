"""`diffusionblocks bench presets`: the paper's configurations, run for their first steps on
stand-in data of the full shape, end to end and block-wise: does each start and train
without error, how fast is a step, and how much memory does it hold.

The data are fixture files in the official formats (tasks/data/fixtures.py: CIFAR archives
of random 32×32 images, a text8 zip), written once into a temporary folder and read
through the same loaders as the real files. The models, batch sizes and sequence lengths
are the presets' own (`--batch-size` overrides the batch, for a CPU that cannot hold a
paper-sized one). Evaluation and the end-of-run work (samples, MAUVE) are not run.

Per preset and mode: the median seconds per step over the steps after the first
(`--warmup` of them are dropped), steps/s, samples/s, and on a GPU the peak of
torch.cuda.max_memory_allocated over the steps. Block-wise, every step changes block at
random as in training, so the median is over all blocks.

    diffusionblocks bench presets --device cuda --steps 20 --out results/presets-gpu
    diffusionblocks bench presets --batch-size 2 --steps 20 --out results/presets-cpu
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

PAPER_PRESETS = ("vit-cifar100", "dit-cifar10", "mdm-text8", "ar-text8")
FIXTURE_IMAGES = (2_000, 500)     # train, test images: enough for batches of 128 without repeats
FIXTURE_TEXT_CHARS = 4_000_000    # 3.6 M training characters


def write_fixtures(folder: Path, datasets: set[str]) -> dict[str, str]:
    """Stand-in data for `datasets`, in the official formats."""
    from ..tasks.data import fixtures

    train, test = FIXTURE_IMAGES
    writers = {"cifar10": lambda: fixtures.write_cifar10(folder / "cifar-10-python.tar.gz", train=train, test=test),
               "cifar100": lambda: fixtures.write_cifar100(folder / "cifar-100-python.tar.gz", train=train, test=test),
               "text8": lambda: fixtures.write_text8_zip(folder / "text8.zip", FIXTURE_TEXT_CHARS)}
    return {name: str(writers[name]()) for name in sorted(datasets)}


def measure(name: str, mode: str, data: dict[str, str], args) -> dict:
    """The first args.steps steps of preset `name` in `mode`."""
    import torch

    from .. import config as C
    from ..train import Trainer

    config = C.preset(name)
    config.mode, config.device, config.progress = mode, args.device, False
    config.model.data = data[config.model.dataset]
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.threads:
        config.threads = args.threads
    on_gpu = config.on_gpu
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    started = time.perf_counter()
    trainer = Trainer(config, None)
    build_s = time.perf_counter() - started
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        sync()
        begin = time.perf_counter()
        record = trainer.train_step(step)
        sync()
        times.append(time.perf_counter() - begin)
        if record.get("skipped"):
            raise RuntimeError(f"{name} {mode}: step {step + 1} had a non-finite loss")
    kept = times[args.warmup:] or times
    median = statistics.median(kept)
    result = {"preset": name, "mode": mode, "blocks": config.num_blocks, "batch_size": config.batch_size,
              "steps": args.steps, "build_s": build_s, "step_s_median": median,
              "step_s_min": min(kept), "step_s_max": max(kept), "steps_per_s": 1 / median,
              "samples_per_s": config.batch_size / median,
              "parameters": sum(p.numel() for p in trainer.model.parameters()),
              "activation_bytes_by_block": trainer.counters["activation_bytes_by_block"],
              "last_loss": record["loss"]}
    if on_gpu:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    del trainer
    if on_gpu:
        torch.cuda.empty_cache()  # the next configuration's peak is its own
    return result


def table(results: list[dict]) -> str:
    lines = ["| preset | mode | batch | s/step (median) | steps/s | samples/s | peak GB | params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r['peak_bytes'] / 1e9:.2f}" if "peak_bytes" in r else "–"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['batch_size']} | {r['step_s_median']:.4f} | "
                     f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | {peak} | {r['parameters'] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionblocks bench presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PAPER_PRESETS))
    parser.add_argument("--modes", nargs="+", default=["e2e", "blocks"], choices=["e2e", "blocks"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the preset's own")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="results/presets")
    args = parser.parse_args(argv)
    import torch

    from .. import config as C

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="diffusionblocks-fixtures-") as folder:
        data = write_fixtures(Path(folder), {C.preset(name).model.dataset for name in args.presets})
        for name in args.presets:
            for mode in args.modes:
                results.append(measure(name, mode, data, args))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
              "arguments": vars(args), "results": results}
    (out / "presets.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
