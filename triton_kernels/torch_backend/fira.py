"""Fira's math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.fira`.

Rewritten: :func:`fira_apply_`, with one m×n temporary per weight instead of the reference's
several: S = G − α·back(R) is one ``addmm`` (BLAS's C ← C + α·A·B), scaled per channel and
limited in place (the limiter's factor stays a 0-d tensor: no host synchronisation), and the
back-projected Adam update is accumulated straight into the weight by ``addmm_``. The subspace
Adam and the dense AdamW branch are GaLore's twins (:mod:`memzoo.triton_kernels.torch_backend.galore`);
:func:`fira_step_` (the whole-step truth) is the reference's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference import fira as reference
from memzoo.reference.apollo import NORM_EPS, norm_growth_divisor_, norm_ratio
from memzoo.reference.common import compute_dtype
from memzoo.reference.fira import channel_granularity, fira_apply_lists, fira_residual, given_per_weight
from memzoo.reference.galore import FactorList, as_matrix
from memzoo.reference.projector import project
from memzoo.triton_kernels.torch_backend.galore import adamw_update_, as_weight_matrix, galore_adam_project_

__all__ = ["NORM_EPS", "adamw_update_", "channel_granularity", "fira_apply_", "fira_apply_lists", "fira_residual",
           "galore_adam_project_", "given_per_weight"]


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
    """Same contract as :func:`memzoo.reference.fira.fira_apply_` (``projections`` and
    ``limiter_sizes`` for row shards included). Maximizing flips the sign of
    R and of the residual together, so s is unchanged and only the residual's sign in the update
    turns (−G is never formed)."""
    params, grads, updates, norms, lefts, rights = fira_apply_lists(params, grads, updates, limiter_norms, lefts,
                                                                    rights, growth_limit)
    projections = given_per_weight("projections", projections, len(params))
    limiter_sizes = given_per_weight("limiter_sizes", limiter_sizes, len(params))
    decay = lr * weight_decay
    residual_sign = -1.0 if maximize else 1.0
    for index, (param, grad, update, norm, left, right) in enumerate(zip(params, grads, updates, norms, lefts,
                                                                          rights)):
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        matrix = as_weight_matrix(param)
        if matrix is None or param.numel() == 0:
            reference.fira_apply_(param, grad, update, norm, lefts=left, rights=right, step_size=step_size,
                                  scale=scale, lr=lr, weight_decay=weight_decay, growth_limit=growth_limit,
                                  record_only=record_only, maximize=maximize,
                                  projections=None if projections[index] is None else [projections[index]],
                                  limiter_sizes=None if limiter_sizes[index] is None else [limiter_sizes[index]])
            continue
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = as_matrix(grad, grad.shape[0]).to(dtype)
        r = project(g, left, right) if projections[index] is None else projections[index].to(dtype)
        n = update.to(dtype)
        factors = norm_ratio(n, r, channel_granularity(left, right, index))
        # S = (G − α·back(R)) ⊙ s in one m×n buffer.
        residual = torch.addmm(g, r, right, alpha=-scale) if right is not None else torch.addmm(g, left, r,
                                                                                             alpha=-scale)
        residual.mul_(factors)
        coefficient = torch.tensor(step_size * residual_sign, dtype=dtype, device=param.device)
        if norm is not None:
            size = torch.linalg.vector_norm(residual) if limiter_sizes[index] is None else \
                limiter_sizes[index].to(dtype)
            if record_only:
                norm.copy_(size)
            else:  # the limiter, with S/c folded into the coefficient
                coefficient = coefficient / norm_growth_divisor_(size, norm, growth_limit=growth_limit)
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        if right is not None:
            work.addmm_(n, right, alpha=-step_size * scale)
        else:
            work.addmm_(left, n, alpha=-step_size * scale)
        work.sub_(residual.mul_(coefficient))
        if decay != 0.0:
            work.add_(work, alpha=-decay)  # W ← W − lr·λ·W (after the update, as the official code)
        if work is not matrix:
            matrix.copy_(work)
