"""A run is never lost: damaged checkpoints fall back to an intact one, a resume that
would change the model is refused, non-finite losses are skipped and counted, and a real
SIGINT/SIGTERM writes a checkpoint from which the run ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusionblocks import cli
from diffusionblocks.systems import checkpoint
from diffusionblocks import config as C
from diffusionblocks.systems.logs import MetricsLog
from diffusionblocks.train import Trainer, TrainingError
from test_cli import PACKAGE_PATHS, run_cli


def tiny(**changes) -> C.TrainConfig:
    config = C.preset("vit-digits-tiny")
    config.progress = False
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def saved_folders(out):
    return sorted(p.name for p in (out / "checkpoint").glob("step-*"))


def test_saves_keep_the_newest_two_checkpoints_and_a_damaged_one_falls_back(tmp_path):
    Trainer(tiny(e2e_steps=10, checkpoint_every=4), tmp_path).run()  # B=2: checkpoints at 4, 8, ..., 20
    assert saved_folders(tmp_path) == ["step-00000016", "step-00000020"]
    newest = tmp_path / "checkpoint" / "step-00000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a full disk
    warnings = []
    saved = checkpoint.load(tmp_path, warn=warnings.append)
    assert saved.step == 16 and len(warnings) == 1
    assert "step-00000020" in warnings[0] and "SHA-256" in warnings[0]

    older = tmp_path / "checkpoint" / "step-00000016" / "state.pt"
    older.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint: no intact checkpoint in .*step-00000020"):
        checkpoint.load(tmp_path, warn=warnings.append)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_in_use(tmp_path):
    trainer = Trainer(tiny(e2e_steps=4), tmp_path)
    trainer.run(stop_after=3)
    (tmp_path / "checkpoint" / "step-00000004.tmp").mkdir()  # a save that never finished
    resumed = Trainer(tiny(e2e_steps=4), tmp_path)
    resumed.resume()
    assert resumed.step == 3


def test_resume_refuses_a_different_model_and_names_the_fields(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "vit-digits-tiny", "--out", str(out), "--set", "e2e_steps=2", "progress=false"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--set", "model.width=32", "model.heads=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusionblocks: error: resume: ") and err.count("\n") == 1
    assert "model.width (16 -> 32)" in err and "model.heads (2 -> 4)" in err
    # A field that leaves the model alone may change: train longer.
    assert cli.main(["train", "--resume", str(out), "--set", "e2e_steps=3"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 6


def nan_on(trainer: Trainer, steps: set[int]):
    """Make the loss of the given (0-based) steps NaN, as an overflow would."""
    block_loss, calls = trainer.task.block_loss, []

    def patched(batch, block, plan, generator):
        loss, levels = block_loss(batch, block, plan, generator)
        calls.append(None)
        return (loss * float("nan") if len(calls) - 1 in steps else loss), levels
    trainer.task.block_loss = patched


def test_non_finite_losses_are_skipped_and_counted(tmp_path):
    trainer = Trainer(tiny(e2e_steps=5), tmp_path)
    nan_on(trainer, {2, 5})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    records = [trainer.train_step(step) for step in range(3)]
    assert records[2].get("skipped") and not records[1].get("skipped")
    trainer.step = 3
    trainer.run(resume=False)
    assert trainer.counters["nonfinite_steps"] == 2
    logged = [r for r in MetricsLog.read(tmp_path / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in logged] == [6]  # the log of this run() starts at step 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_too_many_consecutive_non_finite_losses_stop_the_run_naming_step_block_and_sigma(tmp_path):
    trainer = Trainer(tiny(e2e_steps=10, max_nonfinite_steps=3), tmp_path)
    nan_on(trainer, {4, 5, 6})
    with pytest.raises(TrainingError, match=r"step 7: 3 consecutive non-finite .* block \d, sigma in \[[0-9.e+-]+, "):
        trainer.run()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_real_signal_checkpoints_and_the_resumed_run_is_bit_identical(tmp_path, signum):
    fields = ["e2e_steps=100", "checkpoint_every=10", "progress=false"]
    whole = Trainer(C.override(tiny(), fields), tmp_path / "whole")
    whole.run()

    out = tmp_path / "parts"
    args = [sys.executable, "-m", "diffusionblocks", "train", "vit-digits-tiny", "--out", str(out), "--set", *fields]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(PACKAGE_PATHS))
    process = subprocess.Popen(args, env=env, cwd="/", stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "latest").exists():  # the first checkpoint: training has begun
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert f"{signal.Signals(signum).name} at step" in err and "--resume" in err
    stopped = checkpoint.load(out).step
    assert 10 <= stopped < 200

    resumed = run_cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    parts = checkpoint.load(out)
    assert parts.step == 200
    assert all(torch.equal(parts.weights[k], v) for k, v in whole.model.state_dict().items())
    assert MetricsLog.read(out / "metrics.jsonl") == MetricsLog.read(tmp_path / "whole" / "metrics.jsonl")
