"""APOLLO (Zhu et al. 2025): Adam moments in a random rank-r space only decide how much to scale
the raw gradient, channel by channel (or as a whole tensor), before an SGD-like full-rank step.

Two halves, each with a fused kernel twin in :mod:`memzoo.triton_kernels.apollo`:

1. :func:`apollo_scales_`: R = P(G) with a random projection P, HF-style Adam moments on R
   (m ← β1·m + (1−β1)·R, v ← β2·v + (1−β2)·R², N = m/(√v+ε)), and the scaling factors
   s = ‖N‖/(‖R‖ + 1e-8) per channel or per tensor (paper eq. 6 and §4.2).
2. :func:`apollo_apply_`: S = G ⊙ s, the norm-growth limiter (from Fira: ‖S‖ may grow by at most
   the factor γ per step), √α, then W ← W − η_t·S and W ← W − lr·λ·W (decay after, with the plain
   lr, as the official code does).

Channels: the scaling factor of a channel is the ratio of norms over the rank dimension of R, so
a right projection (R = G·Pᵀ, m×r) gives one factor per row of G and a left projection
(R = Pᵀ·G, r×n) one per column; in the official ``std`` layout this is "along the larger
dimension". The caller picks the granularity through the shape of each ``scales`` tensor:
(m, 1) rows, (1, n) columns, (1, 1) the whole tensor (APOLLO-Mini).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from memzoo.reference.common import as_tensor_list, compute_dtype
from memzoo.reference.galore import (
    FactorList,
    adamw_update_,
    as_matrix,
    check_low_rank_shapes,
    galore_dense_step,
    hf_adam_step_size,
    is_projected,
    low_rank_lists,
    low_rank_setup,
    low_rank_shape,
    moments_,
    next_step_,
    step_copies,
)
from memzoo.reference.projector import project, step_projector_

__all__ = ["NORM_EPS", "adamw_update_", "apollo_apply_", "apollo_scales_", "apply_lists", "check_scales_shape",
           "limit_norm_growth", "norm_growth_divisor_", "norm_ratio"]

# The official code's guard in s = ‖N‖/(‖R‖ + 1e-8) and in the limiter's ‖S‖/(ρ + 1e-8).
NORM_EPS = 1e-8


def check_scales_shape(scales: torch.Tensor, matrix_shape: tuple[int, int], left: torch.Tensor | None,
                       right: torch.Tensor | None) -> str:
    """Which granularity ``scales`` asks for ("tensor", "rows" or "columns"), or ValueError when
    its shape fits neither the matrix nor the side of the projection."""
    m, n = matrix_shape
    if scales.dtype != torch.float32 and scales.dtype != torch.float64:
        raise TypeError(f"scales must be float32 (or float64), got {scales.dtype}")
    if left is not None and right is not None:
        raise ValueError("APOLLO projects one side: got both a left and a right factor")
    if tuple(scales.shape) == (1, 1):
        return "tensor"
    if tuple(scales.shape) == (m, 1) and left is None:
        return "rows"
    if tuple(scales.shape) == (1, n) and right is None:
        return "columns"
    side = "right" if right is not None else "left" if left is not None else "no"
    raise ValueError(
        f"scales has shape {tuple(scales.shape)}; for a {m}×{n} matrix with a {side} projection expected (1, 1)"
        + (f" or ({m}, 1)" if left is None else "") + (f" or (1, {n})" if right is None else "")
    )


def norm_ratio(update: torch.Tensor, low_rank_grad: torch.Tensor, granularity: str) -> torch.Tensor:
    """s = ‖N_c‖/(‖R_c‖ + 1e-8) for each channel c of the low-rank update N and gradient R (APOLLO
    eq. 6; Fira's norm-based scaling, Chen et al. 2024 eq. 7): ``"tensor"`` one (1, 1) ratio of
    Frobenius norms, ``"rows"`` (R is m×r: a right projection) one per row, norms over dim 1,
    ``"columns"`` (R is r×n: a left projection) one per column, norms over dim 0 — always over
    the rank dimension, so the result broadcasts against the full m×n matrix."""
    if granularity == "tensor":
        return (update.norm() / (low_rank_grad.norm() + NORM_EPS)).reshape(1, 1)
    if granularity not in ("rows", "columns"):
        raise ValueError(f"Invalid granularity: {granularity!r}; expected 'tensor', 'rows' or 'columns'")
    dim = 1 if granularity == "rows" else 0
    return update.norm(dim=dim, keepdim=True) / (low_rank_grad.norm(dim=dim, keepdim=True) + NORM_EPS)


def limit_norm_growth(update: torch.Tensor, norm: torch.Tensor, *, growth_limit: float,
                      record_only: bool, size: torch.Tensor | None = None) -> torch.Tensor:
    """Fira's norm-growth limiter (Chen et al. 2024, eq. 9), shared by APOLLO: with ``record_only``
    (a weight's first step) ρ ← ‖S‖ and S is returned as is; otherwise c = max(‖S‖/(ρ + 1e-8),
    γ)/γ, ρ ← ‖S‖/c and S/c is returned, so the norm grows by at most the factor γ per step.
    ``norm`` is the 0-d tensor ρ, written in place; no host synchronisation. ``size`` (0-d) is
    ‖S‖ when ``update`` is only part of S (a row shard: the norm all-reduced over the shards)."""
    size = update.norm() if size is None else size.to(update.dtype)
    if record_only:
        norm.copy_(size)
        return update
    return update / norm_growth_divisor_(size, norm, growth_limit=growth_limit)


def norm_growth_divisor_(size: torch.Tensor, norm: torch.Tensor, *, growth_limit: float) -> torch.Tensor:
    """The limiter's divisor c = max(‖S‖/(ρ + 1e-8), γ)/γ from ``size`` = ‖S‖ (0-d), with ρ ← ‖S‖/c
    written into ``norm``: for callers that fold 1/c into a coefficient instead of dividing S."""
    limit = torch.clamp(size / (norm.to(size.dtype) + NORM_EPS), min=growth_limit) / growth_limit
    norm.copy_(size / limit)
    return limit


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
    """For each matrix: R = project(G) (−G when maximizing), the moments updated in place, and
    the scaling factors s = ‖N‖/(‖R‖ + 1e-8), N = m/(√v+ε), written into ``scales`` (fp32, shape
    (1, 1), (m, 1) or (1, n): see the module docstring). ``grads`` are read as
    (shape[0], rest) matrices; ``exp_avgs``/``exp_avg_sqs`` have R's shape; one factor per
    matrix on one side (``lefts`` m×r or ``rights`` r×n)."""
    (grads, exp_avgs, exp_avg_sqs, scales), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, scales=scales, lefts=lefts, rights=rights)
    for grad, exp_avg, exp_avg_sq, scale, left, right in zip(grads, exp_avgs, exp_avg_sqs, scales, lefts, rights):
        if grad.dim() < 2:
            raise ValueError(f"APOLLO scales ≥2-D gradients, got shape {tuple(grad.shape)}")
        check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        g = as_matrix(grad, grad.shape[0])
        granularity = check_scales_shape(scale, tuple(g.shape), left, right)
        dtype = compute_dtype(grad.dtype, exp_avg.dtype, scale.dtype)
        g = g.to(dtype)
        if maximize:
            g = -g
        r = project(g, None if left is None else left.to(dtype), None if right is None else right.to(dtype))
        m = exp_avg.to(dtype) * beta1 + r * (1.0 - beta1)  # m ← β1·m + (1 − β1)·R
        v = exp_avg_sq.to(dtype) * beta2 + r * r * (1.0 - beta2)  # v ← β2·v + (1 − β2)·R²
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        n = m / (v.sqrt() + eps)  # N = m / (√v + ε), from the unrounded moments
        scale.copy_(norm_ratio(n, r, granularity).reshape(scale.shape))


def apply_lists(params: torch.Tensor | Sequence[torch.Tensor], grads: torch.Tensor | Sequence[torch.Tensor],
                scales: torch.Tensor | Sequence[torch.Tensor] | None,
                limiter_norms: torch.Tensor | Sequence[torch.Tensor] | None,
                growth_limit: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list, list]:
    """The arguments of :func:`apollo_apply_` (and of Fira's apply, which computes its scales
    itself: ``scales`` None) as checked lists (``scales`` or ``limiter_norms`` None becomes a
    list of Nones); ValueError naming the first problem, before anything is written."""
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    scales = [None] * len(params) if scales is None else as_tensor_list("scales", scales)
    norms = [None] * len(params) if limiter_norms is None else as_tensor_list("limiter_norms", limiter_norms)
    if not len(params) == len(grads) == len(scales) == len(norms):
        raise ValueError(f"tensor lists differ in length: params {len(params)}, grads {len(grads)}, "
                         f"scales {len(scales)}, limiter_norms {len(norms)}")
    if growth_limit < 1.0:
        raise ValueError(f"growth_limit must be ≥ 1, got {growth_limit}")
    for index, (param, grad, factor, norm) in enumerate(zip(params, grads, scales, norms)):
        if grad.shape != param.shape or param.dim() < 2:
            raise ValueError(f"grads[{index}] has shape {tuple(grad.shape)}, params[{index}] {tuple(param.shape)} "
                             "(the scaled low-rank updates take ≥2-D weights)")
        if not param.is_floating_point() or not grad.is_floating_point():
            raise TypeError(f"params[{index}] and grads[{index}] must be floating point")
        matrix = (param.shape[0], param[0].numel())
        if factor is not None and (factor.dim() != 2
                                   or any(f not in (1, size) for f, size in zip(factor.shape, matrix))):
            raise ValueError(f"scales[{index}] has shape {tuple(factor.shape)}, not broadcastable to {matrix}")
        if norm is not None and (norm.shape != () or norm.dtype != torch.float32):
            raise ValueError(f"limiter_norms[{index}] must be a 0-d float32 tensor, got {tuple(norm.shape)} {norm.dtype}")
    return params, grads, scales, norms


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
    """For each matrix W (read as (shape[0], rest)) with gradient G and factors s:

    S = G ⊙ s (−G when maximizing); with ``scale_front``, S ← √α·S here. Norm-growth limiter
    when ``limiter_norms`` is given (0-d fp32 tensors ρ, updated in place): with
    ``record_only`` (the first step) ρ ← ‖S‖; otherwise c = max(‖S‖/(ρ + 1e-8), γ)/γ,
    S ← S/c, ρ ← ‖S‖ (the limited norm). Without ``scale_front``, S ← √α·S now. Then
    W ← W − step_size·S and W ← W − lr·λ·W. ``scale`` is α (it enters as √α, as officially)."""
    params, grads, scales, norms = apply_lists(params, grads, scales, limiter_norms, growth_limit)
    root_alpha = math.sqrt(scale)
    for param, grad, factor, norm in zip(params, grads, scales, norms):
        g = as_matrix(grad, grad.shape[0])
        dtype = compute_dtype(param.dtype, grad.dtype)
        s = g.to(dtype) * factor.to(dtype)  # S = G ⊙ s
        if maximize:
            s = -s
        if scale_front:
            s = s * root_alpha
        if norm is not None:
            s = limit_norm_growth(s, norm, growth_limit=growth_limit, record_only=record_only)
        if not scale_front:
            s = s * root_alpha
        w = as_matrix(param, param.shape[0]).to(dtype) - step_size * s
        if weight_decay != 0.0:
            w = w - (lr * weight_decay) * w
        param.copy_(w.reshape(param.shape))


# -- Whole steps: one weight's step as the optimizer composes it (the truth for optim/) ------
# (The conventions of reference/galore.py's whole-step section.)


@torch.no_grad()
def apollo_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool, rank: int | None,
                update_proj_gap: int, scale: float, proj_type: str, projector: str, power_iters: int,
                oversample: int, strict_rank: bool, state_dtype: torch.dtype | None, scale_type: str,
                scale_front: bool, disable_nl: bool, growth_limit: float,
                maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One APOLLO (or APOLLO-Mini) step of one weight (Zhu et al. 2025), 32-bit moments: the new
    weight and state. ``projector`` is the group key the official ``proj`` is stored under.
    Unprojected weights: GaLore's dense branch (:func:`~memzoo.reference.galore.galore_dense_step`)."""
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
    if not is_projected(param, rank):
        return galore_dense_step(param, grad, state, state_dtype=state_dtype, maximize=maximize, **hyper)
    param, state = step_copies(param, state)
    shape, side, rank = low_rank_setup(param, rank=rank, proj_type=proj_type, strict_rank=strict_rank,
                                       projector=projector)
    step = next_step_(state)
    # §4: a new random projection P every T steps (regenerated from its seed on every step)
    left, right, _ = step_projector_(state, grad.reshape(shape), step=step, base_seed=seed, rank=rank, side=side,
                                     method=projector, update_proj_gap=update_proj_gap, power_iters=power_iters,
                                     oversample=oversample, signs="raw", maximize=maximize, dtype=param.dtype)
    exp_avg, exp_avg_sq = moments_(state, low_rank_shape(shape, left, right), state_dtype or param.dtype, param.device)
    m, n = shape
    # One factor per channel (a row of G for a right projection, a column for a left one), or one per tensor,
    # in the math's dtype (float64 for float64 weights).
    scales = torch.empty((1, 1) if scale_type == "tensor" else (m, 1) if side == "right" else (1, n),
                         dtype=compute_dtype(param.dtype), device=param.device)
    # R = P(G); m, v ← β·(m, v) + (1 − β)·(R, R²); eq. 6: s = ‖N‖/‖R‖ per channel, N = m/(√v + ε)
    apollo_scales_(grad, exp_avg, exp_avg_sq, scales, lefts=left, rights=right, beta1=betas[0], beta2=betas[1],
                   eps=eps, maximize=maximize)
    record = not disable_nl and "limiter_norm" not in state  # the limiter's first step records ‖S‖ only
    if record:
        state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=param.device)
    # S = G ⊙ s; the norm-growth limiter ‖S‖ ≤ γ·ρ; W ← W − η_t·√α·S; then W ← W − lr·λ·W
    apollo_apply_(param, grad, scales, None if disable_nl else state["limiter_norm"],
                  step_size=hf_adam_step_size(lr, betas, correct_bias, step + 1), scale=scale, lr=lr,
                  weight_decay=weight_decay, growth_limit=growth_limit, record_only=record, scale_front=scale_front,
                  maximize=maximize)
    return param, state
