"""FRUGAL (Zmushko et al. 2024): full-rank updates with state only in a subspace."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memzoo.optim.base import Backend, StateSpec, check_number
from memzoo.optim.galore import GaLoreAdamW, batch_views
from memzoo.optim.projector import Projector, ProjectorSettings
from memzoo.reference.common import compute_dtype
from memzoo.reference.frugal import RESIDUAL_RULES
from memzoo.reference.projector import matrix_shape, projection_side, side_length

__all__ = ["FRUGAL"]

_SUBSPACE_FIELDS = ("update_proj_gap", "proj_type", "projector", "power_iters", "oversample")


class FRUGAL(GaLoreAdamW):
    r"""FRUGAL: each projected gradient is split into a state-full part in a subspace, updated
    by Adam, and the state-free rest, updated by signSGD (or SGD), so every coordinate moves
    every step while state is kept for a fraction ``density`` of them.

    A group with a ``density`` ρ projects its ≥2-D weights (read as (shape[0], rest)); every
    other parameter gets torch's AdamW (FRUGAL's "regular" parameters). For an m×n weight, on
    the side GaLore's rule picks (``proj_type="std"``: columns when m ≥ n), the subspace has
    r = round(ρ·n) dimensions (round(ρ·m) for rows) and is recomputed every ``update_proj_gap``
    steps from the current gradient, by ``projector``:

    - ``"svd"`` (the official default) / ``"randomized"``: GaLore's top-r singular vectors;
    - ``"coordinates"``: r random columns (rows), FRUGAL's RandK ("columns"/"rows");
    - ``"random"``: a seeded Gaussian, regenerated from its seed (not orthonormal).

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

    signSGD on rounding noise: when the subspace holds the whole gradient (rank(G) ≤ r with an
    SVD subspace, e.g. a batch of one), the residual G − up(R) is rounding noise, and its sign
    moves every coordinate by the full lr·κ in a random direction (in about one small run in
    three the loss rose). By default (``inactive_threshold=1e-2``) a matrix whose residual is
    at most 1% of its gradient's norm (1e-4 of its energy) takes no signSGD step that step;
    ``inactive_threshold=0`` is the official update. Only ``sign_sgd`` is affected (SGD moves
    by the residual itself, so noise moves it by noise).

    Names follow memzoo's GaLore where the concept is shared (official FRUGAL: ``update_gap`` = ``update_proj_gap``,
    ``proj_type`` = ``projector``, ``proj_side`` = ``proj_type``).

    Defaults are the official class's: lr 1e-3, betas (0.9, 0.999), eps 1e-8 (torch-Adam form),
    weight_decay 0.01 (decoupled, applied first, to every parameter), gap 200, "svd",
    reset_statistics True, sign_sgd, inactive_lr_scale 1.0 (the README uses 0.1 for
    fine-tuning), proj_params_lr_scale 1.0 — except ``inactive_threshold`` (1e-2; official: 0). The official pretraining scripts use the block
    variant (whole tensors as the subspace), which is not implemented here.

    Args:
        density: default ρ for groups that do not set one; None (default) = AdamW only.
        inactive_threshold: τ in [0, 1): a matrix whose residual has ‖E‖_F ≤ τ·‖G‖_F takes
            no signSGD step (0: always, as the official code). Reliable for τ ≳ 1e-3.
        state_dtype, power_iters, oversample, seed, maximize, backend: as :class:`GaLoreAdamW`.
    """

    family = "frugal"
    _layout_keys = (*GaLoreAdamW._layout_keys, "density")

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
        power_iters: int = 2,
        oversample: int = 8,
        state_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        maximize: bool = False,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        self._frugal_defaults = dict(density=density, reset_statistics=reset_statistics,
                                     inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
                                     inactive_threshold=inactive_threshold, proj_params_lr_scale=proj_params_lr_scale)
        super().__init__(params, lr, betas, eps, weight_decay, True, update_proj_gap=update_proj_gap,
                         projector=projector, proj_type=proj_type, power_iters=power_iters, oversample=oversample,
                         state_dtype=state_dtype, seed=seed, maximize=maximize, backend=backend,
                         skip_nonfinite=skip_nonfinite)

    def _extra_defaults(self) -> dict[str, Any]:
        return self._frugal_defaults

    def _migrate(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Checkpoints written before ``inactive_threshold`` existed resume with the update they
        were trained with, the official one (threshold 0)."""
        state_dict = super()._migrate(state_dict)
        groups = state_dict["param_groups"]
        if isinstance(groups, (list, tuple)) and any(isinstance(g, Mapping) and "inactive_threshold" not in g
                                                     for g in groups):
            state_dict = {**state_dict, "param_groups": [
                {"inactive_threshold": 0.0, **g} if isinstance(g, Mapping) else g for g in groups]}
        return state_dict

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        if group["rank"] is not None or group["optim_bits"] != 32:
            raise ValueError("FRUGAL sizes its subspace with density (not rank) and keeps 32-bit moments")
        super()._validate_group(group, group_index)
        density = group["density"]
        if density is not None:
            check_number("density", density, high=1.0)
            if group["proj_type"] == "full":
                raise ValueError("Invalid proj_type: 'full'; FRUGAL projects one side (std, reverse_std, left, right)")
            if group["projector"] == "identity":
                raise ValueError("Invalid projector: 'identity' (use projector='coordinates' with density=1)")
            self._settings(1, group).validate()
        if not isinstance(group["reset_statistics"], bool):
            raise TypeError(f"Invalid reset_statistics: expected a bool, got {group['reset_statistics']!r}")
        if group["inactive_update_rule"] not in RESIDUAL_RULES:
            raise ValueError(f"Invalid inactive_update_rule: {group['inactive_update_rule']!r}; "
                             f"expected one of {RESIDUAL_RULES}")
        check_number("inactive_lr_scale", group["inactive_lr_scale"])
        check_number("inactive_threshold", group["inactive_threshold"], high=1.0, high_inclusive=False)
        check_number("proj_params_lr_scale", group["proj_params_lr_scale"])

    @staticmethod
    def _settings(rank: int, group: Mapping[str, Any]) -> ProjectorSettings:
        # A zero-dimensional subspace is an empty coordinate selection.
        projector = group["projector"] if rank > 0 else "coordinates"
        return ProjectorSettings(rank=rank, update_proj_gap=group["update_proj_gap"], scale=1.0,
                                 proj_type=group["proj_type"], projector=projector, power_iters=group["power_iters"],
                                 oversample=group["oversample"], strict_rank=False)

    @staticmethod
    def _settings_key(group: Mapping[str, Any]) -> tuple | None:
        if group["density"] is None:
            return None
        return (group["density"], *(group[name] for name in _SUBSPACE_FIELDS))

    def _projector(self, param: torch.Tensor, group: Mapping[str, Any], key: tuple | None = None) -> Projector | None:
        if group["density"] is None or param.dim() < 2 or param.numel() == 0:
            return None
        key = self._settings_key(group) if key is None else key
        cached = self._projectors.get(param)
        if cached is None or cached[0] != key:
            shape = matrix_shape(param.shape)
            rank = round(group["density"] * side_length(shape, projection_side(shape, group["proj_type"])))
            cached = self._projectors[param] = (key, Projector(self._settings(rank, group), param.shape))
        return cached[1]

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        spec = super()._state_spec(param, group)
        if self._projector(param, group):
            spec["adam_step"] = (torch.Size(()), torch.int64)
        return spec

    def _on_refresh(self, group: Mapping[str, Any], state: dict[str, Any], quantized: bool) -> None:
        """The paper's rule: a new subspace starts with zero moments and a new bias correction."""
        if group["reset_statistics"] or "adam_step" not in state:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["adam_step"] = torch.tensor(0, dtype=torch.int64)

    @staticmethod
    def _adam_form(group: Mapping[str, Any], step: int, lr: float) -> tuple[float, float]:
        """torch-Adam at step t = step + 1 in GaLore's form: (lr·√bc2/bc1, ε·√bc2)."""
        beta1, beta2 = group["betas"]
        t = step + 1
        root = math.sqrt(1.0 - beta2**t)
        return lr * root / (1.0 - beta1**t), group["eps"] * root

    def _update_dense(self, group: Mapping[str, Any], device: torch.device, step: int, lists: tuple[list, ...],
                      hyper: dict[str, float]) -> None:
        step_size, eps = self._adam_form(group, step, group["lr"])
        self._kernels(device).adamw_update_(
            *lists, step_size=step_size, beta1=hyper["beta1"], beta2=hyper["beta2"], eps=eps, lr=group["lr"],
            weight_decay=group["weight_decay"], maximize=group["maximize"], decay_first=True)

    def _update_projected(self, group: Mapping[str, Any], items: list, hyper: dict[str, float]) -> None:
        """Adam in each subspace and the split update, for projected params that share device,
        step count and shape: (param, projector, state, step, quantized) each."""
        by_adam_step: dict[int, list] = {}
        for item in items:
            by_adam_step.setdefault(int(item[2]["adam_step"]), []).append(item)
        lr_p = group["lr"] * group["proj_params_lr_scale"]
        for adam_step, batch in by_adam_step.items():
            torch._foreach_add_([item[2]["adam_step"] for item in batch], 1)
            step_size, eps = self._adam_form(group, adam_step, lr_p)
            param = batch[0][0]
            kernels = self._kernels(param.device)
            updates = batch_views([item[1].low_rank_shape for item in batch], compute_dtype(param.dtype), param.device)
            params, grads, exp_avgs, exp_avg_sqs, lefts, rights = [], [], [], [], [], []
            for param, projector, state, _, _ in batch:
                left, right = projector.factors(state, param.device, param.dtype, randn=self._randn)
                for out, value in zip((params, grads, exp_avgs, exp_avg_sqs, lefts, rights),
                                      (param, param.grad, state["exp_avg"], state["exp_avg_sq"], left, right)):
                    out.append(value)
            if updates[0].numel():  # an empty subspace (density 0) has no Adam part
                kernels.galore_adam_project_(grads, exp_avgs, exp_avg_sqs, updates, lefts=lefts, rights=rights,
                                             beta1=hyper["beta1"], beta2=hyper["beta2"], eps=eps,
                                             maximize=group["maximize"])
            kernels.frugal_apply_(params, grads, updates, lefts=lefts, rights=rights, step_size=step_size,
                                  residual_step=lr_p * group["inactive_lr_scale"],
                                  residual_rule=group["inactive_update_rule"],
                                  decay=group["lr"] * group["weight_decay"], maximize=group["maximize"],
                                  residual_threshold=group["inactive_threshold"])
