"""Zeroth-order passes: the seeded in-place perturbation and the fused restore + update of
MeZO (Malladi et al. 2023), Sparse-MeZO (Liu et al. 2024) and QZO (Shang et al. 2025).

**The perturbation stream.** Every trainable element has a global index ``e`` (its tensor's
stream offset, a multiple of :data:`CHUNK`, plus its position in the tensor's memory order).
Its perturbation for the step seed ``s`` is one output of Triton's ``tl.randn4x(s, counter)``
(Philox-4x32-10, Box–Muller on both word pairs):

    chunk = e // 1024,  i = e % 1024,  lane = i // 256,  counter = 256·chunk + i % 256
    z_e = randn4x(s, counter)[lane]

so one Philox call serves four elements, and each program of the kernel makes one call per
256 elements (the four quarters of a chunk each take one of the four normals).

**The Sparse-MeZO mask** of a step is one bit per element, packed: element ``i`` of a chunk in
lane ``j`` with ``k = i % 256`` is bit ``k // 32`` of byte ``128·chunk + 32·j + k % 32`` (the
kernel's (8, 32) tile of a quarter, reduced over the bit axis).

**One pass** over a tensor x, all in float32 (float64 for float64 tensors) with ``a = ε·m·z``
(m = 1 without a mask) and each stage rounded once to the tensor's dtype:

1. recover: x ← round(x − from_sign·a)  — back to the unperturbed point. Recovering from the
   stored perturbed value (instead of adding and subtracting ε·z in the storage dtype, as the
   official MeZO does) restores the original bits wherever the perturbed value kept them;
   only elements whose rounding at the perturbed point lost bits (a binade crossed upwards,
   or |ε·z| ≫ |x|) can come back one rounding off, with no bias.
2. update (when ``coefficients`` is given): x ← round(x·decay − Σ_k c_k·z_k), clamped below at
   ``clamp_min`` (QZO keeps its scales positive), only where m = 1; c_0 goes with this pass's
   seed, c_k (k ≥ 1) with ``earlier_seeds[k − 1]``.
3. perturb: x ← round(x + to_sign·a).

A step of q samples is then 3q passes: (0 → +1), (+1 → −1), (−1 → 0) for every sample, the
last one fusing the update of all q samples (MeZO's fourth pass folded into the restore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memzoo.reference.common import as_tensor_list, compute_dtype, is_dense
from memzoo.reference.random import check_seed_offsets, normal_pairs_from_words, philox_words4

# Draws the four Philox words of (seed, counters): philox_words4's contract.
Words4 = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

__all__ = ["CHUNK", "MASK_BYTES_PER_CHUNK", "check_zo_arguments", "mask_bit_positions", "pack_mask", "unpack_mask",
           "zo_apply_", "zo_normals"]

CHUNK = 1024  # elements per stream chunk; stream offsets are multiples of it
LANES = 4  # normals per Philox call
QUARTER = CHUNK // LANES
MASK_BYTES_PER_CHUNK = CHUNK // 8
_SLICE = 256 * CHUNK  # elements the reference processes at a time (bounds its temporaries)
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def zo_normals(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """z for arbitrary global element indices (the stream's definition; float32)."""
    check_seed_offsets(seed, indices)
    indices = indices.to(torch.int64)
    within = indices % CHUNK
    n0, n1, n2, n3 = _four_normals(seed, (indices // CHUNK) * QUARTER + within % QUARTER)
    lane = within // QUARTER
    return torch.where(lane == 0, n0, torch.where(lane == 1, n1, torch.where(lane == 2, n2, n3)))


def _four_normals(seed: int, counters: torch.Tensor,
                  words4: Words4 = philox_words4) -> tuple[torch.Tensor, ...]:
    """``tl.randn4x(seed, counters)``: one Philox call, two Box–Muller pairs."""
    w0, w1, w2, w3 = words4(seed, counters)
    return (*normal_pairs_from_words(w0, w1), *normal_pairs_from_words(w2, w3))


def _chunk_normals(seed: int, chunk_ranges: list[tuple[int, int]], device: torch.device,
                   words4: Words4 = philox_words4) -> list[torch.Tensor]:
    """z for the elements of each range of whole chunks (first chunk, number of chunks), in element
    order: one Philox call per counter, its four normals spread over the chunk's four quarters.
    All ranges share one call (a pass over many small tensors is a few dozen ops, not per tensor)."""
    counters = torch.cat([torch.arange(first * QUARTER, (first + count) * QUARTER, device=device)
                          for first, count in chunk_ranges])
    chunks = torch.stack([n.view(-1, QUARTER) for n in _four_normals(seed, counters, words4)], dim=1)  # (chunk, lane, k)
    return [piece.reshape(-1) for piece in chunks.split([count for _, count in chunk_ranges])]


def mask_bit_positions(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte, bit) of each element index (relative to its tensor's mask offset, in bytes)."""
    within = indices % CHUNK
    lane, k = within // QUARTER, within % QUARTER
    return (indices // CHUNK) * MASK_BYTES_PER_CHUNK + lane * 32 + k % 32, k // 32


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask of whole chunks (numel a multiple of CHUNK) → its packed bytes (uint8)."""
    bits = mask.view(-1, LANES, 8, 32).to(torch.int32) << torch.arange(8, device=mask.device).view(1, 1, 8, 1)
    return bits.sum(dim=2).to(torch.uint8).reshape(-1)


def unpack_mask(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes of whole chunks → bool mask, the inverse of :func:`pack_mask`."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32).view(1, 1, 8, 1)
    bits = (packed.view(-1, LANES, 1, 32).to(torch.int32) >> shifts) & 1
    return bits.bool().reshape(-1)


def _check_offsets(name: str, offsets: Sequence[int], count: int, multiple: int) -> list[int]:
    offsets = list(offsets)
    if len(offsets) != count:
        raise ValueError(f"{name} has {len(offsets)} entries for {count} tensors")
    for index, offset in enumerate(offsets):
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % multiple:
            raise ValueError(f"{name}[{index}] = {offset!r}: expected a non-negative multiple of {multiple}")
    return offsets


def check_zo_arguments(params: list[torch.Tensor], stream_offsets: Sequence[int], *, seed: int, from_sign: int,
                       to_sign: int, coefficients: torch.Tensor | None, earlier_seeds: Sequence[int],
                       thresholds: Sequence[float] | None, mask_bits: torch.Tensor | None,
                       mask_offsets: Sequence[int] | None, write_mask: bool,
                       dtypes: tuple[torch.dtype, ...] = SUPPORTED) -> None:
    """Raise ValueError/TypeError for arguments :func:`zo_apply_` (and its Triton twin) cannot
    take; nothing is modified before these checks pass."""
    check_seed_offsets(seed, torch.zeros(0, dtype=torch.int64))
    for seed_k in earlier_seeds:
        check_seed_offsets(seed_k, torch.zeros(0, dtype=torch.int64))
    if from_sign not in (-1, 0, 1) or to_sign not in (-1, 0, 1):
        raise ValueError(f"from_sign and to_sign must be -1, 0 or 1, got {from_sign!r}, {to_sign!r}")
    for index, param in enumerate(params):
        if param.dtype not in dtypes:
            raise TypeError(f"params[{index}] is {param.dtype}; supported: {dtypes}")
    _check_offsets("stream_offsets", stream_offsets, len(params), CHUNK)
    if coefficients is not None:
        if not isinstance(coefficients, torch.Tensor) or coefficients.dtype != torch.float32:
            raise TypeError("coefficients must be a float32 tensor")
        if coefficients.shape != (1 + len(earlier_seeds),):
            raise ValueError(f"coefficients has shape {tuple(coefficients.shape)}, expected "
                             f"({1 + len(earlier_seeds)},): one per seed, this pass's first")
    elif earlier_seeds:
        raise ValueError("earlier_seeds given without coefficients")
    if thresholds is None:
        if mask_bits is not None or write_mask:
            raise ValueError("a mask needs thresholds")
        return
    if len(thresholds) != len(params):
        raise ValueError(f"thresholds has {len(thresholds)} entries for {len(params)} tensors")
    if mask_bits is None or mask_offsets is None:
        raise ValueError("thresholds need mask_bits (uint8) and mask_offsets")
    if mask_bits.dtype != torch.uint8 or mask_bits.dim() != 1:
        raise TypeError(f"mask_bits must be a 1-D uint8 tensor, got {mask_bits.dtype} of shape {tuple(mask_bits.shape)}")
    offsets = _check_offsets("mask_offsets", mask_offsets, len(params), MASK_BYTES_PER_CHUNK)
    for index, (param, offset) in enumerate(zip(params, offsets)):
        needed = offset + -(-param.numel() // CHUNK) * MASK_BYTES_PER_CHUNK
        if param.numel() and needed > mask_bits.numel():
            raise ValueError(f"mask_bits has {mask_bits.numel()} bytes; tensor {index} needs bytes up to {needed}")
        if param.numel() and param.device != mask_bits.device:
            raise ValueError(f"params[{index}] is on {param.device}, mask_bits on {mask_bits.device}")
    if write_mask and from_sign != 0:
        raise ValueError("the mask is computed from unperturbed values: write_mask needs from_sign = 0")


def _memory_order_view(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor as a 1-D view in memory order."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


@torch.no_grad()
def zo_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    stream_offsets: Sequence[int],
    *,
    seed: int,
    eps: float,
    from_sign: int,
    to_sign: int,
    coefficients: torch.Tensor | None = None,
    earlier_seeds: Sequence[int] = (),
    decay: float = 1.0,
    clamp_min: float | None = None,
    thresholds: Sequence[float] | None = None,
    mask_bits: torch.Tensor | None = None,
    mask_offsets: Sequence[int] | None = None,
    write_mask: bool = False,
) -> None:
    """One zeroth-order pass over ``params`` in place (see the module docstring for the math).

    Args:
        params: the perturbed tensors (fp32/bf16/fp16, or fp64 here); any shapes and strides.
            Elements are indexed in memory order (dense tensors) or row-major (others).
        stream_offsets: each tensor's first global index, a multiple of :data:`CHUNK`.
        seed: this pass's Philox seed (the current sample's).
        eps: the perturbation size ε.
        from_sign, to_sign: the perturbation the tensors carry before and after the pass
            (−1, 0 or +1 times ε·z).
        coefficients: float32 tensor (1 + len(earlier_seeds),) of lr·ĝ_k/q, on the params'
            device; None for a pass without update.
        earlier_seeds: seeds of the step's other samples, whose directions the update adds.
        decay: multiplier 1 − lr·λ of the update stage (decoupled weight decay).
        clamp_min: lower bound of updated values (QZO), or None.
        thresholds: per tensor, Sparse-MeZO's magnitude threshold h (perturb where |x| ≤ h;
            +inf keeps a tensor dense); None for no mask.
        mask_bits, mask_offsets: the packed mask (uint8) and each tensor's first byte in it.
        write_mask: compute the mask from the (unperturbed) values and store it; otherwise read it.
    """
    zo_passes_(params, stream_offsets, philox_words4, seed=seed, eps=eps, from_sign=from_sign, to_sign=to_sign,
               coefficients=coefficients, earlier_seeds=earlier_seeds, decay=decay, clamp_min=clamp_min,
               thresholds=thresholds, mask_bits=mask_bits, mask_offsets=mask_offsets, write_mask=write_mask)



def zo_passes_(params: torch.Tensor | Sequence[torch.Tensor], stream_offsets: Sequence[int], words4: Words4, *,
               seed: int, eps: float, from_sign: int, to_sign: int, coefficients: torch.Tensor | None,
               earlier_seeds: Sequence[int], decay: float, clamp_min: float | None,
               thresholds: Sequence[float] | None, mask_bits: torch.Tensor | None,
               mask_offsets: Sequence[int] | None, write_mask: bool) -> None:
    """:func:`zo_apply_` with the Philox words drawn by ``words4`` (the reference's
    :func:`~memzoo.reference.random.philox_words4`, or an implementation of the same stream: the
    ``"torch"`` backend passes its faster one)."""
    params = as_tensor_list("params", params)
    check_zo_arguments(params, stream_offsets, seed=seed, from_sign=from_sign, to_sign=to_sign,
                       coefficients=coefficients, earlier_seeds=earlier_seeds, thresholds=thresholds,
                       mask_bits=mask_bits, mask_offsets=mask_offsets, write_mask=write_mask)
    # Pieces of at most _SLICE elements (bounding the temporaries), grouped so that each group's
    # normals come from one Philox call.
    works = [param if is_dense(param) else param.contiguous() for param in params]
    pieces = [(index, start, min(_SLICE, param.numel() - start))
              for index, param in enumerate(params) for start in range(0, param.numel(), _SLICE)]
    batch: list[tuple[int, int, int]] = []
    size = 0
    for item_index, item in enumerate(pieces):
        batch.append(item)
        size += item[2]
        following = pieces[item_index + 1] if item_index + 1 < len(pieces) else None
        if (following is None or size + following[2] > _SLICE
                or params[following[0]].device != params[item[0]].device):
            _apply_batch(params, works, batch, stream_offsets, words4, seed=seed, eps=eps, from_sign=from_sign,
                         to_sign=to_sign, coefficients=coefficients, earlier_seeds=earlier_seeds, decay=decay,
                         clamp_min=clamp_min, thresholds=thresholds, mask_bits=mask_bits, mask_offsets=mask_offsets,
                         write_mask=write_mask)
            batch, size = [], 0
    for param, work in zip(params, works):
        if work is not param:
            param.copy_(work)


def _apply_batch(params: list[torch.Tensor], works: list[torch.Tensor], batch: list[tuple[int, int, int]],
                 stream_offsets: Sequence[int], words4: Words4, *, seed: int, eps: float, from_sign: int, to_sign: int,
                 coefficients: torch.Tensor | None, earlier_seeds: Sequence[int], decay: float,
                 clamp_min: float | None, thresholds: Sequence[float] | None, mask_bits: torch.Tensor | None,
                 mask_offsets: Sequence[int] | None, write_mask: bool) -> None:
    """One pass over pieces (tensor index, first element, count) of tensors on one device."""
    device = params[batch[0][0]].device
    ranges = [((stream_offsets[index] + start) // CHUNK, -(-count // CHUNK)) for index, start, count in batch]
    streams = {seed: _chunk_normals(seed, ranges, device, words4)}
    if coefficients is not None:
        streams.update((seed_k, _chunk_normals(seed_k, ranges, device, words4)) for seed_k in earlier_seeds)
    for position, ((index, start, count), (_, num_chunks)) in enumerate(zip(batch, ranges)):
        param = params[index]
        piece = _memory_order_view(works[index])[start:start + count]
        dtype = compute_dtype(param.dtype)
        z = streams[seed][position][:count].to(dtype)
        x = piece.to(dtype)
        mask = None
        if thresholds is not None:
            byte_start = mask_offsets[index] + (start // CHUNK) * MASK_BYTES_PER_CHUNK
            byte_stop = byte_start + num_chunks * MASK_BYTES_PER_CHUNK
            if write_mask:
                padded = torch.zeros(num_chunks * CHUNK, dtype=torch.bool, device=device)
                padded[:count] = x.abs() <= float(thresholds[index])
                mask_bits[byte_start:byte_stop] = pack_mask(padded)
            mask = unpack_mask(mask_bits[byte_start:byte_stop])[:count]
        perturbation = eps * z if mask is None else torch.where(mask, eps * z, 0.0)
        if from_sign:  # recover the unperturbed value, rounded as stored
            x = (x - from_sign * perturbation).to(param.dtype).to(dtype)
        if coefficients is not None:
            c = coefficients.to(device=device, dtype=dtype)
            step = c[0] * z
            for k, seed_k in enumerate(earlier_seeds, start=1):
                step = step + c[k] * streams[seed_k][position][:count].to(dtype)
            updated = x * decay - step
            if clamp_min is not None:
                updated = torch.clamp(updated, min=clamp_min)
            if mask is not None:
                updated = torch.where(mask, updated, x)
            x = updated.to(param.dtype).to(dtype)
        if to_sign:
            x = x + to_sign * perturbation
        piece.copy_(x)
