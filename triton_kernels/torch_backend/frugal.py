"""FRUGAL math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.frugal`.

Rewritten: the dense AdamW branch and the projected Adam moments (GaLore's twins,
:mod:`memzoo.triton_kernels.torch_backend.galore`).
The subspace functions are the reference's own for now.
"""

from __future__ import annotations

from memzoo.reference.frugal import (
    RESIDUAL_RULES,
    frugal_apply_,
    residual_kept,
    residual_squares,
    split_update_lists,
)
from memzoo.triton_kernels.torch_backend.galore import adamw_update_, galore_adam_project_

__all__ = [
    "RESIDUAL_RULES",
    "adamw_update_",
    "frugal_apply_",
    "galore_adam_project_",
    "residual_kept",
    "residual_squares",
    "split_update_lists",
]
