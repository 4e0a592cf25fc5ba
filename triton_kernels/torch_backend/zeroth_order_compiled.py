"""The zeroth-order pass on a CPU as two loops per slice compiled with ``torch.compile``; used by the
``"torch"`` backend's :func:`~memzoo.triton_kernels.torch_backend.zeroth_order.zo_apply_` for
large passes.

Eager PyTorch cannot make the Philox stream cheap: each of the ~100 integer operations of a
Philox call reads and writes memory. Inductor fuses them into one vectorized C++ loop. A pass
runs in slices of :data:`SLICE` elements (a static shape: one compile serves every tensor), each
slice in three stages:

1. compiled: the Philox words of the slice's counters (one call per four elements) and, from
   them, the Box–Muller inputs ``u1`` (clamped) and ``θ = 2π·u2``, exactly as the reference;
2. eager, on those two buffers: ``r = √(−2·ln u1)``, ``cos θ``, ``sin θ`` — the reference's own
   PyTorch calls: on a CPU eager PyTorch computes ``log``/``sqrt``/``sin``/``cos`` with MKL (or
   Sleef), which differ from inductor's Sleef by an ulp on some inputs, so these stay eager and
   z is the reference's z bit for bit;
3. compiled: z = the four lanes ``r·cos θ``, ``r·sin θ`` per Philox call, then recover / update /
   perturb of the reference, in place in the tensor's memory. Sparse-MeZO's mask is read from
   the mask bytes of the slice (widened to int32 words by an eager copy); its first pass packs
   the mask of the unperturbed values into those words first (a fourth compiled stage).

The hyperparameters and the Philox key are tensors, so steps never recompile. Full slices of a
tensor are updated in place; each tensor's last partial slice (and small tensors) goes through a
one-slice scratch tensor, several per call, each on a chunk boundary with its own counters.
Extra memory of a pass (:func:`scratch_bytes`): 6 bytes per slice element for the Box–Muller
buffers, one slice of the parameters' dtype, an eighth of a byte for mask bytes and half a byte for
them widened to int32 (Sparse-MeZO), per-chunk tables,
and the compiled loops' one temporary (the stacked Box–Muller inputs, then the slice's z: 4 bytes
per element): about 0.9 MiB at 2^16 float32 elements (0.75 MiB for bf16).

Where no C++ compiler works (or ``torch.compile`` fails for any other reason) the first failure
is reported once with a warning and every later pass runs eagerly: the results are the same
(:class:`~memzoo.triton_kernels.torch_backend.compiled.CompiledPass`, one failure for the four stages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memzoo.reference.common import compute_dtype, is_dense
from memzoo.reference.random import _MASK32, _box_muller_inputs
from memzoo.reference.zeroth_order import CHUNK, LANES, MASK_BYTES_PER_CHUNK, QUARTER
from memzoo.triton_kernels.torch_backend.compiled import MIN_NUMEL, CompiledPass, CompileFailure, compile_policy
from memzoo.triton_kernels.torch_backend.elementwise import memory_order_view
from memzoo.triton_kernels.torch_backend.random import box_muller_, philox_rounds

__all__ = ["SLICE", "apply_compiled", "compiles", "scratch_bytes"]

# Elements per compiled call: a multiple of CHUNK. 2^16 keeps the scratch (about 10 bytes per
# element) under 1 MiB and the slice's buffers in L2; larger slices were not faster here.
SLICE = 1 << 16
_DEVICES = ("cpu",)  # on accelerators the eager path is kernel launches, not memory-bound loops

# Inductor drops a rounding to bf16/fp16 followed by a widening unless told to emulate eager casts;
# the reference rounds after recovering and after updating.
_OPTIONS = {"emulate_precision_casts": True}
# The masked pass uses the recovered values twice (update, and where the mask is off); past 50
# operations inductor would store them in a temporary slice and read it back: recomputing is cheaper.
_MASKED_OPTIONS = {**_OPTIONS, "realize_cpu_opcount_threshold": 1000}
_FAILURE = CompileFailure()  # one warning for the four stages; all eager once one has failed


# -- the compiled stages -------------------------------------------------------------------------
def _philox_box_muller_inputs(u1: torch.Tensor, angle: torch.Tensor, chunk_counters: torch.Tensor,
                       key: torch.Tensor) -> None:
    """Stage 1: for chunk m of the slice and k < 256, Philox-4x32-10 of counter
    ``chunk_counters[m] + k`` under ``key`` (k0, k1), and the Box–Muller inputs of both word
    pairs: ``u1[p, m, k]``, ``angle[p, m, k]`` for p = 0 (words 0, 1) and p = 1 (words 2, 3).

    The rounds are :func:`memzoo.triton_kernels.torch_backend.random.philox_rounds`, which the
    torch backend's compiled Philox draws trace too."""
    counters = chunk_counters.unsqueeze(1) + torch.arange(QUARTER, dtype=torch.int64, device=chunk_counters.device)
    # The low 32 bits of each word: its signed pattern.
    words = [word.to(torch.int32) for word in philox_rounds(counters, key[0], key[1])]
    first, second = _box_muller_inputs(words[0], words[1]), _box_muller_inputs(words[2], words[3])
    u1.copy_(torch.stack([first[0], second[0]]))
    angle.copy_(torch.stack([first[1], second[1]]))


def _pass_stages(x: torch.Tensor, radius: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 hyper: torch.Tensor, selected: torch.Tensor | None) -> None:
    """Stage 3: z of the slice from the Box–Muller outputs (lanes 0–3 of a chunk: r·cos θ and
    r·sin θ of word pair 0, then of pair 1), then the reference's recover / update / perturb of
    ``x`` in place. ``hyper`` = (ε, from_sign, to_sign, c_0, decay, clamp_min) in the compute
    dtype (an update with c_0 = 0, decay = 1, clamp_min = −inf leaves every value as it is).
    ``selected`` (Sparse-MeZO) has the mask bytes' layout: (lanes, 8, 32), element b·32 + j of a
    lane being bit b of its byte j; the values are viewed in that shape too."""
    chunks = x.numel() // CHUNK
    shape = (chunks, LANES, QUARTER) if selected is None else selected.shape
    dtype = hyper.dtype
    z = torch.stack([radius[0] * cos[0], radius[0] * sin[0], radius[1] * cos[1], radius[1] * sin[1]], dim=1)
    z = z.to(dtype).view(shape)
    view = x.view(shape)
    values = view.to(dtype)
    eps, from_sign, to_sign, coefficient, decay, clamp_min = hyper.unbind()
    perturbation = eps * z
    if selected is not None:
        perturbation = torch.where(selected, perturbation, 0.0)
    values = (values - from_sign * perturbation).to(x.dtype).to(dtype)
    updated = torch.clamp(values * decay - coefficient * z, min=clamp_min)
    if selected is not None:
        updated = torch.where(selected, updated, values)
    values = updated.to(x.dtype).to(dtype)
    view.copy_(values + to_sign * perturbation)


def _pass_dense(x: torch.Tensor, radius: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                hyper: torch.Tensor) -> None:
    _pass_stages(x, radius, cos, sin, hyper, None)


# Sparse-MeZO's mask bytes go through the compiled stages widened to int32 (one eager copy each
# way): inductor's CPU loops load and store uint8 (and bool) vectors slowly, which made a masked
# pass cost 1.4x a dense one.
def _pass_reading_mask(x: torch.Tensor, radius: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       hyper: torch.Tensor, mask_words: torch.Tensor) -> None:
    """The pass with the mask read from its bytes (:func:`~memzoo.reference.zeroth_order.unpack_mask`'s
    bits), each held in an int32."""
    shifts = torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1)
    _pass_stages(x, radius, cos, sin, hyper, ((mask_words.view(-1, 1, 32) >> shifts) & 1) != 0)


def _mask_words(mask_words: torch.Tensor, x: torch.Tensor, hyper: torch.Tensor, thresholds: torch.Tensor) -> None:
    """Sparse-MeZO's mask |x| ≤ h of the unperturbed values (h per chunk) as the bytes of
    :func:`~memzoo.reference.zeroth_order.pack_mask`, each held in an int32. Elements past a
    tensor's end are NaN in the slice (:func:`apply_compiled`), so their bits are 0 as the
    reference pads a tensor's last chunk."""
    selected = (x.view(-1, LANES, 8, 32).to(hyper.dtype).abs() <= thresholds.view(-1, 1, 1, 1)).view(-1, 8, 32)
    bits = selected.to(torch.int32)
    packed = bits[:, 0]
    for bit in range(1, 8):
        packed = packed | (bits[:, bit] << bit)
    mask_words.copy_(packed.view(-1))


_STAGES = {name: CompiledPass(fn, "zeroth-order pass", failure=_FAILURE, dynamic=False, options=options)
           for name, fn, options in (("philox", _philox_box_muller_inputs, _OPTIONS), ("dense", _pass_dense, _OPTIONS),
                                     ("read", _pass_reading_mask, _MASKED_OPTIONS), ("pack", _mask_words, _OPTIONS))}


# -- the driver ------------------------------------------------------------------------------------
def scratch_bytes(dtype: torch.dtype, slice_numel: int | None = None) -> int:
    """Bytes of the scratch one pass allocates (see the module docstring)."""
    numel = SLICE if slice_numel is None else slice_numel
    chunks = numel // CHUNK
    return (6 * numel + 4 * numel + numel * dtype.itemsize + numel // 8 + numel // 2
            + chunks * (8 + compute_dtype(dtype).itemsize))


def compiles(params: Sequence[torch.Tensor], earlier_seeds: Sequence[int]) -> bool:
    """Whether :func:`apply_compiled` takes this pass: one seed (an update with several samples'
    directions runs eagerly) and, under the shared policy of
    :mod:`~memzoo.triton_kernels.torch_backend.compiled` (``MEMZOO_TORCH_COMPILE``), ``always``, or
    ``auto`` with CPU tensors of at least its ``MIN_NUMEL`` elements in all (compiling costs
    10-40 s once per process, a few from inductor's on-disk cache)."""
    policy = compile_policy()
    if earlier_seeds or policy == "never":
        return False
    return policy == "always" or sum(p.numel() for p in params if p.device.type in _DEVICES) >= MIN_NUMEL


class _Tables:
    """Per chunk of a slice: its first Philox counter and Sparse-MeZO's threshold."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        chunks = SLICE // CHUNK
        self.counters = torch.empty(chunks, dtype=torch.int64, device=device)
        self.thresholds = torch.empty(chunks, dtype=compute_dtype(dtype), device=device)


class _Slab:
    """The scratch of one pass over tensors of one dtype: Box–Muller buffers, the tables of the
    slice in progress (``whole``: a tensor's full slices, in place) and of ``values``, one slice
    gathering the partial slices of tensors (several, each from a chunk boundary)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, masked: bool) -> None:
        chunks = SLICE // CHUNK
        self.radius, self.cos, self.sin = (torch.empty(2, chunks, QUARTER, device=device) for _ in range(3))
        self.counter_steps = torch.arange(chunks, dtype=torch.int64, device=device) * QUARTER
        self.whole, self.pieces = _Tables(dtype, device), _Tables(dtype, device)
        self.values = torch.empty(SLICE, dtype=dtype, device=device)
        self.mask_bits = torch.empty(chunks * MASK_BYTES_PER_CHUNK if masked else 0, dtype=torch.uint8,
                                     device=device)
        self.mask_words = torch.empty(self.mask_bits.numel(), dtype=torch.int32, device=device)
        # Pieces waiting in ``values``: (tensor's elements, its mask bytes or None, first chunk, chunks).
        self.pending: list[tuple[torch.Tensor, torch.Tensor | None, int, int]] = []
        self.used_chunks = 0


@torch.no_grad()
def apply_compiled(params: list[torch.Tensor], stream_offsets: Sequence[int], *, seed: int, eps: float,
                   from_sign: int, to_sign: int, coefficients: torch.Tensor | None, decay: float,
                   clamp_min: float | None, thresholds: Sequence[float] | None, mask_bits: torch.Tensor | None,
                   mask_offsets: Sequence[int] | None, write_mask: bool) -> list[int]:
    """The pass of :func:`memzoo.reference.zeroth_order.zo_apply_` (arguments already checked,
    no earlier seeds) over the dense CPU tensors of ``params``; returns the indices of the tensors
    it left to the caller (others: not dense, or not on a CPU)."""
    left = [index for index, p in enumerate(params)
            if p.numel() and (p.device.type not in _DEVICES or not is_dense(p))]
    taken = sorted(set(index for index, p in enumerate(params) if p.numel()) - set(left))
    key = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64)
    mode = "dense" if thresholds is None else ("write" if write_mask else "read")
    slabs: dict[tuple[torch.dtype, torch.device], _Slab] = {}
    hypers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for index in taken:
        param = params[index]
        where = (param.dtype, param.device)
        if where not in slabs:
            slabs[where] = _Slab(param.dtype, param.device, mode != "dense")
            hyper = torch.tensor([eps, from_sign, to_sign, 0.0, 1.0 if coefficients is None else decay,
                                  -math.inf if clamp_min is None else clamp_min],
                                 dtype=compute_dtype(param.dtype), device=param.device)
            if coefficients is not None:
                hyper[3:4].copy_(coefficients[:1])
            hypers[where] = hyper
        slab, hyper = slabs[where], hypers[where]
        elements = memory_order_view(param)
        first_chunk = stream_offsets[index] // CHUNK
        threshold = 0.0 if thresholds is None else float(thresholds[index])
        bits = None if mask_bits is None else mask_bits[mask_offsets[index]:]
        whole = param.numel() - param.numel() % SLICE
        if whole:
            slab.whole.thresholds.fill_(threshold)
        for start in range(0, whole, SLICE):
            torch.add(slab.counter_steps, (first_chunk + start // CHUNK) * QUARTER, out=slab.whole.counters)
            slice_bits = None if bits is None else bits[start // 8:(start + SLICE) // 8]
            _slice(elements[start:start + SLICE], slab, slab.whole, hyper, key, mode, slice_bits)
        if whole < param.numel():
            count = param.numel() - whole
            chunks = -(-count // CHUNK)
            if slab.used_chunks + chunks > SLICE // CHUNK:
                _flush(slab, hyper, key, mode)
            at = slab.used_chunks
            slab.values[at * CHUNK:at * CHUNK + count].copy_(elements[whole:])
            tables = slab.pieces
            torch.add(slab.counter_steps[:chunks], (first_chunk + whole // CHUNK) * QUARTER,
                      out=tables.counters[at:at + chunks])
            tables.thresholds[at:at + chunks].fill_(threshold)
            if mode == "write":  # no mask bits past the tensor's end (|NaN| <= h is False)
                slab.values[at * CHUNK + count:(at + chunks) * CHUNK].fill_(math.nan)
            piece_bits = None if bits is None else bits[whole // 8:whole // 8 + chunks * MASK_BYTES_PER_CHUNK]
            if piece_bits is not None and mode == "read":
                slab.mask_bits[at * MASK_BYTES_PER_CHUNK:(at + chunks) * MASK_BYTES_PER_CHUNK].copy_(piece_bits)
            slab.pending.append((elements[whole:], piece_bits, at, chunks))
            slab.used_chunks += chunks
    for where, slab in slabs.items():
        if slab.pending:
            _flush(slab, hypers[where], key, mode)
    return left


def _slice(values: torch.Tensor, slab: _Slab, tables: _Tables, hyper: torch.Tensor, key: torch.Tensor, mode: str,
           mask_bits: torch.Tensor | None) -> None:
    """The three stages over one slice of :data:`SLICE` elements described by ``tables``."""
    _STAGES["philox"](slab.radius, slab.cos, tables.counters, key)
    box_muller_(slab.radius, slab.cos, slab.sin)  # the reference's eager calls (module docstring)
    if mode == "dense":
        _STAGES["dense"](values, slab.radius, slab.cos, slab.sin, hyper)
        return
    if mode == "read":
        slab.mask_words.copy_(mask_bits)
    else:  # the mask of the unperturbed values, then the pass that reads it
        _STAGES["pack"](slab.mask_words, values, hyper, tables.thresholds)
        mask_bits.copy_(slab.mask_words)
    _STAGES["read"](values, slab.radius, slab.cos, slab.sin, hyper, slab.mask_words)


def _flush(slab: _Slab, hyper: torch.Tensor, key: torch.Tensor, mode: str) -> None:
    """Run the slice of partial pieces gathered in ``slab.values`` and write them back."""
    unused = slab.used_chunks
    if mode == "write":  # the slice's unused chunks: no mask bits, results dropped
        slab.values[unused * CHUNK:].fill_(math.nan)
    slab.pieces.counters[unused:].fill_(0)
    _slice(slab.values, slab, slab.pieces, hyper, key, mode, slab.mask_bits if mode != "dense" else None)
    for elements, piece_bits, at, chunks in slab.pending:
        elements.copy_(slab.values[at * CHUNK:at * CHUNK + elements.numel()])
        if mode == "write":
            piece_bits.copy_(slab.mask_bits[at * MASK_BYTES_PER_CHUNK:(at + chunks) * MASK_BYTES_PER_CHUNK])
    slab.pending.clear()
    slab.used_chunks = 0
