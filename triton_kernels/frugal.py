"""FRUGAL's split update as one kernel; twin of :mod:`memzoo.reference.frugal`.

``frugal_apply_`` computes, per tile of W, the two back-projections that share a factor —
up(N) (the state-full Adam update) and up(R) (the part of G inside the subspace, R = down(G)) —
in one K-loop over the subspace dimension, and the epilogue reads G and W once:
W ← W·(1 − decay) − η·up(N) − η_free·φ(G − up(R)). No m×n temporary.

up(R) is multiplied in IEEE fp32 whatever GaLore's PRECISION: with coordinate (0/1) factors it
is then exactly G on the selected coordinates, so their residual is exactly 0 and sign(0) = 0
keeps them off signSGD (TF32 truncation of R would make it ±1 there). R itself comes from a
torch matmul (IEEE fp32 by default), a small m×r or r×n temporary.

The moments and N come from GaLore's fused projection kernel, re-exported here.
:func:`frugal_coordinates_step_` (coordinate subspaces given as indices) is the reference's
composition of these two kernels with 0/1 factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from memzoo.reference.frugal import (
    RESIDUAL_RULES,
    coordinate_step_lists,
    residual_kept,
    run_coordinates_step,
    split_update_lists,
)
from memzoo.reference.galore import FactorList, as_matrix
from memzoo.reference.projector import project
from memzoo.triton_kernels.galore import (
    APPLY_TILES,
    INTERPRETED,
    adamw_update_,
    copy_back,
    galore_adam_project_,
    launch_batched,
    matrix_pointer,
    same_layout_batches,
    writable_matrix,
)
from memzoo.triton_kernels.multi_tensor import sign, to_storage

__all__ = ["AUTO", "INTERPRETED", "adamw_update_", "frugal_apply_", "frugal_coordinates_step_", "galore_adam_project_"]

# Selected by backend="triton" only until validated on a GPU.
AUTO = False
_RULE_CODES = {rule: code for code, rule in enumerate(RESIDUAL_RULES)}  # sign_sgd 0, sgd 1, no 2


@triton.jit
def _split_update_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, w_ptr, g_ptr, kept_ptr, offsets, num_matrices, M, N, K,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_wm, stride_wn, stride_gm, stride_gn,
    step_size, residual_step, keep,
    RULE: tl.constexpr, MAXIMIZE: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """W ← keep·W − step_size·(A1·B1) − residual_step·φ(G − A2·B2) on this program's tile
    (with THRESHOLD, the signSGD term times the matrix's 0/1 ``kept`` flag)."""
    a1_ptr = matrix_pointer(a1_ptr, offsets, num_matrices, 0)
    b1_ptr = matrix_pointer(b1_ptr, offsets, num_matrices, 1)
    a2_ptr = matrix_pointer(a2_ptr, offsets, num_matrices, 2)
    b2_ptr = matrix_pointer(b2_ptr, offsets, num_matrices, 3)
    w_ptr = matrix_pointer(w_ptr, offsets, num_matrices, 4)
    g_ptr = matrix_pointer(g_ptr, offsets, num_matrices, 5)
    kept_ptr = matrix_pointer(kept_ptr, offsets, num_matrices, 6)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    wrapped_rows = (rows % M)[:, None].to(tl.int64)
    wrapped_cols = (cols % N)[None, :].to(tl.int64)
    update = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    inside = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_row = (k0 + ks)[None, :]
        k_col = (k0 + ks)[:, None]
        a1 = tl.load(a1_ptr + wrapped_rows * stride_a1m + k_row * stride_a1k, mask=k_row < K, other=0.0)
        b1 = tl.load(b1_ptr + k_col * stride_b1k + wrapped_cols * stride_b1n, mask=k_col < K, other=0.0)
        a2 = tl.load(a2_ptr + wrapped_rows * stride_a2m + k_row * stride_a2k, mask=k_row < K, other=0.0)
        b2 = tl.load(b2_ptr + k_col * stride_b2k + wrapped_cols * stride_b2n, mask=k_col < K, other=0.0)
        update = tl.dot(a1.to(tl.float32), b1.to(tl.float32), update, input_precision=PRECISION)  # up(N)
        inside = tl.dot(a2.to(tl.float32), b2.to(tl.float32), inside, input_precision="ieee")  # up(down(G))
    rows = rows[:, None].to(tl.int64)
    cols = cols[None, :].to(tl.int64)
    mask = (rows < M) & (cols < N)
    w_ptrs = w_ptr + rows * stride_wm + cols * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) * keep - step_size * update
    if RULE != 2:
        g = tl.load(g_ptr + rows * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        residual = g - inside  # E = G − up(down(G))
        if RULE == 0:
            residual = sign(residual)  # sign(E); NaN for a non-finite E
            if THRESHOLD:
                residual = residual * tl.load(kept_ptr)  # 0 when E is below the threshold
        w = w - residual_step * residual
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty), mask=mask)


@torch.no_grad()
def frugal_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    step_size: float,
    residual_step: float,
    residual_rule: str,
    decay: float,
    maximize: bool = False,
    residual_threshold: float = 0.0,
) -> None:
    """Same contract as :func:`memzoo.reference.frugal.frugal_apply_`: one launch per group of
    same-shaped matrices; ≥3-D weights that cannot be viewed as matrices go through a copy."""
    params, grads, updates, lefts, rights = split_update_lists(params, grads, updates, lefts, rights, residual_rule,
                                                               residual_threshold)
    threshold = residual_threshold > 0 and residual_rule == "sign_sgd"
    fused, copies = [], []
    for param, grad, update, left, right in zip(params, grads, updates, lefts, rights):
        m = param.shape[0]
        g = as_matrix(grad, m)
        factor = (left if left is not None else right).to(torch.float32)
        # R = down(G) for the residual, in IEEE fp32, of the signed gradient (as the kernel's G).
        signed = -g.to(torch.float32) if maximize else g.to(torch.float32)
        inside = project(signed, factor if left is not None else None, factor if right is not None else None)
        n_low = update.to(torch.float32)
        weight = writable_matrix(param, copies)
        # The same decision as the reference's, from the same R; unused (W as a stand-in) without a threshold.
        kept = (residual_kept(signed, inside, factor if left is not None else None,
                              factor if right is not None else None, residual_threshold) if threshold else weight)
        if right is not None:  # up(X) = X·P: A = N or R (m×r), B = P (r×n)
            fused.append((n_low, factor, inside, factor, weight, g, kept))
        else:  # up(X) = P·X: A = P (m×r), B = N or R (r×n)
            fused.append((factor, n_low, factor, inside, weight, g, kept))
    for operands in same_layout_batches(fused):
        a1, b1, a2, b2, weight, g, _ = (tensors[0] for tensors in operands)
        strides = (*a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), *weight.stride(), *g.stride())
        launch_batched(_split_update_kernel, APPLY_TILES, operands, weight.shape[0], weight.shape[1], a1.shape[1],
                       strides, (step_size, residual_step, 1.0 - decay), RULE=_RULE_CODES[residual_rule],
                       MAXIMIZE=maximize, THRESHOLD=threshold)
    copy_back(copies)


@torch.no_grad()
def frugal_coordinates_step_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | Sequence[torch.Tensor],
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    residual_step: float,
    residual_rule: str,
    decay: float,
    maximize: bool = False,
    residual_threshold: float = 0.0,
) -> None:
    """Same contract as :func:`memzoo.reference.frugal.frugal_coordinates_step_`: its composition,
    with the projection kernel and :func:`frugal_apply_` (IEEE fp32 products with the 0/1 factors)."""
    lists = coordinate_step_lists(params, grads, exp_avgs, exp_avg_sqs, indices, side, residual_rule,
                                  residual_threshold)
    run_coordinates_step(galore_adam_project_, frugal_apply_, *lists, side=side, beta1=beta1, beta2=beta2, eps=eps,
                         step_size=step_size, residual_step=residual_step, residual_rule=residual_rule, decay=decay,
                         maximize=maximize, residual_threshold=residual_threshold)
