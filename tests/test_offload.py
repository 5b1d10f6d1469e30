"""Offloading inactive blocks (to memory-mapped files on the CPU, to host memory from a
GPU) changes where the data live, never the result; steps_per_swap groups a block's
steps; activation checkpointing keeps results and cuts saved activations."""

import ctypes
from pathlib import Path

import pytest
import torch

from diffusionblocks import config as C, steps
from diffusionblocks.systems.offload import HostOffload
from diffusionblocks.train import Trainer

from conftest import whole_and_resumed


def tiny(**changes) -> C.TrainConfig:
    config = C.preset("vit-digits-tiny")
    config.progress = False
    config.model.layers = 4
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def resident_bytes(mapping) -> int:
    """Bytes of a memory map that are in this process's memory (its Rss in /proc/self/smaps)."""
    view = ctypes.c_char.from_buffer(mapping)
    start = ctypes.addressof(view)
    del view
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line[:1] in "0123456789abcdef" and int(line.split("-")[0], 16) == start:
            rss = next(l for l in lines[i + 1:] if l.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError("mapping not found in /proc/self/smaps")


def test_disk_offload_keeps_only_the_entered_block_in_memory(tmp_path):
    trainer = Trainer(tiny(blocks=2, offload="disk"), tmp_path)
    files = trainer.offload.files
    for block in (0, 1, 0):
        trainer.plan.enter(block)
        sum(float(p.detach().sum()) for p in files[block].params)  # touch the entered block's pages
        assert resident_bytes(files[block].map) > 0
        assert resident_bytes(files[1 - block].map) == 0, f"block {1 - block} stayed in memory"


@pytest.mark.parametrize("schedule", ["random", "round-robin"])
def test_disk_offload_trains_bit_identically_and_resumes(tmp_path, schedule):
    plain = Trainer(tiny(block_schedule=schedule), tmp_path / "plain")
    expected_report = plain.run()
    offloaded = Trainer(tiny(block_schedule=schedule, offload="disk"), tmp_path / "disk")
    assert offloaded.run(stop_after=7) is None
    resumed = Trainer(tiny(block_schedule=schedule, offload="disk"), tmp_path / "disk")
    report = resumed.run(resume=True)
    expected = weights(plain)
    assert all(torch.equal(p, expected[n]) for n, p in resumed.model.named_parameters())
    assert report["metrics"] == expected_report["metrics"]
    # Every block's parameters and moments are views of its own file.
    for block, file in enumerate(resumed.offload.files):
        assert file.params and all(p.untyped_storage().data_ptr() == file.bytes.data_ptr() for p in file.params)
        state = resumed.optimizers[f"block{block}"].state
        assert all(state[p]["exp_avg"].untyped_storage().data_ptr() == file.bytes.data_ptr() for p in file.params)


def test_steps_per_swap_keeps_a_block_for_k_steps(tmp_path):
    trainer = Trainer(tiny(steps_per_swap=4, e2e_steps=20), tmp_path)
    blocks = [steps.choose_block(trainer.config, s, steps.step_generator(trainer.config.seed, s)) for s in range(40)]
    segments = [blocks[i:i + 4] for i in range(0, 40, 4)]
    assert all(len(set(segment)) == 1 for segment in segments)
    assert len({segment[0] for segment in segments}) == 2  # both blocks get segments
    ones = Trainer(tiny(e2e_steps=20), tmp_path / "k1")
    assert [steps.choose_block(ones.config, s, steps.step_generator(ones.config.seed, s)) for s in range(0, 40, 4)] == \
        [segment[0] for segment in segments]


def test_activation_checkpointing_gives_the_same_step_with_fewer_saved_bytes(tmp_path):
    reports = {flag: Trainer(tiny(mode="e2e", e2e_steps=3, activation_checkpointing=flag), tmp_path / str(flag)).run()
               for flag in (False, True)}
    assert reports[True]["metrics"] == reports[False]["metrics"]
    assert reports[True]["layer_evals"] == reports[False]["layer_evals"]
    saved = {flag: r["memory"]["activation_bytes_per_step"] for flag, r in reports.items()}
    assert saved[True] < 0.6 * saved[False]


def host_offloaded(config, out) -> Trainer:
    """A CPU trainer whose blocks swap through HostOffload exactly as they would on a GPU;
    the "device" copies are CPU copies here, so the bookkeeping runs without a GPU."""
    trainer = Trainer(config, out)
    trainer.offload = HostOffload(trainer.model, trainer.plan, trainer.optimizers, torch.device("cpu"),
                                  trainer.shared_copies)
    return trainer


def snapshot(trainer) -> dict:
    """Every tensor that moves with a block (parameters, moments, shared copies), copied."""
    return {key: slot.get().clone() for slots in trainer.offload.slots for key, slot in slots.items()
            if slot.get() is not None}


def assert_only_active_block_off_host(trainer) -> None:
    offload = trainer.offload
    for block, slots in enumerate(offload.slots):
        for key, slot in slots.items():
            if slot.get() is not None:
                on_host = slot.get().data_ptr() == offload.buffers[key].data_ptr()
                assert on_host == (block != offload.active), key
    if trainer.shared_copies is not None:  # the shared modules run with the active block's copy
        active = trainer.shared_copies.copies[offload.active]
        assert all(p.data_ptr() == active[name].data_ptr() for name, p in trainer.shared_copies.params.items())


@pytest.mark.parametrize("schedule, shared", [("random", "global"), ("round-robin", "global"),
                                              ("random", "per-block")])
def test_host_offload_trains_bit_identically_and_resumes(tmp_path, schedule, shared):
    plain = Trainer(tiny(block_schedule=schedule, shared=shared), tmp_path / "plain")
    expected_report = plain.run()
    assert host_offloaded(tiny(block_schedule=schedule, shared=shared), tmp_path / "host").run(stop_after=7) is None
    resumed = host_offloaded(tiny(block_schedule=schedule, shared=shared), tmp_path / "host")
    report = resumed.run(resume=True)
    expected = weights(plain)
    assert all(torch.equal(p, expected[n]) for n, p in resumed.model.named_parameters())
    assert report["metrics"] == expected_report["metrics"]
    if shared == "per-block":
        for mine, theirs in zip(resumed.shared_copies.copies, plain.shared_copies.copies):
            assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert resumed.offload.active is not None
    assert_only_active_block_off_host(resumed)


@pytest.mark.parametrize("shared", ["global", "per-block"])
def test_host_offload_round_trips_leave_every_moved_tensor_bit_identical(tmp_path, shared):
    trainer = host_offloaded(tiny(e2e_steps=4, shared=shared), tmp_path)
    for step in range(6):
        trainer.train_step(step)
    before = snapshot(trainer)
    assert any("exp_avg" in key for key in before)  # moments exist
    assert (shared == "per-block") == any("shared" in key for key in before)
    for block in [1, 0, 1, 1, 0]:
        trainer.plan.enter(block)
        assert_only_active_block_off_host(trainer)
    after = snapshot(trainer)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_offload_must_match_the_device():
    with pytest.raises(C.ConfigError, match="^offload: cpu moves inactive blocks from the GPU to host memory"):
        C.validate(tiny(offload="cpu"))
    with pytest.raises(C.ConfigError, match="^offload: disk keeps inactive blocks in memory-mapped files"):
        C.validate(tiny(offload="disk", device="cuda"))
    with pytest.raises(C.ConfigError, match="^device: expected cpu, cuda or cuda:N, got 'gpu'"):
        C.validate(tiny(device="gpu"))
    recurrent = C.preset("recurrent-text-tiny")
    recurrent.offload = "disk"
    with pytest.raises(C.ConfigError, match="^offload: the recurrent task trains one block; nothing to offload"):
        C.validate(recurrent)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(C.ConfigError, match="^device: cuda requested, but torch sees no GPU"):
        Trainer(tiny(device="cuda"), tmp_path)


def test_memory_bench_worker_measures_a_block_step_with_offload():
    from diffusionblocks.tools import bench_memory

    spec = {"name": "blocks B=2 + offload", "preset": "vit-digits-tiny", "steps_per_block": 1, "threads": 1,
            "overrides": ["model.layers=4", "blocks=2", "offload=disk"]}
    result = bench_memory.worker(spec)
    assert result["blocks"] == 2 and result["peak_bytes"] >= 0 and result["step_s"] > 0
    assert result["param_bytes"] < result["param_bytes_total"]
    assert result["activation_bytes"] > 0 and result["grad_bytes"] > 0 and result["optimizer_bytes"] > 0
    names = [name for name, _ in bench_memory.configurations(12, 256, 8, 256, [1, 2, 3, 4, 6], 4)]
    assert names[:2] == ["end-to-end", "end-to-end + checkpointing"] and "blocks B=4 + offload" in names


def test_per_block_shared_copies_train_and_run_only_with_their_block(tmp_path):
    trainer = Trainer(tiny(shared="per-block", e2e_steps=4), tmp_path)
    copies = trainer.shared_copies.copies
    initial = [{n: t.clone() for n, t in copy.items()} for copy in copies]
    blocks = [trainer.train_step(step)["block"] for step in range(8)]
    trained = set(blocks)
    for block, copy in enumerate(copies):
        changed = any(not torch.equal(t, initial[block][n]) for n, t in copy.items())
        assert changed == (block in trained)
    # Whenever a block's layers run (here: inference), its own copy is in the model.
    seen = []
    for block in range(trainer.plan.num_blocks):
        for i in trainer.plan.layers(block):
            trainer.model.layers[i].register_forward_pre_hook(
                lambda m, a, block=block: seen.append((block, trainer.model.head.weight.data_ptr())))
    trainer.evaluate()
    assert seen and all(ptr == copies[block]["head.weight"].data_ptr() for block, ptr in seen)


def test_per_block_shared_copies_resume_bit_identically(tmp_path):
    whole, parts = whole_and_resumed(tiny(shared="per-block"), tmp_path, stop_after=9)
    for a, b in zip(whole.shared_copies.copies, parts.shared_copies.copies):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(p, q) for p, q in zip(whole.model.layers.parameters(), parts.model.layers.parameters()))


def test_offload_to_an_unwritable_run_directory_is_a_clear_error(capsys):
    from diffusionblocks import cli

    assert cli.main(["train", "vit-digits-tiny", "--out", "/proc/no-such-run", "--set", "offload=disk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusionblocks: error: out: cannot write to /proc/no-such-run") and err.count("\n") == 1


def test_memory_bench_checks_every_configuration_before_running_any(tmp_path, capsys):
    from diffusionblocks.tools import bench_memory

    assert bench_memory.main(["--preset", "vit-digits-tiny", "--layers", "3", "--blocks", "2", "--out",
                              str(tmp_path)]) == 2  # 3 layers cannot split evenly into B = 2 without a split
    assert capsys.readouterr().err.startswith("bench memory: blocks B=2: split: ")
    assert not (tmp_path / "memory.json").exists()


def test_memory_bench_draws_its_figure(tmp_path):
    from diffusionblocks.tools import bench_memory

    parts = ["param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"]
    results = [{"name": name, "device": "cpu", "peak_bytes": 5 * 2**20, **{p: (i + 1) * 2**18 for p in parts}}
               for i, name in enumerate(["end-to-end", "blocks B=2"])]
    bench_memory.plot(results, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes().startswith(b"\x89PNG")


def test_eval_on_a_named_device_keeps_the_run_offloaded(tmp_path):
    from diffusionblocks import cli
    from diffusionblocks.systems.offload import DiskOffload

    Trainer(tiny(offload="disk", e2e_steps=2), tmp_path).run()
    trainer = cli.trained(tmp_path, "cpu")
    assert trainer.config.offload == "disk" and isinstance(trainer.offload, DiskOffload)
