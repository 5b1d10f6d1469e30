"""Character-level text for the language-model tasks. The default corpus is real English
that ships with every CPython: the documentation topics of `pydoc_data.topics` (about
465 KB), joined in sorted topic order so the text is the same on every machine with the
same Python version. `--set model.data=FILE` trains on a user's own UTF-8 text instead
(text8.py loads the text8 corpus into the same `Corpus`).

Split: the text is cut into contiguous chunks of CHUNK characters and every
VALIDATION_EVERY-th chunk is held out, so validation text is unseen yet spread over the
whole corpus. Training batches are random windows drawn from a generator (a pure function
of the run's seed and step); validation windows are fixed. All of it stays on the CPU: the
trainer moves training batches to the model's device, the tasks their validation windows.

Encoding is vectorised (numpy over code points) and ids are stored as uint8 where the
vocabulary has at most 256 characters, so 100M characters take 100 MB and load in a
second; batches and windows come out as int64, what the models' embeddings take."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHUNK = 4096
VALIDATION_EVERY = 10  # every 10th chunk: a 10% validation split


def default_corpus() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def code_points(text: str) -> np.ndarray:
    """The Unicode code points of `text`, int32 [len(text)] (writable: torch reads it in place)."""
    return np.frombuffer(bytearray(text.encode("utf-32-le")), dtype="<i4")


def index(codes: np.ndarray) -> tuple[list[str], torch.Tensor]:
    """(vocabulary, ids) of code points `codes` [n] (uint8 bytes or int32, writable): the
    vocabulary is the distinct characters in code-point order, i.e. sorted(set(text)), and
    ids [n] index it, uint8 for at most 256 characters (int64 otherwise)."""
    counts = torch.bincount(torch.from_numpy(codes))  # a pass without copies, unlike np.bincount
    present = counts.nonzero().squeeze(1).numpy()
    table = np.zeros(len(counts), dtype=np.uint8 if len(present) <= 256 else np.int64)
    table[present] = np.arange(len(present))
    return [chr(c) for c in present], torch.from_numpy(table[codes])


@dataclass
class Corpus:
    vocab: list[str]                   # index -> character
    train: torch.Tensor                # token ids (uint8 for <= 256 characters, else int64), the training text
    validation: torch.Tensor           # token ids, the held-out validation text
    test: torch.Tensor | None = None   # token ids, the test text, for corpora that have one (text8)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def held_out(self, split: str) -> torch.Tensor:
        """The ids of the held-out split `split` ("validation" or "test")."""
        ids = {"validation": self.validation, "test": self.test}.get(split)
        if ids is None:
            raise ValueError(f"model.eval_split: this corpus has no {split!r} split"
                             + (" (only text8 has a test split)" if split == "test" else ""))
        return ids

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids [len(text)] of `text`; ValueError naming the characters not in the vocabulary."""
        codes = code_points(text)
        points = np.array([ord(ch) for ch in self.vocab], dtype=np.int32)  # ascending: vocab is sorted
        known = np.isin(codes, points)
        if not known.all():
            unknown = sorted(set(chr(c) for c in codes[~known]))
            raise ValueError(f"prompt: characters not in the corpus vocabulary: {''.join(unknown)!r}")
        return torch.from_numpy(np.searchsorted(points, codes).astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in torch.as_tensor(ids).tolist())


def load(path: str = "") -> Corpus:
    """The default corpus, or the UTF-8 text file at `path`."""
    text = Path(path).read_text(encoding="utf-8") if path else default_corpus()
    vocab, ids = index(code_points(text))
    chunks = ids.split(CHUNK)
    validation = [c for i, c in enumerate(chunks) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    if not validation:  # a short file: hold out its last tenth
        cut = len(ids) - max(1, len(ids) // VALIDATION_EVERY)
        train, validation = [ids[:cut]], [ids[cut:]]
    return Corpus(vocab, torch.cat(train), torch.cat(validation))


def train_batch(ids: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, length] int64 random windows of the training text, on the device of `ids`
    (the starts come from the CPU `generator`, so any device draws the same windows)."""
    if len(ids) < length:
        raise ValueError(f"model.seq_len: {length} exceeds the {len(ids)} training characters")
    starts = torch.randint(0, len(ids) - length + 1, (batch_size, 1), generator=generator).to(ids.device, non_blocking=True)
    return ids[starts + torch.arange(length, device=ids.device)].long()


def validation_windows(ids: torch.Tensor, length: int, max_windows: int = 0, split: str = "validation") -> torch.Tensor:
    """[W, length] int64 non-overlapping windows from the start of the held-out text `ids`,
    W <= max_windows, or every whole window where max_windows is 0."""
    count = len(ids) // length if max_windows == 0 else min(max_windows, len(ids) // length)
    if count == 0:
        raise ValueError(f"model.seq_len: {length} exceeds the {len(ids)} {split} characters")
    return ids[:count * length].view(count, length).long()
