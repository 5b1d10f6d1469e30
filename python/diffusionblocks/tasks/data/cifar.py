"""CIFAR-10 and CIFAR-100, read from the official "python version" files: the .tar.gz
archive itself (read in one pass, nothing extracted), the folder it extracts to, or the
folder that holds that one.

Each file is a pickled dict with byte keys: b"data" a uint8 array [N, 3072] (per image the
32×32 red plane, then green, then blue, each row-major), and the labels, a list of N ints
(b"labels" in CIFAR-10; b"fine_labels" and b"coarse_labels" in CIFAR-100). The pickles are
read by an unpickler that builds numpy arrays and plain containers only, so a file that
tries to call anything else is refused instead of run."""

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from .images import Images

SIZE = 32
PIXELS = 3 * SIZE * SIZE


@dataclass(frozen=True)
class Layout:
    name: str                 # "CIFAR-10"
    folder: str               # the archive's top folder
    train: tuple[str, ...]    # files of the training set, in order
    test: str
    meta: str
    label_key: dict[str, bytes]       # labels ("fine"/"coarse") -> key in a batch
    names_key: dict[str, bytes]       # labels -> key of the class names in the meta file
    num_classes: dict[str, int]

    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


LAYOUTS = {
    "cifar10": Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test_batch", "batches.meta", {"fine": b"labels"}, {"fine": b"label_names"}, {"fine": 10}),
    "cifar100": Layout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
                       {"fine": b"fine_labels", "coarse": b"coarse_labels"},
                       {"fine": b"fine_label_names", "coarse": b"coarse_label_names"}, {"fine": 100, "coarse": 20}),
}


def _latin1(text: str, encoding: str) -> bytes:
    """What `_codecs.encode` may do here: turn text back into the bytes it stood for."""
    if encoding != "latin1":
        raise ConfigError(f"model.data: a CIFAR pickle asked for the encoding {encoding!r}, expected latin1")
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only names a CIFAR pickle may refer to: what rebuilds a numpy array. The official
    files were written by Python 2's cPickle with numpy 1.x (`numpy.core`); a copy re-saved
    with numpy 2 says `numpy._core`, and Python 3 at protocol 2 writes bytes as
    `_codecs.encode(text, "latin1")` (allowed for latin1 only). Lists, strings and numbers
    need no global at all."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    return {("_codecs", "encode"): _latin1,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the names in _allowed_globals (anything else, such as
    os.system, raises ConfigError naming the file and the name)."""

    def __init__(self, stream, where: str):
        super().__init__(stream, encoding="bytes")  # Python 2 str -> bytes, as the official snippet reads them
        self.where = where
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise ConfigError(f"model.data: {self.where} refers to {module}.{name}, which a CIFAR file never does; "
                              f"refusing to unpickle it (allowed: numpy arrays, lists, strings, numbers)")
        return found


def unpickle(stream, where: str) -> dict:
    """The dict pickled in `stream` (ConfigError if it is not one, or refers to anything but numpy arrays)."""
    try:
        batch = SafeUnpickler(stream, where).load()
    except ConfigError:
        raise
    except Exception as error:  # a truncated or foreign file fails in many ways
        raise ConfigError(f"model.data: {where} is not a readable CIFAR pickle ({type(error).__name__}: {error})"
                          ) from None
    if not isinstance(batch, dict):
        raise ConfigError(f"model.data: {where} holds a {type(batch).__name__}, expected a dict")
    return batch


def read_files(root: Path, layout: Layout) -> dict[str, dict]:
    """Every file of `layout` unpickled, by file name, from the archive, the extracted folder,
    or the folder holding it, whichever `root` is."""
    expected = (f"the official archive, its extracted folder {layout.folder}/ (with {', '.join(layout.files())}) "
                f"or the folder that holds {layout.folder}/")
    if root.is_file():
        return _read_archive(root, layout, expected)
    if root.is_dir():
        folder = root / layout.folder if (root / layout.folder).is_dir() else root
        absent = [name for name in layout.files() if not (folder / name).is_file()]
        if len(absent) == len(layout.files()):
            raise ConfigError(f"model.data: {root} holds no {layout.name} files; expected {expected}")
        if absent:
            raise ConfigError(f"model.data: {folder} lacks {', '.join(absent)} of {layout.name}")
        result = {}
        for name in layout.files():
            with open(folder / name, "rb") as stream:
                result[name] = unpickle(stream, str(folder / name))
        return result
    raise ConfigError(f"model.data: no such file or folder {str(root)!r}; expected {expected}")


def _read_archive(path: Path, layout: Layout, expected: str) -> dict[str, dict]:
    # One pass over the members in archive order: seeking back in a .tar.gz would mean
    # decompressing it again from the start.
    wanted = {f"{layout.folder}/{name}": name for name in layout.files()}
    result = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    result[name] = unpickle(archive.extractfile(member), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ConfigError(f"model.data: {path} is not a readable tar archive ({error}); expected {expected}") from None
    absent = [member for member, name in wanted.items() if name not in result]
    if absent:
        raise ConfigError(f"model.data: {path} lacks {', '.join(absent)}; expected {expected}")
    return result


def images_and_labels(batches: list[dict], where: list[str], key: bytes, num_classes: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches' images [N, 3, 32, 32] uint8 and labels [N] int64, checked."""
    data, labels = [], []
    for batch, name in zip(batches, where):
        if b"data" not in batch or key not in batch:
            raise ConfigError(f"model.data: {name} lacks the key b'data' or {key!r}")
        pixels = np.asarray(batch[b"data"])
        targets = np.asarray(batch[key], dtype=np.int64)
        if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
            raise ConfigError(f"model.data: {name}: expected uint8 data of shape [N, {PIXELS}], "
                              f"got {pixels.dtype} {list(pixels.shape)}")
        if targets.shape != (len(pixels),):
            raise ConfigError(f"model.data: {name}: expected {len(pixels)} labels, got shape {list(targets.shape)}")
        if len(targets) and not 0 <= targets.min() <= targets.max() < num_classes:
            raise ConfigError(f"model.data: {name}: labels must lie in 0..{num_classes - 1}, "
                              f"found {targets.min()}..{targets.max()}")
        data.append(pixels)
        labels.append(targets)
    # concatenate copies into one fresh, writable array (the unpickled ones may be read-only)
    images = np.concatenate(data).reshape(-1, 3, SIZE, SIZE)
    return torch.from_numpy(images), torch.from_numpy(np.concatenate(labels))


def load(dataset: str, path: str = "", labels: str = "fine") -> Images:
    """CIFAR-10 or CIFAR-100 ("cifar10"/"cifar100") from `path` (the archive, its folder or
    that folder's parent; "" = the cache, downloading once, see fetch.py), with the "fine"
    labels or, for CIFAR-100, the 20 "coarse" ones. Images [N, 3, 32, 32] uint8 0..255."""
    from . import fetch

    if dataset not in LAYOUTS:
        raise ConfigError(f"model.dataset: expected cifar10 or cifar100, got {dataset!r}")
    layout = LAYOUTS[dataset]
    if labels not in layout.label_key:
        raise ConfigError(f"model.labels: {layout.name} has the labels {', '.join(layout.label_key)}, "
                          f"got {labels!r}")
    num_classes = layout.num_classes[labels]
    files = read_files(fetch.locate(dataset, path), layout)

    names = files[layout.meta].get(layout.names_key[labels])
    if not isinstance(names, list) or len(names) != num_classes:
        raise ConfigError(f"model.data: {layout.meta} of {layout.name}: expected {num_classes} names under "
                          f"{layout.names_key[labels]!r}")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]

    key = layout.label_key[labels]
    train_images, train_labels = images_and_labels([files[f] for f in layout.train], list(layout.train), key,
                                                    num_classes)
    test_images, test_labels = images_and_labels([files[layout.test]], [layout.test], key, num_classes)
    return Images(train_images, train_labels, test_images, test_labels, num_classes=num_classes, pixel_max=255.0,
                  class_names=class_names, name=layout.name, mirror_symmetric=True)
