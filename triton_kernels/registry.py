"""The one table of kernel/reference pairs. The equivalence tests and ``memzoo-bench kernels``
iterate over it, so a new kernel is tested and benchmarked by adding a record here.

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

__all__ = ["KERNELS", "KernelCase", "KernelPair", "Layout", "clone_case", "make_tensor"]

Layout = Literal["contiguous", "transposed", "strided"]
LAYOUTS: tuple[str, ...] = ("contiguous", "transposed", "strided")


@dataclass
class KernelCase:
    """Inputs of one call: ``function(*args, **kwargs)`` writes the lists at ``outputs``."""

    args: tuple[list[torch.Tensor], ...]
    kwargs: dict[str, Any]
    outputs: tuple[int, ...]


def clone_case(case: KernelCase) -> KernelCase:
    """A deep copy keeping each tensor's strides (views stay views of a fresh base)."""

    def clone(tensor: torch.Tensor) -> torch.Tensor:
        base = torch.empty(tensor.untyped_storage().nbytes() // tensor.element_size(),
                           dtype=tensor.dtype, device=tensor.device)
        base.untyped_storage().copy_(tensor.untyped_storage())
        return base.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    return KernelCase(
        args=tuple([clone(t) for t in tensors] for tensors in case.args),
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
    """A reference function and its Triton twin (same name in both family modules)."""

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
    # Per output tensor: extra absolute difference allowed element-wise where the math is
    # discontinuous (e.g. sign(c) with c within rounding of 0), computed from the inputs.
    discontinuity: Callable[[KernelCase], list[list[torch.Tensor | float]]]

    @property
    def name(self) -> str:
        return f"{self.family}.{self.function}"

    def reference(self) -> Callable[..., None]:
        return getattr(importlib.import_module(f"memzoo.reference.{self.family}"), self.function)

    def triton(self) -> Callable[..., None]:
        return getattr(load_family(self.family), self.function)


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


def _lion_discontinuity(case: KernelCase) -> list[list[torch.Tensor | float]]:
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
    discontinuity=_lion_discontinuity,
)

KERNELS: dict[str, KernelPair] = {pair.name: pair for pair in (LION,)}
