"""Checks shared by the reference functions and their Triton twins (so both raise the same errors),
and the Adam coefficients the optimizers pass to the shared Adam kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["as_tensor_list", "check_parallel_lists", "compute_dtype", "hf_adam_step_size", "host_values", "is_dense",
           "sign", "torch_adam_form"]


def as_tensor_list(name: str, tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Accept one tensor or a sequence of tensors; return a list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    tensors = list(tensors)
    if not set(map(type, tensors)) <= _TENSOR_TYPES:  # the per-step fast path: one C-level pass
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}[{index}] must be a Tensor, got {type(tensor).__name__}")
    return tensors


_TENSOR_TYPES = {torch.Tensor, torch.nn.Parameter}


def check_parallel_lists(**named: Sequence[torch.Tensor]) -> None:
    """Raise unless the lists have equal lengths and the i-th tensors of all lists are floating
    point and share shape and device. Runs on every step: one comparison per tensor when valid."""
    names = list(named)
    lists = list(named.values())
    if len({len(tensors) for tensors in lists}) > 1:
        raise ValueError(f"tensor lists differ in length: { {n: len(t) for n, t in named.items()} }")
    for index, items in enumerate(zip(*lists)):
        shape, device = items[0].shape, items[0].get_device()  # get_device: an int, cheap
        for tensor in items:
            if tensor.shape != shape or tensor.get_device() != device or not tensor.is_floating_point():
                _explain_mismatch(names, items, index)


def _explain_mismatch(names: list[str], items: Sequence[torch.Tensor], index: int) -> None:
    reference = items[0]
    for name, tensor in zip(names, items):
        if not tensor.is_floating_point():
            raise TypeError(f"{name}[{index}] must be floating point, got {tensor.dtype}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name}[{index}] has shape {tuple(tensor.shape)}, {names[0]}[{index}] has {tuple(reference.shape)}"
            )
        if tensor.device != reference.device:
            raise ValueError(f"{name}[{index}] is on {tensor.device}, {names[0]}[{index}] on {reference.device}")


def host_values(values: Sequence[torch.Tensor]) -> list[float]:
    """The 0-d tensors' values as Python floats (float64; a bool is 0.0 or 1.0): one host
    synchronization per device for the whole list, not one per value."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for position, value in enumerate(values):
        by_device.setdefault(value.device, []).append(position)
    for positions in by_device.values():
        for position, number in zip(positions, torch.stack([values[i].double() for i in positions]).tolist()):
            out[position] = number
    return out


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def is_dense(tensor: torch.Tensor) -> bool:
    """True when the tensor's elements fill ``numel`` consecutive slots of memory exactly once."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = 0 and NaN for a non-finite x (NaN, +Inf, −Inf).

    This is memzoo's non-finite rule for sign-based updates (Lion's sign(c), FRUGAL's signSGD;
    every backend, and any fast path added later, must follow it): a sign-based step whose input
    is not finite writes NaN into that element of the weight. ``torch.sign`` maps NaN to 0 and
    ±Inf to ±1; either would hide the problem — a NaN gradient would become a zero step, and an
    Inf one a finite step of exactly lr while Lion's momentum stays Inf, moving the weight the
    same way on every later step whatever the gradients say."""
    return torch.where(torch.isfinite(x), torch.sign(x), x - x)  # x − x: NaN for NaN and ±Inf


# The Adam kernels (adamw_update_, the projected ones) compute W ← W − step_size·m/(√v + ε): the
# form of Hugging Face's Adam, which the official GaLore / APOLLO keep. These two give their
# coefficients for either convention, written once for every optimizer and whole-step reference.


def hf_adam_step_size(lr: float, betas: tuple[float, float], correct_bias: bool, t: int) -> float:
    """η_t = lr·√(1−β2^t)/(1−β1^t), the bias correction folded into the step size (HF Adam, the
    official GaLore's) at step t (counted from 1); lr without bias correction."""
    if not correct_bias:
        return lr
    beta1, beta2 = betas
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def torch_adam_form(lr: float, betas: tuple[float, float], eps: float, correct_bias: bool,
                    t: int) -> tuple[float, float]:
    """torch.optim.Adam(W)'s step t (ε added to √v/√(1−β2^t)) in the kernels' form:
    lr/bc1 · m/(√v/√bc2 + ε) = (lr·√bc2/bc1) · m/(√v + ε·√bc2), so (η_t, ε·√(1−β2^t)), the same
    update; (lr, ε) without bias correction."""
    if not correct_bias:
        return lr, eps
    return hf_adam_step_size(lr, betas, True, t), eps * math.sqrt(1.0 - betas[1] ** t)
