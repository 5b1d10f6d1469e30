"""The trainer's speed features keep its behaviour: the non-finite skip decided on the device
(fused AdamW, figures read every log_every steps) skips and stops exactly where the host
decision does; a skipped fused step changes nothing; bf16 autocast reaches the layers only;
compiled layers compute what eager ones do; the ops' value checks can be trusted away.
On a GPU, a window of training steps runs with synchronising calls made errors."""

import pytest
import torch

import diffusionblocks_ext as dx
from diffusionblocks import config as C
from diffusionblocks.systems.logs import MetricsLog
from diffusionblocks.train import Trainer, TrainingError
from test_reliability import nan_on, tiny
from test_trainer import fixed_loss

DEVICE_SKIP = dict(adamw="fused", log_every=4)


def test_the_device_side_skip_skips_and_counts_the_same_steps_as_the_host(tmp_path):
    runs = {}
    for name, fields in (("host", dict(adamw="fused", log_every=1)), ("device", DEVICE_SKIP)):
        trainer = Trainer(tiny(e2e_steps=6, **fields), tmp_path / name)
        nan_on(trainer, {2, 5, 6})
        trainer.run()
        runs[name] = trainer
        assert trainer.counters["nonfinite_steps"] == 3
    logs = {name: MetricsLog.read(tmp_path / name / "metrics.jsonl") for name in runs}
    assert [r["step"] for r in logs["device"] if r.get("skipped")] == [3, 6, 7]
    assert logs["host"] == logs["device"]  # the same records, read at other moments
    for (name, a), b in zip(runs["host"].model.state_dict().items(), runs["device"].model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_device_side_skip_stops_at_the_same_step_naming_it(tmp_path):
    trainer = Trainer(tiny(e2e_steps=10, max_nonfinite_steps=3, **DEVICE_SKIP), tmp_path)
    nan_on(trainer, {4, 5, 6})
    with pytest.raises(TrainingError, match=r"step 7: 3 consecutive non-finite .* block \d, sigma in \["):
        trainer.run()


def test_a_skipped_fused_step_leaves_weights_and_optimizer_state_unchanged(tmp_path):
    trainer = Trainer(tiny(block_schedule="round-robin", **DEVICE_SKIP), tmp_path)
    for step in range(2):  # every block's optimizer state exists from here on
        trainer.train_step(step)
    nan_on(trainer, {0})
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    states = {key: {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
              for key, opt in trainer.optimizers.items()}
    pending = trainer.start_step(2)
    assert pending.skipped is None  # decided on the device, not read yet
    assert trainer.settle([pending])[0]["skipped"]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for key, opt in trainer.optimizers.items():
        for p, s in opt.state.items():
            for k, v in s.items():
                assert torch.equal(v, states[key][id(p)][k]), (key, k)


def test_bf16_autocasts_the_layers_and_leaves_the_rest_in_float32(tmp_path):
    trainer = Trainer(tiny(precision="bf16"), tmp_path)
    dtypes = {}

    def note(name):
        def hook(module, args, out):
            dtypes.setdefault(name, out.dtype)  # returns None: the output stays as it is
        return hook

    layer = trainer.model.layers[0]
    layer.mlp[0].register_forward_hook(note("inside"))
    layer.register_forward_hook(note("leaving"))
    trainer.model.head.register_forward_hook(note("head"))
    record = trainer.train_step(0)
    assert dtypes == {"inside": torch.bfloat16, "leaving": torch.float32, "head": torch.float32}
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_a_bf16_run_learns(tmp_path):
    trainer = Trainer(tiny(precision="bf16", e2e_steps=40, lr=1e-2), tmp_path)
    before = fixed_loss(trainer)
    trainer.run()
    assert fixed_loss(trainer) < 0.5 * before


def test_compiled_layers_compute_what_eager_layers_do(tmp_path):
    losses = {}
    for compiled in (False, True):
        trainer = Trainer(tiny(compile=compiled), tmp_path / str(compiled))
        losses[compiled] = [trainer.train_step(s)["loss"] for s in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_values_trusted_skips_only_the_value_checks():
    sigma = torch.tensor([0.5, -1.0])
    with pytest.raises(ValueError, match="sigma: expected every value > 0"):
        dx.reference.denoise(torch.ones(2, 3), torch.ones(2, 3), sigma)
    with dx.values_trusted():
        dx.reference.denoise(torch.ones(2, 3), torch.ones(2, 3), sigma)  # no read of σ's values
        with pytest.raises(ValueError, match="sigma"):  # shapes are still checked
            dx.reference.denoise(torch.ones(2, 3), torch.ones(2, 3), sigma[:1])
    with pytest.raises(ValueError, match="sigma: expected every value > 0"):
        dx.reference.denoise(torch.ones(2, 3), torch.ones(2, 3), sigma)


@pytest.mark.parametrize("fields, message", [
    (dict(log_every=10, adamw="for-loop"), "log_every: 10 steps between reads needs .* adamw=fused"),
    (dict(compile=True, activation_checkpointing=True), "compile: not with activation_checkpointing"),
    (dict(precision="fp16"), "precision: expected one of fp32, bf16"),
    (dict(adamw="sgd"), "adamw: expected one of"),
])
def test_bad_speed_fields_are_named(fields, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(tiny(**fields))


def test_the_defaults_follow_the_device():
    config = tiny()
    assert (config.adamw_implementation, config.settle_every) == ("for-loop", 1)
    config.device = "cuda"
    assert (config.adamw_implementation, config.settle_every) == ("fused", 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["vit-digits-tiny", "dit-digits-tiny", "mdm-text-tiny", "ar-text-tiny"])
def test_gpu_training_steps_never_wait_for_the_device(tmp_path, preset):
    from conftest import tiny_config

    trainer = Trainer(tiny_config(preset, device="cuda", log_every=50), tmp_path)
    for step in range(3):  # first steps: memory measurement, lazy initialisation
        trainer.start_step(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [trainer.start_step(step) for step in range(3, 13)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    records = trainer.settle(pending)
    assert len(records) == 10 and all(r["loss"] == r["loss"] for r in records)
