"""APOLLO math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.apollo`.

Rewritten: the dense AdamW branch (:func:`memzoo.triton_kernels.torch_backend.galore.adamw_update_`).
The subspace functions are the reference's own for now.
"""

from __future__ import annotations

from memzoo.reference.apollo import (
    NORM_EPS,
    apollo_apply_,
    apollo_scales_,
    apply_lists,
    check_scales_shape,
    limit_norm_growth,
    norm_growth_divisor_,
    norm_ratio,
)
from memzoo.triton_kernels.torch_backend.galore import adamw_update_

__all__ = ["NORM_EPS", "adamw_update_", "apollo_apply_", "apollo_scales_", "apply_lists", "check_scales_shape",
           "limit_norm_growth", "norm_growth_divisor_", "norm_ratio"]
