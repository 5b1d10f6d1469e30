"""Philox4x32-10 and the normal transform in pure PyTorch: the reference copy of
csrc/philox.h, drawing bit-identical uniforms (and normals up to float rounding of
log/sin/cos) on any device, with no compiled code.

PyTorch has no uint32 multiply-high, so words live in int64 tensors and the 32x32->64
product is split into 16-bit halves to stay inside int64.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the constant a times the int64 tensor b (< 2^32)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo  # < 2^48
    s = a * b_hi  # < 2^48
    hi = (s + (t >> 16)) >> 16
    lo = (((s & 0xFFFF) << 16) + t) & _MASK32
    return hi, lo


def _split64(value: int) -> tuple[int, int]:
    value &= (1 << 64) - 1
    return value & _MASK32, value >> 32


def philox4x32_10(group: torch.Tensor, offset: int, seed: int) -> list[torch.Tensor]:
    """Four 32-bit words (as int64 tensors shaped like `group`) for counter
    (group, offset) under key `seed`; `group` is an int64 tensor of counter indices."""
    return list(_philox_words(group, as_int64("offset", offset), as_int64("seed", seed)).unbind(0))


def as_int64(name: str, value: int) -> int:
    """A uint64 seed or offset (any Python int, taken mod 2^64) as the int64 that op
    schemas carry; the kernels read the bits back as uint64."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# An opaque op, so that torch.compile sees one node: inlined, the ten rounds (each word
# used twice per round) grow into an expression that inductor cannot generate in time.
@torch.library.custom_op("diffusionblocks_reference::philox_words", mutates_args=())
def _philox_words(group: torch.Tensor, offset: int, seed: int) -> torch.Tensor:
    c0, c1 = group & _MASK32, (group >> 32) & _MASK32
    off_lo, off_hi = _split64(offset)
    c2, c3 = torch.full_like(group, off_lo), torch.full_like(group, off_hi)
    k0, k1 = _split64(seed)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3])


@_philox_words.register_fake
def _(group, offset, seed):
    return group.new_empty((4,) + tuple(group.shape))


def uniform24(bits: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in (0, 1) from the top 24 bits (exact)."""
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24


def uniform53(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in (0, 1) with 53 random bits."""
    return ((a >> 5).to(torch.float64) * 67108864.0 + (b >> 6).to(torch.float64) + 0.5) * 2.0**-53


def normal(numel: int, seed: int, offset: int, device) -> torch.Tensor:
    """`numel` standard normals in float32: element 4g+k is normal k of Philox group g."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    x = philox4x32_10(groups, offset, seed)
    two_pi = torch.tensor(2 * math.pi, dtype=torch.float32)
    radius0 = torch.sqrt(-2.0 * torch.log(uniform24(x[0])))
    theta0 = two_pi * uniform24(x[1])
    radius1 = torch.sqrt(-2.0 * torch.log(uniform24(x[2])))
    theta1 = two_pi * uniform24(x[3])
    out = torch.stack(
        [radius0 * torch.cos(theta0), radius0 * torch.sin(theta0),
         radius1 * torch.cos(theta1), radius1 * torch.sin(theta1)], dim=1)
    return out.reshape(-1)[:numel]


def resolve_seed(seed, generator=None) -> int:
    """The caller's seed, or one drawn from `generator` (torch's default generator when
    None), so torch.manual_seed reproduces a run. Returned as a uint64 value."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device
                                 if generator is not None else "cpu"))
    if not isinstance(seed, int):
        raise ValueError(f"seed: expected an int or None, got {type(seed).__name__}")
    return seed & ((1 << 64) - 1)
