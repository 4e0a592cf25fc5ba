"""FRUGAL (Zmushko et al. 2024): each gradient split into a state-full part in a low-dimensional
subspace, updated by Adam, and the state-free remainder, updated by signSGD (or SGD).

For a weight W with gradient G and a subspace given by factors (GaLore's orthonormal bases, or
coordinate selections as 0/1 factors), down(G) = R and up(·) its back-projection:

    W ← W·(1 − lr·λ)                                   (decoupled decay first, on every weight)
    W ← W − η_t·up(N),  N = m/(√v + ε′)                (Adam on R; the moments by
                                                        :func:`memzoo.reference.galore.galore_adam_project_`)
    W ← W − η_free·φ(G − up(down(G))),  φ = sign | identity | 0

The official code's Adam is torch's: ε is added to √v/√(1−β2^t). The caller passes it in GaLore's
form, η_t = lr·√(1−β2^t)/(1−β1^t) and ε′ = ε·√(1−β2^t), which is the same update.

A zero-rank factor (an r = 0 subspace: density 0) makes the state-full part vanish and the
update pure signSGD; coordinate factors covering every coordinate make the residual vanish and
the update Adam's.

signSGD on rounding noise: when the subspace holds the whole gradient (rank(G) ≤ r with an SVD
subspace, e.g. a batch of one), E is rounding noise of size ≈ 1e-7·‖G‖, and sign(E) moves every
coordinate by the full residual step in a random direction (the official code does so; the
loss then rose in about one small run in three). With ``residual_threshold`` τ > 0, a matrix
whose residual is at most τ·‖G‖_F (‖E‖² formed from G's norm and the small R,
:func:`residual_kept`, in float64 from float32 math: reliable for τ ≳ 1e-3) takes no signSGD
step; τ = 0 is the official update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype, sign, torch_adam_form
from memzoo.reference.galore import (
    FactorList,
    adamw_update_,
    as_matrix,
    check_low_rank_shapes,
    galore_adam_project_,
    is_projected,
    low_rank_lists,
    low_rank_shape,
    moments_,
    next_step_,
    step_copies,
)
from memzoo.reference.projector import (
    Side,
    matrix_shape,
    project,
    project_back,
    projection_side,
    selection_factor,
    side_length,
    step_projector_,
)

__all__ = ["COORDINATE_SIDES", "RESIDUAL_RULES", "adamw_update_", "coordinate_step_lists", "frugal_apply_",
           "frugal_coordinates_step_", "galore_adam_project_", "residual_exceeds", "residual_kept",
           "residual_squares", "run_coordinates_step", "split_update_lists"]

RESIDUAL_RULES: tuple[str, ...] = ("sign_sgd", "sgd", "no")
# A coordinate subspace selects columns (right: R = G[:, idx], m×r) or rows (left: R = G[idx, :], r×n).
COORDINATE_SIDES: tuple[str, ...] = ("left", "right")


def split_update_lists(params: torch.Tensor | Sequence[torch.Tensor], grads: torch.Tensor | Sequence[torch.Tensor],
                       updates: torch.Tensor | Sequence[torch.Tensor], lefts: FactorList, rights: FactorList,
                       residual_rule: str, residual_threshold: float = 0.0) -> tuple[list, list, list, list, list]:
    """The arguments of :func:`frugal_apply_` as checked lists (params, grads, updates, lefts,
    rights); ValueError naming the first problem, before anything is written."""
    if residual_rule not in RESIDUAL_RULES:
        raise ValueError(f"Invalid residual_rule: {residual_rule!r}; expected one of {RESIDUAL_RULES}")
    if not 0.0 <= residual_threshold < 1.0:
        raise ValueError(f"Invalid residual_threshold: {residual_threshold!r} (expected a number in [0, 1))")
    (params, grads, updates), lefts, rights = low_rank_lists("params", params=params, grads=grads, updates=updates,
                                                             lefts=lefts, rights=rights)
    for index, (param, grad, update, left, right) in enumerate(zip(params, grads, updates, lefts, rights)):
        if grad.shape != param.shape:
            raise ValueError(f"grads[{index}] has shape {tuple(grad.shape)}, params[{index}] {tuple(param.shape)}")
        if (left is None) == (right is None):
            raise ValueError(f"FRUGAL projects one side: matrix {index} needs exactly one of a left or right factor")
        check_low_rank_shapes(param.shape, left, right, update=update)
    return params, grads, updates, lefts, rights


def residual_kept(grad: torch.Tensor, inside: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                  threshold: float) -> torch.Tensor:
    """1.0, or 0.0 when the residual E = G − up(R) of matrix G, with R = down(G) (``inside``)
    for the one-sided factor ``left`` (m×r) or ``right`` (r×n), is at most ``threshold``·‖G‖_F.

    ‖E‖² is formed without E (:func:`residual_squares`). A 0-d float32 tensor on G's device,
    decided there (no host sync); the multiplier of the signSGD step, so a NaN/Inf residual still
    propagates (0·NaN = NaN)."""
    total, residual = residual_squares(grad, inside, left, right)
    return residual_exceeds(total, residual, threshold).to(torch.float32)


def residual_exceeds(total: torch.Tensor | float, residual: torch.Tensor | float,
                     threshold: float) -> torch.Tensor | bool:
    """FRUGAL's threshold rule, ‖E‖² > τ²·‖G‖², from ``total`` = ‖G‖² and ``residual`` = ‖E‖²
    (0-d tensors or floats; the same expression, so every path that decides it — the reference,
    row shards from all-reduced sums, the torch backend's gathers — decides alike)."""
    return residual > threshold * threshold * total


def residual_squares(grad: torch.Tensor, inside: torch.Tensor, left: torch.Tensor | None,
                     right: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖G‖², ‖E‖²) as 0-d float64 tensors, E = G − up(R), R = down(G) (``inside``), without
    forming E: ‖E‖² = ‖G‖² − 2‖R‖² + ⟨R, R·PPᵀ⟩ (right; ⟨R, PᵀP·R⟩ left), exact for any factor
    (= ‖G‖² − ‖R‖² for an orthonormal one), in float64 from norms of float32 (float64) math.
    Both are sums over G's rows for a right factor (and for a selection of rows), so row shards'
    values add up to the whole matrix's."""
    total = torch.linalg.vector_norm(grad, dtype=compute_dtype(grad.dtype)).double().square()
    r = inside.double()
    if right is not None:
        factor = right.double()
        back = r @ (factor @ factor.T)  # R·PPᵀ
    else:
        factor = left.double()
        back = (factor.T @ factor) @ r  # PᵀP·R
    return total, total - 2.0 * r.square().sum() + (r * back).sum()


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
    """For each matrix (W read as (shape[0], rest)): W ← W·(1 − decay) − step_size·up(N)
    − residual_step·φ(G − up(down(G))), G negated when maximizing. ``updates`` hold N (the
    low-rank shape); the factors are one-sided (left m×r or right r×n, r may be 0). With
    ``residual_threshold`` > 0 and φ = sign, a matrix whose residual is below it relative to
    ‖G‖ (:func:`residual_kept`) takes no signSGD step (see the module's docstring)."""
    params, grads, updates, lefts, rights = split_update_lists(params, grads, updates, lefts, rights, residual_rule,
                                                               residual_threshold)
    for param, grad, update, left, right in zip(params, grads, updates, lefts, rights):
        dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        g = as_matrix(grad, grad.shape[0]).to(dtype)
        if maximize:
            g = -g
        w = as_matrix(param, param.shape[0]).to(dtype) * (1.0 - decay)  # W·(1 − lr·λ)
        w = w - step_size * project_back(update.to(dtype), left, right)  # the state-full part
        if residual_rule != "no":
            inside = project(g, left, right)  # R = down(G)
            residual = g - project_back(inside, left, right)  # E = G − up(down(G))
            if residual_rule == "sign_sgd":
                kept = residual_kept(g, inside, left, right, residual_threshold) if residual_threshold > 0 else 1.0
                w = w - residual_step * (sign(residual) * kept)
            else:
                w = w - residual_step * residual
        param.copy_(w.reshape(param.shape))


def side_name(side: str) -> str:
    """What a coordinate selection on ``side`` selects: "columns" (right) or "rows" (left)."""
    return "columns" if side == "right" else "rows"


def coordinate_step_lists(params: torch.Tensor | Sequence[torch.Tensor], grads: torch.Tensor | Sequence[torch.Tensor],
                          exp_avgs: torch.Tensor | Sequence[torch.Tensor],
                          exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
                          indices: torch.Tensor | Sequence[torch.Tensor], side: str, residual_rule: str,
                          residual_threshold: float) -> tuple[list, list, list, list, list]:
    """The arguments of :func:`frugal_coordinates_step_` as checked lists (params, grads, exp_avgs,
    exp_avg_sqs, indices); ValueError or TypeError naming the first problem, before anything is
    written. Each ``indices[i]`` must hold distinct coordinates of its side (one check, one host
    synchronization, for the whole call)."""
    if side not in COORDINATE_SIDES:
        raise ValueError(f"Invalid side: {side!r}; a coordinate subspace selects columns ('right') or rows ('left')")
    if residual_rule not in RESIDUAL_RULES:
        raise ValueError(f"Invalid residual_rule: {residual_rule!r}; expected one of {RESIDUAL_RULES}")
    if not 0.0 <= residual_threshold < 1.0:
        raise ValueError(f"Invalid residual_threshold: {residual_threshold!r} (expected a number in [0, 1))")
    params, grads = as_tensor_list("params", params), as_tensor_list("grads", grads)
    exp_avgs, exp_avg_sqs = as_tensor_list("exp_avgs", exp_avgs), as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    indices = as_tensor_list("indices", indices)
    check_parallel_lists(params=params, grads=grads)
    check_parallel_lists(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if len(indices) != len(params) or len(exp_avgs) != len(params):
        raise ValueError(f"tensor lists differ in length: params {len(params)}, exp_avgs {len(exp_avgs)}, "
                         f"indices {len(indices)}")
    bad: dict[torch.device, list[torch.Tensor]] = {}  # 0-d flags: indices that repeat or leave [0, size)
    for index, (param, exp_avg, chosen) in enumerate(zip(params, exp_avgs, indices)):
        if param.dim() < 2:
            raise ValueError(f"params[{index}] has shape {tuple(param.shape)}; only ≥2-D weights are projected")
        if chosen.dim() != 1 or chosen.dtype != torch.int64:
            raise TypeError(f"indices[{index}] must be a 1-D int64 tensor, got {chosen.dim()}-D {chosen.dtype}")
        if chosen.device != param.device:
            raise ValueError(f"indices[{index}] is on {chosen.device}, params[{index}] on {param.device}")
        m, n = matrix_shape(param.shape)
        size = side_length((m, n), side)  # type: ignore[arg-type]
        expected = (m, chosen.numel()) if side == "right" else (chosen.numel(), n)
        if exp_avg.shape != expected:
            raise ValueError(f"exp_avgs[{index}] has shape {tuple(exp_avg.shape)}, expected {expected} for "
                             f"{chosen.numel()} {side_name(side)} of a {m}×{n} matrix")
        if chosen.numel():
            ordered = chosen.sort().values
            bad.setdefault(chosen.device, []).append((ordered[0] < 0) | (ordered[-1] >= size)
                                                     | (ordered.diff() == 0).any())
    if any(bool(torch.stack(flags).any()) for device, flags in bad.items() if device.type != "meta"):
        raise ValueError(f"indices: the selected coordinates of each matrix must be distinct {side_name(side)} "
                         "of that matrix (in [0, size))")
    return params, grads, exp_avgs, exp_avg_sqs, indices


def run_coordinates_step(adam_project: Callable[..., None], apply: Callable[..., None], params: list[torch.Tensor],
                         grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                         indices: list[torch.Tensor], *, side: str, beta1: float, beta2: float, eps: float,
                         step_size: float, residual_step: float, residual_rule: str, decay: float, maximize: bool,
                         residual_threshold: float) -> None:
    """:func:`frugal_coordinates_step_` on checked lists, with a backend's ``adam_project``
    (:func:`galore_adam_project_`) and ``apply`` (:func:`frugal_apply_`): the coordinates as 0/1
    factors (:func:`~memzoo.reference.projector.selection_factor`, in the weight's dtype) and N
    in a buffer of the compute dtype."""
    lefts, rights, updates = [], [], []
    for param, chosen in zip(params, indices):
        m, n = matrix_shape(param.shape)
        factor = selection_factor(chosen, side_length((m, n), side), side, param.dtype)  # type: ignore[arg-type]
        lefts.append(factor if side == "left" else None)
        rights.append(factor if side == "right" else None)
        low_rank = (m, chosen.numel()) if side == "right" else (chosen.numel(), n)
        updates.append(torch.empty(low_rank, dtype=compute_dtype(param.dtype), device=param.device))
    adam = [i for i, update in enumerate(updates) if update.numel()]  # an empty subspace has no Adam part
    if adam:
        pick = lambda values: [values[i] for i in adam]  # noqa: E731
        adam_project(pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(updates), lefts=pick(lefts),
                     rights=pick(rights), beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
    apply(params, grads, updates, lefts=lefts, rights=rights, step_size=step_size, residual_step=residual_step,
          residual_rule=residual_rule, decay=decay, maximize=maximize, residual_threshold=residual_threshold)


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
    """FRUGAL's whole update of matrices whose subspace is a coordinate selection (RandK columns,
    ``side="right"``, or rows, ``"left"``), ``indices[i]`` the selected ones (distinct): by
    definition :func:`galore_adam_project_` (R = down(G), the moments, N; skipped for an empty
    selection) then :func:`frugal_apply_`, with the selection as 0/1 factors. The moments have R's
    shape: m×r (columns) or r×n (rows)."""
    lists = coordinate_step_lists(params, grads, exp_avgs, exp_avg_sqs, indices, side, residual_rule,
                                  residual_threshold)
    run_coordinates_step(galore_adam_project_, frugal_apply_, *lists, side=side, beta1=beta1, beta2=beta2, eps=eps,
                         step_size=step_size, residual_step=residual_step, residual_rule=residual_rule, decay=decay,
                         maximize=maximize, residual_threshold=residual_threshold)


# -- Whole steps: one weight's step as the optimizer composes it (the truth for optim/) ------
# (The conventions of reference/galore.py's whole-step section.)


@torch.no_grad()
def frugal_dense_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, lr: float,
                      betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool,
                      state_dtype: torch.dtype | None, maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of a weight FRUGAL does not project (its "regular" parameters): torch's AdamW,
    decay first."""
    param, state = step_copies(param, state)
    exp_avg, exp_avg_sq = moments_(state, param.shape, state_dtype or param.dtype, param.device)
    step_size, adam_eps = torch_adam_form(lr, betas, eps, correct_bias, next_step_(state) + 1)
    # W ← W·(1 − lr·λ); m, v ← β·(m, v) + (1 − β)·(G, G²); W ← W − lr·m̂/(√v̂ + ε)
    adamw_update_(param, grad, exp_avg, exp_avg_sq, step_size=step_size, beta1=betas[0], beta2=betas[1], eps=adam_eps,
                  lr=lr, weight_decay=weight_decay, maximize=maximize, decay_first=True)
    return param, state


def subspace_rank(shape: tuple[int, int], side: Side, density: float, projector: str) -> int:
    """The subspace dimension for ``density`` ρ on ``side``: ⌊ρ·size⌋ for coordinates (the
    official CoordAdamW truncates), round(ρ·size) for the other projectors."""
    size = side_length(shape, side)
    return min(int(size * density) if projector == "coordinates" else round(size * density), *shape)


@torch.no_grad()
def frugal_step(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, seed: int, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, correct_bias: bool,
                density: float | None, update_proj_gap: int, projector: str, proj_type: str, power_iters: int,
                oversample: int, reset_statistics: bool, inactive_update_rule: str, inactive_lr_scale: float,
                inactive_threshold: float, proj_params_lr_scale: float, state_dtype: torch.dtype | None,
                maximize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One FRUGAL step of one weight (Zmushko et al. 2024; AdamW on the state-full part, signSGD
    or SGD on the state-free rest, in the official code's template, the module docstring's
    three lines): the new weight and state. Unprojected weights: :func:`frugal_dense_step`."""
    if not is_projected(param, density):
        return frugal_dense_step(param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 correct_bias=correct_bias, state_dtype=state_dtype, maximize=maximize)
    param, state = step_copies(param, state)
    shape = matrix_shape(param.shape)
    side = projection_side(shape, proj_type)
    rank = subspace_rank(shape, side, density, projector)
    # "random" is an orthonormal basis, so that G − up(down(G)) is the rest of G; r = 0 selects nothing.
    method = "coordinates" if rank == 0 else {"random": "random_orthonormal"}.get(projector, projector)
    step = next_step_(state)
    left, right, refreshed = step_projector_(state, grad.reshape(shape), step=step, base_seed=seed, rank=rank,
                                             side=side, method=method, update_proj_gap=update_proj_gap,
                                             power_iters=power_iters, oversample=oversample, signs="raw",
                                             maximize=maximize, dtype=param.dtype)
    exp_avg, exp_avg_sq = moments_(state, low_rank_shape(shape, left, right), state_dtype or param.dtype, param.device)
    if refreshed and (reset_statistics or "adam_step" not in state):  # a new subspace starts Adam afresh
        exp_avg.zero_()
        exp_avg_sq.zero_()
        state["adam_step"] = torch.tensor(0, dtype=torch.int64)
    lr_p = lr * proj_params_lr_scale
    step_size, adam_eps = torch_adam_form(lr_p, betas, eps, correct_bias, next_step_(state, "adam_step") + 1)
    update = torch.empty(exp_avg.shape, dtype=compute_dtype(param.dtype), device=param.device)
    if update.numel():  # R = down(G); m, v ← β·(m, v) + (1 − β)·(R, R²); N = m/(√v + ε′)
        galore_adam_project_(grad, exp_avg, exp_avg_sq, update, lefts=left, rights=right, beta1=betas[0],
                             beta2=betas[1], eps=adam_eps, maximize=maximize)
    # W ← W·(1 − lr·λ) − η_t·up(N) − lr_p·κ·φ(G − up(down(G)))
    frugal_apply_(param, grad, update, lefts=left, rights=right, step_size=step_size,
                  residual_step=lr_p * inactive_lr_scale, residual_rule=inactive_update_rule,
                  decay=lr * weight_decay, maximize=maximize, residual_threshold=inactive_threshold)
    return param, state
