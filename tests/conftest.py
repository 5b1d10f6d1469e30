import functools

import pytest
import torch

import diffusionblocks_ext as dx

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances for op vs reference: both compute in the accumulation dtype, so only the
# final rounding (and fused multiply-adds) differ.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

requires_ext = pytest.mark.skipif(not dx.HAS_EXT, reason="compiled extension not loaded")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rand(*shape, dtype=torch.float32, device="cpu", generator=None, low=-2.0, high=2.0):
    """Fresh random values (never zeros), drawn in float64 then cast."""
    x = torch.rand(*shape, dtype=torch.float64, generator=generator) * (high - low) + low
    return x.to(dtype=dtype, device=device)


def rand_sigma(n, device="cpu", generator=None, low=0.002, high=80.0, dtype=torch.float32):
    """Per-example σ spread log-uniformly over [low, high]."""
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    return torch.exp(torch.log(torch.tensor(low)) + u * (torch.log(torch.tensor(high / low)))).to(
        dtype).to(device)


def whole_and_resumed(config, tmp_path, stop_after):
    """A run straight through, and the same run stopped after `stop_after` steps and resumed
    from its checkpoint: (whole, resumed) trainers, both finished."""
    from diffusionblocks.train import Trainer

    whole = Trainer(config, tmp_path / "whole")
    whole.run()
    assert Trainer(config, tmp_path / "part").run(stop_after=stop_after) is None
    resumed = Trainer(config, tmp_path / "part")
    resumed.run(resume=True)
    return whole, resumed


def assert_same_model_state(a, b):
    """Every tensor of the two trainers' model state dicts equal, bit for bit."""
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def pytest_configure(config):
    """No test may download: an empty data cache of the session's own, downloads forbidden."""
    import os
    import tempfile

    os.environ["DIFFUSIONBLOCKS_DATA"] = tempfile.mkdtemp(prefix="diffusionblocks-test-cache-")
    os.environ["DIFFUSIONBLOCKS_OFFLINE"] = "1"


@functools.cache
def fixture_data(dataset: str) -> str:
    """A small file in the official format of `dataset` (written once per session) for the
    presets whose data must be downloaded."""
    import tempfile
    from pathlib import Path

    from diffusionblocks.tasks.data import fixtures

    folder = Path(tempfile.mkdtemp(prefix="diffusionblocks-fixtures-"))
    writers = {"cifar10": lambda: fixtures.write_cifar10(folder / "cifar-10-python.tar.gz", train=200, test=40),
               "cifar100": lambda: fixtures.write_cifar100(folder / "cifar-100-python.tar.gz", train=200, test=100),
               "text8": lambda: fixtures.write_text8_zip(folder / "text8.zip", 100_000)}
    return str(writers[dataset]())


def tiny_config(preset, **changes):
    """The preset's TrainConfig without the progress bar, reading fixture data where the
    preset's data must be downloaded, with changes applied to the task's options (`model.*`)
    where they name one of its fields, else to the config itself."""
    from diffusionblocks import config as C

    config = C.preset(preset)
    config.progress = False
    if getattr(config.model, "dataset", "") in ("cifar10", "cifar100", "text8"):
        config.model.data = fixture_data(config.model.dataset)
    for name, value in changes.items():
        setattr(config.model if hasattr(config.model, name) else config, name, value)
    return config
