"""Command line: `diffusionblocks train [preset] ...`, `diffusionblocks eval DIR`.
A bad config prints one line naming the field and exits with status 2."""

import argparse
import json
import sys
from pathlib import Path

from . import checkpoint
from .config import PRESETS, ConfigError, TrainConfig, from_dict, override, preset, validate

DEFAULT_PRESET = "vit-digits"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="diffusionblocks", description="Block-wise training of residual "
                                  "networks as denoisers (DiffusionBlocks), and its end-to-end baseline.")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a preset (default: vit-digits)")
    train.add_argument("preset", nargs="?", help=f"one of: {', '.join(sorted(PRESETS))}")
    train.add_argument("--mode", choices=["blocks", "e2e"], help="block-wise (default) or end-to-end")
    train.add_argument("--blocks", type=int, help="number of blocks B")
    train.add_argument("--gamma", type=float, help="overlap of neighbouring noise ranges")
    train.add_argument("--partition", choices=["equi", "uniform"], help="how the σ axis is cut")
    train.add_argument("--seed", type=int)
    train.add_argument("--out", help="run directory (default: runs/<preset>-<mode>-B<B>-seed<seed>)")
    train.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override any config field, e.g. --set e2e_steps=500 model.width=32")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    evaluate = commands.add_parser("eval", help="evaluate the checkpoint of a run directory")
    evaluate.add_argument("dir")
    return top


def config_from_args(args) -> TrainConfig:
    config = preset(args.preset or DEFAULT_PRESET)
    for name in ("mode", "blocks", "gamma", "partition", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return validate(override(config, [item for group in args.set for item in group]))


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"dir: {run_dir} holds no run (no config.json)")
    return validate(from_dict(json.loads(path.read_text())))


def train(args) -> int:
    from .train import Trainer  # torch and the model load only once the arguments are valid

    if args.resume:
        given = [name for name in ("preset", "mode", "blocks", "gamma", "partition", "seed", "out")
                 if getattr(args, name) is not None] + (["set"] if args.set else [])
        if given:
            raise ConfigError(f"resume: the run's config comes from its config.json; drop --{given[0]}")
        out = Path(args.resume)
        config = load_run_config(out)
        if not checkpoint.exists(out):
            raise ConfigError(f"resume: {out} has no checkpoint to resume from")
    else:
        config = config_from_args(args)
        blocks = f"-B{config.blocks}" if config.mode == "blocks" else ""
        out = Path(args.out or f"runs/{config.preset}-{config.mode}{blocks}-seed{config.seed}")
        if (out / "config.json").exists():
            raise ConfigError(f"out: {out} already holds a run; continue it with --resume {out} "
                              "or choose another --out")
    try:
        report = Trainer(config, out).run(resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue from the last checkpoint with: diffusionblocks train --resume {out}",
              file=sys.stderr)
        return 130
    metrics = " · ".join(f"{name} {value:.4g}" for name, value in report["metrics"].items()
                         if isinstance(value, float))
    print(f"{metrics} · {report['layer_evals']} layer evals · {report['wall_s']:.1f} s · "
          f"report: {out / 'report.json'}")
    return 0


def evaluate(args) -> int:
    from .train import Trainer

    run_dir = Path(args.dir)
    config = load_run_config(run_dir)
    if not checkpoint.exists(run_dir):
        raise ConfigError(f"dir: {run_dir} has no checkpoint")
    trainer = Trainer(config, run_dir)
    trainer.resume()
    result = {"dir": str(run_dir), "step": trainer.step, "metrics": trainer.evaluate()}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return train(args) if args.command == "train" else evaluate(args)
    except ConfigError as error:
        print(f"diffusionblocks: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
