"""text8 (Mahoney): the first 100,000,000 characters of an English Wikipedia dump, cleaned
to the 27 symbols a-z and space. Split contiguously as in D3PM and MD4: the first 90M
characters train, the next 5M validate, the last 5M test (the split MD4 reports bits per
character on); a smaller file (a test fixture) is split in the same 90/5/5 proportions.

The file is found by fetch.py (`model.data`, else the verified cached text8.zip, else a
download): the zip, the extracted `text8`, or a folder holding either. Text outside the
alphabet is refused rather than given a larger vocabulary: a file with other characters is
not text8, and other text belongs under model.dataset=text."""

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from . import fetch
from .text import Corpus, index

ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz ")
MEMBER = "text8"                  # the one file inside text8.zip
TRAIN, VALIDATION = 90, 5         # percent of the text; the test split is the rest


def read(path: Path) -> bytearray:
    """The raw bytes of text8 at `path`: text8.zip, the extracted file, or a folder holding either."""
    if path.is_dir():
        inside = [path / name for name in (MEMBER, fetch.SOURCES["text8"].filename) if (path / name).is_file()]
        if not inside:
            raise ConfigError(f"model.data: the folder {path} holds neither {MEMBER} nor text8.zip")
        path = inside[0]
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if MEMBER not in archive.namelist():
                    raise ConfigError(f"model.data: {path} has no member {MEMBER!r}; expected the official text8.zip")
                return bytearray(archive.read(MEMBER))
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ConfigError(f"model.data: {path} is a damaged zip ({error})") from None
    return bytearray(path.read_bytes())


def load(path: str = "") -> Corpus:
    """text8 from `path` ("" = the cache, downloading it if allowed), split 90/5/5 in order;
    ids uint8 [n], vocabulary the characters present (the 27 of the alphabet on the real file)."""
    found = fetch.locate("text8", path)
    data = read(found)
    if not data:
        raise ConfigError(f"model.data: {found} is empty")
    vocab, ids = index(np.frombuffer(data, dtype=np.uint8))
    foreign = "".join(ch for ch in vocab if ch not in ALPHABET)
    if foreign:
        raise ConfigError(f"model.data: {found} is not text8: it holds characters outside a-z and space "
                          f"({foreign[:20]!r}); use model.dataset=text for other text")
    n = len(ids)
    train_end, validation_end = n * TRAIN // 100, n * (TRAIN + VALIDATION) // 100
    return Corpus(vocab, ids[:train_end], ids[train_end:validation_end], ids[validation_end:])
