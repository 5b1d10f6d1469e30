"""The proper score the character LMs report in both modes: the exact Brier score of a
distribution, its unbiased estimate from two samples (the Euler chain draws samples), and
both in every report of the autoregressive and recurrent tasks."""

import pytest
import torch

from diffusionblocks.tasks.charlm import brier_exact, brier_from_two_samples
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
