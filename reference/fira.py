"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore's Adam in a rank-r subspace, plus the part of the gradient GaLore throws
away — the residual G − α·P(R) — added back full-rank, scaled per channel by how much Adam
rescaled that channel inside the subspace, and held back by a norm-growth limiter.

Two halves, as GaLore's:

1. the subspace Adam is GaLore's own :func:`memzoo.reference.galore.galore_adam_project_`
   (R = P(G), m ← β1·m + (1−β1)·R, v ← β2·v + (1−β2)·R², N = m/(√v+ε));
2. :func:`fira_apply_`: s_c = ‖N_c‖/(‖R_c‖ + 1e-8) per channel (eq. 7, APOLLO's
   :func:`~memzoo.reference.apollo.norm_ratio`), S = (G − α·P(R)) ⊙ s, the limiter (eq. 9,
   :func:`~memzoo.reference.apollo.limit_norm_growth`), then W ← W − η_t·(α·P(N) + S) and
   W ← W − lr·λ·W (decay after, with the plain lr, as the official code).

:func:`fira_step` is one whole step of one weight (refresh, both halves, or the dense HF-Adam
of weights outside the rank groups): what the optimizer composes, held to the official ``fira``
1.0.2 package by tests/test_fira.py.

As the official code (``fira`` 1.0.2, ``fira_adamw.py`` + ``gradient_projection.py``): α
(``alpha`` there, ``scale`` here) is applied inside the back-projection, so the residual is
G − α·P·Pᵀ·G (not the orthogonal complement unless α = 1) and the scaled residual itself is not
multiplied by α; the limiter's first step only records ρ = ‖S‖.

Differences, where the official code is degenerate: its channel dimension is read from N's
shape (dim 0 when N has fewer rows than columns, else dim 1), which is the rank dimension — rows
of G for a right projection (N is m×r), columns for a left one (N is r×n) — except when a left
projection keeps every column (r = n): there the official code takes row norms of the r×n N,
r = n factors that do not broadcast against the m×n residual (a crash, or for a square weight a
silent row/column swap). Here the channel is always the rank dimension, decided by the side.
A two-sided (``full``) projection has no channel that fits both sides and is rejected (the
official code crashes on it unless r equals m).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from memzoo.reference.apollo import NORM_EPS, apply_lists, limit_norm_growth, norm_ratio
from memzoo.reference.common import compute_dtype
from memzoo.reference.galore import (
    FactorList,
    adamw_update_,
    as_matrix,
    check_low_rank_shapes,
    galore_adam_project_,
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
from memzoo.reference.projector import step_projector_
from memzoo.reference.projector import project, project_back

__all__ = ["NORM_EPS", "adamw_update_", "channel_granularity", "fira_apply_", "fira_apply_lists", "fira_residual",
           "galore_adam_project_", "given_per_weight"]


def channel_granularity(left: torch.Tensor | None, right: torch.Tensor | None, index: int) -> str:
    """The channel granularity of a one-sided projection (``"rows"`` for a right factor,
    ``"columns"`` for a left one), or ValueError for none or both."""
    if (left is None) == (right is None):
        raise ValueError(f"Fira projects one side: matrix {index} has {'both' if left is not None else 'no'} "
                         "factors (give one left m×r or one right r×n factor)")
    return "rows" if right is not None else "columns"


def fira_apply_lists(params: torch.Tensor | Sequence[torch.Tensor], grads: torch.Tensor | Sequence[torch.Tensor],
                     updates: torch.Tensor | Sequence[torch.Tensor],
                     limiter_norms: torch.Tensor | Sequence[torch.Tensor] | None, lefts: FactorList,
                     rights: FactorList, growth_limit: float) -> tuple[list, list, list, list, list, list]:
    """The arguments of :func:`fira_apply_` as checked lists (APOLLO's checks of the weights,
    gradients and limiter norms, plus one factor per weight and N of the projected shape);
    ValueError naming the first problem, before anything is written."""
    params, grads, _, norms = apply_lists(params, grads, None, limiter_norms, growth_limit)
    (updates,), lefts, rights = low_rank_lists("updates", updates=updates, lefts=lefts, rights=rights)
    if len(updates) != len(params):
        raise ValueError(f"tensor lists differ in length: params {len(params)}, updates {len(updates)}")
    for index, (param, update, left, right) in enumerate(zip(params, updates, lefts, rights)):
        channel_granularity(left, right, index)
        check_low_rank_shapes(param.shape, left, right, update=update)
    return params, grads, updates, norms, lefts, rights


def given_per_weight(name: str, values: Sequence[torch.Tensor] | None, count: int) -> list:
    """One optional tensor per weight (``None`` for each when not given); ValueError on a count mismatch."""
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name}: expected one tensor per weight ({count}), got {len(values)}")
    return values


def fira_residual(g: torch.Tensor, update: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, *,
                  scale: float, index: int = 0, projection: torch.Tensor | None = None) -> torch.Tensor:
    """Fira's scaled residual S = (G − α·back(R)) ⊙ ‖N_c‖/(‖R_c‖ + 1e-8) (eq. 7–8) of the matrix
    ``g`` (not negated; a maximizing caller negates S) in ``g``'s dtype, R = P(G) or the given
    ``projection``. On a row shard G_k it is the shard's rows of S (R replicated for a left factor)."""
    dtype = g.dtype
    left = None if left is None else left.to(dtype)
    right = None if right is None else right.to(dtype)
    r = project(g, left, right) if projection is None else projection.to(dtype)
    factors = norm_ratio(update.to(dtype), r, channel_granularity(left, right, index))  # eq. 7
    return (g - scale * project_back(r, left, right)) * factors  # eq. 8


@torch.no_grad()
def fira_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    limiter_norms: torch.Tensor | Sequence[torch.Tensor] | None,
    *,
    lefts: FactorList,
    rights: FactorList,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
    growth_limit: float = 1.01,
    record_only: bool = False,
    maximize: bool = False,
    projections: Sequence[torch.Tensor] | None = None,
    limiter_sizes: Sequence[torch.Tensor] | None = None,
) -> None:
    """For each weight W (read as (shape[0], rest)) with gradient G, its subspace Adam update N
    (``updates``, R's shape) and one factor (``lefts`` m×r or ``rights`` r×n):

    R = P(G) (−G when maximizing); s = ‖N_c‖/(‖R_c‖ + 1e-8) per channel c (rows of G for a
    right factor, columns for a left one); S = (G − α·back(R)) ⊙ s; with ``limiter_norms``
    (0-d fp32 ρ, updated in place) the norm-growth limiter (``record_only`` on a weight's first
    step); W ← W − step_size·(α·back(N) + S); W ← W − lr·λ·W. ``scale`` is α.

    For a row shard W_k of a weight (FSDP2): ``projections`` gives each R (not negated when
    maximizing) where it is not P(G_k) — a left factor's R = Σ_k P_kᵀ·G_k, all-reduced — and
    ``limiter_sizes`` each ‖S‖ over the whole weight (0-d, from :func:`fira_residual` of every
    shard), which the limiter then uses in place of the local ‖S_k‖."""
    params, grads, updates, norms, lefts, rights = fira_apply_lists(params, grads, updates, limiter_norms, lefts,
                                                                    rights, growth_limit)
    projections = given_per_weight("projections", projections, len(params))
    limiter_sizes = given_per_weight("limiter_sizes", limiter_sizes, len(params))
    for index, (param, grad, update, norm, left, right) in enumerate(zip(params, grads, updates, norms, lefts,
                                                                          rights)):
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = as_matrix(grad, grad.shape[0]).to(dtype)
        s = fira_residual(g, update, left, right, scale=scale, index=index, projection=projections[index])
        if maximize:  # R and the residual of −G: s unchanged, S negated
            s = -s
        if norm is not None:  # eq. 9
            s = limit_norm_growth(s, norm, growth_limit=growth_limit, record_only=record_only,
                                  size=limiter_sizes[index])
        n = update.to(dtype)
        w = as_matrix(param, param.shape[0]).to(dtype) - step_size * (scale * project_back(n, left, right) + s)
        if weight_decay != 0.0:
            w = w - (lr * weight_decay) * w
        param.copy_(w.reshape(param.shape))


# -- Whole step: one weight's step as the optimizer composes it (the truth for optim/) -------
# (The conventions of reference/galore.py's whole-step section.)


@torch.no_grad()
def fira_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool, rank: int | None,
              update_proj_gap: int, scale: float, proj_type: str, projector: str, power_iters: int, oversample: int,
              strict_rank: bool, state_dtype: torch.dtype | None, growth_limit: float,
              maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Fira step of one weight (Chen et al. 2024, Algorithm 1), 32-bit moments: the new weight
    and state. ``scale`` is the official ``alpha``. Unprojected weights: GaLore's dense branch
    (:func:`~memzoo.reference.galore.galore_dense_step`, the official code's HF-Adam)."""
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
    if not is_projected(param, rank):
        return galore_dense_step(param, grad, state, state_dtype=state_dtype, maximize=maximize, **hyper)
    if proj_type == "full":
        raise ValueError("Invalid proj_type: 'full'; Fira projects one side (std, reverse_std, left, right)")
    param, state = step_copies(param, state)
    shape, side, rank = low_rank_setup(param, rank=rank, proj_type=proj_type, strict_rank=strict_rank,
                                       projector=projector)
    g = grad.reshape(shape)
    step = next_step_(state)
    # P_t ← SVD(G_t) on steps 1, T+1, … (GaLore's projector)
    left, right, _ = step_projector_(state, g, step=step, base_seed=seed, rank=rank, side=side, method=projector,
                                     update_proj_gap=update_proj_gap, power_iters=power_iters, oversample=oversample,
                                     signs="raw", maximize=maximize, dtype=param.dtype)
    exp_avg, exp_avg_sq = moments_(state, low_rank_shape(shape, left, right), state_dtype or param.dtype, param.device)
    update = torch.empty(exp_avg.shape, dtype=compute_dtype(param.dtype), device=param.device)
    # R = PᵀG; m, v ← β·(m, v) + (1 − β)·(R, R²); N = m/(√v + ε): GaLore's subspace Adam
    galore_adam_project_(g, exp_avg, exp_avg_sq, update, lefts=left, rights=right, beta1=betas[0], beta2=betas[1],
                         eps=eps, maximize=maximize)
    record = "limiter_norm" not in state  # the limiter's first step records ‖S‖ only
    if record:
        state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=param.device)
    # eq. 7–9: S = (G − α·P·R) ⊙ ‖N_c‖/‖R_c‖, limited; W ← W − η_t·(α·P·N + S); W ← W − lr·λ·W
    fira_apply_(param, grad, update, state["limiter_norm"], lefts=left, rights=right,
                step_size=hf_adam_step_size(lr, betas, correct_bias, step + 1), scale=scale, lr=lr,
                weight_decay=weight_decay, growth_limit=growth_limit, record_only=record, maximize=maximize)
    return param, state
