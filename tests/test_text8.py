"""text8 for the text tasks, on small fixture zips in text8's format (no network): the
90/5/5 split, storage and batch dtypes, the ways to give the file, the cache's errors, the
fields model.dataset / model.eval_split / model.eval_windows, the epoch size, and one
epoch of the tiny text8 presets through the trainer; and the default corpus unchanged."""

import json
import zipfile

import pytest
import torch

from diffusionblocks import cli
from diffusionblocks import config as C
from diffusionblocks.errors import ConfigError
from diffusionblocks.tasks.ar import AutoregressiveLM
from diffusionblocks.tasks.data import fetch, fixtures, text, text8
from diffusionblocks.tasks.mdm import MaskedDiffusion
from diffusionblocks.tasks.recurrent import RecurrentDepthLM
from diffusionblocks.train import Trainer

from conftest import tiny_config

CHARS = 100_000  # one epoch of a tiny preset in a second or two


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """A private, empty cache, and downloads forbidden."""
    monkeypatch.setenv("DIFFUSIONBLOCKS_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")


@pytest.fixture(scope="module")
def text8_zip(tmp_path_factory):
    return fixtures.write_text8_zip(tmp_path_factory.mktemp("text8") / "text8.zip", CHARS)


def tiny(preset, data, **changes):
    return tiny_config(preset, data=str(data), **changes)


# --- the corpus ------------------------------------------------------------------------------------
def test_split_is_90_5_5_in_order_with_27_symbols_stored_as_bytes(text8_zip):
    corpus = text8.load(str(text8_zip))
    assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (90_000, 5_000, 5_000)
    assert corpus.vocab == sorted("abcdefghijklmnopqrstuvwxyz ") and corpus.vocab_size == 27
    assert corpus.decode(torch.cat([corpus.train, corpus.validation, corpus.test])) == fixtures.text8_like(CHARS)
    assert {corpus.train.dtype, corpus.validation.dtype, corpus.test.dtype} == {torch.uint8}
    batch = text.train_batch(corpus.train, 4, 32, torch.Generator().manual_seed(0))
    windows = text.validation_windows(corpus.test, 32)
    assert batch.dtype == windows.dtype == torch.int64 and windows.shape == (5_000 // 32, 32)


def test_the_zip_its_extracted_file_and_their_folders_give_the_same_ids(text8_zip, tmp_path):
    with zipfile.ZipFile(text8_zip) as archive:
        archive.extractall(tmp_path / "extracted")
    loads = [text8.load(str(path)) for path in (text8_zip, tmp_path / "extracted" / "text8",
                                                  tmp_path / "extracted", text8_zip.parent)]
    for other in loads[1:]:
        assert other.vocab == loads[0].vocab
        for split in ("train", "validation", "test"):
            assert torch.equal(getattr(other, split), getattr(loads[0], split))


def test_missing_offline_names_the_url_and_the_cache_folder(tmp_path):
    with pytest.raises(fetch.DataMissing, match="model.data: text8 is not on this machine") as error:
        text8.load()
    assert fetch.SOURCES["text8"].url in str(error.value) and str(tmp_path / "cache") in str(error.value)


def test_a_cached_file_that_is_not_the_official_one_is_refused(text8_zip, tmp_path):
    fixtures.write_text8_zip(tmp_path / "cache" / "text8.zip", 1_000)
    with pytest.raises(fetch.ChecksumError, match="model.data: .* is not the official text8 file"):
        text8.load()


def test_text_outside_the_alphabet_is_not_text8(tmp_path):
    path = tmp_path / "text8"
    path.write_bytes(b"hello World\n" * 100)
    with pytest.raises(ConfigError, match=r"model.data: .* is not text8: .* outside a-z and space") as error:
        text8.load(str(path))
    assert str(error.value).endswith(r"('\nW'); use model.dataset=text for other text")  # repr of the newline


def test_the_default_corpus_is_encoded_and_split_as_before():
    """Against the list comprehension it replaced, on int64."""
    source = text.default_corpus()
    vocab = sorted(set(source))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in source], dtype=torch.int64)
    chunks = ids.split(text.CHUNK)
    corpus = text.load()
    assert corpus.vocab == vocab and corpus.test is None and corpus.train.dtype == torch.uint8
    assert torch.equal(corpus.train.long(), torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9]))
    assert torch.equal(corpus.validation.long(), torch.cat([c for i, c in enumerate(chunks) if i % 10 == 9]))
    assert torch.equal(corpus.encode(source[:500]), ids[:500])


# --- the task fields -------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [AutoregressiveLM, RecurrentDepthLM, MaskedDiffusion])
def test_every_text_task_reads_text8_and_evaluates_the_split_it_is_told(task, text8_zip):
    options = task.Config(dataset="text8", data=str(text8_zip), seq_len=32, eval_split="test", eval_windows=0)
    made = task(options)
    corpus = made.corpus
    assert torch.equal(made.validation, corpus.test[:len(corpus.test) // 32 * 32].view(-1, 32).long())
    assert made.examples_per_epoch() == 90_000 // 32
    options.eval_split, options.eval_windows = "validation", 5
    assert torch.equal(task(options).validation, corpus.validation[:5 * 32].view(5, 32).long())


@pytest.mark.parametrize("preset", ["mdm-text-tiny", "ar-text-tiny", "recurrent-text-tiny"])
def test_the_default_corpus_has_no_test_split(preset):
    config = tiny_config(preset, eval_split="test")
    C.validate(config)
    with pytest.raises(ConfigError, match="model.eval_split: this corpus has no 'test' split"):
        Trainer(config)


@pytest.mark.parametrize("preset", ["mdm-text8-tiny", "ar-text8-tiny"])
@pytest.mark.parametrize("field, value, message", [
    ("dataset", "enwik8", "model.dataset: expected one of text, text8, got 'enwik8'"),
    ("eval_split", "train", "model.eval_split: expected one of validation, test"),
    ("eval_windows", -1, "model.eval_windows: expected >= 0"),
    ("data", "/no/such/text8.zip", "model.data: no such file or folder '/no/such/text8.zip'"),
])
def test_bad_fields_are_named(preset, field, value, message):
    with pytest.raises(ConfigError, match=message):
        C.validate(tiny_config(preset, **{field: value}))


def test_text8_data_need_not_exist_at_check_time_but_must_at_start():
    config = C.preset("mdm-text8-tiny")  # model.data = "": the cache, which is empty, and offline
    C.validate(config)
    with pytest.raises(fetch.DataMissing, match="DIFFUSIONBLOCKS_OFFLINE is set"):
        Trainer(config)


# --- one epoch through the trainer -----------------------------------------------------------------
@pytest.mark.parametrize("preset, key", [("mdm-text8-tiny", "test_bpc"), ("ar-text8-tiny", "test_brier")])
@pytest.mark.parametrize("mode", ["blocks", "e2e"])
def test_a_tiny_preset_trains_one_epoch(preset, key, mode, text8_zip, tmp_path):
    config = tiny(preset, text8_zip, mode=mode)
    Trainer(config, tmp_path / "run").run()
    e2e_steps = round(90_000 // config.model.seq_len / config.batch_size)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["e2e_steps"] == e2e_steps
    assert report["steps"] == e2e_steps * (config.blocks if mode == "blocks" else 1)
    assert 0 < report["metrics"][key] < 10


def test_the_command_line_takes_the_path(text8_zip, tmp_path):
    out = tmp_path / "run"
    args = ["train", "mdm-text8-tiny", "--mode", "e2e", "--out", str(out),
            "--set", "progress=false", f"model.data={text8_zip}", "e2e_epochs=0.1"]
    assert cli.main(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"]["dataset"], saved["model"]["data"]) == ("text8", str(text8_zip))
    assert json.loads((out / "report.json").read_text())["e2e_steps"] == round(0.1 * (90_000 // 32) / 32)
