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
  per distinct seed;
- normals are written chunk by chunk into the result, so the temporaries of the Box–Muller
  transform are a chunk's, not the whole draw's.

On a CPU, a large draw (:data:`DRAW_MIN_NUMEL` normals in one call, under the shared
``MEMZOO_TORCH_COMPILE`` policy of :mod:`~memzoo.triton_kernels.torch_backend.compiled`) runs in
compiled slices of :data:`SLICE` counters, in the three stages of the compiled zeroth-order pass
(which uses the same Philox rounds, :func:`philox_rounds`, and the same eager stage,
:func:`box_muller_`): compiled Philox and Box–Muller inputs, eager ``log``/``sqrt``/``cos`` (as
the reference rounds them), r·cos θ written into the result. The normals are the reference's, bit
for bit; where compiling fails the draw warns once and runs eagerly.

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
    _box_muller_inputs,
    check_seed_offsets,
    normal_pairs_from_words,
    normals_from_words,
)
from memzoo.triton_kernels.torch_backend import elementwise
from memzoo.triton_kernels.torch_backend.compiled import MIN_NUMEL, CompiledPass

__all__ = ["DRAW_MIN_NUMEL", "SLICE", "box_muller_", "check_seed_offsets", "normal_pairs_from_words",
           "normals_from_words", "philox_randn", "philox_rounds", "philox_words", "philox_words4"]

# Counters per compiled call (a static shape: one compilation serves every draw); its buffers
# (16 bytes per counter) stay in L2.
SLICE = 1 << 16
# ``auto`` compiles draws of at least this many normals. Per normal the eager twin takes ~105 ns
# and the compiled stages ~9 ns (measured on 60m's APOLLO refresh, 1 thread): ~60× the ~1.7 ns per
# element that compiling Lion's update saves, so a draw of MIN_NUMEL/16 normals saves ~25 ms, more
# than a compiled update of MIN_NUMEL elements (~7 ms). Draws that large are the batched refreshes
# of models from ~60M parameters; small ones (tests, small models) do not wait for a compilation.
DRAW_MIN_NUMEL = MIN_NUMEL // 16


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


def philox_rounds(counters: torch.Tensor, k0: torch.Tensor,
                  k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 of int64 counters (< 2^64) under the key (k0, k1) (0-d int64 tensors: a
    new seed does not recompile), written as whole-tensor operations for ``torch.compile``: the
    four words as uint32 values in int64 tensors. The compiled stages of this module and of the
    zeroth-order pass trace it; the eager chunked twin is :func:`_words4_chunk`."""
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        product_b, product_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c1, c2, c3 = (((product_b >> 32) & _MASK32) ^ c1 ^ k0, product_b & _MASK32,
                          ((product_a >> 32) & _MASK32) ^ c3 ^ k1, product_a & _MASK32)
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def box_muller_(radius: torch.Tensor, angle: torch.Tensor, sin: torch.Tensor | None = None) -> None:
    """The eager middle stage of a compiled draw: ``radius`` (holding u1) ← √(−2·ln u1) and
    ``angle`` (θ) ← cos θ in place, ``sin`` ← sin θ if given. These are the reference's own
    PyTorch calls: on a CPU eager ``log``/``sqrt``/``sin``/``cos`` (MKL or Sleef) differ from
    Inductor's by an ulp on some inputs, so they stay eager and the normals are the reference's."""
    radius.log_().mul_(-2.0).sqrt_()
    if sin is not None:
        torch.sin(angle, out=sin)
    angle.cos_()


def _draw_inputs(u1: torch.Tensor, angle: torch.Tensor, counters: torch.Tensor, key: torch.Tensor) -> None:
    """Compiled stage: the Box–Muller inputs u1 (clamped) and θ = 2π·u2 of Philox words 0 and 1
    of each counter (:func:`philox_randn`'s stream: one normal per counter)."""
    c0, c1, _, _ = philox_rounds(counters, key[0], key[1])
    first, second = _box_muller_inputs(c0.to(torch.int32), c1.to(torch.int32))  # low 32 bits: the signed pattern
    u1.copy_(first)
    angle.copy_(second)


_DRAW = CompiledPass(_draw_inputs, "Philox draw", min_numel=DRAW_MIN_NUMEL, dynamic=False)


def _normals_into(out: torch.Tensor, seed: int, offsets: torch.Tensor, compiled: bool) -> None:
    """Write the normals of ``seed`` at the int64 ``offsets`` (1-D) into ``out`` (float32, 1-D):
    compiled slices of :data:`SLICE` counters (the last one padded), or eager chunks."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    count = offsets.numel()
    if compiled:
        key = torch.tensor([k0, k1], dtype=torch.int64)
        u1, angle = torch.empty(SLICE), torch.empty(SLICE)
        padded = torch.zeros(SLICE, dtype=torch.int64) if count % SLICE else None
        for start in range(0, count, SLICE):
            stop = min(count, start + SLICE)
            counters = offsets[start:stop]
            if stop - start < SLICE:  # the last slice: counters padded with zeros, their normals dropped
                padded[:stop - start].copy_(counters)
                counters = padded
            _DRAW(u1, angle, counters, key)
            box_muller_(u1, angle)
            torch.mul(u1[:stop - start], angle[:stop - start], out=out[start:stop])
        return
    size = max(1, min(elementwise.chunk_size(offsets.device), count))
    buffers = [torch.empty(size, dtype=torch.int64, device=offsets.device) for _ in range(6)]
    for start in range(0, count, size):
        stop = min(count, start + size)
        words = [b[:stop - start] for b in buffers[:4]]
        _words4_chunk(k0, k1, offsets[start:stop], words, [b[:stop - start] for b in buffers[4:]])
        # int64 → int32 keeps the low 32 bits: the signed pattern normals_from_words reads.
        out[start:stop].copy_(normals_from_words(words[0].to(torch.int32), words[1].to(torch.int32)))


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
    """Same contract as :func:`memzoo.reference.random.philox_randn`. One seed, or one seed per
    leading index (seeds (B, 1) against offsets (N,): a batch's streams), is drawn chunk by chunk
    into the result, compiled on a CPU when the draw is large (module docstring)."""
    check_seed_offsets(seed, offsets)
    if "meta" in (offsets.device.type, seed.device.type if isinstance(seed, torch.Tensor) else "cpu"):
        return reference.philox_randn(seed, offsets)  # shapes only
    if not isinstance(seed, torch.Tensor):
        out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
        _normals_into(out.view(-1), seed, offsets.reshape(-1).to(torch.int64).contiguous(), _DRAW.wanted([out]))
        return out
    seed = seed.to(device=offsets.device, dtype=torch.int64)
    shape = torch.broadcast_shapes(seed.shape, offsets.shape)
    if not (len(shape) and seed.dim() == len(shape) and all(size == 1 for size in seed.shape[1:])):
        return normals_from_words(*philox_words(seed, offsets))  # seeds vary within a row
    out = torch.empty(shape, dtype=torch.float32, device=offsets.device)
    rows = offsets.to(torch.int64).expand(shape)  # a row of offsets shared by every seed is not copied
    seeds = seed.expand(shape[:1] + seed.shape[1:]).reshape(-1).tolist()  # one host read
    compiled = _DRAW.wanted([out])
    for index, value in enumerate(seeds):
        _normals_into(out[index].view(-1), value, rows[index].reshape(-1).contiguous(), compiled)
    return out
