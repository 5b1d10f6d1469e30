"""The model building blocks every task shares, one copy each (as DiT's models.py).

Conditioning: every layer is conditioned DiT-style (adaLN-Zero) on a vector cond [N, d],
a noise-level embedding (`LevelEmbedder`) or a learned constant where there is no level;
`modulate` applies the shift and scale, `zero_init_modulation` makes them and starts every
layer as the identity.

Layers, `x + gate·Attn(modulate(norm(x)))` then `x + gate·MLP(modulate(norm(x)))`:
`TransformerLayer` (LayerNorm, GELU MLP: ViT, DiT, MD4) and `LlamaLayer` (RMSNorm, SwiGLU,
rotary positions, causal or masked: the character LMs). Both use the one `Attention`, which
has biases or not, rotary positions or not (tables from `rotary_tables`), and an explicit
boolean mask, causal masking, or neither.

Around the layers: `AdaptiveNorm` (the adaLN in front of an output head) and
`patchify`/`unpatchify` (images to tokens and back)."""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

ROPE_BASE = 10000.0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaptive shift/scale of token features x [N, T, d] by per-example [N, d] vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] scalars -> [N, dim] cos/sin features at geometrically spaced frequencies (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LevelEmbedder(nn.Module):
    """Noise level [N] -> to_frequency_input -> 256-d sinusoidal features -> MLP ->
    conditioning vector [N, d] (DiT's timestep embedder). The input map puts the level on
    the scale the frequencies expect: σ -> c_noise(σ), or MD4's t -> 1000·t."""

    def __init__(self, width: int, to_frequency_input, frequency_dim: int = 256):
        super().__init__()
        self.to_frequency_input = to_frequency_input
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(self.to_frequency_input(level), self.frequency_dim))


def zero_init_modulation(width: int, num_vectors: int) -> nn.Sequential:
    """cond -> num_vectors modulation vectors; zero weights so a fresh layer is the identity."""
    linear = nn.Linear(width, num_vectors * width)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


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
    """Multi-head self-attention, x [N, S, d] -> [N, S, d]. `bias`: biases on the two
    projections (DiT) or none (Llama). `rotary`: q and k rotated by token position, which
    lets characters relate by relative position (bigrams, words) without learning it."""

    def __init__(self, width: int, heads: int, bias: bool = True, rotary: bool = False):
        super().__init__()
        if rotary and (width % heads or (width // heads) % 2):
            raise ValueError(f"width {width} must split into {heads} heads of even size")
        self.heads, self.head_dim, self.rotary = heads, width // heads, rotary
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """rope (with rotary positions only): (cos, sin) [S, head_dim], the positions a task
        gives its tokens (default: 0..S−1); mask: [S, S] bool, True = may attend; is_causal:
        causal attention instead of a mask."""
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rope if rope is not None else rotary_tables(range(s), self.head_dim, device=x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


class TransformerLayer(nn.Module):
    """x + gate·Attn(modulate(LN(x))), then x + gate·MLP(modulate(LN(x))); shift, scale and
    gate come from the conditioning vector cond [N, d]. Bidirectional; `rotary`: rotary
    positions in the attention (positions 0..T−1). The MLP has mlp_hidden units (0 = mlp_ratio × width)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, rotary: bool = False,
                 mlp_hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        hidden = mlp_hidden or mlp_ratio * width
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, rotary=rotary)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = zero_init_modulation(width, 6)
        # On each branch's output, where a ViT puts its hidden dropout; identity at 0.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.dropout(self.attn(modulate(self.norm1(x), shift1, scale1)))
        return x + gate2.unsqueeze(1) * self.dropout(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class RMSNorm(nn.Module):
    """x / rms(x), times a learned per-feature weight when `affine` (Llama's norm)."""

    def __init__(self, width: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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
    """A Llama decoder layer (RMSNorm, rotary attention without biases, SwiGLU) with
    adaLN-Zero: forward(x [N, S, d], cond [N, d], rope (cos, sin) [S, head_dim], mask [S, S]
    bool or None for causal). The rotary tables are passed in, since a task decides the
    position of every token (the AR task gives a noisy token the position of the token it
    stands for)."""

    def __init__(self, width: int, heads: int, hidden: int | None = None):
        super().__init__()
        self.norm1 = RMSNorm(width, affine=False)  # adaLN's (1 + scale) is the norm's weight
        self.attn = Attention(width, heads, bias=False, rotary=True)
        self.norm2 = RMSNorm(width, affine=False)
        self.mlp = SwiGLU(width, hidden)
        self.modulation = zero_init_modulation(width, 6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask, is_causal=mask is None)
        x = x + gate1.unsqueeze(1) * h
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class AdaptiveNorm(nn.Module):
    """LN then level-dependent shift/scale (zero-init): the adaLN in front of the output head."""

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


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)·(W/p), C·p·p] non-overlapping patches, row-major."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, size: int) -> torch.Tensor:
    """The inverse of patchify: [N, (H/p)·(W/p), C·p·p] -> [N, C, H, W]."""
    n, side = len(tokens), size // patch
    x = tokens.reshape(n, side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, size, size)
