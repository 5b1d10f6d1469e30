"""Llama-style building blocks for the language-model tasks: RMSNorm, rotary positions,
SwiGLU, and a pre-norm decoder layer with DiT-style adaLN-Zero conditioning (SPEC §4).

The layer is `x + gate·Attn(modulate(RMSNorm(x)))`, then `x + gate·SwiGLU(modulate(RMSNorm(x)))`;
shift, scale and gate come from a conditioning vector cond [N, d] (a σ-embedding, or a
learned constant where there is no σ). The modulation is zero-initialised, so a fresh
layer is the identity. Attention takes an explicit boolean mask (True = may attend),
built once per length by the task, or None for plain causal attention. Rotary tables
are passed in, since a task decides the position of every token (the AR task gives a
noisy token the position of the token it stands for)."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import modulate, zero_init_modulation

ROPE_BASE = 10000.0


class RMSNorm(nn.Module):
    """x / rms(x), times a learned per-feature weight when `affine` (Llama's norm)."""

    def __init__(self, width: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@functools.lru_cache(maxsize=256)
def _rotary_cached(positions: tuple[int, ...], head_dim: int, base: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor(positions, dtype=torch.float32, device=device)
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = pos[:, None] * freqs[None]                      # [S, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)             # [S, head_dim], the rotate-half layout
    return angles.cos(), angles.sin()


def rotary_tables(positions, head_dim: int, base: float = ROPE_BASE,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [S, head_dim] on `device`, for integer token positions (a range, list
    or 1-D tensor). Cached by value: a task asks for the same few layouts every step."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head dimension, got {head_dim}")
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    return _rotary_cached(tuple(int(p) for p in positions), head_dim, float(base), torch.device(device))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates feature pairs (i, i + head_dim/2) of x [N, H, S, head_dim] by position."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions on q and k; no biases (Llama)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of even size")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


def swiglu_hidden(width: int) -> int:
    """Llama's hidden size: 2/3 of 4·width, rounded up to a multiple of 8."""
    return -(-(8 * width // 3) // 8) * 8


class SwiGLU(nn.Module):
    """w2(SiLU(w1·x) ⊙ w3·x), no biases."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or swiglu_hidden(width)
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaLayer(nn.Module):
    """A Llama decoder layer (RMSNorm, rotary attention, SwiGLU) with adaLN-Zero:
    forward(x [N, S, d], cond [N, d], rope (cos, sin) [S, head_dim], mask [S, S] bool or
    None for causal)."""

    def __init__(self, width: int, heads: int, hidden: int | None = None):
        super().__init__()
        self.norm1 = RMSNorm(width, affine=False)  # adaLN's (1 + scale) is the norm's weight
        self.attn = Attention(width, heads)
        self.norm2 = RMSNorm(width, affine=False)
        self.mlp = SwiGLU(width, hidden)
        self.modulation = zero_init_modulation(width, 6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
