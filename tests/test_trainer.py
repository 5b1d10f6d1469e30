"""Training behaviour on the tiny preset: block isolation, inference cost, learning,
bit-exact resume, measured counters."""

import json
import math

import pytest
import torch
from diffusionblocks.systems import checkpoint
from diffusionblocks import config as C, steps
from diffusionblocks.tasks.data import images
from diffusionblocks.systems.logs import MetricsLog
from diffusionblocks.train import Trainer

from conftest import tiny_config, assert_same_model_state, whole_and_resumed

SHARED = ("patch_embed.", "pos_embed", "cls_token", "label_type", "label_embed", "sigma_embed.", "final_norm.",
          "head_norm.", "head.")


def tiny(**changes) -> C.TrainConfig:
    return tiny_config("vit-digits-tiny", **changes)


def record_layer_calls(trainer: Trainer) -> list[int]:
    calls = []
    for index, layer in enumerate(trainer.model.layers):
        layer.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    return calls


def predict(trainer: Trainer, n: int) -> torch.Tensor:
    data = trainer.task.data
    return trainer.task.predict(data.pixels(data.test_images[:n]), trainer.plan, trainer.config.mode)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("block", [0, 1, 2])
def test_a_block_step_runs_and_changes_only_that_block_and_the_shared_modules(tmp_path, block):
    trainer = Trainer(tiny(layers=3, blocks=3), tmp_path)
    calls = record_layer_calls(trainer)
    before = snapshot(trainer.model)
    for step in range(2):  # two steps: after the first the zero-initialised gates are open
        trainer.block_step(block, step, steps.step_generator(trainer.config.seed, step))
    own = tuple(f"layers.{i}." for i in trainer.plan.layers(block))
    assert calls == [block, block]
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n in before if n.startswith(own + SHARED)}
    assert any(n.startswith(own) for n in changed) and any(n.startswith(SHARED) for n in changed)
    # Other blocks never got a gradient, so AdamW holds no state for them either.
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    with_state = {names[id(p)] for opt in trainer.optimizers.values() for p in opt.state}
    assert all(n.startswith(own + SHARED) for n in with_state)
    assert all(not opt.state for key, opt in trainer.optimizers.items() if key not in ("shared", f"block{block}"))


@pytest.mark.parametrize("layers, blocks, split, levels", [
    (3, 3, None, "cdf"), (4, 2, None, "cdf"), (4, 3, (1, 2, 1), "cdf")])
def test_inference_with_n_equal_b_runs_each_block_once_in_order(tmp_path, layers, blocks, split, levels):
    trainer = Trainer(tiny(layers=layers, blocks=blocks, split=split, inference_schedule=levels), tmp_path)
    calls = record_layer_calls(trainer)
    logits = predict(trainer, 16)
    assert logits.shape == (16, 10)
    assert calls == list(range(layers))  # block 0 (noisiest) first, each layer once


def test_each_inference_level_runs_only_the_block_that_owns_it(tmp_path):
    # Karras levels for N = 3 are 80, 2.52, 0.002: block 0 twice, block 1 never, block 2 once.
    trainer = Trainer(tiny(layers=3, blocks=3, inference_schedule="karras"), tmp_path)
    calls = record_layer_calls(trainer)
    predict(trainer, 4)
    assert calls == [0, 0, 2]


def test_end_to_end_mode_runs_every_layer_on_each_step(tmp_path):
    trainer = Trainer(tiny(layers=3, mode="e2e"), tmp_path)
    calls = record_layer_calls(trainer)
    trainer.train_step(0)
    predict(trainer, 4)
    assert calls == [0, 1, 2, 0, 1, 2]


def fixed_loss(trainer: Trainer) -> float:
    """Loss of every block on one fixed batch with fixed σ's and noise (no augmentation)."""
    total = 0.0
    with torch.no_grad():
        for block in range(trainer.plan.num_blocks):
            generator = torch.Generator().manual_seed(1234 + block)
            batch = images.train_batch(trainer.task.data, 0, 256, 99, 0, False, generator)
            total += trainer.forward_loss(block, batch, generator)[0].item()
    return total


def test_a_short_block_wise_run_lowers_the_loss(tmp_path):
    trainer = Trainer(tiny(e2e_steps=40, lr=1e-2), tmp_path)
    before = fixed_loss(trainer)
    trainer.run()
    assert fixed_loss(trainer) < 0.5 * before


def test_a_short_end_to_end_run_lowers_the_loss_below_the_class_prior(tmp_path):
    # End to end the zero-initialised gates must open before the image reaches token 0,
    # so this needs more steps than the block-wise run to get past the label prior (ln 10).
    trainer = Trainer(tiny(mode="e2e", e2e_steps=150, lr=1e-2, warmup_e2e_steps=10), tmp_path)
    before = fixed_loss(trainer)
    trainer.run()
    after = fixed_loss(trainer)
    assert after < 0.9 * before and after < math.log(10) - 0.1


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    config = tiny(e2e_steps=12, checkpoint_every=5)  # B=2: 24 steps
    Trainer(config, tmp_path / "whole").run()

    interrupted = Trainer(config, tmp_path / "parts")
    step_once = interrupted.start_step

    def crash_at_step_13(step):
        if step == 13:
            raise KeyboardInterrupt  # after the checkpoint at step 10, with 3 steps logged past it
        return step_once(step)

    interrupted.start_step = crash_at_step_13
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = Trainer(config, tmp_path / "parts")
    resumed.run(resume=True)
    assert resumed.step == 24

    whole = checkpoint.load(tmp_path / "whole").weights
    parts = checkpoint.load(tmp_path / "parts").weights
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert MetricsLog.read(tmp_path / "whole/metrics.jsonl") == MetricsLog.read(tmp_path / "parts/metrics.jsonl")
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "parts")]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["layer_evals"] == reports[1]["layer_evals"]


def test_stop_after_then_resume_matches_too(tmp_path):
    config = tiny(e2e_steps=6, block_schedule="sequential")
    whole, resumed = whole_and_resumed(config, tmp_path, stop_after=7)
    assert_same_model_state(whole, resumed)


@pytest.mark.parametrize("schedule, expected", [
    ("round-robin", [0, 1, 2, 0, 1, 2, 0, 1, 2]),
    ("sequential", [0, 0, 0, 1, 1, 1, 2, 2, 2]),
])
def test_block_schedules(tmp_path, schedule, expected):
    trainer = Trainer(tiny(layers=3, blocks=3, e2e_steps=3, block_schedule=schedule), tmp_path)
    assert [steps.choose_block(trainer.config, s, steps.step_generator(trainer.config.seed, s)) for s in range(9)] == expected


def test_random_schedule_visits_every_block_uniformly(tmp_path):
    trainer = Trainer(tiny(layers=3, blocks=3, e2e_steps=1000), tmp_path)
    counts = torch.bincount(torch.tensor([steps.choose_block(trainer.config, s, steps.step_generator(trainer.config.seed, s))
                                          for s in range(3000)]), minlength=3)
    assert counts.min() > 900


def test_warmup_then_cosine(tmp_path):
    trainer = Trainer(tiny(e2e_steps=50, warmup_e2e_steps=5, lr=1e-3), tmp_path)  # B=2: 100 steps, 10 warm-up
    assert steps.learning_rate(trainer.config, 0) == pytest.approx(1e-4) and steps.learning_rate(trainer.config, 9) == pytest.approx(1e-3)
    assert steps.learning_rate(trainer.config, 55) == pytest.approx(5e-4) and steps.learning_rate(trainer.config, 99) < 1e-6


def test_report_counts_layer_evaluations_and_memory(tmp_path):
    blocks = Trainer(tiny(layers=4, blocks=2, e2e_steps=5), tmp_path / "b").run()
    e2e = Trainer(tiny(layers=4, mode="e2e", e2e_steps=5), tmp_path / "e").run()
    # Same layer-evaluation budget: 10 steps of 2 layers against 5 steps of 4.
    assert blocks["layer_evals"] == e2e["layer_evals"] == 20
    assert blocks["inference_layer_evals"] == e2e["inference_layer_evals"] == 4
    assert blocks["steps"] == 10 and e2e["steps"] == 5 and blocks["blocks"] == 2 and e2e["blocks"] == 1
    m_blocks, m_e2e = blocks["memory"], e2e["memory"]
    assert m_blocks["param_bytes"] == m_e2e["param_bytes"] > 0
    assert 0 < m_blocks["activation_bytes_per_step"] < 0.75 * m_e2e["activation_bytes_per_step"]
    assert 0 < m_blocks["grad_bytes"] < m_blocks["param_bytes"]
    assert m_blocks["optimizer_bytes"] >= 2 * m_blocks["grad_bytes"]
    assert blocks["backend"] in ("reference", "ext-cpu")
    for name in ("config.json", "metrics.jsonl", "loss_by_block.png", "report.json"):
        assert (tmp_path / "b" / name).exists()
