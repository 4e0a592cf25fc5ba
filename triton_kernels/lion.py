"""Lion as one fused multi-tensor Triton kernel; twin of :mod:`memzoo.reference.lion`.

Each element is read once (p, g, m) and written once (p, m): 20 bytes per fp32 parameter, the
bandwidth floor. One launch covers every tensor of a (device, dtypes) bucket; see
:mod:`memzoo.triton_kernels.multi_tensor` for the table layout and when tensors are copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memzoo.triton_kernels.multi_tensor import launch_elementwise, sign, tensor_block, to_storage

__all__ = ["AUTO", "INTERPRETED", "lion_update_"]

# backend="auto" selects these kernels on CUDA. A family's kernels are marked True once they have
# been checked and timed on a GPU; until then they run only when asked for with backend="triton".
AUTO = True

# Swept on an H100 over 350m's 219 tensors (bench/RESULTS.md): 1024 elements and 8 warps per
# program was fastest for fp32 and bf16 momentum alike (2.8 / 2.5 ms, against 3.4 / 5.0 ms at
# 4096 elements: small programs keep more loads in flight per SM).
BLOCK = 1024
NUM_WARPS = 8


@triton.jit
def _lion_kernel(
    p_base, g_base, m_base, table, block_tensor, num_tensors,
    lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr,
    MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    p_offs, mask = tensor_block(table, block_tensor, num_tensors, 0, 3, P_ALIGN, BLOCK)
    g_offs, _ = tensor_block(table, block_tensor, num_tensors, 1, 3, G_ALIGN, BLOCK)
    m_offs, _ = tensor_block(table, block_tensor, num_tensors, 2, 3, M_ALIGN, BLOCK)
    p = tl.load(p_base + p_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_base + g_offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_base + m_offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = p * decay  # W ← W·(1 − lr·λ)
    c = m * beta1 + g * one_minus_beta1  # c = β1·m + (1 − β1)·g
    p = p - lr * sign(c)  # W ← W − lr·sign(c); sign(0) = 0, NaN for a non-finite c
    m = m * beta2 + g * one_minus_beta2  # m ← β2·m + (1 − β2)·g
    tl.store(p_base + p_offs, to_storage(p, p_base.dtype.element_ty), mask=mask)
    tl.store(m_base + m_offs, to_storage(m, m_base.dtype.element_ty), mask=mask)


# Triton fixes interpret mode when it decorates; the backend dispatch reads this.
INTERPRETED: bool = isinstance(_lion_kernel, InterpretedFunction)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


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
    """Same contract as :func:`memzoo.reference.lion.lion_update_`; fp32/bf16/fp16 tensors,
    any shapes and strides (non-dense or mismatched-stride tensors go through a contiguous copy)."""
    launch_elementwise(
        _lion_kernel, {"params": params, "grads": grads, "exp_avgs": exp_avgs}, written=[True, False, True],
        block=BLOCK, dtypes=_SUPPORTED, num_warps=NUM_WARPS, align_names=("P_ALIGN", "G_ALIGN", "M_ALIGN"),
        scalars=(lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2), MAXIMIZE=maximize,
    )
