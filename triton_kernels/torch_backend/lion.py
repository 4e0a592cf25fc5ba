"""Lion, chunked multi-tensor; twin of :mod:`memzoo.reference.lion` (same signature, same math).

Per chunk, in float32 (float64 for float64 inputs), one rounding to the storage dtype at the end:
c = β1·m + (1 − β1)·g, W ← W·(1 − lr·λ) − lr·sign(c), m ← β2·m + (1 − β2)·g. The products and
sums may be contracted into fused multiply-adds (as the Triton kernel's are), so results agree
with the reference to within its rounding, not bit for bit. sign(c) follows memzoo's rule for
non-finite inputs (:func:`memzoo.reference.common.sign`: NaN for NaN and ±Inf) as
sign(c) + (c − c), which is sign(c) for finite c and NaN otherwise, without a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference import lion as reference
from memzoo.reference.common import as_tensor_list, check_parallel_lists
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, for_each_chunk

__all__ = ["lion_update_"]


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
    """Same contract as :func:`memzoo.reference.lion.lion_update_`."""
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    check_parallel_lists(params=params, grads=grads, exp_avgs=exp_avgs)
    hparams = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)
    decay = 1.0 - lr * weight_decay
    sign_g = -1.0 if maximize else 1.0

    def update(scratch: Scratch, chunk: tuple[torch.Tensor, ...]) -> None:
        param, grad, exp_avg = chunk
        g = scratch.load(1, grad)
        m = scratch.load(2, exp_avg)
        c = torch.mul(m, beta1, out=scratch.take(0, m.numel())).add_(g, alpha=sign_g * (1.0 - beta1))
        not_finite = torch.sub(c, c, out=scratch.take(4, c.numel()))  # 0, or NaN where c is NaN or ±Inf
        direction = c.sign_().add_(not_finite)  # sign(c), sign(0) = 0, NaN for a non-finite c
        p = scratch.load(3, param)
        if decay != 1.0:
            p.mul_(decay)  # W ← W·(1 − lr·λ)
        p.add_(direction, alpha=-lr)  # W ← W − lr·sign(c)
        m.mul_(beta2).add_(g, alpha=sign_g * (1.0 - beta2))  # m ← β2·m + (1 − β2)·g
        if p is not param:
            param.copy_(p)
        if m is not exp_avg:
            exp_avg.copy_(m)

    for_each_chunk((params, grads, exp_avgs), update, lambda group: reference.lion_update_(*group, **hparams),
                   buffers=5)
