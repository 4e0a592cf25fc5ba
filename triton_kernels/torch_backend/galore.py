"""GaLore's math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.galore`.

Rewritten here: :func:`adamw_update_` (the dense AdamW branch of every low-rank family) and the
Adam moments of :func:`galore_adam_project_` as chunked multi-tensor passes (about one read and
one write of each tensor, no temporaries of a tensor's size), and :func:`galore_apply_` (the
back-projection accumulated straight into the weight by one ``addmm_`` per matrix, BLAS's
C ← C + α·A·B: no m×n temporary for float32 weights), and :func:`natural_gradients` (Natural
GaLore's Woodbury solves of same-sized histories as batched float64 Cholesky factorizations
and products, in chunks of bounded memory, each weight's finiteness decided on the device;
:func:`natural_gradients_with_grams` with each history's Gram kept by the optimizer).
:func:`project` is the reference's own.

GaLore-Adafactor: :func:`galore_adafactor_apply_` accumulates the back-projection into the weight
by ``addmm_`` (no m×n temporary); the factored moments (r-sized) and the unfactored update of
vectors are the reference's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from memzoo.reference import galore as reference
from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype
from memzoo.reference.galore import (
    FactorList,
    adafactor_apply_lists,
    adafactor_beta2,
    adafactor_lr,
    adafactor_update_,
    as_matrix,
    check_history,
    check_low_rank_shapes,
    galore_adafactor_project_,
    low_rank_lists,
    natural_gradient_lists,
    project,
)
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, chunk_size, for_each_chunk

__all__ = ["adafactor_apply_lists", "adafactor_beta2", "adafactor_lr", "adafactor_update_", "adamw_update_",
           "as_matrix", "as_weight_matrix", "check_low_rank_shapes", "galore_adafactor_apply_",
           "galore_adafactor_project_", "galore_adam_project_", "galore_apply_", "low_rank_lists", "natural_gradient",
           "natural_gradients", "natural_gradients_with_grams", "project"]


def _adam_moments(scratch: Scratch, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  beta1: float, beta2: float, sign_g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g² in the compute dtype (buffers
    1 and 2 when the moments are stored in another dtype), unrounded."""
    m = scratch.load(1, exp_avg).mul_(beta1).add_(g, alpha=sign_g * (1.0 - beta1))
    v = scratch.load(2, exp_avg_sq).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return m, v


@torch.no_grad()
def galore_adam_project_(
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_adam_project_`: R = project(G) (one
    matrix product per matrix, r-sized), then the moments and N = m/(√v+ε) in chunked passes."""
    (grads, exp_avgs, exp_avg_sqs, updates), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, updates=updates, lefts=lefts, rights=rights)
    projected = []
    for grad, exp_avg, exp_avg_sq, update, left, right in zip(grads, exp_avgs, exp_avg_sqs, updates, lefts, rights):
        check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, update=update)
        dtype = compute_dtype(grad.dtype, exp_avg.dtype)
        if left is None and right is None:
            projected.append(grad)
            continue
        factor = lambda f: None if f is None else f.to(dtype)  # noqa: E731
        projected.append(project(as_matrix(grad.to(dtype), grad.shape[0]), factor(left), factor(right)))
    sign_g = -1.0 if maximize else 1.0

    def update_chunk(scratch: Scratch, chunk: tuple[torch.Tensor, ...]) -> None:
        low_rank, exp_avg, exp_avg_sq, update = chunk
        m, v = _adam_moments(scratch, scratch.load(0, low_rank), exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
                             sign_g=sign_g)
        denominator = torch.sqrt(v, out=scratch.take(3, v.numel())).add_(eps)
        if update.dtype == scratch.dtype:
            torch.div(m, denominator, out=update)  # N = m / (√v + ε), from the unrounded moments
        else:
            update.copy_(torch.div(m, denominator, out=denominator))
        for out, value in ((exp_avg, m), (exp_avg_sq, v)):
            if value is not out:
                out.copy_(value)

    def whole(group: tuple[torch.Tensor, ...]) -> None:  # non-dense or mismatched layouts
        reference.galore_adam_project_(*group, lefts=None, rights=None, beta1=beta1, beta2=beta2, eps=eps,
                                       maximize=maximize)

    # R already has the moments' shape; the reference applies no factor to it again.
    for_each_chunk((projected, exp_avgs, exp_avg_sqs, updates), update_chunk, whole, buffers=4)


# torch's fused AdamW kernel reads each tensor's step count to form its bias corrections
# 1 − β^t; at t = 1e30 both are exactly 1 for every β < 1 (β^t underflows to 0), so the kernel
# computes m/(√v + ε) with our ε and step size unchanged.
_NO_BIAS_CORRECTION_STEP = 1e30
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # not DTensors or other subclasses
# A multiple of every vector width of the kernel (AVX-512: 16 float32, 32 bf16 lanes) and of its
# 32768-element tasks' starts: lengths of this multiple never reach its scalar loop.
_FUSED_ALIGN = 64


def _fused_adamw_(lists: dict[str, list[torch.Tensor]], *, step_size: float, beta1: float, beta2: float, eps: float,
                  decay: float, maximize: bool, decay_first: bool) -> tuple[list[torch.Tensor], ...]:
    """Step by ``torch._fused_adamw_`` (one pass over memory per tensor, torch's own vectorized
    AdamW) the tensors it takes: contiguous, one dtype per parameter (moments stored in the
    parameter's dtype), no tensor subclass; return the lists of the others.

    The same math as the reference: with both bias corrections exactly 1 the kernel computes
    W ← W·(1 − lr_k·λ_k) − lr_k·m/(√v + ε). Decay first (torch's order): lr_k = step_size and
    lr_k·λ_k = lr·λ. Decay after the update (GaLore's): (W − u)(1 − lr·λ) = W(1 − lr·λ) −
    u·(1 − lr·λ), so lr_k = step_size·(1 − lr·λ). Rounding differs from the reference's by the
    order of a product (m by lerp, the decay's factor), within its tolerances."""
    fused_step = step_size if decay_first else step_size * (1.0 - decay)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0) or (decay != 0.0 and fused_step == 0.0):
        return tuple(lists.values())
    fused: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, ...]]] = {}
    rest: list[tuple[torch.Tensor, ...]] = []
    for group in zip(*lists.values()):
        param = group[0]
        if (param.numel() and param.dtype in _FUSED_DTYPES and param.device.type in ("cpu", "cuda")
                and all(type(t) in _PLAIN_TENSORS and t.dtype == param.dtype and t.device == param.device
                        and t.is_contiguous() for t in group)):
            fused.setdefault((param.device, param.dtype), []).append(group)
        else:
            rest.append(group)
    for (device, dtype), groups in fused.items():
        # The scalars the kernel gets: as the reference's, which enter float32 math as float32
        # values (float64 math: as they are). The kernel reads them in double: an lr 1 ulp of
        # double apart (a Tensor lr's float32 value) would otherwise step differently.
        lr_k, decay_k = fused_step, decay
        if dtype != torch.float64:
            lr_k, decay_k = (float(torch.tensor(value, dtype=torch.float32)) for value in (fused_step, decay))
        # Every element through the kernel's vector loop: its scalar loop, run on the last numel mod
        # (vector width) elements, rounds differently, so an element's result would depend on where
        # its tensor ends — and an FSDP2 row shard ends elsewhere than the whole tensor. Bodies of
        # _FUSED_ALIGN elements go as views; each tail is stepped in a zero-padded _FUSED_ALIGN
        # block (zeros stay finite) and copied back.
        bodies, tails = [], []
        for group in groups:
            numel = group[0].numel()
            body = numel - numel % _FUSED_ALIGN
            if body:
                bodies.append(tuple(t.view(-1)[:body] for t in group))
            if body < numel:
                padded = tuple(torch.zeros(_FUSED_ALIGN, dtype=t.dtype, device=device) for t in group)
                for block, t in zip(padded, group):
                    block[: numel - body] = t.view(-1)[body:]
                bodies.append(padded)
                tails.append((group, padded, body))
        steps = [torch.full((), _NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=device)] * len(bodies)
        params, grads, exp_avgs, exp_avg_sqs = (list(tensors) for tensors in zip(*bodies))
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr_k, beta1=beta1,
                            beta2=beta2, weight_decay=decay_k / lr_k if decay_k != 0.0 else 0.0, eps=eps,
                            amsgrad=False, maximize=maximize)
        for group, padded, body in tails:
            for t, block in zip(group, padded):
                if t is not group[1]:  # the gradient is read only
                    t.view(-1)[body:] = block[: t.numel() - body]
    return tuple(list(tensors) for tensors in zip(*rest)) if rest else tuple([] for _ in lists)


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
    lists = _fused_adamw_(lists, step_size=step_size, beta1=beta1, beta2=beta2, eps=eps, decay=decay,
                          maximize=maximize, decay_first=decay_first)

    def update(scratch: Scratch, chunk: tuple[torch.Tensor, ...]) -> None:
        param, grad, exp_avg, exp_avg_sq = chunk
        m, v = _adam_moments(scratch, scratch.load(0, grad), exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
                             sign_g=sign_g)
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

    for_each_chunk(lists, update, lambda group: reference.adamw_update_(*group, **hparams), buffers=5)


def as_weight_matrix(param: torch.Tensor) -> torch.Tensor | None:
    """``param`` as its (shape[0], rest) matrix view sharing storage, or None when no such view
    exists (a non-dense layout)."""
    try:
        return param.view(param.shape[0], -1)
    except RuntimeError:
        return None


@torch.no_grad()
def galore_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_apply_`: W ← W − step_size·scale·
    left·N·right (the product accumulated into W), then W ← W − lr·λ·W. Weights in another dtype
    than the update's compute dtype go through one float32 copy; non-dense weights through the
    reference."""
    (params, updates), lefts, rights = low_rank_lists("params", params=params, updates=updates, lefts=lefts,
                                                      rights=rights)
    coefficient = step_size * scale
    decay = lr * weight_decay
    for param, update, left, right in zip(params, updates, lefts, rights):
        check_low_rank_shapes(param.shape, left, right, update=update)
        dtype = compute_dtype(param.dtype, update.dtype)
        matrix = as_weight_matrix(param)
        if matrix is None or (left is None and right is None) or param.numel() == 0:
            reference.galore_apply_(param, update, lefts=left, rights=right, step_size=step_size, scale=scale,
                                    lr=lr, weight_decay=weight_decay)
            continue
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        n = update.to(dtype)
        if left is not None and right is not None:
            left, right = left.to(dtype), right.to(dtype)
            (m, r_left), (r_right, columns) = left.shape, right.shape
            # The r×r update multiplies the shorter side first: m·r² + m·r·n or n·r² + m·r·n flops.
            if m * r_left * r_right + m * r_right * columns <= r_left * r_right * columns + m * r_left * columns:
                work.addmm_(left @ n, right, alpha=-coefficient)
            else:
                work.addmm_(left, n @ right, alpha=-coefficient)
        elif left is not None:
            work.addmm_(left.to(dtype), n, alpha=-coefficient)
        else:
            work.addmm_(n, right.to(dtype), alpha=-coefficient)
        if decay != 0.0:
            work.add_(work, alpha=-decay)  # W ← W − lr·λ·W (after the update, as GaLore)
        if work is not matrix:
            matrix.copy_(work)


# ---- Natural GaLore ---------------------------------------------------------------------------


@torch.no_grad()
def natural_gradient(low_rank_grad: torch.Tensor, history: torch.Tensor, *, damping: float) -> torch.Tensor:
    """Same contract as :func:`memzoo.reference.galore.natural_gradient`: one pair of
    :func:`natural_gradients`."""
    check_history(low_rank_grad, history)
    return natural_gradients([low_rank_grad], [history], damping=damping)[0]


@torch.no_grad()
def natural_gradients(low_rank_grads: torch.Tensor | Sequence[torch.Tensor],
                      histories: torch.Tensor | Sequence[torch.Tensor], *, damping: float) -> list[torch.Tensor]:
    """Same contract as :func:`memzoo.reference.galore.natural_gradients`, with the reference's
    math in float64 (g̃ = λ⁻¹·(g − Hᵀ·y), (λI + H·Hᵀ)·y = H·g) on batches, y by a Cholesky
    factorization of λI + H·Hᵀ (the reference's QR of [Hᵀ; √λ·I] where rounding breaks it):
    pairs of one device, history length k and size d are solved together (see
    :func:`_natural_gradient_chunk`), the others through the reference (k or d = 0)."""
    grads, histories = natural_gradient_lists(low_rank_grads, histories)
    return _natural_gradients(grads, histories, None, None, damping)


@torch.no_grad()
def natural_gradients_with_grams(low_rank_grads: Sequence[torch.Tensor], histories: Sequence[torch.Tensor],
                                 grams: Sequence[torch.Tensor], stale_rows: Sequence[int | None], *,
                                 damping: float) -> list[torch.Tensor]:
    """:func:`natural_gradients` with each history's H·Hᵀ kept by the caller between calls, so
    that a ring-buffer history whose one row changed costs one product H·hᵢ (k·d) instead of the
    Gram H·Hᵀ (k²·d).

    ``grams[i]``: a float64 tensor of at least k×k on the history's device whose leading k×k
    block is H·Hᵀ of ``histories[i]`` (k×d) except row and column ``stale_rows[i]`` (the history
    row written since; None: no entry is known). The call completes the block in place (the
    whole block when ``stale_rows[i]`` is None) and solves with it. The caller vouches for the
    rest of the block (:class:`memzoo.optim.galore.NaturalGaLore` keeps it per weight, checked
    against the history tensor's identity, version and count); a stale block gives a wrong
    result, not an error."""
    grads, histories = natural_gradient_lists(low_rank_grads, histories)
    grams, stale_rows = as_tensor_list("grams", grams), list(stale_rows)
    if not len(grads) == len(grams) == len(stale_rows):
        raise ValueError(f"lists differ in length: {{'low_rank_grads': {len(grads)}, 'grams': {len(grams)}, "
                         f"'stale_rows': {len(stale_rows)}}}")
    for index, (gram, history) in enumerate(zip(grams, histories)):
        k = history.shape[0]
        if gram.dtype != torch.float64 or gram.dim() != 2 or min(gram.shape) < k or gram.device != history.device:
            raise ValueError(f"grams[{index}] must be a float64 matrix of at least {k}×{k} on {history.device}, "
                             f"got {gram.dtype} {tuple(gram.shape)} on {gram.device}")
        row = stale_rows[index]
        if row is not None and (not isinstance(row, int) or not 0 <= row < k):
            raise ValueError(f"stale_rows[{index}] must be None or a row of the k={k} history, got {row!r}")
    return _natural_gradients(grads, histories, grams, stale_rows, damping)


def _natural_gradients(grads: list[torch.Tensor], histories: list[torch.Tensor], grams: list[torch.Tensor] | None,
                       stale_rows: list[int | None] | None, damping: float) -> list[torch.Tensor]:
    results: list[torch.Tensor | None] = [None] * len(grads)
    batches: dict[tuple[torch.device, torch.device, int, int], list[int]] = {}
    for index, (grad, history) in enumerate(zip(grads, histories)):
        batches.setdefault((grad.device, history.device, *history.shape), []).append(index)
    for (device, history_device, k, d), indices in batches.items():
        if k == 0 or d == 0 or history_device != device:
            for index in indices:
                results[index] = reference.natural_gradient(grads[index], histories[index], damping=damping)
                if grams is not None:  # (k·d = 0: nothing to reuse)
                    h = histories[index].to(torch.float64)
                    grams[index][:k, :k].copy_(h @ h.T)
            continue
        per_chunk = _pairs_per_chunk(device, k, d)
        workspace = _NaturalWorkspace(min(per_chunk, len(indices)), k, d, device)
        for start in range(0, len(indices), per_chunk):
            chosen = indices[start:start + per_chunk]
            solved = _natural_gradient_chunk(
                workspace, [grads[i] for i in chosen], [histories[i] for i in chosen],
                None if grams is None else [grams[i] for i in chosen],
                None if stale_rows is None else [stale_rows[i] for i in chosen], damping)
            for index, result in zip(chosen, solved):
                results[index] = result
    return results  # type: ignore[return-value]


def _pairs_per_chunk(device: torch.device, k: int, d: int) -> int:
    """How many pairs of k×d histories one chunk solves. On a CPU as many as keep its float64 H
    within :data:`_CPU_CHUNK_ELEMENTS` (12 of 16384×20: H is out of L2 whatever the chunk, and
    more pairs amortize the ~30 small operations of a chunk, which cost more than its arithmetic
    at one pair; the 56 histories of the 60m preset, kept Grams, 1 thread, median ms per call:
    1 pair per chunk 50, 2: 42, 4: 37, 8: 34, 12: 34, 16: 49, all 56: 98); an accelerator gets a
    few weights per chunk, its buffers within the element-wise engine's scratch size."""
    if device.type == "cpu":
        return max(1, _CPU_CHUNK_ELEMENTS // (k * d))
    return max(1, chunk_size(device) // (2 * k * (d + 2)))


# Float64 elements of H in a chunk on a CPU: 2^22 (32 MiB), the largest block that glibc's malloc
# hands back from call to call (its dynamic mmap threshold stops at 32 MiB); a larger one is
# mapped afresh and page-faulted on every call (16 pairs of 16384×20, 42 MiB: 1.4× 12 pairs' time).
_CPU_CHUNK_ELEMENTS = 1 << 22


class _ChunkViews(NamedTuple):
    """Views of a :class:`_NaturalWorkspace` for a chunk of c pairs."""

    h: torch.Tensor  # (c, k, d): H
    h_rows: list[torch.Tensor]  # each pair's H
    columns: torch.Tensor  # (c, 2, d): g and the history row whose Gram entries are computed
    g_rows: list[torch.Tensor]  # each pair's g, flat (columns[:, 0])
    newest_rows: list[torch.Tensor]  # columns[:, 1]
    gram: torch.Tensor  # (c, k, k)
    grams: list[torch.Tensor]


class _NaturalWorkspace:
    """The float64 buffers of :func:`_natural_gradient_chunk` for up to ``count`` pairs (H, g
    with one history row, the Gram); the views a chunk uses are made once per chunk size. The
    QR fallback makes its own."""

    def __init__(self, count: int, k: int, d: int, device: torch.device) -> None:
        options = dict(dtype=torch.float64, device=device)
        self.h = torch.empty(count, k, d, **options)
        self.columns = torch.empty(count, 2, d, **options)
        self.gram = torch.empty(count, k, k, **options)
        self._views: dict[int, _ChunkViews] = {}

    def views(self, count: int) -> _ChunkViews:
        views = self._views.get(count)
        if views is None:
            h, columns, gram = self.h[:count], self.columns[:count], self.gram[:count]
            views = self._views[count] = _ChunkViews(
                h, list(h.unbind(0)), columns, list(columns[:, 0].unbind(0)), list(columns[:, 1].unbind(0)),
                gram, list(gram.unbind(0)))
        return views


def _natural_gradient_chunk(workspace: _NaturalWorkspace, grads: list[torch.Tensor], histories: list[torch.Tensor],
                            grams: list[torch.Tensor] | None, stale_rows: list[int | None] | None,
                            damping: float) -> list[torch.Tensor]:
    """g̃ of c pairs of one (k, d) by the reference's float64 math, batched (Cholesky, or the QR);
    with ``grams`` (see :func:`natural_gradients_with_grams`) H·Hᵀ from the kept Gram completed
    by one column per pair, H·hᵢ, computed with H·g by the same product.

    Each pair's finiteness is decided on the device, as the reference decides it (all of H and g
    finite), without a pass of its own over H when H and g are stored in at most 32 bits: then
    H·g, needed anyway, is finite exactly when H is (a NaN or ±Inf reaches every product of its
    row, and |Hᵢⱼ·gⱼ| < 2²⁵⁶ cannot overflow float64), and so are the sums of g and of H·g;
    float64 inputs are checked element by element. A non-finite pair's result is NaN (its
    matrix is factored with its non-finite entries zeroed: LAPACK is never handed a NaN); the
    other pairs of the chunk are solved as if it were not there."""
    views = workspace.views(len(grads))
    k = histories[0].shape[0]
    h, gram = views.h, views.gram
    torch._foreach_copy_(views.h_rows, histories)
    flat_grads = [grad.reshape(-1) for grad in grads]
    if grams is None:
        torch._foreach_copy_(views.g_rows, flat_grads)
        rhs = torch.bmm(h, views.columns[:, :1].mT)  # H·g
        torch.bmm(h, h.mT, out=gram)
    else:
        rows = [0 if row is None else row for row in stale_rows]  # type: ignore[union-attr]
        torch._foreach_copy_(views.g_rows + views.newest_rows,
                             flat_grads + [pair[row] for pair, row in zip(views.h_rows, rows)])
        products = torch.bmm(h, views.columns.mT)  # H·g and H·hᵢ: one pass over H
        rhs = products[:, :, :1]
        blocks = [kept[:k, :k] for kept in grams]
        if all(row is None for row in stale_rows):  # type: ignore[union-attr]
            torch.bmm(h, h.mT, out=gram)
        else:
            torch._foreach_copy_(views.grams, blocks)
            for pair, row in enumerate(stale_rows):  # type: ignore[arg-type]
                if row is None:
                    torch.mm(views.h_rows[pair], views.h_rows[pair].T, out=views.grams[pair])
            pairs = torch.arange(len(grads), device=h.device)
            indices = torch.tensor(rows, device=h.device)
            gram[pairs, indices, :] = products[:, :, 1]
            gram[pairs, :, indices] = products[:, :, 1]
        torch._foreach_copy_(blocks, views.grams)
    dtypes = [compute_dtype(grad.dtype, history.dtype) for grad, history in zip(grads, histories)]
    g = views.columns[:, :1].mT  # (c, d, 1)
    if torch.float64 in dtypes:
        finite = torch.isfinite(g).flatten(1).all(dim=1) & torch.isfinite(h).flatten(1).all(dim=1)
    else:  # a sum of these float64 values is finite exactly when all of them are
        finite = torch.isfinite(g.sum(dim=(1, 2)) + rhs.sum(dim=(1, 2)))
    # λI + H·Hᵀ (k×k, float64), Cholesky-factored: as accurate as the reference's QR of
    # [Hᵀ; √λ·I] here (the error of g̃ is the cancellation in g − Hᵀ·y, the same in both: measured
    # against a long-double solve, 1e-15 … 1e-2 relative for |H| from 1e-3 to 1e3, Cholesky's at
    # most QR's) at a fraction of the cost: d·k² multiply-adds in a GEMM (or d·k with a kept Gram)
    # against Householder's 2·d·k² in level-2 steps. Its eigenvalues are ≥ λ, so only rounding at
    # |H|² ≳ λ/ε₆₄ can break it; then (info ≠ 0) the chunk takes the QR.
    gram.diagonal(dim1=1, dim2=2).add_(damping)
    system = torch.where(finite.view(-1, 1, 1), gram, torch.eye(k, dtype=gram.dtype, device=gram.device))
    lower, info = torch.linalg.cholesky_ex(system)
    if h.device.type == "meta" or not bool(info.any()):  # (a meta tensor has no values to check)
        y = torch.cholesky_solve(rhs, lower)
    else:
        # The (d + k)×k matrices [Hᵀ; √λ·I] stored transposed, column-major as LAPACK factors them.
        d = h.shape[-1]
        stacked = torch.zeros(len(grads), k, d + k, dtype=h.dtype, device=h.device)
        torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0, out=stacked[:, :, :d])
        stacked[:, :, d:].diagonal(dim1=1, dim2=2).fill_(math.sqrt(damping))
        tau = torch.empty(len(grads), k, dtype=h.dtype, device=h.device)
        torch.geqrf(stacked.mT, out=(stacked.mT, tau))  # RᵀR = λI + H·Hᵀ
        r = stacked.mT[:, :k, :]
        # (The triangular solves are BLAS's: a non-finite pair's H·g just gives NaN, replaced below.)
        y = torch.linalg.solve_triangular(r, torch.linalg.solve_triangular(r.mT, rhs, upper=False), upper=True)
    # λ⁻¹·(g − Hᵀ·y), as the row gᵀ − yᵀ·H: BLAS then streams H's rows (1.7× faster than Hᵀ·y here)
    result = torch.baddbmm(views.columns[:, :1], y.mT, h, alpha=-1.0).div_(damping).squeeze(1)
    result.masked_fill_(finite.logical_not().unsqueeze(1), math.nan)
    if len(set(dtypes)) == 1:
        result = result.to(dtypes[0])
    return [value.to(dtype).view(grad.shape) for value, dtype, grad in zip(result.unbind(0), dtypes, grads)]


# ---- GaLore-Adafactor ----------------------------------------------------------------------


@torch.no_grad()
def galore_adafactor_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    lrs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    scale: float,
    weight_decay: float,
) -> None:
    """Same contract as :func:`memzoo.reference.galore.galore_adafactor_apply_`: W ← W·(1 − λ·ρ_t)
    in place, then W ← W − scale·left·U·right accumulated into W (one ``addmm_``), or W ← W − U
    for a dense update. Non-dense weights go through the reference."""
    params, updates, lrs, lefts, rights = adafactor_apply_lists(params, updates, lrs, lefts, rights)
    for param, update, lr, left, right in zip(params, updates, lrs, lefts, rights):
        dtype = compute_dtype(param.dtype, update.dtype)
        projected = left is not None or right is not None
        matrix = as_weight_matrix(param) if projected else param
        if matrix is None or param.numel() == 0:
            reference.galore_adafactor_apply_(param, update, lr, lefts=left, rights=right, scale=scale,
                                              weight_decay=weight_decay)
            continue
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        if weight_decay != 0.0:
            work.mul_(1.0 - weight_decay * lr.to(dtype))  # decay first, with Adafactor's lr
        u = update.to(dtype)
        if left is not None and right is not None:
            work.addmm_(left.to(dtype) @ u, right.to(dtype), alpha=-scale)
        elif left is not None:
            work.addmm_(left.to(dtype), u, alpha=-scale)
        elif right is not None:
            work.addmm_(u, right.to(dtype), alpha=-scale)
        else:
            work.sub_(u, alpha=scale)
        if work is not matrix:
            matrix.copy_(work)
