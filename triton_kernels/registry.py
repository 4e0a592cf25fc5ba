"""The one table of kernel/reference pairs. The equivalence tests and ``memzoo-bench kernels``
iterate over it, so a new kernel is tested and benchmarked by adding a record here; the same
records hold the ``"torch"`` backend's twins (:mod:`memzoo.triton_kernels.torch_backend`) to the
reference.

Importing this module does not import Triton: :meth:`KernelPair.triton` loads the kernel module
on demand.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memzoo.triton_kernels import load_family

__all__ = ["KERNELS", "KernelCase", "KernelPair", "Layout", "clone_case", "make_tensor"]

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
    """A reference function and its twins, Triton and torch (same name in every family module)."""

    family: str
    function: str
    # Options of each dtype role (the first is the default); None means "same as the param".
    dtype_options: Mapping[str, tuple[torch.dtype | None, ...]]
    # Uniform ranges hypothesis draws floats from; flags are drawn as booleans.
    hparam_ranges: Mapping[str, tuple[float, float]]
    flags: tuple[str, ...]
    bench_hparams: Mapping[str, Any]
    # make_case(shapes, dtypes, device, generator, hparams, layout) -> KernelCase
    make_case: Callable[..., KernelCase]
    # Bytes a call must read and write at least: the bandwidth floor's numerator.
    bytes_moved: Callable[[KernelCase], int]
    # Per output tensor: extra absolute difference allowed element-wise, computed from the inputs,
    # where the math is discontinuous (sign(c) with c within rounding of 0) or where rounding
    # differences are amplified (a matrix product's accumulation order through Adam's division).
    extra_tolerance: Callable[[KernelCase], list[list[torch.Tensor | float]]]
    # Discrete hyperparameters drawn from these options (e.g. projection side, rank).
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # Dimensions of the drawn shapes, and how many tensors one call takes at most.
    shape_dims: tuple[int, int] = (0, 3)
    max_tensors: int = 4
    # Relative difference allowed on top of the storage dtype's rounding.
    extra_rtol: float = 0.0

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


def _lion_extra_tolerance(case: KernelCase) -> list[list[torch.Tensor | float]]:
    params, grads, exp_avgs = case.args
    beta1, lr = case.kwargs["beta1"], case.kwargs["lr"]
    sign = -1.0 if case.kwargs.get("maximize", False) else 1.0
    extra_p = []
    for grad, exp_avg in zip(grads, exp_avgs):
        momentum_term = beta1 * exp_avg.double()
        grad_term = sign * (1.0 - beta1) * grad.double()
        # c = β1·m + (1 − β1)·g is formed in fp32; when its nonzero terms cancel to within a few
        # ulps its sign may differ between implementations (FMA contraction), moving W by up to
        # 2·lr more. An exact 0 from zero terms is not ambiguous: sign(0) = 0 everywhere.
        magnitude = momentum_term.abs() + grad_term.abs()
        ambiguous = ((momentum_term + grad_term).abs() <= 8 * 2.0**-24 * magnitude) & (magnitude > 0)
        extra_p.append(torch.where(ambiguous, 2.0 * lr, 0.0))
    return [extra_p, [0.0] * len(exp_avgs)]


LION = KernelPair(
    family="lion",
    function="lion_update_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16),
                   "state": (None, torch.float32, torch.bfloat16)},
    hparam_ranges={"lr": (1e-5, 1e-1), "beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "weight_decay": (0.0, 1.0)},
    flags=("maximize",),
    bench_hparams={"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.01, "maximize": False},
    make_case=_lion_case,
    bytes_moved=_lion_bytes,
    extra_tolerance=_lion_extra_tolerance,
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


def _gemm_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of the kernels' matrix products: TF32 inputs on a GPU, fp32 otherwise.

    TF32 keeps 10 mantissa bits, and Triton's tensor-core dot truncates fp32 operands to them
    (triton-lang/triton#4574) instead of rounding: relative error up to 2⁻¹⁰, not 2⁻¹¹ (an H100
    run measured 1.4e-3 on a single product, above the 2·2⁻¹¹ bound)."""
    if device.type == "cuda":
        from memzoo.triton_kernels.galore import PRECISION

        if PRECISION == "tf32":
            return 2.0**-10
    return 2.0**-24


def _product_error(low_rank_or_grad, left, right, *, back: bool) -> torch.Tensor:
    """Bound on |computed − exact| of a product chain (either implementation): 2·k·u·(|·| chain),
    k the total contraction length (Higham's γ_k bound, doubled for two implementations)."""
    from memzoo.reference.projector import project, project_back

    x = low_rank_or_grad.double()
    l_abs = None if left is None else left.double().abs()
    r_abs = None if right is None else right.double().abs()
    if back:
        k = (left.shape[1] if left is not None else 0) + (right.shape[0] if right is not None else 0)
        magnitude = project_back(x.abs(), l_abs, r_abs)
    else:
        k = (left.shape[0] if left is not None else 0) + (right.shape[1] if right is not None else 0)
        magnitude = project(x.abs(), l_abs, r_abs)
    return 2 * k * _gemm_unit_roundoff(x.device) * magnitude


def _projected_adam_errors(case: KernelCase):
    """Per matrix of a projection case (grads, exp_avgs, exp_avg_sqs, ...; factors in kwargs):
    float64 R, N, and bounds on the differences two implementations may show in R, m, v and N."""
    from memzoo.reference.projector import project

    beta1, beta2, eps = case.kwargs["beta1"], case.kwargs["beta2"], case.kwargs["eps"]
    for grad, exp_avg, exp_avg_sq, _, left, right in zip(*case.args, case.kwargs["lefts"], case.kwargs["rights"]):
        g = grad.double().reshape(grad.shape[0], -1)
        r = project(g, None if left is None else left.double(), None if right is None else right.double())
        if case.kwargs.get("maximize", False):
            r = -r
        dr = _product_error(g, left, right, back=False)
        m = beta1 * exp_avg.double() + (1 - beta1) * r
        v = beta2 * exp_avg_sq.double() + (1 - beta2) * r * r
        dm = (1 - beta1) * dr
        dv = (1 - beta2) * (2 * r.abs() * dr + dr * dr)
        root = v.sqrt()
        droot = torch.minimum(dv.sqrt(), dv / (2 * root).clamp_min(1e-300))
        # N = m/(√v + ε): first-order change from m, plus from √v, over the smallest denominator.
        dn = (dm + m.abs() * droot / (root + eps)) / (root + eps - droot).clamp_min(eps)
        yield r, dr, m / (root + eps), dm, dv, dn


def _galore_project_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    bounds: list[list[torch.Tensor]] = [[], [], []]
    for _, _, _, dm, dv, dn in _projected_adam_errors(case):
        for bound, value in zip(bounds, (dm, dv, dn)):
            bound.append(value)
    return bounds


def _galore_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    coefficient = case.kwargs["step_size"] * case.kwargs["scale"]
    decay = case.kwargs["lr"] * case.kwargs["weight_decay"]
    bounds = []
    for param, update, left, right in zip(*case.args, case.kwargs["lefts"], case.kwargs["rights"]):
        error = coefficient * _product_error(update, left, right, back=True)
        bounds.append((1 + decay) * error.reshape(param.shape))
    return [bounds]


_GALORE_CHOICES = {"side": ("left", "right", "full"), "rank": (1, 2, 5, 16, 40), "batch": ("mixed", "same")}

GALORE_PROJECT = KernelPair(
    family="galore",
    function="galore_adam_project_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    hparam_ranges={"beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3)},
    flags=("maximize",),
    bench_hparams={"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "maximize": False, "side": "right", "rank": 256},
    make_case=_galore_project_case,
    bytes_moved=_galore_project_bytes,
    extra_tolerance=_galore_project_tolerance,
    choices=_GALORE_CHOICES,
    shape_dims=(2, 3),
    max_tensors=3,
)

GALORE_APPLY = KernelPair(
    family="galore",
    function="galore_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    hparam_ranges={"step_size": (1e-4, 1e-1), "scale": (0.1, 4.0), "lr": (1e-4, 1e-1), "weight_decay": (0.0, 1.0)},
    flags=(),
    bench_hparams={"step_size": 1e-3, "scale": 0.25, "lr": 1e-3, "weight_decay": 0.0, "side": "right", "rank": 256},
    make_case=_galore_apply_case,
    bytes_moved=_galore_apply_bytes,
    extra_tolerance=_galore_apply_tolerance,
    choices=_GALORE_CHOICES,
    shape_dims=(2, 3),
    max_tensors=3,
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


def _apollo_scales_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """m and v as GaLore's; a factor ‖N_c‖/(‖R_c‖ + 1e-8) moves by at most
    (‖δN_c‖ + s_c·‖δR_c‖)/(‖R_c‖ + 1e-8 − ‖δR_c‖) (triangle inequality on each norm)."""
    from memzoo.reference.apollo import NORM_EPS

    bounds: list[list[torch.Tensor]] = [[], [], []]
    for (r, dr, n, dm, dv, dn), scale in zip(_projected_adam_errors(case), case.args[3]):
        if scale.numel() == 1:
            norms = lambda x: x.norm().reshape(1, 1)  # noqa: E731
        else:
            dim = 1 if scale.shape[1] == 1 else 0
            norms = lambda x, dim=dim: x.norm(dim=dim, keepdim=True)  # noqa: E731
        ratio = norms(n) / (norms(r) + NORM_EPS)
        denominator = (norms(r) + NORM_EPS - norms(dr)).clamp_min(1e-300)
        bounds[0].append(dm)
        bounds[1].append(dv)
        bounds[2].append(((norms(dn) + ratio * norms(dr)) / denominator).reshape(scale.shape))
    return bounds


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


def _apollo_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor | float]]:
    """‖G⊙s‖ is summed in another order (relative error ≤ (k + 4)·2⁻²⁴ for k elements), which
    moves the limiter's factor, ρ and the update by as much, relatively; the update's own
    operations are rounded in another order (a few ulps of |c·S|)."""
    params, grads, scales, norms = case.args
    kwargs = case.kwargs
    coefficient = kwargs["step_size"] * math.sqrt(kwargs["scale"])
    weights, rhos = [], []
    for param, grad, factor in zip(params, grads, scales):
        k = param.numel()
        delta = (k + 8) * 2.0**-24
        update = coefficient * (grad.double().reshape(param.shape[0], -1) * factor.double()).abs()
        weights.append(((1 + kwargs["lr"] * kwargs["weight_decay"]) * update * delta).reshape(param.shape))
        rhos.append(delta * (grad.double().reshape(param.shape[0], -1) * factor.double()).norm().item()
                    * (math.sqrt(kwargs["scale"]) if kwargs.get("scale_front") else 1.0) + 1e-6)
    return [weights, rhos] if norms is not None else [weights]


APOLLO_SCALES = KernelPair(
    family="apollo",
    function="apollo_scales_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    hparam_ranges={"beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3)},
    flags=("maximize",),
    bench_hparams={"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "maximize": False, "side": "right", "rank": 256,
                   "granularity": "channel"},
    make_case=_apollo_scales_case,
    bytes_moved=_apollo_scales_bytes,
    extra_tolerance=_apollo_scales_tolerance,
    choices={"side": ("left", "right"), "rank": (1, 2, 5, 16, 40), "granularity": ("channel", "tensor"),
             "batch": ("mixed", "same")},
    shape_dims=(2, 3),
    max_tensors=3,
)

APOLLO_APPLY = KernelPair(
    family="apollo",
    function="apollo_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    hparam_ranges={"step_size": (1e-4, 1e-1), "scale": (0.1, 128.0), "lr": (1e-4, 1e-1), "weight_decay": (0.0, 1.0),
                   "growth_limit": (1.0, 1.5)},
    flags=("record_only", "scale_front", "maximize"),
    bench_hparams={"step_size": 1e-3, "scale": 1.0, "lr": 1e-3, "weight_decay": 0.0, "growth_limit": 1.01,
                   "record_only": False, "scale_front": False, "maximize": False, "granularity": "rows",
                   "limiter": True, "batch": "same"},
    make_case=_apollo_apply_case,
    bytes_moved=_apollo_apply_bytes,
    extra_tolerance=_apollo_apply_tolerance,
    choices={"granularity": ("rows", "columns", "tensor"), "limiter": (True, False), "batch": ("mixed", "same")},
    shape_dims=(2, 3),
    max_tensors=3,
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


def _frugal_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """The state-full product as GaLore's back-projection; the residual G − up(down(G)) may
    differ by its product error (zero for 0/1 coordinate factors, whose products are exact),
    which moves W by that much (SGD) or flips sign(E) where |E| is within it (2·η_free)."""
    from memzoo.reference.projector import project, project_back

    kwargs = case.kwargs
    bounds = []
    for param, grad, update, left, right in zip(*case.args, kwargs["lefts"], kwargs["rights"]):
        m = param.shape[0]
        factor = left if left is not None else right
        exact = bool(((factor == 0) | (factor == 1)).all())
        bound = kwargs["step_size"] * _product_error(update, left, right, back=True)
        g = grad.double().reshape(m, -1)
        lf = None if left is None else left.double()
        rf = None if right is None else right.double()
        residual = g - project_back(project(g, lf, rf), lf, rf)
        if exact:
            error = torch.zeros_like(residual)
        else:
            magnitude = project_back(project(g.abs(), None if lf is None else lf.abs(), None if rf is None else rf.abs()),
                                     None if lf is None else lf.abs(), None if rf is None else rf.abs())
            error = 4 * factor.shape[0 if right is not None else 1] * 2.0**-24 * magnitude + 2.0**-24 * g.abs()
        rule = kwargs["residual_rule"]
        if rule == "sgd":
            bound = bound + kwargs["residual_step"] * error
        elif rule == "sign_sgd":
            # (An exact zero, as on selected coordinates, is no ambiguity: sign(0) = 0 on both.)
            ambiguous = (residual.abs() <= error) & (error > 0)
            bound = bound + torch.where(ambiguous, 2.0 * kwargs["residual_step"], 0.0)
        bounds.append(bound.reshape(param.shape))
    return [bounds]


FRUGAL_APPLY = KernelPair(
    family="frugal",
    function="frugal_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    hparam_ranges={"step_size": (1e-4, 1e-1), "residual_step": (1e-4, 1e-1), "decay": (0.0, 0.1)},
    flags=("maximize",),
    bench_hparams={"step_size": 1e-3, "residual_step": 1e-3, "decay": 0.0, "maximize": False, "side": "right",
                   "rank": 256, "factor": "coordinates", "residual_rule": "sign_sgd"},
    make_case=_frugal_apply_case,
    bytes_moved=_frugal_apply_bytes,
    extra_tolerance=_frugal_apply_tolerance,
    choices={"side": ("left", "right"), "rank": (0, 1, 5, 40), "factor": ("coordinates", "orthonormal"),
             "residual_rule": ("sign_sgd", "sgd", "no"), "batch": ("mixed", "same")},
    shape_dims=(2, 3),
    max_tensors=3,
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


def _no_extra_tolerance(case: KernelCase) -> list[list[float]]:
    return [[0.0] * len(as_list(case.args[i])) for i in case.outputs]


GALORE_ADAMW = KernelPair(
    family="galore",
    function="adamw_update_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "state": (None, torch.float32)},
    hparam_ranges={"step_size": (1e-5, 1e-1), "beta1": (0.0, 0.999), "beta2": (0.0, 0.999), "eps": (1e-8, 1e-3),
                   "lr": (1e-5, 1e-1), "weight_decay": (0.0, 1.0)},
    flags=("maximize", "decay_first"),
    bench_hparams={"step_size": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "lr": 1e-3, "weight_decay": 0.01,
                   "maximize": False, "decay_first": False},
    make_case=_adamw_case,
    bytes_moved=_adamw_bytes,
    extra_tolerance=_no_extra_tolerance,
)

# ---- Zeroth-order ---------------------------------------------------------------------------

# Passes of a step: (from_sign, to_sign) and the number of earlier samples whose directions the
# update adds (None: no update).
_ZO_PASSES = {"perturb": (0, 1, None), "flip": (1, -1, None), "restore": (-1, 0, None), "update": (-1, 0, 0),
              "update_q3": (-1, 0, 2)}
_NORMAL_BOUND = 5.7  # |z| ≤ √(−2·ln 1e-7) for tl.randn's Box–Muller


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
    from_sign, to_sign, earlier = _ZO_PASSES[hparams["pass"]]
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


def _zo_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """The normals of the interpreter (numpy's log/cos/sin) and of torch differ in the last
    bits; each of the pass's (up to three) roundings may then fall on the other side, one unit
    of the storage dtype at the magnitude of its operands."""
    kwargs = case.kwargs
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    extra = []
    for param in case.args[0]:
        step = 0.0
        if "coefficients" in kwargs:
            step = float(kwargs["coefficients"].abs().sum()) * _NORMAL_BOUND
        magnitude = param.double().abs() + kwargs["eps"] * _NORMAL_BOUND + step
        extra.append(4 * unit[param.dtype] * magnitude)
    return [extra]


ZEROTH_ORDER_APPLY = KernelPair(
    family="zeroth_order",
    function="zo_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16)},
    hparam_ranges={"eps": (1e-4, 1e-1), "coefficient": (1e-4, 1e-1), "decay": (0.0, 0.1)},
    flags=("mask", "clamp"),
    bench_hparams={"eps": 1e-3, "pass": "update", "coefficient": 1e-5, "decay": 0.0, "mask": False,
                   "clamp": False},
    make_case=_zo_case,
    bytes_moved=_zo_bytes,
    extra_tolerance=_zo_tolerance,
    choices={"pass": tuple(_ZO_PASSES)},
    max_tensors=8,
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


def _orthogonalize_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """The kernel rounds once per iteration, the reference four times (in bf16 that is the
    whole difference): allow the reference's own distance from the float64 iteration, element by
    element, plus the largest of it for the kernel's."""
    from memzoo.reference.cosmos import newton_schulz5

    matrices, outputs = case.args
    extra = []
    for matrix, output in zip(matrices, outputs):
        exact = newton_schulz5(matrix.double(), steps=case.kwargs["steps"], dtype=torch.float64)
        rounded = newton_schulz5(matrix, steps=case.kwargs["steps"], dtype=output.dtype).double()
        error = (rounded - exact).abs()
        unit = 2.0**-8 if output.dtype == torch.bfloat16 else 2.0**-23
        extra.append(error + error.max() + unit * exact.abs().max())
    return [extra]


COSMOS_ORTHOGONALIZE = KernelPair(
    family="cosmos",
    function="orthogonalize_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "output": (torch.bfloat16, torch.float32)},
    hparam_ranges={},
    flags=(),
    bench_hparams={"steps": 5, "batch": "mixed"},
    make_case=_orthogonalize_case,
    bytes_moved=_orthogonalize_bytes,
    extra_tolerance=_orthogonalize_tolerance,
    choices={"steps": (0, 1, 5), "batch": ("mixed", "same")},
    shape_dims=(2, 2),
    max_tensors=3,
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


def _cosmos_apply_tolerance(case: KernelCase) -> list[list[torch.Tensor]]:
    """A few fp32 roundings of the step (its GEMM and ‖D‖ summed in another order) at the
    step's magnitude, on top of the weight's own rounding."""
    param, low_rank, basis, orthogonal = case.args
    m, n = param.shape
    direction = low_rank.double() @ basis.double().T
    if orthogonal is not None:
        direction = direction + case.kwargs["gamma"] * math.sqrt(m * n) * orthogonal.double() / orthogonal.double().norm()
    step = case.kwargs["lr"] * case.kwargs["lr_ratio"] * math.sqrt(m * n) * direction / direction.norm()
    return [[16 * 2.0**-24 * (step.abs() + step.abs().max() + param.double().abs())]]


COSMOS_APPLY = KernelPair(
    family="cosmos",
    function="cosmos_apply_",
    dtype_options={"param": (torch.float32, torch.bfloat16, torch.float16), "orthogonal": (torch.bfloat16, torch.float32)},
    hparam_ranges={"lr": (1e-4, 1e-1), "lr_ratio": (0.05, 1.0), "gamma": (0.0, 1.0), "weight_decay": (0.0, 0.5)},
    flags=(),
    bench_hparams={"lr": 1e-3, "lr_ratio": 0.1, "gamma": 0.2, "weight_decay": 0.0, "rank": 64},
    make_case=_cosmos_apply_case,
    bytes_moved=_cosmos_apply_bytes,
    extra_tolerance=_cosmos_apply_tolerance,
    choices={"rank": (0, 1, 5, "full")},
    shape_dims=(2, 2),
    max_tensors=1,
)

KERNELS: dict[str, KernelPair] = {pair.name: pair for pair in (LION, GALORE_PROJECT, GALORE_APPLY, GALORE_ADAMW,
                                                              APOLLO_SCALES, APOLLO_APPLY, FRUGAL_APPLY,
                                                              ZEROTH_ORDER_APPLY, COSMOS_ORTHOGONALIZE, COSMOS_APPLY)}
