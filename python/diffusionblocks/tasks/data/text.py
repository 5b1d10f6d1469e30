"""Character-level text for the language-model tasks. The default corpus is real English
that ships with every CPython: the documentation topics of `pydoc_data.topics` (about
465 KB), joined in sorted topic order so the text is the same on every machine with the
same Python version. `--set model.data=FILE` trains on a user's own UTF-8 text instead.

Split: the text is cut into contiguous chunks of CHUNK characters and every
VALIDATION_EVERY-th chunk is held out, so validation text is unseen yet spread over the
whole corpus. Training batches are random windows drawn from a generator (a pure function
of the run's seed and step); validation windows are fixed. All of it stays on the CPU: the
trainer moves training batches to the model's device, the tasks their validation windows."""

from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 4096
VALIDATION_EVERY = 10  # every 10th chunk: a 10% validation split


def default_corpus() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


@dataclass
class Corpus:
    vocab: list[str]             # index -> character
    train: torch.Tensor          # int64 token ids, the training chunks concatenated
    validation: torch.Tensor     # int64 token ids, the held-out chunks concatenated

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(f"prompt: characters not in the corpus vocabulary: {''.join(unknown)!r}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def load(path: str = "") -> Corpus:
    """The default corpus, or the UTF-8 text file at `path`."""
    text = Path(path).read_text(encoding="utf-8") if path else default_corpus()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    chunks = ids.split(CHUNK)
    validation = [c for i, c in enumerate(chunks) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    if not validation:  # a short file: hold out its last tenth
        cut = len(ids) - max(1, len(ids) // VALIDATION_EVERY)
        train, validation = [ids[:cut]], [ids[cut:]]
    return Corpus(vocab, torch.cat(train), torch.cat(validation))


def train_batch(ids: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, length] random windows of the training text."""
    if len(ids) < length:
        raise ValueError(f"model.seq_len: {length} exceeds the {len(ids)} training characters")
    starts = torch.randint(0, len(ids) - length + 1, (batch_size, 1), generator=generator)
    return ids[starts + torch.arange(length)]


def validation_windows(ids: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """[W, length] non-overlapping windows from the start of the validation text, W <= max_windows."""
    count = min(max_windows, len(ids) // length)
    if count == 0:
        raise ValueError(f"model.seq_len: {length} exceeds the {len(ids)} validation characters")
    return ids[:count * length].view(count, length)
