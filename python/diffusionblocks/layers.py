"""Building blocks shared by every task: the σ-embedder and a pre-norm transformer layer
with DiT-style adaLN-Zero conditioning (SPEC §4)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

import diffusionblocks_ext as dx


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaptive shift/scale of token features x [N, T, d] by per-example [N, d] vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] scalars -> [N, dim] cos/sin features at geometrically spaced frequencies (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SigmaEmbedder(nn.Module):
    """σ -> c_noise(σ) -> 256-d sinusoidal features -> MLP -> conditioning vector [N, d]."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(dx.c_noise(sigma), self.frequency_dim))


def zero_init_modulation(width: int, num_vectors: int) -> nn.Sequential:
    """cond -> num_vectors modulation vectors; zero weights so a fresh layer is the identity."""
    linear = nn.Linear(width, num_vectors * width)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TransformerLayer(nn.Module):
    """x + gate·Attn(modulate(LN(x))), then x + gate·MLP(modulate(LN(x))); shift, scale and
    gate come from the conditioning vector cond [N, d]."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.modulation = zero_init_modulation(width, 6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class AdaptiveNorm(nn.Module):
    """LN then σ-dependent shift/scale (zero-init): the adaLN in front of the output head."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = zero_init_modulation(width, 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [N, d] or [N, T, d]."""
        x = self.norm(x)
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        if x.dim() == 2:
            return x * (1 + scale) + shift
        return modulate(x, shift, scale)
