"""GaLore's update (Zhao et al. 2024, Algorithm 2) around its inner rule, HF-style Adam.

Split in the two halves that fused kernels implement: project the gradient and update the
rank-r Adam moments (producing the rank-r normalized update N), then map N back and apply it to
the weight with decoupled decay. With both factors absent it is exactly the full-size Adam the
official code applies to parameters outside the GaLore groups.

Adam convention (the official code's, from transformers.AdamW): m ← β1·m + (1−β1)·R,
v ← β2·v + (1−β2)·R², N = m / (√v + ε), W ← W − η_t·α·P(N) with η_t = lr·√(1−β2^t)/(1−β1^t),
then W ← W − lr·λ·W on the updated weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype, hf_adam_step_size
from memzoo.reference.projector import Side, matrix_shape, project, project_back, projection_side, step_projector_

__all__ = ["adafactor_apply_lists", "adafactor_beta2", "adafactor_lr", "adafactor_update_", "adamw_update_",
           "as_matrix", "check_low_rank_shapes", "galore_adafactor_apply_", "galore_adafactor_project_",
           "galore_adam_project_", "galore_apply_", "low_rank_lists", "natural_gradient", "natural_gradients",
           "project"]

# Factors of a batch: None (no factor on that side), one factor, or one (or None) per matrix.
FactorList = torch.Tensor | Sequence[torch.Tensor | None] | None
# Sums a tensor over the row shards of a weight, in place, and returns it (every rank gets the same
# bits): the collective that lets Adafactor's whole-tensor means run on FSDP2 row shards.
RowReduce = Callable[[torch.Tensor], torch.Tensor]


def check_low_rank_shapes(full_shape: torch.Size, left: torch.Tensor | None, right: torch.Tensor | None,
                          **low_rank: torch.Tensor) -> None:
    """Raise ValueError unless the factors fit the full tensor (viewed as shape[0] × rest) and
    every named low-rank tensor has the projected shape (the full shape without factors)."""
    if left is None and right is None:
        expected = torch.Size(full_shape)
    else:
        m = full_shape[0]
        n = math.prod(full_shape[1:])  # (also of an empty row shard: 0 × n)
        if left is not None and left.shape[0] != m:
            raise ValueError(f"left factor has shape {tuple(left.shape)}, expected {m} rows for a {m}×{n} matrix")
        if right is not None and right.shape[1] != n:
            raise ValueError(f"right factor has shape {tuple(right.shape)}, expected {n} columns for a {m}×{n} matrix")
        expected = torch.Size((left.shape[1] if left is not None else m, right.shape[0] if right is not None else n))
    for name, tensor in low_rank.items():
        if tensor.shape != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")


def as_matrix(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The (rows × rest) matrix a projected tensor is read as: a view when the layout allows."""
    return tensor.reshape(rows, -1) if tensor.dim() != 2 else tensor


def low_rank_lists(count_name: str, *, lefts: FactorList, rights: FactorList,
                   **named: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list, list]:
    """The batch arguments of the GaLore functions as lists of equal length: each named argument
    (one tensor or a sequence) and the factors (None, one tensor, or a sequence of tensors or
    Nones, one per matrix)."""
    lists = [as_tensor_list(name, tensors) for name, tensors in named.items()]
    count = len(named[count_name]) if not isinstance(named[count_name], torch.Tensor) else 1
    if any(len(tensors) != count for tensors in lists):
        raise ValueError(f"tensor lists differ in length: { {n: len(t) for n, t in zip(named, lists)} }")

    def factors(name: str, value: FactorList) -> list[torch.Tensor | None]:
        if value is None:
            return [None] * count
        items = [value] if isinstance(value, torch.Tensor) else list(value)
        if len(items) != count:
            raise ValueError(f"{name} has {len(items)} factors for {count} matrices")
        return items

    return lists, factors("lefts", lefts), factors("rights", rights)


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
    """For each matrix: R = project(G); update the moments in place; write N = m/(√v+ε) into
    its ``updates`` tensor.

    ``grads`` are full gradients (≥2-D grads are read as (shape[0], -1) when projected);
    ``exp_avgs``, ``exp_avg_sqs`` and ``updates`` have R's shape. One tensor or a list each;
    ``lefts``/``rights`` are None, one factor, or one factor (or None) per matrix.
    """
    (grads, exp_avgs, exp_avg_sqs, updates), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, updates=updates, lefts=lefts, rights=rights)
    for grad, exp_avg, exp_avg_sq, update, left, right in zip(grads, exp_avgs, exp_avg_sqs, updates, lefts, rights):
        check_low_rank_shapes(grad.shape, left, right, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, update=update)
        dtype = compute_dtype(grad.dtype, exp_avg.dtype)
        g = grad.to(dtype)
        if maximize:
            g = -g
        if left is not None or right is not None:
            g = project(as_matrix(g, grad.shape[0]), _factor(left, dtype), _factor(right, dtype))
        m = exp_avg.to(dtype) * beta1 + g * (1.0 - beta1)  # m ← β1·m + (1 − β1)·R
        v = exp_avg_sq.to(dtype) * beta2 + g * g * (1.0 - beta2)  # v ← β2·v + (1 − β2)·R²
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        update.copy_(m / (v.sqrt() + eps))  # N = m / (√v + ε), from the unrounded moments


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
    """For each matrix: W ← W − step_size·scale·project_back(N); then W ← W − lr·λ·W (decay
    after, as GaLore). Arguments as in :func:`galore_adam_project_`."""
    (params, updates), lefts, rights = low_rank_lists("params", params=params, updates=updates, lefts=lefts,
                                                      rights=rights)
    for param, update, left, right in zip(params, updates, lefts, rights):
        check_low_rank_shapes(param.shape, left, right, update=update)
        dtype = compute_dtype(param.dtype, update.dtype)
        n = update.to(dtype)
        if left is not None or right is not None:
            n = project_back(n, _factor(left, dtype), _factor(right, dtype))
        w = param.to(dtype) - (step_size * scale) * n.reshape(param.shape)
        if weight_decay != 0.0:
            w = w - (lr * weight_decay) * w
        param.copy_(w)


def _factor(factor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if factor is None else factor.to(dtype)


def check_history(low_rank_grad: torch.Tensor, history: torch.Tensor, name: str = "history") -> None:
    """Raise ValueError unless ``history`` is k×d for the d elements of ``low_rank_grad``."""
    if history.dim() != 2 or history.shape[1] != low_rank_grad.numel():
        raise ValueError(f"{name} must be k×{low_rank_grad.numel()}, got {tuple(history.shape)}")


@torch.no_grad()
def natural_gradient(low_rank_grad: torch.Tensor, history: torch.Tensor, *, damping: float) -> torch.Tensor:
    """Natural GaLore's preconditioned gradient g̃ = (λI + HᵀH)⁻¹ g (Das 2024, §3).

    ``history`` is k×d (k ≤ the history length), one flattened past projected gradient per row,
    the current one included; ``low_rank_grad`` has d elements. Through Woodbury's identity only
    a k×k system is solved: (λI + H·Hᵀ)·y = H·g, g̃ = λ⁻¹·(g − Hᵀ·y), so the d×d Fisher is never
    formed. The result has ``low_rank_grad``'s shape and dtype.

    Stable for every finite H: the system is solved through R from the QR factorization of the
    (d + k)×k matrix [Hᵀ; √λ·I] (RᵀR = λI + H·Hᵀ, so H·Hᵀ, whose condition number is the
    square of that one, is never formed; R's singular values are ≥ √λ, so the triangular solves
    cannot fail), in float64, where the subtraction g − Hᵀ·y keeps its accuracy. (The float32
    Cholesky of I + H·Hᵀ/λ this replaces failed on ordinary gradient histories, condition
    ≈ 4e7, and the step wrote NaN.) A NaN/Inf in H or g gives an all-NaN result, decided on the
    device without a host sync: non-finite input propagates into the weights, as everywhere.
    """
    check_history(low_rank_grad, history)
    g = low_rank_grad.reshape(-1).to(torch.float64)
    h = history.to(torch.float64)
    finite = torch.isfinite(h).all() & torch.isfinite(g).all()
    h = torch.where(finite, h, torch.zeros_like(h))  # LAPACK is never handed a NaN
    g_safe = torch.where(finite, g, torch.zeros_like(g))
    k = h.shape[0]
    root_damping = math.sqrt(damping) * torch.eye(k, dtype=h.dtype, device=h.device)
    _, r = torch.linalg.qr(torch.cat([h.T, root_damping]), mode="r")  # RᵀR = λI + H·Hᵀ
    rhs = (h @ g_safe).unsqueeze(1)
    y = torch.linalg.solve_triangular(r, torch.linalg.solve_triangular(r.T, rhs, upper=False), upper=True)
    result = (g_safe - h.T @ y.squeeze(1)) / damping
    result = torch.where(finite, result, torch.full_like(result, math.nan))
    return result.to(compute_dtype(low_rank_grad.dtype, history.dtype)).reshape(low_rank_grad.shape)


def natural_gradient_lists(low_rank_grads: torch.Tensor | Sequence[torch.Tensor],
                           histories: torch.Tensor | Sequence[torch.Tensor]
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The arguments of :func:`natural_gradients` as two lists of equal length, each history
    checked to be k×d for its gradient's d elements (ValueError naming the index otherwise)."""
    grads, histories = as_tensor_list("low_rank_grads", low_rank_grads), as_tensor_list("histories", histories)
    if len(grads) != len(histories):
        raise ValueError(f"tensor lists differ in length: {{'low_rank_grads': {len(grads)}, "
                         f"'histories': {len(histories)}}}")
    for index, (grad, history) in enumerate(zip(grads, histories)):
        check_history(grad, history, f"histories[{index}]")
    return grads, histories


@torch.no_grad()
def natural_gradients(low_rank_grads: torch.Tensor | Sequence[torch.Tensor],
                      histories: torch.Tensor | Sequence[torch.Tensor], *, damping: float) -> list[torch.Tensor]:
    """:func:`natural_gradient` of each (gradient, history) pair of a batch: a list of the
    results, each with its gradient's shape (the torch backend solves same-sized pairs together)."""
    grads, histories = natural_gradient_lists(low_rank_grads, histories)
    return [natural_gradient(grad, history, damping=damping) for grad, history in zip(grads, histories)]


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
    """The full-size update of parameters outside GaLore groups, on lists of tensors: the same
    math as galore_adam_project_ then galore_apply_ without factors (and the same rounding), in
    one pass: m, v as above, W ← W − step_size·m/(√v+ε), then W ← W − lr·λ·W; with
    ``decay_first`` (torch.optim.AdamW's order, FRUGAL's) W ← W·(1 − lr·λ) before the update."""
    lists = {name: as_tensor_list(name, tensors) for name, tensors in
             (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))}
    check_parallel_lists(**lists)
    for param, grad, exp_avg, exp_avg_sq in zip(*lists.values()):
        dtype = compute_dtype(param.dtype, grad.dtype, exp_avg.dtype)
        g = grad.to(dtype)
        if maximize:
            g = -g
        m = exp_avg.to(dtype) * beta1 + g * (1.0 - beta1)
        v = exp_avg_sq.to(dtype) * beta2 + g * g * (1.0 - beta2)
        w = param.to(dtype)
        if decay_first:
            w = w * (1.0 - lr * weight_decay)
        w = w - step_size * (m / (v.sqrt() + eps))
        if weight_decay != 0.0 and not decay_first:
            w = w - (lr * weight_decay) * w
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        param.copy_(w)


# ---- GaLore-Adafactor (galore-torch 1.0's GaLoreAdafactor) ---------------------------------
#
# HF Adafactor (Shazeer & Stern 2018, as transformers' Adafactor) applied to the projected
# gradient R = P(G), its update mapped back with α = ``scale``. Per step t (1-based):
#   β2_t = 1 − t^decay_rate;  Q = R² + ε1;
#   factored (R ≥2-D): row ← β2_t·row + (1−β2_t)·mean_last(Q), col ← β2_t·col + (1−β2_t)·mean_2nd_last(Q),
#       U = R · rsqrt(row / mean(row)) ⊗ rsqrt(col)   (Adafactor Alg. 4's V̂ = row·colᵀ/Σrow);
#   unfactored (R 1-D): v ← β2_t·v + (1−β2_t)·Q, U = R·rsqrt(v);
#   U ← U / max(1, RMS(U)/d) (update clipping, d = clip_threshold); U ← ρ_t·U;
#   with β1: m ← β1·m + (1−β1)·U, U = m;
#   W ← W − λ·ρ_t·W (decay first, with the Adafactor lr); W ← W − α·back(U).
# ρ_t, the lr (:func:`adafactor_lr`): lr, or min(1e-2 (1e-6·t with warmup_init), 1/√t) with
# relative_step; times max(ε2, RMS(W)) with scale_parameter.


def adafactor_lr(param: torch.Tensor, *, lr: float | None, step: int, relative_step: bool, scale_parameter: bool,
                 warmup_init: bool, eps2: float, rms: torch.Tensor | None = None) -> torch.Tensor:
    """Adafactor's lr ρ_t for ``param`` at step t = ``step`` (1-based), as a 0-d tensor in the
    compute dtype (RMS(W) is read on the device, no host synchronisation): ``lr`` or, with
    ``relative_step``, min(1e-6·t if ``warmup_init`` else 1e-2, 1/√t); times max(ε2, RMS(W))
    with ``scale_parameter`` (W before this step's update). ``rms``: RMS(W) of the whole weight
    when ``param`` is one shard of it (summed over the shards by the caller), in place of the
    local one."""
    relative = lr
    if relative_step:
        relative = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    if relative is None:
        raise ValueError("Adafactor needs lr when relative_step is False")
    dtype = compute_dtype(param.dtype)
    if not scale_parameter:
        return torch.tensor(relative, dtype=dtype, device=param.device)
    if rms is None:
        rms = param.to(dtype).norm() / math.sqrt(max(param.numel(), 1))
    return torch.clamp(rms.to(dtype), min=eps2) * relative


def adafactor_beta2(step: int, decay_rate: float) -> float:
    """β2_t = 1 − t^decay_rate (Adafactor's increasing decay; t 1-based, so β2_1 = 0)."""
    return 1.0 - math.pow(step, decay_rate)


def _clip_scale_momentum(update: torch.Tensor, lr: torch.Tensor, exp_avg: torch.Tensor | None,
                         beta1: float | None, clip_threshold: float, reduce: RowReduce | None = None,
                         numel: int = 0) -> torch.Tensor:
    """U ← U/max(1, RMS(U)/d); U ← ρ_t·U; with β1, m ← β1·m + (1−β1)·U (written) and U = m. With
    ``reduce``, U is a row shard of a tensor of ``numel`` elements: RMS(U) from ΣU² over the shards."""
    if reduce is None:
        rms = update.norm() / math.sqrt(max(update.numel(), 1))
    else:
        rms = reduce(update.square().sum().reshape(1))[0].sqrt() / math.sqrt(max(numel, 1))
    update = update / torch.clamp(rms / clip_threshold, min=1.0) * lr.to(update.dtype)
    if beta1 is not None:
        m = exp_avg.to(update.dtype) * beta1 + update * (1.0 - beta1)
        exp_avg.copy_(m)
        update = m
    return update


def _check_adafactor_moments(index: int, low_rank_shape: torch.Size, row: torch.Tensor, col: torch.Tensor,
                             exp_avg: torch.Tensor | None, beta1: float | None) -> None:
    rows, cols = low_rank_shape[:-1], low_rank_shape[:-2] + low_rank_shape[-1:]
    if row.shape != rows or col.shape != cols:
        raise ValueError(f"matrix {index}: exp_avg_sq_row {tuple(row.shape)} / exp_avg_sq_col {tuple(col.shape)}, "
                         f"expected {tuple(rows)} / {tuple(cols)} for a low-rank gradient of shape "
                         f"{tuple(low_rank_shape)}")
    if (beta1 is None) != (exp_avg is None):
        raise ValueError(f"matrix {index}: give exp_avgs exactly when beta1 is set (beta1={beta1})")
    if exp_avg is not None and exp_avg.shape != low_rank_shape:
        raise ValueError(f"matrix {index}: exp_avg has shape {tuple(exp_avg.shape)}, expected {tuple(low_rank_shape)}")


@torch.no_grad()
def galore_adafactor_project_(
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sq_rows: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sq_cols: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor] | None,
    updates: torch.Tensor | Sequence[torch.Tensor],
    lrs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    beta2: float,
    eps1: float,
    clip_threshold: float,
    beta1: float | None = None,
    maximize: bool = False,
    reduce: RowReduce | None = None,
    rows: Sequence[int] | None = None,
) -> None:
    """For each gradient: R = project(G) (−G when maximizing; without factors R = G keeps its
    shape, ≥2-D), the factored second moment (row and column EMAs, shapes R.shape[:-1] and
    R.shape[:-2] + R.shape[-1:]) updated in place with β2_t = ``beta2``, and the clipped,
    lr-scaled (``lrs``: one 0-d ρ_t per matrix) update U — the β1 momentum (``exp_avgs``, R's
    shape, exactly when ``beta1`` is set) when given — written into ``updates`` (R's shape).
    See the section comment above for the math.

    Row shards (FSDP2): with ``reduce`` (sums a tensor over the shards in place) and ``rows``
    (each R's whole dim-0 size), every tensor given is this rank's dim-0 slice of R's (the
    gradient's rows, a right factor whole): a 2-D R's column EMA and mean(row EMA) come from
    one reduction of their sums (n + 1 values), RMS(U) from one of ΣU²; the means of a ≥3-D R
    are over its unsharded dimensions. Two collectives per matrix; an empty slice joins them."""
    (grads, row_emas, cols, updates, lrs), lefts, rights = low_rank_lists(
        "grads", grads=grads, exp_avg_sq_rows=exp_avg_sq_rows, exp_avg_sq_cols=exp_avg_sq_cols, updates=updates,
        lrs=lrs, lefts=lefts, rights=rights)
    exp_avgs = [None] * len(grads) if exp_avgs is None else as_tensor_list("exp_avgs", exp_avgs)
    if len(exp_avgs) != len(grads):
        raise ValueError(f"tensor lists differ in length: grads {len(grads)}, exp_avgs {len(exp_avgs)}")
    totals = _shard_rows(reduce, rows, [update.shape[0] if update.dim() else 0 for update in updates])
    for index, (grad, row, col, exp_avg, update, left, right) in enumerate(
            zip(grads, row_emas, cols, exp_avgs, updates, lefts, rights)):
        check_low_rank_shapes(grad.shape, left, right, update=update)
        if update.dim() < 2:
            raise ValueError(f"matrix {index}: the factored second moment needs a ≥2-D gradient, got "
                             f"{tuple(update.shape)} (1-D tensors take adafactor_update_)")
        _check_adafactor_moments(index, update.shape, row, col, exp_avg, beta1)
    for grad, row, col, exp_avg, update, lr, left, right, total in zip(grads, row_emas, cols, exp_avgs, updates, lrs,
                                                                       lefts, rights, totals):
        dtype = compute_dtype(grad.dtype, row.dtype)
        g = grad.to(dtype)
        if maximize:
            g = -g
        if left is not None or right is not None:
            g = project(as_matrix(g, grad.shape[0]), _factor(left, dtype), _factor(right, dtype))
        squared = g * g + eps1  # Q = R² + ε1
        r_ema = row.to(dtype) * beta2 + squared.mean(dim=-1) * (1.0 - beta2)
        if reduce is not None and g.dim() == 2:  # the rows are sharded: column means and mean(row) over all
            sums = reduce(torch.cat([squared.sum(dim=-2), r_ema.sum().reshape(1)]))
            c_ema = col.to(dtype) * beta2 + (sums[:-1] / total) * (1.0 - beta2)
            r_mean = sums[-1:] / total
        else:
            c_ema = col.to(dtype) * beta2 + squared.mean(dim=-2) * (1.0 - beta2)
            r_mean = r_ema.mean(dim=-1, keepdim=True)
        row.copy_(r_ema)
        col.copy_(c_ema)
        row_factor = (r_ema / r_mean).rsqrt().unsqueeze(-1)
        u = g * (row_factor * c_ema.unsqueeze(-2).rsqrt())  # R / √V̂, V̂ = row·colᵀ / mean(row)
        numel = total * math.prod(u.shape[1:])
        update.copy_(_clip_scale_momentum(u, lr, exp_avg, beta1, clip_threshold, reduce, numel))


def _shard_rows(reduce: RowReduce | None, rows: Sequence[int] | None, local_rows: list[int]) -> list[int]:
    """Each tensor's whole dim-0 size (its own without ``reduce``); ValueError when ``reduce``
    and ``rows`` do not come together or ``rows`` does not fit the local slices."""
    if (reduce is None) != (rows is None):
        raise ValueError("give reduce and rows together (row shards: the collective and each tensor's whole "
                         "dim-0 size), or neither")
    if rows is None:
        return local_rows
    rows = list(rows)
    if len(rows) != len(local_rows):
        raise ValueError(f"rows has {len(rows)} sizes for {len(local_rows)} tensors")
    for index, (total, local) in enumerate(zip(rows, local_rows)):
        if isinstance(total, bool) or not isinstance(total, int) or total < max(local, 1):
            raise ValueError(f"rows[{index}] = {total!r}: expected the whole dim-0 size, an int ≥ the local "
                             f"slice's {local} rows and ≥ 1")
    return rows


def adafactor_apply_lists(params: torch.Tensor | Sequence[torch.Tensor], updates: torch.Tensor | Sequence[torch.Tensor],
                          lrs: torch.Tensor | Sequence[torch.Tensor], lefts: FactorList,
                          rights: FactorList) -> tuple[list, list, list, list, list]:
    """The arguments of :func:`galore_adafactor_apply_` as checked lists (U of the projected
    shape); ValueError naming the first problem, before anything is written."""
    (params, updates, lrs), lefts, rights = low_rank_lists("params", params=params, updates=updates, lrs=lrs,
                                                           lefts=lefts, rights=rights)
    for param, update, left, right in zip(params, updates, lefts, rights):
        check_low_rank_shapes(param.shape, left, right, update=update)
    return params, updates, lrs, lefts, rights


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
    """For each weight: W ← W − λ·ρ_t·W (decay first, with Adafactor's lr ρ_t from ``lrs``), then
    W ← W − scale·back(U) (U already carries ρ_t). Factors as in :func:`galore_adam_project_`;
    without factors U has W's shape (and ``scale`` is 1 for galore-torch's dense parameters)."""
    params, updates, lrs, lefts, rights = adafactor_apply_lists(params, updates, lrs, lefts, rights)
    for param, update, lr, left, right in zip(params, updates, lrs, lefts, rights):
        dtype = compute_dtype(param.dtype, update.dtype)
        u = update.to(dtype)
        if left is not None or right is not None:
            u = project_back(u, _factor(left, dtype), _factor(right, dtype))
        w = param.to(dtype)
        if weight_decay != 0.0:
            w = w - (weight_decay * lr.to(dtype)) * w
        param.copy_(w - scale * u.reshape(param.shape))


@torch.no_grad()
def adafactor_update_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor] | None,
    lrs: torch.Tensor | Sequence[torch.Tensor],
    *,
    beta2: float,
    eps1: float,
    clip_threshold: float,
    weight_decay: float,
    beta1: float | None = None,
    maximize: bool = False,
    reduce: RowReduce | None = None,
    rows: Sequence[int] | None = None,
) -> None:
    """Adafactor on tensors with fewer than 2 dimensions (its unfactored form): v ← β2_t·v +
    (1−β2_t)·(G² + ε1), U = G·rsqrt(v), clipped, lr-scaled, β1 momentum, W ← W − λ·ρ_t·W,
    W ← W − U. Lists as :func:`galore_adafactor_project_` (``exp_avg_sqs`` has W's shape; with
    ``reduce`` and ``rows`` each tensor is a row shard, and RMS(U) sums ΣU² over the shards)."""
    lists = {name: as_tensor_list(name, tensors) for name, tensors in
             (("params", params), ("grads", grads), ("exp_avg_sqs", exp_avg_sqs))}
    check_parallel_lists(**lists)
    lrs = as_tensor_list("lrs", lrs)
    exp_avgs = [None] * len(lrs) if exp_avgs is None else as_tensor_list("exp_avgs", exp_avgs)
    if not len(lrs) == len(exp_avgs) == len(lists["params"]):
        raise ValueError(f"tensor lists differ in length: params {len(lists['params'])}, lrs {len(lrs)}, "
                         f"exp_avgs {len(exp_avgs)}")
    for index, (param, exp_avg) in enumerate(zip(lists["params"], exp_avgs)):
        if (beta1 is None) != (exp_avg is None) or (exp_avg is not None and exp_avg.shape != param.shape):
            raise ValueError(f"params[{index}]: give an exp_avg of the param's shape exactly when beta1 is set")
    totals = _shard_rows(reduce, rows, [param.shape[0] if param.dim() else 1 for param in lists["params"]])
    for param, grad, exp_avg_sq, exp_avg, lr, total in zip(*lists.values(), exp_avgs, lrs, totals):
        dtype = compute_dtype(param.dtype, grad.dtype, exp_avg_sq.dtype)
        g = grad.to(dtype)
        if maximize:
            g = -g
        v = exp_avg_sq.to(dtype) * beta2 + (g * g + eps1) * (1.0 - beta2)
        exp_avg_sq.copy_(v)
        u = _clip_scale_momentum(v.rsqrt() * g, lr, exp_avg, beta1, clip_threshold, reduce,
                                 total * math.prod(param.shape[1:]))
        w = param.to(dtype)
        if weight_decay != 0.0:
            w = w - (weight_decay * lr.to(dtype)) * w
        param.copy_(w - u)


# -- Whole steps: one weight's step as the optimizers compose it (the truth for optim/) ------
#
# Each ``*_step`` function takes a weight, its gradient, its optimizer state (the optimizer's
# keys; {} before the first step) and the param group's hyperparameters (keyword-only, the
# group's key names), plus ``seed``: the weight's projector seed (the optimizer's ``seed`` + the
# weight's index over all its parameters). It returns the new weight and the new state and
# leaves its inputs untouched. It is composed from the per-kernel functions above, which write
# into copies: the math is theirs, only the composition is written here. Moments are 32-bit
# (``optim_bits=8``'s blockwise codes are not modelled). These functions are
# not in ``__all__``, which lists what every backend module provides (a step has one
# implementation to be held to them: the optimizer's); tests/test_steps.py compares the two.


def step_copies(param: torch.Tensor, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Copies of a weight and its state for a whole-step function to update in place."""
    return param.detach().clone(), {name: value.clone() for name, value in state.items()}


def moments_(state: dict[str, torch.Tensor], shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Adam moments (exp_avg, exp_avg_sq) of ``state``, created as zeros of ``shape`` and
    ``dtype`` on a weight's first step."""
    for name in ("exp_avg", "exp_avg_sq"):
        if name not in state:
            state[name] = torch.zeros(shape, dtype=dtype, device=device)
    return state["exp_avg"], state["exp_avg_sq"]


def next_step_(state: dict[str, torch.Tensor], name: str = "step") -> int:
    """Advance the 0-d int64 counter ``state[name]`` (created at 0); return its value before."""
    step = int(state[name]) if name in state else 0
    state[name] = torch.tensor(step + 1, dtype=torch.int64)
    return step


def low_rank_setup(param: torch.Tensor, *, rank: int, proj_type: str, strict_rank: bool,
                   projector: str) -> tuple[tuple[int, int], Side, int]:
    """A projected weight's (m, n), side and rank: GaLore's side rule, the rank truncated to
    min(m, n) (a ValueError with ``strict_rank``, except for the identity projector)."""
    shape = matrix_shape(param.shape)
    if strict_rank and rank > min(shape) and projector != "identity":
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(shape)} of a weight of shape {tuple(param.shape)}")
    return shape, projection_side(shape, proj_type), min(rank, *shape)


def low_rank_shape(shape: tuple[int, int], left: torch.Tensor | None, right: torch.Tensor | None) -> tuple[int, int]:
    """The shape of R = project(G) for an m×n G and the factors."""
    return (left.shape[1] if left is not None else shape[0], right.shape[0] if right is not None else shape[1])


def is_projected(param: torch.Tensor, size: float | None) -> bool:
    """Whether a group with this ``rank`` (or density) projects ``param``: only ≥2-D, non-empty
    weights in a group that sets one; everything else takes the dense AdamW branch."""
    return size is not None and param.dim() >= 2 and param.numel() > 0


@torch.no_grad()
def galore_dense_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, lr: float,
                      betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool,
                      state_dtype: torch.dtype | None, maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of a weight GaLore does not project (GaLore's, Natural GaLore's and APOLLO's dense
    branch): full-size HF Adam, decay after, as the official code gives such parameters."""
    param, state = step_copies(param, state)
    exp_avg, exp_avg_sq = moments_(state, param.shape, state_dtype or param.dtype, param.device)
    t = next_step_(state) + 1
    # m, v ← β·(m, v) + (1 − β)·(G, G²); W ← W − η_t·m/(√v + ε); W ← W − lr·λ·W
    adamw_update_(param, grad, exp_avg, exp_avg_sq, step_size=hf_adam_step_size(lr, betas, correct_bias, t),
                  beta1=betas[0], beta2=betas[1], eps=eps, lr=lr, weight_decay=weight_decay, maximize=maximize)
    return param, state


@torch.no_grad()
def galore_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool, rank: int | None,
                update_proj_gap: int, scale: float, proj_type: str, projector: str, power_iters: int,
                oversample: int, strict_rank: bool, state_dtype: torch.dtype | None,
                maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One GaLoreAdamW step of one weight (32-bit moments; Zhao et al. 2024, Algorithm 2): the
    new weight and state (see this section's comment). Unprojected weights:
    :func:`galore_dense_step`."""
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
    if not is_projected(param, rank):
        return galore_dense_step(param, grad, state, state_dtype=state_dtype, maximize=maximize, **hyper)
    return _galore_projected_step(param, grad, state, seed=seed, rank=rank, update_proj_gap=update_proj_gap,
                                  scale=scale, proj_type=proj_type, projector=projector, power_iters=power_iters,
                                  oversample=oversample, strict_rank=strict_rank, state_dtype=state_dtype,
                                  maximize=maximize, natural_galore=False, natural=None, **hyper)


@torch.no_grad()
def natural_galore_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int,
                        lr: float, betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool,
                        rank: int | None, update_proj_gap: int, scale: float, proj_type: str, projector: str,
                        power_iters: int, oversample: int, strict_rank: bool, state_dtype: torch.dtype | None,
                        maximize: bool, natural: bool, natural_history: int,
                        damping: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One NaturalGaLore step of one weight (Das 2024): GaLore's step on canonically signed
    singular vectors whose projected gradient, before Adam, joins the history H of the last
    ``natural_history`` ones and is replaced by (λI + HᵀH)⁻¹g (``natural``; §3). Unprojected
    weights: :func:`galore_dense_step`."""
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
    if not is_projected(param, rank):
        return galore_dense_step(param, grad, state, state_dtype=state_dtype, maximize=maximize, **hyper)
    return _galore_projected_step(param, grad, state, seed=seed, rank=rank, update_proj_gap=update_proj_gap,
                                  scale=scale, proj_type=proj_type, projector=projector, power_iters=power_iters,
                                  oversample=oversample, strict_rank=strict_rank, state_dtype=state_dtype,
                                  maximize=maximize, natural_galore=True,
                                  natural=(natural_history, damping) if natural else None, **hyper)


def _galore_projected_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int,
                           lr: float, betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool,
                           rank: int, update_proj_gap: int, scale: float, proj_type: str, projector: str,
                           power_iters: int, oversample: int, strict_rank: bool, state_dtype: torch.dtype | None,
                           maximize: bool, natural_galore: bool,
                           natural: tuple[int, float] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GaLore's projected step, or Natural GaLore's (``natural_galore``: canonical singular
    vector signs, the projection apart from Adam) preconditioned when ``natural`` = (history
    length, damping) is given (None: its ``natural=False``, the official proj_type "galore")."""
    param, state = step_copies(param, state)
    shape, side, rank = low_rank_setup(param, rank=rank, proj_type=proj_type, strict_rank=strict_rank,
                                       projector=projector)
    g = grad.reshape(shape)
    step = next_step_(state)
    # Alg. 2: P_t ← SVD(G_t) if t mod T = 0, else P_{t−1}
    left, right, _ = step_projector_(state, g, step=step, base_seed=seed, rank=rank, side=side, method=projector,
                                     update_proj_gap=update_proj_gap, power_iters=power_iters, oversample=oversample,
                                     signs="canonical" if natural_galore else "raw", maximize=maximize,
                                     dtype=param.dtype)
    dtype = compute_dtype(param.dtype)
    exp_avg, exp_avg_sq = moments_(state, low_rank_shape(shape, left, right), state_dtype or param.dtype, param.device)
    update = torch.empty(exp_avg.shape, dtype=dtype, device=param.device)
    hyper = dict(beta1=betas[0], beta2=betas[1], eps=eps)
    if not natural_galore:  # Alg. 2: R_t = P_tᵀG_t; m, v ← β·(m, v) + (1 − β)·(R, R²); N_t = m/(√v + ε)
        galore_adam_project_(g, exp_avg, exp_avg_sq, update, lefts=left, rights=right, maximize=maximize, **hyper)
    else:  # Natural GaLore: g = AᵀGBᵀ (−G when maximizing), preconditioned, then Adam on it
        low_rank = project(g.to(dtype), _factor(left, dtype), _factor(right, dtype))
        if maximize:
            low_rank = -low_rank
        if natural is not None:
            length, damping = natural
            if "nat_history" not in state:
                state["nat_history"] = torch.zeros((length, low_rank.numel()), dtype=state_dtype or grad.dtype,
                                                   device=grad.device)
            count = next_step_(state, "nat_count")
            state["nat_history"][count % length] = low_rank.reshape(-1)  # H: the last s projected gradients, g included
            low_rank = natural_gradient(low_rank, state["nat_history"][: min(count + 1, length)],
                                        damping=damping)  # §3: g̃ = (λI + HᵀH)⁻¹g
        galore_adam_project_(low_rank, exp_avg, exp_avg_sq, update, lefts=None, rights=None, **hyper)
    # Alg. 2: W ← W − η_t·α·P_t·N_t; then W ← W − lr·λ·W (decay after, on the updated weight)
    step_size = hf_adam_step_size(lr, betas, correct_bias, step + 1)
    galore_apply_(param, update, lefts=left, rights=right, step_size=step_size, scale=scale, lr=lr,
                  weight_decay=weight_decay)
    return param, state


@torch.no_grad()
def galore_adafactor_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int,
                          lr: float | None, eps: tuple[float, float], clip_threshold: float, decay_rate: float,
                          beta1: float | None, weight_decay: float, scale_parameter: bool, relative_step: bool,
                          warmup_init: bool, rank: int | None, update_proj_gap: int, scale: float, proj_type: str,
                          projector: str, power_iters: int, oversample: int, strict_rank: bool,
                          state_dtype: torch.dtype | None,
                          maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One GaLore-Adafactor step of one weight (galore-torch 1.0's ``GaLoreAdafactor``; Adafactor:
    Shazeer & Stern 2018, Alg. 4 with update clipping, §6): the new weight and state. Projected
    weights: Adafactor on R = P(G), its update mapped back with α = ``scale``; the others plain
    Adafactor (factored for ≥2-D, over the last two dimensions; unfactored for vectors), as
    galore-torch gives parameters outside rank groups. State: ``exp_avg_sq_row`` /
    ``exp_avg_sq_col`` (factored) or ``exp_avg_sq``, ``exp_avg`` with β1, in ``state_dtype`` (None:
    the math's dtype, float32 for 16-bit weights, as galore-torch upcasts)."""
    param, state = step_copies(param, state)
    projected = is_projected(param, rank)
    left = right = None
    low_shape = tuple(param.shape)
    g = grad
    if projected:
        shape, side, rank = low_rank_setup(param, rank=rank, proj_type=proj_type, strict_rank=strict_rank,
                                           projector=projector)
        g = grad.reshape(shape)
    step = next_step_(state)
    if projected:
        left, right, _ = step_projector_(state, g, step=step, base_seed=seed, rank=rank, side=side, method=projector,
                                         update_proj_gap=update_proj_gap, power_iters=power_iters,
                                         oversample=oversample, signs="raw", maximize=maximize, dtype=param.dtype)
        low_shape = low_rank_shape(shape, left, right)
    dtype = compute_dtype(param.dtype)
    moment_dtype = state_dtype or dtype
    factored = len(low_shape) >= 2
    if beta1 is not None and "exp_avg" not in state:
        state["exp_avg"] = torch.zeros(low_shape, dtype=moment_dtype, device=param.device)
    names = {"exp_avg_sq_row": low_shape[:-1], "exp_avg_sq_col": low_shape[:-2] + low_shape[-1:]} if factored \
        else {"exp_avg_sq": low_shape}
    for name, moment_shape in names.items():
        if name not in state:
            state[name] = torch.zeros(moment_shape, dtype=moment_dtype, device=param.device)
    t = step + 1
    # ρ_t: lr, or min(1e-2 (1e-6·t warming up), 1/√t); times max(ε2, RMS(W)) with scale_parameter
    lr_t = adafactor_lr(param, lr=lr, step=t, relative_step=relative_step, scale_parameter=scale_parameter,
                        warmup_init=warmup_init, eps2=eps[1])
    hyper = dict(beta2=adafactor_beta2(t, decay_rate), eps1=eps[0], clip_threshold=clip_threshold, beta1=beta1,
                 maximize=maximize)
    if factored:  # Alg. 4: row/col EMAs of R² + ε1, U = R/√V̂, clipped, ρ_t·U (β1 momentum)
        update = torch.empty(low_shape, dtype=dtype, device=param.device)
        galore_adafactor_project_(g, state["exp_avg_sq_row"], state["exp_avg_sq_col"], state.get("exp_avg"), update,
                                  lr_t, lefts=left, rights=right, **hyper)
        # W ← W − λ·ρ_t·W; W ← W − α·P(U)
        galore_adafactor_apply_(param, update, lr_t, lefts=left, rights=right, scale=scale if projected else 1.0,
                                weight_decay=weight_decay)
    else:
        adafactor_update_(param, grad, state["exp_avg_sq"], state.get("exp_avg"), lr_t, weight_decay=weight_decay,
                          **hyper)
    return param, state
