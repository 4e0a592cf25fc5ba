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

:func:`fira_step_` is one whole step of one weight (refresh, both halves, or the dense HF-Adam
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

from collections.abc import Sequence
from typing import Any

import torch

from memzoo.reference.apollo import NORM_EPS, apply_lists, limit_norm_growth, norm_ratio
from memzoo.reference.common import compute_dtype
from memzoo.reference.galore import (
    FactorList,
    adamw_update_,
    as_matrix,
    check_low_rank_shapes,
    galore_adam_project_,
    hf_adam_step_size,
    low_rank_lists,
    refresh_projector_,
)
from memzoo.reference.projector import project, project_back

__all__ = ["NORM_EPS", "adamw_update_", "channel_granularity", "fira_apply_", "fira_apply_lists", "fira_step_",
           "galore_adam_project_"]


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
) -> None:
    """For each weight W (read as (shape[0], rest)) with gradient G, its subspace Adam update N
    (``updates``, R's shape) and one factor (``lefts`` m×r or ``rights`` r×n):

    R = P(G) (−G when maximizing); s = ‖N_c‖/(‖R_c‖ + 1e-8) per channel c (rows of G for a
    right factor, columns for a left one); S = (G − α·back(R)) ⊙ s; with ``limiter_norms``
    (0-d fp32 ρ, updated in place) the norm-growth limiter (``record_only`` on a weight's first
    step); W ← W − step_size·(α·back(N) + S); W ← W − lr·λ·W. ``scale`` is α."""
    params, grads, updates, norms, lefts, rights = fira_apply_lists(params, grads, updates, limiter_norms, lefts,
                                                                    rights, growth_limit)
    for index, (param, grad, update, norm, left, right) in enumerate(zip(params, grads, updates, norms, lefts,
                                                                          rights)):
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = as_matrix(grad, grad.shape[0]).to(dtype)
        if maximize:
            g = -g
        r = project(g, left, right)
        n = update.to(dtype)
        factors = norm_ratio(n, r, channel_granularity(left, right, index))  # eq. 7: ‖N_c‖/(‖R_c‖ + 1e-8)
        s = (g - scale * project_back(r, left, right)) * factors  # the scaled residual, eq. 8
        if norm is not None:
            s = limit_norm_growth(s, norm, growth_limit=growth_limit, record_only=record_only)  # eq. 9
        w = as_matrix(param, param.shape[0]).to(dtype) - step_size * (scale * project_back(n, left, right) + s)
        if weight_decay != 0.0:
            w = w - (lr * weight_decay) * w
        param.copy_(w.reshape(param.shape))


@torch.no_grad()
def fira_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    rank: int | None = None,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    growth_limit: float = 1.01,
    maximize: bool = False,
) -> None:
    """One whole Fira step of one weight, state created on the first call (``state`` is a dict,
    empty at first): ``step`` (int64), ``exp_avg`` and ``exp_avg_sq`` (R's shape), and for a
    projected weight ``proj_left`` / ``proj_right`` (the exact SVD's top-``rank`` singular
    vectors of G, refreshed on steps 1, T+1, 2T+1, …, in G's dtype) and ``limiter_norm``.

    ``rank`` None, or a weight with fewer than 2 dimensions: the official code's dense HF-Adam
    (as for the parameters of groups without ``rank``). Arguments are the official ones
    (``alpha`` is ``scale``), plus ``growth_limit`` (γ, 1.01 officially) and ``maximize``."""
    beta1, beta2 = betas
    step = int(state.get("step", 0))
    step_size = hf_adam_step_size(lr, beta1, beta2, step + 1, correct_bias)
    if rank is None or param.dim() < 2:
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
        adamw_update_(param, grad, state["exp_avg"], state["exp_avg_sq"], step_size=step_size, beta1=beta1,
                      beta2=beta2, eps=eps, lr=lr, weight_decay=weight_decay, maximize=maximize)
        state["step"] = torch.tensor(step + 1, dtype=torch.int64)
        return
    if proj_type == "full":
        raise ValueError("Invalid proj_type: 'full'; Fira projects one side (std, reverse_std, left, right)")
    left, right = refresh_projector_(state, as_matrix(grad, grad.shape[0]), step=step, rank=rank,
                                     update_proj_gap=update_proj_gap, proj_type=proj_type)
    low_rank_shape = project(as_matrix(grad, grad.shape[0]), left, right).shape
    if "exp_avg" not in state:  # never reset at a refresh, as officially
        state["exp_avg"] = torch.zeros(low_rank_shape, dtype=grad.dtype, device=grad.device)
        state["exp_avg_sq"] = torch.zeros(low_rank_shape, dtype=grad.dtype, device=grad.device)
    update = torch.empty(low_rank_shape, dtype=grad.dtype, device=grad.device)
    galore_adam_project_(grad, state["exp_avg"], state["exp_avg_sq"], update, lefts=left, rights=right,
                         beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
    record = "limiter_norm" not in state
    if record:
        state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=grad.device)
    fira_apply_(param, grad, update, state["limiter_norm"], lefts=left, rights=right, step_size=step_size,
                scale=scale, lr=lr, weight_decay=weight_decay, growth_limit=growth_limit, record_only=record,
                maximize=maximize)
    state["step"] = torch.tensor(step + 1, dtype=torch.int64)
