"""Every task keeps its tensors on the model's device (the trainer's `device` option).

On a machine without a GPU the model goes to the meta device: any tensor a task makes on
the CPU and mixes with the model's raises there exactly as it would on CUDA, so CI catches
device mix-ups in the training step of every task. The evaluation paths read values back
(.item()), which meta tensors cannot; the CUDA tests below cover them on a GPU."""

import json

import pytest
import torch

from diffusionblocks.config import PRESETS
from diffusionblocks.task import to_device
from diffusionblocks.tasks import task_class

from conftest import tiny_config

TINY = sorted(name for name in PRESETS if name.endswith("-tiny"))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def task_on(preset: str, device, **changes):
    config = tiny_config(preset, **changes)
    task = task_class(config.task)(config.model)
    task.model.to(device)
    return config, task


@pytest.mark.parametrize("preset", TINY)
def test_block_losses_stay_on_the_model_device(preset):
    config, task = task_on(preset, "meta")
    plan = config.partition_plan()
    for block in range(plan.num_blocks):
        generator = torch.Generator().manual_seed(block)
        batch = to_device(task.train_batch(block, 4, 0, generator), torch.device("meta"))
        loss, levels = task.block_loss(batch, block, plan, generator)
        assert loss.device.type == "meta" and loss.shape == (4,)
        assert levels.device.type == "meta" and levels.shape == (4,)


@pytest.mark.parametrize("preset", TINY)
def test_end_to_end_loss_stays_on_the_model_device(preset):
    config, task = task_on(preset, "meta", mode="e2e")
    generator = torch.Generator().manual_seed(0)
    batch = to_device(task.train_batch(0, 4, 0, generator), torch.device("meta"))
    loss = task.end_to_end_loss(batch, generator)
    assert loss.device.type == "meta" and loss.shape == (4,)


# --- on a GPU (skipped without one; scripts/gpu_check.sh runs them) ------------------------

def gpu_config(preset: str, **changes):
    return tiny_config(preset, **{"device": "cuda", "steps": 4, "checkpoint_every": 4, **changes})


@requires_cuda
@pytest.mark.parametrize("preset", TINY)
def test_a_gpu_step_matches_the_cpu_step(preset, tmp_path):
    """Same batch, σ's and Philox noise on both devices: the first loss agrees to float rounding."""
    from diffusionblocks.train import Trainer

    losses = {device: Trainer(tiny_config(preset, device=device), tmp_path / device).train_step(0)["loss"]
              for device in ("cpu", "cuda")}
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-4, abs=1e-6)


@requires_cuda
@pytest.mark.parametrize("preset", TINY)
def test_a_gpu_run_trains_evaluates_samples_and_evaluates_again_on_the_cpu(preset, tmp_path):
    from diffusionblocks import cli
    from diffusionblocks.train import Trainer

    out = tmp_path / "run"
    trainer = Trainer(gpu_config(preset), out)
    report = trainer.run()
    assert report["device"].startswith("cuda") and report["backend"] in ("ext-cuda", "reference")
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    floats = {k: v for k, v in report["metrics"].items() if isinstance(v, float)}
    assert floats and all(torch.isfinite(torch.tensor(v)) for v in floats.values())
    if hasattr(trainer.task, "sample"):
        assert cli.main(["sample", str(out), "--count", "1"]) == 0
    assert cli.main(["eval", str(out), "--device", "cpu"]) == 0


@requires_cuda
@pytest.mark.parametrize("shared", ["global", "per-block"])
def test_gpu_host_offload_keeps_one_block_on_the_gpu_and_trains_like_no_offload(tmp_path, shared):
    from diffusionblocks.train import Trainer

    from torch.nn.attention import SDPBackend, sdpa_kernel

    trainers = {}
    for offload in ("none", "cpu"):
        config = gpu_config("vit-digits-tiny", layers=4, offload=offload, steps=8, shared=shared)
        trainers[offload] = Trainer(config, tmp_path / offload)
        # the math attention: the fused kernels' backward may sum in a different order per run
        with sdpa_kernel(SDPBackend.MATH):
            trainers[offload].run()
    plain, offloaded = trainers["none"], trainers["cpu"]
    # Offload only copies, so this is equality up to any GPU nondeterminism left; a block
    # that lost its updates or trained on stale weights would differ by the updates themselves.
    flat = lambda trainer: torch.cat([p.detach().cpu().flatten() for p in trainer.model.parameters()])
    assert (flat(offloaded) - flat(plain)).norm() <= 1e-5 * flat(plain).norm()
    host = offloaded.offload
    for block, slots in enumerate(host.slots):
        want = "cuda" if block == host.active else "cpu"
        for key, slot in slots.items():
            if slot.get() is not None:
                assert slot.get().device.type == want and host.buffers[key].is_pinned(), key
    shared = [p for n, p in offloaded.model.named_parameters() if not n.startswith("layers.")]
    assert shared and all(p.device.type == "cuda" for p in shared)


@requires_cuda
def test_memory_bench_measures_the_gpu_peak_with_host_offload():
    from diffusionblocks.tools import bench_memory

    spec = {"name": "blocks B=2 + offload", "preset": "vit-digits-tiny", "steps_per_block": 1, "threads": 1,
            "device": "cuda", "overrides": ["model.layers=4", "blocks=2", "offload=cpu"]}
    result = bench_memory.worker(spec)
    assert result["device"].startswith("cuda") and result["peak_bytes"] > 0
    assert result["param_bytes"] < result["param_bytes_total"]


@requires_cuda
def test_block_parallel_runs_every_collective_through_nccl_on_one_gpu(tmp_path):
    """NCCL refuses two ranks on one GPU, so with one GPU this is the closest check: one rank
    takes every block and runs each collective of the loop through NCCL (the shared-module
    all-reduce, the stop flag, the gather, the barrier), and ends where the serial GPU run
    ends (up to GPU nondeterminism; a skipped or doubled average would move it by far more)."""
    from diffusionblocks.systems import checkpoint
    from diffusionblocks import config as C
    from diffusionblocks.train import Trainer
    from test_parallel import FIELDS, torchrun

    fields = FIELDS + ["shared=global", "shared_sync_every=2", "device=cuda"]
    out = tmp_path / "parallel"
    done = torchrun(1, "vit-digits-tiny", "--parallel", "blocks", "--out", str(out), "--set", *fields)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 18 and report["device"] == "cuda:0"
    serial = Trainer(C.override(C.preset("vit-digits-tiny"), fields), tmp_path / "serial")
    serial.run()
    saved = checkpoint.load(out).weights
    for name, want in serial.model.state_dict().items():
        got, want = saved[name].float(), want.detach().cpu().float()
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-6, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process")
def test_block_parallel_on_two_gpus_with_nccl(tmp_path):
    from test_parallel import FIELDS, torchrun

    done = torchrun(2, "vit-digits-tiny", "--parallel", "blocks", "--device", "cuda", "--out", str(tmp_path),
                    "--set", *FIELDS, "shared=per-block")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 18 and report["device"] == "cuda:0"


def test_cuda_device_choice_follows_the_index_or_the_local_rank(monkeypatch):
    """The device logic alone, with torch.cuda's answers stubbed (no GPU needed)."""
    from types import SimpleNamespace

    from diffusionblocks.errors import ConfigError
    from diffusionblocks.systems.devices import training_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    config = tiny_config("vit-digits-tiny", device="cuda")
    assert training_device(config, None) == torch.device("cuda", 1)  # the current GPU
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert training_device(config, SimpleNamespace(rank=6)) == torch.device("cuda", 2)  # 6 mod 4 GPUs
    config.device = "cuda:3"
    assert training_device(config, SimpleNamespace(rank=0)) == torch.device("cuda", 3)  # an index wins
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 2), torch.device("cuda", 3)]
    config.device = "cuda:4"
    with pytest.raises(ConfigError, match=r"^device: cuda:4 requested, but torch sees 4 GPU\(s\)"):
        training_device(config, None)
    config.device = "cpu"
    assert training_device(config, None) == torch.device("cpu") and len(chosen) == 3
