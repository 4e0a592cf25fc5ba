"""Lion, chunked multi-tensor; twin of :mod:`memzoo.reference.lion` (same signature, same math).

Per chunk, in float32 (float64 for float64 inputs), one rounding to the storage dtype at the end:
c = β1·m + (1 − β1)·g, W ← W·(1 − lr·λ) − lr·sign(c), m ← β2·m + (1 − β2)·g. The products and
sums may be contracted into fused multiply-adds (as the Triton kernel's are), so results agree
with the reference to within its rounding, not bit for bit. sign(c) follows memzoo's rule for
non-finite inputs (:func:`memzoo.reference.common.sign`: NaN for NaN and ±Inf) as
sign(c) + (c − c), which is sign(c) for finite c and NaN otherwise, without a host sync.

On the CPU, large lists run instead as one compiled pass (:mod:`.compiled`): the reference's
operations in its order, one fused loop per tensor — the reference's results, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memzoo.reference import lion as reference
from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype
from memzoo.reference.lion import lion_tensor_step_
from memzoo.triton_kernels.torch_backend.compiled import CompiledPass
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, for_each_chunk

__all__ = ["lion_tensor_step_", "lion_update_"]


def _lion_pass(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               lr: torch.Tensor, decay: torch.Tensor, beta1: torch.Tensor, one_minus_beta1: torch.Tensor,
               beta2: torch.Tensor, one_minus_beta2: torch.Tensor, maximize: bool) -> None:
    """The reference's per-tensor step over a list, for :class:`CompiledPass`; the scalars are
    0-d tensors of the compute dtype (the values the reference's Python floats take in its
    float32 or float64 math)."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        lion_tensor_step_(param, grad, exp_avg, lr=lr, decay=decay, beta1=beta1, one_minus_beta1=one_minus_beta1,
                          beta2=beta2, one_minus_beta2=one_minus_beta2, maximize=maximize)


_COMPILED_LION = CompiledPass(_lion_pass, "Lion pass")


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
    if _COMPILED_LION.wanted([*params, *grads, *exp_avgs]):
        _compiled_lion_update_(params, grads, exp_avgs, hparams, decay)
    else:
        _chunked_lion_update_(params, grads, exp_avgs, hparams)


def _chunked_lion_update_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                          hparams: dict) -> None:
    """The eager path: 2^17-element chunks through cache-resident scratch buffers."""
    lr, beta1, beta2, maximize = hparams["lr"], hparams["beta1"], hparams["beta2"], hparams["maximize"]
    decay = 1.0 - lr * hparams["weight_decay"]
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


def _compiled_lion_update_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                           hparams: dict, decay: float) -> None:
    """The compiled pass, once per compute dtype (its scalars are 0-d tensors of that dtype)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (param, grad, exp_avg) in enumerate(zip(params, grads, exp_avgs)):
        by_dtype.setdefault(compute_dtype(param.dtype, grad.dtype, exp_avg.dtype), []).append(i)
    for dtype, indices in by_dtype.items():
        group = tuple([tensors[i] for i in indices] for tensors in (params, grads, exp_avgs))
        scalars = [torch.tensor(value, dtype=dtype) for value in (
            hparams["lr"], decay, hparams["beta1"], 1.0 - hparams["beta1"], hparams["beta2"], 1.0 - hparams["beta2"])]
        _COMPILED_LION(*group, *scalars, hparams["maximize"],
                       fallback=lambda group=group: _chunked_lion_update_(*group, hparams))
