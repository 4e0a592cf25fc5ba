"""Zeroth-order passes as one multi-tensor Triton kernel; twin of :mod:`memzoo.reference.zeroth_order`.

Each pass reads and writes every perturbed element once (8 bytes per fp32 element, 4 per bf16):
the perturbation is generated in registers from (seed, element index), four normals per Philox
call (``tl.randn4x``), never stored. The recover / update / perturb stages of the reference are
constexpr-selected parts of one kernel, and so are the variants: Sparse-MeZO's mask (computed
from the unperturbed values and bit-packed on a step's first pass, read on the others) and
QZO's clamp of updated scales.

A program handles BLOCK elements of one tensor as chunks of 1024, each chunk as four (8, 32)
tiles (its quarters): the tile's 8 rows are the 8 bits of a mask byte, its 32 columns the
bytes, so packing and unpacking the mask is a reduction/broadcast along rows, no reshapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.common import as_tensor_list
from memzoo.reference.zeroth_order import CHUNK, check_zo_arguments
from memzoo.triton_kernels.multi_tensor import launch_elementwise, to_storage, values_tensor

__all__ = ["AUTO", "INTERPRETED", "zo_apply_"]

# backend="auto" keeps the reference until these kernels have been checked on a GPU.
AUTO = False
BLOCK = 2048  # a multiple of CHUNK; not yet tuned on a GPU
NUM_WARPS = 4
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_MASK_NONE, _MASK_READ, _MASK_WRITE = 0, 1, 2


@triton.jit
def _zo_quarter(p_base, offsets, inside, z, step, mask_bits, byte_offsets, bytes_inside, threshold,
                eps, decay, clamp_min, FROM_SIGN: tl.constexpr, TO_SIGN: tl.constexpr, UPDATE: tl.constexpr,
                CLAMP: tl.constexpr, MASK: tl.constexpr):
    """Recover, update and perturb one (8, 32) tile; see the reference's module docstring."""
    dtype = p_base.dtype.element_ty
    x = tl.load(p_base + offsets, mask=inside, other=0.0).to(tl.float32)
    shifts = tl.arange(0, 8)[:, None]
    a = eps * z  # this element's perturbation ε·z
    if MASK == 2:  # Sparse-MeZO: perturb where |x| ≤ h, from the unperturbed x; pack 8 rows per byte
        selected = (tl.abs(x) <= threshold) & inside
        packed = tl.sum(selected.to(tl.int32) << shifts, axis=0)
        tl.store(mask_bits + byte_offsets, packed.to(tl.uint8), mask=bytes_inside)
    elif MASK == 1:
        packed = tl.load(mask_bits + byte_offsets, mask=bytes_inside, other=0).to(tl.int32)
        selected = ((packed[None, :] >> shifts) & 1) != 0
    if MASK != 0:
        a = tl.where(selected, a, 0.0)
    if FROM_SIGN != 0:  # back to the unperturbed point, rounded as stored
        x = to_storage(x - FROM_SIGN * a, dtype).to(tl.float32)
    if UPDATE:  # x ← x·(1 − lr·λ) − Σ_k lr·ĝ_k/q · z_k
        updated = x * decay - step
        if CLAMP:
            updated = tl.maximum(updated, clamp_min, propagate_nan=tl.PropagateNan.ALL)
        if MASK != 0:
            updated = tl.where(selected, updated, x)
        x = to_storage(updated, dtype).to(tl.float32)
    if TO_SIGN != 0:
        x = x + TO_SIGN * a
    tl.store(p_base + offsets, to_storage(x, dtype), mask=inside)


@triton.jit
def _zo_kernel(
    p_base, table, block_tensor, num_tensors,
    stream_offsets, thresholds, mask_offsets,
    mask_bits, coefficients, earlier_seeds,
    seed, eps, decay, clamp_min, num_earlier,
    P_ALIGN: tl.constexpr, FROM_SIGN: tl.constexpr, TO_SIGN: tl.constexpr, UPDATE: tl.constexpr,
    CLAMP: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    numel = tl.load(table + num_tensors + t)
    block_start = (pid - tl.load(table + 2 * num_tensors + t)).to(tl.int64) * BLOCK
    base = tl.load(table + t)
    if P_ALIGN > 1:
        base = tl.multiple_of(base, P_ALIGN)
    stream_start = tl.load(stream_offsets + t) + block_start
    threshold = tl.load(thresholds + t)
    byte_start = tl.load(mask_offsets + t) + (block_start // 1024) * 128
    tile = tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 32)[None, :]  # position within a quarter
    columns = tl.arange(0, 32)
    coefficient = 0.0
    if UPDATE:
        coefficient = tl.load(coefficients)
    for c in tl.static_range(BLOCK // 1024):
        local = block_start + c * 1024  # this chunk's first element in the tensor
        counters = (stream_start + c * 1024) // 4 + tile  # 256·(stream chunk) + position
        n0, n1, n2, n3 = tl.randn4x(seed, counters)
        s0 = coefficient * n0
        s1 = coefficient * n1
        s2 = coefficient * n2
        s3 = coefficient * n3
        if UPDATE:
            for k in range(num_earlier):  # the step's other samples: regenerate their directions
                c_k = tl.load(coefficients + 1 + k)
                m0, m1, m2, m3 = tl.randn4x(tl.load(earlier_seeds + k), counters)
                s0 = s0 + c_k * m0
                s1 = s1 + c_k * m1
                s2 = s2 + c_k * m2
                s3 = s3 + c_k * m3
        chunk_inside = local + columns * 0 < numel  # a (32,) mask: the bytes of a chunk in the tensor
        bytes0 = byte_start + c * 128 + columns
        _zo_quarter(p_base, base + local + tile, local + tile < numel, n0, s0, mask_bits, bytes0, chunk_inside,
                    threshold, eps, decay, clamp_min, FROM_SIGN, TO_SIGN, UPDATE, CLAMP, MASK)
        _zo_quarter(p_base, base + local + 256 + tile, local + 256 + tile < numel, n1, s1, mask_bits, bytes0 + 32,
                    chunk_inside, threshold, eps, decay, clamp_min, FROM_SIGN, TO_SIGN, UPDATE, CLAMP, MASK)
        _zo_quarter(p_base, base + local + 512 + tile, local + 512 + tile < numel, n2, s2, mask_bits, bytes0 + 64,
                    chunk_inside, threshold, eps, decay, clamp_min, FROM_SIGN, TO_SIGN, UPDATE, CLAMP, MASK)
        _zo_quarter(p_base, base + local + 768 + tile, local + 768 + tile < numel, n3, s3, mask_bits, bytes0 + 96,
                    chunk_inside, threshold, eps, decay, clamp_min, FROM_SIGN, TO_SIGN, UPDATE, CLAMP, MASK)


INTERPRETED: bool = isinstance(_zo_kernel, InterpretedFunction)


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor passed for pointer arguments a constexpr branch never reads."""
    return values_tensor((0,), dtype, device)


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
    """Same contract as :func:`memzoo.reference.zeroth_order.zo_apply_` for fp32/bf16/fp16
    tensors (dense tensors in place in memory order, others through a contiguous copy)."""
    params = as_tensor_list("params", params)
    check_zo_arguments(params, stream_offsets, seed=seed, from_sign=from_sign, to_sign=to_sign,
                       coefficients=coefficients, earlier_seeds=earlier_seeds, thresholds=thresholds,
                       mask_bits=mask_bits, mask_offsets=mask_offsets, write_mask=write_mask, dtypes=_SUPPORTED)
    live = [index for index, param in enumerate(params) if param.numel()]
    if not live:
        return
    devices = {params[index].device for index in live}
    if len(devices) > 1:
        raise ValueError(f"zo_apply_ takes tensors on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if coefficients is not None and coefficients.device != device:
        raise ValueError(f"coefficients are on {coefficients.device}, the tensors on {device}")
    count = len(params)
    masked = thresholds is not None
    launch_elementwise(
        _zo_kernel, {"params": params}, written=[True], block=BLOCK, dtypes=_SUPPORTED, num_warps=NUM_WARPS,
        align_names=("P_ALIGN",),
        per_tensor=[(list(stream_offsets), torch.int64),
                    (list(thresholds) if masked else [0.0] * count, torch.float32),
                    (list(mask_offsets) if masked else [0] * count, torch.int64)],
        pointers=[mask_bits if masked else _placeholder(device, torch.uint8),
                  coefficients if coefficients is not None else _placeholder(device, torch.float32),
                  values_tensor(earlier_seeds, torch.int64, device) if earlier_seeds
                  else _placeholder(device, torch.int64)],
        scalars=(seed, eps, decay, 0.0 if clamp_min is None else clamp_min, len(earlier_seeds)),
        FROM_SIGN=from_sign, TO_SIGN=to_sign, UPDATE=coefficients is not None, CLAMP=clamp_min is not None,
        MASK=(_MASK_WRITE if write_mask else _MASK_READ) if masked else _MASK_NONE,
    )


assert BLOCK % CHUNK == 0
