"""Triton's counter-based normal stream (``tl.randn(seed, offset)``) reproduced in PyTorch.

Random projections and zeroth-order perturbations are regenerated from (seed, element offset)
instead of being stored. Kernels draw them with ``tl.randn``; the reference draws the same
numbers here: Philox-4x32 with 10 rounds keyed by the 64-bit seed, counter = (offset low word,
offset high word, 0, 0), the first two outputs mapped to (0, 1) and through Box-Muller, as in
``triton/language/random.py`` (identical in Triton 3.6 and 3.9). Integer work is exact; the final
log/cos may differ from the GPU's by an ulp or two.
"""

from __future__ import annotations

import torch

__all__ = ["check_seed_offsets", "normal_pairs_from_words", "normals_from_words", "philox_randn", "philox_words",
           "philox_words4"]

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10


def _mul_hi_lo(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of constant·value for uint32 operands held in int64 tensors
    (value split in 16-bit halves so no intermediate exceeds 2^48)."""
    high_half, low_half = value >> 16, value & 0xFFFF
    by_high, by_low = constant * high_half, constant * low_half
    high = (by_high + (by_low >> 16)) >> 16
    low = (((by_high & 0xFFFF) << 16) + by_low) & _MASK32
    return high, low


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """Philox words (signed int32 bit patterns) → [0, 1) as Triton's uint_to_uniform_float:
    negatives folded onto the non-negatives, then scaled."""
    signed = words.to(torch.int64)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _box_muller_inputs(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller's u1 (clamped to ≥ 1e-7) and θ = 2π·u2 from two Philox words, as Triton's
    ``pair_uniform_to_normal``."""
    u1 = torch.clamp(_uniform(first), min=1.0e-7)
    return u1, torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform(second)


def _radius_angle(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller's r = √(−2·ln u1) and θ = 2π·u2, as Triton's ``pair_uniform_to_normal``, from
    two Philox words."""
    u1, angle = _box_muller_inputs(first, second)
    return torch.sqrt(-2.0 * torch.log(u1)), angle


def normal_pairs_from_words(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both normals of a Box–Muller pair, (r·cos θ, r·sin θ), float32 (``tl.randn4x``'s pairs)."""
    radius, angle = _radius_angle(first, second)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def normals_from_words(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The first normal of a pair, r·cos θ, as ``tl.randn``. Shared by the reference and the
    Triton path (which computes the words in one kernel), so both give the same float32 bits on
    the same device."""
    radius, angle = _radius_angle(first, second)
    return radius * torch.cos(angle)


def check_seed_offsets(seed: int | torch.Tensor, offsets: torch.Tensor) -> None:
    """Raise unless ``seed`` is an int (or integer tensor) in [0, 2**63) and ``offsets`` an
    integer tensor: the arguments :func:`philox_randn` and its Triton twin accept."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an integer tensor, got {seed.dtype}")
        if seed.numel() and seed.device.type != "meta" and not bool(((seed >= 0) & (seed < 2**63 - 1)).all()):
            raise ValueError("seeds must lie in [0, 2**63)")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")


def philox_words4(seed: int | torch.Tensor,
                  offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words of Philox-4x32-10 (``tl.randint4x``) for each (seed, offset), as
    signed int32 bit patterns, shaped like ``offsets`` broadcast with ``seed``."""
    check_seed_offsets(seed, offsets)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64)
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        offsets, seed = torch.broadcast_tensors(offsets, seed)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        high_b, low_b = _mul_hi_lo(_ROUND_B, c2)
        high_a, low_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    as_int32 = lambda word: torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # noqa: E731
    return as_int32(c0), as_int32(c1), as_int32(c2), as_int32(c3)


def philox_words(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of Philox-4x32-10 for each (seed, offset), as signed int32
    bit patterns, shaped like ``offsets`` broadcast with ``seed`` (see :func:`philox_randn`)."""
    return philox_words4(seed, offsets)[:2]


def philox_randn(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normals, float32, shaped like ``offsets`` (integer tensor of element offsets)
    broadcast with ``seed``: an int, or an integer tensor of seeds (e.g. shape (B, 1) against
    offsets of shape (N,) draws B streams at once)."""
    return normals_from_words(*philox_words(seed, offsets))
