"""One record per memzoo optimizer (:class:`OptimizerInfo`); every other table of names derives
from these records: ``create_optimizer``'s names and defaults (:mod:`memzoo.optim.factory`),
``memzoo-bench``'s settings and default lists (:mod:`memzoo.bench.train`, :mod:`memzoo.bench.memory`,
``memzoo-bench step``'s paper groups), and the shared tests (closures, state_dict round-trips, bad
input, backend equivalence, state accounting), which iterate over :data:`OPTIMIZERS`.

How to add a record: append an ``OptimizerInfo`` to :data:`OPTIMIZERS` below with

- ``name`` (its ``create_optimizer`` name), ``cls``, a one-line ``summary`` (what
  ``list_optimizers`` shows), ``sample_kwargs`` that make a test step visible, and
  ``expected_state_bytes`` (the paper's state count, checked against the optimizer's real state);
- for a low-rank method: ``target_key`` (the group key that turns projection on, ``"rank"`` or
  ``"density"``), ``default_rank`` (its value on ``create_optimizer``'s target matrices) and,
  where the paper trains at several widths, ``paper_ranks``; ``bench_groups`` for
  ``memzoo-bench step``;
- ``train`` (a :class:`Setting`: ``memzoo-bench train`` / ``memory``) or ``zo`` (a
  :class:`ZOSetting`: ``memzoo-bench zo``) so that the benchmark runs it (by default, as
  ``bench_defaults`` says);
- ``fixed_kwargs`` / ``aliases``: keywords ``create_optimizer`` fixes under the record's name, and
  further names for the same class with fixed keywords (``galore_adamw_8bit``);
  ``named_params`` if the class reads parameter names (Adam-mini);
- test metadata: ``variants``, ``bad_inputs``, ``backends``, ``param_dtypes``,
  ``trajectory_atol`` (``backend_trajectory_atol``), ``requires_closure``, ``position_seeded``, ``zeroth_order``, ``shards``.

Nothing else needs editing: the factory, the benchmark and the contract tests pick the record up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memzoo.optim.adam_mini import AdamMini
from memzoo.optim.apollo import APOLLO
from memzoo.optim.base import MemzooOptimizer
from memzoo.optim.cosmos import COSMOS
from memzoo.optim.frugal import FRUGAL
from memzoo.optim.fira import FiraAdamW
from memzoo.optim.galore import GaLoreAdafactor, GaLoreAdamW, NaturalGaLore
from memzoo.optim.lion import Lion
from memzoo.optim.zeroth_order import QZO, MeZO, SparseMeZO
from memzoo.reference.adam_mini import partition as adam_mini_partition
from memzoo.reference.common import compute_dtype
from memzoo.reference.projector import SEEDED_METHODS, side_length

__all__ = ["GALORE_PAPER_RANKS", "OPTIMIZERS", "TORCH_ADAMW", "BadInput", "FactoryName",
           "OptimizerInfo", "Setting", "ZOSetting", "factory_names", "get_optimizer_info", "rank_for_width"]


@dataclass(frozen=True)
class BadInput:
    """Constructor keyword arguments that must raise ``error`` with a message matching ``match``."""

    description: str
    kwargs: Mapping[str, Any]
    error: type[Exception]
    match: str


# The repr of these two is part of a stored benchmark run's identity (memzoo.bench.train.RunStore):
# a changed setting is a new run, never a reused one.
@dataclass(frozen=True)
class Setting:
    """How ``memzoo-bench train`` (and ``memory``) runs an optimizer: the centre of its lr sweep
    and its other keywords; ``rank_by_width``: the rank of the model's width
    (:func:`rank_for_width`); ``refreshes``: takes ``update_proj_gap`` (periodically refreshed
    subspaces)."""

    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    rank_by_width: bool = False
    refreshes: bool = False


@dataclass(frozen=True)
class ZOSetting:
    """How ``memzoo-bench zo`` fine-tunes with an optimizer: its (centre) lr on the tiny preset
    and its other keywords."""

    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FactoryName:
    """A name :func:`memzoo.optim.create_optimizer` takes: the class of its record built with
    ``fixed`` keywords; ``train`` / ``zo``: the benchmark's settings (None: the command does not
    run it); ``bench_defaults``: the ``memzoo-bench`` commands that run it without being asked
    (None: ``train`` and ``memory`` when it has a train setting, ``zo`` when it has a zo one)."""

    name: str
    summary: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    train: Setting | None = None
    zo: ZOSetting | None = None
    bench_defaults: tuple[str, ...] | None = None

    def runs_by_default(self, command: str) -> bool:
        """Whether ``memzoo-bench COMMAND`` (train, memory, zo) runs this name by default."""
        if self.bench_defaults is not None:
            return command in self.bench_defaults
        return self.zo is not None if command == "zo" else self.train is not None


def rank_for_width(paper_ranks: Mapping[int, int], hidden: int) -> int:
    """The paper's rank for a model of width ``hidden``; a quarter of the width (GaLore's 60M and
    1B ratio) at widths the paper did not train."""
    return paper_ranks.get(hidden, max(1, hidden // 4))


# GaLore's C4 pretraining ranks by model width (60M: 128; 130M, 350M: 256; 1B: 1024); APOLLO's
# scripts train at the same ranks (60M: 128, 350M: 256).
GALORE_PAPER_RANKS: Mapping[int, int] = {512: 128, 768: 256, 1024: 256, 2048: 1024}


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type[MemzooOptimizer]
    summary: str
    # Arguments that make a test step do something visible (non-zero decay, non-default betas).
    sample_kwargs: Mapping[str, Any]
    # Analytic bytes of state once every parameter with a gradient has been stepped.
    expected_state_bytes: Callable[[MemzooOptimizer], int]
    backends: tuple[str, ...] = ("torch", "triton")
    param_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # Variants worth testing on their own (e.g. a state dtype): extra kwargs merged into sample_kwargs.
    variants: tuple[Mapping[str, Any], ...] = ({},)
    bad_inputs: tuple[BadInput, ...] = field(default_factory=tuple)
    requires_closure: bool = False
    # Per-weight random streams are seeded with ``seed`` + the weight's position in the optimizer.
    position_seeded: bool = False
    # Param groups for memzoo-bench step on a preset, from (name, parameter) pairs.
    bench_groups: Callable[[list[tuple[str, torch.nn.Parameter]]], list[dict[str, Any]]] | None = None
    # Absolute difference allowed between the backends' parameters after the trajectory test's
    # steps, on top of the dtype's rounding (COSMOS: bf16 Newton–Schulz rounded in another order).
    trajectory_atol: float = 0.0
    # A backend's own allowance where its roundings differ in kind (see trajectory_tolerance).
    backend_trajectory_atol: Mapping[str, float] = field(default_factory=dict)
    # Steps from closures of forward passes only (gradients unused): the gradient-based contract
    # tests skip it; tests/test_zeroth_order.py holds its own.
    zeroth_order: bool = False
    # Steps FSDP2 / tensor-parallel (DTensor) parameters on their shards; False: refuses them at
    # construction with the fix (DDP), which tests/test_distributed.py checks instead.
    shards: bool = True
    # The test file of its FSDP2 steps when they are not per-element on unnamed parameters (so not
    # bit for bit the whole-tensor step: Adam-mini adds g² sums over the ranks); None: the shared
    # tests of tests/test_distributed.py hold it.
    shards_tested_in: str | None = None
    # Also steps its projected (low-rank) weights on FSDP2 row shards (tests/test_fsdp_lowrank.py);
    # False: a sharded weight it would project is refused with the fix, its other parameters shard.
    projected_shards: bool = False
    # The group key that turns a group's projection on ("rank", "density"; None: not a low-rank
    # method) and its value on create_optimizer's target matrices when the caller gives none.
    target_key: str | None = None
    default_rank: float | None = None
    # The ranks the paper trains at, by model width (memzoo-bench's paper groups and train runs).
    paper_ranks: Mapping[int, int] = field(default_factory=dict)
    # memzoo-bench settings of the record's own name (see FactoryName).
    train: Setting | None = None
    zo: ZOSetting | None = None
    bench_defaults: tuple[str, ...] | None = None
    # Reads parameter names (Adam-mini's partition): create_optimizer gives its groups (name,
    # tensor) pairs, and the class's settings_from_model(model) fills keywords the caller left
    # out (hidden size, heads).
    named_params: bool = False
    # Keywords create_optimizer fixes under the record's own name (APOLLO-Mini's scale), and
    # further create_optimizer names for the same class with their own fixed keywords.
    fixed_kwargs: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[FactoryName, ...] = ()

    def factory_names(self) -> tuple[FactoryName, ...]:
        """The create_optimizer names of this record: its own, then its aliases."""
        own = FactoryName(self.name, self.summary, self.fixed_kwargs, self.train, self.zo, self.bench_defaults)
        return (own, *self.aliases)

    def trajectory_tolerance(self, *backends: str) -> float:
        """The trajectory allowance between runs on ``backends`` (the largest of theirs):
        ``backend_trajectory_atol`` where a backend has one, else ``trajectory_atol``."""
        return max(self.backend_trajectory_atol.get(backend, self.trajectory_atol) for backend in backends)

    def rank_for_width(self, hidden: int) -> int:
        """The rank for a model of width ``hidden`` (:func:`rank_for_width` of ``paper_ranks``)."""
        return rank_for_width(self.paper_ranks, hidden)


def _stepped(optimizer: MemzooOptimizer):
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state and optimizer.state[param]:
                yield param, group


def _lion_state_bytes(optimizer: Lion) -> int:
    return sum(p.numel() * optimizer._momentum_dtype(p, g).itemsize for p, g in _stepped(optimizer))


def _moment_bytes(optimizer: GaLoreAdamW, numel: int, param: torch.Tensor, group: Mapping[str, Any]) -> int:
    """Two Adam moments of ``numel`` values: 8-bit blockwise (1 byte + 4 per 256-value block)
    at and above min_8bit_size when optim_bits = 8, else the state dtype."""
    if group.get("optim_bits", 32) == 8 and numel >= group["min_8bit_size"]:
        return 2 * (numel + 4 * -(-numel // 256))
    return 2 * numel * optimizer._state_dtype(param, group).itemsize


def _galore_state_bytes(optimizer: GaLoreAdamW) -> int:
    """GaLore's count (Zhao et al. 2024; the state galore-torch keeps): per projected m×n weight
    with proj_type "std", Adam moments of the projected gradient, max(m,n)·r values each, and the
    projection factor, r·min(m,n) values (none when it is regenerated from its seed); plain AdamW
    moments elsewhere; int64 step and seed scalars."""
    total = 0
    for param, group in _stepped(optimizer):
        total += 8  # step
        if optimizer._projector(param, group) is None:  # not projected (vectors, empty matrices)
            total += _moment_bytes(optimizer, param.numel(), param, group)
            continue
        m, n = param.shape[0], param[0].numel()
        r = min(group["rank"], m, n)
        if group["proj_type"] != "std":
            raise NotImplementedError("the analytic count here covers proj_type='std'")
        total += _moment_bytes(optimizer, max(m, n) * r, param, group) + 8  # moments + proj_seed
        if group["projector"] not in SEEDED_METHODS:
            total += r * min(m, n) * param.element_size()
    return total


def _natural_galore_state_bytes(optimizer: NaturalGaLore) -> int:
    """Natural GaLore's two-sided (Tucker) projection as the official SubSpaceAdamW keeps it: per
    projected m×n weight, the factors U₁ (m×r) and U₂ (n×r), Adam moments of the r×r projected
    gradient (2r²), a history of s = natural_history projected gradients (s·r² values); plain
    AdamW elsewhere; int64 step, seed and history-count scalars."""
    total = 0
    for param, group in _stepped(optimizer):
        moment_size = optimizer._state_dtype(param, group).itemsize
        total += 8  # step
        if optimizer._projector(param, group) is None:  # not projected (vectors, empty matrices)
            total += 2 * param.numel() * moment_size
            continue
        if group["proj_type"] != "full" or group["projector"] in SEEDED_METHODS:
            raise NotImplementedError("the analytic count here covers proj_type='full' with stored factors")
        m, n = param.shape[0], param[0].numel()
        r = min(group["rank"], m, n)
        history = group["natural_history"] if group["natural"] else 0  # natural=False: no history, no count
        total += (m + n) * r * param.element_size() + (2 + history) * r * r * moment_size + (16 if history else 8)
    return total


def _apollo_state_bytes(optimizer: APOLLO) -> int:
    """APOLLO's state (Zhu et al. 2025; apollo-torch's) with the random projection regenerated
    from its seed instead of stored: GaLore's count (moments max(m,n)·r, int64 step and seed, a
    stored factor only for proj="svd"/"randomized") plus the norm-growth limiter's fp32 norm of
    the last update per projected weight unless disable_nl."""
    limited = sum(1 for param, group in _stepped(optimizer)
                  if optimizer._projector(param, group) is not None and not group["disable_nl"])
    return _galore_state_bytes(optimizer) + 4 * limited


def _fira_state_bytes(optimizer: FiraAdamW) -> int:
    """GaLore's count (moments max(m,n)·r each, the factor r·min(m,n), int64 step and seed) plus
    the limiter's fp32 norm per projected weight; plain AdamW moments elsewhere."""
    projected = sum(1 for param, group in _stepped(optimizer) if optimizer._projector(param, group) is not None)
    return _galore_state_bytes(optimizer) + 4 * projected


def _galore_adafactor_state_bytes(optimizer: GaLoreAdafactor) -> int:
    """galore-torch's GaLoreAdafactor state (transformers' Adafactor in the subspace): per
    projected m×n weight (R of shape a×b: m×r for "std" when m ≥ n) a row EMA a + column EMA b
    (+ a·b with β1), the factor r·min(m,n), int64 step and seed; elsewhere plain Adafactor: rows + columns over the last two dimensions of a
    ≥2-D tensor, the whole tensor for a vector (+ the tensor with β1). Moments in float32 (float64
    for float64 weights) unless state_dtype is set."""
    total = 0
    for param, group in _stepped(optimizer):
        size = (compute_dtype(param.dtype) if group["state_dtype"] is None
                else optimizer._state_dtype(param, group)).itemsize
        projector = optimizer._projector(param, group)
        shape = tuple(projector.low_rank_shape) if projector is not None else tuple(param.shape)
        total += 8  # step
        if len(shape) >= 2:
            total += size * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        else:
            total += size * math.prod(shape)
        if group["beta1"] is not None:
            total += size * math.prod(shape)
        if projector is not None:
            m, n = projector.shape
            total += 8  # proj_seed
            if group["projector"] not in SEEDED_METHODS:
                total += projector.rank * (n if projector.side == "right" else m) * param.element_size()
    return total


def _adam_mini_state_bytes(optimizer: AdamMini) -> int:
    """Adam's m (the parameter's shape and dtype), one float32 v per block (float64 for float64
    parameters) and the int64 step, per parameter."""
    total = 0
    for param, group in _stepped(optimizer):
        names = group.get("param_names") or [None] * len(group["params"])
        name = next(n for p, n in zip(group["params"], names) if p is param)
        blocks = adam_mini_partition(name, param.shape, dim=group["dim"], n_heads=group["n_heads"],
                                     block_names=group["block_names"]).blocks
        total += param.numel() * param.element_size() + blocks * (8 if param.dtype == torch.float64 else 4) + 8
    return total


def _no_state_bytes(optimizer: MemzooOptimizer) -> int:
    return 0


def _sparse_mezo_state_bytes(optimizer: SparseMeZO) -> int:
    """One fp32 threshold per tensor and one mask bit per element, each tensor's bits padded to
    whole 1024-element chunks (the stream's layout)."""
    params = [p for p, _ in _stepped(optimizer)]
    return 4 * len(params) + sum(-(-p.numel() // 1024) * 128 for p in params)


def _cosmos_state_bytes(optimizer: COSMOS) -> int:
    """Eligible m×n weights: M (m×n) and V (m×r) in the weight's dtype, U (n×r) and S (r×r) in
    fp32 (fp64 for fp64 weights), the step; others: AdamW's two moments and the step."""
    total = 0
    for param, group in _stepped(optimizer):
        size = param.element_size()
        rank = optimizer._rank(param, group)
        if rank is None:
            total += 8 + 2 * size * param.numel()
            continue
        m, n = param.shape
        factor = 8 if param.dtype == torch.float64 else 4
        total += 8 + size * (m * n + m * rank) + factor * (n * rank + rank * rank)
    return total


def _frugal_state_bytes(optimizer: FRUGAL) -> int:
    """FRUGAL's state (Zmushko et al. 2024; the official code's projection optimizers): per
    projected m×n weight, Adam moments of the r-dimensional state-full subspace (r = round(ρ·n)
    columns, or ρ·m rows; ⌊ρ·n⌋ for coordinates, as its RandK), a stored basis for
    svd/randomized (r values per row or column of the side) or the r int64 indices for
    coordinates, int64 step, adam_step and seed; torch-AdamW moments elsewhere (the state-free
    signSGD part keeps nothing)."""
    total = 0
    for param, group in _stepped(optimizer):
        total += 8  # step
        projector = optimizer._projector(param, group)
        if projector is None:
            total += 2 * param.numel() * optimizer._state_dtype(param, group).itemsize
            continue
        m, n = projector.shape
        size = side_length(projector.shape, projector.side)
        r = projector.rank
        total += 2 * (m * n // size) * r * optimizer._state_dtype(param, group).itemsize + 16  # moments, seed, adam_step
        method = projector.settings.projector
        total += 8 * r if method == "coordinates" else 0 if method in SEEDED_METHODS else r * size * param.element_size()
    return total


def _galore_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # The paper's setting: attention and MLP matrices projected at the paper's rank for the
    # width, scale 0.25, gap 200; embeddings, head and norms in plain AdamW. proj_type is left to
    # the optimizer's default.
    def is_projected(name: str, param: torch.nn.Parameter) -> bool:
        return ("attn" in name or "mlp" in name) and param.dim() == 2

    hidden = next(p.shape[0] for name, p in named if name.endswith("input_layernorm"))
    rank = rank_for_width(GALORE_PAPER_RANKS, hidden)
    return [{"params": [p for n, p in named if is_projected(n, p)], "rank": rank, "update_proj_gap": 200,
             "scale": 0.25},
            {"params": [p for n, p in named if not is_projected(n, p)]}]


def _apollo_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # APOLLO's README setting: GaLore's target matrices at the paper's rank, channel scaling,
    # scale 1, random projection, gap 200; the rest in AdamW.
    projected, rest = _galore_bench_groups(named)
    return [{**projected, "scale": 1.0, "scale_type": "channel", "proj": "random"}, rest]


def _apollo_mini_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # APOLLO-Mini's: rank 1 (its record's default), tensor-wise scaling, scale 128, gap 200.
    projected, rest = _galore_bench_groups(named)
    return [{**projected, "rank": OPTIMIZERS["apollo_mini"].default_rank, "scale": 128.0, "scale_type": "tensor", "proj": "random"}, rest]


def _fira_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # Fira's scripts: GaLore's target matrices and ranks, α = 0.25, gap 200; the rest in AdamW.
    return _galore_bench_groups(named)


def _galore_adafactor_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # GaLore's groups with Adafactor inside (the scripts' setting: a given lr, no relative step
    # and no parameter scale, set by the bench's lr); the rest in plain Adafactor.
    return _galore_bench_groups(named)


def _frugal_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # FRUGAL's README setting on GaLore's target matrices: density 0.25, gap 200, signSGD for the
    # rest, RandK columns (the official GLUE runs' projection); the other parameters in AdamW.
    projected, rest = _galore_bench_groups(named)
    projected = {key: value for key, value in projected.items() if key not in ("rank", "scale")}
    return [{**projected, "density": 0.25, "projector": "coordinates"}, rest]


def _adam_mini_bench_groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    # The official partition needs the names, the hidden size and the heads (LLaMA's head_dim 64).
    hidden = next(p.shape[0] for name, p in named if name.endswith("input_layernorm"))
    return [{"params": list(named), "dim": hidden, "n_heads": max(1, hidden // 64)}]


# The papers' LLaMA settings for memzoo-bench train: GaLore's scale 0.25 at the width's rank.
_GALORE_TRAIN = Setting(1e-2, {"scale": 0.25}, rank_by_width=True, refreshes=True)

_COMMON_BAD_INPUTS = (
    BadInput("negative lr", {"lr": -1e-3}, ValueError, "Invalid lr"),
    BadInput("NaN lr", {"lr": float("nan")}, ValueError, "Invalid lr"),
    BadInput("lr given as a string", {"lr": "0.1"}, TypeError, "Invalid lr"),
    BadInput("negative weight decay", {"weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    BadInput("unknown backend", {"backend": "cuda"}, ValueError, "Invalid backend"),
    BadInput("infinite lr", {"lr": math.inf}, ValueError, "Invalid lr: inf"),
    BadInput("lr beyond the float range", {"lr": 10**400}, ValueError, "Invalid lr: an int of 1329 bits"),
    BadInput("int lr beyond 64 bits", {"lr": 2**64}, ValueError, "Invalid lr: .*fit in 64 bits"),
    BadInput("infinite weight decay", {"weight_decay": math.inf}, ValueError, "Invalid weight_decay: inf"),
)

OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo(
            name="lion",
            cls=Lion,
            summary="Lion (Chen et al. 2023): sign of interpolated momentum, 1 state element per parameter",
            sample_kwargs={"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1},
            train=Setting(2e-4),  # the paper: 3–10× below AdamW's
            expected_state_bytes=_lion_state_bytes,
            variants=({}, {"momentum_dtype": torch.float32}, {"momentum_dtype": torch.bfloat16}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("beta1 = 1", {"betas": (1.0, 0.99)}, ValueError, "beta parameter at index 0"),
                BadInput("negative beta2", {"betas": (0.9, -0.1)}, ValueError, "beta parameter at index 1"),
                BadInput("three betas", {"betas": (0.9, 0.99, 0.999)}, ValueError, "Invalid betas"),
                BadInput("integer momentum dtype", {"momentum_dtype": torch.int8}, ValueError, "momentum_dtype"),
            ),
        ),
        OptimizerInfo(
            name="galore_adamw",
            projected_shards=True,
            cls=GaLoreAdamW,
            summary="GaLore (Zhao et al. 2024): AdamW in a refreshed rank-r gradient subspace",
            sample_kwargs={"lr": 0.1, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2, "scale": 0.5},
            expected_state_bytes=_galore_state_bytes,
            variants=({}, {"projector": "svd"}, {"projector": "random"}, {"state_dtype": torch.float32},
                      {"optim_bits": 8, "min_8bit_size": 1}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("rank 0", {"rank": 0}, ValueError, "Invalid rank"),
                BadInput("16-bit optim_bits", {"optim_bits": 16}, ValueError, "optim_bits"),
                BadInput("rank above min(m, n) with strict_rank", {"rank": 6, "strict_rank": True}, ValueError,
                         "exceeds min"),
                BadInput("update_proj_gap 0", {"update_proj_gap": 0}, ValueError, "update_proj_gap"),
                BadInput("unknown proj_type", {"proj_type": "diagonal"}, ValueError, "proj_type"),
                BadInput("unknown projector", {"projector": "qr"}, ValueError, "projector"),
                BadInput("eps below zero", {"eps": -1e-8}, ValueError, "Invalid eps"),
                BadInput("beta2 = 1", {"betas": (0.9, 1.0)}, ValueError, "beta parameter at index 1"),
                BadInput("int8 state", {"state_dtype": torch.int8}, ValueError, "state_dtype"),
                BadInput("infinite eps", {"eps": math.inf}, ValueError, "Invalid eps: inf"),
                BadInput("infinite scale", {"scale": math.inf}, ValueError, "Invalid scale: inf"),
                BadInput("power_iters that never ends", {"power_iters": 2**70}, ValueError, "Invalid power_iters"),
                BadInput("rank beyond 64 bits", {"rank": 2**64}, ValueError, "Invalid rank"),
                BadInput("update_proj_gap beyond 64 bits", {"update_proj_gap": 2**63}, ValueError,
                         "Invalid update_proj_gap"),
            ),
            position_seeded=True,
            bench_groups=_galore_bench_groups,
            target_key="rank",
            default_rank=128,
            paper_ranks=GALORE_PAPER_RANKS,
            train=_GALORE_TRAIN,
            # Not in train's default list: its loss is GaLore's; memory shows what 8 bits save.
            aliases=(FactoryName("galore_adamw_8bit", "GaLore with 8-bit (bitsandbytes blockwise) moments",
                                 fixed={"optim_bits": 8}, train=_GALORE_TRAIN, bench_defaults=("memory",)),),
        ),
        OptimizerInfo(
            name="natural_galore",
            projected_shards=True,
            cls=NaturalGaLore,
            summary="Natural GaLore (Das 2024): GaLore with a Woodbury natural-gradient preconditioner",
            sample_kwargs={"lr": 0.1, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2, "scale": 0.5,
                           "natural_history": 3},
            expected_state_bytes=_natural_galore_state_bytes,
            variants=({}, {"projector": "randomized"}, {"state_dtype": torch.float32}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("rank 0", {"rank": 0}, ValueError, "Invalid rank"),
                BadInput("online subspace", {"proj_type": "online_natural_galore"}, ValueError, "not implemented"),
                BadInput("amsgrad", {"amsgrad": True}, ValueError, "not implemented"),
                BadInput("history 0", {"natural_history": 0}, ValueError, "natural_history"),
                BadInput("zero damping", {"damping": 0.0}, ValueError, "damping"),
                BadInput("infinite damping", {"damping": math.inf}, ValueError, "Invalid damping: inf"),
                BadInput("history of 2**70 gradients", {"natural_history": 2**70}, ValueError, "natural_history"),
            ),
            position_seeded=True,
            bench_groups=_galore_bench_groups,
            target_key="rank",
            default_rank=128,
            paper_ranks=GALORE_PAPER_RANKS,  # its C4 scripts: 60M r=128, 130M/350M r=256, 1B r=1024
            train=_GALORE_TRAIN,
        ),
        OptimizerInfo(
            name="apollo",
            projected_shards=True,
            cls=APOLLO,
            summary="APOLLO (Zhu et al. 2025): channel-wise AdamW scaling estimated in a random rank-r space",
            sample_kwargs={"lr": 0.1, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2, "scale": 4.0},
            expected_state_bytes=_apollo_state_bytes,
            variants=({}, {"proj": "svd"}, {"scale_type": "tensor", "scale_front": True}, {"disable_nl": True},
                      {"state_dtype": torch.float32}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("rank 0", {"rank": 0}, ValueError, "Invalid rank"),
                BadInput("two-sided projection", {"proj_type": "full"}, ValueError, "projects one side"),
                BadInput("unknown scale_type", {"scale_type": "row"}, ValueError, "scale_type"),
                BadInput("unknown proj", {"proj": "qr"}, ValueError, "Invalid proj"),
                BadInput("growth limit below 1", {"growth_limit": 0.5}, ValueError, "growth_limit"),
                BadInput("disable_nl not a bool", {"disable_nl": "yes"}, TypeError, "disable_nl"),
                BadInput("infinite growth limit", {"growth_limit": math.inf}, ValueError, "Invalid growth_limit: inf"),
                BadInput("infinite scale", {"scale": math.inf}, ValueError, "Invalid scale: inf"),
            ),
            position_seeded=True,
            bench_groups=_apollo_bench_groups,
            target_key="rank",
            default_rank=256,  # the README's (1B, 7B)
            paper_ranks=GALORE_PAPER_RANKS,  # its scripts: 60M r=128, 350M r=256
            train=Setting(1e-2, {"scale": 1.0}, rank_by_width=True, refreshes=True),
        ),
        OptimizerInfo(
            name="apollo_mini",
            projected_shards=True,
            cls=APOLLO,
            summary="APOLLO-Mini: rank 1, one tensor-wise scaling factor (SGD-like memory)",
            sample_kwargs={"lr": 0.1, "weight_decay": 0.1, "rank": 1, "update_proj_gap": 2, "scale": 128.0,
                           "scale_type": "tensor"},
            expected_state_bytes=_apollo_state_bytes,
            bad_inputs=_COMMON_BAD_INPUTS,
            position_seeded=True,
            bench_groups=_apollo_mini_bench_groups,
            target_key="rank",
            default_rank=1,
            train=Setting(1e-2, refreshes=True),  # rank 1, scale 128 (the factory's)
            fixed_kwargs={"scale": 128.0, "scale_type": "tensor"},
        ),
        OptimizerInfo(
            name="fira",
            cls=FiraAdamW,
            summary="Fira (Chen et al. 2024): GaLore plus the residual gradient, scaled per channel and norm-limited",
            sample_kwargs={"lr": 0.1, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2, "scale": 0.5},
            expected_state_bytes=_fira_state_bytes,
            # No Triton kernels: "torch" is the fast path (backend="triton" raises).
            backends=("torch",),
            # The exact SVD is held to the official package in tests/test_fira.py.
            variants=({}, {"optim_bits": 8, "min_8bit_size": 1}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("rank 0", {"rank": 0}, ValueError, "Invalid rank"),
                BadInput("two-sided projection", {"proj_type": "full"}, ValueError, "projects one side"),
                BadInput("non-orthonormal projection", {"projector": "random"}, ValueError, "orthonormal"),
                BadInput("growth limit below 1", {"growth_limit": 0.5}, ValueError, "growth_limit"),
                BadInput("beta2 = 1", {"betas": (0.9, 1.0)}, ValueError, "beta parameter at index 1"),
                BadInput("Triton requested", {"backend": "triton"}, ValueError, "no Triton kernels"),
            ),
            position_seeded=True,
            projected_shards=True,
            bench_groups=_fira_bench_groups,
            target_key="rank",
            default_rank=128,
            paper_ranks=GALORE_PAPER_RANKS,  # Fira's scripts: GaLore's
            train=_GALORE_TRAIN,
            bench_defaults=(),
        ),
        OptimizerInfo(
            name="galore_adafactor",
            cls=GaLoreAdafactor,
            summary="GaLore with Adafactor (galore-torch's GaLoreAdafactor): factored second moment in the subspace",
            sample_kwargs={"lr": 0.1, "relative_step": False, "weight_decay": 0.1, "rank": 2, "update_proj_gap": 2,
                           "scale": 0.5},
            expected_state_bytes=_galore_adafactor_state_bytes,
            # Its Triton backend runs the torch path's functions (no kernel of its own).
            backends=("torch",),
            # The exact SVD, the relative step (lr=None, galore-torch's default) and β1 are held to
            # galore-torch in tests/test_galore_adafactor.py (the shared tests set group lrs and
            # expect lr = 0 to freeze the weights, which β1's momentum of lr-scaled updates does
            # not, officially).
            variants=({},),
            bad_inputs=_COMMON_BAD_INPUTS + (
                # (The constructor's own checks, lr with relative_step and warmup_init without it, which
                # galore-torch does not apply to groups: tests/test_galore_adafactor.py.)
                BadInput("no lr without relative_step", {"lr": None}, ValueError, "needs relative_step"),
                BadInput("one eps", {"eps": 1e-30}, TypeError, "Invalid eps"),
                BadInput("zero clip_threshold", {"clip_threshold": 0.0}, ValueError, "clip_threshold"),
                BadInput("positive decay_rate", {"decay_rate": 0.8}, ValueError, "decay_rate"),
                BadInput("beta1 = 1", {"beta1": 1.0}, ValueError, "beta1"),
                BadInput("rank 0", {"rank": 0}, ValueError, "Invalid rank"),
            ),
            position_seeded=True,
            # Adafactor's whole-tensor means, clipping and relative step reduce over the row shards
            # (its dense branch too: tests/test_fsdp_lowrank.py bounds it, not bit for bit).
            projected_shards=True,
            bench_groups=_galore_adafactor_bench_groups,
            target_key="rank",
            default_rank=128,
            paper_ranks=GALORE_PAPER_RANKS,
            # GaLore's Adafactor runs: a given lr, no relative step or parameter scale.
            train=Setting(1e-2, {"scale": 0.25, "relative_step": False, "scale_parameter": False}, rank_by_width=True,
                          refreshes=True),
            bench_defaults=(),
        ),
        OptimizerInfo(
            name="frugal",
            projected_shards=True,
            cls=FRUGAL,
            summary="FRUGAL (Zmushko et al. 2024): Adam in a subspace, signSGD on the rest",
            sample_kwargs={"lr": 0.05, "weight_decay": 0.1, "density": 0.5, "update_proj_gap": 2},
            expected_state_bytes=_frugal_state_bytes,
            variants=({}, {"projector": "coordinates"}, {"projector": "randomized", "reset_statistics": False},
                      {"density": 0.0}, {"inactive_update_rule": "sgd", "inactive_lr_scale": 0.1},
                      {"state_dtype": torch.float32}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("density above 1", {"density": 1.5}, ValueError, "density"),
                BadInput("negative density", {"density": -0.1}, ValueError, "density"),
                BadInput("two-sided projection", {"proj_type": "full"}, ValueError, "projects one side"),
                BadInput("unknown inactive rule", {"inactive_update_rule": "same"}, ValueError, "inactive_update_rule"),
                BadInput("unknown projector", {"projector": "qr"}, ValueError, "projector"),
                BadInput("reset_statistics not a bool", {"reset_statistics": 1}, TypeError, "reset_statistics"),
                BadInput("infinite inactive_lr_scale", {"inactive_lr_scale": math.inf}, ValueError,
                         "Invalid inactive_lr_scale: inf"),
            ),
            position_seeded=True,
            bench_groups=_frugal_bench_groups,
            target_key="density",
            default_rank=0.25,  # a density: the README's
            train=Setting(1e-3, refreshes=True),  # density 0.25
        ),
        OptimizerInfo(
            name="cosmos",
            cls=COSMOS,
            summary="COSMOS (Liu et al. 2025): SOAP in the leading eigensubspace, Muon on the complement",
            sample_kwargs={"lr": 0.05, "weight_decay": 0.1, "rank": 2, "betas": (0.9, 0.95), "lr_ratio": 0.5},
            expected_state_bytes=_cosmos_state_bytes,
            projected_shards=True,
            # The Newton–Schulz kernel rounds op by op as the reference (bit-identical in the
            # interpreter), but its fp32 accumulation order is not cuBLAS's: on a GPU a product may
            # round to the neighbouring bf16 value, ≈ 0.4% of one element of one step (RMS lr·ρ =
            # 0.025 here). A sign or scale error moves parameters by ≥ 0.05 per step.
            trajectory_atol=2e-3,
            # The torch backend's Newton–Schulz is Muon's association X ← a·X + (b·A + c·A²)·X
            # (A = X·Xᵀ, each product rounded once; the reference rounds op by op): the same
            # polynomial, about twice as close to the float64 iteration in bf16
            # (tests/test_cosmos.py), but a different rounding. The test's 7×5 weight at rank 2
            # leaves a residual with 2 null directions (rank ≤ 3 of 5 rows; the 4×6 one has them
            # too when its gradient's rank is 2): a rounding there of order u = 2⁻⁸ grows by the
            # quintic's slope a ≈ 3.44 per iteration, a⁵·u ≈ 1.9, into an O(1) singular value whose
            # direction depends on the rounding (the official bf16 code has it as well). Two valid
            # roundings then disagree by |ΔO_ij| ≲ 0.5 in O (‖O‖_F ≈ √5), and a step moves an
            # element by lr·ρ·γ·mn/(‖D‖·‖O‖)·|ΔO_ij| ≈ 0.025·0.2·35/(3.9·2.2)·0.5 ≈ 0.01
            # (‖D‖ ≈ √(‖A‖² + γ²mn), ‖A‖ ≈ √(mr)); independent over the 5 steps: ≈ √5·0.01 ≈ 0.022,
            # and 0.035 with margin (measured: ≤ 0.026 over the six torch cases). A wrong sign
            # (≥ 0.3), γ×2 (≥ 0.048) or the Muon part dropped (≥ 0.074) still fail it
            # (tests/test_optimizers.py::test_cosmos_torch_trajectory_tolerance_catches_wrong_updates).
            backend_trajectory_atol={"torch": 0.035},
            # Rank 0 (pure Muon) has its own float64 reduction test (tests/test_cosmos.py).
            variants=({}, {"rank": None}, {"ns_dtype": torch.float32, "gamma": 0.5}),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("negative rank", {"rank": -1}, ValueError, "Invalid rank"),
                BadInput("beta2 = 1", {"betas": (0.9, 1.0)}, ValueError, "beta parameter at index 1"),
                BadInput("negative gamma", {"gamma": -0.2}, ValueError, "gamma"),
                BadInput("negative lr_ratio", {"lr_ratio": -1.0}, ValueError, "lr_ratio"),
                BadInput("max_rows 0", {"max_rows": 0}, ValueError, "max_rows"),
                BadInput("fp16 Newton–Schulz", {"ns_dtype": torch.float16}, ValueError, "ns_dtype"),
                BadInput("infinite gamma", {"gamma": math.inf}, ValueError, "Invalid gamma: inf"),
                BadInput("infinite eps", {"eps": math.inf}, ValueError, "Invalid eps: inf"),
                BadInput("rank beyond 64 bits", {"rank": 2**64}, ValueError, "Invalid rank"),
            ),
            # The official default rank on every matrix (COSMOS's own default too).
            bench_groups=lambda named: [{"params": [p for _, p in named], "rank": OPTIMIZERS["cosmos"].default_rank}],
            target_key="rank",
            default_rank=64,
            train=Setting(1e-3, rank_by_width=True),  # tracks its subspace every step
        ),
        OptimizerInfo(
            name="adam_mini",
            cls=AdamMini,
            summary="Adam-mini (Zhang et al. 2024): Adam with one second moment per block (head, neuron, tensor)",
            sample_kwargs={"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1},
            expected_state_bytes=_adam_mini_state_bytes,
            # No Triton kernels: "torch" is the fast path (backend="triton" raises, tests/test_adam_mini.py).
            backends=("torch",),
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("beta2 = 1", {"betas": (0.9, 1.0)}, ValueError, "beta parameter at index 1"),
                BadInput("negative eps", {"eps": -1e-8}, ValueError, "Invalid eps"),
                BadInput("dim 0", {"dim": 0}, ValueError, "Invalid dim"),
                BadInput("n_heads 0", {"n_heads": 0}, ValueError, "Invalid n_heads"),
                BadInput("n_kv_heads not dividing n_heads", {"n_heads": 4, "n_kv_heads": 3}, ValueError,
                         "does not divide n_heads"),
                BadInput("Triton requested", {"backend": "triton"}, ValueError, "no Triton kernels"),
                BadInput("block_names of an unknown rule", {"block_names": {"neuron": ["fc"]}}, ValueError,
                         "Invalid block_names"),
            ),
            bench_groups=_adam_mini_bench_groups,
            shards=True,
            shards_tested_in="tests/test_fsdp_adam_mini.py",
            named_params=True,
            train=Setting(1e-3),  # the paper: AdamW's lr; dim and heads from the model's config
            bench_defaults=("memory",),
        ),
        OptimizerInfo(
            name="mezo",
            cls=MeZO,
            summary="MeZO (Malladi et al. 2023): zeroth-order SGD from two forward passes, inference memory",
            sample_kwargs={"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-3},
            expected_state_bytes=_no_state_bytes,
            bad_inputs=_COMMON_BAD_INPUTS,
            requires_closure=True,
            zeroth_order=True,
            zo=ZOSetting(1e-5, {"eps": 1e-3}),
        ),
        OptimizerInfo(
            name="sparse_mezo",
            cls=SparseMeZO,
            summary="Sparse-MeZO (Liu et al. 2024): MeZO on the small-magnitude weights of each layer",
            sample_kwargs={"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-3, "sparsity": 0.5},
            expected_state_bytes=_sparse_mezo_state_bytes,
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("sparsity above 1", {"sparsity": 1.5}, ValueError, "sparsity"),
                BadInput("negative sparsity", {"sparsity": -0.5}, ValueError, "sparsity"),
            ),
            requires_closure=True,
            zeroth_order=True,
            # Fewer coordinates move, so the estimate's variance is lower and a larger step is stable.
            zo=ZOSetting(1e-4, {"eps": 1e-3, "sparsity": 0.75}),
        ),
        OptimizerInfo(
            name="qzo",
            cls=QZO,
            summary="QZO (Shang et al. 2025): zeroth-order fine-tuning of a 4-bit model through its scales",
            # The shared tests step plain parameters: as QZO's non-scale groups (MeZO with DDC); the
            # scales themselves are tested on bitsandbytes layers in tests/test_zeroth_order.py.
            sample_kwargs={"lr": 1e-3, "eps": 1e-3, "scales": False},
            expected_state_bytes=_no_state_bytes,
            bad_inputs=_COMMON_BAD_INPUTS + (
                BadInput("scales flag not a bool", {"scales": "yes"}, TypeError, "scales"),
            ),
            requires_closure=True,
            zeroth_order=True,
            zo=ZOSetting(1e-4, {"eps": 1e-3}),
        ),
    )
}


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The record for ``name`` (case-insensitive); a ValueError lists the valid names."""
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}") from None



# torch's AdamW: no record (it is not a memzoo optimizer), but a create_optimizer name (a
# passthrough with the same param groups) and the benchmark's baseline.
TORCH_ADAMW = FactoryName("adamw", "torch.optim.AdamW (passthrough, with the same param groups)",
                          train=Setting(1e-3), zo=ZOSetting(3e-4), bench_defaults=("zo",))


def factory_names() -> Iterator[tuple[FactoryName, OptimizerInfo | None]]:
    """Every create_optimizer name with its record (None for ``adamw``), in list_optimizers' order."""
    yield TORCH_ADAMW, None
    for info in OPTIMIZERS.values():
        for name in info.factory_names():
            yield name, info
