"""Adam-mini, chunked by whole blocks; twin of :mod:`memzoo.reference.adam_mini` (same signature,
same math).

Each tensor is read as its (blocks × block_numel) matrix and processed a run of whole blocks at
a time (at most :func:`~memzoo.triton_kernels.torch_backend.elementwise.chunk_size` elements), in
float32 (float64 for float64 inputs) scratch buffers: per run, the blocks' mean g² updates their
v, then m and the weight are updated with each block's 1/(√(v/bc2) + ε) broadcast over its row.
Memory sees about one read of each input and one write of each output, the extra memory is a few
chunks, and nothing synchronizes with the host. A block larger than a chunk (a one-block tensor)
takes two passes: its sum of g² first, then the update. Sums run in another order than the
reference's (and products may be fused), so results agree with it to within rounding, not bit for
bit. Tensors that are not contiguous (rare: views) go to the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memzoo.reference import adam_mini as reference
from memzoo.reference.adam_mini import (
    RULES,
    BlockPartition,
    adam_mini_blocks,
    block_rule,
    check_block_lists,
    check_block_names,
    decays,
    partition,
)
from memzoo.reference.common import as_tensor_list, compute_dtype
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, chunk_size

# The partition, the checks and the block math of the FSDP2 step are the reference's own.
__all__ = ["RULES", "BlockPartition", "adam_mini_blocks", "adam_mini_update_", "block_rule", "check_block_lists",
           "check_block_names", "decays", "partition"]

# Scratch buffers: g, m, p in the compute dtype.
_BUFFERS = 3


@torch.no_grad()
def adam_mini_update_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.adam_mini.adam_mini_update_`."""
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    check_block_lists(params, grads, exp_avgs, exp_avg_sqs, step)
    hparams = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize)
    coefficients = _Coefficients(
        decay=1.0 - lr * weight_decay,
        step_size=-lr / (1.0 - beta1**step),
        bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
        beta1=beta1, beta2=beta2, eps=eps,
        grad_sign=-1.0 if maximize else 1.0,
    )
    scratches: dict[tuple[torch.dtype, torch.device], Scratch] = {}
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        if param.numel() == 0:
            continue
        if not (param.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()):
            reference.adam_mini_update_(param, grad, exp_avg, exp_avg_sq, **hparams)
            continue
        dtype = compute_dtype(param.dtype, grad.dtype, exp_avg.dtype, exp_avg_sq.dtype)
        size = chunk_size(param.device)
        scratch = scratches.get((dtype, param.device))
        if scratch is None:
            largest = max(p.numel() for p in params if p.device == param.device)
            scratch = scratches[(dtype, param.device)] = Scratch(_BUFFERS, dtype, param.device, min(size, largest))
        v = exp_avg_sq if exp_avg_sq.dtype == dtype else exp_avg_sq.to(dtype)
        blocks = v.numel()
        matrices = [t.view(blocks, -1) for t in (param, grad, exp_avg)]
        if matrices[0].shape[1] <= size:
            _update_runs(scratch, matrices, v, coefficients, size)
        else:
            _update_large_blocks(scratch, matrices, v, coefficients, size)
        if v is not exp_avg_sq:
            exp_avg_sq.copy_(v)


class _Coefficients:
    """The step's scalars, formed once in Python (double)."""

    def __init__(self, *, decay: float, step_size: float, bias_correction2_sqrt: float, beta1: float, beta2: float,
                 eps: float, grad_sign: float) -> None:
        self.decay, self.step_size, self.bias_correction2_sqrt = decay, step_size, bias_correction2_sqrt
        self.beta1, self.beta2, self.eps, self.grad_sign = beta1, beta2, eps, grad_sign


def _apply(scratch: Scratch, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
           scale: torch.Tensor, c: _Coefficients) -> None:
    """m ← β1·m + (1 − β1)·g and W ← W·(1 − lr·λ) − lr/bc1 · m · scale for one run (2-D views,
    ``scale`` = 1/(√(v/bc2) + ε) per row or one value); ``grad`` already loaded."""
    m = _load(scratch, 1, exp_avg)
    if c.grad_sign > 0:
        m.lerp_(grad, 1.0 - c.beta1)  # m ← β1·m + (1 − β1)·g, one pass (as 1.1.1 writes it)
    else:  # maximize: the negated gradient
        m.mul_(c.beta1).sub_(grad, alpha=1.0 - c.beta1)
    p = _load(scratch, 2, param)
    if c.decay != 1.0:
        p.mul_(c.decay)  # W ← W·(1 − lr·λ)
    p.addcmul_(m, scale, value=c.step_size)  # W ← W − lr/bc1 · m / (√(v_b/bc2) + ε)
    if m.data_ptr() != exp_avg.data_ptr():
        exp_avg.copy_(m)
    if p.data_ptr() != param.data_ptr():
        param.copy_(p)


def _load(scratch: Scratch, index: int, tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous run in the compute dtype: the tensor itself, or a copy in buffer ``index``."""
    return scratch.load(index, tensor.reshape(-1)).view(tensor.shape)


def _inverse_denominator(v: torch.Tensor, c: _Coefficients) -> torch.Tensor:
    return v.sqrt().div_(c.bias_correction2_sqrt).add_(c.eps).reciprocal_()  # 1/(√(v/bc2) + ε)


def _update_runs(scratch: Scratch, matrices: list[torch.Tensor], v: torch.Tensor, c: _Coefficients,
                 size: int) -> None:
    """Runs of whole blocks (rows of the matrices), at most ``size`` elements each."""
    param, grad, exp_avg = matrices
    blocks, block_numel = param.shape
    rows = max(1, size // block_numel)
    for start in range(0, blocks, rows):
        stop = min(blocks, start + rows)
        g = _load(scratch, 0, grad[start:stop])
        # Σ g² per block as a squared 2-norm: one vectorized reduction, no temporary (several
        # times faster on CPUs than g·g then a sum; two roundings more, far below the sums' own).
        mean_squares = torch.linalg.vector_norm(g, dim=1).square_().div_(block_numel)
        v_run = v[start:stop]
        v_run.mul_(c.beta2).add_(mean_squares, alpha=1.0 - c.beta2)  # v_b ← β2·v_b + (1 − β2)·mean g²
        scale = _inverse_denominator(v_run, c)[:, None]
        _apply(scratch, param[start:stop], g, exp_avg[start:stop], scale, c)


def _update_large_blocks(scratch: Scratch, matrices: list[torch.Tensor], v: torch.Tensor, c: _Coefficients,
                         size: int) -> None:
    """Blocks larger than a chunk, one at a time: the block's sum of g² over its chunks, then the
    update chunk by chunk."""
    param, grad, exp_avg = matrices
    block_numel = param.shape[1]
    for block in range(param.shape[0]):
        total = torch.zeros((), dtype=v.dtype, device=v.device)
        for start in range(0, block_numel, size):
            g = scratch.load(0, grad[block, start:start + size])
            total.add_(torch.linalg.vector_norm(g).square_())
        v_block = v[block:block + 1]
        v_block.mul_(c.beta2).add_(total.div_(block_numel), alpha=1.0 - c.beta2)
        scale = _inverse_denominator(v_block, c)
        for start in range(0, block_numel, size):
            stop = min(block_numel, start + size)
            g = scratch.load(0, grad[block, start:stop])
            _apply(scratch, param[block, start:stop], g, exp_avg[block, start:stop], scale, c)
