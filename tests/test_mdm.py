"""Masked diffusion (MD4) task: the linear schedule's weight and masking rate, the exact
ELBO of an oracle, block isolation, the t -> block lookup, the ancestral sampler and the
CLI on the tiny preset."""

import json
import math

import pytest
import torch
from torch import nn

from diffusionblocks import cli
from diffusionblocks.tasks import mdm
from diffusionblocks import config as C, steps
from diffusionblocks.errors import ConfigError
from diffusionblocks.partition import BlockPartition, MaskingAxis
from diffusionblocks.task import SampleRequest
from diffusionblocks.train import Trainer

from conftest import tiny_config

SHARED = ("token_embed.", "pos_embed", "time_embed.", "head_norm.", "head.")
TOY_P = torch.tensor([0.5, 0.25, 0.15, 0.1])  # i.i.d. characters "abcd" with these probabilities


def tiny(**changes) -> C.TrainConfig:
    return tiny_config("mdm-text-tiny", **changes)


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    """A text of i.i.d. characters with known probabilities TOY_P."""
    ids = torch.multinomial(TOY_P, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("toy") / "toy.txt"
    path.write_text("".join("abcd"[i] for i in ids), encoding="utf-8")
    return str(path)


class Oracle(nn.Module):
    """Outputs the true distribution of the i.i.d. toy text at every position, whatever x_t."""

    def __init__(self, mask_id: int, num_layers: int):
        super().__init__()
        self.mask_id = mask_id
        self.layers = nn.ModuleList(nn.Identity() for _ in range(num_layers))

    def forward(self, xt, t, layers):
        return TOY_P.log().expand(xt.shape + (len(TOY_P),)).clone()


# --- the schedule and the loss ------------------------------------------------------------
def test_linear_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha():
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    a = mdm.alpha(t)
    (da,) = torch.autograd.grad(a.sum(), t)
    assert torch.allclose(a, 1 - t)
    assert torch.allclose(mdm.loss_weight(t), -da / (1 - a))
    assert torch.allclose(mdm.loss_weight(t), 1 / t)


def test_masking_rate_is_one_minus_alpha():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x0 = torch.zeros(5, 20_000, dtype=torch.int64)
    xt = mdm.mask_tokens(x0, t, mask_id=7, generator=torch.Generator().manual_seed(0))
    rate = (xt == 7).double().mean(dim=1)
    tolerance = 4 * torch.sqrt(t * (1 - t) / x0.shape[1]) + 1e-12
    assert torch.all((rate - (1 - mdm.alpha(t))).abs() <= tolerance), rate
    assert torch.all(xt[(xt != 7)] == 0)


def test_md4_loss_is_weighted_ce_over_masked_positions_divided_by_T():
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    x0 = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    mask_id = 3
    xt = torch.tensor([[3, 1, 3, 0, 1], [2, 3, 3, 3, 0]])
    t = torch.tensor([0.4, 0.8], dtype=torch.float64)
    got = mdm.md4_loss(logits, x0, xt, t, mask_id)
    log_p = logits.log_softmax(dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    expected = [-(log_p[i][xt[i] == mask_id]).sum() / t[i].item() / 5 for i in range(2)]
    assert torch.allclose(got, torch.stack(expected).float(), rtol=1e-5)
    assert torch.equal(mdm.md4_loss(logits, x0, x0, t, mask_id), torch.zeros(2))  # nothing masked


def test_an_oracle_model_gets_the_exact_elbo(toy_file):
    """For i.i.d. text the true p(x_n | x_t) is p(x_n): E[w(t)·Σ_masked −log p] = −log p(x) at
    every t, so the ELBO equals the exact NLL (at t = 1 deterministically), and the
    validation estimator returns the true entropy of the windows."""
    task = mdm.MaskedDiffusion(mdm.MDMConfig(data=toy_file, seq_len=32, layers=3, width=8, heads=2,
                                             eval_windows=64, eval_t_samples=6))
    task.model = Oracle(task.mask_id, 3)
    x0 = task.validation[:4]
    nll = -TOY_P.log()[x0].sum(dim=1) / x0.shape[1]  # exact, nats per character
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(mdm.md4_loss(task.model(x0, ones, range(3)), x0, torch.full_like(x0, task.mask_id),
                                       ones, task.mask_id), nll.float(), rtol=1e-6)
    generator = torch.Generator().manual_seed(0)
    for t_value in (0.05, 0.3, 0.7):
        repeats = 3000
        rows = x0.repeat(repeats, 1)
        t = torch.full((len(rows),), t_value, dtype=torch.float64)
        xt = mdm.mask_tokens(rows, t, task.mask_id, generator)
        loss = mdm.md4_loss(task.model(xt, t, range(3)), rows, xt, t, task.mask_id).view(repeats, 4).mean(0)
        assert torch.allclose(loss, nll.float(), rtol=0.05), (t_value, loss, nll)
    # The whole evaluation: stratified t, block routing, nats -> bits per character.
    entropy_bits = (-TOY_P.log()[task.validation].mean() / math.log(2)).item()
    for blocks in (1, 3):
        bpc = task.evaluate(BlockPartition(3, blocks, gamma=0.05, axis="t"), "blocks")["test_bpc"]
        assert bpc == pytest.approx(entropy_bits, rel=0.02)


def test_block_losses_over_ranges_that_tile_0_1_average_to_the_full_loss():
    """E over t in (0, 1] = Σ_b width_b · E over block b's range; widths are 1/B."""
    task = mdm.MaskedDiffusion(tiny().model)
    torch.manual_seed(0)
    for p in task.model.parameters():  # open the zero-initialised gates so t matters
        p.data.normal_(0, 0.3)
    x0 = task.validation[:1].repeat(2000, 1)
    ranges = MaskingAxis(3)
    layers = range(task.num_layers)
    with torch.no_grad():
        full = task.loss_on_range(x0.repeat(3, 1), (0.0, 1.0), layers, torch.Generator().manual_seed(1))[0]
        parts = [task.loss_on_range(x0, ranges.level_range(b), layers, torch.Generator().manual_seed(2 + b))[0]
                 for b in range(3)]
    assert abs(sum(ranges.level_range(b)[1] - ranges.level_range(b)[0] for b in range(3)) - 1) < 1e-12
    means = torch.stack([p.mean() for p in parts])
    assert means.max() - means.min() > 0.1  # the ranges really differ for this model
    assert means.mean().item() == pytest.approx(full.mean().item(), rel=0.03)


# --- the blocks' t ranges ------------------------------------------------------------------
def test_t_to_block_lookup_is_half_open_in_alpha():
    ranges = MaskingAxis(3)
    assert [ranges.level_range(b) for b in range(3)] == [(1 - 1 / 3, 1.0), (1 - 2 / 3, 1 - 1 / 3), (0.0, 1 - 2 / 3)]
    t = torch.tensor([1.0, 0.9, 2 / 3, 1 - 2 / 6, 0.5, 1 / 3, 1 - 4 / 6, 0.2, 1e-9, 0.0], dtype=torch.float64)
    assert ranges.block_of(t).tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    eps = 1e-12
    assert ranges.block_of(torch.tensor([2 / 3 + eps, 1 / 3 + eps], dtype=torch.float64)).tolist() == [0, 1]
    assert MaskingAxis(2).block_of(torch.tensor([0.5, 0.5 + eps], dtype=torch.float64)).tolist() == [1, 0]
    assert MaskingAxis(1).block_of(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 0, 0]


def test_training_ranges_widen_by_gamma_of_the_width_and_block_draws_stay_inside():
    ranges = MaskingAxis(3, gamma=0.05)
    pad = 0.05 / 3
    expected = [(2 / 3 - pad, 1.0), (1 / 3 - pad, 2 / 3 + pad), (0.0, 1 / 3 + pad)]
    for b, (lo, hi) in enumerate(expected):
        assert ranges.training_range(b) == pytest.approx((lo, hi), abs=1e-12)
        t = mdm.stratified_t(300, ranges.training_range(b), torch.Generator().manual_seed(b))
        assert lo < t.min() and t.max() <= hi
        # one draw per stratum
        strata = ((hi - t) / (hi - lo) * 300).floor().long().clamp(max=299)
        assert torch.equal(strata.sort().values, torch.arange(300))


# --- training --------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [0, 1, 2])
def test_a_block_step_runs_and_changes_only_that_block_and_the_shared_modules(tmp_path, block):
    trainer = Trainer(tiny(layers=3, blocks=3), tmp_path)
    calls = []
    for index, layer in enumerate(trainer.model.layers):
        layer.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    records = [trainer.block_step(block, step, steps.step_generator(trainer.config.seed, step)) for step in range(2)]
    assert calls == [block, block]
    own = tuple(f"layers.{i}." for i in trainer.plan.layers(block))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n in before if n.startswith(own + SHARED)}
    assert any(n.startswith(own) for n in changed) and any(n.startswith(SHARED) for n in changed)
    lo, hi = MaskingAxis(3, 0.05).training_range(block)
    for record in records:
        assert lo <= record["t_min"] <= record["t_max"] <= hi and math.isfinite(record["loss"])


def test_end_to_end_runs_every_layer_over_the_whole_t_range(tmp_path):
    trainer = Trainer(tiny(mode="e2e"), tmp_path)
    calls = []
    for index, layer in enumerate(trainer.model.layers):
        layer.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    batch = trainer.task.train_batch(0, 64, 0, torch.Generator().manual_seed(0))
    loss = trainer.task.end_to_end_loss(batch, torch.Generator().manual_seed(0))
    assert calls == [0, 1] and loss.shape == (64,) and torch.isfinite(loss).all()


# --- sampling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler_task():
    task = mdm.MaskedDiffusion(tiny(layers=3).model)
    task.model.eval()
    return task


def test_sampling_is_deterministic_for_a_seed_and_unmasks_everything(sampler_task):
    plan = BlockPartition(3, 3, axis="t")
    request = dict(count=3, tokens=10, steps=5)
    a = sampler_task.sample(plan, "blocks", SampleRequest(seed=4, **request))
    b = sampler_task.sample(plan, "blocks", SampleRequest(seed=4, **request))
    c = sampler_task.sample(plan, "blocks", SampleRequest(seed=5, **request))
    assert a["samples"] == b["samples"] != c["samples"]
    assert len(a["samples"]) == 3 and all(len(s) == 10 for s in a["samples"])
    ids = sampler_task.generate(plan, 8, 3, torch.Generator().manual_seed(0))
    assert ids.shape == (8, sampler_task.options.seq_len)
    assert ids.min() >= 0 and ids.max() < sampler_task.corpus.vocab_size  # no [MASK] left at t = 0


def test_each_sampling_step_is_served_by_the_block_holding_t_and_the_masking_rate_follows_t(sampler_task):
    plan = BlockPartition(3, 3, axis="t")
    seen = []
    forward = type(sampler_task.model).forward

    def spy(xt, t, layers):
        seen.append((t[0].item(), tuple(layers), (xt == sampler_task.mask_id).double().mean().item()))
        return forward(sampler_task.model, xt, t, layers)

    sampler_task.model.forward = spy
    try:
        sampler_task.generate(plan, 3, 3, torch.Generator().manual_seed(0))  # S = B: each block once
        assert [layers for _, layers, _ in seen] == [(0,), (1,), (2,)]
        seen.clear()
        sampler_task.generate(plan, 400, 6, torch.Generator().manual_seed(0))
    finally:
        del sampler_task.model.forward
    assert [layers for _, layers, _ in seen] == [(0,), (0,), (1,), (1,), (2,), (2,)]
    n = 400 * sampler_task.options.seq_len
    for t, _, rate in seen:  # before the step at t, a fraction t of positions is still masked
        assert abs(rate - t) <= 4 * math.sqrt(t * (1 - t) / n) + 1e-12, (t, rate)
    assert mdm.MaskedDiffusion._layer_evals(plan, 6) == 6


def test_sampling_keeps_a_prompt_and_refuses_too_many_tokens(sampler_task):
    plan = BlockPartition(3, 1, axis="t")
    prompt = sampler_task.corpus.decode(sampler_task.validation[0, :4])
    out = sampler_task.sample(plan, "e2e", SampleRequest(prompt=prompt, tokens=6, count=2, steps=4))
    assert all(s.startswith(prompt) and len(s) == 10 for s in out["samples"])
    assert out["layer_evals"] == 4 * 3
    with pytest.raises(ConfigError, match="tokens: expected at most 12"):
        sampler_task.sample(plan, "e2e", SampleRequest(prompt=prompt, tokens=13))
    with pytest.raises(ConfigError, match="prompt: characters not in the corpus vocabulary"):
        sampler_task.sample(plan, "e2e", SampleRequest(prompt="\x00"))


# --- config and the command line -------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("partition", "uniform", "partition: the masked-diffusion task"),
    ("data", "/no/such/file.txt", "model.data: no such file"),
    ("eval_t_samples", 0, "model.eval_t_samples"),
])
def test_bad_configs_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        C.validate(tiny(**{field: value}))


def test_cli_train_then_sample_on_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "mdm-text-tiny", "--out", str(out), "--set", "progress=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["task"], report["mode"], report["blocks"], report["steps"]) == ("mdm", "blocks", 2, 20)
    assert 0 < report["metrics"]["test_bpc"] < 10
    assert sum(report["metrics"]["test_bpc_by_t"].values()) == pytest.approx(report["metrics"]["test_bpc"])
    assert len(report["metrics"]["samples"]) == 2
    assert report["layer_evals"] == 20  # 1 layer per block step
    for name in ("config.json", "metrics.jsonl", "loss_by_block.png", "samples.txt", "checkpoint"):
        assert (out / name).exists(), name
    capsys.readouterr()
    path = tmp_path / "samples.txt"
    args = ["sample", str(out), "--tokens", "12", "--steps", "4", "--count", "3", "--seed", "7"]
    assert cli.main(args + ["--out", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["layer_evals"] == 4
    assert len(summary["samples"]) == 3 and all(len(s) == 12 for s in summary["samples"])
    assert summary["samples"][0] in path.read_text(encoding="utf-8")
    assert cli.main(args) == 0  # same seed, same samples, by default in a file in the run directory
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["samples"] == summary["samples"]
    assert again["file"] == str(out / "samples-blocks-S4-seed7.txt") and (out / "samples-blocks-S4-seed7.txt").exists()
    assert cli.main(["sample", str(out), "--tokens", "100"]) == 2
    assert "tokens: expected at most 16" in capsys.readouterr().err
