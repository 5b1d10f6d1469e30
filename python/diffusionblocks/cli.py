"""Command line: `diffusionblocks train [preset] ...`, `diffusionblocks eval DIR`.
`train --task module:Class [preset]` trains a task of your own (docs/trainer.md).
A bad config prints one line naming the field and exits with status 2."""

import argparse
import json
import os
import sys
from pathlib import Path

from diffusionblocks_ext import __version__

from .systems import checkpoint
from .config import CUSTOM, PRESETS, ConfigError, TrainConfig, override, preset, validate
from .inference import load, place, read_config
from .sampler import SAMPLERS
from .tasks.charlm import DECODINGS
from .tasks import TASKS

DEFAULT_PRESET = "vit-digits"
# `train` flags that set the config field of the same name (any field: --set key=value)
FLAGS = ("mode", "blocks", "gamma", "partition", "seed", "parallel", "device", "offload", "block_schedule",
         "steps_per_swap")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="diffusionblocks", description="Block-wise training of residual "
                                  "networks as denoisers (DiffusionBlocks), and its end-to-end baseline.")
    top.add_argument("--version", action="version", version=f"diffusionblocks {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a preset (default: vit-digits)")
    train.add_argument("preset", nargs="?", help=f"one of: {', '.join(sorted(PRESETS))}; with --task, one of "
                       f"that task's own presets or {CUSTOM} (the default: its Config() defaults)")
    train.add_argument("--task", help=f"the task: {', '.join(sorted(TASKS))}, or module:Class, a task class of "
                       "your own, importable from the current directory or PYTHONPATH")
    train.add_argument("--mode", choices=["blocks", "e2e"], help="block-wise (default) or end-to-end")
    train.add_argument("--blocks", type=int, help="number of blocks B")
    train.add_argument("--gamma", type=float, help="overlap of neighbouring noise ranges")
    train.add_argument("--partition", choices=["equi", "uniform"], help="how the σ axis is cut")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu (default), cuda or cuda:N")
    train.add_argument("--offload", choices=["none", "cpu", "disk"],
                       help="inactive blocks' weights and optimizer state: to host memory from a GPU (cpu) "
                            "or to memory-mapped files on the CPU (disk)")
    train.add_argument("--block-schedule", dest="block_schedule", choices=["random", "round-robin", "sequential"],
                       help="which block each step trains (default: random, as in the paper)")
    train.add_argument("--steps-per-swap", dest="steps_per_swap", type=int, metavar="K",
                       help="keep a block for K steps (amortises offload)")
    train.add_argument("--parallel", choices=["none", "blocks"],
                       help="blocks: one process per block group, launched with torchrun")
    train.add_argument("--out", help="run directory (default: runs/<preset>-<mode>-B<B>-seed<seed>)")
    train.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override any config field, e.g. --set e2e_steps=500 model.width=32")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    evaluate = commands.add_parser("eval", help="evaluate the checkpoint of a run directory")
    evaluate.add_argument("dir")
    evaluate.add_argument("--device", help="where to evaluate (default: where the run trained)")
    sample = commands.add_parser("sample", help="generate from the checkpoint of a generative run")
    sample.add_argument("dir")
    sample.add_argument("--device", help="where to sample (default: where the run trained)")
    sample.add_argument("--steps", type=int, help="noise levels N (default: the task's)")
    sample.add_argument("--sampler", choices=SAMPLERS, default="euler")
    sample.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    sample.add_argument("--class", dest="label", type=int, help="sample this class only (default: all)")
    sample.add_argument("--count", type=int, help="samples per class, or sequences")
    sample.add_argument("--prompt", help="text tasks: the prompt to continue")
    sample.add_argument("--tokens", type=int, help="text tasks: tokens to generate")
    sample.add_argument("--decoding", choices=DECODINGS,
                        help="autoregressive and recurrent LMs: how each character is chosen (default: greedy)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output file (default: in the run directory)")
    bench = commands.add_parser("bench", help="measure: `bench memory`, `bench presets`, `bench train PRESET` "
                                "(see bench WHAT --help)")
    bench.add_argument("what", choices=["memory", "presets", "train"])
    bench.add_argument("options", nargs=argparse.REMAINDER)
    info = commands.add_parser("info", help="the build report for a bug report: versions, which kernels serve "
                               "CPU and CUDA tensors, how they were built, what the environment changed")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    return top


def config_from_args(args) -> TrainConfig:
    if args.task is not None:
        config = preset(args.preset or CUSTOM, task=args.task)
    else:
        config = preset(args.preset or DEFAULT_PRESET)
    for name in FLAGS:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return validate(override(config, [item for group in args.set for item in group]))


def run_name(config: TrainConfig) -> str:
    """The preset, after the class name for a task of your own (its presets' names are its own)."""
    if config.task in TASKS:
        return config.preset
    return f"{config.task.rpartition(':')[2]}-{config.preset}"


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # per process: torchrun ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"out: cannot write to {out} ({error.strerror or error})") from None


def train(args) -> int:
    # torch and the model load only once the arguments are valid
    from .train import Interrupted, Trainer, TrainingError

    if args.resume:
        given = [name for name in ("preset", "task", "out") + FLAGS if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"resume: the run's config comes from its config.json (change fields with "
                              f"--set); drop --{given[0].replace('_', '-')}")
        out = Path(args.resume)
        config = validate(override(read_config(out), [item for group in args.set for item in group]))
        if not checkpoint.exists(out):
            raise ConfigError(f"resume: {out} has no checkpoint to resume from")
    else:
        config = config_from_args(args)
        blocks = f"-B{config.blocks}" if config.mode == "blocks" else ""
        out = Path(args.out or f"runs/{run_name(config)}-{config.mode}{blocks}-seed{config.seed}")
        if (out / "config.json").exists():
            raise ConfigError(f"out: {out} already holds a run; continue it with --resume {out} "
                              "or choose another --out")
    check_writable(out)
    try:
        report = Trainer(config, out).run(resume=bool(args.resume))
    except Interrupted as stop:
        print(f"\ndiffusionblocks: {stop}: checkpoint written; continue with: diffusionblocks train "
              f"--resume {out}", file=sys.stderr)
        return 128 + stop.signum
    except TrainingError as error:
        print(f"diffusionblocks: error: {error}; the last checkpoint is in {out}", file=sys.stderr)
        return 1
    if report is None:  # a block-parallel rank other than 0: rank 0 reports
        return 0
    metrics = " · ".join(f"{name} {value:.4g}" for name, value in report["metrics"].items()
                         if isinstance(value, float))
    print(f"{metrics} · {report['layer_evals']} layer evals · {report['wall_s']:.1f} s · "
          f"report: {out / 'report.json'}")
    return 0


def trained(run_dir: Path, device: str | None = None):
    """The Trainer of a finished or interrupted run, at its last checkpoint, on `device`
    (default: the run's own), placed as `load` places it."""
    from .train import Trainer

    config = read_config(run_dir)
    if not checkpoint.exists(run_dir):
        raise ConfigError(f"dir: {run_dir} has no checkpoint")
    place(config, device)
    trainer = Trainer(config, run_dir)
    trainer.resume()
    return trainer


def evaluate(args) -> int:
    run_dir = Path(args.dir)
    model = load(run_dir, args.device)
    result = {"dir": str(run_dir), "step": model.step, "metrics": model.evaluate()}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def sample(args) -> int:
    summary = load(Path(args.dir), args.device).sample(
        steps=args.steps, sampler=args.sampler, cfg=args.cfg, label=args.label, count=args.count,
        prompt=args.prompt, tokens=args.tokens, decoding=args.decoding, seed=args.seed, out=args.out)
    print(json.dumps(summary))
    return 0


def bench(args) -> int:
    from .tools import bench_memory, bench_presets, bench_train

    return {"memory": bench_memory, "presets": bench_presets, "train": bench_train}[args.what].main(args.options)


def info(args) -> int:
    from diffusionblocks_ext import build_report

    from .tasks.data import fetch
    from .tasks.text_quality import cache_folder

    report = build_report.collect()
    report["diffusionblocks"] = __version__
    report["data_cache"] = f"{fetch.cache_dir()}" + (" (offline: no downloads)" if fetch.offline() else "")
    report["model_cache"] = str(cache_folder())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"diffusionblocks      {__version__}\n{build_report.render(report)}\n"
              f"data cache           {report['data_cache']}\nmodel cache          {report['model_cache']}")
    return 0


COMMANDS = {"train": train, "eval": evaluate, "sample": sample, "bench": bench, "info": info}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"diffusionblocks: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
