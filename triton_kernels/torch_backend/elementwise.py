"""Chunked multi-tensor element-wise passes: the engine of the ``"torch"`` backend's updates.

A reference update on one tensor makes several full-size temporaries and passes over memory. Here
each group of parallel tensors (a parameter, its gradient, its moments) is cut into chunks of
:data:`CHUNK` elements in memory order, and the update runs chunk by chunk in preallocated
float32 (float64) scratch buffers: the chunk's operands stay in cache between the operations, so
memory sees about one read of each input and one write of each output, and the extra memory is a
few chunks (:data:`CHUNK` elements × the update's buffer count, 512 KiB each in float32 on a
CPU; :data:`DEVICE_CHUNK` elsewhere), never more than the largest tensor. No step synchronizes
with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memzoo.reference.common import compute_dtype, is_dense

__all__ = ["CHUNK", "DEVICE_CHUNK", "Scratch", "chunk_size", "for_each_chunk", "memory_order_view"]

# Elements per chunk on CPUs: 2^17 (512 KiB in float32), so that a chunk's operands stay in L2
# (2 MiB per core on the Xeon of bench/RESULTS.md, where 2^16 to 2^18 chunks were within a few
# percent and 2^14 paid Python overhead).
CHUNK = 1 << 17
# On accelerators there is no cache to stay in, and each op of a chunk is a kernel launch: chunks
# of 2^24 elements (64 MiB in float32) keep launches few and the scratch below the reference's
# full-size temporaries.
DEVICE_CHUNK = 1 << 24


def chunk_size(device: torch.device) -> int:
    """Elements per chunk on ``device``."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def memory_order_view(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor as a 1-D view in memory order."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


class Scratch:
    """Reusable 1-D buffers of one compute dtype and device, ``size`` elements each."""

    def __init__(self, count: int, dtype: torch.dtype, device: torch.device, size: int) -> None:
        self.buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(count)]
        self.dtype = dtype

    def take(self, index: int, size: int) -> torch.Tensor:
        return self.buffers[index][:size]

    def load(self, index: int, values: torch.Tensor) -> torch.Tensor:
        """``values`` in the compute dtype: the tensor itself when it has it, else a copy into
        buffer ``index``."""
        if values.dtype == self.dtype:
            return values
        return self.take(index, values.numel()).copy_(values)


def _same_dense_layout(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(t.stride() == first.stride() for t in tensors) and is_dense(first)


def for_each_chunk(
    lists: Sequence[Sequence[torch.Tensor]],
    update: Callable[[Scratch, tuple[torch.Tensor, ...]], None],
    fallback: Callable[[tuple[torch.Tensor, ...]], None],
    *,
    buffers: int,
) -> None:
    """Run ``update(scratch, chunks)`` over aligned chunks of each group of parallel tensors
    (the i-th tensor of every list), chunks being 1-D views of at most :data:`CHUNK` elements
    that the update writes in place.

    Tensors of one group must have the same shape (the caller checked). Groups whose tensors are
    not dense or do not share strides (rare: views), are handed whole to ``fallback``, which
    is the reference function. ``buffers`` scratch buffers in the group's compute dtype are
    allocated once per (dtype, device).
    """
    scratches: dict[tuple[torch.dtype, torch.device], Scratch] = {}
    for group in zip(*lists):
        if group[0].numel() == 0:
            continue
        if not _same_dense_layout(group):
            fallback(group)
            continue
        dtype = compute_dtype(*(t.dtype for t in group))
        device = group[0].device
        size = chunk_size(device)
        scratch = scratches.get((dtype, device))
        if scratch is None:
            largest = max(t.numel() for t in lists[0] if t.device == device)
            scratch = scratches[(dtype, device)] = Scratch(buffers, dtype, device, min(size, largest))
        flats = [memory_order_view(t) for t in group]
        numel = flats[0].numel()
        for start in range(0, numel, size):
            stop = min(numel, start + size)
            update(scratch, tuple(flat[start:stop] for flat in flats))
