"""Text generation quality (tasks/text_quality.py): MAUVE at its extremes, the diversity
measures on hand-computed inputs, the evaluator's deterministic training, its cache, its
bits per character, and the summary `generation_quality`. Tiny evaluators on tiny
synthetic corpora only: the default config takes minutes to train."""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from diffusionblocks.tasks.data import text
from diffusionblocks.tasks import text_quality as tq

TINY = tq.EvaluatorConfig(width=16, layers=1, heads=2, seq_len=16, batch_size=8, steps=80, warmup_steps=5, lr=1e-2)
REPETITIVE = "the cat sat on the mat. " * 200


def corpus_of(tmp_path, content: str, name: str = "corpus.txt") -> text.Corpus:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return text.load(str(path))


def windows(ids: torch.Tensor, count: int, length: int, stride: int) -> torch.Tensor:
    """[count, length] overlapping windows of ids, `stride` characters apart."""
    return torch.stack([ids[i * stride:i * stride + length] for i in range(count)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_of(tmp_path_factory.mktemp("corpus"), REPETITIVE)


@pytest.fixture(scope="module")
def judge(corpus, tmp_path_factory):
    """A tiny evaluator trained once for this file, in a cache under pytest's tmp folder."""
    folder = tmp_path_factory.mktemp("cache")
    model, reused = tq.load_or_train(corpus, folder, TINY)
    assert not reused
    return model, folder


# --- MAUVE ------------------------------------------------------------------------------------------
def test_mauve_of_identical_features_is_about_one():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert tq.mauve(features, features.clone(), seed=0) > 0.9


def test_mauve_of_different_distributions_is_low():
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(16)
    direction[0] = 4.0  # far apart in direction: MAUVE l2-normalises the features
    p = torch.randn(200, 16, generator=g) + direction
    q = torch.randn(200, 16, generator=g) - direction
    assert tq.mauve(p, q, seed=0) < 0.2


def test_mauve_rejects_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="q_features"):
        tq.mauve(torch.randn(10, 4), torch.randn(10, 5), seed=0)


# --- diversity ----------------------------------------------------------------------------------------
def test_distinct_n_by_hand():
    # 2-grams (0,1) (1,0) (0,1) (1,0): 2 unique of 4.
    assert tq.distinct_n(torch.tensor([[0, 1, 0, 1, 0]]), n=2) == 0.5
    # Over the set, never across sequences: (0,1) (1,2) | (0,1): 2 unique of 3.
    assert tq.distinct_n([torch.tensor([0, 1, 2]), torch.tensor([0, 1])], n=2) == pytest.approx(2 / 3)
    # 4-grams of two rows of 5: (1,2,3,4) (2,3,4,5) | (1,2,3,4) (2,3,4,6): 3 unique of 4; a row of 3 has none.
    rows = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 2, 3, 4, 6]), torch.tensor([7, 7, 7])]
    assert tq.distinct_n(rows) == 0.75
    assert tq.distinct_n(torch.arange(12).view(2, 6), n=1) == 1.0
    with pytest.raises(ValueError, match="sequences"):
        tq.distinct_n([torch.tensor([1, 2, 3])], n=4)


def test_unigram_entropy_by_hand():
    assert tq.unigram_entropy(torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)
    assert tq.unigram_entropy(torch.tensor([[3, 1], [2, 0]])) == pytest.approx(2.0)
    assert tq.unigram_entropy(torch.tensor([5, 5, 5])) == 0.0
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert tq.unigram_entropy([torch.tensor([0, 0]), torch.tensor([0, 1])]) == pytest.approx(expected)


# --- the evaluator and its cache ----------------------------------------------------------------------
def test_training_is_deterministic_and_leaves_the_global_rng_alone(corpus):
    config = tq.EvaluatorConfig(width=16, layers=1, heads=2, seq_len=16, batch_size=4, steps=10, warmup_steps=2)
    state = torch.random.get_rng_state()
    first = tq.train(corpus.train, corpus.vocab_size, config).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    second = tq.train(corpus.train, corpus.vocab_size, config).state_dict()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_cache_round_trips_and_keys_on_the_corpus(judge, corpus, tmp_path):
    model, folder = judge
    path = tq.cache_file(corpus.train, corpus.vocab_size, TINY, folder)
    assert path.exists() and path.suffix == ".safetensors"
    about = json.loads(path.with_suffix(".json").read_text())
    assert about["config"] == asdict(TINY) and about["vocab_size"] == corpus.vocab_size
    again, reused = tq.load_or_train(corpus, folder, TINY)
    assert reused
    ids = windows(corpus.validation, 3, 16, 5)
    with torch.no_grad():
        assert torch.equal(model.logits(ids), again.logits(ids))

    other = corpus_of(tmp_path, REPETITIVE.replace("cat", "dog"))
    assert tq.cache_file(other.train, other.vocab_size, TINY, folder) != path
    assert tq.cache_file(corpus.train, corpus.vocab_size, replace(TINY, seed=1), folder) != path
    short = tq.EvaluatorConfig(width=16, layers=1, heads=2, seq_len=16, batch_size=2, steps=2, warmup_steps=0)
    _, reused = tq.load_or_train(other, folder, short)
    assert not reused
    assert len(list(folder.glob("*.safetensors"))) == 2 and not list(folder.glob("*.tmp"))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tq.CACHE_ENV, str(tmp_path / "env"))
    assert tq.cache_folder() == tmp_path / "env"
    assert tq.cache_folder(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(tq.CACHE_ENV)
    assert tq.cache_folder().parts[-2:] == (".cache", "diffusionblocks")


def test_training_lowers_bits_per_character(judge, corpus):
    model, _ = judge
    with torch.random.fork_rng():
        torch.manual_seed(TINY.seed)
        untrained = tq.EvaluatorLM.from_config(corpus.vocab_size, TINY).eval()
    ids = windows(corpus.validation, 20, 16, 7)
    trained_bpc, untrained_bpc = tq.bits_per_character(model, ids, 4), tq.bits_per_character(untrained, ids, 4)
    assert trained_bpc < 0.5 * untrained_bpc, (trained_bpc, untrained_bpc)
    assert tq.reference(model, corpus)["evaluator_validation_bpc"] < untrained_bpc


def test_features_are_the_mean_hidden_state_of_the_continuation(judge, corpus):
    model, _ = judge
    ids = windows(corpus.train, 5, 16, 3)
    out = tq.features(model, ids, 6, batch=2)
    assert out.shape == (5, 16) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, model.hidden(ids)[:, 6:].mean(dim=1))
    with pytest.raises(ValueError, match="start"):
        tq.features(model, ids, 16)


# --- the summary ------------------------------------------------------------------------------------------
KEYS = {"mauve_mean", "mauve_std", "mauve_by_seed", "mauve_reference_mean", "mauve_reference_std",
        "evaluator_bpc", "reference_bpc", "distinct4", "reference_distinct4", "unigram_entropy_bits",
        "reference_unigram_entropy_bits"}


def test_generation_quality_reports_every_metric(judge, corpus):
    model, _ = judge
    references = windows(corpus.train, 40, 16, 11)
    generated = references.clone()
    generated[:, 6:] = torch.randint(0, corpus.vocab_size, (40, 10), generator=torch.Generator().manual_seed(0))
    result = tq.generation_quality(model, generated, references, prompt_length=6, seeds=(0, 1))
    assert set(result) == KEYS
    assert len(result["mauve_by_seed"]) == 2
    for key in KEYS - {"mauve_by_seed"}:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    json.dumps(result)
    assert result["evaluator_bpc"] > result["reference_bpc"]  # random characters surprise the evaluator


def test_generation_quality_rejects_bad_arguments(judge, corpus):
    model, _ = judge
    references = windows(corpus.train, 8, 16, 11)
    with pytest.raises(ValueError, match="references"):
        tq.generation_quality(model, references, references[:, :12], prompt_length=6)
    with pytest.raises(ValueError, match="references"):
        tq.generation_quality(model, references, references[:6], prompt_length=6)
    with pytest.raises(ValueError, match="prompt_length"):
        tq.generation_quality(model, references, references, prompt_length=16)
    with pytest.raises(ValueError, match="prompt_length"):
        tq.generation_quality(model, references, references, prompt_length=0)
    with pytest.raises(ValueError, match="prompts_and_continuations"):
        tq.generation_quality(model, references.float(), references, prompt_length=6)
    longer = windows(corpus.train, 8, 20, 11)
    with pytest.raises(ValueError, match="prompts_and_continuations: length 20 exceeds"):
        tq.generation_quality(model, longer, longer, prompt_length=6)
    with pytest.raises(ValueError, match="references: expected token ids"):
        tq.generation_quality(model, references, references + 100, prompt_length=6)
