"""Triton's Philox stream (``tl.randn``'s) in bulk; twin of :mod:`memzoo.reference.random`.

The reference draws the Philox words with dozens of element-wise torch integer operations
(each a full pass over memory); here one kernel writes each pair of words once. The Box–Muller
transform is the reference's own (:func:`~memzoo.reference.random.normals_from_words`), so the
normals are bit-for-bit the reference's on the same device and the backends of an optimizer
that draws projections or sketches stay on one trajectory. Used for the projector's random
sketches and seeded Gaussian factors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.random import check_seed_offsets, normals_from_words
from memzoo.reference.random import philox_words as _reference_philox_words
from memzoo.triton_kernels.multi_tensor import ceil_div

__all__ = ["AUTO", "INTERPRETED", "philox_randn", "philox_words"]

# backend="auto" keeps the reference until this kernel has been checked on a GPU.
AUTO = False
_BLOCK = 1024


@triton.jit
def _philox_words_kernel(first, second, seeds, offsets, n, BLOCK: tl.constexpr):
    """Words of (seeds[s], offsets[i]) at [s, i]; grid (blocks of n, number of seeds)."""
    stream = tl.program_id(1)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    seed = tl.load(seeds + stream)
    word0, word1, _, _ = tl.randint4x(seed, tl.load(offsets + index, mask=mask, other=0))
    where = stream.to(tl.int64) * n + index
    tl.store(first + where, word0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(second + where, word1.to(tl.int32, bitcast=True), mask=mask)


INTERPRETED: bool = isinstance(_philox_words_kernel, InterpretedFunction)


def philox_words(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`memzoo.reference.random.philox_words`. One kernel for an int seed
    or a column of (B, 1) seeds against 1-D offsets; other broadcasts go to the reference."""
    check_seed_offsets(seed, offsets)
    if isinstance(seed, int):
        seeds, shape = torch.tensor([seed], dtype=torch.int64), offsets.shape
    elif seed.dim() == 2 and seed.shape[1] == 1 and offsets.dim() == 1:
        seeds, shape = seed.reshape(-1), (seed.shape[0], offsets.shape[0])
    else:
        return _reference_philox_words(seed, offsets)
    seeds = seeds.to(device=offsets.device, dtype=torch.int64).contiguous()
    flat = offsets.reshape(-1).to(torch.int64).contiguous()
    first = torch.empty(shape, dtype=torch.int32, device=offsets.device)
    second = torch.empty_like(first)
    if first.numel():
        grid = (ceil_div(flat.numel(), _BLOCK), seeds.numel())
        _philox_words_kernel[grid](first, second, seeds, flat, flat.numel(), BLOCK=_BLOCK)
    return first, second


def philox_randn(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Same contract (and the same bits) as :func:`memzoo.reference.random.philox_randn`."""
    return normals_from_words(*philox_words(seed, offsets))
