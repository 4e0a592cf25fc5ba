"""Multi-tensor launches: one kernel launch over many tensors of any shape.

An element-wise optimizer step over a model's hundreds of parameters is launch-bound when it
launches once per tensor. Here every launch covers all tensors that share (device, dtypes): each
list of tensors (params, grads, states, ...) is addressed as one *base* pointer plus a table of
element offsets, and a block map tells each program which tensor and which block it handles.

Kernels use the table through :func:`tensor_block` (a ``triton.jit`` helper). Table layout, one
int64 row of length T (number of tensors) each:
``rows 0..L-1`` element offset of tensor t in list l from that list's base pointer,
``row L`` numel of tensor t, ``row L+1`` index of tensor t's first block.

Layout rule (copy-in/copy-out only where unavoidable): the i-th tensors of all lists are used in
place when each is dense (non-overlapping, no gaps; any dimension order) and they share strides,
so the same flat index addresses the same logical element in each. Otherwise the launcher works on
contiguous copies and copies the written ones back, which costs one extra read and write.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.reference.common import as_tensor_list, check_parallel_lists, is_dense

__all__ = ["MultiTensorLaunch", "operand_offsets", "ceil_div", "is_dense", "launch_elementwise", "plan_launches", "sign", "tensor_block", "to_storage",
           "values_tensor"]

# 16-byte alignment lets the compiler use 128-bit loads and stores.
_VECTOR_BYTES = 16
_CACHE_SIZE = 64


@triton.jit
def tensor_block(table, block_tensor, num_tensors, LIST: tl.constexpr, NUM_LISTS: tl.constexpr,
                 ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """For this program: element offsets (from list LIST's base) of its block, and the mask."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    numel = tl.load(table + NUM_LISTS * num_tensors + t)
    first_block = tl.load(table + (NUM_LISTS + 1) * num_tensors + t)
    start = (pid - first_block).to(tl.int64) * BLOCK
    local = start + tl.arange(0, BLOCK)
    base_offset = tl.load(table + LIST * num_tensors + t)
    if ALIGN > 1:
        base_offset = tl.multiple_of(base_offset, ALIGN)
    return base_offset + local, local < numel


@triton.jit
def _to_storage_exact(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` to nearest, ties to even, as PyTorch's ``.to()`` does.

    bf16 is rounded with integer ops: Triton's interpreter truncates fp32 to bf16, so with the
    plain cast the CPU tests would check a different rounding than the GPU runs.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _to_storage_native(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype``: compiled Triton's cast rounds to nearest even (cvt.rn)."""
    return x.to(dtype)


# Kernels store through ``to_storage``: the hardware cast when compiled (one instruction), the
# integer rounding under the interpreter. tests/test_multi_tensor.py checks both against torch.
to_storage = _to_storage_exact if isinstance(_to_storage_exact, InterpretedFunction) else _to_storage_native


@triton.jit
def sign(x):
    """sign(x) with sign(0) = 0 and NaN for a non-finite x: the rule of
    :func:`memzoo.reference.common.sign` (a sign-based step of a NaN/Inf input writes NaN)."""
    direction = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    return tl.where(tl.abs(x) < float("inf"), direction, x - x)  # x − x: NaN for NaN and ±Inf


@dataclass
class MultiTensorLaunch:
    """Everything one kernel launch needs for a bucket of tensors that share dtypes."""

    # Every tensor the table addresses, per list; held here because the table holds only
    # addresses, and a temporary copy freed before the kernel runs would be read as garbage.
    tensors: list[list[torch.Tensor]]
    table: torch.Tensor  # int64 (NUM_LISTS + 2, T) on the device
    block_tensor: torch.Tensor  # int32 (num_blocks,): tensor index of each program
    num_tensors: int
    num_blocks: int
    aligns: list[int]  # per list: every offset is a multiple of this many elements
    first_index: int = 0  # position in the input lists of the bucket's first tensor (its bases)
    copied: bool = False  # whether any tensor of the bucket is a contiguous copy of the input
    positions: tuple[int, ...] = ()  # position in the input lists of each tensor of the bucket

    @property
    def bases(self) -> list[torch.Tensor]:
        """One tensor per list; its pointer is the list's base."""
        return [tensors[0] for tensors in self.tensors]


class _LRU(OrderedDict):
    def get_or_make(self, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        value = self.get(key)
        if value is None:
            value = make()
            self[key] = value
            if len(self) > _CACHE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


# Keyed by their contents, so a cached table can never describe other tensors. Saves the
# host-to-device copy on every step after the first.
_TABLES = _LRU()
_BLOCK_MAPS = _LRU()


def ceil_div(numel: int, block: int) -> int:
    """⌈numel / block⌉ on the host. Plain integer math: triton.cdiv is a jit function, ~6 µs
    per call from Python, which adds up on a per-step path over hundreds of tensors."""
    return -(-numel // block)


def _block_map(numels: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    def make() -> torch.Tensor:
        counts = torch.tensor([ceil_div(n, block) for n in numels], dtype=torch.int64)
        tensor_ids = torch.arange(len(numels), dtype=torch.int32)
        return torch.repeat_interleave(tensor_ids, counts).to(device)

    return _BLOCK_MAPS.get_or_make((numels, block, device), make)


def _element_offsets(pointers: Sequence[int], size: int) -> tuple[int, ...]:
    """Each address's distance from the first, in elements of ``size`` bytes."""
    first = pointers[0]
    deltas = [ptr - first for ptr in pointers]
    if any(delta % size for delta in deltas):  # cannot happen for same-dtype tensors
        raise ValueError("tensors of one list are not aligned to their element size")
    return tuple(delta // size for delta in deltas)


def _table(pointers: tuple[tuple[int, ...], ...], sizes: tuple[int, ...], numels: tuple[int, ...], block: int,
           device: torch.device) -> torch.Tensor:
    # Keyed by the table's contents, not the addresses: the same addresses hold tensors of another
    # dtype from one call to the next, and element offsets depend on the element size.
    rows = tuple(_element_offsets(ptrs, size) for ptrs, size in zip(pointers, sizes))

    def make() -> torch.Tensor:
        firsts, total = [], 0
        for n in numels:
            firsts.append(total)
            total += ceil_div(n, block)
        return torch.tensor([*rows, list(numels), firsts], dtype=torch.int64).to(device)

    return _TABLES.get_or_make((rows, numels, block, device), make)


_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_OFFSETS = _LRU()


def operand_offsets(operands: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """For a batch of matrices given as one list per operand (same dtype within a list): an int64
    (operands, matrices) table on ``device`` of each matrix's element offset from the list's
    first. Kernels add row ``l``, column ``b`` to operand ``l``'s base pointer for matrix ``b``.
    Cached by the offsets themselves, so a batch laid out the same way every step costs no copy."""
    rows = [_element_offsets(tuple(map(_data_ptr, operand)), operand[0].element_size()) for operand in operands]
    key = (tuple(rows), device)
    return _OFFSETS.get_or_make(key, lambda: torch.tensor(rows, dtype=torch.int64).to(device))


def plan_launches(
    lists: Sequence[Sequence[torch.Tensor]],
    written: Sequence[bool],
    block: int,
    dtypes: Sequence[torch.dtype],
) -> tuple[list[MultiTensorLaunch], Callable[[], None]]:
    """Bucket parallel tensor lists by (device, dtypes) and build one launch per bucket.

    ``written[l]`` says whether the kernel writes list ``l``; every tensor's dtype must be in
    ``dtypes`` (else ValueError). Returns the launches and a function to call after them, which
    copies results of copied-in tensors back to the originals. This runs on every optimizer
    step, so it is kept to a few cheap calls per tensor.
    """
    copies_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    first_indices: dict[tuple, int] = {}
    positions: dict[tuple, list[int]] = {}
    copied_buckets: set[tuple] = set()
    for position, items in enumerate(zip(*lists)):
        first = items[0]
        if first.numel() == 0:
            continue
        copied = False
        if not all(map(_is_contiguous, items)):
            strides = first.stride()
            if not all(is_dense(t) and t.stride() == strides for t in items):
                work = []
                for tensor, is_written in zip(items, written):
                    copy = tensor.contiguous()
                    if is_written and copy is not tensor:
                        copies_back.append((tensor, copy))
                    work.append(copy)
                items, copied = tuple(work), True
        key = (first.device, *[t.dtype for t in items])
        if copied:
            copied_buckets.add(key)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [[] for _ in lists]
            first_indices[key] = position
            positions[key] = []
        positions[key].append(position)
        for out, tensor in zip(bucket, items):
            out.append(tensor)

    launches = []
    for key, bucket in buckets.items():
        device, *bucket_dtypes = key
        for index, dtype in enumerate(bucket_dtypes):
            if dtype not in dtypes:
                raise ValueError(f"this kernel supports {tuple(dtypes)}; tensor list {index} holds {dtype}")
        pointers = tuple(tuple(map(_data_ptr, tensors)) for tensors in bucket)
        sizes = tuple(tensors[0].element_size() for tensors in bucket)
        numels = tuple(t.numel() for t in bucket[0])
        # All addresses are 16-byte aligned iff their bitwise OR is.
        aligns = [
            _VECTOR_BYTES // size if size <= _VECTOR_BYTES and functools.reduce(operator.or_, ptrs) % _VECTOR_BYTES == 0
            else 1
            for ptrs, size in zip(pointers, sizes)
        ]
        launches.append(MultiTensorLaunch(
            tensors=bucket,
            table=_table(pointers, sizes, numels, block, device),
            block_tensor=_block_map(numels, block, device),
            num_tensors=len(numels),
            num_blocks=sum(ceil_div(n, block) for n in numels),
            aligns=aligns,
            first_index=first_indices[key],
            copied=key in copied_buckets,
            positions=tuple(positions[key]),
        ))

    def finish() -> None:
        for original, copy in copies_back:
            original.copy_(copy)

    return launches, finish


# Launch plans of earlier calls, keyed by everything a plan and the skipped checks depend on
# (addresses, shapes, dtypes, and strides where not contiguous): an optimizer calls with the same
# tensors every step, and a hit skips the per-tensor validation and bucketing (the step's host
# time, ~1 ms for 200 tensors, is otherwise comparable to the kernel's). Plans hold no tensors: a
# hit takes its base pointers from the call's own lists.
_PLANS = _LRU()
_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


def _signature(kernel: Callable, block: int, lists: list[list[torch.Tensor]]) -> tuple:
    return (kernel, block, lists[0][0].device if lists[0] else None,
            *(tuple(map(_data_ptr, tensors)) for tensors in lists),
            *(tuple(map(_shape_of, tensors)) for tensors in lists),
            *(tuple(map(_dtype_of, tensors)) for tensors in lists),
            *(None if all(map(_is_contiguous, tensors)) else tuple(map(torch.Tensor.stride, tensors))
              for tensors in lists))


_VALUE_TENSORS = _LRU()


def values_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``, cached by the values: a launch argument that is
    the same every step costs no host-to-device copy after the first."""
    values = tuple(values)
    return _VALUE_TENSORS.get_or_make((values, dtype, device), lambda: torch.tensor(values, dtype=dtype).to(device))


def _side_arrays(per_tensor: Sequence[tuple[Sequence[float], torch.dtype]], positions: Sequence[int],
                 device: torch.device) -> list[torch.Tensor]:
    """Per-tensor values in a bucket's order, as device tensors."""
    return [values_tensor([values[p] for p in positions], dtype, device) for values, dtype in per_tensor]


def launch_elementwise(
    kernel: Callable,
    lists: dict[str, torch.Tensor | Sequence[torch.Tensor]],
    *,
    written: Sequence[bool],
    block: int,
    dtypes: Sequence[torch.dtype],
    scalars: Sequence[float],
    align_names: Sequence[str],
    num_warps: int,
    per_tensor: Sequence[tuple[Sequence[float], torch.dtype]] = (),
    pointers: Sequence[torch.Tensor] = (),
    **constexprs: object,
) -> None:
    """Run an element-wise multi-tensor kernel over parallel lists (checked as the reference
    checks them): one launch per (device, dtypes) bucket. The kernel's arguments are the lists'
    base pointers, ``table, block_tensor, num_tensors``, one array per ``per_tensor`` entry
    (values given per input tensor, passed in the bucket's order as tensors of that dtype),
    ``pointers`` (tensors passed as they are), then ``scalars``; its constexprs are one
    alignment per list (``align_names``), ``BLOCK`` and ``constexprs``."""
    values = [as_tensor_list(name, tensors) for name, tensors in lists.items()]
    signature = _signature(kernel, block, values) if all(len(t) == len(values[0]) for t in values) else None
    plans = _PLANS.get(signature) if signature is not None else None
    if plans is None:  # validate, bucket, and launch on the planned tensors (copies included)
        check_parallel_lists(**dict(zip(lists, values)))
        launches, finish = plan_launches(values, written=written, block=block, dtypes=dtypes)
        for launch in launches:
            sides = _side_arrays(per_tensor, launch.positions, launch.bases[0].device)
            _launch(kernel, launch.bases, launch.table, launch.block_tensor, launch.num_tensors, launch.num_blocks,
                    launch.aligns, [*sides, *pointers, *scalars], align_names, block, num_warps, constexprs)
        finish()
        if not any(launch.copied for launch in launches):  # then valid for the same tensors again
            _PLANS.get_or_make(signature, lambda: [
                (launch.table, launch.block_tensor, launch.num_tensors, launch.num_blocks, launch.aligns,
                 launch.first_index, launch.positions) for launch in launches])
        return
    for table, block_tensor, num_tensors, num_blocks, aligns, first, positions in plans:
        bases = [tensors[first] for tensors in values]
        sides = _side_arrays(per_tensor, positions, bases[0].device) if per_tensor else []
        _launch(kernel, bases, table, block_tensor, num_tensors, num_blocks, aligns,
                [*sides, *pointers, *scalars], align_names, block, num_warps, constexprs)


def _launch(kernel: Callable, bases: Sequence[torch.Tensor], table: torch.Tensor, block_tensor: torch.Tensor,
            num_tensors: int, num_blocks: int, aligns: Sequence[int], arguments: Sequence[object],
            align_names: Sequence[str], block: int, num_warps: int, constexprs: dict[str, object]) -> None:
    kernel[(num_blocks,)](*bases, table, block_tensor, num_tensors, *arguments, **dict(zip(align_names, aligns)),
                          BLOCK=block, num_warps=num_warps, **constexprs)
