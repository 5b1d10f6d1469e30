"""`diffusionblocks bench train`: its report holds every configuration, the ratios and the
breakdown. Correctness only: no assertion on how fast anything is."""

import json
import math

from diffusionblocks.tools import bench_train

FEW_STEPS = ["--steps", "3", "--warmup", "1", "--profile-steps", "1"]


def run(tmp_path, *args) -> dict:
    assert bench_train.main([*args, *FEW_STEPS, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "train.json").read_text())


def check_report(report: dict, blocks: int) -> None:
    rows = report["rows"]
    assert [r["configuration"] for r in rows] == ["e2e"] + [f"block {b}" for b in range(blocks)]
    assert [r["mode"] for r in rows] == ["e2e"] + ["blocks"] * blocks
    assert report["blocks"] == blocks and len(report["ratio_to_ideal"]) == blocks
    assert all(math.isfinite(r) and r > 0 for r in report["ratio_to_ideal"])
    assert [r["ratio_to_ideal"] for r in rows[1:]] == report["ratio_to_ideal"]
    for row in rows:
        assert row["samples_per_s"] > 0
        spread = row["step_s"]
        assert 0 < spread["min"] <= spread["p10"] <= spread["median"] <= spread["p90"] <= spread["max"]
        assert set(row["breakdown"]) == {*bench_train.RANGES, "our_ops", "host_waits"}
        for part in row["breakdown"].values():
            assert part["ms_per_step"] >= 0 and part["share"] >= 0
    for key in ("platform", "torch", "threads", "device_name"):
        assert key in report["machine"]


def test_digits_end_to_end_and_every_block(tmp_path, capsys):
    report = run(tmp_path, "vit-digits-tiny", "--blocks", "2")
    check_report(report, 2)
    assert report["arguments"]["preset"] == "vit-digits-tiny"
    # the trainer marks its phases: forward and backward take time in every configuration
    assert all(r["breakdown"][part]["ms_per_step"] > 0 for r in report["rows"] for part in ("forward", "backward"))
    assert "ratio to ideal" in capsys.readouterr().out


def test_paper_preset_reads_fixture_data(tmp_path):
    check_report(run(tmp_path, "vit-cifar100-tiny", "--batch-size", "8", "--set", "model.layers=2", "blocks=2"), 2)


def test_cli_dispatches_and_rejects_a_bad_field(tmp_path, capsys):
    from diffusionblocks import cli

    assert cli.main(["bench", "train", "vit-digits-tiny", "--set", "blocks=0", "--out", str(tmp_path)]) == 2
    assert "blocks" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()
