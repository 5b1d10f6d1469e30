"""The command line, end to end on the tiny preset, and its one-line config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusionblocks import cli

import diffusionblocks
import diffusionblocks_ext

# Where this test process found the two packages (installed, or the source tree).
PACKAGE_PATHS = list(dict.fromkeys(str(Path(module.__file__).resolve().parents[1])
                                   for module in (diffusionblocks, diffusionblocks_ext)))


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m diffusionblocks ...` in a fresh process that imports the same packages as
    this one. It runs outside the checkout: `python -m` puts the working directory first on
    sys.path, where the source tree (without the compiled module) would shadow an install."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(PACKAGE_PATHS + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "diffusionblocks", *args], env=env,
                          cwd=cwd or Path(os.sep), capture_output=True, text=True, timeout=300)


def test_train_then_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "vit-digits-tiny", "--blocks", "2", "--seed", "1", "--out", str(out),
                   "--set", "e2e_steps=4", "progress=false")
    assert done.returncode == 0, done.stderr
    assert "test_accuracy" in done.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("preset", "mode", "blocks", "seed", "metrics", "layer_evals", "wall_s", "memory", "backend"):
        assert key in report
    assert (report["preset"], report["mode"], report["blocks"], report["seed"]) == ("vit-digits-tiny", "blocks", 2, 1)
    assert report["steps"] == 8 and report["layer_evals"] == 8
    assert set(report["memory"]) >= {"activation_bytes_per_step", "param_bytes", "grad_bytes", "optimizer_bytes"}
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 8
    assert (out / "loss_by_block.png").stat().st_size > 0
    assert (out / "checkpoint" / "step-00000008" / "model.safetensors").exists()

    evaluated = run_cli("eval", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["metrics"]["test_accuracy"] == report["metrics"]["test_accuracy"]
    assert result["step"] == 8

    again = run_cli("train", "vit-digits-tiny", "--out", str(out))
    assert again.returncode == 2 and "out: " in again.stderr


def test_resume_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    first = cli.main(["train", "vit-digits-tiny", "--mode", "e2e", "--out", str(out), "--set", "progress=false"])
    assert first == 0
    report = json.loads((out / "report.json").read_text())
    assert cli.main(["train", "--resume", str(out)]) == 0  # a finished run: evaluated again, same result
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]


def test_a_bad_config_exits_2_with_one_line_naming_the_field():
    done = run_cli("train", "vit-digits-tiny", "--blocks", "3")  # tiny has 2 layers
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("diffusionblocks: error: blocks: B=3 exceeds the number of layers L=2")


@pytest.mark.parametrize("args, field", [
    (["train", "vit-digits-tiny", "--gamma", "-0.1"], "gamma"),
    (["train", "no-such-preset"], "preset"),
    (["train", "vit-digits-tiny", "--set", "model.layers=3"], "split"),  # 3 layers, B=2, no split
    (["train", "vit-digits-tiny", "--set", "model.layers=3", "split=2,2"], "split"),
    (["train", "vit-digits-tiny", "--set", "no_such_field=1"], "no_such_field"),
    (["train", "vit-digits-tiny", "--set", "lr=fast"], "lr"),
    (["train", "vit-digits-tiny", "--set", "lr"], "set"),
    (["train", "vit-digits-tiny", "--set", "model.width=31"], "model.width"),
    (["train", "vit-digits-tiny", "--set", "batch_size=5000"], "batch_size"),
    (["train", "--resume", "/nonexistent/run"], "dir"),
    (["eval", "/nonexistent/run"], "dir"),
])
def test_bad_configs_name_the_field(capsys, args, field):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffusionblocks: error: {field}: ") and err.count("\n") == 1


def test_set_parses_types_and_model_fields():
    args = cli.parser().parse_args(["train", "--set", "model.width=32", "heads=4", "--set", "split=1,2",
                                    "normalized_inference_embedding=false", "model.layers=3", "lr=2e-3",
                                    "--blocks", "2"])
    config = cli.config_from_args(args)
    assert (config.model.width, config.model.heads, config.model.layers) == (32, 4, 3)
    assert config.split == (1, 2) and config.model.normalized_inference_embedding is False and config.lr == 2e-3
    assert config.preset == "vit-digits"


def test_flags_set_the_config_fields_of_the_same_name(tmp_path, capsys):
    args = cli.parser().parse_args(["train", "--offload", "disk", "--block-schedule", "round-robin",
                                    "--steps-per-swap", "5", "--device", "cpu"])
    config = cli.config_from_args(args)
    assert (config.offload, config.block_schedule, config.steps_per_swap, config.device) == \
        ("disk", "round-robin", 5, "cpu")
    assert cli.main(["train", "vit-digits-tiny", "--offload", "cpu", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("diffusionblocks: error: offload: cpu moves inactive blocks from the GPU")
    assert cli.main(["train", "--resume", str(tmp_path), "--steps-per-swap", "2"]) == 2
    assert "drop --steps-per-swap" in capsys.readouterr().err


def test_sample_refuses_a_task_that_generates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "vit-digits-tiny", "--out", str(out), "--set", "e2e_steps=2", "progress=false"]) == 0
    capsys.readouterr()
    assert cli.main(["sample", str(out)]) == 2
    assert capsys.readouterr().err.startswith("diffusionblocks: error: sample: the 'vit' task of")


@pytest.mark.parametrize("preset, task", [("dit-digits-tiny", "dit"), ("mdm-text-tiny", "mdm")])
def test_sample_refuses_a_decoding_where_there_is_none(tmp_path, capsys, preset, task):
    out = tmp_path / "run"
    assert cli.main(["train", preset, "--out", str(out), "--set", "e2e_steps=2", "progress=false"]) == 0
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--decoding", "ancestral"]) == 2
    assert capsys.readouterr().err.startswith(f"diffusionblocks: error: decoding: the {task} task")
