"""GaLore (Zhao et al. 2024): Adam in a periodically refreshed low-rank gradient subspace."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from memzoo.optim.base import (
    Backend,
    MemzooOptimizer,
    StateSpec,
    check_betas,
    check_int,
    check_lr,
    check_number,
    deferred_interrupts,
    local_tensor,
    resolve_backend,
    resolve_state_dtype,
    whole_matrix_problem,
    zeros_state,
)
from memzoo.optim.projector import Projector, ProjectorSettings, RefreshRequest, compute_refreshes
from memzoo.optim.quantized_state import MIN_8BIT_SIZE, QuantizedMoment
from memzoo.reference.common import compute_dtype

__all__ = ["GaLoreAdamW", "NaturalGaLore"]

_MOMENTS = {"exp_avg": QuantizedMoment(signed=True), "exp_avg_sq": QuantizedMoment(signed=False)}

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


# A batched call's low-rank updates N (fp32, alive until the weights are updated) are kept
# under this size: the transient memory of a step, not the whole model's worth of N at once.
_BATCH_UPDATE_BYTES = 64 * 2**20


def _chunks(items: list) -> list[list]:
    """Split (param, projector, ...) items so each chunk's low-rank updates fit the budget."""
    chunks, current, size = [], [], 0
    for item in items:
        nbytes = 4 * math.prod(item[1].low_rank_shape)
        if current and size + nbytes > _BATCH_UPDATE_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return chunks + [current] if current else chunks


def batch_views(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Uninitialized tensors of ``shapes``, views of one buffer: one allocation per batch and
    step, laid out the same way every step (so the kernels' offset tables stay cached)."""
    sizes = [math.prod(shape) for shape in shapes]
    buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
    return [chunk.view(shape) for chunk, shape in zip(buffer.split(sizes), shapes)]


class GaLoreAdamW(MemzooOptimizer):
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

    family = "galore"
    _layout_keys = ("rank", "proj_type", "projector", "state_dtype", "optim_bits", "min_8bit_size")
    _rebuilt_units = (("proj_seed", "proj_left", "proj_right", "proj_indices"),)
    # Signs of the computed singular vectors: galore-torch keeps torch.linalg.svd's.
    _signs: ClassVar[str] = "raw"

    _CACHES = {
        # param → (settings tuple, Projector): built once, not on every step.
        "_projectors": dict,
        # id(state dict) → (step tensor, its value after this step, its version after this step)
        "_step_ints": dict,
    }
    _projectors: dict[torch.Tensor, tuple[tuple, Projector]]
    _step_ints: dict[int, tuple[torch.Tensor, int, int]]

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
        if not isinstance(no_deprecation_warning, bool):
            raise TypeError(f"Invalid no_deprecation_warning: expected a bool, got {no_deprecation_warning!r}")
        check_int("seed", seed, low=0, high=2**31)
        self.seed = seed
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projector=projector, power_iters=power_iters, oversample=oversample,
                        strict_rank=strict_rank, state_dtype=state_dtype, optim_bits=optim_bits,
                        min_8bit_size=min_8bit_size, maximize=maximize)
        defaults.update(self._extra_defaults())
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)

    def _extra_defaults(self) -> dict[str, Any]:
        """Group defaults a subclass adds to GaLore's."""
        return {}

    # -- validation and state layout ------------------------------------------------------
    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        for flag in ("correct_bias", "maximize"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"Invalid {flag}: expected a bool, got {group[flag]!r}")
        if group["optim_bits"] not in (8, 32) or isinstance(group["optim_bits"], bool):
            raise ValueError(f"Invalid optim_bits: {group['optim_bits']!r} (expected 32 or 8)")
        check_int("min_8bit_size", group["min_8bit_size"], low=1)
        resolve_state_dtype("state_dtype", group["state_dtype"], _STATE_DTYPES)
        if group["rank"] is not None:
            settings = ProjectorSettings.from_group(group)
            for index, param in enumerate(group["params"]):
                if param.dim() >= 2:
                    try:
                        Projector(settings, param.shape)
                    except ValueError as exc:
                        raise ValueError(f"param {index}: {exc}") from None

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        if self._projector(param, group) is not None:
            return whole_matrix_problem(type(self).__name__)
        if group["optim_bits"] == 8:
            return "8-bit moments (optim_bits=8) are not supported for DTensor parameters; use optim_bits=32"
        return None

    def _projector(self, param: torch.Tensor, group: Mapping[str, Any], key: tuple | None = None) -> Projector | None:
        """The param's projector (None when not projected), rebuilt when the group's settings
        change; ``key`` is :meth:`_settings_key` of the group, when the caller has it."""
        if group["rank"] is None or param.dim() < 2 or param.numel() == 0:  # an empty matrix has no subspace
            return None
        key = self._settings_key(group) if key is None else key
        cached = self._projectors.get(param)
        if cached is None or cached[0] != key:
            settings = ProjectorSettings.from_group(group, signs=self._signs)
            cached = self._projectors[param] = (key, Projector(settings, param.shape))
        return cached[1]

    @staticmethod
    def _settings_key(group: Mapping[str, Any]) -> tuple | None:
        """What the group's projectors depend on (None for a group that projects nothing)."""
        if group["rank"] is None:
            return None
        return tuple(group[name] for name in ProjectorSettings.GROUP_KEYS)

    def _state_dtype(self, param: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        return resolve_state_dtype("state_dtype", group["state_dtype"], _STATE_DTYPES) or param.dtype

    @staticmethod
    def _moment_shape(param: torch.Tensor, projector: Projector | None) -> torch.Size:
        return torch.Size(projector.low_rank_shape) if projector else param.shape

    def _quantized(self, shape: torch.Size, group: Mapping[str, Any]) -> bool:
        return group["optim_bits"] == 8 and shape.numel() >= group["min_8bit_size"]

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        projector = self._projector(param, group)
        shape = self._moment_shape(param, projector)
        spec: StateSpec = {"step": (torch.Size(()), torch.int64)}
        for name in _MOMENTS:
            if self._quantized(shape, group):
                spec[name] = (shape, torch.uint8)
                spec[f"{name}_absmax"] = (QuantizedMoment.absmax_shape(shape.numel()), torch.float32)
            else:
                spec[name] = (shape, self._state_dtype(param, group))
        if projector:
            spec.update(projector.state_spec(param.dtype))
        return spec

    # -- step -----------------------------------------------------------------------------
    def _init_state(self, param: torch.Tensor, group: Mapping[str, Any], state: dict[str, Any], shape: torch.Size,
                    quantized: bool) -> None:
        state["step"] = torch.tensor(0, dtype=torch.int64)
        for name, moment in _MOMENTS.items():
            if quantized:
                state[name], state[f"{name}_absmax"] = moment.zeros(shape, param.device)
            else:
                state[name] = zeros_state(param, shape, self._state_dtype(param, group))

    def _step_count(self, state: dict[str, Any]) -> int:
        """The step count before this step, as an int. Reading a tensor costs a few µs per
        parameter per step, so the int is memoized next to the tensor it was read from (a loaded
        state_dict brings new tensors, and is read afresh)."""
        tensor = state["step"]
        cached = self._step_ints.get(id(state))
        if cached is not None and cached[0] is tensor and cached[2] == tensor._version:
            count = cached[1]
        else:
            count = int(tensor)
        # _foreach_add_ bumps the tensor's version once this step; expect that.
        self._step_ints[id(state)] = (tensor, count + 1, tensor._version + 1)
        return count

    @staticmethod
    def _moments(state: dict[str, Any], quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments to update: the state tensors, or fp32 decodings of 8-bit ones."""
        if quantized:
            return tuple(moment.decode(state[name], state[f"{name}_absmax"]) for name, moment in _MOMENTS.items())
        return state["exp_avg"], state["exp_avg_sq"]

    @staticmethod
    def _store_moments(state: dict[str, Any], moments: tuple[torch.Tensor, torch.Tensor]) -> None:
        for (name, moment), value in zip(_MOMENTS.items(), moments):
            moment.encode_(state[name], state[f"{name}_absmax"], value)

    def _randn(self, seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Philox normals for the projectors (sketches, random factors) from this optimizer's
        backend: the same stream either way, one kernel instead of dozens of passes on GPUs."""
        return resolve_backend(self.backend, offsets.device, "random").philox_randn(seed, offsets)

    @staticmethod
    def _step_size(group: Mapping[str, Any], step: int) -> float:
        """η_t = lr·√(1−β2^t)/(1−β1^t) for the step about to be taken (t = step + 1)."""
        if not group["correct_bias"]:
            return group["lr"]
        beta1, beta2 = group["betas"]
        t = step + 1
        return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None).

        Projected weights are updated one by one (projection, Adam, back-projection); all other
        parameters of a group go through one multi-tensor AdamW call per (device, step count).
        """
        loss = self._run_closure(closure)
        if not self._check_grads():  # skip_nonfinite: nothing is modified this step
            return loss
        # Plan every group, then refresh every projector due (all-or-nothing), then write: an
        # error while planning or refreshing (bad input, out of memory) modifies nothing.
        index = 0
        plans = []
        refreshes: list[RefreshRequest] = []
        # States created or reconciled while planning, installed only once every refresh succeeded.
        staged: list[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]] = []
        notes: list[str] = []
        for group_index, group in enumerate(self._numeric_groups()):
            # (device, step) → params, grads, m, v, and the 8-bit states to encode afterwards
            dense: dict[tuple[torch.device, int], tuple[list, list, list, list, list]] = {}
            projected: list[tuple[torch.Tensor, Projector, dict[str, Any], int, bool]] = []
            refreshed: list[tuple[dict[str, Any], bool]] = []
            step_counts: list[torch.Tensor] = []
            settings_key = self._settings_key(group)
            for param_index, param in enumerate(group["params"]):
                index += 1
                if param.grad is None:
                    continue
                projector = self._projector(param, group, settings_key)
                shape = self._moment_shape(param, projector)
                quantized = self._quantized(shape, group)
                stored = self.state.get(param)
                state = self._reconciled_state(param, group, stored, (group_index, param_index), notes)
                if not state:
                    self._init_state(param, group, state, shape, quantized)
                if state is not stored:
                    staged.append((param, state, group))
                step = self._step_count(state)
                step_counts.append(state["step"])
                if projector is None:
                    exp_avg, exp_avg_sq = self._moments(state, quantized)
                    bucket = dense.setdefault((param.device, step), ([], [], [], [], []))
                    for out, item in zip(bucket, (param, param.grad, exp_avg, exp_avg_sq)):
                        out.append(local_tensor(item))  # FSDP2: AdamW on the shards
                    if quantized:
                        bucket[4].append((state, (exp_avg, exp_avg_sq)))
                    continue
                if projector.due(state, step):
                    # Maximizing f is minimizing −f: the subspace is computed from −G too.
                    grad = param.grad.reshape(projector.shape)
                    source = -grad if group["maximize"] else grad
                    refreshes.append(RefreshRequest(projector, state, source, step, self.seed + index - 1, param.dtype))
                    refreshed.append((state, quantized))
                projected.append((param, projector, state, step, quantized))
            plans.append((group, dense, projected, refreshed, step_counts))
        # All projectors due this step at once: same-shaped matrices share batched calls.
        refresh_writes = compute_refreshes(refreshes, randn=self._randn)
        del refreshes
        with deferred_interrupts():  # the writes: an interrupt lands before or after them, not between
            self._install_states(staged, notes)
            for state, name, value in refresh_writes:
                state[name] = value
            self._write(plans)
        return loss

    def _write(self, plans: list[tuple]) -> None:
        """The writes of a planned step: refresh hooks, step counters, projected and dense updates."""
        for group, dense, projected, refreshed, step_counts in plans:
            beta1, beta2 = group["betas"]
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"])
            for state, quantized in refreshed:
                self._on_refresh(group, state, quantized)
            if step_counts:  # a group whose parameters have no gradient (frozen, unused) is left as it is
                torch._foreach_add_(step_counts, 1)  # one call for the group's step counters
            if self._preconditions:
                for item in projected:
                    self._update_projected(group, [item], hyper)
            else:  # one batched call per (device, step, shape): same-shaped matrices share launches
                batches: dict[tuple, list] = {}
                for item in projected:
                    batches.setdefault((item[0].device, item[3], item[0].shape, item[0].dtype), []).append(item)
                for items in batches.values():
                    for chunk in _chunks(items):
                        self._update_projected(group, chunk, hyper)
            for (device, step), (params, grads, exp_avgs, exp_avg_sqs, to_encode) in dense.items():
                self._update_dense(group, device, step, (params, grads, exp_avgs, exp_avg_sqs), hyper)
                for state, moments in to_encode:
                    self._store_moments(state, moments)

    def _update_dense(self, group: Mapping[str, Any], device: torch.device, step: int, lists: tuple[list, ...],
                      hyper: dict[str, float]) -> None:
        """AdamW on the parameters that are not projected (params, grads, m, v lists) that share
        device and step count: GaLore's convention (HF Adam, decay after)."""
        self._kernels(device).adamw_update_(
            *lists, step_size=self._step_size(group, step), lr=group["lr"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], **hyper)

    def _on_refresh(self, group: Mapping[str, Any], state: dict[str, Any], quantized: bool) -> None:
        """Called for each weight whose subspace is recomputed this step, before its update.
        GaLore keeps the moments (the official behaviour)."""

    # Whether _precondition transforms each projected gradient (Natural GaLore): the projection
    # then runs matrix by matrix, its Adam on the preconditioned low-rank gradient.
    _preconditions = False

    def _update_projected(self, group: Mapping[str, Any], items: list, hyper: dict[str, float]) -> None:
        """Adam in the subspace and the update of the weights for projected params that share
        device and step count: (param, projector, state, step, quantized) each."""
        param, _, _, step, _ = items[0]
        kernels = self._kernels(param.device)
        params, grads, exp_avgs, exp_avg_sqs, updates, lefts, rights = [], [], [], [], [], [], []
        # The low-rank updates N of the batch.
        update_views = batch_views([item[1].low_rank_shape for item in items], compute_dtype(param.dtype), param.device)
        for (param, projector, state, _, quantized), update in zip(items, update_views):
            grad = param.grad.reshape(projector.shape)
            exp_avg, exp_avg_sq = self._moments(state, quantized)
            left, right = projector.factors(state, param.device, param.dtype, randn=self._randn)
            preconditioned = self._precondition(kernels, state, group, grad, left, right)
            if preconditioned is not None:  # Adam on the already projected (and preconditioned) gradient
                kernels.galore_adam_project_(preconditioned, exp_avg, exp_avg_sq, update, lefts=None, rights=None,
                                             **hyper)
            for out, value in zip((params, grads, exp_avgs, exp_avg_sqs, updates, lefts, rights),
                                  (param, grad, exp_avg, exp_avg_sq, update, left, right)):
                out.append(value)
        if not self._preconditions:
            kernels.galore_adam_project_(grads, exp_avgs, exp_avg_sqs, updates, lefts=lefts, rights=rights,
                                         maximize=group["maximize"], **hyper)
        for (_, _, state, _, quantized), exp_avg, exp_avg_sq in zip(items, exp_avgs, exp_avg_sqs):
            if quantized:
                self._store_moments(state, (exp_avg, exp_avg_sq))
        kernels.galore_apply_(params, updates, lefts=lefts, rights=rights, step_size=self._step_size(group, step),
                              scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"])

    def _precondition(self, kernels: Any, state: dict[str, Any], group: Mapping[str, Any], grad: torch.Tensor,
                      left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor | None:
        """Hook between projection and Adam: None keeps GaLore's update; a tensor of the
        low-rank shape replaces the projected gradient (sign of ``maximize`` already applied)."""
        return None


# The official SubSpaceAdamW's group values of proj_type: (our proj_type, natural preconditioning).
_OFFICIAL_NATURAL_PROJ_TYPES = {"natural_galore": ("full", True), "galore": ("full", False)}


class NaturalGaLore(GaLoreAdamW):
    r"""Natural GaLore (Das 2024): GaLore whose low-rank gradient is preconditioned by the
    inverse empirical Fisher of its recent history before Adam; a drop-in for the official
    ``natural_galore.SubSpaceAdamW``.

    Each step the projected gradient g (flattened, d elements) joins a history of the last
    ``natural_history`` projected gradients H (k×d, the current one included; kept across
    projector refreshes, as the official code does), and Adam receives

    .. math:: \tilde g = (\lambda I + H^\top H)^{-1} g
              = \lambda^{-1} g - \lambda^{-2} H^\top (I + \lambda^{-1} H H^\top)^{-1} H g

    computed through Woodbury's identity with a k×k Cholesky solve (no d×d matrix).

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

    _signs: ClassVar[str] = "canonical"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, natural_history: int = 20, amsgrad: bool = False, *,
                 capturable: bool = False, differentiable: bool = False, correct_bias: bool = True,
                 damping: float = 1e-3, natural: bool = True, proj_type: str = "full", projector: str = "svd",
                 **kwargs: Any) -> None:
        if amsgrad is not False:
            raise ValueError(f"amsgrad={amsgrad!r} is not implemented (the official SubSpaceAdamW's amsgrad "
                             "does not change its update either); leave it False")
        official = self._translate_group({"proj_type": proj_type})  # the official values of proj_type
        proj_type, natural = official["proj_type"], official.get("natural", natural)
        self._natural_defaults = dict(natural_history=natural_history, damping=damping, natural=natural)
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, proj_type=proj_type, projector=projector,
                         capturable=capturable, differentiable=differentiable, **kwargs)

    _preconditions = True
    _layout_keys = (*GaLoreAdamW._layout_keys, "natural_history", "natural")
    _rebuilt_units = (*GaLoreAdamW._rebuilt_units, ("nat_history", "nat_count"))

    def _extra_defaults(self) -> dict[str, Any]:
        return self._natural_defaults

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

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        super()._validate_group(group, group_index)
        # It sizes a (history × r²) state tensor and a k×k solve per step (the official 20).
        check_int("natural_history", group["natural_history"], low=1, high=2**16)
        check_number("damping", group["damping"])
        if group["damping"] <= 0:
            raise ValueError(f"Invalid damping: {group['damping']} (must be > 0)")
        if not isinstance(group["natural"], bool):
            raise TypeError(f"Invalid natural: expected a bool, got {group['natural']!r}")

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        spec = super()._state_spec(param, group)
        projector = self._projector(param, group)
        if projector and group["natural"]:
            size = math.prod(projector.low_rank_shape)
            spec["nat_history"] = (torch.Size((group["natural_history"], size)), self._state_dtype(param, group))
            spec["nat_count"] = (torch.Size(()), torch.int64)
        return spec

    def _precondition(self, kernels: Any, state: dict[str, Any], group: Mapping[str, Any], grad: torch.Tensor,
                      left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
        dtype = compute_dtype(grad.dtype)
        low_rank = kernels.project(grad.to(dtype), None if left is None else left.to(dtype),
                                   None if right is None else right.to(dtype))
        if group["maximize"]:
            low_rank = -low_rank
        if not group["natural"]:  # the official proj_type="galore": GaLore on the same factors
            return low_rank
        if "nat_history" not in state:
            state["nat_history"] = torch.zeros((group["natural_history"], low_rank.numel()),
                                               dtype=self._state_dtype(grad, group),
                                               device=grad.device)
            state["nat_count"] = torch.tensor(0, dtype=torch.int64)
        history, count = state["nat_history"], int(state["nat_count"])
        # A ring buffer: H·Hᵀ does not depend on the order of the rows.
        history[count % history.shape[0]] = low_rank.reshape(-1)
        state["nat_count"] += 1
        rows = history[: min(count + 1, history.shape[0])]
        return kernels.natural_gradient(low_rank, rows, damping=group["damping"])

