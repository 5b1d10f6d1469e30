"""Block-parallel training: two real gloo processes (torchrun) end with exactly the
weights of the serial run when each block has its own shared modules, and rank 0's
checkpoint serves eval and resume like any other."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusionblocks.systems import checkpoint
from diffusionblocks import config as C
from diffusionblocks.systems.parallel import BlockParallel
from diffusionblocks.train import Trainer
from test_cli import PACKAGE_PATHS, run_cli

FIELDS = ["model.layers=4", "blocks=3", "split=2,1,1", "e2e_steps=6", "checkpoint_every=5", "progress=false"]


def torchrun(nproc: int, *args, paths: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`diffusionblocks train ARGS` in nproc processes; `paths` go on PYTHONPATH too (a task of your own)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(PACKAGE_PATHS + list(paths)), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "diffusionblocks", "train", *args]
    return subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=600)


def serial(tmp_path, fields):
    config = C.override(C.preset("vit-digits-tiny"), fields)
    trainer = Trainer(config, tmp_path / "serial")
    return trainer, trainer.run()


def test_block_parallel_run_equals_the_serial_run_bit_for_bit(tmp_path):
    fields = FIELDS + ["shared=per-block"]
    trainer, report = serial(tmp_path, fields)
    out = tmp_path / "parallel"
    done = torchrun(2, "vit-digits-tiny", "--parallel", "blocks", "--out", str(out), "--set", *fields)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = checkpoint.load(out)
    assert all(torch.equal(saved.weights[k], v) for k, v in trainer.model.state_dict().items()
               if k.startswith("layers."))
    for block, copy in enumerate(trainer.shared_copies.copies):
        assert all(torch.equal(saved.state["shared_copies"][str(block)][n], t) for n, t in copy.items())
    parallel_report = json.loads((out / "report.json").read_text())
    assert parallel_report["metrics"] == report["metrics"]
    assert parallel_report["layer_evals"] == report["layer_evals"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 19))
    evaluated = run_cli("eval", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["metrics"]["test_accuracy"] == \
        report["metrics"]["test_accuracy"]


def test_replicas_of_each_block_with_global_shared_modules_train_and_resume(tmp_path):
    # P = 4 processes over B = 2 blocks: 2 data-parallel replicas per block.
    out = tmp_path / "parallel"
    fields = ["model.layers=4", "blocks=2", "e2e_steps=6", "checkpoint_every=5", "progress=false",
              "shared=global", "shared_sync_every=3"]
    done = torchrun(4, "vit-digits-tiny", "--parallel", "blocks", "--out", str(out), "--set", *fields)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 13))  # the leaders' records only
    report = json.loads((out / "report.json").read_text())
    assert report["layer_evals"] == 12 * 2  # 12 steps of 2 layers, each over one batch in all
    again = torchrun(4, "--resume", str(out), "--set", "e2e_steps=8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == 16
    assert all(torch.isfinite(t).all() for t in checkpoint.load(out).weights.values())


def test_global_shared_modules_need_a_sync_interval():
    config = C.override(C.preset("vit-digits-tiny"), ["parallel=blocks"])
    with pytest.raises(C.ConfigError, match="^shared_sync_every: block-parallel training with shared=global"):
        BlockParallel(2, config)


def stub_process_group(monkeypatch, world: int, started: list) -> None:
    """torch.distributed as seen from rank 0 of `world` processes, with no processes: the
    rules BlockParallel applies on every rank, checked without starting any."""
    from diffusionblocks.systems import parallel

    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", started.append)
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(parallel.dist, "new_group", lambda ranks: tuple(ranks))


def test_processes_that_do_not_divide_the_blocks_are_refused(tmp_path, monkeypatch, capsys):
    from diffusionblocks import cli

    stub_process_group(monkeypatch, 4, [])  # 4 processes, B = 3
    code = cli.main(["train", "vit-digits-tiny", "--parallel", "blocks", "--out", str(tmp_path / "x"),
                     "--set", *FIELDS, "shared=per-block"])
    assert code != 0
    assert "parallel: 4 processes cannot split evenly over B=3 blocks" in capsys.readouterr().err


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_the_process_group_backend_follows_the_device(monkeypatch, device, backend):
    """The choice alone (NCCL itself needs two GPUs)."""
    started = []
    stub_process_group(monkeypatch, 2, started)
    config = C.override(C.preset("vit-digits-tiny"), ["parallel=blocks", "shared=per-block", f"device={device}"])
    blocks = BlockParallel(2, config)
    assert started == [backend] and blocks.groups == [(0,), (1,)]
