"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

Math in float32 (float64 when the inputs are float64), one rounding to the storage dtype at the
end, exactly as the Triton kernel does.

Non-finite values (every backend, including any fast path): an element whose c = β1·m + (1−β1)·g
is NaN or ±Inf gets a NaN weight (:func:`memzoo.reference.common.sign`), never a finite step
of ±lr; its momentum keeps the non-finite value, so the weight stays NaN. A NaN/Inf gradient
therefore shows up in the weights at the step it arrives (use ``skip_nonfinite=True`` on the
optimizer to skip such steps instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype, sign

__all__ = ["lion_tensor_step_", "lion_update_"]


@torch.no_grad()
def lion_update_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """One Lion step on each (param, grad, exp_avg); updates params and exp_avgs in place.

    Tensors may have any shape and strides; the three tensors of one parameter must share shape.
    Scalar coefficients are formed in Python (double) and enter the tensor math as float32, the
    same values the kernel receives.
    """
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    check_parallel_lists(params=params, grads=grads, exp_avgs=exp_avgs)
    scalars = dict(lr=lr, decay=1.0 - lr * weight_decay, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2,
                   one_minus_beta2=1.0 - beta2)
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        lion_tensor_step_(param, grad, exp_avg, **scalars, maximize=maximize)


def lion_tensor_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr: float | torch.Tensor,
                      decay: float | torch.Tensor, beta1: float | torch.Tensor, one_minus_beta1: float | torch.Tensor,
                      beta2: float | torch.Tensor, one_minus_beta2: float | torch.Tensor, maximize: bool) -> None:
    """One tensor's Lion step (``decay`` = 1 − lr·λ): the one statement of the math, shared by
    :func:`lion_update_` (Python floats) and the torch backend's compiled pass (0-d tensors of the
    compute dtype, the values those floats take in float32 or float64 math)."""
    dtype = compute_dtype(param.dtype, grad.dtype, exp_avg.dtype)
    g = grad.to(dtype)
    if maximize:
        g = -g
    m = exp_avg.to(dtype)
    p = param.to(dtype) * decay  # W ← W·(1 − lr·λ), decoupled decay
    c = m * beta1 + g * one_minus_beta1  # c = β1·m + (1 − β1)·g
    p = p - lr * sign(c)  # W ← W − lr·sign(c); sign(0) = 0, NaN for a non-finite c
    m = m * beta2 + g * one_minus_beta2  # m ← β2·m + (1 − β2)·g
    param.copy_(p)
    exp_avg.copy_(m)
