"""scikit-learn's digits (1,797 8x8 grey images, 10 classes; ships with scikit-learn, no
download): a fixed stratified 80/20 split, and training batches that are a pure function
of (seed, step), so a resumed run sees exactly the batches it would have seen."""

from dataclasses import dataclass

import torch

SPLIT_SEED = 0
TEST_FRACTION = 0.2
PIXEL_MAX = 16.0  # digits pixels are integers in [0, 16]
IMAGE_SIZE = 8
TRAIN_SIZE = 1437  # 80% of 1,797, stratified


@dataclass
class Digits:
    train_images: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int = 10
    image_size: int = IMAGE_SIZE
    channels: int = 1


def problems(options, config) -> list[tuple[bool, str]]:
    """The checks every digits task's options need (model.patch_size, model.max_shift) and
    the batch size they allow, as (ok, message) pairs."""
    return [
        (options.patch_size >= 1 and IMAGE_SIZE % options.patch_size == 0,
         f"model.patch_size: expected a divisor of the image size {IMAGE_SIZE}, got {options.patch_size}"),
        (options.max_shift >= 0, f"model.max_shift: expected >= 0, got {options.max_shift}"),
        (1 <= config.batch_size <= TRAIN_SIZE,
         f"batch_size: expected 1..{TRAIN_SIZE} (the training set), got {config.batch_size}"),
    ]


def load() -> Digits:
    # sklearn is imported here, not at the top: it adds 1.4 s to every start of the CLI,
    # and only the digits tasks need it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Digits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels in x and y, filling with background (0)."""
    if max_shift == 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, None, :, None]            # [n, 1, h, 1]
    cols = (dx + torch.arange(w))[:, None, None, :]            # [n, 1, 1, w]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def train_batch(data: Digits, step: int, batch_size: int, seed: int, max_shift: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of epoch-wise shuffling without replacement (the last partial batch of an
    epoch is dropped), augmented with draws from `generator`."""
    n = len(data.train_labels)
    batches_per_epoch = n // batch_size
    epoch, index = divmod(step, batches_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    chosen = order[index * batch_size:(index + 1) * batch_size]
    return random_shift(data.train_images[chosen], max_shift, generator), data.train_labels[chosen]
