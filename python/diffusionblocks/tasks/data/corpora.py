"""The text tasks' corpora by name (model.dataset) and what every text task (ar, recurrent,
mdm) takes from one: the training ids and the evaluation windows of model.eval_split. The
config fields are the same in the three tasks, so are their checks here."""

from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError, one_of
from ...task import device_of
from . import text, text8

# "text": the pydoc topics, or the UTF-8 file at model.data (text.py); "text8": text8.py.
DATASETS = {"text": text.load, "text8": text8.load}
EVAL_SPLITS = ("validation", "test")


def option_checks(options) -> list[tuple[bool, str]]:
    """(ok, message) checks of model.dataset, model.data, model.eval_split, model.eval_windows.
    model.data may be absent only where it is "" (text8: the cache, or a download at start)."""
    folder_ok = options.dataset == "text8"  # text8 is also read from the folder it extracts to
    data_ok = not options.data or (Path(options.data).expanduser().exists() if folder_ok
                                   else Path(options.data).is_file())
    return [
        one_of("model.dataset", options.dataset, DATASETS),
        (data_ok, f"model.data: no such file {'or folder ' if folder_ok else ''}{options.data!r}"),
        one_of("model.eval_split", options.eval_split, EVAL_SPLITS),
        (options.eval_windows >= 0,
         f"model.eval_windows: expected >= 0 (0 = every window of the split), got {options.eval_windows}"),
    ]


@dataclass
class TextData:
    corpus: text.Corpus
    held_out: torch.Tensor   # ids of model.eval_split (uint8 or int64 [n])
    windows: torch.Tensor    # int64 [W, seq_len]: the evaluation windows, from the start of held_out


def load(options) -> TextData:
    """The corpus of model.dataset / model.data and its evaluation windows (model.eval_split,
    model.eval_windows); ConfigError naming the field when the data does not fit the options."""
    try:
        corpus = DATASETS[options.dataset](options.data)
        held_out = corpus.held_out(options.eval_split)
        windows = text.validation_windows(held_out, options.seq_len, options.eval_windows, options.eval_split)
        if len(corpus.train) < options.seq_len:
            raise ValueError(f"model.seq_len: {options.seq_len} exceeds the {len(corpus.train)} training characters")
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(str(error) if str(error).startswith("model.") else f"model.data: {error}") from None
    return TextData(corpus, held_out, windows)


class TextBatches:
    """What a text task's training data needs from the task (self.corpus, self.options.seq_len,
    self.model): the epoch size, and random windows drawn on the model's device."""

    _device_ids = None  # the training ids on the model's device, copied there once

    def examples_per_epoch(self) -> int:
        """Training examples in one pass over the training text: its non-overlapping seq_len windows."""
        return len(self.corpus.train) // self.options.seq_len

    def train_batch(self, step, batch_size, seed, generator):
        device = device_of(self.model)
        if self._device_ids is None or self._device_ids.device != device:
            self._device_ids = self.corpus.train.to(device)
        return text.train_batch(self._device_ids, batch_size, self.options.seq_len, generator)
