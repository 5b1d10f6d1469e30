"""Your own labelled images: a folder with one subfolder per class (the class names are the
subfolder names, sorted), each holding PNG or JPEG files (.png, .jpg, .jpeg, any case;
other files and hidden folders are skipped, subfolders of a class are not searched).

Split: if the folder has both train/ and test/, each with the same class subfolders, those
are the split. Otherwise a fixed 10% of every class (n // 10 of its n images, at least 1
where n >= 2) is held out as the test set, drawn with a fixed seed: the same files give the
same split on every machine.

Pixels: every image is converted to RGB (3 channels; transparency dropped), unless every
image is greyscale (Pillow mode "1", "L" or "LA"), in which case all are converted to "L"
(1 channel). EXIF rotation is applied first, as a viewer shows the photo. Each is then
resized so its shorter side is image_size and centre-cropped to image_size × image_size,
in one bicubic resample (Pillow's BICUBIC, antialiased when shrinking)."""

from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from .images import Images

EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA")
TEST_FRACTION_DIVISOR = 10  # hold out n // 10 of a class's n images
SPLIT_SEED = 0


def class_files(folder: Path) -> dict[str, list[Path]]:
    """The image files of each class subfolder of `folder`, by class name, both sorted."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {}
    for name in classes:
        found = sorted(f for f in (folder / name).iterdir()
                       if f.is_file() and f.suffix.lower() in EXTENSIONS and not f.name.startswith("."))
        if not found:
            raise ConfigError(f"model.data: the class folder {folder / name} holds no images "
                              f"({', '.join(EXTENSIONS)})")
        files[name] = found
    if len(files) < 2:
        raise ConfigError(f"model.data: {folder} needs at least 2 class subfolders of images, found "
                          f"{len(files)}{' (' + ', '.join(files) + ')' if files else ''}")
    return files


def held_out(count: int, generator: torch.Generator) -> set[int]:
    """The indices of a class's `count` images that go to the test set."""
    k = max(1, count // TEST_FRACTION_DIVISOR) if count >= 2 else 0
    return set(torch.randperm(count, generator=generator)[:k].tolist())


def split(folder: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(class names, train (file, label) pairs, test pairs)."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train, test = class_files(folder / "train"), class_files(folder / "test")
        if list(train) != list(test):
            raise ConfigError(f"model.data: {folder}/train and {folder}/test must have the same class subfolders; "
                              f"only in train: {sorted(set(train) - set(test))}, "
                              f"only in test: {sorted(set(test) - set(train))}")
        names = list(train)
        return (names, [(f, c) for c, n in enumerate(names) for f in train[n]],
                [(f, c) for c, n in enumerate(names) for f in test[n]])
    files = class_files(folder)
    names, train_pairs, test_pairs = list(files), [], []
    for label, name in enumerate(names):
        # a generator per class, so one class's split does not move when another class changes
        test = held_out(len(files[name]), torch.Generator().manual_seed(SPLIT_SEED * 1_000_003 + label))
        for index, f in enumerate(files[name]):
            (test_pairs if index in test else train_pairs).append((f, label))
    if not test_pairs:
        raise ConfigError(f"model.data: {folder} has too few images to hold out a test set "
                          f"(a class needs at least 2 images), or give it train/ and test/ subfolders")
    return names, train_pairs, test_pairs


def mode_of(file: Path) -> str:
    from PIL import Image

    try:
        with Image.open(file) as image:  # reads the header only
            return image.mode
    except Exception as error:  # Pillow raises many kinds for a broken file
        raise ConfigError(f"model.data: cannot read the image {file} ({error})") from None


def read(file: Path, mode: str, size: int) -> np.ndarray:
    """The image in `file` as uint8 [size, size, channels]: converted to `mode`, shorter side
    scaled to `size`, centre-cropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened).convert(mode)
    except Exception as error:
        raise ConfigError(f"model.data: cannot read the image {file} ({error})") from None
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # resizing with a box is the crop and the scaling in one resample
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def stack(pairs: list[tuple[Path, int]], mode: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, size, size] uint8 and labels [N] int64."""
    channels = 1 if mode == "L" else 3
    images = np.empty((len(pairs), size, size, channels), dtype=np.uint8)
    for i, (file, _) in enumerate(pairs):
        images[i] = read(file, mode, size)
    labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load(path: str, image_size: int) -> Images:
    """The images under `path` (a folder with one subfolder per class, or train/ and test/
    folders of those), resized to image_size × image_size, uint8 0..255."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.data: no such folder {path!r}; expected a folder with one subfolder of "
                          f"images per class")
    if image_size < 1:
        raise ConfigError(f"model.image_size: expected at least 1, got {image_size}")
    names, train, test = split(folder)
    grey = all(mode_of(f) in GREY_MODES for f, _ in train + test)
    mode = "L" if grey else "RGB"
    train_images, train_labels = stack(train, mode, image_size)
    test_images, test_labels = stack(test, mode, image_size)
    return Images(train_images, train_labels, test_images, test_labels, num_classes=len(names), pixel_max=255.0,
                  class_names=names, name=folder.resolve().name, mirror_symmetric=True)
