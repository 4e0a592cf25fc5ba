"""The zeroth-order passes on the ``"torch"`` backend; twin of :mod:`memzoo.reference.zeroth_order`.

:func:`zo_apply_` is the reference's pass (same slices, same Box–Muller, same rounding stages)
with the Philox words drawn by :func:`memzoo.triton_kernels.torch_backend.random.philox_words4`
(the same words, bit for bit, at about half the integer operations). A large pass on a CPU (at
least 2^22 elements under ``MEMZOO_TORCH_COMPILE=auto``, one seed) runs as slices compiled with ``torch.compile`` instead
(:mod:`memzoo.triton_kernels.torch_backend.zeroth_order_compiled`): the same values, bit for bit,
several times faster, falling back to this eager pass where compiling fails. The other functions
are the reference's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference.common import as_tensor_list
from memzoo.reference.zeroth_order import (
    CHUNK,
    MASK_BYTES_PER_CHUNK,
    check_zo_arguments,
    mask_bit_positions,
    pack_mask,
    unpack_mask,
    zo_normals,
    zo_passes_,
)
from memzoo.triton_kernels.torch_backend import zeroth_order_compiled as compiled
from memzoo.triton_kernels.torch_backend.random import philox_words4

__all__ = ["CHUNK", "MASK_BYTES_PER_CHUNK", "check_zo_arguments", "mask_bit_positions", "pack_mask", "unpack_mask",
           "zo_apply_", "zo_normals"]


@torch.no_grad()
def zo_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    stream_offsets: Sequence[int],
    *,
    seed: int,
    eps: float,
    from_sign: int,
    to_sign: int,
    coefficients: torch.Tensor | None = None,
    earlier_seeds: Sequence[int] = (),
    decay: float = 1.0,
    clamp_min: float | None = None,
    thresholds: Sequence[float] | None = None,
    mask_bits: torch.Tensor | None = None,
    mask_offsets: Sequence[int] | None = None,
    write_mask: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.zeroth_order.zo_apply_`."""
    params = as_tensor_list("params", params)
    check_zo_arguments(params, stream_offsets, seed=seed, from_sign=from_sign, to_sign=to_sign,
                       coefficients=coefficients, earlier_seeds=earlier_seeds, thresholds=thresholds,
                       mask_bits=mask_bits, mask_offsets=mask_offsets, write_mask=write_mask)
    if compiled.compiles(params, earlier_seeds):
        left = compiled.apply_compiled(
            params, stream_offsets, seed=seed, eps=eps, from_sign=from_sign, to_sign=to_sign,
            coefficients=coefficients, decay=decay, clamp_min=clamp_min, thresholds=thresholds, mask_bits=mask_bits,
            mask_offsets=mask_offsets, write_mask=write_mask)
        if not left:
            return
        pick = lambda values: None if values is None else [values[index] for index in left]  # noqa: E731
        params, stream_offsets, thresholds, mask_offsets = (pick(params), pick(stream_offsets), pick(thresholds),
                                                            pick(mask_offsets))
    zo_passes_(params, stream_offsets, philox_words4, seed=seed, eps=eps, from_sign=from_sign, to_sign=to_sign,
               coefficients=coefficients, earlier_seeds=earlier_seeds, decay=decay, clamp_min=clamp_min,
               thresholds=thresholds, mask_bits=mask_bits, mask_offsets=mask_offsets, write_mask=write_mask)
