"""APOLLO and APOLLO-Mini (Zhu et al. 2025): SGD-like memory, AdamW-level updates."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memzoo.optim.base import Backend, StateSpec, check_bool, check_number, local_tensor
from memzoo.optim.lowrank import (
    LowRankOptimizer,
    LowRankRule,
    WeightStep,
    adam_step_size,
    batch_views,
    steps_row_shards,
)
from memzoo.optim.projector import Projector
from memzoo.optim.sharded import RowShard
from memzoo.reference.apollo import NORM_EPS, norm_growth_divisor_
from memzoo.reference.common import compute_dtype
from memzoo.reference.projector import project

__all__ = ["APOLLO", "ApolloRule"]

_SCALE_TYPES = ("channel", "tensor")
_PROJECTIONS = ("random", "svd", "randomized", "identity")



class ApolloRule(LowRankRule):
    """APOLLO's rule: Adam moments of the projected gradient R give per-channel (or per-tensor)
    factors s = ‖N_c‖/‖R_c‖ (Zhu et al. 2025, Algorithm 1); the raw gradient scaled by them
    takes the step, through the norm-growth limiter."""

    family = "apollo"
    defaults = dict(scale_type="channel", scale_front=False, disable_nl=False, growth_limit=1.01)
    kernels = ("apollo_scales_", "apollo_apply_", "adamw_update_")
    layout_keys = ("disable_nl",)
    rebuilt_units = (("limiter_norm",),)
    # The limiter records ρ on a weight's first limited step and limits from then on.
    deferred = ("limiter_norm",)

    def validate(self, group: Mapping[str, Any]) -> None:
        if group["rank"] is not None:
            if group["projector"] not in _PROJECTIONS:
                raise ValueError(f"Invalid proj: {group['projector']!r}; expected one of {_PROJECTIONS}")
            if group["proj_type"] == "full":
                raise ValueError("Invalid proj_type: 'full'; APOLLO projects one side (std, reverse_std, left, right)")
        if group["scale_type"] not in _SCALE_TYPES:
            raise ValueError(f"Invalid scale_type: {group['scale_type']!r}; expected one of {_SCALE_TYPES}")
        for flag in ("scale_front", "disable_nl"):
            check_bool(flag, group[flag])
        check_number("growth_limit", group["growth_limit"], low=1.0)

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        if projector is None or group["disable_nl"]:
            return {}
        return {"limiter_norm": (torch.Size(()), torch.float32)}

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Scaling factors from the projected moments, then the scaled full-rank update.

        On row shards: a right projection's moments and channel (row) factors are local; a left
        projection's R = Σ_k P_kᵀ·G_k is all-reduced (r×n), and its moments and column factors
        are replicated; a tensor-wise factor of a right projection sums ‖N_k‖² and ‖R_k‖² over
        the shards, and the limiter ‖S‖² (two scalars and one scalar per weight, all-reduced)."""
        device = items[0].param.device
        kernels = engine.kernels(device)
        tensor_wise = group["scale_type"] == "tensor"
        shard, reduces = items[0].shard, items[0].reduces
        shapes = []
        for item in items:
            m, n = item.projector.shape
            rows = m if shard is None else shard.rows
            shapes.append((1, 1) if tensor_wise else (rows, 1) if item.projector.side == "right" else (1, n))
        # fp32 factors (float64 for float64 weights: their update keeps float64 accuracy).
        scales = batch_views(shapes, compute_dtype(items[0].param.dtype), device)
        factors = engine.factors_of(items)  # a refresh's new random projections: one draw for the batch
        moments = [engine.moment_values(item) for item in items]
        beta1, beta2 = group["betas"]
        adam = dict(maximize=group["maximize"], beta1=beta1, beta2=beta2, eps=group["eps"])
        if reduces:  # R replicated: its moments and factors are too
            kernels.apollo_scales_(engine.reduced_projections(items, factors), [m[0] for m in moments],
                                   [m[1] for m in moments], scales, lefts=None, rights=None, **adam)
        elif shard is None or shard.rows:
            kernels.apollo_scales_([engine.local_grad(item) for item in items],
                                   [local_tensor(m[0]) for m in moments], [local_tensor(m[1]) for m in moments],
                                   scales, lefts=[f[0] for f in factors], rights=[f[1] for f in factors], **adam)
        if shard is not None and not reduces and tensor_wise:
            self._tensor_ratios_(engine, items, factors, scales, group["eps"])
        for item, values in zip(items, moments):
            engine.store_moments(item, values)
        batches: dict[bool, tuple[list, list, list, list]] = {}
        for item, factor in zip(items, scales):
            record = not group["disable_nl"] and "limiter_norm" not in item.state
            if record:
                engine.create_deferred(item, group, "limiter_norm")
            batch = batches.setdefault(record, ([], [], [], []))
            for out, value in zip(batch, (local_tensor(item.param), local_tensor(item.param.grad), factor,
                                          item.state.get("limiter_norm"))):
                out.append(value)
        limited = not group["disable_nl"]
        if shard is not None and limited:  # the limiter's ‖S‖ over every shard, folded into the factors
            for record, (_, grads, batch_scales, norms) in batches.items():
                self._limit_(shard, grads, batch_scales, norms, record, group)
            limited = False
        for record, (params, grads, batch_scales, norms) in batches.items():
            if shard is not None and not shard.rows:
                continue  # an empty row shard: nothing to update
            kernels.apollo_apply_(
                params, grads, batch_scales, norms if limited else None,
                step_size=adam_step_size(group["lr"], group["betas"], items[0].step, group["correct_bias"]),
                scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"],
                growth_limit=group["growth_limit"], record_only=record, scale_front=group["scale_front"],
                maximize=group["maximize"])

    @staticmethod
    def _tensor_ratios_(engine: LowRankOptimizer, items: list[WeightStep], factors: list, scales: list[torch.Tensor],
                        eps: float) -> None:
        """Tensor-wise factors ‖N‖/(‖R‖ + 1e-8) of right-projected weights on row shards: ‖N_k‖²
        and ‖R_k‖² of the local rows (R_k = G_k·Qᵀ, N_k = m_k/(√v_k+ε) from the updated moments,
        as :func:`memzoo.reference.apollo.apollo_scales_` forms them), summed by one all-reduce."""
        squares = []
        for item, (_, right), scale in zip(items, factors, scales):
            grad = engine.local_grad(item)
            exp_avg, exp_avg_sq = (local_tensor(value) for value in engine.moment_values(item))
            dtype = compute_dtype(grad.dtype, exp_avg.dtype, scale.dtype)
            low_rank = project(grad.to(dtype), None, right.to(dtype))
            normalized = exp_avg.to(dtype) / (exp_avg_sq.to(dtype).sqrt() + eps)
            squares.append(torch.stack([normalized.square().sum(), low_rank.square().sum()]))
        for scale, (normalized, low_rank) in zip(scales, items[0].shard.all_reduce_(torch.stack(squares))):
            scale.fill_(normalized.sqrt() / (low_rank.sqrt() + NORM_EPS))

    @staticmethod
    def _limit_(shard: RowShard, grads: list[torch.Tensor], scales: list[torch.Tensor], norms: list[torch.Tensor],
                record: bool, group: Mapping[str, Any]) -> None:
        """The norm-growth limiter of :func:`memzoo.reference.apollo.apollo_apply_` on row shards:
        ‖S‖ (S = G ⊙ s, √α in front with ``scale_front``) from one all-reduce of the batch's ‖S_k‖²;
        on the first step ρ ← ‖S‖, later c = max(‖S‖/(ρ + 1e-8), γ)/γ divides the factors and
        ρ ← ‖S‖/c. The kernel then applies S without its own (shard-local) limiter."""
        squares = []
        for grad, scale in zip(grads, scales):
            dtype = compute_dtype(grad.dtype, scale.dtype)
            squares.append((grad.flatten(1).to(dtype) * scale).square().sum())
        root_alpha = math.sqrt(group["scale"]) if group["scale_front"] else 1.0
        sizes = shard.all_reduce_(torch.stack(squares)).sqrt() * root_alpha
        for size, scale, norm in zip(sizes, scales, norms):
            if record:
                norm.copy_(size)
            else:
                scale.div_(norm_growth_divisor_(size, norm, growth_limit=group["growth_limit"]))


class APOLLO(LowRankOptimizer):
    r"""APOLLO: Adam moments in a random rank-r space of the gradient decide per-channel (or
    per-tensor) scaling factors of the raw gradient, which then takes a full-rank SGD-like step.

    Param groups are the official ``apollo_torch.APOLLOAdamW`` ones: a group with a ``rank``
    (``{"params": ..., "rank": 256, "proj": "random", "scale_type": "channel", "scale": 1,
    "update_proj_gap": 200, "proj_type": "std"}``) is APOLLO'd; parameters in groups without a
    rank, and 1-D/0-D tensors, get plain AdamW in the same convention (eps 1e-6). Weights with
    more than two dimensions are read as (shape[0], prod(rest)) matrices. ``APOLLO.mini`` makes
    APOLLO-Mini (rank 1, tensor-wise scaling, scale 128).

    For an m×n weight with gradient G, projection P (``proj="random"``: Gaussian N(0, 1/r) entries
    regenerated from a per-weight seed on every step, a new seed every ``update_proj_gap`` steps:
    the paper's choice, nothing stored; ``"svd"``: GaLore's stored top-r singular vectors), on
    the side GaLore's rule picks (R = G·Pᵀ, m×r, when m ≥ n under ``proj_type="std"``):

    .. math::
        R = P(G);\ m \leftarrow \beta_1 m + (1-\beta_1)R;\ v \leftarrow \beta_2 v + (1-\beta_2)R^2;\
        N = m/(\sqrt v+\epsilon);\ s_c = \|N_c\|/(\|R_c\| + 10^{-8});\ S = G \odot s

    with c a channel (a row of G for a right projection, a column for a left one; the whole
    tensor for ``scale_type="tensor"``). Then the norm-growth limiter (unless ``disable_nl``):
    S ← S/max(1, ‖S‖/(γ·ρ)) with ρ the previous step's ‖S‖ (γ = ``growth_limit`` = 1.01), then
    W ← W − η_t·√α·S with η_t = lr·√(1−β2^t)/(1−β1^t), α = ``scale``, and W ← W − lr·λ·W.

    Against the paper: ``scale`` enters as √α as in the official code; the paper's norm
    compensation for the random projection corresponds to scale ≈ n/r (the official fine-tuning
    setting, e.g. 32 for r = 128 on a 4096-wide model). The projection is regenerated from its
    seed (the paper's description) where the official code stores it, and drawn from Triton's
    Philox stream, so the numbers differ from the official ones in value, not in distribution.
    Moments are kept across projection refreshes, as officially.

    Args:
        params: parameters or param groups (group keys above; ``proj`` may be given as ``projector``).
        lr, betas, eps, weight_decay, correct_bias: as ``apollo_torch.APOLLOAdamW`` (1e-3,
            (0.9, 0.999), 1e-6, 0.0, True).
        rank: default rank for groups that do not set one; None (default) = plain AdamW.
        update_proj_gap, scale, proj_type, proj, scale_type: group defaults (200, 1.0, "std",
            "random", "channel"). ``proj_type="full"`` is rejected: APOLLO projects one side.
        scale_front: apply √α before the limiter instead of after (the official option).
        disable_nl: turn the norm-growth limiter off.
        growth_limit: γ, the most the update norm may grow per step (1.01, hard-coded officially).
        power_iters, oversample, strict_rank, state_dtype, optim_bits, min_8bit_size, seed,
            maximize, backend: as :class:`GaLoreAdamW`.
    """

    rule = ApolloRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        proj: str = "random",
        scale_type: str = "channel",
        scale_front: bool = False,
        disable_nl: bool = False,
        growth_limit: float = 1.01,
        seed: int = 0,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        **options: Any,
    ) -> None:
        if "projector" in options:
            raise TypeError("APOLLO takes the projection as proj= (the official name), not projector=")
        check_bool("no_deprecation_warning", no_deprecation_warning)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector=proj,
                        scale_type=scale_type, scale_front=scale_front, disable_nl=disable_nl,
                        growth_limit=growth_limit)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
                         **options)

    @classmethod
    def mini(cls, params: Iterable[Any], lr: float = 1e-3, *, rank: int | None = None, scale: float = 128.0,
             scale_type: str = "tensor", **kwargs: Any) -> APOLLO:
        """APOLLO-Mini: rank 1, one tensor-wise scaling factor, scale 128 (the paper's settings).

        Param groups mean what they mean in apollo-torch: a group carrying ``rank`` is projected
        (Mini's scale and scale_type unless the group sets them), a group without one — e.g.
        embeddings, head, norms in apollo-torch's ``{"params": non_lowrank_params}`` — gets
        AdamW. A plain iterable of tensors is one group that is projected at rank 1 (every ≥2-D
        tensor). ``rank=`` projects the groups without a rank at that rank. Groups none of which
        is projected raise: that would be AdamW, not APOLLO-Mini.
        """
        params = list(params)
        grouped = any(isinstance(item, Mapping) for item in params)
        if rank is None and not grouped:
            rank = 1
        if rank is None and not any(group.get("rank") is not None for group in params if isinstance(group, Mapping)):
            raise ValueError(
                "APOLLO.mini: no param group carries a 'rank', so nothing would be projected (as in apollo-torch, "
                "groups without 'rank' get AdamW); add \"rank\": 1 to the groups to project, e.g. "
                "[{\"params\": non_lowrank_params}, {\"params\": lowrank_params, \"rank\": 1}], or pass rank=1 "
                "to project every group without one"
            )
        return cls(params, lr, rank=rank, scale=scale, scale_type=scale_type, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "proj" in param_group:  # the official group key
            if "projector" in param_group:
                raise ValueError("param group gives both 'proj' and 'projector'; give one")
            param_group = {**param_group, "projector": param_group["proj"]}
            del param_group["proj"]
        super().add_param_group(param_group)
