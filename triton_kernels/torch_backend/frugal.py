"""FRUGAL math on the ``"torch"`` backend; twin of :mod:`memzoo.reference.frugal`.

Rewritten: :func:`frugal_apply_`, with the state-full part accumulated into the weight by one
``addmm_`` (BLAS's C ← C + α·A·B, no m×n temporary), the residual E = G − up(down(G)) formed by
one ``addmm`` and signed in place (the reference forms six m×n temporaries);
:func:`frugal_coordinates_step_`, coordinate subspaces as indices (gathers and one chunked pass
instead of four matrix products with 0/1 factors); the dense AdamW branch and the projected Adam
moments are GaLore's twins (:mod:`memzoo.triton_kernels.torch_backend.galore`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memzoo.reference import frugal as reference
from memzoo.reference.common import compute_dtype, host_values, is_dense
from memzoo.reference.frugal import (
    COORDINATE_SIDES,
    RESIDUAL_RULES,
    coordinate_step_lists,
    residual_exceeds,
    residual_kept,
    residual_squares,
    run_coordinates_step,
    split_update_lists,
)
from memzoo.reference.galore import FactorList
from memzoo.reference.projector import matrix_shape, project, selection_factor, side_length
from memzoo.triton_kernels.torch_backend.compiled import CompiledPass
from memzoo.triton_kernels.torch_backend.elementwise import Scratch, chunk_size, for_each_chunk, memory_order_view
from memzoo.triton_kernels.torch_backend.galore import adamw_update_, as_weight_matrix, galore_adam_project_

__all__ = [
    "COORDINATE_SIDES",
    "RESIDUAL_RULES",
    "adamw_update_",
    "coordinate_step_lists",
    "frugal_apply_",
    "frugal_coordinates_step_",
    "galore_adam_project_",
    "residual_exceeds",
    "residual_kept",
    "residual_squares",
    "run_coordinates_step",
    "split_update_lists",
]


@torch.no_grad()
def frugal_apply_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    updates: torch.Tensor | Sequence[torch.Tensor],
    *,
    lefts: FactorList,
    rights: FactorList,
    step_size: float,
    residual_step: float,
    residual_rule: str,
    decay: float,
    maximize: bool = False,
    residual_threshold: float = 0.0,
) -> None:
    """Same contract as :func:`memzoo.reference.frugal.frugal_apply_`. Maximizing negates E
    (E of −G is −E), so only the residual's coefficient turns; −G is never formed."""
    params, grads, updates, lefts, rights = split_update_lists(params, grads, updates, lefts, rights, residual_rule,
                                                               residual_threshold)
    sign_g = -1.0 if maximize else 1.0
    for param, grad, update, left, right in zip(params, grads, updates, lefts, rights):
        matrix, g = as_weight_matrix(param), as_weight_matrix(grad)
        if matrix is None or g is None or param.numel() == 0:
            reference.frugal_apply_(param, grad, update, lefts=left, rights=right, step_size=step_size,
                                    residual_step=residual_step, residual_rule=residual_rule, decay=decay,
                                    maximize=maximize, residual_threshold=residual_threshold)
            continue
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = g if g.dtype == dtype else g.to(dtype)
        n = update.to(dtype)
        work = matrix if param.dtype == dtype else matrix.to(dtype)
        if decay != 0.0:
            work.mul_(1.0 - decay)  # W·(1 − lr·λ), first
        if n.numel():  # the state-full part: W ← W − step_size·up(N)
            if right is not None:
                work.addmm_(n, right, alpha=-step_size)
            else:
                work.addmm_(left, n, alpha=-step_size)
        if residual_rule != "no":
            inside = project(g, left, right)  # R = down(G)
            # E = G − up(R) in one m×n buffer.
            residual = torch.addmm(g, inside, right, alpha=-1.0) if right is not None else torch.addmm(
                g, left, inside, alpha=-1.0)
            if residual_rule == "sign_sgd":
                signs = torch.sign(residual)
                signs.add_(residual.sub_(residual))  # memzoo's sign: NaN where E is not finite (0·NaN too)
                if residual_threshold > 0:
                    kept = residual_kept(g, inside, left, right, residual_threshold)
                    work.addcmul_(signs, kept.to(dtype), value=-residual_step * sign_g)
                else:
                    work.add_(signs, alpha=-residual_step * sign_g)
            else:
                work.add_(residual, alpha=-residual_step * sign_g)
        if work is not matrix:
            matrix.copy_(work)


def _squared_norm(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖tensor‖² (a 0-d float64 tensor) accumulated in ``dtype``: the reference's
    ``vector_norm(·, dtype=dtype)`` squared when the tensor already has that dtype; else by
    chunks in memory order (``vector_norm`` with another dtype first converts the whole tensor:
    an m×n copy for a bf16 gradient): another order of the float32 sum, within its rounding as the
    reference's is (~1e-5 relative for 10⁵ terms), far below the threshold's reliability."""
    chunk = chunk_size(tensor.device)
    if tensor.dtype == dtype or not is_dense(tensor) or tensor.numel() <= chunk:
        return torch.linalg.vector_norm(tensor, dtype=dtype).double().square()
    flat = memory_order_view(tensor)
    parts = [torch.linalg.vector_norm(flat[start:start + chunk], dtype=dtype)
             for start in range(0, flat.numel(), chunk)]
    return torch.stack(parts).double().square().sum()


def _select(matrix: torch.Tensor, dim: int, chosen: torch.Tensor) -> torch.Tensor:
    """matrix's rows (dim 0) or columns (dim 1) ``chosen``: columns by ``gather`` with the index
    broadcast over the rows (on the 2-core CPU 2–4× faster than ``index_select`` along dim 1 for
    512×512 and 1376×512 bf16/fp32 matrices; the same values)."""
    if dim == 0:
        return matrix.index_select(0, chosen)
    return torch.gather(matrix, 1, chosen.expand(matrix.shape[0], -1))


def _place(matrix: torch.Tensor, dim: int, chosen: torch.Tensor, values: torch.Tensor) -> None:
    """matrix's rows or columns ``chosen`` ← values (the inverse of :func:`_select`)."""
    if dim == 0:
        matrix.index_copy_(0, chosen, values)
    else:
        matrix.scatter_(1, chosen.expand(matrix.shape[0], -1), values)


def _gather_is_exact(value: float) -> bool:
    """Whether gathers give the reference's values for a matrix whose ‖G‖² (or ΣN) is ``value``:
    when it is finite (G, N finite, so every 0/1 product is exact). Otherwise the products spread
    a non-finite entry over its row, which only the products themselves reproduce."""
    return math.isfinite(value)


@torch.no_grad()
def frugal_coordinates_step_(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | Sequence[torch.Tensor],
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    residual_step: float,
    residual_rule: str,
    decay: float,
    maximize: bool = False,
    residual_threshold: float = 0.0,
) -> None:
    """Same contract as :func:`memzoo.reference.frugal.frugal_coordinates_step_`, with the
    selection as indices: R = G[:, idx] (rows: G[idx, :]) gathered once, for Adam and for the
    threshold's ‖E‖² = ‖G‖² − ‖R‖² (the reference's float64 formula); W·(1 − decay) − c·φ(G) in
    one pass over W and G (:func:`_residual_passes`: compiled, or chunked); then the selected
    columns, saved before the pass, written as W·(1 − decay) − η·N (there E = 0). Products with 0/1 factors are exact, so for finite G and N
    these are the reference's values, up to the pass's fused multiply-adds.

    Non-finite values: the reference's products spread a non-finite entry of G or N over its row
    (0·Inf = NaN: R, up(N) and E get NaN rows), which a gather does not. A matrix whose ‖G‖² is
    not finite runs the reference's composition with 0/1 factors (this backend's
    :func:`galore_adam_project_` and :func:`frugal_apply_`), as does the update of one whose N is
    not finite. Three host synchronizations per call: the indices' check, the ‖G‖² (before Adam)
    and the ΣN (after it) of all its matrices."""
    params, grads, exp_avgs, exp_avg_sqs, indices = coordinate_step_lists(
        params, grads, exp_avgs, exp_avg_sqs, indices, side, residual_rule, residual_threshold)
    common = dict(side=side, beta1=beta1, beta2=beta2, eps=eps, step_size=step_size, residual_step=residual_step,
                  residual_rule=residual_rule, decay=decay, maximize=maximize, residual_threshold=residual_threshold)
    if any(param.device.type == "meta" for param in params):  # shapes only: no values to decide on
        run_coordinates_step(galore_adam_project_, frugal_apply_, params, grads, exp_avgs, exp_avg_sqs, indices,
                             **common)
        return
    dim = 1 if side == "right" else 0
    thresholded = residual_rule == "sign_sgd" and residual_threshold > 0
    # Stage 1: R, ‖G‖² (whose finiteness is G's) and ‖R‖², for every matrix that has matrix views.
    viewed, insides, squares = [], [], []
    for position, (param, grad, chosen) in enumerate(zip(params, grads, indices)):
        weight, g = as_weight_matrix(param), as_weight_matrix(grad)
        if weight is None or g is None:
            continue
        inside = _select(g, dim, chosen)
        dtype = compute_dtype(param.dtype, grad.dtype)
        total = _squared_norm(g, dtype)
        viewed.append((position, weight, g))
        insides.append(inside)
        # ‖R‖² accumulated in float64 (the reference squares R in float64 and sums: the same up to the
        # order of the sum, far below the threshold's own reliability).
        squares += [total, _squared_norm(inside, torch.float64) if thresholded else total]
    numbers = host_values(squares)
    pairs = list(zip(numbers[0::2], numbers[1::2]))  # (‖G‖², ‖R‖²) per viewed matrix
    fast = [(entry, inside, pair) for entry, inside, pair in zip(viewed, insides, pairs) if _gather_is_exact(pair[0])]
    slow = sorted(set(range(len(params))) - {entry[0] for entry, _, _ in fast})
    if slow:  # non-finite G, or no matrix view: the composition, exactly the reference's values
        pick = lambda values, chosen=slow: [values[i] for i in chosen]  # noqa: E731
        run_coordinates_step(galore_adam_project_, frugal_apply_, pick(params), pick(grads), pick(exp_avgs),
                             pick(exp_avg_sqs), pick(indices), **common)
    if not fast:
        return
    # Stage 2: Adam on the gathered R (exact: G is finite), N in compute-dtype buffers.
    updates = []
    for (position, weight, _), inside, _ in fast:
        updates.append(torch.empty(exp_avgs[position].shape, dtype=compute_dtype(params[position].dtype),
                                   device=weight.device))
    adam = [i for i, update in enumerate(updates) if update.numel()]
    if adam:
        galore_adam_project_([fast[i][1] for i in adam], [exp_avgs[fast[i][0][0]] for i in adam],
                             [exp_avg_sqs[fast[i][0][0]] for i in adam], [updates[i] for i in adam], lefts=None,
                             rights=None, beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
    finite_n = [_gather_is_exact(x) for x in host_values([update.sum() for update in updates])]
    # Stage 3: the update. A non-finite N through the 0/1 products (its NaN rows, as the reference's).
    sign_g = -1.0 if maximize else 1.0
    passes: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    selected = []
    for ((position, weight, g), _, (total, inside_sq)), update, ok in zip(fast, updates, finite_n):
        param, chosen = params[position], indices[position]
        if not ok:
            m, n = matrix_shape(param.shape)
            factor = selection_factor(chosen, side_length((m, n), side), side, param.dtype)  # type: ignore[arg-type]
            frugal_apply_(param, grads[position], update, lefts=factor if side == "left" else None,
                          rights=factor if side == "right" else None, step_size=step_size,
                          residual_step=residual_step, residual_rule=residual_rule, decay=decay, maximize=maximize,
                          residual_threshold=residual_threshold)
            continue
        dtype = update.dtype
        kept = True
        if thresholded:  # the reference's decision (residual_kept), by its float64 formula and values
            kept = residual_exceeds(total, total - 2.0 * inside_sq + inside_sq, residual_threshold)
        # The selected coordinates: W·(1 − decay) − η·N, rounded as the reference (two products, one difference).
        saved = _select(weight, dim, chosen).to(dtype).mul_(1.0 - decay)
        if update.numel():
            saved.sub_(update.mul_(step_size))  # (N is not needed after this)
        selected.append((weight, chosen, saved))
        coefficient = 0.0 if residual_rule == "no" or not kept else -residual_step * sign_g
        passes.append((weight, g, coefficient))
    _residual_passes(passes, decay=decay, signed=residual_rule == "sign_sgd")
    for weight, chosen, saved in selected:  # after the pass, which also wrote them
        _place(weight, dim, chosen, saved.to(weight.dtype))


def _residual_pass(weights: list[torch.Tensor], grads: list[torch.Tensor], coefficients: list[torch.Tensor],
                   keep: torch.Tensor, signed: bool) -> None:
    """W ← W·keep + c·(sign(G) if ``signed`` else G) per matrix, for :class:`CompiledPass` (one
    loop over W and G); ``keep`` = 1 − decay and each matrix's c are 0-d tensors of the compute
    dtype. G is finite here, so torch.sign is memzoo's sign."""
    for weight, grad, coefficient in zip(weights, grads, coefficients):
        g = grad.to(keep.dtype)
        term = torch.sign(g) if signed else g
        weight.copy_(weight.to(keep.dtype) * keep + coefficient * term)


_COMPILED_RESIDUAL = CompiledPass(_residual_pass, "FRUGAL residual pass")


def _residual_passes(passes: list[tuple[torch.Tensor, torch.Tensor, float]], *, decay: float, signed: bool) -> None:
    """W ← W·(1 − decay) + c·φ(G) for each (W, G, c): compiled per compute dtype where the
    :mod:`~memzoo.triton_kernels.torch_backend.compiled` policy says so (one loop instead of a
    chunk's three; the per-matrix c are tensors, so a threshold decision that flips compiles
    nothing new), else chunked eagerly, one call per distinct c."""
    by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for entry in passes:
        by_dtype.setdefault(compute_dtype(entry[0].dtype, entry[1].dtype), []).append(entry)
    for dtype, entries in by_dtype.items():
        def eager(entries: list[tuple[torch.Tensor, torch.Tensor, float]] = entries) -> None:
            by_coefficient: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for weight, grad, coefficient in entries:
                by_coefficient.setdefault(coefficient, []).append((weight, grad))
            for coefficient, pairs in by_coefficient.items():
                _decay_and_residual_pass([w for w, _ in pairs], [g for _, g in pairs], decay=decay,
                                         coefficient=coefficient, signed=signed)

        weights, grads = [entry[0] for entry in entries], [entry[1] for entry in entries]
        if _COMPILED_RESIDUAL.wanted([*weights, *grads]):
            coefficients = [torch.tensor(entry[2], dtype=dtype) for entry in entries]
            _COMPILED_RESIDUAL(weights, grads, coefficients, torch.tensor(1.0 - decay, dtype=dtype), signed,
                               fallback=eager)
        else:
            eager()


def _decay_and_residual_pass(weights: list[torch.Tensor], grads: list[torch.Tensor], *, decay: float,
                             coefficient: float, signed: bool) -> None:
    """W ← W·(1 − decay) + coefficient·(sign(G) if ``signed`` else G), chunk by chunk in the compute
    dtype (one rounding to W's dtype); G is finite here, so torch.sign is memzoo's sign."""

    def update(scratch: Scratch, chunk: tuple[torch.Tensor, ...]) -> None:
        weight, grad = chunk
        w = scratch.load(0, weight)
        if decay != 0.0:
            w.mul_(1.0 - decay)
        if coefficient != 0.0:
            if signed:
                term = (torch.sign(grad, out=scratch.take(1, grad.numel())) if grad.dtype == scratch.dtype
                        else scratch.take(1, grad.numel()).copy_(grad).sign_())
            else:
                term = scratch.load(1, grad)
            w.add_(term, alpha=coefficient)
        if w is not weight:
            weight.copy_(w)

    def whole(group: tuple[torch.Tensor, ...]) -> None:  # views of other layouts: the same math, unchunked
        weight, grad = group
        dtype = compute_dtype(weight.dtype, grad.dtype)
        w = weight.to(dtype).mul_(1.0 - decay) if weight.dtype != dtype else weight.mul_(1.0 - decay)
        if coefficient != 0.0:
            w.add_(torch.sign(grad).to(dtype) if signed else grad.to(dtype), alpha=coefficient)
        if w is not weight:
            weight.copy_(w)

    for_each_chunk((weights, grads), update, whole, buffers=2)
