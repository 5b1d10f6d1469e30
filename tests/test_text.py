"""The character corpus: a fixed held-out split, round trips, batches from the generator."""

import pytest
import torch

from diffusionblocks.tasks.data import text


def test_default_corpus_is_real_text_split_about_nine_to_one():
    corpus = text.load()
    assert corpus.vocab_size > 60 and " " in corpus.vocab and "e" in corpus.vocab
    total = len(corpus.train) + len(corpus.validation)
    assert total > 400_000
    assert 0.08 < len(corpus.validation) / total < 0.12
    assert corpus.decode(corpus.encode("def main():")) == "def main():"


def test_batches_are_windows_of_the_training_text_fixed_by_the_generator():
    corpus = text.load()
    a = text.train_batch(corpus.train, 4, 32, torch.Generator().manual_seed(3))
    b = text.train_batch(corpus.train, 4, 32, torch.Generator().manual_seed(3))
    assert a.shape == (4, 32) and torch.equal(a, b)
    joined = corpus.decode(corpus.train)
    assert all(corpus.decode(row) in joined for row in a)


def test_a_users_file_and_its_errors(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcabcabd" * 20, encoding="utf-8")
    corpus = text.load(str(path))
    assert corpus.vocab == ["a", "b", "c", "d"] and len(corpus.validation) > 0
    with pytest.raises(ValueError, match="prompt: characters not in the corpus vocabulary: 'z'"):
        corpus.encode("abz")
    with pytest.raises(ValueError, match="model.seq_len"):
        text.validation_windows(corpus.validation, 1000, 4)
