"""FRUGAL math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.frugal`.

Rewritten: :func:`frugal_apply_`, with the state-full part accumulated into the weight by one
``addmm_`` (BLAS's C ← C + α·A·B, no m×n temporary), the residual E = G − up(down(G)) formed by
one ``addmm`` and signed in place (the reference forms six m×n temporaries); the dense AdamW branch
and the projected Adam moments are GaLore's twins (:mod:`memzoo.triton_kernels.torch_backend.galore`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference import frugal as reference
from memzoo.reference.common import compute_dtype
from memzoo.reference.frugal import RESIDUAL_RULES, residual_kept, residual_squares, split_update_lists
from memzoo.reference.galore import FactorList
from memzoo.reference.projector import project
from memzoo.triton_kernels.torch_backend.galore import adamw_update_, as_weight_matrix, galore_adam_project_

__all__ = [
    "RESIDUAL_RULES",
    "adamw_update_",
    "frugal_apply_",
    "galore_adam_project_",
    "residual_kept",
    "residual_squares",
    "split_update_lists",
]


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
    """Same contract as :func:`memzoo.reference.frugal.frugal_apply_`. Maximizing negates E
    (E of −G is −E), so only the residual's coefficient turns; −G is never formed."""
    params, grads, updates, lefts, rights = split_update_lists(params, grads, updates, lefts, rights, residual_rule,
                                                               residual_threshold)
    sign_g = -1.0 if maximize else 1.0
    for param, grad, update, left, right in zip(params, grads, updates, lefts, rights):
        matrix, g = as_weight_matrix(param), as_weight_matrix(grad)
        if matrix is None or g is None or param.numel() == 0:
            reference.frugal_apply_(param, grad, update, lefts=left, rights=right, step_size=step_size,
                                    residual_step=residual_step, residual_rule=residual_rule, decay=decay,
                                    maximize=maximize, residual_threshold=residual_threshold)
            continue
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = g if g.dtype == dtype else g.to(dtype)
        n = update.to(dtype)
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        if decay != 0.0:
            work.mul_(1.0 - decay)  # W·(1 − lr·λ), first
        if n.numel():  # the state-full part: W ← W − step_size·up(N)
            if right is not None:
                work.addmm_(n, right, alpha=-step_size)
            else:
                work.addmm_(left, n, alpha=-step_size)
        if residual_rule != "no":
            inside = project(g, left, right)  # R = down(G)
            # E = G − up(R) in one m×n buffer.
            residual = torch.addmm(g, inside, right, alpha=-1.0) if right is not None else torch.addmm(
                g, left, inside, alpha=-1.0)
            if residual_rule == "sign_sgd":
                signs = torch.sign(residual)
                signs.add_(residual.sub_(residual))  # memzoo's sign: NaN where E is not finite (0·NaN too)
                if residual_threshold > 0:
                    kept = residual_kept(g, inside, left, right, residual_threshold)
                    work.addcmul_(signs, kept.to(dtype), value=-residual_step * sign_g)
                else:
                    work.add_(signs, alpha=-residual_step * sign_g)
            else:
                work.add_(residual, alpha=-residual_step * sign_g)
        if work is not matrix:
            matrix.copy_(work)
