"""scikit-learn's digits (1,797 8×8 grey images, 10 classes; ships with scikit-learn, no
download), with a fixed stratified 80/20 split. Pixels are the integers 0..16 of the
original, held as uint8 (images.py draws the batches)."""

import torch

from .images import Images

SPLIT_SEED = 0
TEST_FRACTION = 0.2
PIXEL_MAX = 16  # digits pixels are integers in [0, 16]
TRAIN_SIZE = 1437  # 80% of 1,797, stratified


def load() -> Images:
    # sklearn is imported here, not at the top: it adds 1.4 s to every start of the CLI,
    # and only the digits tasks need it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Images(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], num_classes=10,
                  pixel_max=PIXEL_MAX, class_names=[str(d) for d in range(10)], name="digits",
                  mirror_symmetric=False)
