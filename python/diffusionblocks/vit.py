"""ViT classification as a denoising task (SPEC §6).

The target y is the L2-normalised learnable embedding of the label. Its noisy version,
scaled by c_in, takes the place of the [CLS] token; the patch tokens are the clean image.
Readout: token 0 -> final norm -> h; D = c_skip·z + c_out·h; logits = head(adaLN(D)).

End-to-end baseline (--mode e2e), the same modules and layers: a learned [CLS] token on
the clean image through all layers, logits = head(adaLN(h)), plain cross-entropy. There
is no σ, so the adaLN modulation of every layer is fed one learned constant vector in
place of the σ-embedding; the modulation then acts as learned per-layer gates, shifts
and scales. The paper's baseline is a plain ViT; keeping the very same layers (same
parameters, compute and saved activations per layer) makes the comparison isolate the
training method, and makes the memory comparison count like against like."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import diffusionblocks_ext as dx

from .layers import AdaptiveNorm, SigmaEmbedder, TransformerLayer


@dataclass
class ViTConfig:
    layers: int = 6
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    patch_size: int = 2


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)·(W/p), C·p·p] non-overlapping patches, row-major."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig, image_size: int, channels: int, num_classes: int):
        super().__init__()
        width, self.patch_size = config.width, config.patch_size
        num_patches = (image_size // config.patch_size) ** 2
        # Shared modules (used by every block).
        self.patch_embed = nn.Linear(channels * config.patch_size ** 2, width)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, width))
        self.label_embed = nn.Parameter(torch.randn(num_classes, width))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))  # end-to-end only
        self.e2e_cond = nn.Parameter(torch.randn(1, width))  # end-to-end only: stands in for the σ-embedding
        self.sigma_embed = SigmaEmbedder(width)
        self.final_norm = nn.LayerNorm(width, eps=1e-6)
        self.head_norm = AdaptiveNorm(width)
        self.head = nn.Linear(width, num_classes)
        # The residual layers the partition cuts into blocks.
        self.layers = nn.ModuleList(TransformerLayer(width, config.heads, config.mlp_ratio)
                                    for _ in range(config.layers))

    def run_layers(self, images: torch.Tensor, token0: torch.Tensor, cond: torch.Tensor,
                   layers: range) -> torch.Tensor:
        """Token 0 plus the image's patch tokens through `layers` only; returns the final-normed token 0."""
        patches = self.patch_embed(patchify(images, self.patch_size))
        x = torch.cat([token0.unsqueeze(1), patches], dim=1) + self.pos_embed
        for index in layers:
            x = self.layers[index](x, cond)
        return self.final_norm(x[:, 0])

    def logits(self, D: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(D, cond))


class ViTClassification:
    """The DenoisingTask for image classification (see task.py)."""

    def __init__(self, model: ViT, normalized_inference_embedding: bool = True):
        self.model = model
        self.num_layers = len(model.layers)
        # SPEC §6 decision: the sampler uses the normalised E; False reproduces the authors' code.
        self.normalized_inference_embedding = normalized_inference_embedding

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.label_embed[labels], dim=-1)

    def denoise(self, images, z, z_in, sigma, layers):
        cond = self.model.sigma_embed(sigma)
        h = self.model.run_layers(images, z_in, cond, layers)
        D = dx.denoise(h, z, sigma)
        return D, self.model.logits(D, cond)

    def denoising_loss(self, logits, labels, sigma):
        return dx.weighted_cross_entropy(logits, labels, dx.loss_weight(sigma))

    def sampler_estimate(self, D, logits):
        """The expected label embedding softmax(logits)·E."""
        embedding = self.model.label_embed
        if self.normalized_inference_embedding:
            embedding = F.normalize(embedding, dim=-1)
        return logits.softmax(dim=-1) @ embedding

    def end_to_end(self, images):
        token0 = self.model.cls_token[:, 0].expand(len(images), -1)
        cond = self.model.e2e_cond.expand(len(images), -1)
        h = self.model.run_layers(images, token0, cond, range(self.num_layers))
        return self.model.logits(h, cond)

    def end_to_end_loss(self, logits, labels):
        return dx.weighted_cross_entropy(logits, labels, torch.ones(len(labels), dtype=logits.dtype))

    def metrics(self, logits, labels):
        return {"accuracy": (logits.argmax(dim=-1) == labels).float().mean().item()}
