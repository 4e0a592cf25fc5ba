"""GaLore's math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.galore`.

Rewritten here: :func:`adamw_update_` (the dense AdamW branch of every low-rank family: chunked
multi-tensor passes, about one read and one write of each tensor). The projection functions
(:func:`galore_adam_project_`, :func:`galore_apply_`, :func:`project`, :func:`natural_gradient`)
are the reference's own: one matrix product per matrix, no per-element Python work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference import galore as reference
from memzoo.reference.common import as_tensor_list, check_parallel_lists
from memzoo.reference.galore import (
    as_matrix,
    check_low_rank_shapes,
    galore_adam_project_,
    galore_apply_,
    low_rank_lists,
    natural_gradient,
    project,
)
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, for_each_chunk

__all__ = ["adamw_update_", "as_matrix", "check_low_rank_shapes", "galore_adam_project_", "galore_apply_",
           "low_rank_lists", "natural_gradient", "project"]


@torch.no_grad()
def adamw_update_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    lr: float,
    weight_decay: float,
    maximize: bool = False,
    decay_first: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.adamw_update_`, chunk by chunk; products
    and sums may be contracted into fused multiply-adds (within the reference's rounding)."""
    lists = {name: as_tensor_list(name, tensors) for name, tensors in
             (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))}
    check_parallel_lists(**lists)
    hparams = dict(step_size=step_size, beta1=beta1, beta2=beta2, eps=eps, lr=lr, weight_decay=weight_decay,
                   maximize=maximize, decay_first=decay_first)
    sign_g = -1.0 if maximize else 1.0
    decay = lr * weight_decay

    def update(scratch: Scratch, chunk: tuple[torch.Tensor, ...]) -> None:
        param, grad, exp_avg, exp_avg_sq = chunk
        g = scratch.load(0, grad)
        m = scratch.load(1, exp_avg).mul_(beta1).add_(g, alpha=sign_g * (1.0 - beta1))  # m ← β1·m + (1 − β1)·g
        v = scratch.load(2, exp_avg_sq).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # v ← β2·v + (1 − β2)·g²
        w = scratch.load(3, param)
        if decay_first and decay != 0.0:
            w.mul_(1.0 - decay)
        denominator = torch.sqrt(v, out=scratch.take(4, v.numel())).add_(eps)
        w.addcdiv_(m, denominator, value=-step_size)  # W ← W − step_size·m/(√v + ε)
        if decay != 0.0 and not decay_first:
            w.add_(w, alpha=-decay)  # W ← W − lr·λ·W (GaLore's order)
        for out, value in ((exp_avg, m), (exp_avg_sq, v), (param, w)):
            if value is not out:
                out.copy_(value)

    for_each_chunk(tuple(lists.values()), update, lambda group: reference.adamw_update_(*group, **hparams),
                   buffers=5)
