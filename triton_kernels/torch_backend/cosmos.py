"""COSMOS math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.cosmos`.

What the twin changes (the math is the reference's; only roundings differ, within the
tolerances the kernel tests document in ``tests/kernel_cases.py``):

- :func:`orthogonalize_` runs each Newton–Schulz iteration in Muon's form
  X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ: one ``bmm`` and two ``baddbmm`` whose ``beta``/``alpha``
  are the combination, on the matrices of one (shape, dtype, device) stacked a few at a time,
  no element-wise pass (the reference's X ← a·X + b·A·X + c·A·(A·X) has three GEMMs of X's size
  plus five element-wise passes). Each GEMM rounds once to the iteration dtype (the reference
  rounds after every operation), which in bf16 is on average about half as far from the float64
  iteration (tests/test_cosmos.py; not on every matrix), but not the reference's bits: registry
  trajectories allow for it (``backend_trajectory_atol``). A·A is min(m, n)³ instead of
  min(m, n)²·max(m, n).
- :func:`cosmos_directions_` updates M in place (the reference's rounding: FSDP2 row shards
  step M with the reference's code) and forms Ĝ·c and the residual in one m×n temporary, the
  normalization 1/c folded into the m×r coordinates and the residual's rounding.
- :func:`cosmos_apply_` forms D = γ·√(mn)·O/(‖O‖ + ε) + N·Uᵀ in one temporary (``addmm_``)
  and steps the weight by ``addcmul_`` with a 0-d factor (no host sync).

The subspace tracking (eigh, QR) is the reference's own; the dense AdamW branch is
:func:`memzoo.triton_kernels.torch_backend.galore.adamw_update_`, through the galore family.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from memzoo.reference.cosmos import (
    NS_COEFFICIENTS,
    NS_DTYPES,
    Orthogonalize,
    _check_shapes,
    _compute_dtype,
    check_orthogonalize_arguments,
    cosmos_basis_init,
    cosmos_basis_update,
    frobenius_normalize,
    newton_schulz5,
    power_of_two_scale,
)
from memzoo.reference.cosmos import cosmos_update_ as _reference_update_

__all__ = [
    "NS_COEFFICIENTS",
    "NS_DTYPES",
    "cosmos_apply_",
    "cosmos_basis_init",
    "cosmos_basis_update",
    "cosmos_directions_",
    "cosmos_update_",
    "frobenius_normalize",
    "newton_schulz5",
    "orthogonalize_",
    "power_of_two_scale",
]


@torch.no_grad()
def orthogonalize_(matrices: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], *, steps: int = 5,
                   eps: float = 1e-7) -> None:
    """outputs[i] ← NS5(matrices[i]) in outputs[i]'s dtype, the polynomial of
    :func:`memzoo.reference.cosmos.orthogonalize_` in Muon's association
    X ← a·X + (b·A + c·A·A)·X, A = X·Xᵀ (rows ≤ columns): one ``bmm`` and two ``baddbmm`` per
    iteration, each rounded once to the iteration dtype, on the matrices of one (shape, dtype,
    device) stacked a few at a time (:func:`_batch_size`): on a 2-core CPU, 8 bf16 512×512
    matrices at once take 0.4× the time of one by one (one small product keeps one core busy).
    ``matrices`` and ``outputs`` may be the same tensors."""
    check_orthogonalize_arguments(matrices, outputs, steps)
    a, b, c = NS_COEFFICIENTS
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
    for matrix, output in zip(matrices, outputs):
        transposed = matrix.shape[0] > matrix.shape[1]  # iterated as Xᵀ (rows ≤ columns)
        shape = tuple(matrix.shape[::-1]) if transposed else tuple(matrix.shape)
        groups.setdefault((shape, output.dtype, matrix.device), []).append((matrix, output, transposed))
    for (shape, dtype, device), members in groups.items():
        rows, columns = shape
        if rows * columns == 0:
            for _, output, _ in members:
                output.zero_()  # an empty matrix's NS is itself
            continue
        size = _batch_size(rows * columns, len(members))
        stacked = torch.empty((size, rows, columns), dtype=dtype, device=device)
        following = torch.empty_like(stacked)
        gram = torch.empty((size, rows, rows), dtype=dtype, device=device)
        polynomial = torch.empty_like(gram)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            count = len(chunk)
            x, y, g, p = stacked[:count], following[:count], gram[:count], polynomial[:count]
            for slot, (matrix, _, transposed) in zip(x.unbind(0), chunk):
                if matrix.dtype.itemsize < dtype.itemsize:  # (else ``mul`` would round to the narrower)
                    matrix = matrix.to(dtype)
                # X/(‖X‖_F + eps) in one pass from X as given (the reference first rounds X to the
                # iteration dtype: here the quotient is rounded once, into the stacked slot):
                # ‖X‖ without overflow or underflow (:func:`_frobenius_norm`, so no power-of-two
                # prescaling) and the quotient's factor kept in float32 by ``mul``.
                inverse = 1.0 / (_frobenius_norm(matrix) + eps)
                torch.mul(matrix.T if transposed else matrix,
                          inverse.to(torch.float64 if torch.float64 in (dtype, matrix.dtype) else torch.float32),
                          out=slot)
            for _ in range(steps):
                torch.bmm(x, x.mT, out=g)  # A = X·Xᵀ
                torch.baddbmm(g, g, g, beta=b, alpha=c, out=p)  # b·A + c·A·A
                torch.baddbmm(x, p, x, beta=a, out=y)  # a·X + (b·A + c·A²)·X
                x, y = y, x
            for result, (_, output, transposed) in zip(x.unbind(0), chunk):
                output.copy_(result.T if transposed else result)


# ‖X‖ accumulated in float32 is trusted within these bounds: below 2^60 the sum of squares cannot
# overflow (2^120 < float32's 2^128), above 2^-20 the squares that underflow (each < 2^-126) add up
# to less than 2^-46 of its square (≥ 2^-40) for any matrix under 2^40 elements.
_FLOAT32_NORM_RANGE = (2.0**-20, 2.0**60)


def _frobenius_norm(matrix: torch.Tensor) -> torch.Tensor:
    """‖X‖_F in float64, exact up to rounding for any finite X (no overflow, no underflow). On a
    CPU, a float32 or narrower X is first summed in float32 (4× faster than float64 there) and
    summed again in float64 only when that norm is outside :data:`_FLOAT32_NORM_RANGE` (a host
    check, which costs nothing on a CPU; elsewhere the float64 sum is taken at once, no sync)."""
    if matrix.device.type == "cpu" and matrix.dtype != torch.float64:
        norm = torch.linalg.vector_norm(matrix, dtype=torch.float32)
        low, high = _FLOAT32_NORM_RANGE
        if low <= float(norm) <= high:
            return norm.to(torch.float64)
    return torch.linalg.vector_norm(matrix, dtype=torch.float64)


def _batch_size(elements: int, count: int) -> int:
    """How many matrices of ``elements`` entries one batched product takes: up to 8 and 2²²
    entries (measured on a 2-core CPU, bf16: 8 of 512×512 and 4 of 512×1376 were the fastest;
    all 32 or 24 at once were 1.7× slower, out of cache), at least 1, and even when more than
    one (the batch is split over the threads: 5 of 512×1376 on 2 threads left one idle for a
    fifth of the time; 4 at a time made the 60m preset's Newton–Schulz 5% faster there)."""
    size = max(1, min(count, 8, (1 << 22) // elements))
    return size - size % 2 if size > 1 else size


@torch.no_grad()
def cosmos_directions_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    residual: torch.Tensor | None,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`memzoo.reference.cosmos.cosmos_directions_` in four passes over m×n values (the
    reference makes eight): M ← β1·M ± G in place, then Ĝ·c = G ± β1·M
    (c = 1 + β1·b1) in one m×n temporary, whose projection is subtracted by ``addmm`` and whose
    last pass writes (Ĝ·c − Ĝ·c·U·Uᵀ)/c into the residual's dtype; 1/c is applied to the m×r
    coordinates only. ``maximize`` negates G inside these operations (exact), not as a copy;
    ``projected`` as the reference's."""
    m, n = param.shape
    rank = basis.shape[1]
    _check_shapes(param, (("grad", grad, (m, n)), ("exp_avg", exp_avg, (m, n)), ("exp_avg_sq", exp_avg_sq, (m, rank)),
                          ("basis", basis, (n, rank)), ("residual", residual, (m, n)),
                          ("projected", projected, (m, rank))))
    dtype = _compute_dtype(param, grad, basis)
    g = grad.to(dtype)
    u = basis.to(dtype)
    bias1 = (1.0 - beta1**step) / (1.0 - beta1)
    bias2 = 1.0 - beta2**step
    # (1) M ← β1·M + G (G = −grad when maximizing), in place when M is in the compute dtype,
    # rounded as the reference's expression: the FSDP2 row shards step M with the reference's
    # code, and M is row-local, so the whole tensor's M must have the same bits.
    momentum = exp_avg.mul_(beta1) if exp_avg.dtype == dtype else exp_avg.to(dtype) * beta1
    momentum.add_(g, alpha=-1.0 if maximize else 1.0)
    # (2) V ← β2·V + (1−β2)(GU)²: only the square of G·U is used, so the sign does not matter;
    # the optimizer hands G·U from the basis update (``projected``), which formed it already.
    projected = g @ u if projected is None else projected.to(dtype)
    second = exp_avg_sq.to(dtype) * beta2 + (1.0 - beta2) * projected * projected
    # (3) Ĝ = (G + β1·M)/c, kept as ±(grad ± β1·M) = Ĝ·c·(±1): the factor goes to its uses.
    mixed = torch.sub(g, momentum, alpha=beta1) if maximize else torch.add(g, momentum, alpha=beta1)
    factor = (-1.0 if maximize else 1.0) / (1.0 + beta1 * bias1)
    mixed_low = mixed @ u
    if residual is not None:  # (5) Ĝ − Ĝ·U·Uᵀ
        if residual.dtype == dtype:
            torch.addmm(mixed, mixed_low, u.T, beta=factor, alpha=-factor, out=residual)
        else:  # the scaling and the rounding to the residual's dtype in one pass
            torch.mul(mixed.addmm_(mixed_low, u.T, alpha=-1.0), factor, out=residual)
    if momentum is not exp_avg:
        exp_avg.copy_(momentum)
    exp_avg_sq.copy_(second)
    return mixed_low.mul_(factor).div_(second.sqrt_().div_(math.sqrt(bias2)).add_(eps))  # (4) A = N·Uᵀ


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
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    whole_rows: int | None = None,
) -> None:
    """:func:`memzoo.reference.cosmos.cosmos_apply_` in one m×n temporary and six passes over
    it (the reference makes about ten): D = γ·√(mn)·O/(‖O‖ + ε) + N·Uᵀ (O's conversion, an
    in-place scaling, ``addmm_``), then W ← W·(1 − lr·λ) − lr·ρ·√(mn)·D/(‖D‖ + ε) by ``addcmul_``
    with a 0-d factor (no host sync). ``norm`` and ``whole_rows`` as the reference's (row
    shards)."""
    m, n = param.shape if param.dim() == 2 else (-1, -1)
    _check_shapes(param, (("low_rank", low_rank, (m, basis.shape[-1])), ("basis", basis, (n, basis.shape[-1])),
                          ("orthogonal", orthogonal, (m, n))))
    dtype = _compute_dtype(param, low_rank, basis)
    scale = math.sqrt((m if whole_rows is None else whole_rows) * n)
    frobenius = torch.Tensor.norm if norm is None else norm
    low, u = low_rank.to(dtype), basis.to(dtype)
    if orthogonal is None:
        update = low @ u.T
    else:  # γ·√(mn)·O/(‖O‖ + ε) scaled in place (a tiny γ rounds to 0 as in the reference), + N·Uᵀ
        update = orthogonal.to(dtype, copy=True)
        update.mul_((gamma * scale) / (frobenius(update) + eps)).addmm_(low, u.T)
    coefficient = -(lr * lr_ratio * scale) / (frobenius(update) + eps)
    decay = 1.0 - lr * weight_decay
    if param.dtype == dtype:  # (6) decay first, then the normalized step
        if decay != 1.0:
            param.mul_(decay)
        param.addcmul_(update, coefficient)
    else:
        param.copy_(update.mul_(coefficient).add_(param, alpha=decay))


@torch.no_grad()
def cosmos_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    gamma: float,
    lr_ratio: float,
    weight_decay: float,
    maximize: bool = False,
    ns_dtype: torch.dtype = torch.bfloat16,
    orthogonalize: Orthogonalize | None = None,
    apply: Callable[..., None] | None = None,
    directions: Callable[..., torch.Tensor] | None = None,
) -> None:
    """:func:`memzoo.reference.cosmos.cosmos_update_` with this module's stages (unless given)."""
    _reference_update_(param, grad, exp_avg, exp_avg_sq, basis, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       gamma=gamma, lr_ratio=lr_ratio, weight_decay=weight_decay, maximize=maximize,
                       ns_dtype=ns_dtype, orthogonalize=orthogonalize or orthogonalize_,
                       apply=apply or cosmos_apply_, directions=directions or cosmos_directions_)
