"""The kernels ``memzoo-bench kernels`` (and ``python -m memzoo.bench.tune``) time: one record
per kernel/reference pair, with the generator of a call's inputs and the bytes the call moves.
tests/kernel_cases.py adds to each record what the equivalence tests need (hypothesis spaces and
error bounds), so a new kernel is benchmarked by adding a record here and tested by adding its
test record there (a test checks that the two lists agree).

Importing this module does not import Triton: :meth:`KernelPair.triton` loads the kernel module
on demand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from memzoo.triton_kernels import load_family

__all__ = ["KERNELS", "LAYOUTS", "KernelCase", "KernelPair", "Layout", "as_list", "clone_case", "make_tensor"]

Layout = Literal["contiguous", "transposed", "strided"]
LAYOUTS: tuple[str, ...] = ("contiguous", "transposed", "strided")


@dataclass
class KernelCase:
    """Inputs of one call: ``function(*args, **kwargs)`` writes the args at ``outputs``
    (each arg a tensor or a list of tensors; tensors in kwargs are read-only inputs)."""

    args: tuple[list[torch.Tensor] | torch.Tensor | None, ...]
    kwargs: dict[str, Any]
    outputs: tuple[int, ...]


def as_list(arg: list[torch.Tensor] | torch.Tensor | None) -> list[torch.Tensor]:
    """An argument of a case as a list of tensors (an absent optional argument as none)."""
    if arg is None:
        return []
    return [arg] if isinstance(arg, torch.Tensor) else arg


def clone_case(case: KernelCase) -> KernelCase:
    """A deep copy of the args keeping each tensor's strides (views stay views of a fresh base)."""

    def clone(tensor: torch.Tensor) -> torch.Tensor:
        base = torch.empty(tensor.untyped_storage().nbytes() // tensor.element_size(),
                           dtype=tensor.dtype, device=tensor.device)
        base.untyped_storage().copy_(tensor.untyped_storage())
        return base.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    return KernelCase(
        args=tuple(clone(arg) if isinstance(arg, torch.Tensor) else None if arg is None
                   else [clone(t) if isinstance(t, torch.Tensor) else t for t in arg] for arg in case.args),
        kwargs=dict(case.kwargs),
        outputs=case.outputs,
    )


def make_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                generator: torch.Generator, layout: Layout = "contiguous") -> torch.Tensor:
    """A standard-normal tensor of ``shape`` laid out as asked:
    ``transposed`` is dense with the dimension order reversed (and so is not contiguous for 2+
    dims), ``strided`` takes every other element of a larger tensor's last dimension (not dense).
    """
    shape = tuple(shape)

    def normal(size: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(size), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    if layout == "contiguous" or len(shape) == 0:
        return normal(shape)
    if layout == "transposed":
        return normal(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "strided":
        return normal((*shape[:-1], 2 * shape[-1]))[..., ::2]
    raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class KernelPair:
    """A reference function and its twins, Triton and torch (same name in every family module),
    with how to build a call of it and what the call must move."""

    family: str
    function: str
    # Options of each dtype role (the first is the benchmark's); None means "same as the param".
    dtype_options: Mapping[str, tuple[torch.dtype | None, ...]]
    # Hyperparameters of the benchmark's call (discrete ones, e.g. projection side and rank, included).
    bench_hparams: Mapping[str, Any]
    # make_case(shapes, dtypes, device, generator, hparams, layout) -> KernelCase
    make_case: Callable[..., KernelCase]
    # Bytes a call must read and write at least: the bandwidth floor's numerator.
    bytes_moved: Callable[[KernelCase], int]
    # Dimensions of the tensors a call takes (at least 2: matrices, the projected weights).
    shape_dims: tuple[int, int] = (0, 3)

    @property
    def name(self) -> str:
        return f"{self.family}.{self.function}"

    def reference(self) -> Callable[..., None]:
        return getattr(importlib.import_module(f"memzoo.reference.{self.family}"), self.function)

    def triton(self) -> Callable[..., None]:
        return getattr(load_family(self.family), self.function)

    def torch_path(self) -> Callable[..., None]:
        """The ``"torch"`` backend's twin (:mod:`memzoo.triton_kernels.torch_backend`)."""
        return getattr(importlib.import_module(f"memzoo.triton_kernels.torch_backend.{self.family}"), self.function)

    def implementation(self, backend: str) -> Callable[..., None]:
        """The function of ``backend``: "reference", "torch" or "triton"."""
        return {"reference": self.reference, "torch": self.torch_path, "triton": self.triton}[backend]()


# ---- Lion ---------------------------------------------------------------------------------

def _lion_case(shapes: Sequence[Sequence[int]], dtypes: Mapping[str, torch.dtype | None],
               device: torch.device | str, generator: torch.Generator, hparams: Mapping[str, Any],
               layout: Layout = "contiguous") -> KernelCase:
    param_dtype = dtypes["param"]
    state_dtype = dtypes.get("state") or param_dtype
    params = [make_tensor(s, param_dtype, device, generator, layout) for s in shapes]
    grads = [make_tensor(s, param_dtype, device, generator, layout) for s in shapes]
    exp_avgs = [make_tensor(s, state_dtype, device, generator, layout) for s in shapes]
    # Some elements with g = m = 0, so c = 0 exactly and sign(0) = 0 is exercised.
    for grad, exp_avg in zip(grads, exp_avgs):
        zero = (torch.rand(grad.shape, generator=generator) < 0.1).to(grad.device)
        grad.masked_fill_(zero, 0.0)
        exp_avg.masked_fill_(zero, 0.0)
    return KernelCase(args=(params, grads, exp_avgs), kwargs=dict(hparams), outputs=(0, 2))


def _lion_bytes(case: KernelCase) -> int:
    params, grads, exp_avgs = case.args
    return sum(2 * p.nbytes + g.nbytes + 2 * m.nbytes for p, g, m in zip(params, grads, exp_avgs))


LION = KernelPair(
    family="lion",
    function="lion_update_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16),
                   "state": (None, torch.float32, torch.bfloat16)},
    bench_hparams={"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.01, "maximize": False},
    make_case=_lion_case,
    bytes_moved=_lion_bytes,
)


# ---- GaLore --------------------------------------------------------------------------------

def _galore_factors(shape, side, rank, dtype, device, generator):
    from memzoo.reference.projector import matrix_shape

    m, n = matrix_shape(shape)
    rank = min(rank, m, n)
    left = make_tensor((m, rank), dtype, device, generator) if side in ("left", "full") else None
    right = make_tensor((rank, n), dtype, device, generator) if side in ("right", "full") else None
    low_rank = (rank if left is not None else m, rank if right is not None else n)
    return left, right, low_rank


def _galore_batch(shapes, hparams) -> tuple[list, str, int, dict]:
    """The matrices of a GaLore batch case: the drawn shapes, or (``batch="same"``) the first
    shape repeated, so that one launch serves several matrices."""
    hparams = dict(hparams)
    side, rank, batch = hparams.pop("side"), hparams.pop("rank"), hparams.pop("batch", "mixed")
    shapes = [shapes[0]] * len(shapes) if batch == "same" else list(shapes)
    return shapes, side, rank, hparams


def _projected_moments(shape, side, rank, dtypes, device, generator, layout):
    """A gradient of ``shape``, its factors, and rank-r Adam moments (v ≥ 0): the inputs of the
    projection kernels. Returns (grad, exp_avg, exp_avg_sq, left, right, low_rank shape)."""
    state_dtype = dtypes.get("state") or dtypes["param"]
    left, right, low_rank = _galore_factors(shape, side, rank, dtypes["param"], device, generator)
    grad = make_tensor(shape, dtypes["param"], device, generator, layout)
    exp_avg = make_tensor(low_rank, state_dtype, device, generator, layout)
    exp_avg_sq = make_tensor(low_rank, state_dtype, device, generator, layout).abs_()
    return grad, exp_avg, exp_avg_sq, left, right, low_rank


def _galore_project_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    shapes, side, rank, hparams = _galore_batch(shapes, hparams)
    grads, exp_avgs, exp_avg_sqs, updates, lefts, rights = [], [], [], [], [], []
    for shape in shapes:
        grad, exp_avg, exp_avg_sq, left, right, low_rank = _projected_moments(shape, side, rank, dtypes, device,
                                                                              generator, layout)
        for out, value in zip((grads, exp_avgs, exp_avg_sqs, updates, lefts, rights),
                              (grad, exp_avg, exp_avg_sq, torch.empty(low_rank, dtype=torch.float32, device=device),
                               left, right)):
            out.append(value)
    return KernelCase(args=(grads, exp_avgs, exp_avg_sqs, updates),
                      kwargs={"lefts": lefts, "rights": rights, **hparams}, outputs=(1, 2, 3))


def _factor_bytes(case: KernelCase) -> int:
    return sum(f.nbytes for name in ("lefts", "rights") for f in case.kwargs[name] if f is not None)


def _galore_project_bytes(case: KernelCase) -> int:
    grads, exp_avgs, exp_avg_sqs, updates = case.args
    return _factor_bytes(case) + sum(g.nbytes + 2 * (m.nbytes + v.nbytes) + u.nbytes
                                     for g, m, v, u in zip(grads, exp_avgs, exp_avg_sqs, updates))


def _galore_apply_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    shapes, side, rank, hparams = _galore_batch(shapes, hparams)
    params, updates, lefts, rights = [], [], [], []
    for shape in shapes:
        left, right, low_rank = _galore_factors(shape, side, rank, dtypes["param"], device, generator)
        lefts.append(left)
        rights.append(right)
        params.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        updates.append(make_tensor(low_rank, torch.float32, device, generator))
    return KernelCase(args=(params, updates), kwargs={"lefts": lefts, "rights": rights, **hparams}, outputs=(0,))


def _galore_apply_bytes(case: KernelCase) -> int:
    params, updates = case.args
    return _factor_bytes(case) + sum(2 * p.nbytes + u.nbytes for p, u in zip(params, updates))


GALORE_PROJECT = KernelPair(
    family="galore",
    function="galore_adam_project_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    bench_hparams={"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "maximize": False, "side": "right", "rank": 256},
    make_case=_galore_project_case,
    bytes_moved=_galore_project_bytes,
    shape_dims=(2, 3),
)


GALORE_APPLY = KernelPair(
    family="galore",
    function="galore_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    bench_hparams={"step_size": 1e-3, "scale": 0.25, "lr": 1e-3, "weight_decay": 0.0, "side": "right", "rank": 256},
    make_case=_galore_apply_case,
    bytes_moved=_galore_apply_bytes,
    shape_dims=(2, 3),
)


# ---- APOLLO --------------------------------------------------------------------------------

def _apollo_scales_shape(granularity: str, shape: Sequence[int], side: str) -> tuple[int, int]:
    from memzoo.reference.projector import matrix_shape

    m, n = matrix_shape(shape)
    if granularity == "tensor":
        return (1, 1)
    return (m, 1) if side == "right" else (1, n)  # channels: rows for a right projection


def _apollo_scales_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    hparams = dict(hparams)
    granularity = hparams.pop("granularity")
    shapes, side, rank, hparams = _galore_batch(shapes, hparams)
    grads, exp_avgs, exp_avg_sqs, scales, lefts, rights = [], [], [], [], [], []
    for shape in shapes:
        grad, exp_avg, exp_avg_sq, left, right, _ = _projected_moments(shape, side, rank, dtypes, device, generator,
                                                                       layout)
        factors = torch.empty(_apollo_scales_shape(granularity, shape, side), dtype=torch.float32, device=device)
        for out, value in zip((grads, exp_avgs, exp_avg_sqs, scales, lefts, rights),
                              (grad, exp_avg, exp_avg_sq, factors, left, right)):
            out.append(value)
    return KernelCase(args=(grads, exp_avgs, exp_avg_sqs, scales),
                      kwargs={"lefts": lefts, "rights": rights, **hparams}, outputs=(1, 2, 3))


def _apollo_scales_bytes(case: KernelCase) -> int:
    grads, exp_avgs, exp_avg_sqs, scales = case.args
    return _factor_bytes(case) + sum(g.nbytes + 2 * (m.nbytes + v.nbytes) + s.nbytes
                                     for g, m, v, s in zip(grads, exp_avgs, exp_avg_sqs, scales))


def _apollo_apply_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    hparams = dict(hparams)
    granularity, limiter = hparams.pop("granularity"), hparams.pop("limiter")
    shapes = [shapes[0]] * len(shapes) if hparams.pop("batch") == "same" else list(shapes)
    params, grads, scales, norms = [], [], [], []
    for shape in shapes:
        params.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        grads.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        side = "right" if granularity == "rows" else "left"
        factor_shape = _apollo_scales_shape("tensor" if granularity == "tensor" else "channel", shape, side)
        scales.append(make_tensor(factor_shape, torch.float32, device, generator).abs_())
        # ρ around ‖G⊙s‖, so that some matrices are limited and some are not.
        size = (grads[-1].double().reshape(shape[0], -1) * scales[-1].double()).norm()
        norms.append((size * 2.0 * torch.rand((), generator=generator).double()).float().to(device))
    return KernelCase(args=(params, grads, scales, norms if limiter else None), kwargs=hparams,
                      outputs=(0, 3) if limiter else (0,))


def _apollo_apply_bytes(case: KernelCase) -> int:
    params, grads, scales, _ = case.args
    return sum(2 * p.nbytes + g.nbytes + s.nbytes for p, g, s in zip(params, grads, scales))


APOLLO_SCALES = KernelPair(
    family="apollo",
    function="apollo_scales_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    bench_hparams={"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "maximize": False, "side": "right", "rank": 256,
                   "granularity": "channel"},
    make_case=_apollo_scales_case,
    bytes_moved=_apollo_scales_bytes,
    shape_dims=(2, 3),
)


APOLLO_APPLY = KernelPair(
    family="apollo",
    function="apollo_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    bench_hparams={"step_size": 1e-3, "scale": 1.0, "lr": 1e-3, "weight_decay": 0.0, "growth_limit": 1.01,
                   "record_only": False, "scale_front": False, "maximize": False, "granularity": "rows",
                   "limiter": True, "batch": "same"},
    make_case=_apollo_apply_case,
    bytes_moved=_apollo_apply_bytes,
    shape_dims=(2, 3),
)


# ---- FRUGAL --------------------------------------------------------------------------------

def _frugal_factor(shape, side, rank, kind, dtype, device, generator):
    """A one-sided factor: an orthonormal basis (QR of a Gaussian) or a coordinate selection."""
    from memzoo.reference.projector import matrix_shape, random_coordinates, selection_factor, side_length

    m, n = matrix_shape(shape)
    size = side_length((m, n), side)
    rank = min(rank, size)
    if kind == "coordinates":
        seed = int(torch.randint(0, 2**31, (), generator=generator))
        factor = selection_factor(random_coordinates(seed, size, rank), size, side, dtype).to(device)
    else:
        basis = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64)).Q
        factor = (basis.T if side == "right" else basis).to(device=device, dtype=dtype)
    low_rank = (m, rank) if side == "right" else (rank, n)
    return (None, factor, low_rank) if side == "right" else (factor, None, low_rank)


def _frugal_apply_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    hparams = dict(hparams)
    kind = hparams.pop("factor")
    shapes, side, rank, hparams = _galore_batch(shapes, hparams)
    params, grads, updates, lefts, rights = [], [], [], [], []
    for shape in shapes:
        left, right, low_rank = _frugal_factor(shape, side, rank, kind, dtypes["param"], device, generator)
        lefts.append(left)
        rights.append(right)
        params.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        grads.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        updates.append(make_tensor(low_rank, torch.float32, device, generator))
    return KernelCase(args=(params, grads, updates), kwargs={"lefts": lefts, "rights": rights, **hparams},
                      outputs=(0,))


def _frugal_apply_bytes(case: KernelCase) -> int:
    params, grads, updates = case.args
    return _factor_bytes(case) + sum(2 * p.nbytes + g.nbytes + u.nbytes for p, g, u in zip(params, grads, updates))


FRUGAL_APPLY = KernelPair(
    family="frugal",
    function="frugal_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    bench_hparams={"step_size": 1e-3, "residual_step": 1e-3, "decay": 0.0, "maximize": False, "side": "right",
                   "rank": 256, "factor": "coordinates", "residual_rule": "sign_sgd"},
    make_case=_frugal_apply_case,
    bytes_moved=_frugal_apply_bytes,
    shape_dims=(2, 3),
)


def _frugal_coordinates_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    """Weights, gradients, Adam moments of R (v ≥ 0) and the selected columns (rows) of each."""
    from memzoo.reference.projector import matrix_shape, random_coordinates, side_length

    shapes, side, rank, hparams = _galore_batch(shapes, hparams)
    state_dtype = dtypes.get("state") or dtypes["param"]
    params, grads, exp_avgs, exp_avg_sqs, indices = [], [], [], [], []
    for shape in shapes:
        m, n = matrix_shape(shape)
        size = side_length((m, n), side)
        seed = int(torch.randint(0, 2**31, (), generator=generator))
        chosen = random_coordinates(seed, size, min(rank, size)).to(device)
        low_rank = (m, chosen.numel()) if side == "right" else (chosen.numel(), n)
        params.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        grads.append(make_tensor(shape, dtypes["param"], device, generator, layout))
        exp_avgs.append(make_tensor(low_rank, state_dtype, device, generator, layout))
        exp_avg_sqs.append(make_tensor(low_rank, state_dtype, device, generator, layout).abs_())
        indices.append(chosen)
    return KernelCase(args=(params, grads, exp_avgs, exp_avg_sqs, indices), kwargs={"side": side, **hparams},
                      outputs=(0, 2, 3))


def _frugal_coordinates_bytes(case: KernelCase) -> int:
    params, grads, exp_avgs, exp_avg_sqs, indices = case.args
    return sum(2 * p.nbytes + g.nbytes + 2 * (m.nbytes + v.nbytes) + i.nbytes
               for p, g, m, v, i in zip(params, grads, exp_avgs, exp_avg_sqs, indices))


# The whole update of RandK (coordinate) subspaces, the selection given as indices.
FRUGAL_COORDINATES = KernelPair(
    family="frugal",
    function="frugal_coordinates_step_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    bench_hparams={"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step_size": 1e-3, "residual_step": 1e-3,
                   "decay": 1e-4, "maximize": False, "residual_threshold": 0.5, "side": "right", "rank": 256,
                   "residual_rule": "sign_sgd"},
    make_case=_frugal_coordinates_case,
    bytes_moved=_frugal_coordinates_bytes,
    shape_dims=(2, 3),
)


def _adamw_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    state_dtype = dtypes.get("state") or dtypes["param"]
    params = [make_tensor(s, dtypes["param"], device, generator, layout) for s in shapes]
    grads = [make_tensor(s, dtypes["param"], device, generator, layout) for s in shapes]
    exp_avgs = [make_tensor(s, state_dtype, device, generator, layout) for s in shapes]
    exp_avg_sqs = [make_tensor(s, state_dtype, device, generator, layout).abs_() for s in shapes]
    return KernelCase(args=(params, grads, exp_avgs, exp_avg_sqs), kwargs=dict(hparams), outputs=(0, 2, 3))


def _adamw_bytes(case: KernelCase) -> int:
    params, grads, exp_avgs, exp_avg_sqs = case.args
    return sum(2 * p.nbytes + g.nbytes + 2 * m.nbytes + 2 * v.nbytes
               for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs))


GALORE_ADAMW = KernelPair(
    family="galore",
    function="adamw_update_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    bench_hparams={"step_size": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "lr": 1e-3, "weight_decay": 0.01,
                   "maximize": False, "decay_first": False},
    make_case=_adamw_case,
    bytes_moved=_adamw_bytes,
)


# ---- Zeroth-order ---------------------------------------------------------------------------

# Passes of a step: (from_sign, to_sign) and the number of earlier samples whose directions the
# update adds (None: no update).
ZO_PASSES = {"perturb": (0, 1, None), "flip": (1, -1, None), "restore": (-1, 0, None), "update": (-1, 0, 0),
              "update_q3": (-1, 0, 2)}


def _zo_offsets(params: Sequence[torch.Tensor], multiple: int) -> list[int]:
    from memzoo.reference.zeroth_order import CHUNK

    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += -(-param.numel() // CHUNK) * multiple
    return offsets


def _zo_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    from memzoo.reference.zeroth_order import CHUNK, MASK_BYTES_PER_CHUNK

    params = [make_tensor(s, dtypes["param"], device, generator, layout) for s in shapes]
    from_sign, to_sign, earlier = ZO_PASSES[hparams["pass"]]
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    kwargs: dict[str, Any] = dict(seed=seed, eps=hparams["eps"], from_sign=from_sign, to_sign=to_sign)
    # Stream offsets start past zero so a tensor's counters do not begin at the stream's origin.
    kwargs["stream_offsets"] = [CHUNK * 5 + offset for offset in _zo_offsets(params, CHUNK)]
    if earlier is not None:
        earlier = [seed + 1 + k for k in range(earlier)]
        kwargs.update(earlier_seeds=earlier, decay=1.0 - hparams["decay"], coefficients=(
            torch.randn(1 + len(earlier), generator=generator) * hparams["coefficient"]).to(device))
        if hparams["clamp"]:
            kwargs["clamp_min"] = 0.1
    if hparams["mask"]:
        mask_offsets = _zo_offsets(params, MASK_BYTES_PER_CHUNK)
        total = mask_offsets[-1] + -(-params[-1].numel() // CHUNK) * MASK_BYTES_PER_CHUNK
        kwargs.update(
            thresholds=[float(torch.rand((), generator=generator)) * 1.5 for _ in params],
            mask_offsets=mask_offsets, write_mask=from_sign == 0,
            # Random bits for passes that read the mask; a perturb pass writes its own (the
            # reference first, then the kernel: each pass reads back what it wrote).
            mask_bits=torch.randint(0, 256, (total,), generator=generator, dtype=torch.int32).to(torch.uint8).to(device))
    stream_offsets = kwargs.pop("stream_offsets")
    return KernelCase(args=(params, stream_offsets), kwargs=kwargs, outputs=(0,))


def _zo_bytes(case: KernelCase) -> int:
    return sum(2 * p.nbytes for p in case.args[0])


ZEROTH_ORDER_APPLY = KernelPair(
    family="zeroth_order",
    function="zo_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    bench_hparams={"eps": 1e-3, "pass": "update", "coefficient": 1e-5, "decay": 0.0, "mask": False,
                   "clamp": False},
    make_case=_zo_case,
    bytes_moved=_zo_bytes,
)


# ---- COSMOS ---------------------------------------------------------------------------------

def _orthogonalize_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    if hparams["batch"] == "same":  # one shape: the kernel's batched path
        shapes = [shapes[0]] * len(shapes)
    matrices = [make_tensor(s, dtypes["param"], device, generator, layout) for s in shapes]
    outputs = [torch.empty(s, dtype=dtypes["output"], device=device) for s in shapes]
    return KernelCase(args=(matrices, outputs), kwargs={"steps": hparams["steps"]}, outputs=(1,))


def _orthogonalize_bytes(case: KernelCase) -> int:
    matrices, outputs = case.args
    # Per iteration at least: read X twice and A once, write A, P and X' (X·Xᵀ, A·X, a·X+b·P+c·A·P).
    total = 0
    for matrix, output in zip(matrices, outputs):
        rows = min(matrix.shape)
        total += matrix.nbytes + output.nbytes
        total += case.kwargs["steps"] * output.element_size() * (4 * matrix.numel() + 3 * rows * rows)
    return total


COSMOS_ORTHOGONALIZE = KernelPair(
    family="cosmos",
    function="orthogonalize_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "output": (torch.bfloat16, torch.float32)},
    bench_hparams={"steps": 5, "batch": "mixed"},
    make_case=_orthogonalize_case,
    bytes_moved=_orthogonalize_bytes,
    shape_dims=(2, 2),
)


def _cosmos_apply_case(shapes, dtypes, device, generator, hparams, layout="contiguous") -> KernelCase:
    m, n = shapes[0]
    rank = n if hparams["rank"] == "full" else min(hparams["rank"], n)
    param = make_tensor((m, n), dtypes["param"], device, generator, layout)
    low_rank = make_tensor((m, rank), torch.float32, device, generator)
    basis, _ = torch.linalg.qr(torch.randn(n, max(rank, 1), generator=generator, dtype=torch.float64))
    orthogonal = None if rank == n else make_tensor((m, n), dtypes["orthogonal"], device, generator, layout)
    kwargs = {name: hparams[name] for name in ("lr", "lr_ratio", "gamma", "weight_decay")}
    return KernelCase(args=(param, low_rank, basis[:, :rank].to(device=device, dtype=torch.float32).contiguous(),
                            orthogonal), kwargs={**kwargs, "eps": 1e-8}, outputs=(0,))


def _cosmos_apply_bytes(case: KernelCase) -> int:
    param, low_rank, basis, orthogonal = case.args
    return 2 * param.nbytes + low_rank.nbytes + basis.nbytes + (2 * orthogonal.nbytes if orthogonal is not None else 0)


COSMOS_APPLY = KernelPair(
    family="cosmos",
    function="cosmos_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "orthogonal": (torch.bfloat16, torch.float32)},
    bench_hparams={"lr": 1e-3, "lr_ratio": 0.1, "gamma": 0.2, "weight_decay": 0.0, "rank": 64},
    make_case=_cosmos_apply_case,
    bytes_moved=_cosmos_apply_bytes,
    shape_dims=(2, 2),
)

KERNELS: dict[str, KernelPair] = {pair.name: pair for pair in (LION, GALORE_PROJECT, GALORE_APPLY, GALORE_ADAMW,
                                                              APOLLO_SCALES, APOLLO_APPLY, FRUGAL_APPLY,
                                                              FRUGAL_COORDINATES,
                                                              ZEROTH_ORDER_APPLY, COSMOS_ORTHOGONALIZE, COSMOS_APPLY)}
