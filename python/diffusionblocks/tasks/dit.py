"""Class-conditional image generation with a DiT (docs/method.md §6), on scikit-learn's 8×8
digits, CIFAR-10/100 or your own images (data/images.py).

The target y is the image itself, standardised to the σ_data the EDM preconditioning
assumes: y = σ_d·(x − μ)/s, with μ and s the mean and standard deviation of all pixels of
the training split (x in [0, 1]; digits: 0.305 and 0.376), so y has standard deviation σ_d = 0.5.
Generated y map back by x = μ + s·y/σ_d, clipped to [0, 1].

The network is DiT's: patchify (2×2 patches -> 16 tokens) + learned positions, adaLN-Zero
transformer layers conditioned on c = σ-embedding + class embedding (a learned table with
one extra row, the null class, that replaces the label of 10% of training examples so one
model is both conditional and unconditional), and a final adaLN + zero-initialised linear
layer un-patchified into the raw output F. D = c_skip·z + c_out·F; the loss is the fused
`edm_loss`, λ(σ)·‖D − y‖² computed in F-space.

Block-wise, block b draws σ from its widened range and runs only its layers. End to end
(--mode e2e) is the ordinary DiT diffusion model: the same modules, every layer, σ from
the whole log-normal. Both sample the same way (sampler.integrate): N levels equally
spaced in the training CDF, each evaluation running the block that owns its σ, so a
block-wise step costs L/B layers against L end to end.

Evaluation (evaluator.py): class consistency and the Fréchet distance of a small CNN's
features, for `eval_samples` images generated at the end of training (finish). Those
images are also written where the standard FID tools read them: one PNG per image in
`fid-samples/` and all of them in `fid-samples.npz` (uint8 [N, H, W, C] as `arr_0`,
labels as `labels`)."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import diffusionblocks_ext as dx

from .. import sampler, schedule
from ..errors import ConfigError, layer_stack_problems, one_of, raise_first
from ..task import device_of
from . import evaluator
from .data import images as image_data
from .data.images import ImageDataOptions
from .layers import AdaptiveNorm, LevelEmbedder, TransformerLayer, patchify, unpatchify

EVAL_SEED = 0         # starting noise of the end-of-run samples and of the test loss's draws
TEST_LOSS_REPEATS = 4  # σ draws per test image for test_denoising_loss
SAMPLE_BATCH = 1000   # images generated per sampler call at the end of a run
FID_FOLDER = "fid-samples"


@dataclass
class DiTConfig(ImageDataOptions):
    layers: int = 6
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    patch_size: int = 2
    label_dropout: float = 0.1       # share of training labels replaced by the null class (CFG)
    max_shift: int = 0               # augmentation: random shift in pixels (0: the test split is centred too)
    sample_steps: int = 50           # N noise levels of the sampler
    sampler: str = "euler"           # "euler" or "heun"
    sample_schedule: str = "cdf"     # levels: "cdf" (equal steps in the training CDF, docs/method.md §5) or "karras" (ρ=7)
    cfg_scale: float = 1.0           # classifier-free guidance s: D_u + s·(D_c − D_u); 1 = none
    eval_samples: int = 1000         # images generated at the end of a run (equal per class)
    grid_columns: int = 10           # samples per class (row) in the PNG grids
    write_samples: bool = False      # also write the eval_samples images for FID tools (PNG folder + .npz)

    def check(self, config) -> None:
        """Raises ConfigError naming the first bad field (config: the whole TrainConfig)."""
        problems = layer_stack_problems(self) + image_data.problems(self, config) + [
            (0 <= self.label_dropout < 1, f"model.label_dropout: expected in [0, 1), got {self.label_dropout:g}"),
            (self.sample_steps >= 1, f"model.sample_steps: expected at least 1, got {self.sample_steps}"),
            one_of("model.sampler", self.sampler, sampler.SAMPLERS),
            one_of("model.sample_schedule", self.sample_schedule, schedule.INFERENCE_SCHEDULES),
            (self.cfg_scale >= 0, f"model.cfg_scale: expected >= 0, got {self.cfg_scale:g}"),
            eval_samples_problem(self.eval_samples, self.known_classes() or 1),
            (self.grid_columns >= 1, f"model.grid_columns: expected at least 1, got {self.grid_columns}"),
        ]
        raise_first(problems)


def eval_samples_problem(count: int, classes: int) -> tuple[bool, str]:
    """Equal samples per class, at least 2 each (a covariance needs them)."""
    return (count % classes == 0 and count >= 2 * classes,
            f"model.eval_samples: expected a multiple of the {classes} classes, at least {2 * classes}, got {count}")


class DiT(nn.Module):
    def __init__(self, config: DiTConfig, image_size: int, channels: int, num_classes: int):
        super().__init__()
        width, self.patch_size = config.width, config.patch_size
        self.image_size, self.channels, self.null_class = image_size, channels, num_classes
        patch_dim = channels * config.patch_size ** 2
        # Shared modules (used by every block).
        self.patch_embed = nn.Linear(patch_dim, width)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // config.patch_size) ** 2, width))
        self.class_embed = nn.Embedding(num_classes + 1, width)  # row num_classes: the null class
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.sigma_embed = LevelEmbedder(width, dx.c_noise)
        self.final_norm = AdaptiveNorm(width)
        self.final_linear = nn.Linear(width, patch_dim)
        nn.init.zeros_(self.final_linear.weight)  # F = 0 at the start: D = c_skip·z (DiT's zero init)
        nn.init.zeros_(self.final_linear.bias)
        # The residual layers the partition cuts into blocks.
        self.layers = nn.ModuleList(TransformerLayer(width, config.heads, config.mlp_ratio)
                                    for _ in range(config.layers))

    def forward(self, z_in: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, layers: range) -> torch.Tensor:
        """Raw output F [N, C, H, W] of `layers` only, from c_in·z, σ [N] and labels [N]
        (num_classes = the null class)."""
        cond = self.sigma_embed(sigma) + self.class_embed(labels)
        x = self.patch_embed(patchify(z_in, self.patch_size)) + self.pos_embed
        for index in layers:
            x = self.layers[index](x, cond)
        tokens = self.final_linear(self.final_norm(x, cond))
        return unpatchify(tokens, self.patch_size, self.channels, self.image_size)


class DiTGeneration(image_data.ImageBatches):
    """Class-conditional image generation (digits, CIFAR-10/100 or your own images) as a task (see task.py)."""

    Config = DiTConfig
    level_name = "sigma"
    presets = {
        # The README's generative job: trains in minutes on 2 CPU cores.
        "dit-digits": lambda: dict(model=DiTConfig(), e2e_steps=1500),
        # For tests: seconds, not minutes.
        "dit-digits-tiny": lambda: dict(
            model=DiTConfig(layers=3, width=16, heads=2, mlp_ratio=2, sample_steps=6, eval_samples=20,
                            grid_columns=2),
            blocks=3, e2e_steps=6, warmup_e2e_steps=2, batch_size=32, checkpoint_every=5, threads=1),
        # The paper's CIFAR-10 DiT-S/2 (docs/method.md §6): 12 layers of width 384, 6 heads, patches
        # of 2, B = 3, γ = 0.05, lr 1e-4, 10% label dropout for guidance, 50 Euler steps, guidance
        # scale 2, horizontal flips. 10,000 samples at the end (the size of the test split, for
        # test FID), written for the FID tools. The epoch count is ours: the sources we have do
        # not print the paper's.
        "dit-cifar10": lambda: dict(
            model=DiTConfig(dataset="cifar10", layers=12, width=384, heads=6, patch_size=2, flip=True,
                            sample_steps=50, cfg_scale=2.0, eval_samples=10000, write_samples=True),
            blocks=3, gamma=0.05, lr=1e-4, weight_decay=0.0, batch_size=128, e2e_epochs=400,
            warmup_e2e_steps=1000, checkpoint_every=2000),
        # The same shapes of data; a model that trains an epoch of a few hundred images in seconds.
        "dit-cifar10-tiny": lambda: dict(
            model=DiTConfig(dataset="cifar10", layers=3, width=16, heads=2, mlp_ratio=2, patch_size=8, flip=True,
                            sample_steps=6, cfg_scale=2.0, eval_samples=20, grid_columns=2, write_samples=True),
            blocks=3, gamma=0.05, lr=1e-3, weight_decay=0.0, batch_size=32, e2e_epochs=1, warmup_e2e_steps=2,
            checkpoint_every=5, threads=1),
    }

    def __init__(self, options: DiTConfig):
        self.options = options
        self.data = image_data.load(options)
        self.num_classes = classes = self.data.num_classes
        raise_first([eval_samples_problem(options.eval_samples, classes)])
        pixels = self.data.pixels(self.data.train_images)
        self.pixel_mean, self.pixel_std = pixels.mean().item(), pixels.std().item()
        self.model = DiT(options, self.data.image_size, self.data.channels, self.num_classes)
        self.num_layers = len(self.model.layers)

    # --- the target and back -----------------------------------------------------------
    def to_target(self, images: torch.Tensor) -> torch.Tensor:
        return dx.SIGMA_DATA * (images - self.pixel_mean) / self.pixel_std

    def to_images(self, y: torch.Tensor) -> torch.Tensor:
        return (self.pixel_mean + self.pixel_std * y / dx.SIGMA_DATA).clamp(0, 1)

    # --- training (task.py) ---------------------------------------------------------
    def block_loss(self, batch, block, plan, generator):
        images, labels = batch
        sigma = schedule.sample_sigmas(len(labels), plan.training_range(block), generator=generator,
                                       device=labels.device)
        return self.denoising_loss(images, labels, sigma, plan.layers(block), generator), sigma

    def end_to_end_loss(self, batch, generator):
        images, labels = batch
        sigma = schedule.sample_sigmas(len(labels), (dx.SIGMA_MIN, dx.SIGMA_MAX), generator=generator,
                                       device=labels.device)
        return self.denoising_loss(images, labels, sigma, range(self.num_layers), generator)

    def denoising_loss(self, images, labels, sigma, layers, generator):
        """λ(σ)·mean((D − y)²) per example, with 10% of the labels dropped to the null class."""
        y = self.to_target(images)
        z, z_in = dx.add_noise(y, sigma, generator=generator)
        # Drawn on the CPU generator, then moved: the same labels dropped on any device.
        dropped = (torch.rand(len(labels), generator=generator) < self.options.label_dropout).to(labels.device, non_blocking=True)
        labels = labels.masked_fill(dropped, self.model.null_class)
        return dx.edm_loss(self.model(z_in, sigma, labels, layers), z, y, sigma)

    def no_weight_decay(self):
        return {"pos_embed"}

    # --- sampling ------------------------------------------------------------------------
    def estimate(self, labels: torch.Tensor, cfg: float):
        """The sampler's estimate for `labels`: D conditional (cfg = 1), else the guided mix
        of one batched pass over [conditional; unconditional]."""
        null = torch.full_like(labels, self.model.null_class)

        def estimate(z, z_in, sigma, layers):
            if cfg == 1.0:
                D = dx.denoise(self.model(z_in, sigma, labels, layers), z, sigma)
                return D, D
            both = lambda t: torch.cat([t, t])  # noqa: E731
            F = self.model(both(z_in), both(sigma), torch.cat([labels, null]), layers)
            D_cond, D_uncond = dx.denoise(F, both(z), both(sigma)).chunk(2)
            D = sampler.guided(D_cond, D_uncond, cfg)
            return D, D

        return estimate

    @torch.no_grad()
    def generate(self, plan, labels: torch.Tensor, steps: int, method: str, cfg: float,
                 generator: torch.Generator, levels: str | None = None) -> tuple[torch.Tensor, dict]:
        """Images [N, C, H, W] in [0, 1] on the CPU for `labels` [N], and what it cost. `levels`:
        the noise-level schedule (default: the config's sample_schedule)."""
        levels = levels or self.options.sample_schedule
        sigmas = schedule.INFERENCE_SCHEDULES[levels](steps).tolist()
        shape = (len(labels), self.data.channels, self.data.image_size, self.data.image_size)
        device = device_of(self.model)
        started = time.perf_counter()
        y, blocks = sampler.integrate(self.estimate(labels.to(device), cfg), plan, shape, sigmas, generator, method,
                                      device=device)
        y = y.cpu()  # inside the timing: on a GPU this waits for the sampler to finish
        seconds = time.perf_counter() - started
        passes = 1 if cfg == 1.0 else 2  # the unconditional half of a guided batch is compute too
        layer_evals = sum(len(plan.layers(b)) for b in blocks)
        cost = {"steps": steps, "sampler": method, "schedule": levels, "cfg": cfg, "images": len(labels),
                "network_evals": len(blocks),
                "evals_by_block": [blocks.count(b) for b in range(plan.num_blocks)],
                "layer_calls": layer_evals,                      # layer forward calls, each over the batch
                "layer_evals_per_image": layer_evals * passes,   # layer applications per generated image
                "seconds": seconds}
        return self.to_images(y), cost

    def class_labels(self, per_class: int, label: int | None = None) -> torch.Tensor:
        classes = torch.arange(self.num_classes) if label is None else torch.tensor([label])
        return classes.repeat_interleave(per_class)

    def sample(self, plan, mode, request):
        """`diffusionblocks sample DIR`: a grid (rows = classes) of request.count samples per class."""
        options = self.options
        if request.decoding is not None:
            raise ConfigError("decoding: the dit task generates images; it has no decoding")
        if request.label is not None and not 0 <= request.label < self.num_classes:
            raise ConfigError(f"class: expected 0..{self.num_classes - 1}, got {request.label}")
        steps = request.steps or options.sample_steps
        cfg = options.cfg_scale if request.cfg is None else request.cfg
        if cfg < 0:
            raise ConfigError(f"cfg: expected >= 0, got {cfg:g}")
        per_class = request.count or options.grid_columns
        labels = self.class_labels(per_class, request.label)
        images, cost = self.generate(plan, labels, steps, request.sampler, cfg,
                                     torch.Generator().manual_seed(request.seed))
        # SampleRequest.run_dir, where the CLI passes it: the default folder and the cached evaluator.
        run_dir = getattr(request, "run_dir", None)
        name = f"samples-{mode}-{request.sampler}-N{steps}-cfg{cfg:g}-seed{request.seed}.png"
        out = request.out or Path(run_dir or ".") / name
        save_grid(images, per_class, out)
        summary = {"out": str(out), "mode": mode, "seed": request.seed, **cost}
        if run_dir is not None and (Path(run_dir) / evaluator.FILENAME).exists():
            model, _ = evaluator.load_or_train(run_dir, self.data, device_of(self.model))
            summary["class_consistency"] = evaluator.accuracy(model, images, labels)
        return summary

    # --- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def test_denoising_loss(self, plan) -> float:
        """Mean λ(σ)-weighted denoising loss on the test split, σ from the whole training
        density (fixed draws), each σ handled by the block that owns it: the held-out
        training objective of the composed model, comparable across modes."""
        data, device = self.device_data(), device_of(self.model)
        images = data.pixels(data.test_images).repeat(TEST_LOSS_REPEATS, 1, 1, 1)
        labels = data.test_labels.repeat(TEST_LOSS_REPEATS)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        sigma = schedule.sample_sigmas(len(labels), (dx.SIGMA_MIN, dx.SIGMA_MAX), generator=generator, device=device)
        y = self.to_target(images)
        z, z_in = dx.add_noise(y, sigma, generator=generator)
        owner = plan.block_of(sigma)
        total = torch.zeros((), device=device)
        for block in range(plan.num_blocks):
            mine = (owner == block).nonzero().flatten()
            if len(mine):
                layers = plan.enter(block)
                for part in mine.split(SAMPLE_BATCH):
                    F = self.model(z_in[part], sigma[part], labels[part], layers)
                    total += dx.edm_loss(F, z[part], y[part], sigma[part]).sum()
        return (total / len(labels)).item()

    def evaluate(self, plan, mode):
        return {"test_denoising_loss": self.test_denoising_loss(plan)}

    def finish(self, plan, mode, out_dir):
        """Generates eval_samples images (equal per class, SAMPLE_BATCH per sampler call)
        with the configured sampler, scores them against the real test split, saves the first
        grid_columns of each class as samples.png and, with write_samples, all of them for
        the FID tools. The evaluator is cached in out_dir."""
        options = self.options
        data = self.device_data()
        model, reused = evaluator.load_or_train(out_dir, data, device_of(self.model))
        labels = self.class_labels(options.eval_samples // self.num_classes)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        parts = [self.generate(plan, part, options.sample_steps, options.sampler, options.cfg_scale, generator)
                 for part in labels.split(SAMPLE_BATCH)]
        images = torch.cat([part for part, _ in parts])
        cost = combined_cost([c for _, c in parts])
        real = evaluator.features(model, data.pixels(data.test_images))
        metrics = {
            "class_consistency": evaluator.accuracy(model, images, labels),
            "frechet_distance": evaluator.frechet_distance(evaluator.features(model, images), real),
            **evaluator.reference_distances(model, data),
            "evaluator_reused": reused,
            **{f"sampling_{name}": value for name, value in cost.items()},
        }
        per_class = options.eval_samples // self.num_classes
        columns = min(options.grid_columns, per_class)
        grid = images.reshape(self.num_classes, per_class, *images.shape[1:])[:, :columns].flatten(0, 1)
        save_grid(grid, columns, Path(out_dir) / "samples.png")
        if options.write_samples:
            metrics["fid_samples"] = write_for_fid(images, labels, Path(out_dir) / FID_FOLDER)
        return metrics


def combined_cost(costs: list[dict]) -> dict:
    """The cost of several sampler calls of one configuration, as one."""
    total = dict(costs[0])
    for key in ("images", "network_evals", "layer_calls", "seconds"):
        total[key] = sum(c[key] for c in costs)
    total["evals_by_block"] = [sum(c["evals_by_block"][b] for c in costs) for b in range(len(total["evals_by_block"]))]
    return total


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] [N, C, H, W] as uint8 [N, H, W, C], rounded (what PNG files hold)."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def write_for_fid(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> str:
    """Images [N, C, H, W] in [0, 1] as the FID tools read them: `folder`/NNNNN.png (any
    tool that takes a folder: pytorch-fid, clean-fid, torch-fidelity) and `folder`.npz
    (uint8 [N, H, W, C] as arr_0, as the guided-diffusion evaluation suite reads). Returns
    the folder."""
    import numpy as np
    from PIL import Image

    pixels = to_uint8(images).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(pixels):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{index:05d}.png")
    np.savez(folder.with_suffix(".npz"), arr_0=pixels, labels=labels.numpy())
    return str(folder)


def save_grid(images: torch.Tensor, columns: int, path, scale: int = 4) -> None:
    """Images [N, C, H, W] in [0, 1] (C = 1 or 3), row-major in rows of `columns` (one class
    per row), as a PNG: each pixel a scale×scale square, a 1-pixel grey gap between images."""
    import matplotlib.image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + 1, w * scale + 1
    canvas = torch.full((rows * cell_h + 1, columns * cell_w + 1, c), 0.5)
    big = images.permute(0, 2, 3, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[1 + r * cell_h:1 + r * cell_h + h * scale, 1 + col * cell_w:1 + col * cell_w + w * scale] = big[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if c == 1:
        matplotlib.image.imsave(str(path), canvas[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        matplotlib.image.imsave(str(path), canvas.numpy())
