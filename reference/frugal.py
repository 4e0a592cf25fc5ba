"""FRUGAL (Zmushko et al. 2024): each gradient split into a state-full part in a low-dimensional
subspace, updated by Adam, and the state-free remainder, updated by signSGD (or SGD).

For a weight W with gradient G and a subspace given by factors (GaLore's orthonormal bases, or
coordinate selections as 0/1 factors), down(G) = R and up(·) its back-projection:

    W ← W·(1 − lr·λ)                                   (decoupled decay first, on every weight)
    W ← W − η_t·up(N),  N = m/(√v + ε′)                (Adam on R; the moments by
                                                        :func:`memzoo.reference.galore.galore_adam_project_`)
    W ← W − η_free·φ(G − up(down(G))),  φ = sign | identity | 0

The official code's Adam is torch's: ε is added to √v/√(1−β2^t). The caller passes it in GaLore's
form, η_t = lr·√(1−β2^t)/(1−β1^t) and ε′ = ε·√(1−β2^t), which is the same update.

A zero-rank factor (an r = 0 subspace: density 0) makes the state-full part vanish and the
update pure signSGD; coordinate factors covering every coordinate make the residual vanish and
the update Adam's.

signSGD on rounding noise: when the subspace holds the whole gradient (rank(G) ≤ r with an SVD
subspace, e.g. a batch of one), E is rounding noise of size ≈ 1e-7·‖G‖, and sign(E) moves every
coordinate by the full residual step in a random direction (the official code does so; the
loss then rose in about one small run in three). With ``residual_threshold`` τ > 0, a matrix
whose residual is at most τ·‖G‖_F (‖E‖² formed from G's norm and the small R,
:func:`residual_kept`, in float64 from float32 math: reliable for τ ≳ 1e-3) takes no signSGD
step; τ = 0 is the official update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference.common import compute_dtype, sign
from memzoo.reference.galore import (
    FactorList,
    adamw_update_,
    as_matrix,
    check_low_rank_shapes,
    galore_adam_project_,
    low_rank_lists,
)
from memzoo.reference.projector import project, project_back

__all__ = ["RESIDUAL_RULES", "adamw_update_", "frugal_apply_", "galore_adam_project_", "residual_kept",
           "split_update_lists"]

RESIDUAL_RULES: tuple[str, ...] = ("sign_sgd", "sgd", "no")


def split_update_lists(params: torch.Tensor | Sequence[torch.Tensor], grads: torch.Tensor | Sequence[torch.Tensor],
                       updates: torch.Tensor | Sequence[torch.Tensor], lefts: FactorList, rights: FactorList,
                       residual_rule: str, residual_threshold: float = 0.0) -> tuple[list, list, list, list, list]:
    """The arguments of :func:`frugal_apply_` as checked lists (params, grads, updates, lefts,
    rights); ValueError naming the first problem, before anything is written."""
    if residual_rule not in RESIDUAL_RULES:
        raise ValueError(f"Invalid residual_rule: {residual_rule!r}; expected one of {RESIDUAL_RULES}")
    if not 0.0 <= residual_threshold < 1.0:
        raise ValueError(f"Invalid residual_threshold: {residual_threshold!r} (expected a number in [0, 1))")
    (params, grads, updates), lefts, rights = low_rank_lists("params", params=params, grads=grads, updates=updates,
                                                             lefts=lefts, rights=rights)
    for index, (param, grad, update, left, right) in enumerate(zip(params, grads, updates, lefts, rights)):
        if grad.shape != param.shape:
            raise ValueError(f"grads[{index}] has shape {tuple(grad.shape)}, params[{index}] {tuple(param.shape)}")
        if (left is None) == (right is None):
            raise ValueError(f"FRUGAL projects one side: matrix {index} needs exactly one of a left or right factor")
        check_low_rank_shapes(param.shape, left, right, update=update)
    return params, grads, updates, lefts, rights


def residual_kept(grad: torch.Tensor, inside: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                  threshold: float) -> torch.Tensor:
    """1.0, or 0.0 when the residual E = G − up(R) of matrix G, with R = down(G) (``inside``)
    for the one-sided factor ``left`` (m×r) or ``right`` (r×n), is at most ``threshold``·‖G‖_F.

    ‖E‖² is formed without E: ‖G‖² − 2‖R‖² + ⟨R, R·PPᵀ⟩ (right; ⟨R, PᵀP·R⟩ left), exact for any
    factor (= ‖G‖² − ‖R‖² for an orthonormal one), in float64 from norms of float32 (float64)
    math. A 0-d float32 tensor on G's device, decided there (no host sync); the multiplier of the
    signSGD step, so a NaN/Inf residual still propagates (0·NaN = NaN)."""
    total = torch.linalg.vector_norm(grad, dtype=compute_dtype(grad.dtype)).double().square()
    r = inside.double()
    if right is not None:
        factor = right.double()
        back = r @ (factor @ factor.T)  # R·PPᵀ
    else:
        factor = left.double()
        back = (factor.T @ factor) @ r  # PᵀP·R
    residual = total - 2.0 * r.square().sum() + (r * back).sum()
    return (residual > threshold * threshold * total).to(torch.float32)


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
    """For each matrix (W read as (shape[0], rest)): W ← W·(1 − decay) − step_size·up(N)
    − residual_step·φ(G − up(down(G))), G negated when maximizing. ``updates`` hold N (the
    low-rank shape); the factors are one-sided (left m×r or right r×n, r may be 0). With
    ``residual_threshold`` > 0 and φ = sign, a matrix whose residual is below it relative to
    ‖G‖ (:func:`residual_kept`) takes no signSGD step (see the module's docstring)."""
    params, grads, updates, lefts, rights = split_update_lists(params, grads, updates, lefts, rights, residual_rule,
                                                               residual_threshold)
    for param, grad, update, left, right in zip(params, grads, updates, lefts, rights):
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = as_matrix(grad, grad.shape[0]).to(dtype)
        if maximize:
            g = -g
        w = as_matrix(param, param.shape[0]).to(dtype) * (1.0 - decay)  # W·(1 − lr·λ)
        w = w - step_size * project_back(update.to(dtype), left, right)  # the state-full part
        if residual_rule != "no":
            inside = project(g, left, right)  # R = down(G)
            residual = g - project_back(inside, left, right)  # E = G − up(down(G))
            if residual_rule == "sign_sgd":
                kept = residual_kept(g, inside, left, right, residual_threshold) if residual_threshold > 0 else 1.0
                w = w - residual_step * (sign(residual) * kept)
            else:
                w = w - residual_step * residual
        param.copy_(w.reshape(param.shape))
