"""Quality metrics for generated digits, without downloads (the FID recipe, scaled down).

The feature extractor is a small CNN that this project trains on the real training split
of scikit-learn's digits (deterministically: fixed seed, fixed epochs) and caches as
safetensors in the run directory, so every later evaluation of that run reuses it. On the
real test split it scores about 98-99% (tests/test_dit.py requires >= 95%).

- class consistency: the share of images generated for class c that it classifies as c.
- Fréchet distance: ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2(Σ_g^½ Σ_r Σ_g^½)^½) between Gaussians
  fitted to its penultimate features (64-d) of generated images and of the real test
  split. It is the analogue of FID (Inception-v3 pool features there, this CNN here), so
  its values are comparable only with each other, never with published FIDs. A floor for
  the scale: the real training split scores about 1/10 of an untrained model's samples
  (see `reference_distances`)."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..task import device_of
from . import digits

FILENAME = "evaluator.safetensors"
FEATURES = 64
SEED = 0
EPOCHS = 16
BATCH = 64
LR = 3e-3
MAX_SHIFT = 1  # augmentation: generated digits are not always centred like the real ones


class DigitsCNN(nn.Module):
    """8×8 grey image in [0, 1] -> logits over 10 classes; `features` is the 64-d
    penultimate layer (after its ReLU), the space of the Fréchet distance."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 4×4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 2×2
            nn.Flatten(), nn.Linear(64 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train(dataset: digits.Digits, epochs: int = EPOCHS, seed: int = SEED) -> DigitsCNN:
    """A pure function of (data, epochs, seed): Adam with cosine decay, shift augmentation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the initial weights, without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitsCNN(dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = len(dataset.train_labels) // BATCH
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    for step in range(total):
        images, labels = digits.train_batch(dataset, step, BATCH, seed, MAX_SHIFT, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def load_or_train(run_dir: Path | None, dataset: digits.Digits) -> tuple[DigitsCNN, bool]:
    """The run's cached evaluator, or a freshly trained one written to the cache.
    Returns (model, reused)."""
    path = Path(run_dir) / FILENAME if run_dir is not None else None
    if path is not None and path.exists():
        model = DigitsCNN(dataset.num_classes)
        model.load_state_dict(load_file(str(path)))
        return model.eval(), True
    model = train(dataset)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return model, False


@torch.no_grad()
def features(model: DigitsCNN, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Penultimate features on the CPU, of images on any device (the evaluator runs on its own)."""
    device = device_of(model)
    return torch.cat([model.features(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` classified as `labels` (= class consistency for generated images)."""
    predicted = model(images.to(device_of(model))).argmax(dim=-1).cpu()  # images on any device
    return (predicted == labels.cpu()).double().mean().item()


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Between Gaussians fitted to feature sets a [n, d] and b [m, d], in float64. The
    matrix square root goes through symmetric eigendecompositions (Σ_a^½ Σ_b Σ_a^½ is
    symmetric PSD), so no complex parts appear as they can with scipy's sqrtm."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def reference_distances(model: DigitsCNN, dataset: digits.Digits) -> dict[str, float]:
    """The evaluator's own figures: test accuracy, and the Fréchet distance of the real
    training split to the test split (what a perfect generator would score, up to the
    sample sizes)."""
    test = features(model, dataset.test_images)
    return {"evaluator_test_accuracy": accuracy(model, dataset.test_images, dataset.test_labels),
            "frechet_train_vs_test": frechet_distance(features(model, dataset.train_images), test)}
