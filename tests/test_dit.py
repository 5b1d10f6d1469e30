"""DiT image generation: the target scaling, block isolation, the sampler (shapes,
determinism, Euler vs Heun, classifier-free guidance, layer-evaluation counts), the
evaluator (accuracy on real digits, Fréchet distance) and one tiny run through the CLI."""

import json
import math
import shutil

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks import cli, sampler, schedule
from diffusionblocks.tasks import evaluator
from diffusionblocks.tasks.data import digits
from diffusionblocks import config as C
from diffusionblocks.tasks.dit import DiTGeneration
from diffusionblocks.tasks.layers import patchify, unpatchify
from diffusionblocks.errors import ConfigError
from diffusionblocks.partition import BlockPartition


def tiny_task(seed: int = 0) -> DiTGeneration:
    """The tiny preset's task with every weight random (a fresh DiT is zero-initialised to
    the identity, whose samples would not depend on the class or the block)."""
    torch.manual_seed(seed)
    task = DiTGeneration(C.preset("dit-digits-tiny").model)
    with torch.no_grad():
        for p in task.model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    task.model.eval()
    return task


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """The evaluator, trained once for this file and cached where runs can reuse it."""
    folder = tmp_path_factory.mktemp("evaluator")
    model, reused = evaluator.load_or_train(folder, digits.load())
    assert not reused and (folder / evaluator.FILENAME).exists()
    return model, folder


def test_the_target_is_the_image_scaled_to_sigma_data_and_back():
    task = tiny_task()
    pixels = task.data.pixels(task.data.train_images)
    y = task.to_target(pixels)
    assert y.std().item() == pytest.approx(dx.SIGMA_DATA, rel=1e-4)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(task.to_images(y), pixels, atol=1e-6)


def test_unpatchify_inverts_patchify():
    images = torch.randn(3, 1, 8, 8)
    assert torch.equal(unpatchify(patchify(images, 2), 2, 1, 8), images)


def test_a_block_loss_runs_only_its_layers_and_the_baseline_runs_all():
    task = tiny_task()
    calls = []
    for index, layer in enumerate(task.model.layers):
        layer.register_forward_hook(lambda m, a, o, index=index: calls.append(index))
    plan = BlockPartition(3, 3, "equi", 0.05)
    batch = task.train_batch(0, 8, 0, torch.Generator().manual_seed(0))
    for block in range(3):
        loss, sigma = task.block_loss(batch, block, plan, torch.Generator().manual_seed(1))
        lo, hi = plan.training_range(block)
        assert loss.shape == (8,) and torch.isfinite(loss).all()
        assert ((sigma >= lo * (1 - 1e-6)) & (sigma <= hi * (1 + 1e-6))).all()
    assert calls == [0, 1, 2]  # block 0 holds the first layer
    calls.clear()
    loss = task.end_to_end_loss(batch, torch.Generator().manual_seed(1))
    assert loss.shape == (8,) and calls == [0, 1, 2]


def test_sampling_has_the_right_shape_and_is_a_function_of_the_seed():
    task = tiny_task()
    plan = BlockPartition(3, 3, "equi", 0.05)
    labels = task.class_labels(2)
    runs = [task.generate(plan, labels, 6, method, 2.0, torch.Generator().manual_seed(seed))[0]
            for method in ("euler", "heun") for seed in (7, 7, 8)]
    for images in runs:
        assert images.shape == (20, 1, 8, 8)
        assert images.min() >= 0 and images.max() <= 1
    for first in (0, 3):
        assert torch.equal(runs[first], runs[first + 1])        # same seed: the same images
        assert not torch.equal(runs[first], runs[first + 2])    # another seed: others
    assert not torch.equal(runs[0], runs[3])                     # Heun is not Euler


def test_guidance_scale_zero_is_the_unconditional_model():
    task = tiny_task()
    plan = BlockPartition(3, 3, "equi", 0.05)
    labels = task.class_labels(2)
    guided0, _ = task.generate(plan, labels, 6, "euler", 0.0, torch.Generator().manual_seed(3))
    null = torch.full_like(labels, task.model.null_class)
    unconditional, _ = task.generate(plan, null, 6, "euler", 1.0, torch.Generator().manual_seed(3))
    conditional, _ = task.generate(plan, labels, 6, "euler", 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(guided0, unconditional, atol=1e-5)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    D_c, D_u = torch.randn(2, 4, 1, 8, 8)
    assert torch.allclose(sampler.guided(D_c, D_u, 2.0), D_c + (D_c - D_u))


class LinearDenoiser:
    """Data y ~ N(μ, s²) per element: the exact denoiser is D(z; σ) = μ + s²/(s² + σ²)·(z − μ),
    and the probability-flow ODE keeps (z − μ)/sqrt(s² + σ²) constant."""

    mu, s = 0.3, 0.5

    def D(self, z, sigma):
        sigma = sigma.reshape((-1,) + (1,) * (z.dim() - 1)).double()
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (z - self.mu)

    def exact(self, z, sigma, sigma_next):
        return self.mu + (z - self.mu) * math.sqrt(self.s ** 2 + sigma_next ** 2) / math.sqrt(self.s ** 2 + sigma ** 2)


def test_a_heun_step_on_a_linear_denoiser_is_closer_to_the_exact_solution_than_euler():
    model = LinearDenoiser()
    z = torch.randn(4, 16, dtype=torch.float64) * 2
    for a, b in [(2.0, 1.8), (0.8, 0.7), (0.5, 0.4), (0.1, 0.08), (10.0, 9.0)]:  # small steps: O(h³) vs O(h²)
        sigma, sigma_next = torch.full((4,), a, dtype=torch.float64), torch.full((4,), b, dtype=torch.float64)
        D = model.D(z, sigma)
        z_euler = dx.euler_step(z, D, sigma, sigma_next, denoised=True)
        z_heun = dx.heun_step(z, D, z_euler, model.D(z_euler, sigma_next), sigma, sigma_next, denoised=True)
        exact = model.exact(z, a, b)
        heun_error, euler_error = (z_heun - exact).abs().max(), (z_euler - exact).abs().max()
        assert heun_error < 0.2 * euler_error


def test_the_heun_chain_on_a_linear_denoiser_is_closer_to_the_exact_solution_than_euler():
    # On EDM's ρ=7 levels. On the CDF levels the first step is so long (80 -> 1.5 at N = 12,
    # -> 3.5 at N = 50) that Heun's second slope, taken where the ODE bends (σ near s),
    # misleads it, while Euler is exact as long as σ ≫ s: there Euler wins on this problem.
    model = LinearDenoiser()
    plan = BlockPartition(1, 1)
    sigmas = schedule.karras_sigmas(12).tolist()

    def estimate(z, z_in, sigma, layers):
        D = model.D(z, sigma).float()
        return D, D

    final = {}
    for method in ("euler", "heun"):
        D, _ = sampler.integrate(estimate, plan, (64, 1, 8, 8), sigmas, torch.Generator().manual_seed(0), method)
        final[method] = D
    z0, _ = dx.add_noise(torch.zeros(64, 1, 8, 8), torch.full((64,), sigmas[0]),
                         generator=torch.Generator().manual_seed(0))
    exact = model.D(model.exact(z0.double(), sigmas[0], sigmas[-1]), torch.tensor([sigmas[-1]]))
    errors = {m: (final[m].double() - exact).abs().max().item() for m in final}
    assert errors["heun"] < 0.7 * errors["euler"], errors


@pytest.mark.parametrize("method, steps", [("euler", 6), ("heun", 6), ("euler", 50)])
def test_each_evaluation_runs_the_block_owning_its_sigma_and_block_wise_costs_b_times_less(method, steps):
    task = tiny_task()
    calls = []
    for layer in task.model.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    levels = schedule.inference_sigmas(steps)
    counted = {}
    for name, plan in (("blocks", BlockPartition(3, 3, "equi", 0.05)), ("e2e", BlockPartition(3, 1))):
        calls.clear()
        _, cost = task.generate(plan, task.class_labels(1), steps, method, 2.0, torch.Generator().manual_seed(0))
        owners = plan.block_of(levels).tolist()
        expected = owners if method == "euler" else [b for i, b in enumerate(owners) for b in
                                                     ([b] if i == 0 else [b, b])]
        assert cost["network_evals"] == len(expected)
        assert cost["evals_by_block"] == [expected.count(b) for b in range(plan.num_blocks)]
        counted[name] = len(calls)
        assert cost["layer_calls"] == len(calls)
        assert cost["layer_evals_per_image"] == 2 * len(calls)  # guided: conditional + unconditional
    evals = steps if method == "euler" else 2 * steps - 1
    assert counted == {"blocks": evals, "e2e": 3 * evals}


def test_the_evaluator_classifies_real_test_digits(judge):
    model, _ = judge
    dataset = digits.load()
    assert evaluator.accuracy(model, dataset.pixels(dataset.test_images), dataset.test_labels) >= 0.95


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    a = a - a.mean(0)
    assert evaluator.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    shift = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert evaluator.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-9)
    # Scaled by 2: tr(Σ + 4Σ − 2·2Σ) = tr(Σ).
    assert evaluator.frechet_distance(a, 2 * a) == pytest.approx(torch.cov(a.T).trace().item(), rel=1e-6)


def test_a_tiny_run_reports_quality_for_both_modes_and_samples_from_the_cli(tmp_path, judge, capsys):
    _, cache = judge
    for mode in ("blocks", "e2e"):
        out = tmp_path / mode
        out.mkdir()
        shutil.copyfile(cache / evaluator.FILENAME, out / evaluator.FILENAME)  # reuse, don't retrain
        assert cli.main(["train", "dit-digits-tiny", "--mode", mode, "--out", str(out),
                         "--set", "progress=false"]) == 0
        metrics = json.loads((out / "report.json").read_text())["metrics"]
        assert metrics["evaluator_reused"] is True
        assert 0 <= metrics["class_consistency"] <= 1 and metrics["frechet_distance"] > 0
        assert metrics["evaluator_test_accuracy"] >= 0.95
        layers_per_eval = 1 if mode == "blocks" else 3
        assert metrics["sampling_layer_calls"] == metrics["sampling_network_evals"] * layers_per_eval
        assert (out / "samples.png").exists()
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    assert cli.main(["sample", str(tmp_path / "blocks"), "--sampler", "heun", "--cfg", "1.5", "--steps", "4",
                     "--count", "3", "--seed", "5", "--out", str(grid)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert grid.exists() and summary["images"] == 30 and summary["network_evals"] == 7
    assert cli.main(["sample", str(tmp_path / "blocks"), "--class", "10"]) == 2


def test_bad_dit_options_name_the_field():
    config = C.preset("dit-digits-tiny")
    config.model.sampler = "ddim"
    with pytest.raises(ConfigError, match="model.sampler"):
        C.validate(config)
    with pytest.raises(ConfigError, match="model.eval_samples"):
        C.validate(C.override(C.preset("dit-digits-tiny"), ["eval_samples=15"]))
