"""A task of your own (examples/user_task.py), named "module:Class", trains with the
project's trainer without editing the package: block-wise and end to end, checkpointed and
resumed bit for bit, with disk offload, per-block shared modules, a split and γ; `eval`,
`--task` and block-parallel processes import it by name. Also: the public API's names."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusionblocks
import diffusionblocks_ext
from diffusionblocks import ConfigError, Trainer, TrainConfig, cli, override, preset, validate
from diffusionblocks.systems import checkpoint
from diffusionblocks.tasks import task_class

from conftest import assert_same_model_state, whole_and_resumed
from test_cli import PACKAGE_PATHS, run_cli
from test_parallel import torchrun

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
import user_task  # noqa: E402  (the example, imported as the trainer imports it)

TASK = "user_task:ResidualMLPTask"


def tiny(*fields: str):
    """The example's own tiny preset, without the progress bar, with `key=value` changes."""
    return override(preset("tiny", task=TASK), ["progress=false", *fields])


def test_the_task_resolves_by_module_and_class():
    assert task_class(TASK) is user_task.ResidualMLPTask
    config = preset("custom", task=TASK)
    assert (config.preset, config.task) == ("custom", TASK)
    assert config.model == user_task.ResidualMLPConfig()  # the task's defaults, the trainer's own otherwise
    assert config.blocks == TrainConfig().blocks and config.e2e_steps == TrainConfig().e2e_steps
    validate(config)
    assert preset("vit-digits-tiny", task="vit").preset == "vit-digits-tiny"  # a registered name works alike


@pytest.mark.parametrize("mode, fields", [
    ("blocks", []),
    ("e2e", []),
    # everything at once: 3 layers split 2+1, wider overlap, blocks on disk with their own shared modules
    ("blocks", ["model.layers=3", "split=2,1", "gamma=0.2", "offload=disk", "shared=per-block"]),
])
def test_trains_checkpoints_and_resumes_bit_for_bit(tmp_path, mode, fields):
    config = tiny(f"mode={mode}", *fields)
    whole, resumed = whole_and_resumed(config, tmp_path, stop_after=7)
    assert_same_model_state(whole, resumed)
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["task"] == TASK and report["steps"] == config.total_steps
    assert 0 <= report["metrics"]["test_accuracy"] <= 1
    assert json.loads((tmp_path / "part" / "report.json").read_text())["metrics"] == report["metrics"]
    assert checkpoint.load(tmp_path / "whole").step == config.total_steps


def test_disk_offload_trains_exactly_like_no_offload(tmp_path):
    fields = ["model.layers=3", "split=2,1", "gamma=0.2", "shared=per-block"]
    plain = Trainer(tiny(*fields), tmp_path / "plain")
    plain.run()
    offloaded = Trainer(tiny(*fields, "offload=disk"), tmp_path / "disk")
    offloaded.run()
    assert_same_model_state(plain, offloaded)


def test_the_command_line_trains_evaluates_and_resumes_it(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--task", TASK, "tiny", "--out", str(out), "--set", "progress=false", cwd=EXAMPLES)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["preset"], report["task"], report["steps"]) == ("tiny", TASK, 20)
    evaluated = run_cli("eval", str(out), cwd=EXAMPLES)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["metrics"] == report["metrics"]
    assert diffusionblocks.load(out).evaluate() == report["metrics"]  # the Python route, in this process
    again = run_cli("train", "--resume", str(out), "--set", "e2e_steps=12", cwd=EXAMPLES)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["steps"] == 24
    elsewhere = run_cli("eval", str(out))  # a process that cannot import the task says so
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.strip() == ("diffusionblocks: error: task: no module named 'user_task' (for "
                                        f"'{TASK}'); run from the folder that holds it or put that folder on "
                                        "PYTHONPATH")


def test_the_task_defaults_need_no_preset_and_the_current_directory_is_searched(tmp_path, monkeypatch):
    """`diffusionblocks train --task module:Class` in-process (as the console script runs):
    the module is found in the working directory, which is not on sys.path."""
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(EXAMPLES))])
    monkeypatch.delitem(sys.modules, "user_task")
    out = tmp_path / "run"
    assert cli.main(["train", "--task", TASK, "--mode", "e2e", "--out", str(out),
                     "--set", "e2e_steps=3", "model.layers=2", "model.width=8", "threads=1", "progress=false"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["preset"], config["task"], config["e2e_steps"]) == ("custom", TASK, 3)
    assert config["model"]["hidden"] == user_task.ResidualMLPConfig().hidden
    assert str(EXAMPLES) in sys.path


@pytest.mark.parametrize("task, message", [
    ("nosuch", "task: expected one of ar, dit, mdm, recurrent, vit, or module:Class naming a task class"),
    ("no_such_module:Task", "task: no module named 'no_such_module'"),
    ("user_task:NoSuchClass", "task: module 'user_task' has no attribute 'NoSuchClass'"),
    ("user_task:ResidualMLPConfig", "task: 'user_task:ResidualMLPConfig' is not a task class (missing: train_batch"),
    ("user_task:TASK", "task: 'user_task:TASK' is not a task class (missing: a class)"),
    ("__main__:ResidualMLPTask", "task: '__main__:ResidualMLPTask' names a class of the running script"),
])
def test_a_bad_task_exits_2_with_one_line(tmp_path, capsys, task, message):
    assert cli.main(["train", "--task", task, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffusionblocks: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_task.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="^task: importing module 'broken_task' failed: No module named "
                                          "'no_such_dependency'$"):
        task_class("broken_task:Task")


def test_presets_of_a_task_of_your_own(capsys, tmp_path):
    with pytest.raises(ConfigError, match="^preset: unknown preset 'vit-digits'; choose from tiny, custom$"):
        validate(TrainConfig(task=TASK, model=user_task.ResidualMLPConfig()))
    with pytest.raises(ConfigError, match="^preset: unknown preset 'small' for task 'user_task:ResidualMLPTask'; "
                                          "choose from tiny, custom$"):
        preset("small", task=TASK)
    assert cli.main(["train", "--task", "vit", "dit-digits-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "preset: unknown preset 'dit-digits-tiny' for task 'vit'" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path), "--task", TASK]) == 2
    assert "drop --task" in capsys.readouterr().err


def test_options_from_a_second_copy_of_the_module_are_refused_with_the_reason():
    """A script that runs its own file (module __main__) holds other classes than the module
    the config names: the options must come from the named task."""
    spec = importlib.util.spec_from_file_location("user_task_copy", EXAMPLES / "user_task.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    config = TrainConfig(preset="custom", task=TASK, model=copy.ResidualMLPConfig())
    with pytest.raises(ConfigError, match="^model: expected the options of task 'user_task:ResidualMLPTask' "
                                          r"\(user_task.ResidualMLPConfig\), got user_task_copy.ResidualMLPConfig; "
                                          "the same class imported twice"):
        validate(config)


def test_block_parallel_processes_import_it_too(tmp_path):
    fields = ["model.layers=4", "blocks=2", "e2e_steps=4", "checkpoint_every=5", "shared=per-block", "progress=false"]
    serial = Trainer(override(preset("tiny", task=TASK), fields), tmp_path / "serial")
    report = serial.run()
    out = tmp_path / "parallel"
    done = torchrun(2, "--task", TASK, "tiny", "--parallel", "blocks", "--out", str(out), "--set", *fields,
                    paths=(str(EXAMPLES),))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = checkpoint.load(out)
    assert all(torch.equal(saved.weights[k], v) for k, v in serial.model.state_dict().items() if k.startswith("layers."))
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]


def test_the_example_trains_both_ways_and_prints_both_accuracies(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(PACKAGE_PATHS))
    done = subprocess.run([sys.executable, str(EXAMPLES / "user_task.py"), "--e2e-steps", "5", "--blocks", "2",
                           "--out", str(tmp_path / "runs")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["blocks", "e2e"]
    for line, steps in zip(lines, (10, 5)):
        accuracy = float(re.search(r"test accuracy (\d\.\d+)", line).group(1))
        assert 0 <= accuracy <= 1 and f"· {steps} steps ·" in line
    for mode in ("blocks", "e2e"):
        config = json.loads((tmp_path / "runs" / mode / "config.json").read_text())
        assert (config["task"], config["mode"]) == (TASK, mode)


@pytest.mark.parametrize("module", [diffusionblocks, diffusionblocks_ext], ids=lambda m: m.__name__)
def test_every_public_name_imports_and_has_a_docstring(module):
    """Functions, classes and modules have their own docstring (not a dataclass's generated
    signature); constants are described in the package's docstring."""
    assert module.__all__ and len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, (bool, int, float, str)):
            assert name in module.__doc__, name
            continue
        doc = value.__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), name
