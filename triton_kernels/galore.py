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
("tf32" on GPUs: ~1e-3 relative error in R and P·N, the price of 8× the fp32 matmul rate; the
interpreter computes in full fp32); sqrt and division are IEEE (``sqrt_rn``/``div_rn``) so the
epilogue matches the reference's rounding.

Status: checked against the reference through Triton's interpreter only; ``AUTO = False`` keeps
``backend="auto"`` on the reference until the kernels are compiled and timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.galore import as_matrix, check_low_rank_shapes, natural_gradient, project
from memzoo.reference.galore import galore_adam_project_ as _reference_adam_project_
from memzoo.reference.galore import galore_apply_ as _reference_apply_
from memzoo.triton_kernels.multi_tensor import ceil_div, launch_elementwise, tensor_block, to_storage

__all__ = ["AUTO", "INTERPRETED", "PRECISION", "adamw_update_", "galore_adam_project_", "galore_apply_",
           "natural_gradient", "project"]

AUTO = False
PRECISION = "tf32"
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
ADAMW_BLOCK = 2048  # 28 bytes per fp32 element: 56 KB of traffic per program
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """This program's BLOCK_M×BLOCK_N tile of A·B (fp32 accumulator), row/column offsets, mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :].to(tl.int64) * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return acc, rows[:, None].to(tl.int64), cols[None, :].to(tl.int64), mask


@triton.jit
def _project_adam_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, out_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_mm, stride_mn, stride_vm, stride_vn, stride_om, stride_on,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    MAXIMIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r, rows, cols, mask = _gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if MAXIMIZE:
        r = -r
    m_ptrs = m_ptr + rows * stride_mm + cols * stride_mn
    v_ptrs = v_ptr + rows * stride_vm + cols * stride_vn
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32) * beta1 + r * one_minus_beta1  # m ← β1·m + (1−β1)·R
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32) * beta2 + r * r * one_minus_beta2  # v ← β2·v + (1−β2)·R²
    tl.store(m_ptrs, to_storage(m, m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, to_storage(v, v_ptr.dtype.element_ty), mask=mask)
    update = tl.div_rn(m, tl.sqrt_rn(v) + eps)  # N = m / (√v + ε)
    tl.store(out_ptr + rows * stride_om + cols * stride_on, update.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    a_ptr, b_ptr, w_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_wm, stride_wn,
    coefficient, decay,
    HAS_DECAY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    back, rows, cols, mask = _gemm_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
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
    MAXIMIZE: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr,
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
    w = tl.load(p_base + p_offs, mask=mask, other=0.0).to(tl.float32) - step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if HAS_DECAY:
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
) -> None:
    """Same contract as :func:`memzoo.reference.galore.adamw_update_`: one multi-tensor launch
    per (device, dtypes) bucket, each element read once (p, g, m, v) and written once (p, m, v)."""
    launch_elementwise(
        _adamw_kernel, {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
        written=[True, False, True, True], block=ADAMW_BLOCK, dtypes=_SUPPORTED, num_warps=8,
        align_names=("P_ALIGN", "G_ALIGN", "M_ALIGN", "V_ALIGN"),
        scalars=(step_size, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr * weight_decay),
        MAXIMIZE=maximize, HAS_DECAY=weight_decay != 0.0,
    )


def _grid(m: int, n: int) -> tuple[int, int]:
    return ceil_div(m, BLOCK_M), ceil_div(n, BLOCK_N)


@torch.no_grad()
def galore_adam_project_(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    update: torch.Tensor,
    *,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_adam_project_`."""
    if left is None and right is None:
        return _reference_adam_project_(grad, exp_avg, exp_avg_sq, update, left=None, right=None, beta1=beta1,
                                        beta2=beta2, eps=eps, maximize=maximize)
    check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, update=update)
    g = as_matrix(grad, grad.shape[0])
    if left is not None and right is not None:  # full: T = leftᵀ·G first (r×n), then T·rightᵀ fused
        g, left = left.T.to(torch.float32) @ g.to(torch.float32), None
    if right is not None:  # R = G·rightᵀ: A = G (m×n), B = rightᵀ (n×r)
        a, b = g, right.T
    else:  # R = leftᵀ·G: A = leftᵀ (r×m), B = G (m×n)
        a, b = left.T, g
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    _project_adam_kernel[_grid(m, n)](
        a, b, exp_avg, exp_avg_sq, update, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
        update.stride(0), update.stride(1),
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        MAXIMIZE=maximize, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=PRECISION,
    )


@torch.no_grad()
def galore_apply_(
    param: torch.Tensor,
    update: torch.Tensor,
    *,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_apply_`. The weight is written in
    place through its strides; a ≥3-D weight that cannot be viewed as a matrix goes through a copy."""
    if left is None and right is None:
        return _reference_apply_(param, update, left=None, right=None, step_size=step_size, scale=scale, lr=lr,
                                 weight_decay=weight_decay)
    check_low_rank_shapes(param.shape, left, right, update=update)
    n_low = update.to(torch.float32)
    if left is not None and right is not None:  # full: (left·N) first (m×r), then ·right fused
        n_low, left = left.to(torch.float32) @ n_low, None
    a, b = (n_low, right) if right is not None else (left, n_low)
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    copied = False
    try:
        weight = param if param.dim() == 2 else param.view(m, n)
    except RuntimeError:  # not viewable as m×n: copy in, copy out
        weight, copied = param.reshape(m, n).clone(), True
    _apply_kernel[_grid(m, n)](
        a, b, weight, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), weight.stride(0), weight.stride(1),
        step_size * scale, lr * weight_decay,
        HAS_DECAY=weight_decay != 0.0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=PRECISION,
    )
    if copied:
        param.copy_(weight.reshape(param.shape))
