"""A task of your own, trained by the project's trainer without editing the package: a
residual MLP classifying scikit-learn's breast-cancer data (569 tumours, 30 features,
benign or malignant; `model.dataset=wine`: 178 wines, 13 features, 3 cultivars). Written
against the public API only (`diffusionblocks`, `diffusionblocks_ext`).

Block-wise it follows the project's classification recipe (tasks/vit.py, docs/method.md §6):
the target y is the label's learned embedding scaled to norm 0.25; a block sees the
features and c_in·z (z = y + σ·ε, σ drawn from its own range), its layers give F, the
denoised estimate is D = c_skip·z + c_out·F, logits = head(adaLN(D)), and the loss is
λ(σ)-weighted cross-entropy. Inference chains the blocks by Euler steps, handing on the
expected label embedding. End to end: the same layers on the features alone, plain
cross-entropy.

The trainer names this task "user_task:ResidualMLPTask" (module:Class) in each run's
config.json, so every process that trains, resumes, evaluates or samples the run must be
able to import `user_task`: run from this folder (the trainer adds the current directory
to sys.path, as `python -m` does), or put this folder on PYTHONPATH.

    cd examples
    python user_task.py                         # block-wise and end to end: both test accuracies
    python user_task.py --e2e-steps 20          # a tiny setting (seconds)
    diffusionblocks train --task user_task:ResidualMLPTask --out runs/mlp            # Config() defaults
    diffusionblocks train --task user_task:ResidualMLPTask tiny --mode e2e --out runs/mlp-tiny  # its own preset
    diffusionblocks train --resume runs/mlp --set e2e_steps=1500
    diffusionblocks eval runs/mlp
    torchrun --nproc-per-node 2 -m diffusionblocks train --task user_task:ResidualMLPTask \\
        --parallel blocks --set shared=per-block --out runs/mlp-parallel

Matrices this small train fastest on one thread: add `--set threads=1` (this script and the
`tiny` preset do) where other work shares the cores.
"""

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import diffusionblocks_ext as dx
from diffusionblocks import (AdaptiveNorm, BlockPartition, ConfigError, LevelEmbedder, Trainer, denoise_chain,
                             device_of, expected_embedding, override, preset, zero_init_modulation)

TASK = "user_task:ResidualMLPTask"  # how a config names the task below
DATASETS = ("breast_cancer", "wine")
TEST_FRACTION = 0.25  # held out, stratified, always the same examples
EVAL_SEED = 0         # the Euler chain's starting noise at evaluation: fixed, so evaluation repeats


@dataclass
class ResidualMLPConfig:
    """The task's options: the `model.*` fields of a run (`--set model.width=32`)."""
    dataset: str = "breast_cancer"
    layers: int = 6                 # residual layers: what the trainer cuts into blocks
    width: int = 64
    hidden: int = 128               # MLP units per layer
    label_norm: float = 0.25        # norm of the label target y
    inference_steps: int = 0        # Euler levels; 0 = B (each block runs once)

    def check(self, config) -> None:
        """Raises ConfigError naming the first bad field (config: the whole TrainConfig)."""
        problems = [
            (self.dataset in DATASETS, f"model.dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}"),
            (self.layers >= 1, f"model.layers: expected at least 1, got {self.layers}"),
            (self.width >= 1, f"model.width: expected at least 1, got {self.width}"),
            (self.hidden >= 1, f"model.hidden: expected at least 1, got {self.hidden}"),
            (self.label_norm > 0, f"model.label_norm: expected > 0, got {self.label_norm:g}"),
            (self.inference_steps >= 0, f"model.inference_steps: expected >= 0 (0 = B), got {self.inference_steps}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)


def load_data(name: str) -> dict[str, torch.Tensor]:
    """Features standardised with the training split's mean and spread (float32), labels (int64)."""
    from sklearn.datasets import load_breast_cancer, load_wine  # only when a task is built
    from sklearn.model_selection import train_test_split

    x, y = {"breast_cancer": load_breast_cancer, "wine": load_wine}[name](return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=0)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    features = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return {"train_x": features(train_x), "train_y": torch.tensor(train_y), "test_x": features(test_x),
            "test_y": torch.tensor(test_y)}


class ResidualMLPLayer(nn.Module):
    """x + gate·MLP(adaLN(x)): shift, scale and gate come from the noise level's embedding
    (cond), zero-initialised, so a fresh layer is the identity (adaLN-Zero)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = AdaptiveNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.gate = zero_init_modulation(width, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.gate(cond) * self.mlp(self.norm(x, cond))


class ResidualMLP(nn.Module):
    def __init__(self, options: ResidualMLPConfig, num_features: int, num_classes: int):
        super().__init__()
        width = options.width
        # Shared modules (every block uses them).
        self.embed = nn.Linear(num_features, width)
        self.label_embed = nn.Parameter(torch.randn(num_classes, width))  # the targets' table E
        self.target_in = nn.Linear(width, width)  # block-wise only: reads c_in·z into the stream
        self.sigma_embed = LevelEmbedder(width, dx.c_noise)
        self.e2e_cond = nn.Parameter(torch.randn(1, width))  # end to end only: stands in for the σ-embedding
        self.final_norm = nn.LayerNorm(width, eps=1e-6)
        self.head_norm = AdaptiveNorm(width)
        self.head = nn.Linear(width, num_classes)
        # The residual layers the trainer cuts into blocks.
        self.layers = nn.ModuleList(ResidualMLPLayer(width, options.hidden) for _ in range(options.layers))

    def run_layers(self, x: torch.Tensor, cond: torch.Tensor, layers: range) -> torch.Tensor:
        for index in layers:
            x = self.layers[index](x, cond)
        return self.final_norm(x)

    def logits(self, D: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(D, cond))


class ResidualMLPTask:
    """Tabular classification as a denoising task; implements `diffusionblocks.Task`."""

    Config = ResidualMLPConfig
    level_name = "sigma"
    presets = {  # `diffusionblocks train --task user_task:ResidualMLPTask tiny`
        "tiny": lambda: dict(model=ResidualMLPConfig(layers=2, width=16, hidden=32), blocks=2, e2e_steps=10,
                             warmup_e2e_steps=2, batch_size=32, checkpoint_every=5, threads=1),
    }

    def __init__(self, options: ResidualMLPConfig):
        self.options = options
        self.data = load_data(options.dataset)
        self.model = ResidualMLP(options, self.data["train_x"].shape[1], int(self.data["train_y"].max()) + 1)

    # --- training ---------------------------------------------------------------------
    def examples_per_epoch(self) -> int:
        return len(self.data["train_y"])

    def train_batch(self, step, batch_size, seed, generator):
        index = torch.randint(len(self.data["train_y"]), (batch_size,), generator=generator)
        return self.data["train_x"][index], self.data["train_y"][index]

    def block_loss(self, batch, block, plan: BlockPartition, generator):
        features, labels = batch
        sigma = dx.sample_sigma(len(labels), *plan.training_range(block), generator=generator, device=labels.device)
        z, z_in = dx.add_noise(self.target(labels), sigma, generator=generator)
        _, logits = self.denoise(features, z, z_in, sigma, plan.layers(block))
        return dx.weighted_cross_entropy(logits, labels, dx.loss_weight(sigma)), sigma

    def end_to_end_loss(self, batch, generator):
        features, labels = batch
        logits = self.end_to_end(features)
        return dx.weighted_cross_entropy(logits, labels, logits.new_ones(len(labels)))

    def no_weight_decay(self):
        return set()

    # --- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, features: torch.Tensor, plan: BlockPartition, mode: str) -> torch.Tensor:
        """Logits: the whole stack end to end, or the Euler chain over the blocks."""
        features = features.to(device_of(self.model))
        if mode == "e2e":
            return self.end_to_end(features)
        to_estimate = lambda D, logits: expected_embedding(logits, self.model.label_embed, True)  # noqa: E731
        steps = self.options.inference_steps or plan.num_blocks
        return denoise_chain(self.denoise, to_estimate, plan, features, (self.options.width,), steps,
                             torch.Generator().manual_seed(EVAL_SEED))

    def evaluate(self, plan, mode):
        predicted = self.predict(self.data["test_x"], plan, mode).argmax(dim=-1).cpu()
        return {"test_accuracy": (predicted == self.data["test_y"]).float().mean().item()}

    def finish(self, plan, mode, out_dir):
        return {}

    # --- the pieces the Euler chain runs --------------------------------------------------
    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return self.options.label_norm * F.normalize(self.model.label_embed[labels], dim=-1)

    def denoise(self, features, z, z_in, sigma, layers):
        """(D, logits) of `layers` alone at noise level σ, from the features and c_in·z."""
        cond = self.model.sigma_embed(sigma)
        h = self.model.run_layers(self.model.embed(features) + self.model.target_in(z_in), cond, layers)
        D = dx.denoise(h, z, sigma)
        return D, self.model.logits(D, cond)

    def end_to_end(self, features):
        cond = self.model.e2e_cond.expand(len(features), -1)
        h = self.model.run_layers(self.model.embed(features), cond, range(len(self.model.layers)))
        return self.model.logits(h, cond)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the residual MLP block-wise and end to end.")
    parser.add_argument("--e2e-steps", type=int, default=600, help="end-to-end steps (block-wise: B× as many)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--dataset", choices=DATASETS, default="breast_cancer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/user_task"), help="runs go into OUT/blocks, OUT/e2e")
    args = parser.parse_args(argv)
    for mode in ("blocks", "e2e"):
        if (args.out / mode / "config.json").exists():
            parser.error(f"{args.out / mode} already holds a run; choose another --out")
    for mode in ("blocks", "e2e"):
        # The config names the task by module:Class, so its options come from that class (this
        # script's own classes are __main__'s, which other processes could not import).
        config = override(preset("custom", task=TASK), [
            f"mode={mode}", f"blocks={args.blocks}", f"seed={args.seed}", f"model.dataset={args.dataset}",
            f"e2e_steps={args.e2e_steps}", f"warmup_e2e_steps={min(50, args.e2e_steps // 10)}", "progress=false",
            "threads=1"])  # matrices this small run fastest on one thread
        started = time.time()
        report = Trainer(config, args.out / mode).run()
        print(f"{mode}: test accuracy {report['metrics']['test_accuracy']:.4f} · {report['steps']} steps · "
              f"{time.time() - started:.1f} s · {args.out / mode}")


if __name__ == "__main__":
    main()
