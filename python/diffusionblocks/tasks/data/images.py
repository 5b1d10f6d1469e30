"""Labelled image datasets, as the ViT and DiT tasks (and the evaluator CNN) use them: held
as uint8 (CIFAR: 0..255, digits: 0..16) on the training device, turned into float pixels
in [0, 1] per batch, augmented there.

Batches are a pure function of (seed, step) and draws from the step's CPU generator:
epoch-wise shuffling without replacement (the last partial batch of an epoch is dropped),
then a random crop from the image padded with max_shift zero pixels on every side (for
max_shift = 4 at 32×32 this is the standard "random crop, padding 4" of CIFAR training;
for digits it is a shift of a digit on its background) and, where asked, a horizontal
flip of half the images. Only the small draws (the order, 2 offsets and a flip per image)
come from CPU generators; the gather runs on the device that holds the images, so a GPU
run copies no pixels from the host and draws the same batches as a CPU run. The small
draws cross with non_blocking=True: a blocking copy would make the host wait for the GPU.

Sources (`load`): "digits" (scikit-learn's, embedded), "cifar10" and "cifar100" (the
official python archives, cifar.py), "folder" (your own images, one subfolder per class,
image_folder.py)."""

from dataclasses import dataclass, field, replace

import torch

from ...errors import ConfigError
from ...task import device_of

DATASETS = ("digits", "cifar10", "cifar100", "folder")
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # "folder": model.image_size


@dataclass
class Images:
    train_images: torch.Tensor   # [N, C, H, W] uint8, values 0..pixel_max
    train_labels: torch.Tensor   # [N] int64 in 0..num_classes-1
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    pixel_max: float = 255.0     # the uint8 value of a white pixel (16 for digits)
    class_names: list[str] = field(default_factory=list)
    name: str = ""
    mirror_symmetric: bool = True  # a horizontally flipped image keeps its label (photos: yes; digits: no)

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    def to(self, device: torch.device | str) -> "Images":
        """The same dataset with its tensors on `device`."""
        move = lambda t: t.to(device)  # noqa: E731
        return replace(self, train_images=move(self.train_images), train_labels=move(self.train_labels),
                       test_images=move(self.test_images), test_labels=move(self.test_labels))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as float32 pixels in [0, 1]."""
        return images.float() / self.pixel_max


@dataclass
class ImageDataOptions:
    """The data fields every image task's options have (ViT, DiT)."""
    dataset: str = "digits"     # "digits", "cifar10", "cifar100" or "folder"
    data: str = ""              # cifar*: the archive or its folder ("" = cache / download); folder: the folder
    image_size: int = 32        # folder only: images are resized to image_size × image_size
    labels: str = "fine"        # cifar100 only: the 100 "fine" or the 20 "coarse" labels
    flip: bool = False          # augmentation: horizontal flips (for photos, not digits)

    def native_size(self) -> int:
        return NATIVE_SIZE.get(self.dataset, self.image_size)

    def known_classes(self) -> int | None:
        """The number of classes, where it is known without reading the data."""
        if self.dataset == "cifar100":
            return 100 if self.labels == "fine" else 20
        return {"digits": 10, "cifar10": 10}.get(self.dataset)

    def data_problems(self) -> list[tuple[bool, str]]:
        return [
            (self.dataset in DATASETS, f"model.dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}"),
            (self.dataset != "folder" or bool(self.data),
             "model.data: the folder dataset needs the path of a folder with one subfolder per class"),
            (self.dataset != "digits" or not self.data,
             "model.data: the digits ship with scikit-learn; set model.dataset to read other images"),
            (self.image_size >= 1, f"model.image_size: expected at least 1, got {self.image_size}"),
            (self.labels in ("fine", "coarse"), f"model.labels: expected fine or coarse, got {self.labels!r}"),
        ]


def problems(options, config) -> list[tuple[bool, str]]:
    """The checks of an image task's data fields, patch_size and max_shift, and of the batch
    size where the training set's size is known before loading (digits)."""
    size = options.native_size()
    result = options.data_problems() + [
        (options.patch_size >= 1 and size % options.patch_size == 0,
         f"model.patch_size: expected a divisor of the image size {size}, got {options.patch_size}"),
        (options.max_shift >= 0, f"model.max_shift: expected >= 0, got {options.max_shift}"),
    ]
    if options.dataset == "digits":
        from . import digits

        result.append((1 <= config.batch_size <= digits.TRAIN_SIZE,
                       f"batch_size: expected 1..{digits.TRAIN_SIZE} (the training set), got {config.batch_size}"))
    return result


def load(options: ImageDataOptions) -> Images:
    """The dataset the options name (ConfigError, or DataMissing from fetch.py, if it cannot be read)."""
    if options.dataset == "digits":
        from . import digits

        return digits.load()
    if options.dataset in ("cifar10", "cifar100"):
        from . import cifar

        return cifar.load(options.dataset, options.data, options.labels)
    if options.dataset == "folder":
        from . import image_folder

        return image_folder.load(options.data, options.image_size)
    raise ConfigError(f"model.dataset: expected one of {', '.join(DATASETS)}, got {options.dataset!r}")


def check_batch_size(data: Images, batch_size: int) -> None:
    if not 1 <= batch_size <= len(data.train_labels):
        raise ConfigError(f"batch_size: expected 1..{len(data.train_labels)} (the {data.name} training set), "
                          f"got {batch_size}")


def random_crop(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image [N, C, H, W] translated by up to max_shift pixels in y and x, the uncovered
    border filled with 0: a random H×W crop of the image zero-padded by max_shift. The
    offsets come from `generator` (CPU); the gather runs on the images' device."""
    if max_shift == 0:
        return images
    n, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator).to(device, non_blocking=True)
    rows = (dy + torch.arange(h, device=device))[:, None, :, None]     # [n, 1, h, 1]
    cols = (dx + torch.arange(w, device=device))[:, None, None, :]     # [n, 1, 1, w]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half the images (drawn from `generator`) mirrored left to right."""
    flipped = (torch.rand(len(images), generator=generator) < 0.5).to(images.device, non_blocking=True)
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the training set in `epoch` (a pure function of seed and epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train_batch(data: Images, step: int, batch_size: int, seed: int, max_shift: int, flip: bool,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step`: float pixels in [0, 1] [batch_size, C, H, W] and labels, on the device
    that holds `data`."""
    check_batch_size(data, batch_size)
    n = len(data.train_labels)
    epoch, index = divmod(step, n // batch_size)
    chosen = epoch_order(n, seed, epoch)[index * batch_size:(index + 1) * batch_size]
    chosen = chosen.to(data.train_labels.device, non_blocking=True)
    images = random_crop(data.train_images[chosen], max_shift, generator)
    if flip:
        images = random_flip(images, generator)
    return data.pixels(images), data.train_labels[chosen]


class ImageBatches:
    """What an image task's training data needs from the task (self.data, self.options with
    max_shift and flip, self.model): the epoch size, and batches drawn on the model's device."""

    def examples_per_epoch(self) -> int:
        return len(self.data.train_labels)

    def device_data(self) -> Images:
        """The dataset on the model's device (moved there once: batches never cross from the host)."""
        device = device_of(self.model)
        if self.data.train_images.device != device:
            self.data = self.data.to(device)
        return self.data

    def train_batch(self, step, batch_size, seed, generator):
        options = self.options
        return train_batch(self.device_data(), step, batch_size, seed, options.max_shift, options.flip, generator)
