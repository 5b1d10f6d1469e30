"""The proper score the character LMs report in both modes: the exact Brier score of a
distribution, its unbiased estimate from two samples (the Euler chain draws samples), and
both in every report of the autoregressive and recurrent tasks."""

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks.tasks.charlm import brier_exact, brier_from_two_samples, choose, likelihood_logits
from diffusionblocks.train import Trainer

from conftest import tiny_config


def test_the_exact_brier_score_of_sure_and_uniform_predictions():
    targets = torch.tensor([2, 0])
    sure_right = torch.nn.functional.one_hot(targets, 4).double()
    sure_wrong = torch.nn.functional.one_hot(torch.tensor([1, 3]), 4).double()
    uniform = torch.full((2, 4), 0.25, dtype=torch.float64)
    assert brier_exact(sure_right, targets).tolist() == [0.0, 0.0]
    assert brier_exact(sure_wrong, targets).tolist() == [2.0, 2.0]
    assert brier_exact(uniform, targets).tolist() == [1 - 2 / 4 + 1 / 4] * 2


def test_two_samples_estimate_the_brier_score_without_bias():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    draws = 400_000
    first, second = (torch.multinomial(p, draws, replacement=True, generator=generator) for _ in range(2))
    for target in range(4):
        y = torch.full((draws,), target)
        estimates = brier_from_two_samples(first, second, y)
        exact = brier_exact(p, torch.tensor(target)).item()
        standard_error = estimates.std().item() / draws ** 0.5
        assert abs(estimates.mean().item() - exact) < 4 * standard_error, target
    # One sample used twice is not an estimate: it counts 1[s1 = s2] = 1 every time.
    assert brier_from_two_samples(first, first, y).mean() > exact + 0.5


@pytest.mark.parametrize("preset", ["ar-text-tiny", "recurrent-text-tiny"])
@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_both_modes_report_the_brier_score_and_the_sample_accuracy(tmp_path, preset, mode):
    trainer = Trainer(tiny_config(preset, mode=mode), tmp_path)
    metrics = trainer.run()["metrics"]
    assert 0 <= metrics["test_brier"] <= 2 and 0 <= metrics["test_sample_accuracy"] <= 1
    if mode == "e2e":  # exact: from the same distribution as test_ce
        task, total, count = trainer.task, 0.0, 0
        generator = torch.Generator().manual_seed(0)
        for windows in task.validation_batches():
            p = task.window_logits(windows, trainer.plan, mode, generator).float().softmax(-1)
            total += brier_exact(p, windows[:, 1:]).sum().item()
            count += windows[:, 1:].numel()
        assert metrics["test_brier"] == pytest.approx(total / count, rel=1e-6)


def test_every_generation_metric_is_in_both_modes_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))  # the tiny evaluator, not in ~/.cache
    for task_preset in ("ar-text-tiny", "recurrent-text-tiny"):
        for mode in ("blocks", "e2e"):
            config = tiny_config(task_preset, mode=mode, quality_prompts=8)
            metrics = Trainer(config, tmp_path / f"{task_preset}-{mode}").run()["metrics"]
            generation = metrics["generation"]
            decodings = ["greedy"] if mode == "blocks" else ["ancestral", "top-p", "greedy"]
            assert list(generation["by_decoding"]) == decodings
            assert metrics["mauve"] == generation["by_decoding"][decodings[0]]["mauve_mean"]
            assert 0 <= metrics["mauve"] <= 1 and metrics["mauve_std"] >= 0
            for row in list(generation["by_decoding"].values()) + [generation["reference"]]:
                assert {"mauve_mean", "mauve_std", "evaluator_bpc", "distinct4", "unigram_entropy_bits"} <= set(row)
            assert generation["prompts"] == 8
            measured_with = generation["measured_with"]
            assert len(measured_with["evaluator_weights"]) == 16 and "mauve-text" in measured_with["packages"]
            if mode == "blocks":
                table = metrics["block_table"]
                assert [row["sigma"] for row in table] == sorted((row["sigma"] for row in table), reverse=True)
                # At σ_min the noisy target names the character: the nearest embedding is right.
                assert table[-1]["z_alone_accuracy"] == 1.0


def test_decodings_choose_as_they_say():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1).expand(20_000, -1)
    p = logits[0].softmax(-1)
    generator = torch.Generator().manual_seed(0)
    assert choose(logits, "greedy", generator).eq(0).all()
    drawn = choose(logits, "ancestral", generator)
    frequencies = torch.bincount(drawn, minlength=4) / len(drawn)
    assert torch.allclose(frequencies.double(), p.double(), atol=0.015)
    # top-p 0.95: p = (0.644, 0.237, 0.087, 0.032): the first three reach 0.968, the last is cut.
    nucleus = choose(logits, "top-p", generator)
    frequencies = torch.bincount(nucleus, minlength=4) / len(nucleus)
    assert frequencies[3] == 0
    torch.testing.assert_close(frequencies[:3].double(), (p[:3] / p[:3].sum()).double(), atol=0.015, rtol=0)
    # The same generator state gives the same draws.
    again = [choose(logits[:50], "ancestral", torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*again)


@pytest.mark.parametrize("preset", ["ar-text-tiny", "recurrent-text-tiny"])
@pytest.mark.parametrize("setting, message", [
    ("model.quality_chars=13", "model.quality_chars: prompt and continuation (4 + 13) exceed the 16 characters"),
    ("model.evaluator=huge", "model.evaluator: expected one of default, tiny, got 'huge'"),
    ("model.noisy_input=raw", "model.noisy_input: expected one of evidence, c_in, got 'raw'"),
    ("model.target_norm=0", "model.target_norm: expected > 0, got 0"),
    ("model.readout=bayes", "model.readout: expected one of head, posterior, got 'bayes'"),
])
def test_bad_text_options_name_the_field(tmp_path, capsys, preset, setting, message):
    from diffusionblocks import cli

    assert cli.main(["train", preset, "--out", str(tmp_path / "run"), "--set", setting]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["ar-text-tiny", "recurrent-text-tiny"])
@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_tied_target_embedding_uses_the_token_table(tmp_path, preset, mode):
    trainer = Trainer(tiny_config(preset, mode=mode, tied_target_embedding=True), tmp_path)
    task = trainer.task
    assert task.model.target_embed is None and task.target_table() is task.model.token_embed.weight
    tokens = torch.tensor([[1, 2]])
    torch.testing.assert_close(task.target(tokens).norm(dim=-1), torch.full((1, 2), task.options.target_norm))
    assert 0 <= trainer.run()["metrics"]["test_brier"] <= 2


def test_likelihood_logits_are_the_gaussian_log_likelihood_up_to_a_constant():
    generator = torch.Generator().manual_seed(0)
    targets = 0.25 * torch.nn.functional.normalize(torch.randn(7, 5, generator=generator, dtype=torch.float64), dim=-1)
    z = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    log_likelihood = -torch.cdist(z, targets.expand(3, -1, -1)).square() / (2 * sigma[:, None, None] ** 2)
    difference = likelihood_logits(z, sigma, targets) - log_likelihood  # the same for every target
    torch.testing.assert_close(difference, difference[..., :1].expand_as(difference))


@pytest.mark.parametrize("preset", ["ar-text-tiny", "recurrent-text-tiny"])
def test_the_posterior_readout_adds_what_z_tells_to_the_heads_logits(tmp_path, preset):
    trainer = Trainer(tiny_config(preset, readout="posterior"), tmp_path)  # untrained: the head knows nothing
    task, plan = trainer.task, trainer.plan
    inputs, ids = task.denoiser_inputs(task.validation[:2])
    y = task.target(ids)
    sigma = torch.full((len(y),), 0.002)
    z, z_in = dx.add_noise(y, sigma, generator=torch.Generator().manual_seed(0))
    layers = plan.layers(plan.num_blocks - 1)
    _, posterior = task.denoise(inputs, z, z_in, sigma, layers)
    task.options.readout = "head"
    _, head = task.denoise(inputs, z, z_in, sigma, layers)
    table = task.target(torch.arange(len(task.target_table())))  # y_v of every token v
    torch.testing.assert_close(posterior, head + likelihood_logits(z, sigma, table), rtol=1e-5, atol=1e-2)
    # At σ_min z names the character: the posterior is right whatever the head says.
    assert posterior[:, -ids.shape[1]:].argmax(-1).eq(ids).all()
