"""APOLLO math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.apollo`.

Rewritten: :func:`apollo_apply_`, the full-size half, without an m×n temporary for float32
weights: ‖S‖ (S = G ⊙ s) for the limiter comes from the channel norms of G (‖S‖² = Σ_c s_c²·‖G_c‖²),
the limiter's divisor and √α fold into the per-channel coefficients (a 0-d tensor throughout: no
host synchronisation), and W ← W − G ⊙ k is one ``addcmul_`` into the weight; the reference
forms S, S/c, √α·S, W − η·S and its decay as five m×n temporaries. The dense AdamW branch is
GaLore's twin; :func:`apollo_scales_` (r-sized after the projection) is the reference's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memzoo.reference import apollo as reference
from memzoo.reference.apollo import (
    NORM_EPS,
    apollo_scales_,
    apply_lists,
    check_scales_shape,
    limit_norm_growth,
    norm_growth_divisor_,
    norm_ratio,
)
from memzoo.reference.common import compute_dtype
from memzoo.triton_kernels.torch_backend.galore import adamw_update_, as_weight_matrix

__all__ = ["NORM_EPS", "adamw_update_", "apollo_apply_", "apollo_scales_", "apply_lists", "check_scales_shape",
           "limit_norm_growth", "norm_growth_divisor_", "norm_ratio"]


def _scaled_norm(g: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖G ⊙ s‖ for s of shape (1, 1), (m, 1) or (1, n), from the norms of G's channels."""
    if factor.numel() == 1:
        return torch.linalg.vector_norm(g, dtype=dtype) * factor.reshape(())
    channel_norms = torch.linalg.vector_norm(g, dim=1 if factor.shape[0] > 1 else 0, keepdim=True, dtype=dtype)
    return torch.linalg.vector_norm(channel_norms * factor)


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
    """Same contract as :func:`memzoo.reference.apollo.apollo_apply_`: S = √α·G ⊙ s/c in the end
    either way; ``scale_front`` decides whether the ‖S‖ the limiter compares and records includes
    √α, as in the reference."""
    params, grads, scales, norms = apply_lists(params, grads, scales, limiter_norms, growth_limit)
    root_alpha = math.sqrt(scale)
    decay = lr * weight_decay
    sign = -1.0 if maximize else 1.0
    for param, grad, factor, norm in zip(params, grads, scales, norms):
        matrix, g = as_weight_matrix(param), as_weight_matrix(grad)
        if matrix is None or g is None or param.numel() == 0:
            reference.apollo_apply_(param, grad, factor, norm, step_size=step_size, scale=scale, lr=lr,
                                    weight_decay=weight_decay, growth_limit=growth_limit, record_only=record_only,
                                    scale_front=scale_front, maximize=maximize)
            continue
        dtype = compute_dtype(param.dtype, grad.dtype)
        s = factor.to(dtype)
        # k = −η·√α·s/c (·−1 when maximizing): the update W ← W + G ⊙ k.
        coefficient = s * (-step_size * root_alpha * sign)
        if norm is not None:
            size = _scaled_norm(g, s, dtype)  # ‖S‖ before √α
            if scale_front:
                size = size * root_alpha
            if record_only:
                norm.copy_(size)
            else:
                coefficient = coefficient / norm_growth_divisor_(size, norm, growth_limit=growth_limit)
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        work.addcmul_(g if g.dtype == dtype else g.to(dtype), coefficient)
        if decay != 0.0:
            work.add_(work, alpha=-decay)  # W ← W − lr·λ·W (after the update, as the official code)
        if work is not matrix:
            matrix.copy_(work)
