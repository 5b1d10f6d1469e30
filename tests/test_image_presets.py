"""The paper's image presets (CIFAR-100 ViT, CIFAR-10 DiT) on fixture archives in the
official format: their tiny versions train an epoch through the CLI in both modes, the
DiT writes its samples for the FID tools, the on-device augmentation is a pure function of
the seed and survives a resume, and the full presets take their first steps."""

import json

import numpy as np
import pytest
import torch

from diffusionblocks import cli, config as C
from diffusionblocks.tasks.data import fixtures, images
from diffusionblocks.tools import bench_presets, export_images
from diffusionblocks.train import Trainer


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    return {"cifar10": fixtures.write_cifar10(folder / "cifar-10-python.tar.gz", train=256, test=60),
            "cifar100": fixtures.write_cifar100(folder / "cifar-100-python.tar.gz", train=256, test=100)}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No test may download: an empty cache, downloads forbidden."""
    monkeypatch.setenv("DIFFUSIONBLOCKS_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")


def run_cli(capsys, *argv) -> int:
    code = cli.main(list(argv))
    capsys.readouterr()
    return code


@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_vit_cifar100_tiny_trains_an_epoch_and_evaluates(tmp_path, archives, capsys, mode):
    out = tmp_path / mode
    assert run_cli(capsys, "train", "vit-cifar100-tiny", "--mode", mode, "--out", str(out),
                   "--set", f"model.data={archives['cifar100']}", "progress=false") == 0
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["e2e_steps"] == round(256 / 32)  # one epoch of the fixture's 256 images
    assert report["steps"] == (3 if mode == "blocks" else 1) * config["e2e_steps"]
    assert 0 <= report["metrics"]["test_accuracy"] <= 1
    assert run_cli(capsys, "eval", str(out)) == 0


@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_dit_cifar10_tiny_writes_samples_for_fid_tools(tmp_path, archives, capsys, mode):
    out = tmp_path / mode
    assert run_cli(capsys, "train", "dit-cifar10-tiny", "--mode", mode, "--out", str(out),
                   "--set", f"model.data={archives['cifar10']}", "progress=false") == 0
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert 0 <= metrics["class_consistency"] <= 1 and metrics["frechet_distance"] > 0
    pngs = sorted((out / "fid-samples").glob("*.png"))
    assert len(pngs) == 20
    from PIL import Image

    assert Image.open(pngs[0]).size == (32, 32) and Image.open(pngs[0]).mode == "RGB"
    stored = np.load(out / "fid-samples.npz")
    assert stored["arr_0"].shape == (20, 32, 32, 3) and stored["arr_0"].dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(pngs[3])), stored["arr_0"][3])
    assert sorted(stored["labels"].tolist()) == sorted([c for c in range(10) for _ in range(2)])
    assert (out / "samples.png").exists()
    grid = tmp_path / f"grid-{mode}.png"
    assert cli.main(["sample", str(out), "--count", "2", "--steps", "3", "--out", str(grid)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert grid.exists() and summary["images"] == 20 and 0 <= summary["class_consistency"] <= 1


def test_the_data_stays_uint8_and_moves_to_the_device_once(archives):
    config = C.override(C.preset("vit-cifar100-tiny"), [f"model.data={archives['cifar100']}", "progress=false"])
    trainer = Trainer(config, None)
    trainer.train_step(0)
    data = trainer.task.data
    assert data.train_images.dtype == torch.uint8 and data.num_classes == 100
    held = data.train_images
    trainer.train_step(1)
    assert trainer.task.data.train_images is held  # not copied again


def test_crop_and_flip_are_the_standard_augmentation_and_a_pure_function_of_the_generator():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    a = images.random_flip(images.random_crop(batch, 4, torch.Generator().manual_seed(5)),
                           torch.Generator().manual_seed(6))
    b = images.random_flip(images.random_crop(batch, 4, torch.Generator().manual_seed(5)),
                           torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    # Each output is an 8×8 window of the image zero-padded by 4, possibly mirrored.
    padded = torch.nn.functional.pad(batch, (4,) * 4)
    for i in range(len(batch)):
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)
    flipped = images.random_flip(batch, torch.Generator().manual_seed(1))
    mirrored = sum(torch.equal(flipped[i], batch[i].flip(-1)) for i in range(len(batch)))
    assert 0 < mirrored < len(batch)


def test_a_resumed_cifar_run_draws_the_same_augmented_batches(tmp_path, archives):
    def config():
        return C.override(C.preset("vit-cifar100-tiny"), [f"model.data={archives['cifar100']}", "progress=false",
                                                          "e2e_epochs=0", "e2e_steps=4", "checkpoint_every=3"])

    whole = Trainer(config(), tmp_path / "whole")
    whole.run()
    Trainer(config(), tmp_path / "cut").run(stop_after=5)
    resumed = Trainer(config(), tmp_path / "cut")
    resumed.run(resume=True)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_cifar_offline_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["train", "vit-cifar100-tiny", "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "cifar-100-python.tar.gz" in message and "DIFFUSIONBLOCKS_OFFLINE" in message


def test_bad_image_options_name_the_field(archives):
    with pytest.raises(C.ConfigError, match="model.patch_size"):
        C.validate(C.override(C.preset("vit-cifar100"), ["model.patch_size=3"]))
    with pytest.raises(C.ConfigError, match="model.dataset"):
        C.validate(C.override(C.preset("vit-cifar100"), ["model.dataset=imagenet"]))
    with pytest.raises(C.ConfigError, match="model.eval_samples"):
        C.validate(C.override(C.preset("dit-cifar10"), ["model.eval_samples=15"]))
    with pytest.raises(C.ConfigError, match="batch_size"):
        Trainer(C.override(C.preset("vit-cifar100-tiny"), [f"model.data={archives['cifar100']}", "batch_size=999"]),
                None).train_step(0)


def test_the_full_image_presets_take_their_first_steps_on_full_shape_data(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_presets, "FIXTURE_IMAGES", (64, 20))
    results = bench_presets.main(["--presets", "vit-cifar100", "dit-cifar10", "--batch-size", "2",
                                  "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert results == 0
    report = json.loads((tmp_path / "presets.json").read_text())
    assert {(r["preset"], r["mode"]) for r in report["results"]} == {
        (p, m) for p in ("vit-cifar100", "dit-cifar10") for m in ("e2e", "blocks")}
    assert all(np.isfinite(r["last_loss"]) for r in report["results"])


def test_the_real_split_exports_in_the_layout_of_the_samples(tmp_path, archives, capsys):
    out = tmp_path / "real"
    assert export_images.main(["cifar10", "--data", str(archives["cifar10"]), "--out", str(out)]) == 0
    stored = np.load(tmp_path / "real.npz")
    data = images.load(images.ImageDataOptions(dataset="cifar10", data=str(archives["cifar10"])))
    assert np.array_equal(stored["arr_0"], data.test_images.permute(0, 2, 3, 1).numpy())
    assert len(list(out.glob("*.png"))) == len(data.test_labels)
    assert export_images.main(["cifar100", "--out", str(tmp_path / "absent")]) == 2
