"""Checks shared by the reference functions and their Triton twins (so both raise the same errors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["as_tensor_list", "check_parallel_lists", "compute_dtype"]


def as_tensor_list(name: str, tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Accept one tensor or a sequence of tensors; return a list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    tensors = list(tensors)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(tensor).__name__}")
    return tensors


def check_parallel_lists(**named: Sequence[torch.Tensor]) -> None:
    """Raise ValueError unless the lists have equal lengths and the i-th tensors of all lists
    share shape and device and are floating point."""
    names = list(named)
    lengths = {name: len(named[name]) for name in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensor lists differ in length: {lengths}")
    first = names[0]
    for index, items in enumerate(zip(*named.values())):
        reference = items[0]
        for name, tensor in zip(names, items):
            if not tensor.is_floating_point():
                raise TypeError(f"{name}[{index}] must be floating point, got {tensor.dtype}")
            if tensor.shape != reference.shape:
                raise ValueError(
                    f"{name}[{index}] has shape {tuple(tensor.shape)}, {first}[{index}] has {tuple(reference.shape)}"
                )
            if tensor.device != reference.device:
                raise ValueError(f"{name}[{index}] is on {tensor.device}, {first}[{index}] on {reference.device}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
