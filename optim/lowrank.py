"""The low-rank engine: one optimizer that GaLore, Natural GaLore, APOLLO / APOLLO-Mini and
FRUGAL (and any further gradient-projection method) are settings of.

A low-rank method is two things composed, not a subclass of another method:

- a **projector setting**: which weights are projected and how (``rank`` or ``density``, side,
  method, refresh gap; :class:`memzoo.optim.projector.ProjectorSettings`), and
- a **rule** (:class:`LowRankRule`): the update inside the subspace and what it does with the
  residual, the state it keeps (declared once, in :meth:`LowRankRule.state`: the same
  declaration creates the state, sizes ``state_bytes`` and checks a loaded checkpoint), and the
  kernel functions it calls (:attr:`LowRankRule.kernels`, provided by every backend module of
  its family: ``memzoo.reference.<family>``, ``memzoo.triton_kernels.torch_backend.<family>``,
  ``memzoo.triton_kernels.<family>``).

:class:`LowRankOptimizer` owns everything else, once: param groups and their validation,
planning a step, the all-or-nothing projector refresh (every due projector of the step computed
by batched decompositions before anything is written), batching by (device, step, shape) so
that same-shaped weights share one kernel launch per stage, the plain-AdamW branch for
parameters that are not projected, step counters, 8-bit moments, checkpoints and group edits.
The optimizer classes users construct (``GaLoreAdamW``, ``APOLLO``, …) are a constructor with
the official signature plus ``rule = TheirRule()``; "Adding an optimizer" in docs/ says what to
write for a new one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch

from memzoo.optim.base import (
    Backend,
    MemzooOptimizer,
    StateSpec,
    check_bool,
    check_betas,
    check_int,
    check_lr,
    check_number,
    deferred_interrupts,
    is_dtensor,
    local_tensor,
    resolve_backend,
    resolve_state_dtype,
    whole_matrix_problem,
    zeros_state,
)
from memzoo.optim.projector import Projector, ProjectorSettings, RefreshRequest, compute_refreshes
from memzoo.optim.quantized_state import BLOCK_SIZE, MIN_8BIT_SIZE, QuantizedMoment
from memzoo.optim.sharded import RowShard, lay_out_row_state, row_shard, sharding_problem
from memzoo.reference.common import compute_dtype, hf_adam_step_size
from memzoo.reference.common import torch_adam_form as reference_torch_adam_form
from memzoo.reference.projector import SEEDED_METHODS, project, random_basis

__all__ = ["ADAM_MOMENTS", "LowRankOptimizer", "LowRankRule", "WeightStep", "adam_step_size", "batch_views",
           "local_low_rank_shape", "steps_row_shards", "torch_adam_form"]

# Adam's two moments and how each is stored in 8 bits (signed m, unsigned v).
ADAM_MOMENTS: Mapping[str, QuantizedMoment] = {"exp_avg": QuantizedMoment(signed=True),
                                               "exp_avg_sq": QuantizedMoment(signed=False)}

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

# Group keys every low-rank optimizer has, with their defaults (a rule adds its own). The
# projector's keys are here even for a rule that sizes its subspace otherwise (FRUGAL's
# density), so every low-rank optimizer's param groups and checkpoints have one layout.
COMMON_DEFAULTS: Mapping[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, rank=None, update_proj_gap=200,
    scale=1.0, proj_type="std", projector="randomized", power_iters=2, oversample=8, strict_rank=False,
    state_dtype=None, optim_bits=32, min_8bit_size=MIN_8BIT_SIZE, maximize=False,
)

# The torch backend's Philox twin: seeded factors it regenerates are kept between refreshes.
_TORCH_RANDOM = "memzoo.triton_kernels.torch_backend.random"

# A batched call's low-rank updates (fp32, alive until the weights are updated) are kept under
# this size: the transient memory of a step, not the whole model's worth of updates at once.
_BATCH_UPDATE_BYTES = 64 * 2**20


def adam_step_size(lr: float, betas: tuple[float, float], step: int, correct_bias: bool = True) -> float:
    """Adam's step size in the official GaLore convention (transformers' AdamW, ε added to √v) for
    the step about to be taken, t = ``step`` + 1 (the engine's counters before the increment):
    :func:`memzoo.reference.common.hf_adam_step_size`."""
    return hf_adam_step_size(lr, betas, correct_bias, step + 1)


def torch_adam_form(lr: float, betas: tuple[float, float], eps: float, step: int,
                    correct_bias: bool = True) -> tuple[float, float]:
    """torch.optim.Adam's step t = ``step`` + 1 in the convention above, (step size, ε·√bc2):
    :func:`memzoo.reference.common.torch_adam_form`."""
    return reference_torch_adam_form(lr, betas, eps, correct_bias, step + 1)


def batch_views(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Uninitialized tensors of ``shapes``, views of one buffer: one allocation per batch and
    step, laid out the same way every step (so the kernels' offset tables stay cached)."""
    sizes = [math.prod(shape) for shape in shapes]
    buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
    return [chunk.view(shape) for chunk, shape in zip(buffer.split(sizes), shapes)]


class WeightStep(NamedTuple):
    """One parameter's part of a step, as the engine hands it to a rule."""

    param: torch.Tensor
    # None for a parameter that is not projected (the dense branch).
    projector: Projector | None
    state: dict[str, Any]
    # The step count before this step.
    step: int
    # Whether the moments are stored in 8 bits.
    quantized: bool
    # For an FSDP2 row-sharded weight: the rows this rank holds (see memzoo.optim.sharded). Its
    # param, grad and row-sharded state are DTensors; rules work on their local tensors.
    shard: RowShard | None = None

    @property
    def reduces(self) -> bool:
        """Whether the projected gradient is a sum over row shards (a sharded weight with a left
        factor: R = Σ_k P_kᵀ·G_k·Qᵀ), replicated once reduced; else it is local rows, or whole."""
        return self.shard is not None and self.projector is not None and self.projector.side != "right"


class LowRankRule:
    """What a low-rank method adds to the engine. Subclasses set the class attributes and
    override the methods their method needs; the defaults are GaLore's (projected by ``rank``,
    Adam moments, the official GaLore convention for the dense branch).

    A rule holds no per-optimizer data: one instance serves every optimizer of its class.
    """

    # The kernel family (module name under memzoo.reference / triton_kernels[.torch_backend]).
    family: ClassVar[str]
    # Group keys the rule adds to COMMON_DEFAULTS, with their defaults.
    defaults: ClassVar[Mapping[str, Any]] = {}
    # The kernel functions the rule calls by name: every backend module of ``family`` provides
    # them with the reference's signature (tests/test_lowrank.py checks it).
    kernels: ClassVar[tuple[str, ...]] = ("galore_adam_project_", "galore_apply_", "adamw_update_")
    # Group keys (beyond the common ones) that the shapes and dtypes of its state depend on.
    layout_keys: ClassVar[tuple[str, ...]] = ()
    # Sets of its state keys that the step rebuilds itself when absent (see MemzooOptimizer).
    rebuilt_units: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # State keys declared by :meth:`state` that the rule creates itself at their first use
    # (APOLLO's limiter norm: its first step only records), not zero-filled by the engine.
    deferred: ClassVar[tuple[str, ...]] = ()
    # Moments in the state that may be stored in 8 bits, with their codec.
    moments: ClassVar[Mapping[str, QuantizedMoment]] = ADAM_MOMENTS
    # Signs of computed singular vectors ("raw": torch.linalg.svd's; "canonical": tensorly's).
    signs: ClassVar[str] = "raw"
    # Whether same-shaped projected weights are updated by one batched call (False: one by one).
    batched: ClassVar[bool] = True
    # Keys of COMMON_DEFAULTS the rule does not read (an inner rule that is not Adam: Adafactor
    # has no betas): left out of its param groups, so a group never shows a setting with no effect.
    unused_keys: ClassVar[tuple[str, ...]] = ()
    # Whether a group's lr may be None (Adafactor's relative step computes its own).
    lr_optional: ClassVar[bool] = False
    # Whether :meth:`update_dense` reduces over the rows of FSDP2 row-sharded parameters
    # (Adafactor's factored means and RMS): their items then carry the RowShard, and DTensor
    # parameters outside FSDP2's row sharding are refused; False: per-element math on any shard.
    dense_row_shards: ClassVar[bool] = False

    def check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        """Raise ValueError/TypeError for an invalid value of the inner update's hyperparameters;
        the default checks Adam's (lr, betas, eps, correct_bias)."""
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_number("eps", group["eps"])
        check_bool("correct_bias", group["correct_bias"])

    def validate(self, group: Mapping[str, Any]) -> None:
        """Raise ValueError/TypeError for an invalid value of one of the rule's group keys."""

    def check_settings(self, group: Mapping[str, Any]) -> None:
        """Validate the group's projector settings (whether or not it holds a matrix)."""
        if group["rank"] is not None:
            ProjectorSettings.from_group(group, signs=self.signs)

    def settings(self, shape: torch.Size, group: Mapping[str, Any]) -> ProjectorSettings | None:
        """The projector of a weight of ``shape`` in ``group`` (None: the dense branch). GaLore's:
        the group's ``rank`` for every non-empty weight with ≥ 2 dimensions."""
        if group["rank"] is None or len(shape) < 2 or math.prod(shape) == 0:
            return None
        return ProjectorSettings.from_group(group, signs=self.signs)

    def settings_key(self, group: Mapping[str, Any]) -> tuple | None:
        """What :meth:`settings` depends on in the group (projectors are rebuilt when it changes)."""
        if group["rank"] is None:
            return None
        return tuple(group[name] for name in ProjectorSettings.GROUP_KEYS)

    def moment_shapes(self, shape: torch.Size, projected: bool, group: Mapping[str, Any]) -> dict[str, torch.Size]:
        """The moments kept for a gradient (projected or not) of ``shape``: Adam's m and v."""
        return {name: shape for name in self.moments}

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        """State beyond the step counter, the moments and the projector's (e.g. a limiter's norm)."""
        return {}

    def sharded_problem(self, projector: Projector, group: Mapping[str, Any]) -> str | None:
        """Why this rule cannot update a weight of an FSDP2 row shard with ``projector`` (None
        when its :meth:`update` is marked :func:`steps_row_shards`; a subclass that overrides
        ``update`` must mark its own). A rule whose update does: on
        ``item.shard`` its param, grad and row-sharded moments are DTensors (use their local
        tensors, :meth:`LowRankOptimizer.local_grad`), :meth:`LowRankOptimizer.factors` gives the
        local rows of a left factor and the whole right one, and a gradient with
        :attr:`WeightStep.reduces` is projected by :meth:`LowRankOptimizer.reduced_projections`
        (everything it computes from the replicated R is replicated); norms over a whole row-sharded
        tensor must be all-reduced (``item.shard.all_reduce_``)."""
        if getattr(type(self).update, "steps_row_shards", False):
            return None
        return f"{type(self).__name__}.update has no sharded path (it needs each projected weight whole)"

    def dense_sharded_problem(self, group: Mapping[str, Any]) -> str | None:
        """Why :meth:`update_dense` cannot step the local shard of a DTensor parameter (None: its
        math is per element, as AdamW's, or :attr:`dense_row_shards`)."""
        return None

    def row_sharded_state(self, name: str, projector: Projector | None, shape: torch.Size) -> bool:
        """Whether state ``name`` (of ``shape``) of an FSDP2 row-sharded parameter follows its rows
        (dim 0 indexes the weight's rows: a DTensor sharded like the weight, each rank its rows);
        the rest is replicated. Default: the moments of a right projection (m×r); a parameter that
        is not projected keeps :func:`zeros_state`'s layout (state of its shape sharded like it)."""
        return projector is not None and projector.side == "right" and name in self.moments

    def on_refresh(self, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Called for each weight whose subspace is recomputed this step, before its update;
        GaLore keeps the moments (the official behaviour)."""

    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Update projected weights that share device, step count and shape (one weight when
        not :attr:`batched`)."""
        raise NotImplementedError

    def update_dense(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        """Update parameters that are not projected and share device and step count: AdamW in
        the official GaLore convention (HF Adam, ε added to √v, decay after the update)."""
        engine.adamw_dense(group, items, step_size=adam_step_size(group["lr"], group["betas"], items[0].step,
                                                                   group["correct_bias"]),
                           eps=group["eps"], decay_first=False)


class LowRankOptimizer(MemzooOptimizer):
    """The engine (see the module docstring). A subclass sets ``rule`` and writes a constructor
    that passes its defaults to :meth:`__init__`; it adds nothing to the step."""

    rule: ClassVar[LowRankRule]

    _CACHES = {
        # param → (settings key, Projector): built once, not on every step.
        "_projectors": dict,
        # id(state dict) → (step tensor, its value after this step, its version after this step)
        "_step_ints": dict,
        # param → its RowShard (None: not a DTensor)
        "_shards": dict,
        # param → (key, factors): the factors of a seeded projector (APOLLO's random projection)
        # regenerated by the torch Philox twin, kept until the key (projector, seed, device,
        # dtype, rows) changes, i.e. until the next refresh (see factors()).
        "_seeded_factors": dict,
    }
    _projectors: dict[torch.Tensor, tuple[tuple, Projector | None]]
    _shards: dict[torch.Tensor, RowShard | None]
    _step_ints: dict[int, tuple[torch.Tensor, int, int]]
    _seeded_factors: dict[torch.Tensor, tuple[tuple, tuple[torch.Tensor | None, torch.Tensor | None]]]

    _COMMON_LAYOUT_KEYS = ("rank", "proj_type", "projector", "state_dtype", "optim_bits", "min_8bit_size")
    _PROJECTOR_UNIT = ("proj_seed", "proj_left", "proj_right", "proj_indices")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule" in vars(cls):
            cls.family = cls.rule.family
            cls._layout_keys = (*cls._COMMON_LAYOUT_KEYS, *cls.rule.layout_keys)
            cls._rebuilt_units = (cls._PROJECTOR_UNIT, *cls.rule.rebuilt_units)
            cls._lr_optional = cls.rule.lr_optional

    def __init__(self, params: Iterable[Any], defaults: Mapping[str, Any], *, seed: int = 0,
                 backend: Backend = "auto", skip_nonfinite: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 **options: Any) -> None:
        """``defaults``: the class's constructor arguments that are group keys; ``options``:
        further common group keys passed through by the class (``power_iters=``, …)."""
        common = {name: value for name, value in COMMON_DEFAULTS.items() if name not in self.rule.unused_keys}
        allowed = set(common) | set(self.rule.defaults)
        for name in options:
            if name not in allowed or name in defaults:
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {name!r}")
        check_int("seed", seed, low=0, high=2**31)
        self.seed = seed
        merged = {**common, **self.rule.defaults, **defaults, **options}
        super().__init__(params, merged, backend=backend, skip_nonfinite=skip_nonfinite, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    # -- validation and state layout ------------------------------------------------------
    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        self.rule.validate(group)
        self.rule.check_hyperparameters(group)
        check_number("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        if group["optim_bits"] not in (8, 32) or isinstance(group["optim_bits"], bool):
            raise ValueError(f"Invalid optim_bits: {group['optim_bits']!r} (expected 32 or 8)")
        check_int("min_8bit_size", group["min_8bit_size"], low=1)
        resolve_state_dtype("state_dtype", group["state_dtype"], STATE_DTYPES)
        self.rule.check_settings(group)
        if self.rule.settings_key(group) is not None:
            for index, param in enumerate(group["params"]):
                try:
                    settings = self.rule.settings(param.shape, group)
                    if settings is not None:
                        Projector(settings, param.shape)
                except ValueError as exc:
                    raise ValueError(f"param {index}: {exc}") from None

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        projector = self._projector(param, group)
        if projector is None:
            quantized = self._quantized(param.shape, group) and sharding_problem(param)
            if quantized:  # blocks of this rank's rows need row shards
                return (f"its 8-bit moments (optim_bits=8) are quantized in blocks of each rank's rows, and "
                        f"{quantized}; "
                        "use optim_bits=32 or min_8bit_size above its size")
            problem = self.rule.dense_sharded_problem(group)
            if problem is None and self.rule.dense_row_shards and sharding_problem(param):
                problem = (f"{sharding_problem(param)}; {type(self).__name__} reduces over the row shards of the "
                           "parameters it does not project too: use FSDP2's default Shard(0) or "
                           "DistributedDataParallel")
            return problem
        problem = sharding_problem(param) or self.rule.sharded_problem(projector, group)
        if problem:
            return f"{problem}. " + whole_matrix_problem(type(self).__name__)
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`MemzooOptimizer.load_state_dict`; then the state of projected FSDP2 weights
        is laid out as the step keeps it, whoever wrote it (one process, or
        ``torch.distributed.checkpoint`` read by
        :func:`memzoo.optim.distributed.load_optimizer_state`, which shards whatever is shaped
        like its parameter): the state that follows a weight's rows (left factors,
        :meth:`LowRankRule.row_sharded_state`: right-projected moments, and with
        :attr:`LowRankRule.dense_row_shards` the dense branch's row statistics) given whole keeps
        this rank's rows, as a DTensor sharded like the weight; a projected weight's replicated
        state given as a DTensor is gathered (a collective: every rank loads). The absmax of a
        row-sharded 8-bit moment given whole keeps this rank's row of block scales."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or not is_dtensor(param):
                    continue
                projector = self._projector(param, group)
                quantized = any(f"{name}_absmax" in state for name in self.rule.moments)
                moment_shard = self._moment_shard(param, projector) if quantized else None
                if moment_shard is not None:  # 8-bit moments' absmax given whole: this rank's row of blocks
                    rank = torch.distributed.get_rank(moment_shard.group)
                    for name in self.rule.moments:
                        absmax = state.get(f"{name}_absmax")
                        if isinstance(absmax, torch.Tensor) and not is_dtensor(absmax):
                            local = absmax[rank: rank + 1].to(param.device, copy=True)
                            state[f"{name}_absmax"] = moment_shard.distribute(local, absmax.shape)
                if projector is None and not self.rule.dense_row_shards:
                    continue  # per-element state: sharded like the parameter already
                sharded = {name for name, value in state.items() if isinstance(value, torch.Tensor) and value.dim()
                           and ((projector is not None and name == "proj_left")
                                or self.rule.row_sharded_state(name, projector, value.shape))}
                if moment_shard is not None:  # 8-bit codes and their absmax rows (laid out above)
                    sharded.update(name for moment in self.rule.moments for name in (moment, f"{moment}_absmax"))
                lay_out_row_state(state, param.device, self._shard(param), sharded)

    def _resharding_problem(self, saved: Mapping[int, Mapping[str, torch.Size]]) -> str | None:
        """8-bit moments of row-sharded weights are quantized in blocks of each rank's rows (their
        absmax has one row of block scales per rank): saved on another number of row shards they
        are re-blocked on loading (:meth:`_reshard_loaded`); codes saved by one process in blocks
        of the whole moment, or row-sharded ones loaded by one process, cannot be."""
        params = [(param, group) for group in self.param_groups for param in group["params"]]
        for index, entry in saved.items():
            param, group = params[index]
            projector = self._projector(param, group)
            for name, shape in self._rule_state(param, group, projector)[0].items():
                saved_shape = entry.get(f"{name}_absmax")
                if saved_shape is None or not self._quantized(shape, group):
                    continue
                shard = self._moment_shard(param, projector)
                expected = self._absmax_shape(shape, shard)
                if len(saved_shape) == len(expected) and (len(expected) == 1 or saved_shape[0] == expected[0]
                                                          or saved_shape == self._absmax_shape(shape, shard,
                                                                                               saved_shape[0])):
                    continue
                layout = lambda shape: (f"{shape[0]} row shards" if len(shape) == 2  # noqa: E731
                                        else "one process or a replicated moment (blocks of the whole moment)")
                return (f"param {index}'s 8-bit moments (optim_bits=8) were quantized by {layout(saved_shape)} "
                        f"and this run quantizes them by {layout(expected)}: on FSDP2 each rank quantizes its own "
                        f"rows in blocks of its own ('{name}_absmax' holds one row of block scales per rank), which "
                        "another layout cannot decode. Resume with the layout that saved it (or from per-rank "
                        "torch.save files), or train with optim_bits=32 to reshard")
        return None

    def _reshard_loaded(self, state: dict[int, dict[str, Any]]) -> None:
        """Re-block 8-bit moments of row-sharded weights that DCP read from another world size:
        the codes arrive as this rank's rows, the absmax whole, one row of block scales per old
        rank. Each of this rank's rows is decoded with the scales of the old rank that held it
        (its rows by torch.chunk of the old world, as FSDP2 shards) and encoded again in this
        rank's blocks: one more 8-bit quantization error per value (not bitwise)."""
        params = [(param, group) for group in self.param_groups for param in group["params"]]
        for index, entry in state.items():
            param, group = params[index]
            projector = self._projector(param, group)
            shard = self._moment_shard(param, projector)
            if shard is None:
                continue
            for name, shape in self._rule_state(param, group, projector)[0].items():
                absmax = entry.get(f"{name}_absmax")
                if not isinstance(absmax, torch.Tensor) or not self._quantized(shape, group) or absmax.dim() != 2:
                    continue
                if absmax.shape[0] == torch.distributed.get_world_size(shard.group):
                    continue  # the same blocks: laid out by load_state_dict, bitwise
                if is_dtensor(absmax):
                    absmax = absmax.full_tensor()
                codes = entry[name]
                rows = local_tensor(codes) if is_dtensor(codes) else codes[shard.offset: shard.offset + shard.rows]
                values = self._decoded_rows(self.rule.moments[name], rows, absmax.to(rows.device), shard, shape)
                entry[name], entry[f"{name}_absmax"] = self._quantized_rows(
                    self.rule.moments[name], values.to(param.device), shard, shape)

    @staticmethod
    def _decoded_rows(moment: QuantizedMoment, rows: torch.Tensor, absmax: torch.Tensor, shard: RowShard,
                      shape: torch.Size) -> torch.Tensor:
        """fp32 values of this rank's ``rows`` of codes of a moment of ``shape`` quantized on
        ``absmax.shape[0]`` row shards (old rank k: rows from k·⌈m/ranks⌉, its blocks counted from
        its first row): each old rank's part is decoded with its row of scales."""
        row_length = math.prod(shape[1:])
        most_rows = -(-shape[0] // absmax.shape[0])
        values = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        for old_rank in range(absmax.shape[0]):
            old_offset = min(old_rank * most_rows, shape[0])
            start = max(old_offset, shard.offset)
            end = min(old_offset + most_rows, shape[0], shard.offset + shard.rows)
            if start >= end:
                continue
            first = (start - old_offset) * row_length  # its index among the old rank's values
            lead = first % BLOCK_SIZE  # codes before it in its first block (not decoded: placeholders)
            part = rows[start - shard.offset: end - shard.offset].reshape(-1)
            padded = torch.cat([part.new_zeros(lead), part])
            decoded = moment.decode(padded, absmax[old_rank, first // BLOCK_SIZE:])
            values[start - shard.offset: end - shard.offset] = decoded[lead:].view(end - start, *shape[1:])
        return values

    def _shard(self, param: torch.Tensor) -> RowShard | None:
        """The rows of the parameter (of the matrix it is projected as: the same dim 0) this rank
        holds (None for a plain tensor)."""
        if param not in self._shards:
            self._shards[param] = row_shard(param, param.shape[0])
        return self._shards[param]

    def _moment_shard(self, param: torch.Tensor, projector: Projector | None) -> RowShard | None:
        """How the moments of a DTensor parameter are row-sharded like it (its own moments when
        not projected, those of a right projection, m×r), None when they are whole or replicated."""
        if not is_dtensor(param) or (projector is not None and projector.side != "right"):
            return None
        return self._shard(param)

    @staticmethod
    def _absmax_shape(shape: torch.Size, shard: RowShard | None, ranks: int | None = None) -> torch.Size:
        """The absmax of an 8-bit moment of ``shape``: one fp32 scale per block of 256 values of the
        flattened moment; of a row-sharded one, (ranks, blocks of the largest shard): each rank
        quantizes its own rows in blocks of its own, into its row (padded), so that no block
        spans two ranks and DCP saves every rank's scales (``ranks``: of another world size)."""
        if shard is None:
            return QuantizedMoment.absmax_shape(shape.numel())
        ranks = torch.distributed.get_world_size(shard.group) if ranks is None else ranks
        most_rows = -(-shape[0] // ranks)  # torch.chunk's sizes, as FSDP2 shards
        return torch.Size((ranks, QuantizedMoment.absmax_shape(most_rows * math.prod(shape[1:]))[0]))

    def _quantized_zeros(self, param: torch.Tensor, projector: Projector | None, name: str,
                         shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, absmax) of an 8-bit moment at zero: whole, or this rank's rows of a row-sharded
        moment and its row of scales, both DTensors sharded like the weight."""
        moment = self.rule.moments[name]
        shard = self._moment_shard(param, projector)
        if shard is None:
            return moment.zeros(shape, param.device)
        zeros = torch.zeros((shard.rows, *shape[1:]), dtype=torch.float32, device=param.device)
        return self._quantized_rows(moment, zeros, shard, shape)

    def _quantized_rows(self, moment: QuantizedMoment, values: torch.Tensor, shard: RowShard,
                        shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, absmax) of this rank's rows ``values`` of a row-sharded moment of ``shape``,
        quantized in this rank's blocks into its (padded) row of scales; DTensors sharded like the weight."""
        codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
        absmax_shape = self._absmax_shape(shape, shard)
        absmax = torch.zeros((1, absmax_shape[1]), dtype=torch.float32, device=values.device)
        moment.encode_(codes, absmax, values)
        return shard.distribute(codes, shape), shard.distribute(absmax, absmax_shape)

    def _projector(self, param: torch.Tensor, group: Mapping[str, Any], key: tuple | None = None) -> Projector | None:
        """The param's projector (None when not projected), rebuilt when the group's settings
        change; ``key`` is the rule's settings key of the group, when the caller has it."""
        key = self.rule.settings_key(group) if key is None else key
        if key is None:
            return None
        cached = self._projectors.get(param)
        if cached is None or cached[0] != key:
            settings = self.rule.settings(param.shape, group)
            cached = self._projectors[param] = (key, None if settings is None else Projector(settings, param.shape))
        return cached[1]

    def _state_dtype(self, param: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        return resolve_state_dtype("state_dtype", group["state_dtype"], STATE_DTYPES) or param.dtype

    def _quantized(self, shape: torch.Size, group: Mapping[str, Any]) -> bool:
        return group["optim_bits"] == 8 and shape.numel() >= group["min_8bit_size"]

    def _rule_state(self, param: torch.Tensor, group: Mapping[str, Any],
                    projector: Projector | None) -> tuple[dict[str, torch.Size], StateSpec, bool]:
        """The rule's declaration for this weight: moment shapes, other state, quantized or not."""
        shape = torch.Size(projector.low_rank_shape) if projector else param.shape
        moments = self.rule.moment_shapes(shape, projector is not None, group)
        quantized = self._quantized(shape, group)
        return moments, self.rule.state(shape, projector, group, self._state_dtype(param, group)), quantized

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        projector = self._projector(param, group)
        moments, extra, quantized = self._rule_state(param, group, projector)
        spec: StateSpec = {"step": (torch.Size(()), torch.int64)}
        for name, shape in moments.items():
            if quantized:
                spec[name] = (shape, torch.uint8)
                absmax_shape = self._absmax_shape(shape, self._moment_shard(param, projector))
                spec[f"{name}_absmax"] = (absmax_shape, torch.float32)
            else:
                spec[name] = (shape, self._state_dtype(param, group))
        spec.update(extra)
        if projector:
            spec.update(projector.state_spec(param.dtype))
        return spec

    def _create_state(self, param: torch.Tensor, group: Mapping[str, Any], state: dict[str, Any],
                      projector: Projector | None) -> None:
        """Fill ``state`` with what the rule declared and it lacks (all of it at a first step; a
        rebuilt unit after a group edit): zeros, the step counter at 0."""
        moments, extra, quantized = self._rule_state(param, group, projector)
        state.setdefault("step", torch.tensor(0, dtype=torch.int64))
        for name, shape in moments.items():
            if name in state:
                continue
            if quantized:
                state[name], state[f"{name}_absmax"] = self._quantized_zeros(param, projector, name, shape)
            else:
                state[name] = self._zeros(param, projector, name, shape, self._state_dtype(param, group))
        for name, (shape, dtype) in extra.items():
            if name not in state and name not in self.rule.deferred:
                # Counters live on the CPU, as torch.optim keeps "step": read without a device sync.
                counter = not dtype.is_floating_point and shape == torch.Size(())
                state[name] = torch.tensor(0, dtype=dtype) if counter else self._zeros(param, projector, name, shape,
                                                                                       dtype)

    def _zeros(self, param: torch.Tensor, projector: Projector | None, name: str, shape: torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
        """A zero state tensor ``name``: of a row-sharded weight, the state that follows its rows
        (:meth:`LowRankRule.row_sharded_state`) holds this rank's rows (a DTensor sharded like the
        weight); the rest of a projected weight's state is replicated; of any other parameter,
        :func:`zeros_state`'s."""
        if not is_dtensor(param):
            return zeros_state(param, shape, dtype)
        if len(shape) and (projector is not None or self.rule.dense_row_shards) and \
                self.rule.row_sharded_state(name, projector, torch.Size(shape)):
            shard = self._shard(param)
            return shard.distribute(torch.zeros((shard.rows, *shape[1:]), dtype=dtype, device=param.device), shape)
        if projector is None:
            return zeros_state(param, shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=param.device)

    def create_deferred(self, item: WeightStep, group: Mapping[str, Any], name: str) -> torch.Tensor:
        """Create a state tensor the rule declared as deferred, at its first use."""
        shape, dtype = self._rule_state(item.param, group, item.projector)[1][name]
        item.state[name] = value = self._zeros(item.param, item.projector, name, shape, dtype)
        return value

    # -- what rules call ------------------------------------------------------------------
    def kernels(self, device: torch.device) -> Any:
        """The family module (reference, torch or Triton) that computes the rule's math on ``device``."""
        return self._kernels(device)

    def factors(self, item: WeightStep) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weight's projection factors (left, right), stored or regenerated from the seed;
        of a row-sharded weight, the local rows of the left factor and the whole right one.

        Factors regenerated by the torch Philox twin (the ``"torch"`` backend: CPUs) are kept
        between refreshes, as the official APOLLO stores its projection: they are a function of
        (projector layout, seed, device, dtype, rows) only, and regenerating an r×n Gaussian in
        emulated 32-bit integer arithmetic on every step cost more than the rest of the step.
        The same tensors either way; the kept factors (one r×n or m×r per weight, not in the
        state_dict) are memory the reference path regenerates instead. Triton draws them in one
        kernel and the reference is left as it is: neither keeps them."""
        rows = None if item.shard is None else item.shard.index
        device = item.param.device
        if item.projector.settings.projector not in SEEDED_METHODS or not self._keeps_seeded_factors(device):
            return item.projector.factors(item.state, device, item.param.dtype, randn=self._randn, rows=rows)
        key = self._kept_key(item)
        kept = self._seeded_factors.get(item.param)
        if kept is None or kept[0] != key:
            factors = item.projector.factors(item.state, device, item.param.dtype, randn=self._randn, rows=rows)
            kept = self._seeded_factors[item.param] = (key, factors)
        return kept[1]

    def factors_of(self, items: list[WeightStep]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """:meth:`factors` of each item. The kept ``random`` factors that a refresh made stale are
        drawn for the whole batch at once: one Philox call per (layout, device, dtype, rows) with
        one stream per weight (:func:`~memzoo.reference.projector.random_basis` given a tensor of
        seeds), so a refresh step pays one draw of all its weights' normals instead of one per
        weight; each weight's factors are the ones :meth:`factors` draws alone."""
        factors: list[tuple[torch.Tensor | None, torch.Tensor | None] | None] = [None] * len(items)
        stale: dict[tuple, list[tuple[int, WeightStep, tuple]]] = {}
        for index, item in enumerate(items):
            if item.projector.settings.projector != "random" or not self._keeps_seeded_factors(item.param.device):
                factors[index] = self.factors(item)
                continue
            key = self._kept_key(item)
            kept = self._seeded_factors.get(item.param)
            if kept is not None and kept[0] == key:
                factors[index] = kept[1]
                continue
            self._seeded_factors.pop(item.param, None)  # the old factors go before the new ones come
            stale.setdefault(key[:1] + key[2:], []).append((index, item, key))
        for ((_, shape, rank, side), device, dtype, rows), batch in stale.items():
            seeds = torch.tensor([key[1] for _, _, key in batch], dtype=torch.int64)
            lefts, rights = random_basis(seeds, shape, rank, side, device, dtype, randn=self._randn, rows=rows)
            for position, (index, item, key) in enumerate(batch):
                factors[index] = (None if lefts is None else lefts[position],
                                  None if rights is None else rights[position])
                self._seeded_factors[item.param] = (key, factors[index])
        return factors  # type: ignore[return-value]

    @staticmethod
    def _kept_key(item: WeightStep) -> tuple:
        """What kept seeded factors are a function of: the projector's layout (method, shape,
        rank, side, not its other settings: a changed update_proj_gap keeps them), the seed, the
        device, the dtype and the rows."""
        projector = item.projector
        layout = (projector.settings.projector, projector.shape, projector.rank, projector.side)
        rows = None if item.shard is None else item.shard.index
        return (layout, int(item.state["proj_seed"]), item.param.device, item.param.dtype, rows)

    def _keeps_seeded_factors(self, device: torch.device) -> bool:
        """Whether seeded factors on ``device`` come from the torch Philox twin (see factors())."""
        return resolve_backend(self.backend, device, "random").__name__ == _TORCH_RANDOM

    @staticmethod
    def local_grad(item: WeightStep) -> torch.Tensor:
        """The gradient as the projector reads it: the (rows × n) matrix of this rank's rows
        (the whole m×n matrix when not sharded)."""
        grad = local_tensor(item.param.grad)
        return grad.reshape(grad.shape[0], item.projector.shape[1]) if item.projector is not None else grad

    def reduced_projections(self, items: list[WeightStep],
                            factors: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> list[torch.Tensor]:
        """R = leftᵀ·G·rightᵀ of each item with :attr:`WeightStep.reduces`, in the compute dtype,
        summed over the row shards (Σ_k P_kᵀ·G_k·Qᵀ) by one all-reduce for the batch: replicated,
        equal to the unsharded projection up to the order of the sums. Not negated for maximize
        (the kernels do that)."""
        projections = []
        for item, (left, right) in zip(items, factors):
            grad = self.local_grad(item)
            dtype = compute_dtype(grad.dtype)
            projections.append(project(grad.to(dtype), left.to(dtype), None if right is None else right.to(dtype)))
        return items[0].shard.all_reduce_many_(projections) if items else projections

    def moment_values(self, item: WeightStep) -> tuple[torch.Tensor, ...]:
        """The moments to update, in :attr:`LowRankRule.moments` order: the state tensors, or
        fp32 decodings of 8-bit ones (written back by :meth:`store_moments`; of row-sharded
        ones, this rank's rows, a plain tensor)."""
        if item.quantized:
            return tuple(moment.decode(local_tensor(item.state[name]), local_tensor(item.state[f"{name}_absmax"]))
                         for name, moment in self.rule.moments.items())
        return tuple(item.state[name] for name in self.rule.moments)

    def store_moments(self, item: WeightStep, values: tuple[torch.Tensor, ...]) -> None:
        """Encode updated decodings back into 8-bit moments (nothing for unquantized ones)."""
        if item.quantized:
            for (name, moment), value in zip(self.rule.moments.items(), values):
                moment.encode_(local_tensor(item.state[name]), local_tensor(item.state[f"{name}_absmax"]),
                               local_tensor(value))

    def adamw_dense(self, group: Mapping[str, Any], items: list[WeightStep], *, step_size: float, eps: float,
                    decay_first: bool) -> None:
        """AdamW in one multi-tensor call on not-projected parameters (local shards of FSDP2
        DTensors), in the convention the arguments give."""
        moments = [self.moment_values(item) for item in items]
        beta1, beta2 = group["betas"]
        self.kernels(items[0].param.device).adamw_update_(
            [local_tensor(item.param) for item in items], [local_tensor(item.param.grad) for item in items],
            [local_tensor(m[0]) for m in moments], [local_tensor(m[1]) for m in moments], step_size=step_size,
            beta1=beta1, beta2=beta2, eps=eps, lr=group["lr"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], decay_first=decay_first)
        for item, values in zip(items, moments):
            self.store_moments(item, values)

    def _randn(self, seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Philox normals for the projectors (sketches, random factors) from this optimizer's
        backend: the same stream either way, one kernel instead of dozens of passes on GPUs."""
        return resolve_backend(self.backend, offsets.device, "random").philox_randn(seed, offsets)

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

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None).

        Plan every group, refresh every projector due (all-or-nothing), then write: an error
        while planning or refreshing (bad input, out of memory) modifies nothing. Projected
        weights that share device, step count and shape are updated by one batched call per
        stage; all other parameters of a group by one multi-tensor call per (device, step).
        """
        loss = self._run_closure(closure)
        if not self._check_grads():  # skip_nonfinite: nothing is modified this step
            return loss
        index = 0
        plans = []
        refreshes: list[RefreshRequest] = []
        # States created or reconciled while planning, installed only once every refresh succeeded.
        staged: list[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]] = []
        notes: list[str] = []
        for group_index, group in enumerate(self._numeric_groups()):
            dense: dict[tuple[torch.device, int], list[WeightStep]] = {}
            projected: list[WeightStep] = []
            refreshed: list[dict[str, Any]] = []
            step_counts: list[torch.Tensor] = []
            settings_key = self.rule.settings_key(group)
            for param_index, param in enumerate(group["params"]):
                index += 1
                if param.grad is None:
                    continue
                projector = self._projector(param, group, settings_key)
                stored = self.state.get(param)
                state = self._reconciled_state(param, group, stored, (group_index, param_index), notes)
                if state is not stored:  # a first step's {} or a reconciled copy, not installed yet
                    self._create_state(param, group, state, projector)  # what the rule declares and it lacks
                    staged.append((param, state, group))
                step = self._step_count(state)
                step_counts.append(state["step"])
                shape = torch.Size(projector.low_rank_shape) if projector else param.shape
                item = WeightStep(param, projector, state, step, self._quantized(shape, group))
                if projector is None:
                    if self.rule.dense_row_shards and is_dtensor(param):
                        item = item._replace(shard=self._shard(param))
                    dense.setdefault((param.device, step), []).append(item)
                    continue
                shard = self._shard(param)
                if shard is not None:
                    item = item._replace(shard=shard)
                if projector.due(state, step):
                    # Maximizing f is minimizing −f: the subspace is computed from −G too.
                    grad = param.grad.reshape(projector.shape) if shard is None else self.local_grad(item)
                    source = -grad if group["maximize"] else grad
                    refreshes.append(RefreshRequest(projector, state, source, step, self.seed + index - 1, param.dtype,
                                                    shard))
                    refreshed.append(state)
                projected.append(item)
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
        rule = self.rule
        for group, dense, projected, refreshed, step_counts in plans:
            for state in refreshed:
                rule.on_refresh(group, state)
            if step_counts:  # a group whose parameters have no gradient (frozen, unused) is left as it is
                torch._foreach_add_(step_counts, 1)  # one call for the group's step counters
            if not rule.batched:
                for item in projected:
                    rule.update(self, group, [item])
            else:  # one batched call per (device, step, shape): same-shaped matrices share launches
                batches: dict[tuple, list[WeightStep]] = {}
                for item in projected:
                    shard_key = None if item.shard is None else item.shard.key
                    batches.setdefault((item.param.device, item.step, item.param.shape, item.param.dtype, shard_key),
                                       []).append(item)
                for items in batches.values():
                    for chunk in _chunks(items):
                        rule.update(self, group, chunk)
            for items in dense.values():
                rule.update_dense(self, group, items)


def steps_row_shards(update: Callable) -> Callable:
    """Mark a rule's ``update`` as handling FSDP2 row shards (:meth:`LowRankRule.sharded_problem`)."""
    update.steps_row_shards = True
    return update


def _chunks(items: list[WeightStep]) -> list[list[WeightStep]]:
    """Split a batch so each chunk's low-rank updates fit the transient budget."""
    chunks, current, size = [], [], 0
    for item in items:
        nbytes = 4 * math.prod(item.projector.low_rank_shape)
        if current and size + nbytes > _BATCH_UPDATE_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return chunks + [current] if current else chunks


def local_low_rank_shape(item: WeightStep) -> tuple[int, int]:
    """The shape of this rank's part of the weight's projected gradient: the whole (replicated)
    R, or the local rows of a row-sharded weight's right projection (m×r)."""
    rows, columns = item.projector.low_rank_shape
    return (item.shard.rows, columns) if item.shard is not None and not item.reduces else (rows, columns)


def low_rank_updates(items: list[WeightStep]) -> list[torch.Tensor]:
    """Uninitialized low-rank update buffers (compute dtype) for a batch, one allocation (of
    this rank's part, :func:`local_low_rank_shape`, for row-sharded weights)."""
    param = items[0].param
    return batch_views([local_low_rank_shape(item) for item in items], compute_dtype(param.dtype), param.device)
