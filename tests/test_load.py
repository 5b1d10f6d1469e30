"""`load(RUN_DIR)`: a trained run used from Python gives what the command line gives
(eval's metrics, sample's output), reads only config.json and model.safetensors (nothing
unpickled), and refuses damaged or missing inputs with one line."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusionblocks import cli
from diffusionblocks.inference import TrainedModel, load
from diffusionblocks.systems.checkpoint import CheckpointError
from diffusionblocks.errors import ConfigError


def train(root: Path, name: str, preset: str, *options: str) -> Path:
    out = root / name
    assert cli.main(["train", preset, "--out", str(out), *options, "--set", "progress=false"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs, trained once for the module: ViT block-wise, end to end, and with disk
    offload; DiT; the autoregressive text LM."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "vit": train(root, "vit", "vit-digits-tiny"),
        "vit-e2e": train(root, "vit-e2e", "vit-digits-tiny", "--mode", "e2e"),
        "vit-disk": train(root, "vit-disk", "vit-digits-tiny", "--offload", "disk"),
        "dit": train(root, "dit", "dit-digits-tiny"),
        "ar": train(root, "ar", "ar-text-tiny"),
    }


def cli_json(capsys, *args: str) -> dict:
    """What a command prints as its last stdout line, as JSON."""
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def newest_checkpoint(run: Path) -> Path:
    return run / "checkpoint" / (run / "checkpoint" / "latest").read_text().strip()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["vit", "vit-e2e", "vit-disk", "dit", "ar"])
def test_evaluate_reproduces_eval_exactly(runs, capsys, name):
    result = cli_json(capsys, "eval", str(runs[name]))
    assert json.loads((runs[name] / "eval.json").read_text())["metrics"] == result["metrics"]
    model = load(runs[name])
    assert isinstance(model, TrainedModel) and model.warnings == []
    assert model.step == result["step"]
    assert model.evaluate() == result["metrics"]  # bit for bit: floats through JSON round-trip exactly
    assert not model.model.training


def test_the_loaded_model_is_the_checkpoint(runs):
    model = load(runs["vit"])
    saved = load_file(str(newest_checkpoint(runs["vit"]) / "model.safetensors"))
    state = model.model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[name].cpu(), tensor) for name, tensor in saved.items())
    assert (model.config.task, model.mode, model.plan.num_blocks) == ("vit", "blocks", 2)
    assert model.device == torch.device("cpu") and model.checkpoint == newest_checkpoint(runs["vit"])


@pytest.mark.parametrize("name", ["vit", "vit-e2e"])
def test_predict_on_the_test_images_gives_the_test_accuracy(runs, name):
    model = load(runs[name])
    data = model.task.data
    logits = model.predict(data.pixels(data.test_images))
    assert logits.shape == (len(data.test_labels), data.num_classes) and logits.dtype == torch.float32
    accuracy = (logits.argmax(dim=-1) == data.test_labels).sum().item() / len(data.test_labels)
    assert accuracy == model.evaluate()["test_accuracy"]
    assert torch.equal(model.predict(data.pixels(data.test_images)), logits)  # repeatable


def test_predict_refuses_what_is_not_images_of_the_run(runs):
    model = load(runs["vit"])
    for bad in (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                torch.zeros(0, 1, 8, 8), [[0.0]]):
        with pytest.raises(ConfigError, match="^images: expected"):
            model.predict(bad)


def test_methods_a_task_lacks_name_themselves(runs):
    with pytest.raises(ConfigError, match=r"^predict: the 'dit' task of .* is not a classifier; use sample\(\)"):
        load(runs["dit"]).predict(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"^sample: the 'vit' task of .* generates nothing to sample; use predict"):
        load(runs["vit"]).sample()


def without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "out", "file")}


def test_sample_reproduces_the_dit_command(runs, capsys, tmp_path):
    by_cli = cli_json(capsys, "sample", str(runs["dit"]), "--seed", "3", "--count", "2", "--steps", "4",
                      "--sampler", "heun", "--cfg", "1.5", "--out", str(tmp_path / "cli.png"))
    summary = load(runs["dit"]).sample(seed=3, count=2, steps=4, sampler="heun", cfg=1.5, out=tmp_path / "load.png")
    assert summary["out"] == str(tmp_path / "load.png")
    assert (tmp_path / "load.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    assert without_timing(summary) == without_timing(by_cli)
    assert "class_consistency" in summary  # the run's cached evaluator (safetensors) scored them


def test_sample_reproduces_the_text_command_and_its_default_file(runs, capsys):
    run = runs["ar"]
    by_cli = cli_json(capsys, "sample", str(run), "--seed", "1", "--tokens", "12", "--count", "2",
                      "--decoding", "ancestral")
    written = (run / "samples-cli.txt").read_text()
    (run / "samples-cli.txt").unlink()
    summary = load(run).sample(seed=1, tokens=12, count=2, decoding="ancestral")
    assert summary["file"] == by_cli["file"] == str(run / "samples-cli.txt")
    assert (run / "samples-cli.txt").read_text() == written
    assert without_timing(summary) == without_timing(by_cli) and len(summary["continuations"]) == 2


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "^steps: expected at least 1, got 0"),
    (dict(count=-1), "^count: expected at least 1"),
    (dict(sampler="ddim"), "^sampler: expected one of euler, heun"),
    (dict(decoding="beam"), "^decoding: expected one of greedy, ancestral, top-p"),
    (dict(cfg=2.0), "^cfg: the "),  # the task's own check, as on the command line
])
def test_sample_refuses_bad_options_with_one_line(runs, options, message):
    with pytest.raises(ConfigError, match=message) as error:
        load(runs["ar"]).sample(**options)
    assert "\n" not in str(error.value)


def test_load_unpickles_nothing_and_leaves_the_run_and_rng_alone(runs, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("load() unpickled something")

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    for name in ("vit", "vit-disk", "dit", "ar"):
        before = sorted(p.relative_to(runs[name]) for p in runs[name].rglob("*"))
        rng = torch.get_rng_state()
        model = load(runs[name])
        model.evaluate()
        assert torch.equal(torch.get_rng_state(), rng)
        assert sorted(p.relative_to(runs[name]) for p in runs[name].rglob("*")) == before


@pytest.mark.parametrize("damage", ["flip a byte", "delete"])
def test_damaged_weights_fall_back_to_the_older_checkpoint_and_say_so(runs, tmp_path, capsys, damage):
    run = copy_run(runs["vit"], tmp_path)
    newest = newest_checkpoint(run)
    older = sorted(p for p in (run / "checkpoint").glob("step-*") if p != newest)[-1]
    if damage == "delete":
        (newest / "model.safetensors").unlink()
    else:
        flip_a_byte(newest / "model.safetensors")
    model = load(run)
    assert model.checkpoint == older and model.step == int(older.name.removeprefix("step-"))
    expected = "is missing" if damage == "delete" else "does not match its SHA-256"
    assert len(model.warnings) == 1 and expected in model.warnings[0] and str(newest) in model.warnings[0]
    assert expected in capsys.readouterr().err
    saved = load_file(str(older / "model.safetensors"))
    assert all(torch.equal(model.model.state_dict()[name], tensor) for name, tensor in saved.items())
    # the command line falls back to the same checkpoint: the same metrics
    assert cli_json(capsys, "eval", str(run))["metrics"] == model.evaluate()


def test_no_intact_checkpoint_is_one_line_naming_the_run(runs, tmp_path):
    run = copy_run(runs["vit"], tmp_path)
    for folder in (run / "checkpoint").glob("step-*"):
        flip_a_byte(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="^checkpoint: no intact checkpoint in ") as error:
        load(run)
    assert str(run) in str(error.value) and "\n" not in str(error.value)
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(CheckpointError, match=r"^checkpoint: no intact checkpoint in .*\(none found\)"):
        load(run)


def test_a_missing_or_broken_config_is_one_line(runs, tmp_path):
    run = copy_run(runs["vit"], tmp_path)
    (run / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"^dir: .* holds no run \(no config.json\)$"):
        load(run)
    with pytest.raises(ConfigError, match="^dir: .* holds no run"):
        load(tmp_path / "nowhere")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="^dir: .*config.json is not a readable run config") as error:
        load(run)
    assert "\n" not in str(error.value)
    config = json.loads((runs["vit"] / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "blocks": 1}))
    with pytest.raises(ConfigError, match=r"^load: the checkpoint in .* another model or partition; "
                                          r"changed: blocks \(2 -> 1\)"):
        load(run)
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "width": 8}}))
    with pytest.raises(ConfigError, match=r"^load: .* changed: model.width \(16 -> 8\)"):
        load(run)


def test_a_device_this_machine_lacks_is_one_line(runs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="^device: cuda requested, but torch sees no GPU"):
        load(runs["vit"], device="cuda")


def test_a_gpu_run_loads_on_the_cpu_of_a_machine_without_one(runs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = copy_run(runs["vit"], tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    model = load(run)
    assert model.device == torch.device("cpu") and model.config.device == "cpu"
    assert model.evaluate() == load(runs["vit"]).evaluate()


def test_per_block_shared_modules_load_from_the_state_without_running_code(tmp_path, monkeypatch):
    run = train(tmp_path, "per-block", "vit-digits-tiny", "--set", "shared=per-block", "e2e_steps=2")
    from diffusionblocks.cli import trained

    expected = trained(run).evaluate()
    real_load = torch.load
    calls = []

    def restricted(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", restricted)
    assert load(run).evaluate() == expected
    assert calls == [True]  # state.pt, through the unpickler that builds tensors only
