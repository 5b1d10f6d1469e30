"""The recurrent-depth task (recurrent.py): K passes of the core at inference in both
modes, one pass per block-wise training step, Huginn's truncated back-propagation, and
the CLI on the tiny preset."""

import json

import pytest
import torch

from diffusionblocks import cli
from diffusionblocks import config as C
from diffusionblocks.errors import ConfigError
from diffusionblocks.systems.memory import SavedActivations
from diffusionblocks.train import Trainer

from conftest import tiny_config, assert_same_model_state, whole_and_resumed


def tiny(**changes) -> C.TrainConfig:
    return tiny_config("recurrent-text-tiny", **changes)


def layer_calls(trainer: Trainer) -> list[int]:
    calls = []
    for index, layer in enumerate(trainer.model.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    return calls


@pytest.mark.parametrize("mode", ["blocks", "e2e"])
@pytest.mark.parametrize("passes", [1, 3, 5])
def test_inference_with_k_passes_runs_the_core_k_times(tmp_path, mode, passes):
    trainer = Trainer(tiny(prelude_layers=1, core_layers=2, coda_layers=1, mode=mode), tmp_path)
    model, calls = trainer.model, layer_calls(trainer)
    windows = trainer.task.validation[:2]
    with torch.no_grad():
        logits = trainer.task.window_logits(windows, trainer.plan, mode, torch.Generator().manual_seed(0),
                                            passes=passes)
    assert logits.shape == (2, windows.shape[1] - 1, trainer.task.corpus.vocab_size)
    core = [i for i in calls if i in model.core]
    assert core == list(model.core) * passes
    assert [i for i in calls if i in model.prelude] == list(model.prelude)  # once per sequence
    # Block-wise every Euler level reads out through the coda; Huginn reads the last state once.
    assert [i for i in calls if i in model.coda] == list(model.coda) * (passes if mode == "blocks" else 1)


def test_a_block_wise_step_is_one_pass_through_every_layer(tmp_path):
    trainer = Trainer(tiny(), tmp_path)
    calls = layer_calls(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for step in range(2):
        trainer.train_step(step)
    assert calls == list(range(len(trainer.model.layers))) * 2
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("layers.") for n in changed) and "target_embed" in changed
    assert "constant_cond" in changed  # the prelude's conditioning


def test_the_baseline_draws_k_per_step_and_counts_every_pass(tmp_path):
    trainer = Trainer(tiny(mode="e2e", mean_recurrence=6, backprop_depth=2), tmp_path)
    task, model = trainer.task, trainer.model
    draws = [task.training_recurrence(torch.Generator().manual_seed(s)) for s in range(200)]
    assert min(draws) >= 1 and 5 < sum(draws) / len(draws) < 9  # E[K] = 1 + r̄
    calls = layer_calls(trainer)
    for step in range(3):
        trainer.train_step(step)
    passes = calls.count(model.core[0])
    assert passes >= 3
    assert len(calls) == 3 * (len(model.prelude) + len(model.coda)) + passes * len(model.core)
    # Every pass counts as training compute, the untracked ones included.
    assert trainer.counters["train_layer_evals"] == len(calls)
    assert all(p.requires_grad for p in model.parameters())


def test_truncated_backprop_saves_activations_of_the_last_k_passes_only(tmp_path):
    trainer = Trainer(tiny(mode="e2e"), tmp_path)
    task = trainer.task
    inputs = task.validation[:2, :-1]

    def saved_bytes_and_grad(passes, backprop):
        task.model.zero_grad(set_to_none=True)
        with SavedActivations(task.model.parameters()) as saved:
            logits = task.recur(task.prelude(inputs), passes, torch.Generator().manual_seed(0), backprop)
        logits.sum().backward()
        return saved.bytes, task.model.adapter.weight.grad.clone()

    two, _ = saved_bytes_and_grad(2, backprop=2)
    assert saved_bytes_and_grad(7, backprop=2)[0] == two  # 5 untracked passes save nothing
    assert saved_bytes_and_grad(7, backprop=None)[0] > 3 * two / 2
    # The truncated gradient is the gradient with the state after the early passes cut off.
    _, truncated = saved_bytes_and_grad(4, backprop=1)
    task.model.zero_grad(set_to_none=True)
    e = task.prelude(inputs)
    cond = task.model.constant_cond.expand(len(inputs), -1)
    state = torch.randn(e.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):
            state = task.core_pass(state, e, cond)
    task.readout(task.core_pass(state, e, cond), cond).sum().backward()
    torch.testing.assert_close(truncated, task.model.adapter.weight.grad)
    assert truncated.abs().sum() > 0


def test_train_then_sample_from_the_command_line(tmp_path, capsys):
    for mode in ("blocks", "e2e"):
        out = tmp_path / mode
        assert cli.main(["train", "recurrent-text-tiny", "--mode", mode, "--out", str(out),
                         "--set", "progress=false"]) == 0
        report = json.loads((out / "report.json").read_text())
        metrics = report["metrics"]
        assert {"test_brier", "test_brier_K2", "test_brier_K3", "test_sample_accuracy_K3", "samples"} <= set(metrics)
        assert metrics["test_brier_K3"] == metrics["test_brier"]  # model.recurrence = 3
        if mode == "e2e":
            assert metrics["test_ce_K3"] == metrics["test_ce"]
        else:
            assert not any(name.startswith("test_ce") for name in metrics)  # samples, not likelihoods
        assert (out / "samples.txt").exists()
        if mode == "blocks":
            # The baseline's expected compute: 4 steps of prelude (1 layer), E[K] = 1 + 2 core
            # passes (2 layers each) and coda (1) = 32 layer evaluations; block-wise that is
            # 8 steps of one pass each through prelude, core and coda.
            assert report["steps"] == 8 and report["layer_evals"] == 8 * 4
            assert report["inference_layer_evals"] == 1 + 3 * (2 + 1)  # K = 3 passes of core + coda
        capsys.readouterr()
        args = ["sample", str(out), "--prompt", "the ", "--tokens", "3", "--steps", "2", "--seed", "1"]
        assert cli.main(args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(summary["continuations"][0]) == 3
        per_character = 1 + 2 * (2 + 1) if mode == "blocks" else 1 + 2 * 2 + 1
        assert summary["layer_evals"] == 3 * per_character


def test_block_wise_means_one_denoiser():
    with pytest.raises(ConfigError, match="blocks: the recurrent core is one denoiser"):
        C.validate(tiny(blocks=2))
    with pytest.raises(ConfigError, match="model.core_layers"):
        C.validate(tiny(core_layers=0))


def test_the_baseline_resumes_bit_exactly(tmp_path):
    config = tiny(mode="e2e", e2e_steps=5, checkpoint_every=2)  # K drawn per step from the step's generator
    whole, resumed = whole_and_resumed(config, tmp_path, stop_after=2)
    assert_same_model_state(whole, resumed)
    assert resumed.counters["train_layer_evals"] == whole.counters["train_layer_evals"]
