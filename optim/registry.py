"""The one table of memzoo optimizers. Shared tests and the benchmark iterate over it, so an
optimizer gets the whole contract suite (closures, state_dict round-trips, bad input, backend
equivalence, state accounting) by adding a record here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memzoo.optim.base import MemzooOptimizer
from memzoo.optim.lion import Lion

__all__ = ["OPTIMIZERS", "BadInput", "OptimizerInfo", "get_optimizer_info", "list_optimizers"]


@dataclass(frozen=True)
class BadInput:
    """Constructor keyword arguments that must raise ``error`` with a message matching ``match``."""

    description: str
    kwargs: Mapping[str, Any]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type[MemzooOptimizer]
    summary: str
    # Arguments that make a test step do something visible (non-zero decay, non-default betas).
    sample_kwargs: Mapping[str, Any]
    # Analytic bytes of state once every parameter with a gradient has been stepped.
    expected_state_bytes: Callable[[MemzooOptimizer], int]
    backends: tuple[str, ...] = ("torch", "triton")
    param_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # Variants worth testing on their own (e.g. a state dtype): extra kwargs merged into sample_kwargs.
    variants: tuple[Mapping[str, Any], ...] = ({},)
    bad_inputs: tuple[BadInput, ...] = field(default_factory=tuple)
    requires_closure: bool = False


def _stepped(optimizer: MemzooOptimizer):
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state and optimizer.state[param]:
                yield param, group


def _lion_state_bytes(optimizer: Lion) -> int:
    return sum(p.numel() * optimizer._momentum_dtype(p, g).itemsize for p, g in _stepped(optimizer))


_COMMON_BAD_INPUTS = (
    BadInput("negative lr", {"lr": -1e-3}, ValueError, "Invalid lr"),
    BadInput("NaN lr", {"lr": float("nan")}, ValueError, "Invalid lr"),
    BadInput("lr given as a string", {"lr": "0.1"}, TypeError, "Invalid lr"),
    BadInput("negative weight decay", {"weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    BadInput("unknown backend", {"backend": "cuda"}, ValueError, "Invalid backend"),
)

OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo(
            name="lion",
            cls=Lion,
            summary="Lion (Chen et al. 2023): sign of interpolated momentum, 1 state element per parameter",
            sample_kwargs={"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1},
            expected_state_bytes=_lion_state_bytes,
            variants=({}, {"momentum_dtype": torch.float32}, {"momentum_dtype": torch.bfloat16}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("beta1 = 1", {"betas": (1.0, 0.99)}, ValueError, "beta parameter at index 0"),
                BadInput("negative beta2", {"betas": (0.9, -0.1)}, ValueError, "beta parameter at index 1"),
                BadInput("three betas", {"betas": (0.9, 0.99, 0.999)}, ValueError, "Invalid betas"),
                BadInput("integer momentum dtype", {"momentum_dtype": torch.int8}, ValueError, "momentum_dtype"),
            ),
        ),
    )
}


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The record for ``name`` (case-insensitive); a ValueError lists the valid names."""
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}") from None


def list_optimizers() -> dict[str, str]:
    """Registered optimizer names with one-line descriptions."""
    return {name: info.summary for name, info in sorted(OPTIMIZERS.items())}
