"""Quality metrics for generated images, without downloads (the FID recipe, scaled down).

The feature extractor is a small CNN that this project trains on the real training split
of the run's dataset (deterministically: fixed seed, fixed epochs, on the run's device) and
caches as safetensors in the run directory, so every later evaluation of that run reuses
it. On digits it scores about 98-99% on the real test split (tests/test_dit.py requires
>= 95%); its test accuracy is in every report (`evaluator_test_accuracy`).

- class consistency: the share of images generated for class c that it classifies as c.
- Fréchet distance: ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2(Σ_g^½ Σ_r Σ_g^½)^½) between Gaussians
  fitted to its penultimate features (64-d) of generated images and of the real test
  split. It is the analogue of FID (Inception-v3 pool features there, this CNN here), so
  its values are comparable only with each other, never with published FIDs (dit.py
  writes the samples where the standard FID tools read them). A floor for the scale: the
  real training split scores about 1/10 of an untrained model's samples (see
  `reference_distances`)."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..task import device_of
from .data import images as image_data
from .data.images import Images

FILENAME = "evaluator.safetensors"
FEATURES = 64
SEED = 0


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch: int
    lr: float
    max_shift: int   # augmentation: generated images are not always placed like the real ones
    flip: bool


def recipe(data: Images) -> Recipe:
    """Digits: 16 epochs of 64 (the figures the digits results were measured with). Larger
    photos: 10 epochs of 256, crops of 1/8 the size, flips where they keep the label."""
    if data.image_size <= 8:
        return Recipe(epochs=16, batch=64, lr=3e-3, max_shift=1, flip=False)
    return Recipe(epochs=10, batch=256, lr=2e-3, max_shift=data.image_size // 8, flip=data.mirror_symmetric)


class ImageCNN(nn.Module):
    """Image in [0, 1] [N, C, S, S] -> logits over the classes; `features` is the 64-d
    penultimate layer (after its ReLU), the space of the Fréchet distance. Stages halve the
    size down to 2×2: two convolutions of 32 then a pool, then one convolution (width
    doubling) and a pool per further stage (8×8 digits: 32, 64 channels)."""

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        stages = max(1, int(math.log2(image_size // 2)))
        layers, width = [nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2)], 32
        for _ in range(stages - 1):
            layers += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width *= 2
        size = image_size >> stages
        self.conv = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build(data: Images) -> ImageCNN:
    return ImageCNN(data.channels, data.image_size, data.num_classes)


def train(data: Images, device: torch.device | str = "cpu", seed: int = SEED) -> ImageCNN:
    """A pure function of (data, seed): Adam with cosine decay, augmented batches."""
    plan = recipe(data)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the initial weights, without touching the caller's RNG
        torch.manual_seed(seed)
        model = build(data)
    model.to(device)
    data = data.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    batch = min(plan.batch, len(data.train_labels))
    total = plan.epochs * (len(data.train_labels) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    for step in range(total):
        images, labels = image_data.train_batch(data, step, batch, seed, plan.max_shift, plan.flip, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def load_or_train(run_dir: Path | None, data: Images, device: torch.device | str = "cpu") -> tuple[ImageCNN, bool]:
    """The run's cached evaluator (on `device`), or one trained there and written to the
    cache. Returns (model, reused)."""
    path = Path(run_dir) / FILENAME if run_dir is not None else None
    if path is not None and path.exists():
        model = build(data)
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval(), True
    model = train(data, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return model, False


@torch.no_grad()
def features(model: ImageCNN, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Penultimate features on the CPU, of float images in [0, 1] on any device."""
    device = device_of(model)
    return torch.cat([model.features(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def accuracy(model: ImageCNN, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Share of float `images` classified as `labels` (= class consistency for generated images)."""
    device = device_of(model)
    predicted = torch.cat([model(images[i:i + batch].to(device)).argmax(dim=-1).cpu()
                           for i in range(0, len(images), batch)])
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


def reference_distances(model: ImageCNN, data: Images) -> dict[str, float]:
    """The evaluator's own figures: test accuracy, and the Fréchet distance of the real
    training split to the test split (what a perfect generator would score, up to the
    sample sizes)."""
    test_images = data.pixels(data.test_images)
    test = features(model, test_images)
    return {"evaluator_test_accuracy": accuracy(model, test_images, data.test_labels),
            "frechet_train_vs_test": frechet_distance(features(model, data.pixels(data.train_images)), test)}
