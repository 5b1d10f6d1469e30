"""Figures for the README: does a run survive interruptions and damaged checkpoints?

    python -m diffusionblocks.tools.reliability --interrupts 6 --corruptions 30 --out results/reliability.json

Interrupt trials: the tiny ViT preset trains in a subprocess that gets a real SIGINT or
SIGTERM at a random moment after its first checkpoint; `--resume` then finishes it, and
its final weights and metrics log are compared bit for bit with an uninterrupted run.
Corruption trials: the newest checkpoint of a finished run is damaged at random
(truncated, a flipped byte, a file deleted, a garbage manifest, `latest` pointing
nowhere); loading must report it and fall back to the previous checkpoint, and training
must resume from there."""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..systems import checkpoint
from .. import config as C
from ..systems.logs import MetricsLog
from ..train import Trainer

FIELDS = ["e2e_steps=100", "checkpoint_every=10", "progress=false"]


def _package_env() -> dict:
    import diffusionblocks
    import diffusionblocks_ext

    paths = {str(Path(m.__file__).resolve().parents[1]) for m in (diffusionblocks, diffusionblocks_ext)}
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sorted(paths)))


def reference_run(folder: Path) -> Trainer:
    trainer = Trainer(C.override(C.preset("vit-digits-tiny"), FIELDS), folder)
    trainer.run()
    return trainer


def interrupt_trial(folder: Path, reference: Trainer, signum: int, rng: random.Random) -> dict:
    env = _package_env()
    command = [sys.executable, "-m", "diffusionblocks", "train", "vit-digits-tiny", "--out", str(folder),
               "--set", *FIELDS]
    process = subprocess.Popen(command, env=env, cwd="/", stderr=subprocess.PIPE, text=True)
    while not (folder / "checkpoint" / "latest").exists() and process.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    if process.poll() is None:
        process.send_signal(signum)
    _, err = process.communicate(timeout=600)
    interrupted = process.returncode == 128 + signum
    resumed = subprocess.run([sys.executable, "-m", "diffusionblocks", "train", "--resume", str(folder)],
                             env=env, cwd="/", capture_output=True, text=True, timeout=600)
    final = checkpoint.load(folder)
    exact = (resumed.returncode == 0
             and all(torch.equal(final.weights[k], v) for k, v in reference.model.state_dict().items())
             and MetricsLog.read(folder / "metrics.jsonl") == MetricsLog.read(reference.out_dir / "metrics.jsonl"))
    return {"signal": signal.Signals(signum).name, "interrupted": interrupted, "exit": process.returncode,
            "resumed_bit_exact": exact, "stderr": err.strip().splitlines()[-1:] if err else []}


def damage(folder: Path, rng: random.Random) -> str:
    """Damage the newest checkpoint of the run in `folder` one random way; returns which."""
    root = folder / checkpoint.DIRNAME
    newest = root / (root / "latest").read_text().strip()
    kind = rng.choice(["truncate", "flip", "delete", "manifest", "latest"])
    target = newest / rng.choice(checkpoint.FILES)
    if kind == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "flip":
        data = bytearray(target.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "delete":
        target.unlink()
    elif kind == "manifest":
        (newest / "manifest.json").write_text("{not json")
    else:
        (root / "latest").write_text("step-99999999\n")
        shutil.rmtree(newest)  # and the newest is gone: `latest` names nothing that exists
    return kind


def corruption_trial(finished: Path, folder: Path, rng: random.Random) -> dict:
    shutil.copytree(finished, folder)
    root = folder / checkpoint.DIRNAME
    steps = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))
    kind = damage(folder, rng)
    warnings = []
    try:
        loaded = checkpoint.load(folder, warn=warnings.append)
        recovered = loaded.step == steps[-2]
        trainer = Trainer(C.override(C.preset("vit-digits-tiny"), FIELDS), folder)
        recovered = recovered and trainer.run(resume=True) is not None and trainer.step == steps[-1]
    except Exception as error:  # counted, not fatal: the figure is how many recover
        return {"damage": kind, "recovered": False, "error": f"{type(error).__name__}: {error}"}
    return {"damage": kind, "recovered": recovered, "reported": len(warnings) > 0 or kind == "latest"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interrupts", type=int, default=6)
    parser.add_argument("--corruptions", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/reliability.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = reference_run(tmp / "reference")
        interrupts = [interrupt_trial(tmp / f"interrupt{i}", reference,
                                      (signal.SIGINT, signal.SIGTERM)[i % 2], rng) for i in range(args.interrupts)]
        corruptions = [corruption_trial(tmp / "reference", tmp / f"corrupt{i}", rng) for i in range(args.corruptions)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"interrupts": interrupts, "corruptions": corruptions}, indent=2) + "\n")
    print("| trials | count | as expected |\n|---|---:|---:|")
    print(f"| interrupted by a real SIGINT/SIGTERM, exit 128+signal | {len(interrupts)} | "
          f"{sum(t['interrupted'] for t in interrupts)} |")
    print(f"| resumed to the uninterrupted run's weights and log, bit for bit | {len(interrupts)} | "
          f"{sum(t['resumed_bit_exact'] for t in interrupts)} |")
    kinds = sorted({t["damage"] for t in corruptions})
    print(f"| damaged newest checkpoint ({', '.join(kinds)}): fell back and resumed | {len(corruptions)} | "
          f"{sum(t['recovered'] for t in corruptions)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
