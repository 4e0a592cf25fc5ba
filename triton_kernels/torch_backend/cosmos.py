"""COSMOS math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.cosmos`.

Not rewritten yet: every function is the reference"s own (its dense AdamW branch is
:func:`memzoo.triton_kernels.torch_backend.galore.adamw_update_`, through the galore family).
"""

from __future__ import annotations

from memzoo.reference.cosmos import (
    NS_COEFFICIENTS,
    NS_DTYPES,
    cosmos_apply_,
    cosmos_basis_init,
    cosmos_basis_update,
    cosmos_directions_,
    cosmos_update_,
    frobenius_normalize,
    newton_schulz5,
    orthogonalize_,
    power_of_two_scale,
)

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
