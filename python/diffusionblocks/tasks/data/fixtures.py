"""Small stand-ins for the datasets that need a download, written in their official formats
(the same bytes a loader reads from the real files, only fewer and made up), so the whole
loading path runs in tests and benchmarks on machines without network. Every writer is a
pure function of its arguments."""

import gzip
import io
import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np


def text8_like(chars: int) -> str:
    """`chars` characters of text8's alphabet (a-z and single spaces): CPython's pydoc topics
    lower-cased, every other character run turned into one space, repeated as needed."""
    from .text import default_corpus

    words = re.sub(r"[^a-z]+", " ", default_corpus().lower()).strip()
    repeats = chars // (len(words) + 1) + 1
    return ((words + " ") * repeats)[:chars]


def write_text8_zip(path: str | Path, chars: int = 2_000_000) -> Path:
    """A zip holding one member named text8, as text8.zip does, of `chars` characters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("text8", text8_like(chars).encode("ascii"))
    path.write_bytes(buffer.getvalue())
    return path


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the CIFAR files: every str and bytes as a byte
    string (SHORT_BINSTRING / BINSTRING; Python 3 would write unicode and `_codecs.encode`
    calls) and numpy arrays rebuilt through `numpy.core.multiarray._reconstruct`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_byte_string
    dispatch[bytes] = save_byte_string

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct" and "numpy" in getattr(obj, "__module__", ""):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _pickle2(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """n random labels in 0..classes-1, every class present where n >= classes."""
    return rng.permutation(np.arange(n) % classes)


def _batch(label: str, data: np.ndarray, prefix: int, **labels: np.ndarray) -> dict:
    return {b"batch_label": label.encode(), **{key.encode(): value.tolist() for key, value in labels.items()},
            b"data": data, b"filenames": [f"image_{prefix + i:06d}.png".encode() for i in range(len(data))]}


def _write_cifar(path: str | Path, folder: str, files: dict[str, bytes], as_archive: bool) -> Path:
    path = Path(path)
    if not as_archive:
        (path / folder).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (path / folder / name).write_bytes(content)
        return path / folder
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # mtime 0, no file name and fixed owners: the same arguments give the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as archive:
        top = tarfile.TarInfo(folder)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(top)
        for name, content in files.items():
            member = tarfile.TarInfo(f"{folder}/{name}")
            member.size, member.mode = len(content), 0o644
            archive.addfile(member, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())
    return path


def write_cifar10(path: str | Path, train: int = 500, test: int = 100, seed: int = 0,
                  as_archive: bool = True) -> Path:
    """Random CIFAR-10 files in the official python format: `path` is the .tar.gz to write
    (with cifar-10-batches-py/ inside), or with as_archive=False the folder in which
    cifar-10-batches-py/ is written. The training images are spread over data_batch_1..5.
    Returns the archive or the cifar-10-batches-py folder."""
    rng = np.random.default_rng(seed)
    train_labels, test_labels = _labels(rng, train, 10), _labels(rng, test, 10)
    train_data = rng.integers(0, 256, (train, 3072), dtype=np.uint8)
    test_data = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    bounds = np.linspace(0, train, 6).astype(int)
    files = {f"data_batch_{i + 1}": _pickle2(_batch(f"training batch {i + 1} of 5", train_data[lo:hi], lo,
                                                    labels=train_labels[lo:hi]))
             for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))}
    files["test_batch"] = _pickle2(_batch("testing batch 1 of 1", test_data, 0, labels=test_labels))
    files["batches.meta"] = _pickle2({b"num_cases_per_batch": int(bounds[1]),
                                      b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    files["readme.html"] = b"<html>a made-up stand-in for CIFAR-10</html>\n"  # the real archive has one too
    return _write_cifar(path, "cifar-10-batches-py", files, as_archive)


def write_cifar100(path: str | Path, train: int = 500, test: int = 100, seed: int = 0,
                   as_archive: bool = True) -> Path:
    """Random CIFAR-100 files in the official python format (train, test, meta inside
    cifar-100-python/), written as write_cifar10 does. Fine class f belongs to coarse class
    f // 5 (so every coarse class holds 5 fine ones, as in the real set); names are made up."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", train), ("test", test)):
        fine = _labels(rng, n, 100)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        files[split] = _pickle2(_batch(f"{'training' if split == 'train' else 'testing'} batch 1 of 1", data, 0,
                                       fine_labels=fine, coarse_labels=fine // 5))
    files["meta"] = _pickle2({b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
                              b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)]})
    return _write_cifar(path, "cifar-100-python", files, as_archive)


def write_image_folder(path: str | Path, classes: int = 3, per_class: int = 10, size: tuple[int, int] = (40, 30),
                       seed: int = 0, split: bool = False, grey: bool = False) -> Path:
    """A folder of `classes` subfolders (class_00, class_01, ...) of random images of `size`
    (width, height): noise around a colour of the class. Every fifth image is a JPEG, the
    rest PNGs; grey=True writes greyscale ("L") images. split=True writes train/ with
    per_class images per class and test/ with max(1, per_class // 5). Returns `path`."""
    from PIL import Image

    path = Path(path)
    rng = np.random.default_rng(seed)
    channels = 1 if grey else 3
    parts = [("train", per_class), ("test", max(1, per_class // 5))] if split else [("", per_class)]
    for part, count in parts:
        for c in range(classes):
            folder = path / part / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, channels)
            for i in range(count):
                noise = rng.integers(-40, 41, (size[1], size[0], channels))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels[:, :, 0] if grey else pixels, "L" if grey else "RGB")
                image.save(folder / f"{i:03d}.{'jpg' if i % 5 == 4 else 'png'}")
    return path
