"""APOLLO's two kernels; twins of :mod:`memzoo.reference.apollo`.

(a) ``apollo_scales_``: the projection R = P(G) as GaLore's batched GEMM, whose epilogue updates
    the rank-r Adam moments and, instead of writing N = m/(√v+ε), reduces ‖N‖² and ‖R‖² per
    channel over its tile: R and N never go to memory. The tile partials (one per tile along the
    rank dimension) are summed in a fixed order afterwards, so results are deterministic (no
    atomics).
(b) ``apollo_apply_``: the scaled update W ← (W − c·s⊙G)·(1 − lr·λ), c = η·√α/limiter, as a
    tiled element-wise kernel over a batch of same-shaped matrices (per-channel factors read
    through zero strides). With the limiter on, a first pass of the same kernel reduces ‖G⊙s‖²
    per tile; the limiter itself is a few (B,)-sized tensor ops, with no host synchronisation.

Matrices with no factor at all fall back to the reference (APOLLO always has one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from memzoo.reference.apollo import NORM_EPS, apply_lists, check_scales_shape
from memzoo.reference.apollo import apollo_apply_ as _reference_apply_
from memzoo.reference.apollo import apollo_scales_ as _reference_scales_
from memzoo.reference.galore import FactorList, as_matrix, check_low_rank_shapes, low_rank_lists
from memzoo.triton_kernels.galore import (
    INTERPRETED,
    INTERPRETER_TILES,
    PROJECT_TILES,
    adam_moments_tile,
    adamw_update_,
    copy_back,
    gemm_tile,
    launch_batched,
    matrix_pointer,
    same_layout_batches,
    writable_matrix,
)
from memzoo.triton_kernels.multi_tensor import ceil_div, operand_offsets, to_storage

__all__ = ["AUTO", "INTERPRETED", "adamw_update_", "apollo_apply_", "apollo_scales_"]

# Like GaLore's kernels: selected by backend="triton" only until validated on a GPU.
AUTO = False
# Tiles of the element-wise update (rows × columns of W): BLOCK_M, BLOCK_N, warps; smaller and
# single-warp under the interpreter.
UPDATE_BLOCK = (32, 64, 1) if INTERPRETED else (32, 128, 4)


@triton.jit
def _project_scales_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, part_ptr, offsets, num_matrices, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_mm, stride_mn, stride_vm, stride_vn,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    ROW_SUMS: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    a_ptr = matrix_pointer(a_ptr, offsets, num_matrices, 0)
    b_ptr = matrix_pointer(b_ptr, offsets, num_matrices, 1)
    m_ptr = matrix_pointer(m_ptr, offsets, num_matrices, 2)
    v_ptr = matrix_pointer(v_ptr, offsets, num_matrices, 3)
    part_ptr = matrix_pointer(part_ptr, offsets, num_matrices, 4)
    r, rows, cols, mask = gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if MAXIMIZE:
        r = -r
    update = adam_moments_tile(r, m_ptr, v_ptr, rows, cols, mask, stride_mm, stride_mn, stride_vm, stride_vn,
                               beta1, one_minus_beta1, beta2, one_minus_beta2, eps)
    # Rows and columns past the edge hold wrapped-around values (the GEMM reads them in range).
    update = tl.where(mask, update, 0.0)
    r = tl.where(mask, r, 0.0)
    # Partials laid out (2, tiles along the rank dimension, channels): ‖N‖² then ‖R‖².
    if ROW_SUMS:  # channels are R's rows; this program is tile program_id(1) of the rank dimension
        tiles = tl.num_programs(1)
        where = part_ptr + tl.program_id(1) * M + rows
        channel_mask = rows < M
        tl.store(where, tl.sum(update * update, axis=1)[:, None], mask=channel_mask)
        tl.store(where + tiles * M, tl.sum(r * r, axis=1)[:, None], mask=channel_mask)
    else:  # channels are R's columns
        tiles = tl.num_programs(0)
        where = part_ptr + tl.program_id(0) * N + cols
        channel_mask = cols < N
        tl.store(where, tl.sum(update * update, axis=0)[None, :], mask=channel_mask)
        tl.store(where + tiles * N, tl.sum(r * r, axis=0)[None, :], mask=channel_mask)


@torch.no_grad()
def apollo_scales_(
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    scales: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.apollo.apollo_scales_`: one launch per group of
    matrices sharing shapes, strides, dtypes and scaling granularity."""
    (grads, exp_avgs, exp_avg_sqs, scales), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, scales=scales, lefts=lefts, rights=rights)
    fused = []
    for grad, exp_avg, exp_avg_sq, scale, left, right in zip(grads, exp_avgs, exp_avg_sqs, scales, lefts, rights):
        if grad.dim() < 2:
            raise ValueError(f"APOLLO scales ≥2-D gradients, got shape {tuple(grad.shape)}")
        check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        g = as_matrix(grad, grad.shape[0])
        check_scales_shape(scale, tuple(g.shape), left, right)
        if (left is None and right is None) or scale.dtype == torch.float64 or grad.dtype == torch.float64:
            _reference_scales_(grad, exp_avg, exp_avg_sq, scale, lefts=None if left is None else [left],
                               rights=None if right is None else [right], beta1=beta1, beta2=beta2, eps=eps,
                               maximize=maximize)
            continue
        # right: R = G·rightᵀ (A = G, B = rightᵀ); left: R = leftᵀ·G (A = leftᵀ, B = G)
        a, b = (g, right.T) if right is not None else (left.T, g)
        fused.append((a, b, exp_avg, exp_avg_sq, scale))
    scalars = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps)
    tiles = INTERPRETER_TILES if INTERPRETED else PROJECT_TILES
    for *operands, scales_ in same_layout_batches(fused):
        a, b, exp_avg, exp_avg_sq, scale = (tensors[0] for tensors in (*operands, scales_))
        rows, cols, inner = a.shape[0], b.shape[1], a.shape[1]
        # Channels are R's rows for row and tensor scaling ((m, 1) and (1, 1) factors), its
        # columns for column scaling ((1, n)).
        row_sums = scale.shape[1] == 1
        channels, count = (rows, ceil_div(cols, tiles.block_n)) if row_sums else (cols, ceil_div(rows, tiles.block_m))
        partials = torch.empty((len(scales_), 2, count, channels), dtype=torch.float32, device=a.device)
        launch_batched(_project_scales_kernel, tiles, [*operands, list(partials.unbind(0))], rows, cols, inner,
                       (*a.stride(), *b.stride(), *exp_avg.stride(), *exp_avg_sq.stride()), scalars,
                       ROW_SUMS=row_sums, MAXIMIZE=maximize)
        sums = partials.sum(dim=2)  # (B, 2, channels): ‖N_c‖², ‖R_c‖², summed in a fixed order
        if scale.numel() == 1:  # tensor-wise
            sums = sums.sum(dim=2, keepdim=True)
        ratios = sums[:, 0].sqrt() / (sums[:, 1].sqrt() + NORM_EPS)
        torch._foreach_copy_(scales_, [ratio.view(scale.shape) for ratio in ratios.unbind(0)])


@triton.jit
def _scaled_update_kernel(
    w_ptr, g_ptr, s_ptr, coef_ptr, part_ptr, offsets, num_matrices, M, N,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_sm, stride_sn, decay,
    NORM_PASS: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DECAY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """NORM_PASS: partial ‖G⊙s‖² of this tile into part[matrix, tile]. Otherwise
    W ← W − c·(s⊙G), then W ← W − decay·W, with c = coef[matrix] (η·√α/limiter, signed)."""
    w_ptr = matrix_pointer(w_ptr, offsets, num_matrices, 0)
    g_ptr = matrix_pointer(g_ptr, offsets, num_matrices, 1)
    s_ptr = matrix_pointer(s_ptr, offsets, num_matrices, 2)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(g_ptr + rows * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows * stride_sm + cols * stride_sn, mask=mask, other=0.0).to(tl.float32)
    scaled = g * s  # S = G ⊙ s
    if NORM_PASS:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tiles = tl.num_programs(0) * tl.num_programs(1)
        tl.store(part_ptr + tl.program_id(2) * tiles + tile, tl.sum(tl.sum(scaled * scaled, axis=1), axis=0))
    else:
        if MAXIMIZE:
            scaled = -scaled
        w_ptrs = w_ptr + rows * stride_wm + cols * stride_wn
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) - tl.load(coef_ptr + tl.program_id(2)) * scaled
        if HAS_DECAY:
            w = w - decay * w
        tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty), mask=mask)


def _broadcast_strides(factor: torch.Tensor) -> tuple[int, int]:
    """Strides that read a (1|m, 1|n) factor as an m×n matrix: 0 along its size-1 dimensions."""
    return tuple(0 if size == 1 else stride for size, stride in zip(factor.shape, factor.stride()))


def _launch_update(operands: list[list[torch.Tensor]], m: int, n: int, coefficients: torch.Tensor,
                   partials: torch.Tensor | None, decay: float, maximize: bool) -> None:
    weight, grad, factor = (tensors[0] for tensors in operands)
    block_m, block_n, warps = UPDATE_BLOCK
    grid = (ceil_div(m, block_m), ceil_div(n, block_n), len(operands[0]))
    offsets = operand_offsets(operands, weight.device)
    _scaled_update_kernel[grid](
        weight, grad, factor, coefficients, coefficients if partials is None else partials, offsets,
        len(operands[0]), m, n, *weight.stride(), *grad.stride(), *_broadcast_strides(factor), decay,
        NORM_PASS=partials is not None, MAXIMIZE=maximize, HAS_DECAY=decay != 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps)


@torch.no_grad()
def apollo_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    scales: torch.Tensor | Sequence[torch.Tensor],
    limiter_norms: torch.Tensor | Sequence[torch.Tensor] | None,
    *,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
    growth_limit: float = 1.01,
    record_only: bool = False,
    scale_front: bool = False,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.apollo.apollo_apply_`: per group of same-shaped
    matrices, one norm pass (with the limiter) and one update pass."""
    params, grads, scales, norms = apply_lists(params, grads, scales, limiter_norms, growth_limit)
    root_alpha = math.sqrt(scale)
    fused, copies = [], []
    for param, grad, factor, norm in zip(params, grads, scales, norms):
        if torch.float64 in (param.dtype, grad.dtype, factor.dtype):
            _reference_apply_(param, grad, factor, norm, step_size=step_size, scale=scale, lr=lr,
                              weight_decay=weight_decay, growth_limit=growth_limit, record_only=record_only,
                              scale_front=scale_front, maximize=maximize)
            continue
        # (ρ, a 0-d tensor, rides along as a fourth operand so that it is grouped with its matrix.)
        fused.append((writable_matrix(param, copies), as_matrix(grad, param.shape[0]), factor)
                     + (() if norm is None else (norm,)))
    decay = lr * weight_decay
    for operands in same_layout_batches(fused):
        operands, limiter_norms_ = operands[:3], operands[3] if len(operands) > 3 else None
        m, n = operands[0][0].shape
        device = operands[0][0].device
        count = len(operands[0])
        if limiter_norms_ is None:
            coefficients = torch.full((count,), step_size * root_alpha, dtype=torch.float32, device=device)
        else:
            block_m, block_n, _ = UPDATE_BLOCK
            partials = torch.empty((count, ceil_div(m, block_m) * ceil_div(n, block_n)), dtype=torch.float32,
                                   device=device)
            _launch_update(operands, m, n, partials[:, 0], partials, 0.0, False)
            size = partials.sum(dim=1).sqrt()  # ‖G⊙s‖ per matrix
            if scale_front:
                size = size * root_alpha
            if record_only:
                limit = torch.ones_like(size)
                recorded = size
            else:  # c = max(‖S‖/(ρ + 1e-8), γ)/γ
                rho = torch.stack(limiter_norms_)
                limit = torch.clamp(size / (rho + NORM_EPS), min=growth_limit) / growth_limit
                recorded = size / limit
            torch._foreach_copy_(limiter_norms_, list(recorded.unbind(0)))
            coefficients = (step_size * root_alpha) / limit
        _launch_update(operands, m, n, coefficients, None, decay, maximize)
    copy_back(copies)
