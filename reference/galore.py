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
from collections.abc import Mapping, Sequence

import torch
from memzoo.reference.common import as_tensor_list, check_parallel_lists, compute_dtype
from memzoo.reference.projector import Side, matrix_shape, project, project_back, projection_side, step_projector_

__all__ = ["adamw_update_", "as_matrix", "check_low_rank_shapes", "galore_adam_project_", "galore_apply_",
           "low_rank_lists", "natural_gradient", "project"]

# Factors of a batch: None (no factor on that side), one factor, or one (or None) per matrix.
FactorList = torch.Tensor | Sequence[torch.Tensor | None] | None


def check_low_rank_shapes(full_shape: torch.Size, left: torch.Tensor | None, right: torch.Tensor | None,
                          **low_rank: torch.Tensor) -> None:
    """Raise ValueError unless the factors fit the full tensor (viewed as shape[0] × rest) and
    every named low-rank tensor has the projected shape (the full shape without factors)."""
    if left is None and right is None:
        expected = torch.Size(full_shape)
    else:
        m = full_shape[0]
        n = full_shape.numel() // m if m else 0
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
    g = low_rank_grad.reshape(-1).to(torch.float64)
    h = history.to(torch.float64)
    if h.dim() != 2 or h.shape[1] != g.numel():
        raise ValueError(f"history must be k×{g.numel()}, got {tuple(history.shape)}")
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


def hf_adam_step_size(lr: float, betas: tuple[float, float], correct_bias: bool, t: int) -> float:
    """η_t = lr·√(1−β2^t)/(1−β1^t), the bias correction folded into the step size (HF Adam, the
    official GaLore's); lr without bias correction."""
    if not correct_bias:
        return lr
    beta1, beta2 = betas
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


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
