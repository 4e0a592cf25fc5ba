"""GaLore's two fused kernels; twins of :mod:`memzoo.reference.galore`.

(a) ``galore_adam_project_``: the projection R = leftᵀ·G·rightᵀ as a GEMM whose epilogue updates
    the rank-r Adam moments and writes N = m/(√v+ε): R never goes to memory, G is read once.
(b) ``galore_apply_``: the back-projection left·N·right as a GEMM whose epilogue reads the weight
    tile, applies W ← (W − η·α·PN) − lr·λ·(W − η·α·PN) and writes it back in place: no m×n
    temporary.

Two-sided ("full") projection runs its first, small product (r×n or m×r) with torch and the
second in the fused kernel. Without factors (parameters outside GaLore groups) both halves are
element-wise and use the reference.

Precision: operands are widened to fp32 and multiplied with ``input_precision`` PRECISION
("tf32" on GPUs: operands truncated to 10 mantissa bits, so up to ~2·2⁻¹⁰ relative error per
product, the price of 8× the fp32 matmul rate; the interpreter computes in full fp32); sqrt and
division are IEEE (``sqrt_rn``/``div_rn``) so the epilogue matches the reference's rounding.

Status: checked against the reference through Triton's interpreter, and compiled on an H100
(tests/test_gpu.py: LLaMA-size matrices and optimizer trajectories against the torch backend).
``AUTO = False`` keeps ``backend="auto"`` on the reference until the hypothesis equivalence suite
has passed on a GPU: its last GPU run was cut short by a multi-tensor table-cache bug, since fixed
(bench/RESULTS.md).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.galore import (
    FactorList,
    as_matrix,
    check_low_rank_shapes,
    low_rank_lists,
    project,
)
from memzoo.reference.galore import galore_adam_project_ as _reference_adam_project_
from memzoo.reference.galore import galore_apply_ as _reference_apply_
# GaLore-Adafactor has no Triton kernel (its m×n work is one back-projection GEMM, which the torch
# path accumulates into the weight), nor Natural GaLore's k×k solves (batched float64 QR):
# backend="triton" runs the torch path's functions.
from memzoo.triton_kernels.torch_backend.galore import (
    adafactor_beta2,
    adafactor_lr,
    adafactor_update_,
    galore_adafactor_apply_,
    galore_adafactor_project_,
    natural_gradient,
    natural_gradients,
    natural_gradients_with_grams,
)
from memzoo.triton_kernels.multi_tensor import ceil_div, launch_elementwise, operand_offsets, tensor_block, to_storage

__all__ = ["AUTO", "INTERPRETED", "PRECISION", "adafactor_beta2", "adafactor_lr", "adafactor_update_",
           "adam_moments_tile", "adamw_update_", "copy_back", "galore_adafactor_apply_", "galore_adafactor_project_",
           "galore_adam_project_", "galore_apply_", "gemm_tile", "launch_batched", "matrix_pointer", "natural_gradient",
           "natural_gradients", "natural_gradients_with_grams", "project", "same_layout_batches", "writable_matrix"]

AUTO = False
PRECISION = "tf32"


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _tiles_from_environment(name: str, default: Tiles) -> Tiles:
    """Tiles from ``name`` ("BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES"), for tuning on other GPUs."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return Tiles(*(int(part) for part in text.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"{name}={text!r}: expected five integers BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES") from None


# GEMM tiles on the GPU (per kernel; chosen with ``python -m memzoo.bench.tune`` on an H100), and
# in the interpreter, where pipelining means nothing and fewer, larger programs run faster.
# H100, 350m preset (bench/RESULTS.md): 128×128×32, 8 warps, 3 stages was best summed over both
# sides for both kernels among the six configurations swept.
PROJECT_TILES = _tiles_from_environment("MEMZOO_GALORE_PROJECT_TILES", Tiles(128, 128, 32, 8, 3))
APPLY_TILES = _tiles_from_environment("MEMZOO_GALORE_APPLY_TILES", Tiles(128, 128, 32, 8, 3))
INTERPRETER_TILES = Tiles(64, 64, 32, 4, 1)
ADAMW_BLOCK = 1024  # swept on an H100 (bench/RESULTS.md): 1024 elements, 4 warps
ADAMW_WARPS = 4
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """This program's BLOCK_M×BLOCK_N tile of A·B (fp32 accumulator), row/column offsets, mask.

    The usual pipelined form: pointers computed once and advanced by BLOCK_K, rows and columns
    wrapped into range (% M, % N) so that only the K tail is masked in the loop; rows and columns
    past the edge are computed and dropped by the caller's masked store."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M)[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + (cols % N)[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=ks[:, None] < K - k0, other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return acc, rows[:, None].to(tl.int64), cols[None, :].to(tl.int64), mask


@triton.jit
def matrix_pointer(base, offsets, num_matrices, OPERAND: tl.constexpr):
    """Operand OPERAND's pointer for this program's matrix (grid axis 2 indexes the batch)."""
    return base + tl.load(offsets + OPERAND * num_matrices + tl.program_id(2))


@triton.jit
def adam_moments_tile(r, m_ptr, v_ptr, rows, cols, mask, stride_mm, stride_mn, stride_vm, stride_vn,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, eps):
    """The Adam epilogue of a projection tile R: the moments updated in place, N returned."""
    m_ptrs = m_ptr + rows * stride_mm + cols * stride_mn
    v_ptrs = v_ptr + rows * stride_vm + cols * stride_vn
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32) * beta1 + r * one_minus_beta1  # m ← β1·m + (1−β1)·R
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32) * beta2 + r * r * one_minus_beta2  # v ← β2·v + (1−β2)·R²
    tl.store(m_ptrs, to_storage(m, m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, to_storage(v, v_ptr.dtype.element_ty), mask=mask)
    return tl.div_rn(m, tl.sqrt_rn(v) + eps)  # N = m / (√v + ε)


@triton.jit
def _project_adam_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, out_ptr, offsets, num_matrices, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_mm, stride_mn, stride_vm, stride_vn, stride_om, stride_on,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    MAXIMIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    a_ptr = matrix_pointer(a_ptr, offsets, num_matrices, 0)
    b_ptr = matrix_pointer(b_ptr, offsets, num_matrices, 1)
    m_ptr = matrix_pointer(m_ptr, offsets, num_matrices, 2)
    v_ptr = matrix_pointer(v_ptr, offsets, num_matrices, 3)
    out_ptr = matrix_pointer(out_ptr, offsets, num_matrices, 4)
    r, rows, cols, mask = gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if MAXIMIZE:
        r = -r
    update = adam_moments_tile(r, m_ptr, v_ptr, rows, cols, mask, stride_mm, stride_mn, stride_vm, stride_vn,
                               beta1, one_minus_beta1, beta2, one_minus_beta2, eps)
    tl.store(out_ptr + rows * stride_om + cols * stride_on, update.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    a_ptr, b_ptr, w_ptr, offsets, num_matrices, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_wm, stride_wn,
    coefficient, decay,
    HAS_DECAY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    a_ptr = matrix_pointer(a_ptr, offsets, num_matrices, 0)
    b_ptr = matrix_pointer(b_ptr, offsets, num_matrices, 1)
    w_ptr = matrix_pointer(w_ptr, offsets, num_matrices, 2)
    back, rows, cols, mask = gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    w_ptrs = w_ptr + rows * stride_wm + cols * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) - coefficient * back  # W − η·α·P(N)
    if HAS_DECAY:
        w = w - decay * w  # then − lr·λ·W on the new weight
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    p_base, g_base, m_base, v_base, table, block_tensor, num_tensors,
    step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
    P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_DECAY: tl.constexpr, DECAY_FIRST: tl.constexpr, BLOCK: tl.constexpr,
):
    p_offs, mask = tensor_block(table, block_tensor, num_tensors, 0, 4, P_ALIGN, BLOCK)
    g_offs, _ = tensor_block(table, block_tensor, num_tensors, 1, 4, G_ALIGN, BLOCK)
    m_offs, _ = tensor_block(table, block_tensor, num_tensors, 2, 4, M_ALIGN, BLOCK)
    v_offs, _ = tensor_block(table, block_tensor, num_tensors, 3, 4, V_ALIGN, BLOCK)
    g = tl.load(g_base + g_offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_base + m_offs, mask=mask, other=0.0).to(tl.float32) * beta1 + g * one_minus_beta1
    v = tl.load(v_base + v_offs, mask=mask, other=0.0).to(tl.float32) * beta2 + g * g * one_minus_beta2
    w = tl.load(p_base + p_offs, mask=mask, other=0.0).to(tl.float32)
    if DECAY_FIRST:  # torch.optim.AdamW's order: W·(1 − lr·λ), then the update
        w = w * (1.0 - decay)
    w = w - step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if HAS_DECAY and not DECAY_FIRST:
        w = w - decay * w
    tl.store(p_base + p_offs, to_storage(w, p_base.dtype.element_ty), mask=mask)
    tl.store(m_base + m_offs, to_storage(m, m_base.dtype.element_ty), mask=mask)
    tl.store(v_base + v_offs, to_storage(v, v_base.dtype.element_ty), mask=mask)


INTERPRETED: bool = isinstance(_apply_kernel, InterpretedFunction)


@torch.no_grad()
def adamw_update_(
    params: torch.Tensor | list[torch.Tensor],
    grads: torch.Tensor | list[torch.Tensor],
    exp_avgs: torch.Tensor | list[torch.Tensor],
    exp_avg_sqs: torch.Tensor | list[torch.Tensor],
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    lr: float,
    weight_decay: float,
    maximize: bool = False,
    decay_first: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.adamw_update_`: one multi-tensor launch
    per (device, dtypes) bucket, each element read once (p, g, m, v) and written once (p, m, v)."""
    launch_elementwise(
        _adamw_kernel, {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
        written=[True, False, True, True], block=ADAMW_BLOCK, dtypes=_SUPPORTED, num_warps=ADAMW_WARPS,
        align_names=("P_ALIGN", "G_ALIGN", "M_ALIGN", "V_ALIGN"),
        scalars=(step_size, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr * weight_decay),
        MAXIMIZE=maximize, HAS_DECAY=weight_decay != 0.0, DECAY_FIRST=decay_first,
    )


def same_layout_batches(operand_tuples: list[tuple[torch.Tensor, ...]]) -> list[list[list[torch.Tensor]]]:
    """Split a batch into groups one launch can serve: every operand with the same shape,
    strides, dtype and device across the group (so only base pointers differ). Each group comes
    back as one list per operand."""
    groups: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
    for operands in operand_tuples:
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in operands)
        groups.setdefault(key, []).append(operands)
    return [[list(operand) for operand in zip(*group)] for group in groups.values()]


_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


def _uniform(*lists: Sequence[torch.Tensor]) -> bool:
    """Whether each list's tensors share shape, strides and dtype, all on one device: then one
    launch serves the whole batch, checked in a few C-level passes instead of per matrix."""
    devices = set()
    for tensors in lists:
        if (len(set(map(_shape_of, tensors))) != 1 or len(set(map(torch.Tensor.stride, tensors))) != 1
                or len(set(map(_dtype_of, tensors))) != 1):
            return False
        devices.update(map(torch.Tensor.get_device, tensors))
    return len(devices) == 1


def _one_side(lefts: list, rights: list) -> str | None:
    """'left' or 'right' when every matrix has a factor on that side only, else None."""
    # (Identity tests only: ``None in tensors`` would compare tensors with ==.)
    if all(left is None for left in lefts) and all(right is not None for right in rights):
        return "right"
    if all(right is None for right in rights) and all(left is not None for left in lefts):
        return "left"
    return None


def writable_matrix(param: torch.Tensor, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``param`` as its (shape[0], rest) matrix, written in place through a view; a ≥3-D
    tensor that cannot be viewed so is copied, and (param, copy) is added to ``copies`` for
    :func:`copy_back` after the kernels."""
    if param.dim() == 2:
        return param
    try:
        return param.view(param.shape[0], -1)
    except RuntimeError:  # not viewable as a matrix: copy in, copy out
        weight = param.reshape(param.shape[0], -1).clone()
        copies.append((param, weight))
        return weight


def copy_back(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the matrices of :func:`writable_matrix`'s copies back into their parameters."""
    for param, weight in copies:
        param.copy_(weight.reshape(param.shape))


def _transposed(matrix: torch.Tensor) -> tuple[int, int]:
    return matrix.stride(1), matrix.stride(0)


def launch_batched(kernel, tiles: Tiles, operands: list[list[torch.Tensor]], m: int, n: int, k: int,
                   strides: tuple[int, ...], scalars: tuple[float, ...], **constexprs: object) -> None:
    """One launch over a batch given as one list per operand; the kernel reads operand l of
    matrix b at the first tensor's address plus the offset table's entry (l, b)."""
    offsets = operand_offsets(operands, operands[0][0].device)
    tiles = INTERPRETER_TILES if INTERPRETED else tiles
    count = len(operands[0])
    grid = (ceil_div(m, tiles.block_m), ceil_div(n, tiles.block_n), count)
    kernel[grid](*(tensors[0] for tensors in operands), offsets, count, m, n, k, *strides, *scalars,
                 BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=PRECISION,
                 num_warps=tiles.num_warps, num_stages=tiles.num_stages, **constexprs)


@torch.no_grad()
def galore_adam_project_(
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_adam_project_`: one launch per
    group of same-shaped, same-strided matrices."""
    (grads, exp_avgs, exp_avg_sqs, updates), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, updates=updates, lefts=lefts, rights=rights)
    scalars = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps)
    side = _one_side(lefts, rights) if grads else None
    factors = rights if side == "right" else lefts
    if side and grads[0].dim() == 2 and _uniform(grads, exp_avgs, exp_avg_sqs, updates, factors):
        # The optimizer's case: same-shaped matrices, one side. One check stands for all.
        grad, factor = grads[0], factors[0]
        check_low_rank_shapes(grad.shape, lefts[0], rights[0], exp_avg=exp_avgs[0], exp_avg_sq=exp_avg_sqs[0],
                              update=updates[0])
        if side == "right":  # R = G·rightᵀ: A = G (m×n), B = rightᵀ (n×r)
            dims, strides = (grad.shape[0], factor.shape[0], grad.shape[1]), (*grad.stride(), *_transposed(factor))
            operands = [grads, factors]
        else:  # R = leftᵀ·G: A = leftᵀ (r×m), B = G (m×n)
            dims, strides = (factor.shape[1], grad.shape[1], grad.shape[0]), (*_transposed(factor), *grad.stride())
            operands = [factors, grads]
        launch_batched(_project_adam_kernel, PROJECT_TILES, [*operands, exp_avgs, exp_avg_sqs, updates], *dims,
                       (*strides, *exp_avgs[0].stride(), *exp_avg_sqs[0].stride(), *updates[0].stride()), scalars,
                       MAXIMIZE=maximize)
        return
    fused = []
    for grad, exp_avg, exp_avg_sq, update, left, right in zip(grads, exp_avgs, exp_avg_sqs, updates, lefts, rights):
        check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, update=update)
        if left is None and right is None:  # element-wise: the reference
            _reference_adam_project_(grad, exp_avg, exp_avg_sq, update, lefts=None, rights=None, beta1=beta1,
                                     beta2=beta2, eps=eps, maximize=maximize)
            continue
        g = as_matrix(grad, grad.shape[0])
        if left is not None and right is not None:  # full: T = leftᵀ·G first (r×n), then T·rightᵀ fused
            g, left = left.T.to(torch.float32) @ g.to(torch.float32), None
        # right: R = G·rightᵀ, A = G (m×n), B = rightᵀ (n×r); left: R = leftᵀ·G, A = leftᵀ, B = G
        a, b = (g, right.T) if right is not None else (left.T, g)
        fused.append((a, b, exp_avg, exp_avg_sq, update))
    for operands in same_layout_batches(fused):
        a, b, exp_avg, exp_avg_sq, update = (tensors[0] for tensors in operands)
        launch_batched(_project_adam_kernel, PROJECT_TILES, operands, a.shape[0], b.shape[1], a.shape[1],
                       (*a.stride(), *b.stride(), *exp_avg.stride(), *exp_avg_sq.stride(), *update.stride()), scalars,
                       MAXIMIZE=maximize)


@torch.no_grad()
def galore_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_apply_`. Weights are written in
    place through their strides; a ≥3-D weight that cannot be viewed as a matrix goes through a
    copy."""
    (params, updates), lefts, rights = low_rank_lists("params", params=params, updates=updates, lefts=lefts,
                                                      rights=rights)
    scalars = (step_size * scale, lr * weight_decay)
    side = _one_side(lefts, rights) if params else None
    factors = rights if side == "right" else lefts
    if side and params[0].dim() == 2 and _uniform(params, updates, factors):
        # The optimizer's case: same-shaped matrices, one side. One check stands for all.
        check_low_rank_shapes(params[0].shape, lefts[0], rights[0], update=updates[0])
        # right: W −= c·N·right, A = N (m×r), B = right (r×n); left: A = left (m×r), B = N (r×n)
        operands = [updates, factors] if side == "right" else [factors, updates]
        a, b = operands[0][0], operands[1][0]
        launch_batched(_apply_kernel, APPLY_TILES, [*operands, params], a.shape[0], b.shape[1], a.shape[1],
                       (*a.stride(), *b.stride(), *params[0].stride()), scalars, HAS_DECAY=weight_decay != 0.0)
        return
    fused, copies = [], []
    for param, update, left, right in zip(params, updates, lefts, rights):
        check_low_rank_shapes(param.shape, left, right, update=update)
        if left is None and right is None:
            _reference_apply_(param, update, lefts=None, rights=None, step_size=step_size, scale=scale, lr=lr,
                              weight_decay=weight_decay)
            continue
        n_low = update.to(torch.float32)
        if left is not None and right is not None:  # full: (left·N) first (m×r), then ·right fused
            n_low, left = left.to(torch.float32) @ n_low, None
        a, b = (n_low, right) if right is not None else (left, n_low)
        fused.append((a, b, writable_matrix(param, copies)))
    for operands in same_layout_batches(fused):
        a, b, weight = (tensors[0] for tensors in operands)
        launch_batched(_apply_kernel, APPLY_TILES, operands, a.shape[0], b.shape[1], a.shape[1],
                       (*a.stride(), *b.stride(), *weight.stride()), scalars, HAS_DECAY=weight_decay != 0.0)
    copy_back(copies)
