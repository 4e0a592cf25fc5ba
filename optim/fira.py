"""Fira (Chen et al. 2024): GaLore plus the residual gradient, scaled and limited — full-rank
training under GaLore's low-rank memory. A rule of the low-rank engine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memzoo.optim.base import Backend, StateSpec, check_bool, check_number, local_tensor
from memzoo.optim.lowrank import (
    LowRankOptimizer,
    LowRankRule,
    WeightStep,
    adam_step_size,
    low_rank_updates,
    steps_row_shards,
)
from memzoo.optim.sharded import RowShard
from memzoo.optim.projector import Projector
from memzoo.optim.quantized_state import MIN_8BIT_SIZE
from memzoo.reference.apollo import norm_growth_divisor_
from memzoo.reference.common import compute_dtype
from memzoo.reference.fira import fira_residual

__all__ = ["FiraAdamW", "FiraRule"]

# Projections whose factors are orthonormal, so that G − α·P·Pᵀ·G is what the subspace misses
# (a Gaussian "random" factor is not a projection).
_PROJECTIONS = ("svd", "randomized", "random_orthonormal", "coordinates", "identity")


class FiraRule(LowRankRule):
    """Fira's rule: GaLore's HF-Adam on the projected gradient R (N = m/(√v+ε)), plus the
    residual G − α·P(R) scaled per channel by ‖N_c‖/(‖R_c‖ + 1e-8) (eq. 7–8) under the
    norm-growth limiter (eq. 9); W ← W − η_t·(α·P(N) + S), decay after (the official order)."""

    family = "fira"
    defaults = dict(growth_limit=1.01)
    kernels = ("galore_adam_project_", "fira_apply_", "adamw_update_")
    rebuilt_units = (("limiter_norm",),)
    # The limiter records ρ on a weight's first step and limits from then on.
    deferred = ("limiter_norm",)

    def validate(self, group: Mapping[str, Any]) -> None:
        if group["rank"] is not None:
            if group["projector"] not in _PROJECTIONS:
                raise ValueError(f"Invalid projector: {group['projector']!r}; Fira needs orthonormal factors, one of "
                                 f"{_PROJECTIONS}")
            if group["proj_type"] == "full":
                raise ValueError("Invalid proj_type: 'full'; Fira projects one side (std, reverse_std, left, right): "
                                 "its per-channel scaling has no channel that fits both sides")
        check_number("growth_limit", group["growth_limit"], low=1.0)

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        return {} if projector is None else {"limiter_norm": (torch.Size(()), torch.float32)}

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """On row shards, as GaLore's and APOLLO's: a right projection's R_k = G_k·Qᵀ, its moments,
        channel (row) factors and residual rows are local; a left projection's R = Σ_k P_kᵀ·G_k is
        all-reduced (r×n), its moments and column factors replicated, and the residual rows
        G_k − α·P_k·R local. The limiter's ‖S‖ sums ‖S_k‖² over the shards (one all-reduce of a
        scalar per weight)."""
        kernels = engine.kernels(items[0].param.device)
        beta1, beta2 = group["betas"]
        shard, reduces = items[0].shard, items[0].reduces
        live = shard is None or shard.rows > 0  # an empty row shard (uneven sharding) updates no rows
        updates = low_rank_updates(items)
        factors = [engine.factors(item) for item in items]
        moments = [engine.moment_values(item) for item in items]
        grads = [engine.local_grad(item) for item in items]
        projections = engine.reduced_projections(items, factors) if reduces else [None] * len(items)
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"])
        if reduces:  # R replicated: Adam on R itself
            kernels.galore_adam_project_(projections, [m[0] for m in moments], [m[1] for m in moments], updates,
                                         lefts=None, rights=None, **adam)
        elif live:
            kernels.galore_adam_project_(grads, [local_tensor(m[0]) for m in moments],
                                         [local_tensor(m[1]) for m in moments], updates,
                                         lefts=[f[0] for f in factors], rights=[f[1] for f in factors], **adam)
        for item, values in zip(items, moments):
            engine.store_moments(item, values)
        batches: dict[bool, tuple[list, ...]] = {}
        for item, grad, update, (left, right), projection in zip(items, grads, updates, factors, projections):
            record = "limiter_norm" not in item.state
            if record:
                engine.create_deferred(item, group, "limiter_norm")
            batch = batches.setdefault(record, ([], [], [], [], [], [], [], []))
            # The kernel reads the gradient of the weight's shape; the residual the (rows × n) matrix.
            for out, value in zip(batch, (local_tensor(item.param), local_tensor(item.param.grad), update,
                                          item.state["limiter_norm"], left, right, projection, grad)):
                out.append(value)
        for record, (params, batch_grads, batch_updates, norms, lefts, rights, batch_projections,
                     matrices) in batches.items():
            sizes = None
            if shard is not None:  # ‖S‖ over every shard
                sizes = self._residual_sizes(shard, params, matrices, batch_updates, lefts, rights,
                                             batch_projections, group["scale"])
                if not live:  # no rows to write: only the limiter's replicated ρ
                    for size, norm in zip(sizes, norms):
                        if record:
                            norm.copy_(size)
                        else:
                            norm_growth_divisor_(size, norm, growth_limit=group["growth_limit"])
                    continue
            kernels.fira_apply_(
                params, batch_grads, batch_updates, norms, lefts=lefts, rights=rights,
                step_size=adam_step_size(group["lr"], group["betas"], items[0].step, group["correct_bias"]),
                scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"],
                growth_limit=group["growth_limit"], record_only=record, maximize=group["maximize"],
                projections=batch_projections if reduces else None, limiter_sizes=sizes)

    @staticmethod
    def _residual_sizes(shard: RowShard, params: list[torch.Tensor], grads: list[torch.Tensor],
                        updates: list[torch.Tensor], lefts: list, rights: list, projections: list,
                        scale: float) -> list[torch.Tensor]:
        """‖S‖ of each weight over the row shards: ‖S_k‖² of the local rows
        (:func:`memzoo.reference.fira.fira_residual`), summed by one all-reduce for the batch."""
        squares = []
        for param, grad, update, left, right, projection in zip(params, grads, updates, lefts, rights, projections):
            dtype = compute_dtype(param.dtype, grad.dtype, update.dtype)
            residual = fira_residual(grad.to(dtype), update, left, right, scale=scale, projection=projection)
            squares.append(residual.square().sum())
        return list(shard.all_reduce_(torch.stack(squares)).sqrt())


class FiraAdamW(LowRankOptimizer):
    r"""Fira: GaLore's Adam in a rank-r subspace plus the residual gradient it leaves out, scaled
    and applied full-rank; a drop-in for ``fira.FiraAdamW`` (the ``fira`` 1.0.2 package).

    Param groups are the official ones: a group with a ``rank`` (``{"params": ..., "rank": 8,
    "update_proj_gap": 200, "alpha": 1.0, "proj_type": "std"}``, as ``fira.divide_params`` makes;
    ``alpha`` may also be given as ``scale``) projects its ≥2-D weights; every other parameter gets
    plain AdamW in the same convention (eps 1e-6). Weights with more than two dimensions are read
    as (shape[0], prod(rest)) matrices.

    For a projected m×n weight with gradient G and the projector P refreshed on steps 1, T+1, …:

    .. math::
        R = P^\top G;\ m \leftarrow \beta_1 m + (1-\beta_1)R;\ v \leftarrow \beta_2 v + (1-\beta_2)R^2;\
        N = m/(\sqrt v+\epsilon);\ s_c = \|N_c\|/(\|R_c\| + 10^{-8});\ S = (G - \alpha P R) \odot s

    with c a channel (a row of G for a right projection, a column for a left one), then the
    norm-growth limiter S ← S/max(1, ‖S‖/(γ·ρ)) (ρ the previous step's ‖S‖, γ = ``growth_limit``;
    the first step only records ρ), W ← W − η_t·(α·P·N + S) with η_t = lr·√(1−β2^t)/(1−β1^t),
    and W ← W − lr·λ·W. As officially, α multiplies the back-projection (so the residual is
    G − α·P·Pᵀ·G) but not S.

    Against the official code: its channel dimension is read from N's shape, which for a left
    projection keeping every column (r = n) takes N's rows and does not broadcast (a crash, or a
    silent row/column swap for a square weight); here the channel is always the rank dimension.
    ``proj_type="full"`` (a crash officially unless r = m) is rejected. The projector defaults to
    ``"randomized"`` as :class:`GaLoreAdamW`'s; ``projector="svd"`` is the official exact SVD (and
    with it the official trajectory); projectors without orthonormal factors are rejected.

    Args:
        params: parameters or param groups (group keys above).
        lr, betas, eps, weight_decay, correct_bias: as ``fira.FiraAdamW`` (1e-3, (0.9, 0.999),
            1e-6, 0.0, True).
        no_deprecation_warning: the official switch for its deprecation warning, accepted (in its
            position) so its calls run unchanged; memzoo has no such warning.
        rank: default rank for groups that do not set one; None (default) = plain AdamW.
        update_proj_gap, scale, proj_type: group defaults (200, 1.0 — the official ``alpha`` —,
            "std").
        growth_limit: γ, the most the residual's norm may grow per step (1.01, hard-coded officially).
        projector, power_iters, oversample, strict_rank, state_dtype, optim_bits, min_8bit_size, seed,
            maximize, backend, skip_nonfinite, foreach, fused, capturable, differentiable: as
            :class:`GaLoreAdamW`.
    """

    rule = FiraRule()
    # The official group key: alpha, our scale.
    official_group_keys = frozenset({"alpha"})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        growth_limit: float = 1.01,
        projector: str = "randomized",
        power_iters: int = 2,
        oversample: int = 8,
        strict_rank: bool = False,
        state_dtype: torch.dtype | str | None = None,
        optim_bits: int = 32,
        min_8bit_size: int = MIN_8BIT_SIZE,
        seed: int = 0,
        maximize: bool = False,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_bool("no_deprecation_warning", no_deprecation_warning)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        growth_limit=growth_limit, projector=projector, power_iters=power_iters,
                        oversample=oversample, strict_rank=strict_rank, state_dtype=state_dtype,
                        optim_bits=optim_bits, min_8bit_size=min_8bit_size, maximize=maximize)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The official group key ``alpha`` is our ``scale``."""
        if "alpha" in group:
            if "scale" in group and group["scale"] != group["alpha"]:
                raise ValueError("both 'alpha' (the official name) and 'scale' are given; give one")
            group["scale"] = group.pop("alpha")
        return group
