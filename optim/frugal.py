"""FRUGAL (Zmushko et al. 2024): full-rank updates with state only in a subspace."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memzoo.optim.base import Backend, StateSpec, check_bool, check_number, local_tensor
from memzoo.optim.lowrank import (
    LowRankOptimizer,
    LowRankRule,
    WeightStep,
    low_rank_updates,
    steps_row_shards,
    torch_adam_form,
)
from memzoo.optim.projector import Projector, ProjectorSettings
from memzoo.optim.sharded import RowShard
from memzoo.reference.common import compute_dtype
from memzoo.reference.frugal import RESIDUAL_RULES, residual_exceeds, residual_squares
from memzoo.reference.projector import matrix_shape, project, project_back, projection_side, side_length

__all__ = ["FRUGAL", "FrugalRule"]

_SUBSPACE_FIELDS = ("update_proj_gap", "proj_type", "projector", "power_iters", "oversample")
_PROJECTORS = ("svd", "randomized", "random", "coordinates")

# The official FRUGAL's density for projected groups that do not set one.
OFFICIAL_DENSITY = 0.25
# Its projections (GaloreAdamW's proj_type) and coordinate choices (CoordAdamW's coord_choice),
# in our names.
_OFFICIAL_PROJECTORS = {"svd": "svd", "random": "random", "randperm": "coordinates"}
_COORD_CHOICES = {"columns": "right", "rows": "left"}
# Official keyword arguments that are not ours (mapped by _from_official, or the proj_params split).
_OFFICIAL_KWARGS = ("update_gap", "proj_side", "coord_choice", "proj_params", "_example_state_init",
                    "no_deprecation_warning", "block_order")


def _from_official(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (keyword arguments or a param group) with the official FRUGAL's names in ours:
    ``update_gap`` → ``update_proj_gap``; ``proj_type`` "svd" / "random" / "randperm" (its kind of
    projection) → ``projector`` "svd" / "random" / "coordinates"; ``proj_side`` → ``proj_type``
    (the side); ``coord_choice`` "columns" / "rows" → ``projector="coordinates"`` on the right /
    left side; ``_example_state_init`` and ``no_deprecation_warning`` (a state-allocation detail
    and a warning switch there) dropped."""
    out = dict(settings)

    def move(official: str, ours: str, value: Any) -> None:
        if ours in out and out[ours] != value:
            raise ValueError(f"both {official!r} (the official FRUGAL's name) and {ours!r} are given; give one")
        out[ours] = value

    if "update_gap" in out:
        move("update_gap", "update_proj_gap", out.pop("update_gap"))
    if isinstance(out.get("proj_type"), str) and out["proj_type"] in _OFFICIAL_PROJECTORS:
        move("proj_type", "projector", _OFFICIAL_PROJECTORS[out.pop("proj_type")])
    if "proj_side" in out:
        move("proj_side", "proj_type", out.pop("proj_side"))
    if "coord_choice" in out:
        choice = out.pop("coord_choice")
        if choice not in _COORD_CHOICES:
            raise ValueError(f"Invalid coord_choice: {choice!r}; 'columns' and 'rows' are implemented (RandK on "
                             "individual entries is not)")
        move("coord_choice", "projector", "coordinates")
        move("coord_choice", "proj_type", _COORD_CHOICES[choice])
    for flag in ("_example_state_init", "no_deprecation_warning"):
        if flag in out and not isinstance(out.pop(flag), bool):
            raise TypeError(f"Invalid {flag}: expected a bool")
    if "block_order" in out:
        raise ValueError("block_order: the official block variant (BlockAdamW) is not implemented")
    return out


def _split_proj_params(params: Iterable[Any], proj_params: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """The official ``proj_params=`` form: ``params`` (all parameters) split into an AdamW group
    and a projected group of ``proj_params``."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if any(isinstance(param, Mapping) for param in params):
        raise ValueError("proj_params= takes plain parameters in params; with param groups, mark the projected "
                         "group {'is_proj_params': True} instead")
    projected = [proj_params] if isinstance(proj_params, torch.Tensor) else list(proj_params)
    chosen = {id(param) for param in projected}
    regular = [param for param in params if id(param) not in chosen]
    groups = [{"params": regular, "is_proj_params": False}] if regular else []
    return groups + [{"params": projected, "is_proj_params": True}]



class FrugalRule(LowRankRule):
    """FRUGAL's rule: Adam (torch form) in the subspace, signSGD / SGD on the residual
    G − up(down(G)) (Zmushko et al. 2024, Algorithm 1); the subspace sized by ``density``;
    torch's AdamW (decay first) for the rest."""

    family = "frugal"
    defaults = dict(density=None, reset_statistics=True, inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                    inactive_threshold=1e-2, proj_params_lr_scale=1.0)
    kernels = ("galore_adam_project_", "frugal_apply_", "frugal_coordinates_step_", "adamw_update_")
    layout_keys = ("density",)

    def validate(self, group: Mapping[str, Any]) -> None:
        if group["rank"] is not None or group["optim_bits"] != 32:
            raise ValueError("FRUGAL sizes its subspace with density (not rank) and keeps 32-bit moments")
        if group["projector"] == "identity":
            raise ValueError("Invalid projector: 'identity' (use projector='coordinates' with density=1)")
        if group["projector"] not in _PROJECTORS:
            raise ValueError(f"Invalid projector: {group['projector']!r}; expected one of {_PROJECTORS}")
        density = group["density"]
        if density is not None:
            check_number("density", density, high=1.0)
            if group["proj_type"] == "full":
                raise ValueError("Invalid proj_type: 'full'; FRUGAL projects one side (std, reverse_std, left, right)")
        check_bool("reset_statistics", group["reset_statistics"])
        if group["inactive_update_rule"] not in RESIDUAL_RULES:
            raise ValueError(f"Invalid inactive_update_rule: {group['inactive_update_rule']!r}; "
                             f"expected one of {RESIDUAL_RULES}")
        check_number("inactive_lr_scale", group["inactive_lr_scale"])
        check_number("inactive_threshold", group["inactive_threshold"], high=1.0, high_inclusive=False)
        check_number("proj_params_lr_scale", group["proj_params_lr_scale"])

    def check_settings(self, group: Mapping[str, Any]) -> None:
        if group["density"] is not None:
            _settings(1, group).validate()

    def settings(self, shape: torch.Size, group: Mapping[str, Any]) -> ProjectorSettings | None:
        if group["density"] is None or len(shape) < 2 or math.prod(shape) == 0:
            return None
        matrix = matrix_shape(shape)
        size = side_length(matrix, projection_side(matrix, group["proj_type"]))
        # The official counts: CoordAdamW truncates (int(n·ρ)), the SVD / random projector rounds.
        rank = int(size * group["density"]) if group["projector"] == "coordinates" else round(size * group["density"])
        return _settings(rank, group)

    def settings_key(self, group: Mapping[str, Any]) -> tuple | None:
        if group["density"] is None:
            return None
        return (group["density"], *(group[name] for name in _SUBSPACE_FIELDS))

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        # Adam's own step count: it restarts with each new subspace (reset_statistics).
        return {} if projector is None else {"adam_step": (torch.Size(()), torch.int64)}

    def on_refresh(self, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        """The paper's rule: a new subspace starts with zero moments and a new bias correction."""
        if group["reset_statistics"]:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["adam_step"].zero_()

    def update_dense(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        step_size, eps = torch_adam_form(group["lr"], group["betas"], group["eps"], items[0].step,
                                         group["correct_bias"])
        engine.adamw_dense(group, items, step_size=step_size, eps=eps, decay_first=True)

    @steps_row_shards
    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Adam in each subspace and the split update (weights of one shape, grouped by Adam step)."""
        if items[0].shard is not None:
            self._update_sharded(engine, group, items)
            return
        by_adam_step: dict[int, list[WeightStep]] = {}
        for item in items:
            by_adam_step.setdefault(int(item.state["adam_step"]), []).append(item)
        lr_p = group["lr"] * group["proj_params_lr_scale"]
        beta1, beta2 = group["betas"]
        for adam_step, batch in by_adam_step.items():
            torch._foreach_add_([item.state["adam_step"] for item in batch], 1)
            step_size, eps = torch_adam_form(lr_p, group["betas"], group["eps"], adam_step, group["correct_bias"])
            kernels = engine.kernels(batch[0].param.device)
            common = dict(step_size=step_size, residual_step=lr_p * group["inactive_lr_scale"],
                          residual_rule=group["inactive_update_rule"], decay=group["lr"] * group["weight_decay"],
                          maximize=group["maximize"], residual_threshold=group["inactive_threshold"])
            if batch[0].projector.settings.projector == "coordinates":  # RandK: the selection as indices
                kernels.frugal_coordinates_step_([item.param for item in batch], [item.param.grad for item in batch],
                                                 [item.state["exp_avg"] for item in batch],
                                                 [item.state["exp_avg_sq"] for item in batch],
                                                 [item.state["proj_indices"] for item in batch],
                                                 side=batch[0].projector.side, beta1=beta1, beta2=beta2, eps=eps,
                                                 **common)
                continue
            updates = low_rank_updates(batch)
            factors = [engine.factors(item) for item in batch]
            params = [item.param for item in batch]
            grads = [item.param.grad for item in batch]
            lefts, rights = [f[0] for f in factors], [f[1] for f in factors]
            if updates[0].numel():  # an empty subspace (density 0) has no Adam part
                kernels.galore_adam_project_(grads, [item.state["exp_avg"] for item in batch],
                                             [item.state["exp_avg_sq"] for item in batch], updates, lefts=lefts,
                                             rights=rights, beta1=beta1, beta2=beta2, eps=eps,
                                             maximize=group["maximize"])
            kernels.frugal_apply_(params, grads, updates, lefts=lefts, rights=rights, **common)


    def _update_sharded(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """:meth:`update` on FSDP2 row shards (one weight at a time: the batches are small there).

        Right side (columns, or a right basis): R_k = G_k·Qᵀ, the moments, up(N_k) and the
        residual E_k = G_k − R_k·Q are local rows. Left side: R = Σ_k P_kᵀ·G_k is all-reduced
        (r×n) and Adam runs on it, replicated; the residual E_k = G_k − P_k·R is local once R
        is known. The signSGD step's
        threshold compares ‖E‖² with ‖G‖² over all the shards (two float64 scalars per weight,
        all-reduced), so every rank takes the same decision. Coordinate selections go through
        the same kernel as whole tensors (:meth:`_coordinates_on_shard`), so a shard steps bit
        for bit like the rows of the whole tensor."""
        lr_p = group["lr"] * group["proj_params_lr_scale"]
        beta1, beta2 = group["betas"]
        rule, threshold = group["inactive_update_rule"], group["inactive_threshold"]
        thresholded = rule == "sign_sgd" and threshold > 0
        for item in items:
            shard = item.shard
            adam_step = int(item.state["adam_step"])
            item.state["adam_step"] += 1
            step_size, eps = torch_adam_form(lr_p, group["betas"], group["eps"], adam_step, group["correct_bias"])
            kernels = engine.kernels(item.param.device)
            if item.projector.settings.projector == "coordinates":
                self._coordinates_on_shard(engine, kernels, group, item, step_size=step_size, eps=eps,
                                           thresholded=thresholded)
                continue
            (update,) = low_rank_updates([item])
            left, right = engine.factors(item)
            grad = engine.local_grad(item)
            exp_avg, exp_avg_sq = local_tensor(item.state["exp_avg"]), local_tensor(item.state["exp_avg_sq"])
            if update.numel() or item.reduces:
                if item.reduces:
                    (inside,) = engine.reduced_projections([item], [(left, right)])
                    adam_input, lefts, rights = inside, None, None
                else:
                    adam_input, lefts, rights = grad, left, right
                if update.numel() and adam_input.numel():
                    kernels.galore_adam_project_(adam_input, exp_avg, exp_avg_sq, update, lefts=lefts, rights=rights,
                                                 beta1=beta1, beta2=beta2, eps=eps, maximize=group["maximize"])
            dtype = compute_dtype(grad.dtype)
            residual = None  # E_k, formed only where the kernel cannot form it from local data
            if item.reduces and rule != "no":
                residual = grad.to(dtype) - project_back(inside, left.to(dtype), None)
            kept = not thresholded or _residual_kept_on_shards(shard, grad, left, right, threshold, residual)
            if not shard.rows:
                continue  # an empty row shard: nothing to update
            param, local = local_tensor(item.param), local_tensor(item.param.grad)
            common = dict(decay=group["lr"] * group["weight_decay"], maximize=group["maximize"])
            own_rule = rule if kept and residual is None else "no"
            kernels.frugal_apply_(param, local, update, lefts=left, rights=right, step_size=step_size,
                                  residual_step=lr_p * group["inactive_lr_scale"], residual_rule=own_rule,
                                  residual_threshold=0.0, **common)
            if residual is not None and kept:  # E_k's step: a zero-rank subspace leaves the residual whole
                empty = torch.zeros((shard.rows, 0), dtype=dtype, device=grad.device)
                kernels.frugal_apply_(param, residual.reshape(param.shape), update.new_zeros((0, update.shape[1])),
                                      lefts=empty, rights=None, step_size=0.0,
                                      residual_step=lr_p * group["inactive_lr_scale"], residual_rule=rule,
                                      residual_threshold=0.0, decay=0.0, maximize=group["maximize"])


    @staticmethod
    def _coordinates_on_shard(engine: LowRankOptimizer, kernels: Any, group: Mapping[str, Any], item: WeightStep, *,
                              step_size: float, eps: float, thresholded: bool) -> None:
        """A coordinate selection's step on this rank's rows, by ``frugal_coordinates_step_`` (the
        whole-tensor kernel, so the same arithmetic per element). Columns (right): R's rows, the
        moments and the update are the shard's rows. Rows (left): the selected rows held here are a
        contiguous run of R's rows (the indices are sorted), and Adam is elementwise, so each rank
        steps the moments of its own selected rows; the moments stay replicated by one all-reduce
        of the two r×n moments with the other ranks' rows zeroed (x + 0 = x). The signSGD
        threshold (where ``thresholded``: the signSGD rule with τ > 0) is decided over all shards
        first (‖G‖², ‖E‖², all-reduced) and passed as a rule."""
        shard = item.shard
        rule, threshold = group["inactive_update_rule"], group["inactive_threshold"]
        param, grad = local_tensor(item.param), local_tensor(item.param.grad)
        exp_avg, exp_avg_sq = local_tensor(item.state["exp_avg"]), local_tensor(item.state["exp_avg_sq"])
        chosen = item.state["proj_indices"].to(param.device)
        left, right = engine.factors(item)  # the left factor: this shard's rows of the 0/1 selection
        if thresholded and not _residual_kept_on_shards(shard, grad, left, right, threshold):
            rule = "no"
        side = item.projector.side
        if side == "right":
            local_chosen, moments = chosen, (exp_avg, exp_avg_sq)
        else:
            first, last = (int(x) for x in torch.searchsorted(chosen, torch.tensor(
                [shard.index.start, shard.index.stop], dtype=chosen.dtype, device=chosen.device)))
            local_chosen = chosen[first:last] - shard.index.start
            moments = (exp_avg[first:last], exp_avg_sq[first:last])
        if shard.rows:
            beta1, beta2 = group["betas"]
            lr_p = group["lr"] * group["proj_params_lr_scale"]
            kernels.frugal_coordinates_step_(param, grad, *moments, local_chosen, side=side, beta1=beta1, beta2=beta2,
                                             eps=eps, step_size=step_size, residual_step=lr_p * group["inactive_lr_scale"],
                                             residual_rule=rule, decay=group["lr"] * group["weight_decay"],
                                             maximize=group["maximize"], residual_threshold=0.0)
        if side == "left":  # the others' rows from their ranks: replicated again
            for moment in (exp_avg, exp_avg_sq):
                moment[:first].zero_()
                moment[last:].zero_()
            for moment, summed in zip((exp_avg, exp_avg_sq), shard.all_reduce_many_([exp_avg, exp_avg_sq])):
                moment.copy_(summed)


def _residual_kept_on_shards(shard: RowShard, grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                             threshold: float, residual: torch.Tensor | None = None) -> bool:
    """Whether a row-sharded matrix takes its signSGD step: ‖E‖² > τ²·‖G‖² over all the shards
    (two float64 sums all-reduced, so every rank decides alike). ``residual``: E_k when this rank
    formed it, else ‖E_k‖² comes from G_k and its projection (:func:`residual_squares`)."""
    dtype = compute_dtype(grad.dtype)
    if residual is not None:
        squares = torch.stack([grad.to(dtype).double().square().sum(), residual.double().square().sum()])
    else:
        inside = project(grad.to(dtype), None if left is None else left.to(dtype),
                         None if right is None else right.to(dtype))
        squares = torch.stack(residual_squares(grad, inside, left, right))
    total, remainder = shard.all_reduce_(squares)
    return bool(residual_exceeds(total, remainder, threshold))


def _settings(rank: int, group: Mapping[str, Any]) -> ProjectorSettings:
    # A zero-dimensional subspace is an empty coordinate selection. FRUGAL's "random" is an
    # orthonormal basis (the official torch.nn.init.orthogonal_): up(down(G)) must be the
    # projection onto the subspace for G − up(down(G)) to be the rest.
    projector = {"random": "random_orthonormal"}.get(group["projector"], group["projector"])
    projector = projector if rank > 0 else "coordinates"
    return ProjectorSettings(rank=rank, update_proj_gap=group["update_proj_gap"], scale=1.0,
                             proj_type=group["proj_type"], projector=projector, power_iters=group["power_iters"],
                             oversample=group["oversample"], strict_rank=False)


class FRUGAL(LowRankOptimizer):
    r"""FRUGAL: each projected gradient is split into a state-full part in a subspace, updated
    by Adam, and the state-free rest, updated by signSGD (or SGD), so every coordinate moves
    every step while state is kept for a fraction ``density`` of them.

    A group with a ``density`` ρ projects its ≥2-D weights (read as (shape[0], rest)); every
    other parameter gets torch's AdamW (FRUGAL's "regular" parameters). For an m×n weight, on
    the side GaLore's rule picks (``proj_type="std"``: columns when m ≥ n), the subspace has
    r = round(ρ·n) dimensions (round(ρ·m) for rows; ⌊ρ·n⌋ for ``"coordinates"``, as the
    official CoordAdamW truncates) and is recomputed every ``update_proj_gap`` steps from the
    current gradient, by ``projector``:

    - ``"svd"`` (the official default) / ``"randomized"``: GaLore's top-r singular vectors;
    - ``"coordinates"``: r random columns (rows), FRUGAL's RandK ("columns"/"rows");
    - ``"random"``: a uniformly random orthonormal basis (the official ``proj_type="random"``),
      regenerated from its seed every step (nothing stored).

    Each step, with R = down(G) and up(·) its back-projection (FRUGAL's template):

    .. math::
        W \leftarrow W(1-\text{lr}\,\lambda);\;
        W \leftarrow W - \frac{\text{lr}_p}{1-\beta_1^t}\,\text{up}\!\Big(\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}+\epsilon}\Big)
        - \text{lr}_p\,\kappa\,\phi\big(G - \text{up}(R)\big)

    with m, v the Adam moments of R, lr_p = lr·``proj_params_lr_scale``, κ =
    ``inactive_lr_scale`` and φ = sign (``inactive_update_rule="sign_sgd"``), identity
    (``"sgd"``) or 0 (``"no"``). When the subspace changes the moments are zeroed and t restarts
    (``reset_statistics=True``, the paper's rule), or kept (False, GaLore's behaviour).
    ρ = 0 gives pure signSGD; coordinates with ρ = 1 give AdamW.

    The official code's names are accepted, as keyword arguments and in param groups, and mapped
    to ours (one name inside, memzoo's GaLore's where the concept is shared): ``update_gap`` →
    ``update_proj_gap``; ``proj_type="svd"|"random"|"randperm"`` (its kind of projection) →
    ``projector="svd"|"random"|"coordinates"``; ``proj_side`` → ``proj_type`` (the side);
    ``coord_choice="columns"|"rows"`` → ``projector="coordinates"`` on the right|left side;
    ``proj_params=`` (the projected subset of ``params``); the group flag ``is_proj_params``
    (True: projected with the group's density, else ``density``, else the official 0.25;
    False: AdamW); ``_example_state_init`` and ``no_deprecation_warning`` change nothing here.

    signSGD on rounding noise: when the subspace holds the whole gradient (rank(G) ≤ r with an
    SVD subspace, e.g. a batch of one), the residual G − up(R) is rounding noise, and its sign
    moves every coordinate by the full lr·κ in a random direction (in about one small run in
    three the loss rose). By default (``inactive_threshold=1e-2``) a matrix whose residual is
    at most 1% of its gradient's norm (1e-4 of its energy) takes no signSGD step that step;
    ``inactive_threshold=0`` is the official update. Only ``sign_sgd`` is affected (SGD moves
    by the residual itself, so noise moves it by noise).

    Defaults are the official class's: lr 1e-3, betas (0.9, 0.999), eps 1e-8 (torch-Adam form),
    weight_decay 0.01 (decoupled, applied first, to every parameter), gap 200, "svd",
    reset_statistics True, sign_sgd, inactive_lr_scale 1.0 (the README uses 0.1 for
    fine-tuning), proj_params_lr_scale 1.0, correct_bias True — except ``inactive_threshold``
    (1e-2; official: 0); density 0.25 in official-format groups (``density=None``, our default,
    leaves plain parameter lists on AdamW). Not implemented: the block variant (BlockAdamW, the
    official pretraining scripts' choice) and RandK on individual entries (CoordAdamW's other
    ``coord_choice``).

    Args:
        density: default ρ for groups that do not set one; None (default) = AdamW only.
        inactive_threshold: τ in [0, 1): a matrix whose residual has ‖E‖_F ≤ τ·‖G‖_F takes
            no signSGD step (0: always, as the official code). Reliable for τ ≳ 1e-3.
        correct_bias: Adam's bias correction (both parts, as the official AdamW's).
        state_dtype, power_iters, oversample, seed, maximize, backend, foreach, fused, capturable,
            differentiable: as :class:`GaLoreAdamW`.
        **official: the official keyword arguments above.
    """

    rule = FrugalRule()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        density: float | None = None,
        update_proj_gap: int = 200,
        projector: str = "svd",
        proj_type: str = "std",
        reset_statistics: bool = True,
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        inactive_threshold: float = 1e-2,
        proj_params_lr_scale: float = 1.0,
        correct_bias: bool = True,
        power_iters: int = 2,
        oversample: int = 8,
        state_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        maximize: bool = False,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        **official: Any,
    ) -> None:
        signature = inspect.signature(FRUGAL.__init__).parameters
        for name in official:
            if name not in _OFFICIAL_KWARGS:
                close = difflib.get_close_matches(name, (*_OFFICIAL_KWARGS, *signature), n=1)
                raise TypeError(f"FRUGAL got an unexpected keyword argument {name!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
        proj_params = official.pop("proj_params", None)
        if proj_params is not None:
            params = _split_proj_params(params, proj_params)
        # Official names given as keyword arguments; ours keep their defaults unless set.
        if proj_type in _OFFICIAL_PROJECTORS:
            official["proj_type"], proj_type = proj_type, "std"
        ours = dict(update_proj_gap=update_proj_gap, projector=projector, proj_type=proj_type)
        for name, value in _from_official(official).items():
            if ours[name] != signature[name].default and ours[name] != value:
                raise ValueError(f"{name}={ours[name]!r} contradicts the official keyword arguments "
                                 f"({sorted(official)}), which set it to {value!r}; give one")
            ours[name] = value
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        density=density, reset_statistics=reset_statistics, inactive_update_rule=inactive_update_rule,
                        inactive_lr_scale=inactive_lr_scale, inactive_threshold=inactive_threshold,
                        proj_params_lr_scale=proj_params_lr_scale, power_iters=power_iters, oversample=oversample,
                        state_dtype=state_dtype, maximize=maximize, **ours)
        super().__init__(params, defaults, seed=seed, backend=backend, skip_nonfinite=skip_nonfinite,
                         foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)

    # Group keys of the official format: mapped by _translate_group.
    official_group_keys = frozenset({"is_proj_params", "update_gap", "proj_side", "coord_choice",
                                     "_example_state_init"})

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The official group format: ``is_proj_params`` True means projected with the group's
        density, else the constructor's, else the official 0.25; False means AdamW."""
        group = _from_official(group)
        if "is_proj_params" in group:
            projected = group.pop("is_proj_params")
            check_bool("is_proj_params", projected)
            if projected:
                default = self.defaults["density"]
                group.setdefault("density", OFFICIAL_DENSITY if default is None else default)
            elif group.setdefault("density", None) is not None:
                raise ValueError("is_proj_params=False (AdamW) contradicts the group's density; give one")
        return group

    def _migrate(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Checkpoints written before ``inactive_threshold`` existed resume with the update they
        were trained with, the official one (threshold 0)."""
        groups = state_dict["param_groups"]
        if isinstance(groups, (list, tuple)) and any(isinstance(g, Mapping) and "inactive_threshold" not in g
                                                     for g in groups):
            state_dict = {**state_dict, "param_groups": [
                {"inactive_threshold": 0.0, **g} if isinstance(g, Mapping) else g for g in groups]}
        return super()._migrate(state_dict)  # after: its defaults must not fill this key first
