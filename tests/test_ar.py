"""The autoregressive LM task (ar.py): the 2T mask exactly as docs/method.md §6 says, no future
leakage in either stream, block isolation, generation, and the CLI on the tiny preset."""

import json

import pytest
import torch

from diffusionblocks import cli
from diffusionblocks import config as C, steps
from diffusionblocks.tasks.ar import two_stream_mask
from diffusionblocks.errors import ConfigError
from diffusionblocks.train import Trainer

from conftest import tiny_config, assert_same_model_state, whole_and_resumed

SHARED = ("token_embed.", "target_embed", "noisy_embed", "sigma_embed.", "final_norm.", "head_norm.", "head.")


def tiny(**changes) -> C.TrainConfig:
    return tiny_config("ar-text-tiny", **changes)


def scrambled(trainer: Trainer) -> Trainer:
    """Random weights everywhere (the zero-initialised adaLN gates would make every layer the identity)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return trainer


def expected_mask(clean: int, noisy: int) -> torch.Tensor:
    """docs/method.md §6 written out: clean i sees clean j <= i; noisy at position p sees clean j < p and itself."""
    size = clean + noisy
    mask = torch.zeros(size, size, dtype=torch.bool)
    for row in range(size):
        for col in range(size):
            if row < clean:
                mask[row, col] = col < clean and col <= row
            else:
                position = clean - noisy + (row - clean)
                mask[row, col] = (col < clean and col < position) or col == row
    return mask


@pytest.mark.parametrize("clean, noisy", [(1, 1), (5, 5), (7, 1), (6, 3)])
def test_the_2t_mask_is_exactly_the_spec(clean, noisy):
    assert torch.equal(two_stream_mask(clean, noisy), expected_mask(clean, noisy))
    assert two_stream_mask(clean, noisy) is two_stream_mask(clean, noisy)  # built once per shape


def test_no_future_leakage_in_the_clean_or_the_noisy_stream(tmp_path):
    trainer = scrambled(Trainer(tiny(layers=2), tmp_path))
    task, T, width = trainer.task, 8, trainer.config.model.width
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, task.corpus.vocab_size, (2, T), generator=generator)
    z_in = torch.randn(2, T, width, generator=generator)
    cond = torch.randn(2, width, generator=generator)
    layers = range(2)
    with torch.no_grad():
        base = task.two_stream(tokens, z_in, cond, layers)
        for t in range(T):
            # Change the clean characters after t and the noisy inputs after t.
            other_tokens, other_z = tokens.clone(), z_in.clone()
            other_tokens[:, t + 1:] = (tokens[:, t + 1:] + 1) % task.corpus.vocab_size
            other_z[:, t + 1:] += 1.0
            out = task.two_stream(other_tokens, other_z, cond, layers)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1])            # clean 0..t
            torch.testing.assert_close(out[:, T:T + t + 1], base[:, T:T + t + 1])  # noisy 0..t
            # The noisy token at t never sees the clean character at t itself ...
            own = tokens.clone()
            own[:, t] = (tokens[:, t] + 1) % task.corpus.vocab_size
            torch.testing.assert_close(task.two_stream(own, z_in, cond, layers)[:, T + t], base[:, T + t])
            # ... nor another noisy token.
            moved = z_in.clone()
            moved[:, [j for j in range(T) if j != t]] += 1.0
            torch.testing.assert_close(task.two_stream(tokens, moved, cond, layers)[:, T + t], base[:, T + t])
        # And the layers do mix positions: the first character reaches both streams' last rows.
        first = tokens.clone()
        first[:, 0] = (tokens[:, 0] + 1) % task.corpus.vocab_size
        out = task.two_stream(first, z_in, cond, layers)
        assert not torch.allclose(out[:, T - 1], base[:, T - 1]) and not torch.allclose(out[:, -1], base[:, -1])
        # The end-to-end baseline is causal too.
        logits = task.end_to_end(tokens)
        changed = tokens.clone()
        changed[:, 5:] = (tokens[:, 5:] + 1) % task.corpus.vocab_size
        torch.testing.assert_close(task.end_to_end(changed)[:, :5], logits[:, :5])


def test_a_generation_step_is_the_teacher_forced_noisy_token(tmp_path):
    # One noisy token after a prefix (the generation layout) computes what the 2T layout
    # computes at that position, from the same z.
    trainer = scrambled(Trainer(tiny(layers=2), tmp_path))
    task, T, width = trainer.task, 6, trainer.config.model.width
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, task.corpus.vocab_size, (3, T), generator=generator)
    z = torch.randn(3, T, width, generator=generator)
    sigma = torch.full((3,), 0.7)
    with torch.no_grad():
        _, full = task.denoise(tokens, z, 0.5 * z, sigma, range(2))
        for j in range(T):
            prefix = torch.cat([tokens[:, :j], torch.zeros(3, 1, dtype=torch.int64)], dim=1)
            _, one = task.denoise(prefix, z[:, j:j + 1], 0.5 * z[:, j:j + 1], sigma, range(2))
            torch.testing.assert_close(one[:, 0], full[:, j], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [0, 1])
def test_a_block_step_runs_and_changes_only_that_block_and_the_shared_modules(tmp_path, block):
    trainer = Trainer(tiny(layers=4, blocks=2), tmp_path)
    calls = []
    for index, layer in enumerate(trainer.model.layers):
        layer.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for step in range(2):  # after the first step the zero-initialised gates are open
        record = trainer.block_step(block, step, steps.step_generator(trainer.config.seed, step))
        assert record["loss"] > 0
    own = tuple(f"layers.{i}." for i in trainer.plan.layers(block))
    assert calls == list(trainer.plan.layers(block)) * 2
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n in before if n.startswith(own + SHARED)}
    assert any(n.startswith(own) for n in changed) and "target_embed" in changed
    assert trainer.counters["train_layer_evals"] == 4


@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_generation_shapes_cost_and_determinism(tmp_path, mode):
    trainer = scrambled(Trainer(tiny(layers=4, blocks=2, mode=mode), tmp_path))
    task, plan = trainer.task, trainer.plan
    prompt = task.corpus.encode("The ")
    calls = []
    for layer in trainer.model.layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(1))

    def generate(seed):
        return task.generate(plan, mode, prompt, 20, 2, torch.Generator().manual_seed(seed))

    first = generate(5)
    assert first.shape == (2, 4 + 20) and torch.equal(first[:, :4], prompt.expand(2, -1))
    assert len(calls) == 20 * 4  # per character: each block once (B Euler steps), or one forward
    assert torch.equal(generate(5), first)
    assert first.max() < task.corpus.vocab_size
    if mode == "blocks":  # different starting noise, different continuations
        assert not all(torch.equal(generate(seed), first) for seed in (6, 7, 8))


def test_train_then_sample_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "ar-text-tiny", "--out", str(out), "--set", "progress=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "ar" and report["blocks"] == 2 and report["layer_evals"] == 8
    assert {"test_brier", "test_sample_accuracy", "block_table", "samples"} <= set(report["metrics"])
    assert "test_ce" not in report["metrics"]  # the chain's readout is a sample, not a likelihood
    assert len(report["metrics"]["block_table"]) == 2
    assert (out / "samples.txt").read_text().count("--- prompt ---") == 3
    assert (out / "loss_by_block.png").exists() and (out / "metrics.jsonl").exists()
    capsys.readouterr()

    target = tmp_path / "sample.txt"
    args = ["sample", str(out), "--prompt", "def ", "--tokens", "7", "--seed", "3", "--out", str(target)]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompt"] == "def " and len(summary["continuations"][0]) == 7
    assert summary["layer_evals"] == 7 * 2  # 7 characters, each block (1 layer each) once
    assert target.read_text().startswith("--- prompt ---\ndef \n")
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["continuations"] == summary["continuations"]

    assert cli.main(["sample", str(out), "--prompt", "\x00"]) == 2
    assert "prompt: characters not in the corpus vocabulary" in capsys.readouterr().err

    for decoding in ("ancestral", "top-p"):
        assert cli.main(args[:-2] + ["--decoding", decoding]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decoding"] == decoding


def test_config_errors_name_the_field():
    config = tiny(width=18, heads=2)  # head size 9: odd, no rotary pairs
    with pytest.raises(ConfigError, match="model.width"):
        C.validate(config)
    with pytest.raises(ConfigError, match="model.data: no such file"):
        C.validate(tiny(data="/nonexistent/corpus.txt"))


def test_an_interrupted_run_resumes_bit_exactly(tmp_path):
    config = tiny(e2e_steps=3, checkpoint_every=2)  # 6 block steps, checkpoints at 2, 4, 6
    whole, resumed = whole_and_resumed(config, tmp_path, stop_after=4)
    assert_same_model_state(whole, resumed)
