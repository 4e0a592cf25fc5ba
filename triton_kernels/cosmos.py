"""COSMOS's Newton–Schulz orthogonalization as batched Triton GEMMs; twin of
:mod:`memzoo.reference.cosmos`.

``orthogonalize_`` runs Muon's quintic iteration on every matrix of a call at once: matrices of
one shape form one batch (grid axis 2), and each iteration is three launches,
A = X·Xᵀ (symmetric: only the tiles on and above the diagonal are computed, each written to both
halves), P = A·X, and X' = a·X + b·P + c·A·P with the whole combination in the GEMM's epilogue,
rounded op by op as the reference's PyTorch expression is (so a bf16 iteration follows it; one
rounding instead would be about twice as close to the float64 iteration, but another
trajectory). Operands are multiplied with fp32 accumulation: for bf16 (the official dtype)
through TF32 products, exact for bf16 operands; for fp32 in IEEE fp32.

``cosmos_apply_`` is the fused subspace/complement update into the weight: D = N·Uᵀ + γ'·O is
recomputed tile by tile in two GEMM passes (the first reduces ‖D‖², the second writes
W ← W·(1 − lr·λ) − c·D/(‖D‖ + ε) in place), so neither D nor A = N·Uᵀ exists as an m×n tensor.
The subspace tracking (eigh, QR) and the direction stage stay with PyTorch (re-exported from the
reference), and ``cosmos_update_`` is the reference's step with these kernels.

Status: interpreter-tested only; ``AUTO = False`` until checked and timed on a GPU.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.cosmos import (
    NS_COEFFICIENTS,
    check_orthogonalize_arguments,
    cosmos_basis_init,
    cosmos_basis_update,
    cosmos_directions_,
    frobenius_normalize,
)
from memzoo.reference.cosmos import _check_shapes as _reference_check
from memzoo.reference.cosmos import cosmos_update_ as _reference_update_
from memzoo.triton_kernels.galore import Tiles, gemm_tile, matrix_pointer
from memzoo.triton_kernels.multi_tensor import ceil_div, operand_offsets, to_storage

__all__ = ["AUTO", "INTERPRETED", "cosmos_apply_", "cosmos_basis_init", "cosmos_basis_update", "cosmos_directions_",
           "cosmos_update_", "orthogonalize_"]

AUTO = False
# Square tiles (the symmetric product mirrors a tile across the diagonal); not tuned on a GPU yet.
TILES = Tiles(64, 64, 64, 4, 3)
INTERPRETER_TILES = Tiles(32, 32, 32, 4, 1)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to ``dtype`` and widened again: one PyTorch op's result in that dtype."""
    return to_storage(x, dtype).to(tl.float32)


@triton.jit
def _ns_gemm_kernel(
    a_ptr, b_ptr, d_ptr, e_ptr, c_ptr, offsets, num_matrices, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_dm, stride_dn, stride_em, stride_en, stride_cm, stride_cn,
    alpha, beta, gamma,
    HAS_D: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """C = gamma·E + beta·D + alpha·A·B per matrix of the batch, each product and sum rounded
    to C's dtype in the reference's order (``a*x + b*p + c*(A@p)`` in PyTorch: the epilogue adds
    no rounding of its own, so a bf16 iteration follows the reference's). SYMMETRIC: A·B is
    symmetric (A·Aᵀ), so programs below the diagonal do nothing and the others write their tile
    twice."""
    if (not SYMMETRIC) or tl.program_id(1) >= tl.program_id(0):
        a = matrix_pointer(a_ptr, offsets, num_matrices, 0)
        b = matrix_pointer(b_ptr, offsets, num_matrices, 1)
        c = matrix_pointer(c_ptr, offsets, num_matrices, 4)
        acc, rows, cols, mask = gemm_tile(a, b, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        dtype = c_ptr.dtype.element_ty
        out = _rounded(acc, dtype)
        if alpha != 1.0:
            out = _rounded(alpha * out, dtype)
        if HAS_D:  # gamma·E + beta·D, then + alpha·A·B (HAS_D implies HAS_E here)
            d = matrix_pointer(d_ptr, offsets, num_matrices, 2)
            e = matrix_pointer(e_ptr, offsets, num_matrices, 3)
            scaled_e = _rounded(gamma * tl.load(e + rows * stride_em + cols * stride_en, mask=mask, other=0.0)
                                .to(tl.float32), dtype)
            scaled_d = _rounded(beta * tl.load(d + rows * stride_dm + cols * stride_dn, mask=mask, other=0.0)
                                .to(tl.float32), dtype)
            out = _rounded(scaled_e + scaled_d, dtype) + out
        out = to_storage(out, dtype)
        tl.store(c + rows * stride_cm + cols * stride_cn, out, mask=mask)
        if SYMMETRIC and tl.program_id(1) > tl.program_id(0):
            tl.store(c + cols * stride_cm + rows * stride_cn, out, mask=mask)  # the mirrored tile


@triton.jit
def _direction_tile(n_ptr, u_ptr, o_ptr, onorm_ptr, M, N, R, stride_nm, stride_nr, stride_um, stride_ur, stride_om,
                    stride_on, orthogonal_weight, HAS_O: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of D = N·Uᵀ + (γ·√(mn))·O/(‖O‖ + ε), in the reference's op order."""
    acc, rows, cols, mask = gemm_tile(n_ptr, u_ptr, M, N, R, stride_nm, stride_nr, stride_ur, stride_um,
                                      BLOCK_M, BLOCK_N, BLOCK_K, "ieee")
    if HAS_O:
        o = tl.load(o_ptr + rows * stride_om + cols * stride_on, mask=mask, other=0.0).to(tl.float32)
        acc = acc + tl.div_rn(orthogonal_weight * o, tl.load(onorm_ptr))
    return acc, rows, cols, mask


@triton.jit
def _direction_norm_kernel(n_ptr, u_ptr, o_ptr, onorm_ptr, partial_ptr, M, N, R, stride_nm, stride_nr, stride_um,
                           stride_ur, stride_om, stride_on, orthogonal_weight, HAS_O: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ D² over this program's tile, into partial[program] (summed in a fixed order after)."""
    d, _, _, mask = _direction_tile(n_ptr, u_ptr, o_ptr, onorm_ptr, M, N, R, stride_nm, stride_nr, stride_um,
                                    stride_ur, stride_om, stride_on, orthogonal_weight, HAS_O,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    d = tl.where(mask, d, 0.0)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(d * d, 1), 0))


@triton.jit
def _apply_kernel(w_ptr, n_ptr, u_ptr, o_ptr, onorm_ptr, norm_ptr, M, N, R, stride_wm, stride_wn, stride_nm,
                  stride_nr, stride_um, stride_ur, stride_om, stride_on, orthogonal_weight, decay, step_scale, eps,
                  HAS_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W ← W·(1 − lr·λ) − (lr·ρ·√(mn))·D/(‖D‖ + ε), D recomputed tile by tile: no m×n temporary."""
    d, rows, cols, mask = _direction_tile(n_ptr, u_ptr, o_ptr, onorm_ptr, M, N, R, stride_nm, stride_nr, stride_um,
                                          stride_ur, stride_om, stride_on, orthogonal_weight, HAS_O,
                                          BLOCK_M, BLOCK_N, BLOCK_K)
    denominator = tl.sqrt_rn(tl.load(norm_ptr)) + eps
    w_ptrs = w_ptr + rows * stride_wm + cols * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) * decay
    w = w - tl.div_rn(step_scale * d, denominator)
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty), mask=mask)


INTERPRETED: bool = isinstance(_ns_gemm_kernel, InterpretedFunction)


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0, d: torch.Tensor | None = None,
          beta: float = 0.0, e: torch.Tensor | None = None, gamma: float = 0.0, symmetric: bool = False) -> None:
    """out[i] = gamma·e[i] + beta·d[i] + alpha·a[i]·b[i] for 3-D batches (any strides; d and e
    together or not at all)."""
    if (d is None) != (e is None):
        raise ValueError("the epilogue takes d and e together")
    batch, m, k = a.shape
    n = b.shape[2]
    tiles = INTERPRETER_TILES if INTERPRETED else TILES
    d_, e_ = (d, e) if d is not None else (out, out)  # placeholders the epilogue does not read
    offsets = operand_offsets([list(a), list(b), list(d_), list(e_), list(out)], out.device)
    grid = (ceil_div(m, tiles.block_m), ceil_div(n, tiles.block_n), batch)
    precision = "ieee" if out.dtype == torch.float32 else "tf32"
    _ns_gemm_kernel[grid](
        a, b, d_, e_, out, offsets, batch, m, n, k,
        a.stride(1), a.stride(2), b.stride(1), b.stride(2), d_.stride(1), d_.stride(2), e_.stride(1), e_.stride(2),
        out.stride(1), out.stride(2), alpha, beta, gamma,
        HAS_D=d is not None, SYMMETRIC=symmetric,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


_SUPPORTED = (torch.bfloat16, torch.float32)


@torch.no_grad()
def orthogonalize_(matrices: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], *, steps: int = 5,
                   eps: float = 1e-7) -> None:
    """Same contract as :func:`memzoo.reference.cosmos.orthogonalize_` for bf16 and fp32 outputs
    (one batched iteration per (shape, dtype, device) of the call)."""
    matrices, outputs = list(matrices), list(outputs)
    check_orthogonalize_arguments(matrices, outputs, steps)
    for index, output in enumerate(outputs):
        if output.dtype not in _SUPPORTED:
            raise TypeError(f"outputs[{index}] is {output.dtype}; the Triton iteration runs in {_SUPPORTED}")
    a, b, c = NS_COEFFICIENTS
    batches: dict[tuple, list[int]] = defaultdict(list)
    for index, (matrix, output) in enumerate(zip(matrices, outputs)):
        if matrix.numel():
            batches[(tuple(matrix.shape), output.dtype, output.device)].append(index)
        else:
            output.zero_()
    for (shape, dtype, device), indices in batches.items():
        x = torch.stack([matrices[i].to(device=device, dtype=dtype) for i in indices])
        # X / (‖X‖_F + eps) in the iteration dtype, as the reference (the same overflow-safe torch code).
        x = frobenius_normalize(x, eps=eps, dim=(1, 2))
        transposed = shape[0] > shape[1]
        if transposed:
            x = x.transpose(1, 2)
        rows = x.shape[1]
        x = x.contiguous()
        gram = torch.empty((len(indices), rows, rows), dtype=dtype, device=device)
        product = torch.empty_like(x)
        spare = torch.empty_like(x)
        for _ in range(steps):
            _gemm(x, x.transpose(1, 2), gram, symmetric=True)  # A = X·Xᵀ
            _gemm(gram, x, product)  # P = A·X
            _gemm(gram, product, spare, alpha=c, d=product, beta=b, e=x, gamma=a)  # X' = a·X + b·P + c·A·P
            x, spare = spare, x
        result = x.transpose(1, 2) if transposed else x
        for position, index in enumerate(indices):
            outputs[index].copy_(result[position])


_APPLY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def cosmos_apply_(
    param: torch.Tensor,
    low_rank: torch.Tensor,
    basis: torch.Tensor,
    orthogonal: torch.Tensor | None,
    *,
    lr: float,
    lr_ratio: float,
    gamma: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`memzoo.reference.cosmos.cosmos_apply_`: two GEMM passes of
    N·Uᵀ (+ the orthogonal part in the epilogue), the first reducing ‖D‖² in per-tile partials
    (summed in a fixed order, no atomics, no host sync), the second writing the weight in place."""
    m, n = param.shape if param.dim() == 2 else (-1, -1)
    _reference_check(param, (("low_rank", low_rank, (m, basis.shape[-1])), ("basis", basis, (n, basis.shape[-1])),
                             ("orthogonal", orthogonal, (m, n))))
    if param.dtype not in _APPLY_DTYPES:
        raise TypeError(f"param is {param.dtype}; the kernel updates {_APPLY_DTYPES} weights")
    if param.numel() == 0:
        return
    rank = basis.shape[1]
    factors = low_rank.to(torch.float32), basis.to(torch.float32)
    scale = math.sqrt(m * n)
    if orthogonal is not None:  # as the reference: o / (‖o‖ + ε), the norm of o widened to fp32
        o, orthogonal_norm = orthogonal, (orthogonal.float().norm() + eps).reshape(1)
    else:
        o, orthogonal_norm = param, torch.ones(1, dtype=torch.float32, device=param.device)
    tiles = INTERPRETER_TILES if INTERPRETED else TILES
    grid = (ceil_div(m, tiles.block_m), ceil_div(n, tiles.block_n))
    shapes = (m, n, rank)
    strides = (factors[0].stride(0), factors[0].stride(1), factors[1].stride(0), factors[1].stride(1), o.stride(0),
               o.stride(1))
    launch = dict(HAS_O=orthogonal is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=param.device)
    _direction_norm_kernel[grid](factors[0], factors[1], o, orthogonal_norm, partials, *shapes, *strides,
                                 gamma * scale, **launch)
    squared_norm = partials.sum().reshape(1)
    _apply_kernel[grid](param, factors[0], factors[1], o, orthogonal_norm, squared_norm, *shapes, param.stride(0),
                        param.stride(1), *strides, gamma * scale, 1.0 - lr * weight_decay, lr * lr_ratio * scale, eps,
                        **launch)


cosmos_update_ = functools.partial(_reference_update_, orthogonalize=orthogonalize_, apply=cosmos_apply_)
cosmos_update_.__doc__ = ("Same contract as :func:`memzoo.reference.cosmos.cosmos_update_`, with the Newton–Schulz "
                          "iteration and the weight update on the Triton kernels.")
