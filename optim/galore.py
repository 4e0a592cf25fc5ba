"""GaLore (Zhao et al. 2024): Adam in a periodically refreshed low-rank gradient subspace, and
Natural GaLore (Das 2024), its natural-gradient variant: two rules of the low-rank engine."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from memzoo.optim.base import Backend, StateSpec, check_bool, check_int, check_lr, check_number, local_tensor
from memzoo.optim.lowrank import (
    LowRankOptimizer,
    LowRankRule,
    WeightStep,
    adam_step_size,
    batch_views,
    low_rank_updates,
    steps_row_shards,
)
from memzoo.optim.projector import Projector
from memzoo.optim.quantized_state import MIN_8BIT_SIZE
from memzoo.reference.common import compute_dtype

__all__ = ["GaLoreAdafactor", "GaLoreAdafactorRule", "GaLoreAdamW", "GaLoreRule", "NaturalGaLore",
           "NaturalGaLoreRule"]


class GaLoreRule(LowRankRule):
    """GaLore's rule: HF-Adam on the projected gradient R, N = m/(√v+ε) mapped back with the
    scale α and applied with η_t, decoupled decay after (Zhao et al. 2024, Algorithm 2)."""

    family = "galore"

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """On row shards: a right projection is local rows (R_k = G_k·Qᵀ, its moments, N_k·Q);
        with a left factor R = Σ_k P_kᵀ·G_k(·Qᵀ) is all-reduced, Adam runs on the replicated R
        and each rank applies its rows P_k·N(·Q)."""
        kernels = engine.kernels(items[0].param.device)
        beta1, beta2 = group["betas"]
        updates = low_rank_updates(items)
        factors = [engine.factors(item) for item in items]
        moments = [engine.moment_values(item) for item in items]
        if items[0].reduces:  # projected and summed over the shards: Adam on R itself
            grads, lefts, rights = engine.reduced_projections(items, factors), None, None
        else:
            grads, lefts, rights = [engine.local_grad(item) for item in items], [f[0] for f in factors], \
                [f[1] for f in factors]
        # An empty row shard (uneven sharding) has nothing to update.
        live = [index for index, item in enumerate(items) if item.shard is None or item.shard.rows]
        if items[0].reduces or len(live) == len(items):
            kernels.galore_adam_project_(
                grads, [local_tensor(m[0]) for m in moments], [local_tensor(m[1]) for m in moments], updates,
                lefts=lefts, rights=rights, beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"])
        for item, values in zip(items, moments):
            engine.store_moments(item, values)
        if live:
            kernels.galore_apply_(
                [local_tensor(items[i].param) for i in live], [updates[i] for i in live],
                lefts=[factors[i][0] for i in live], rights=[factors[i][1] for i in live],
                step_size=adam_step_size(group["lr"], group["betas"], items[0].step, group["correct_bias"]),
                scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"])


class GaLoreAdamW(LowRankOptimizer):
    r"""GaLore with an AdamW inner rule; a drop-in for ``galore_torch.GaLoreAdamW``.

    Param groups are the official ones: a group with a ``rank`` (e.g. ``{"params": ...,
    "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}``) projects its ≥2-D
    weights; every other parameter (groups without ``rank``, and 1-D/0-D tensors even inside a
    rank group) gets plain AdamW. Weights with more than two dimensions are projected as the
    (shape[0], prod(shape[1:])) matrix. Defaults are the official class's except the projector:
    ours is ``"randomized"``; ``projector="svd"`` is the official one (see below).

    For a projected m×n weight, with t the step count and P the projector refreshed from the
    current gradient on steps 1, T+1, 2T+1, … (T = ``update_proj_gap``):

    .. math::
        R = P(G);\; m \leftarrow \beta_1 m + (1-\beta_1)R;\; v \leftarrow \beta_2 v + (1-\beta_2)R^2;\;
        W \leftarrow W - \eta_t\,\alpha\,P^{-}\!\big(m/(\sqrt v+\epsilon)\big);\; W \leftarrow W - \text{lr}\,\lambda W

    with the official code's Adam convention (transformers.AdamW): ε added to √v, bias
    correction folded into the step size η_t = lr·√(1−β2^t)/(1−β1^t), decoupled decay applied
    after the update on the new weight with the plain lr. Moments are carried across projector
    refreshes without reset or rotation, as the official code does.

    Projector (group key ``projector``): ``"svd"`` is the official exact thin SVD of the fp32
    gradient, and with it the trajectory is the official package's; ``"randomized"`` (default)
    is a seeded range finder with ``power_iters`` power iterations and ``oversample`` extra
    columns, far cheaper to refresh; ``"random"`` is a seeded Gaussian regenerated from its seed
    every step (no stored factor); ``"identity"`` projects onto the whole space (tests).

    Precision: projections and the Adam math run in fp32 (float64 for float64 params) and each
    stored tensor is rounded once; the official code computes in the gradient's dtype, so for
    bf16 parameters this is more accurate than, not identical to, galore-torch.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, correct_bias: as ``galore_torch.GaLoreAdamW`` (lr 1e-3,
            (0.9, 0.999), 1e-6, 0.0, True).
        no_deprecation_warning: galore-torch's switch for its deprecation warning, accepted (in
            its position) so its calls run unchanged; memzoo has no such warning.
        rank: default rank for groups that do not set one; None (default) = plain AdamW.
        update_proj_gap, scale, proj_type: the official projector settings (200, 1.0, "std").
        projector, power_iters, oversample: see above ("randomized", 2, 8).
        strict_rank: raise on rank > min(m, n) instead of truncating (official behaviour).
        state_dtype: dtype of the Adam moments: None (the parameter's, as official), fp32 or bf16.
        optim_bits: 32, or 8 for bitsandbytes' blockwise 8-bit moments (uint8 codes + one fp32
            absmax per 256 values) on moments of at least ``min_8bit_size`` values (default
            4096, bitsandbytes'); smaller ones keep ``state_dtype``. This replaces
            ``galore_torch.GaLoreAdamW8bit``, whose defaults differ (eps 1e-8, weight_decay
            1e-2: pass them) and whose bitsandbytes update adds ε after bias correction.
        seed: base seed of the projector streams (each weight gets seed + its index).
        maximize: maximize the objective.
        backend: "auto" ("torch" until GaLore's kernels are validated on a GPU), "triton",
            "torch" (the fast PyTorch path, every device) or "reference" (the per-tensor truth);
            see :func:`memzoo.optim.resolve_backend`.
        foreach, fused, capturable, differentiable: torch.optim's implementation flags, accepted only
            at their defaults (None, None, False, False); see README "torch.optim conventions".
    """

    rule = GaLoreRule()

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
                        projector=projector, power_iters=power_iters, oversample=oversample,
                        strict_rank=strict_rank, state_dtype=state_dtype, optim_bits=optim_bits,
                        min_8bit_size=min_8bit_size, maximize=maximize)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)


# The official SubSpaceAdamW's group values of proj_type: (our proj_type, natural preconditioning).
_OFFICIAL_NATURAL_PROJ_TYPES = {"natural_galore": ("full", True), "galore": ("full", False)}


class NaturalGaLoreRule(LowRankRule):
    """GaLore's rule with the projected gradient preconditioned by the inverse empirical Fisher
    of its recent history (Woodbury form: a k×k solve per weight) before Adam."""

    family = "galore"
    defaults = dict(natural_history=20, damping=1e-3, natural=True)
    kernels = (*LowRankRule.kernels, "project", "natural_gradients")
    layout_keys = ("natural_history", "natural")
    rebuilt_units = (("nat_history", "nat_count"),)
    signs = "canonical"

    def validate(self, group: Mapping[str, Any]) -> None:
        # It sizes a (history × r²) state tensor and a k×k solve per step (the official 20).
        check_int("natural_history", group["natural_history"], low=1, high=2**16)
        check_number("damping", group["damping"])
        if group["damping"] <= 0:
            raise ValueError(f"Invalid damping: {group['damping']} (must be > 0)")
        check_bool("natural", group["natural"])

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        if projector is None or not group["natural"]:
            return {}
        return {"nat_history": (torch.Size((group["natural_history"], shape.numel())), state_dtype),
                "nat_count": (torch.Size(()), torch.int64)}

    def sharded_problem(self, projector: Projector, group: Mapping[str, Any]) -> str | None:
        problem = super().sharded_problem(projector, group)
        if problem is None and projector.side == "right" and group["natural"]:
            return ("Natural GaLore's gradient history of a right projection (m×r) would be sharded by rows and "
                    "its k×k solve need all of it; use proj_type 'full' (the default) or 'left'")
        return problem

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Same-shaped weights together: their projections, the natural-gradient solves (batched
        on the torch backend), one Adam pass and the back-projections. Row shards (left or
        two-sided projections) one weight at a time: R = Σ_k A_kᵀ·G_k·Bᵀ all-reduced, then
        everything but the back-projection A_k·N·B runs on the replicated R."""
        if items[0].shard is not None and len(items) > 1:
            for item in items:
                self.update(engine, group, [item])
            return
        kernels = engine.kernels(items[0].param.device)
        factors = [engine.factors(item) for item in items]
        if items[0].reduces:
            low_ranks = engine.reduced_projections(items, factors)
        else:
            low_ranks = []
            for item, (left, right) in zip(items, factors):
                grad = engine.local_grad(item)
                dtype = compute_dtype(grad.dtype)
                low_ranks.append(kernels.project(grad.to(dtype), None if left is None else left.to(dtype),
                                                 None if right is None else right.to(dtype)))
        if group["maximize"]:
            low_ranks = torch._foreach_neg(low_ranks)
        if group["natural"]:  # else the official proj_type="galore": GaLore on the same factors
            low_ranks = self._precondition(engine, kernels, group, items, low_ranks)
        beta1, beta2 = group["betas"]
        updates = low_rank_updates(items)
        moments = [tuple(local_tensor(moment) for moment in engine.moment_values(item)) for item in items]
        # Adam on the already projected (and preconditioned) gradients.
        kernels.galore_adam_project_(low_ranks, [m[0] for m in moments], [m[1] for m in moments], updates,
                                     lefts=None, rights=None, beta1=beta1, beta2=beta2, eps=group["eps"])
        for item, values in zip(items, moments):
            engine.store_moments(item, values)
        if items[0].shard is not None and not items[0].shard.rows:
            return  # an empty row shard: nothing to update
        kernels.galore_apply_(
            [local_tensor(item.param) for item in items], updates, lefts=[left for left, _ in factors],
            rights=[right for _, right in factors],
            step_size=adam_step_size(group["lr"], group["betas"], items[0].step, group["correct_bias"]),
            scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"])

    @staticmethod
    def _precondition(engine: LowRankOptimizer, kernels: Any, group: Mapping[str, Any], items: list[WeightStep],
                      low_ranks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Append each projected gradient g to its weight's history H, the last ``natural_history``
        of them (a ring buffer: H·Hᵀ does not depend on the order of the rows), and return
        g̃ = (λI + HᵀH)⁻¹g of each. A backend with ``natural_gradients_with_grams`` (torch,
        Triton) is given each weight's float64 H·Hᵀ kept from its previous step
        (:class:`_KeptGram`), so that only the written row's products are computed."""
        with_grams = getattr(kernels, "natural_gradients_with_grams", None)
        kept_grams: dict[torch.Tensor, _KeptGram] = engine._natural_grams  # type: ignore[attr-defined]
        rows, histories, counts, seen_counts, grams, stale_rows = [], [], [], [], [], []
        for item in items:
            history, count = item.state["nat_history"], item.state["nat_count"]
            seen, size = int(count), history.shape[0]
            rows.append(history[seen % size])
            histories.append(history[: min(seen + 1, size)])
            counts.append(count)
            seen_counts.append(seen)
            if with_grams is None:
                continue
            kept = kept_grams.pop(item.param, None)  # checked before this step's write
            if kept is not None and kept.history() is history and kept.count == seen and \
                    kept.version is not None and kept.version == _version(history):
                grams.append(kept.matrix)
                stale_rows.append(seen % size)  # the row written now; the others' products are kept
            else:  # first step, a loaded or rebuilt history, a write the step did not make
                grams.append(torch.empty(size, size, dtype=torch.float64, device=history.device))
                stale_rows.append(None)
        torch._foreach_copy_(rows, [low_rank.reshape(-1) for low_rank in low_ranks])
        torch._foreach_add_(counts, 1)
        if with_grams is None:
            return kernels.natural_gradients(low_ranks, histories, damping=group["damping"])
        results = with_grams(low_ranks, histories, grams, stale_rows, damping=group["damping"])
        for item, gram, seen in zip(items, grams, seen_counts):
            history = item.state["nat_history"]
            kept_grams[item.param] = _KeptGram(gram, weakref.ref(history), _version(history), seen + 1)
        return results


class _KeptGram(NamedTuple):
    """A weight's float64 H·Hᵀ of its whole history buffer (rows not yet written: unused),
    kept by :class:`NaturalGaLore` between steps (not in the state_dict: a loaded state gets it
    recomputed), valid while the history is the same tensor, its version counter (bumped by every
    in-place write through it or a view of it) is the one this step left and its count is the one
    this step wrote. Writes that bypass the version counter (through ``.data`` or another tensor
    over its storage) are not seen."""

    matrix: torch.Tensor
    history: weakref.ref
    version: int | None
    count: int


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, None where it has none (an inference-mode tensor)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class NaturalGaLore(LowRankOptimizer):
    r"""Natural GaLore (Das 2024): GaLore whose low-rank gradient is preconditioned by the
    inverse empirical Fisher of its recent history before Adam; a drop-in for the official
    ``natural_galore.SubSpaceAdamW``.

    Each step the projected gradient g (flattened, d elements) joins a history of the last
    ``natural_history`` projected gradients H (k×d, the current one included; kept across
    projector refreshes, as the official code does), and Adam receives

    .. math:: \tilde g = (\lambda I + H^\top H)^{-1} g
              = \lambda^{-1} g - \lambda^{-2} H^\top (I + \lambda^{-1} H H^\top)^{-1} H g

    computed through Woodbury's identity with a k×k solve (no d×d matrix; float64, by a QR
    factorization: :func:`memzoo.reference.galore.natural_gradient`). The torch and Triton
    backends keep each weight's float64 H·Hᵀ between steps (8·k² bytes, not in the state_dict)
    and compute only the new row's products
    (:func:`memzoo.triton_kernels.torch_backend.galore.natural_gradients_with_grams`).

    The subspace is the official one: two-sided (``proj_type="full"``, r×r moments; the
    official Tucker factors of a matrix are its top-r singular vectors) and each singular
    vector signed as tensorly's SVD signs it (its entry of largest magnitude positive, the first
    on a tie; :func:`memzoo.reference.projector.canonical_signs`). The sign matters here: the
    moments and the gradient history are carried across refreshes, and a basis vector whose
    sign flips at a refresh turns them against the new subspace; with the sign fixed by the
    subspace they keep their meaning. (GaLoreAdamW keeps torch.linalg.svd's raw signs, as
    galore-torch does.) The default ``projector="svd"`` follows the official trajectory;
    ``"randomized"`` (a seeded range finder, much cheaper to refresh, GaLoreAdamW's default)
    gets the same signs.

    Official group keys: ``{"rank": r, "update_proj_gap": T, "scale": α, "proj_type":
    "natural_galore", "natural_history": s}`` (the official example's); ``proj_type="galore"``
    is the same without the natural-gradient step (group key ``natural=False``);
    ``"online_galore"`` / ``"online_natural_galore"`` (factors trained by gradient descent) are
    not implemented. Our proj_type values (``"full"``, ``"std"``, …) are accepted too.

    Other defaults are the official class's: lr 1e-3, betas (0.9, 0.999), eps 1e-6,
    weight_decay 0.0 (applied after the update, GaLore's convention), history 20, damping
    λ = 1e-3 (hard-coded there, an argument here), correct_bias True; the positional order
    (params, lr, betas, eps, weight_decay, natural_history, amsgrad) is the official one.
    ``amsgrad`` is accepted as False only (the official code allocates an AMSGrad buffer it never
    reads); ``capturable`` and ``differentiable`` as False only, as every memzoo optimizer's. Parameters outside rank groups,
    and 1-D ones inside (the official code would project those too), get plain AdamW.
    Everything else is :class:`GaLoreAdamW`'s.
    """

    rule = NaturalGaLoreRule()
    # param → its _KeptGram: H·Hᵀ of the gradient history, completed by one row per step.
    _CACHES = {**LowRankOptimizer._CACHES, "_natural_grams": dict}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, natural_history: int = 20, amsgrad: bool = False, *,
                 capturable: bool = False, differentiable: bool = False, correct_bias: bool = True,
                 damping: float = 1e-3, natural: bool = True, proj_type: str = "full", projector: str = "svd",
                 seed: int = 0, backend: Backend = "auto", skip_nonfinite: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, **options: Any) -> None:
        if amsgrad is not False:
            raise ValueError(f"amsgrad={amsgrad!r} is not implemented (the official SubSpaceAdamW's amsgrad "
                             "does not change its update either); leave it False")
        official = self._translate_group({"proj_type": proj_type})  # the official values of proj_type
        proj_type, natural = official["proj_type"], official.get("natural", natural)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        natural_history=natural_history, damping=damping, natural=natural, proj_type=proj_type,
                        projector=projector)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
                         **options)

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        proj_type = group.get("proj_type")
        if isinstance(proj_type, str) and proj_type.startswith("online_"):
            raise ValueError(f"proj_type {proj_type!r} (online subspace updates) is not implemented; use "
                             "'natural_galore' or 'galore'")
        if isinstance(proj_type, str) and proj_type in _OFFICIAL_NATURAL_PROJ_TYPES:
            group["proj_type"], natural = _OFFICIAL_NATURAL_PROJ_TYPES[proj_type]
            if group.setdefault("natural", natural) != natural:
                raise ValueError(f"proj_type {proj_type!r} contradicts natural={group['natural']!r}; give one")
        return group


class GaLoreAdafactorRule(LowRankRule):
    """GaLore with HF Adafactor as the inner rule (galore-torch's ``GaLoreAdafactor``): factored
    second moment of the projected gradient R (row and column EMAs), RMS clipping, the relative-
    step / parameter-scale lr ρ_t, optional β1 momentum of the update; back-projected with α,
    decay first with ρ_t. Parameters that are not projected get plain Adafactor (factored for
    ≥2-D, unfactored for vectors), as galore-torch gives them."""

    family = "galore"
    defaults = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                    scale_parameter=True, relative_step=True, warmup_init=False)
    kernels = ("galore_adafactor_project_", "galore_adafactor_apply_", "adafactor_update_", "adafactor_lr",
               "adafactor_beta2")
    # Whether an exp_avg exists depends on beta1 (None: none); turning β1 on starts it at zero.
    layout_keys = ("beta1",)
    rebuilt_units = (("exp_avg",),)
    # Adafactor's moments are declared in state() (no 8-bit codec for them).
    moments: Mapping[str, Any] = {}
    unused_keys = ("betas", "correct_bias")
    lr_optional = True

    # Its dense branch reduces over FSDP2 row shards (factored means, RMS clipping, RMS(W)).
    dense_row_shards = True

    def row_sharded_state(self, name: str, projector: Projector | None, shape: torch.Size) -> bool:
        """On FSDP2 row shards: a right projection's row EMA (m) and momentum (m×r) follow the
        weight's rows (its column EMA, r, and a left or two-sided projection's state are
        replicated); of a weight that is not projected everything does but a 2-D weight's
        column EMA (n values, replicated): the row EMA, a ≥3-D weight's column EMA (dim 0 is the
        weight's), a vector's v, the momentum."""
        if projector is not None:
            return projector.side == "right" and name in ("exp_avg_sq_row", "exp_avg")
        return name != "exp_avg_sq_col" or len(shape) >= 2

    def check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            check_bool(flag, group[flag])
        # A group's lr is ignored under relative_step (as galore-torch's, which checks the two
        # only among the constructor's arguments): a scheduler or trainer may still write one.
        if group["lr"] is None:
            if not group["relative_step"]:
                raise ValueError("lr=None needs relative_step=True (Adafactor then computes its own step size); "
                                 "give lr or set relative_step=True")
        else:
            check_lr(group["lr"])
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"Invalid eps: expected a pair (ε1 added to R², ε2 the least parameter scale), got {eps!r}")
        for index, value in enumerate(eps):
            check_number(f"eps[{index}]", value)
        check_number("clip_threshold", group["clip_threshold"])
        if group["clip_threshold"] <= 0:
            raise ValueError(f"Invalid clip_threshold: {group['clip_threshold']} (must be > 0)")
        # β2_t = 1 − t^decay_rate must stay in [0, 1): decay_rate ≤ 0.
        check_number("decay_rate", group["decay_rate"], low=-math.inf, high=0.0)
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], high=1.0, high_inclusive=False)

    def validate(self, group: Mapping[str, Any]) -> None:
        if group["optim_bits"] != 32:
            raise ValueError(f"Invalid optim_bits: {group['optim_bits']!r}; GaLoreAdafactor keeps its factored "
                             "moments in state_dtype (8-bit moments are for Adam's)")

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        # galore-torch computes in float32 for 16-bit weights and keeps its moments so.
        dtype = compute_dtype(state_dtype) if group["state_dtype"] is None else state_dtype
        if len(shape) >= 2:
            spec: StateSpec = {"exp_avg_sq_row": (shape[:-1], dtype), "exp_avg_sq_col": (shape[:-2] + shape[-1:], dtype)}
        else:
            spec = {"exp_avg_sq": (shape, dtype)}
        if group["beta1"] is not None:
            spec["exp_avg"] = (shape, dtype)
        return spec

    @staticmethod
    def _hyper(kernels: Any, group: Mapping[str, Any], step: int) -> dict[str, Any]:
        return dict(beta2=kernels.adafactor_beta2(step + 1, group["decay_rate"]), eps1=group["eps"][0],
                    clip_threshold=group["clip_threshold"], beta1=group["beta1"], maximize=group["maximize"])

    @staticmethod
    def _lrs(kernels: Any, group: Mapping[str, Any], items: list[WeightStep]) -> list[torch.Tensor]:
        """ρ_t of each weight, read (RMS(W) with scale_parameter) before any weight is written. Of
        row-sharded weights (one process group), RMS(W) sums Σw² over the shards: one all-reduce
        of one float64 per weight for the batch."""
        rms: list[torch.Tensor | None] = [None] * len(items)
        shard = items[0].shard
        if group["scale_parameter"] and shard is not None:
            squares = torch.stack([local_tensor(item.param).to(compute_dtype(item.param.dtype)).square().sum()
                                   .to(torch.float64) for item in items])
            sizes = torch.tensor([max(item.param.numel(), 1) for item in items], dtype=torch.float64,
                                 device=squares.device)
            rms = list((shard.all_reduce_(squares) / sizes).sqrt())
        return [kernels.adafactor_lr(local_tensor(item.param), lr=group["lr"], step=item.step + 1,
                                     relative_step=group["relative_step"], scale_parameter=group["scale_parameter"],
                                     warmup_init=group["warmup_init"], eps2=group["eps"][1], rms=size)
                for item, size in zip(items, rms)]

    @staticmethod
    def _row_reduction(items: list[WeightStep], rows: list[int]) -> dict[str, Any]:
        """The kernels' arguments for row shards (the collective, each tensor's whole dim 0); none
        for whole tensors."""
        shard = items[0].shard
        return {} if shard is None else dict(reduce=shard.all_reduce_, rows=rows)

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """On row shards: a right projection's R_k = G_k·Qᵀ, its row EMA, momentum and U_k·Q are
        local rows; the column EMA (r), mean(row EMA) and RMS(U) reduce over the shards (two
        all-reduces per weight, r + 1 values and one). With a left factor R = Σ_k P_kᵀ·G_k(·Qᵀ)
        is all-reduced and Adafactor runs on the replicated R; each rank applies its rows P_k·U."""
        kernels = engine.kernels(items[0].param.device)
        shard = items[0].shard
        lrs = self._lrs(kernels, group, items)
        updates = low_rank_updates(items)
        factors = [engine.factors(item) for item in items]
        lefts, rights = [f[0] for f in factors], [f[1] for f in factors]
        state = lambda name: [local_tensor(item.state[name]) for item in items]  # noqa: E731
        moments = (state("exp_avg_sq_row"), state("exp_avg_sq_col"), None if group["beta1"] is None else state("exp_avg"))
        hyper = self._hyper(kernels, group, items[0].step)
        if items[0].reduces:  # R summed over the shards, replicated: Adafactor on R itself
            kernels.galore_adafactor_project_(engine.reduced_projections(items, factors), *moments, updates, lrs,
                                              lefts=None, rights=None, **hyper)
        else:
            kernels.galore_adafactor_project_(
                [engine.local_grad(item) for item in items], *moments, updates, lrs, lefts=lefts, rights=rights,
                **hyper, **self._row_reduction(items, [item.projector.shape[0] for item in items]))
        if shard is not None and not shard.rows:
            return  # an empty row shard (uneven sharding): no rows to write
        kernels.galore_adafactor_apply_([local_tensor(item.param) for item in items], updates, lrs, lefts=lefts,
                                        rights=rights, scale=group["scale"], weight_decay=group["weight_decay"])

    def update_dense(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Plain Adafactor: factored over the last two dimensions of ≥2-D tensors (no projection,
        no α), unfactored for vectors and scalars. On FSDP2 row shards (one call per process
        group) a 2-D weight's column EMA and mean(row EMA) reduce over the shards (n + 1 values),
        as RMS(U) (and RMS(W)) of every tensor; the means of ≥3-D weights are local."""
        kernels = engine.kernels(items[0].param.device)
        by_group: dict[int | None, list[WeightStep]] = {}
        for item in items:
            if item.param.numel() > 0:
                by_group.setdefault(None if item.shard is None else id(item.shard.group), []).append(item)
        for batch in by_group.values():
            self._dense(kernels, group, batch)

    def _dense(self, kernels: Any, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        hyper = self._hyper(kernels, group, items[0].step)
        lrs = self._lrs(kernels, group, items)
        local = lambda chosen, name: [local_tensor(i.state[name]) for i in chosen]  # noqa: E731
        exp_avg = lambda chosen: None if group["beta1"] is None else local(chosen, "exp_avg")  # noqa: E731
        factored = [(item, lr) for item, lr in zip(items, lrs) if item.param.dim() >= 2]
        vectors = [(item, lr) for item, lr in zip(items, lrs) if item.param.dim() < 2]
        if factored:
            chosen = [item for item, _ in factored]
            params = [local_tensor(item.param) for item in chosen]
            updates = batch_views([tuple(param.shape) for param in params], compute_dtype(params[0].dtype),
                                  params[0].device)
            chosen_lrs = [lr for _, lr in factored]
            kernels.galore_adafactor_project_(
                [local_tensor(item.param.grad) for item in chosen], local(chosen, "exp_avg_sq_row"),
                local(chosen, "exp_avg_sq_col"), exp_avg(chosen), updates, chosen_lrs, lefts=None, rights=None,
                **hyper, **self._row_reduction(chosen, [item.param.shape[0] for item in chosen]))
            kernels.galore_adafactor_apply_(params, updates, chosen_lrs, lefts=None, rights=None, scale=1.0,
                                            weight_decay=group["weight_decay"])
        if vectors:
            chosen = [item for item, _ in vectors]
            kernels.adafactor_update_(
                [local_tensor(item.param) for item in chosen], [local_tensor(item.param.grad) for item in chosen],
                local(chosen, "exp_avg_sq"), exp_avg(chosen), [lr for _, lr in vectors],
                weight_decay=group["weight_decay"], **hyper,
                **self._row_reduction(chosen, [item.param.shape[0] if item.param.dim() else 1 for item in chosen]))


class GaLoreAdafactor(LowRankOptimizer):
    r"""GaLore with an Adafactor inner rule; a drop-in for ``galore_torch.GaLoreAdafactor``
    (galore-torch 1.0: transformers' Adafactor applied to the projected gradient).

    Param groups are the official ones: a group with a ``rank`` (``{"params": ..., "rank": 128,
    "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}``) projects its ≥2-D weights;
    every other parameter gets plain Adafactor (factored over its last two dimensions when ≥2-D,
    unfactored for vectors). For a projected weight with R = P(G) at step t:

    .. math::
        \beta_{2,t} = 1 - t^{\text{decay\_rate}};\ r \leftarrow \beta_{2,t} r + (1-\beta_{2,t})\,
        \overline{(R^2+\epsilon_1)}_{\text{rows}};\ c \leftarrow \beta_{2,t} c + (1-\beta_{2,t})\,
        \overline{(R^2+\epsilon_1)}_{\text{cols}};\ U = R / \sqrt{r c^\top / \bar r}

    then U ← U / max(1, RMS(U)/d) (d = ``clip_threshold``), U ← ρ_t·U, with ``beta1``
    m ← β1·m + (1−β1)·U and U = m; W ← W − λ·ρ_t·W (decay first, with ρ_t); W ← W − α·P(U).
    ρ_t is ``lr``, or with ``relative_step`` min(1e-2, 1/√t) (min(1e-6·t, 1/√t) with
    ``warmup_init``), times max(ε2, RMS(W)) with ``scale_parameter``. The GaLore scripts' setting
    is ``lr=…, relative_step=False, scale_parameter=False, warmup_init=False``.

    State per projected weight (R m×r): row EMA m + column EMA r (+ m×r with β1), in float32 for
    16-bit weights as galore-torch keeps them (or ``state_dtype``); no 8-bit variant.
    Defaults and validation are galore-torch's (``lr=None`` with ``relative_step=True``; a given
    lr needs ``relative_step=False`` among the constructor's arguments, while a group's lr is
    ignored under the relative step, so schedulers and trainers may write one); with ``beta1`` the
    momentum of lr-scaled updates keeps moving the weights after lr drops to 0, as officially.
    The projector defaults to ``"randomized"`` as :class:`GaLoreAdamW`'s, ``projector="svd"``
    being the official one (and with it the official trajectory). Param groups carry no
    ``betas`` / ``correct_bias`` (Adafactor has none). FSDP2 (``fully_shard``, ``Shard(0)``)
    parameters are stepped on their row shards, projected or not: the whole-tensor means, RMS(U)
    and RMS(W) are all-reduced (README "Distributed training"); other placements are refused.

    Args:
        params: parameters or param groups.
        lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
            warmup_init: as ``galore_torch.GaLoreAdafactor`` (None, (1e-30, 1e-3), 1.0, -0.8,
            None, 0.0, True, True, False).
        rank, update_proj_gap, scale, proj_type, projector, power_iters, oversample, strict_rank,
            state_dtype, seed, maximize, backend, skip_nonfinite, foreach, fused, capturable,
            differentiable: as :class:`GaLoreAdamW`.
    """

    rule = GaLoreAdafactorRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        projector: str = "randomized",
        power_iters: int = 2,
        oversample: int = 8,
        strict_rank: bool = False,
        state_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        maximize: bool = False,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # galore-torch's constructor checks (its param groups are not checked so).
        if lr is not None and relative_step is True:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options (as galore-torch); pass "
                             "relative_step=False with lr, or lr=None")
        if warmup_init is True and relative_step is False:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        defaults = dict(lr=lr, eps=tuple(eps) if isinstance(eps, list) else eps, clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projector=projector, power_iters=power_iters, oversample=oversample,
                        strict_rank=strict_rank, state_dtype=state_dtype, maximize=maximize)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
