"""The Philox stream on the ``"torch"`` backend; twin of :mod:`memzoo.reference.random`.

Same words and the same float32 normals as the reference (the integer work is exact, the
Box–Muller transform is the reference's own function), computed with about half the integer
operations and in chunks that stay in cache:

- the 32×32 → 64-bit products of a Philox round are one int64 multiplication each: the product
  of two values below 2^32 is below 2^64, and the int64 multiplication keeps its low 64 bits
  (two's-complement wrap-around), so ``(p >> 32) & 0xFFFFFFFF`` and ``p & 0xFFFFFFFF`` are the
  exact high and low words (the reference splits operands in 16-bit halves instead, 11
  operations per product against 4); tests/test_torch_backend.py checks the words against the
  reference's on random and extreme counters;
- counters are processed :data:`~memzoo.triton_kernels.torch_backend.elementwise.CHUNK` at a time
  with operations written into preallocated buffers;
- a tensor of seeds (a batched refresh's sketches, one stream per matrix) runs the same pass once
  per distinct seed.

Used by the projectors (APOLLO's regenerated projection, GaLore/FRUGAL random factors, sketches)
through ``backend="torch"``.
"""

from __future__ import annotations

import torch

from memzoo.reference import random as reference
from memzoo.reference.random import (  # the Philox-4x32-10 constants: one definition, the reference's
    _KEY_A,
    _KEY_B,
    _MASK32,
    _ROUND_A,
    _ROUND_B,
    _ROUNDS,
    check_seed_offsets,
    normal_pairs_from_words,
    normals_from_words,
)
from memzoo.triton_kernels.torch_backend import elementwise

__all__ = ["check_seed_offsets", "normal_pairs_from_words", "normals_from_words", "philox_randn", "philox_words",
           "philox_words4"]


def _words4_chunk(k0: int, k1: int, counters: torch.Tensor, out: list[torch.Tensor],
                  scratch: list[torch.Tensor]) -> None:
    """Philox-4x32-10 of one chunk of int64 counters (< 2^64, as the reference reads them) for
    the scalar key (k0, k1), the four words (uint32 values in int64) written into ``out``."""
    c0, c1, c2, c3 = out
    torch.bitwise_and(counters, _MASK32, out=c0)
    torch.bitwise_right_shift(counters, 32, out=c1).bitwise_and_(_MASK32)
    c2.zero_()
    c3.zero_()
    product_a, product_b = scratch
    for _ in range(_ROUNDS):
        torch.mul(c2, _ROUND_B, out=product_b)
        torch.mul(c0, _ROUND_A, out=product_a)
        # c0' = hi(B·c2) ^ c1 ^ k0, c1' = lo(B·c2), c2' = hi(A·c0) ^ c3 ^ k1, c3' = lo(A·c0)
        torch.bitwise_right_shift(product_b, 32, out=c2).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_and(product_b, _MASK32, out=c1)
        torch.bitwise_right_shift(product_a, 32, out=c0).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        torch.bitwise_and(product_a, _MASK32, out=c3)
        c0, c2 = c2, c0  # the new c0 was written into c2's buffer and the new c2 into c0's
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    out[:] = [c0, c1, c2, c3]


def philox_words4(seed: int | torch.Tensor,
                  offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`memzoo.reference.random.philox_words4`."""
    check_seed_offsets(seed, offsets)
    if isinstance(seed, torch.Tensor):  # a tensor of seeds (several streams at once, e.g. a batch's sketches)
        if "meta" in (seed.device.type, offsets.device.type):  # shapes only: no values to group seeds by
            return reference.philox_words4(seed, offsets)
        return _words4_per_seed(seed, offsets)
    flat = offsets.reshape(-1).to(torch.int64)
    words = [torch.empty(flat.numel(), dtype=torch.int32, device=flat.device) for _ in range(4)]
    size = max(1, min(elementwise.chunk_size(flat.device), flat.numel()))
    buffers = [torch.empty(size, dtype=torch.int64, device=flat.device) for _ in range(6)]
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for start in range(0, flat.numel(), size):
        stop = min(flat.numel(), start + size)
        out = [b[:stop - start] for b in buffers[:4]]
        _words4_chunk(k0, k1, flat[start:stop], out, [b[:stop - start] for b in buffers[4:]])
        for word, value in zip(words, out):
            word[start:stop].copy_(value)  # the low 32 bits: int64 → int32 keeps the bit pattern
    return tuple(word.view(offsets.shape) for word in words)


def _words4_per_seed(seed: torch.Tensor,
                     offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`philox_words4` for a tensor of seeds broadcast against ``offsets``: one chunked pass
    per distinct seed (a batched refresh draws one stream per matrix; one host read of the seeds)."""
    seed = seed.to(device=offsets.device, dtype=torch.int64)
    seeds, offsets = torch.broadcast_tensors(seed, offsets.to(torch.int64))
    if seeds.dim() and seed.dim() == seeds.dim() and all(size == 1 for size in seed.shape[1:]):
        # One seed per leading index (a batch's sketches: seeds (B, 1), offsets (L,)): one pass
        # per row, without sorting and searching a seed tensor of the batch's size.
        rows = offsets.reshape(seeds.shape[0], -1)
        words = [torch.empty(rows.shape, dtype=torch.int32, device=rows.device) for _ in range(4)]
        for index, value in enumerate(seed.reshape(-1).tolist()):
            for word, part in zip(words, philox_words4(value, rows[index])):
                word[index].copy_(part)
        return tuple(word.view(offsets.shape) for word in words)
    seeds, flat = seeds.reshape(-1), offsets.reshape(-1)
    words = [torch.empty(flat.numel(), dtype=torch.int32, device=flat.device) for _ in range(4)]
    for value in seeds.unique().tolist():
        chosen = (seeds == value).nonzero().squeeze(1)
        for word, part in zip(words, philox_words4(value, flat.index_select(0, chosen))):
            word.index_copy_(0, chosen, part)
    return tuple(word.view(offsets.shape) for word in words)


def philox_words(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`memzoo.reference.random.philox_words`."""
    return philox_words4(seed, offsets)[:2]


def philox_randn(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`memzoo.reference.random.philox_randn`."""
    return normals_from_words(*philox_words(seed, offsets))
