"""The zeroth-order passes" math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.zeroth_order`.

Not rewritten yet: every function is the reference"s own.
"""

from __future__ import annotations

from memzoo.reference.zeroth_order import (
    CHUNK,
    MASK_BYTES_PER_CHUNK,
    check_zo_arguments,
    mask_bit_positions,
    pack_mask,
    unpack_mask,
    zo_apply_,
    zo_normals,
)

__all__ = ["CHUNK", "MASK_BYTES_PER_CHUNK", "check_zo_arguments", "mask_bit_positions", "pack_mask", "unpack_mask", "zo_apply_", "zo_normals"]
