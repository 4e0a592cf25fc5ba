"""Optimizer state per rank and the bytes an optimizer step communicates on FSDP2 row shards,
computed from formulas (nothing is allocated or measured): ``memzoo-bench memory --fsdp N``.

FSDP2 (``fully_shard``) splits every parameter along dim 0 in ``torch.chunk`` blocks over the
``world`` ranks: rank 0 holds the most rows, ⌈m/W⌉ of an m-row weight, and every figure here is
rank 0's. A state tensor is either *sharded* like its weight (rank 0 holds its ⌈m/W⌉ rows) or
*replicated* (every rank holds all of it: r-sized factors, moments of a left projection, scalars).

Communication is what the optimizer adds to FSDP2's own collectives, counted as the bytes one
rank sends with ring algorithms:

- an all-reduce of S bytes: 2·(W−1)/W·S;
- an all-gather in which each rank contributes s bytes: (W−1)·s;
- FSDP2's reduce-scatter of the gradients, each padded to W blocks of ⌈m/W⌉ rows, in the
  parameter dtype (no ``MixedPrecisionPolicy``): (W−1)·⌈m/W⌉·(numel/m)·itemsize per parameter.
  The optimizer's traffic is reported as a fraction of this.

Per projected m×n weight (:class:`WeightCost`), r the projector's rank, c the compute dtype's size
(4; 8 for float64 weights), w = min(r + oversample, m, n), p = power_iters. The low-rank
collectives are those of :mod:`memzoo.optim.sharded` (a right projection's state and update are
local rows; a left factor is row-sharded and R = Σ_k P_kᵀ·G_k is all-reduced each step):

- every step: a left projection all-reduces R (r·n·c), a two-sided one R (r·r·c), a right one
  nothing; APOLLO adds one scalar per weight for the norm-growth limiter and two for tensor-wise
  factors of a right projection, Fira one (its limiter: APOLLO channel-wise); FRUGAL two float64 scalars for its global signSGD threshold;
  GaLore-Adafactor, of a right projection, the column sums and Σ row EMA (r + 1 values) and ΣU²
  (one), and with ``scale_parameter`` Σw² (one float64) of every weight (its dense branch too:
  :func:`adafactor_weight`);
- a refresh (every ``update_proj_gap`` steps): ``randomized`` all-reduces (1 + p) n×w sketches
  (c) and (1 + p) w×w Gram matrices (float64) per side, and a left factor's signs (an all-gather
  of 2r values); ``svd`` one n×n float64 all-reduce of GᵀG (plus an r×r Gram matrix and the
  signs for a left factor); both add one int64 (the finiteness check). Seeded projections
  (``random``, ``random_orthonormal``) and coordinates are regenerated on every rank: nothing.

Methods whose sharded step is not in this memzoo (the optimizer refuses DTensor weights it would
project: the registry's ``projected_shards`` is False) are computed from the algebra of the
planned scheme and marked ``planned``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memzoo.bench.presets import SHAPE_PRESETS

__all__ = ["FSDP_METHODS", "Traffic", "WeightCost", "adafactor_weight", "adam_mini_weight", "adamw_weight",
           "apollo_weight", "cosmos_weight", "fira_weight", "fsdp_estimate", "fsdp_report", "frugal_weight", "galore_adafactor_weight", "galore_weight",
           "gradient_reduce_scatter_bytes",
           "lion_weight", "mezo_weight", "refresh_traffic", "shard_rows", "sparse_mezo_weight"]

MIB = 2**20
SEEDED = ("random", "random_orthonormal")


# ---- the units ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Collectives over the FSDP group, by kind: ``all_reduce`` sums the sizes of the tensors
    all-reduced, ``all_gather`` the bytes each rank contributes to all-gathers."""

    all_reduce: int = 0
    all_gather: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.all_reduce + other.all_reduce, self.all_gather + other.all_gather)

    def __mul__(self, count: int) -> Traffic:
        return Traffic(self.all_reduce * count, self.all_gather * count)

    __rmul__ = __mul__

    def sent_per_rank(self, world: int) -> float:
        """Bytes one rank sends (ring all-reduce and all-gather); 0 on one rank."""
        return 2 * (world - 1) / world * self.all_reduce + (world - 1) * self.all_gather


@dataclass(frozen=True)
class WeightCost:
    """One parameter's optimizer state on rank 0 and the collectives its update adds."""

    sharded: int = 0  # state bytes sharded like the weight (rank 0's rows)
    replicated: int = 0  # state bytes held whole on every rank
    steady: Traffic = Traffic()  # every step
    refresh: Traffic = Traffic()  # in addition, on a step that recomputes the subspace

    def __add__(self, other: WeightCost) -> WeightCost:
        return WeightCost(self.sharded + other.sharded, self.replicated + other.replicated,
                          self.steady + other.steady, self.refresh + other.refresh)


def shard_rows(rows: int, world: int) -> int:
    """Rows of an ``rows``-row tensor on rank 0 under FSDP2 (``torch.chunk``): ⌈rows/W⌉."""
    return min(rows, -(-rows // world))


def _local_numel(shape: Sequence[int], world: int) -> int:
    """Elements of a tensor of ``shape`` on rank 0 (0-d tensors are not sharded)."""
    if not shape:
        return 1
    return shard_rows(shape[0], world) * math.prod(shape[1:])


def gradient_reduce_scatter_bytes(shapes: Sequence[Sequence[int]], world: int, itemsize: int) -> int:
    """Bytes one rank sends in FSDP2's reduce-scatter of these gradients (ring; each padded to W
    blocks of ⌈m/W⌉ rows)."""
    return sum((world - 1) * -(-shape[0] // world) * math.prod(shape[1:]) * itemsize for shape in shapes if shape)


def _compute_size(param_size: int) -> int:
    return 8 if param_size == 8 else 4


# ---- per method, per weight ---------------------------------------------------------------------
def adamw_weight(shape: Sequence[int], world: int, *, param_size: int, state_size: int | None = None,
                 step_bytes: int = 8) -> WeightCost:
    """AdamW (torch's, or the dense branch of a low-rank method): two moments sharded like the
    weight and a step counter; no communication."""
    state_size = param_size if state_size is None else state_size
    return WeightCost(sharded=2 * _local_numel(shape, world) * state_size, replicated=step_bytes)


def lion_weight(shape: Sequence[int], world: int, *, momentum_size: int) -> WeightCost:
    """Lion: one momentum sharded like the weight; element-wise, no communication."""
    return WeightCost(sharded=_local_numel(shape, world) * momentum_size)


def adam_mini_weight(shape: Sequence[int], world: int, *, blocks: Any, param_size: int, v_size: int) -> WeightCost:
    """Adam-mini (``blocks``: the parameter's :class:`memzoo.reference.adam_mini.BlockPartition`):
    m sharded like the weight; v sharded too where each block lies within a row (rows, vector
    elements), else replicated (one value per head / tensor) with those blocks' g² sums
    all-reduced every step (in v's dtype); an int64 step counter."""
    numel = math.prod(shape)
    cost = WeightCost(sharded=_local_numel(shape, world) * param_size if numel else 0, replicated=8)
    if numel and blocks.rule in ("row", "element"):
        return cost + WeightCost(sharded=shard_rows(shape[0], world) * v_size)
    spanning = Traffic(all_reduce=blocks.blocks * v_size) if numel and world > 1 else Traffic()
    return cost + WeightCost(replicated=blocks.blocks * v_size, steady=spanning)


def refresh_traffic(m: int, n: int, *, side: str, projector: str, rank: int, power_iters: int, oversample: int,
                    param_size: int) -> Traffic:
    """What recomputing a row-sharded m×n weight's subspace all-reduces and all-gathers
    (:func:`memzoo.optim.sharded.sharded_bases`)."""
    if projector in SEEDED or projector == "coordinates":
        return Traffic()
    c = _compute_size(param_size)
    finite = Traffic(all_reduce=8)  # every rank decides whether any shard is non-finite
    left, right = side in ("left", "full"), side in ("right", "full")
    signs = Traffic(all_gather=2 * rank * c)  # the left factor's canonical signs
    if projector == "identity":
        return finite
    if projector == "svd":
        total = finite + Traffic(all_reduce=8 * n * n)  # GᵀG in float64
        return total + (Traffic(all_reduce=8 * rank * rank) + signs if left else Traffic())
    if projector != "randomized":
        raise ValueError(f"no refresh formula for projector {projector!r}")
    w = min(rank + oversample, m, n)
    per_side = Traffic(all_reduce=(1 + power_iters) * (n * w * c + 8 * w * w))
    return finite + (per_side if right else Traffic()) + (per_side + signs if left else Traffic())


def _low_rank_moments(m: int, n: int, side: str, rank: int, world: int, state_size: int) -> tuple[int, int]:
    """(sharded, replicated) bytes of Adam's two moments of the projected gradient: a right
    projection's (m×r) are row-sharded, a left (r×n) or two-sided (r×r) one's replicated."""
    if side == "right":
        return 2 * shard_rows(m, world) * rank * state_size, 0
    return 0, 2 * (rank * n if side == "left" else rank * rank) * state_size


def _factors(m: int, n: int, side: str, rank: int, world: int, projector: str, param_size: int) -> tuple[int, int]:
    """(sharded, replicated) bytes of the stored projection: a left factor (m×r) row-sharded, a
    right one (r×n) replicated, r int64 indices for coordinates, nothing for seeded ones."""
    if projector in SEEDED:
        return 0, 0
    if projector == "coordinates":
        return 0, 8 * rank
    sharded = shard_rows(m, world) * rank * param_size if side in ("left", "full") else 0
    replicated = rank * n * param_size if side in ("right", "full") else 0
    return sharded, replicated


def _reduced_projection(m: int, n: int, side: str, rank: int, param_size: int) -> Traffic:
    """R = Σ_k P_kᵀ·G_k(·Qᵀ) all-reduced every step when there is a left factor."""
    c = _compute_size(param_size)
    if side == "right":
        return Traffic()
    return Traffic(all_reduce=(rank * n if side == "left" else rank * rank) * c)


def galore_weight(m: int, n: int, world: int, *, side: str, rank: int, projector: str, param_size: int,
                  state_size: int | None = None, power_iters: int = 2, oversample: int = 8,
                  natural_history: int = 0) -> WeightCost:
    """GaLore (and Natural GaLore with ``natural_history`` s > 0: a history of s projected
    gradients, replicated): moments and factors as :func:`_low_rank_moments` / :func:`_factors`,
    int64 step and seed (and history count); R all-reduced with a left factor; a refresh's
    sketches."""
    state_size = param_size if state_size is None else state_size
    moments = _low_rank_moments(m, n, side, rank, world, state_size)
    factors = _factors(m, n, side, rank, world, projector, param_size)
    low_rank = rank * n if side == "left" else rank * rank if side == "full" else m * rank
    history = natural_history * low_rank * state_size + 8 if natural_history else 0
    return WeightCost(sharded=moments[0] + factors[0], replicated=moments[1] + factors[1] + 16 + history,
                      steady=_reduced_projection(m, n, side, rank, param_size),
                      refresh=refresh_traffic(m, n, side=side, projector=projector, rank=rank,
                                              power_iters=power_iters, oversample=oversample, param_size=param_size))


def apollo_weight(m: int, n: int, world: int, *, side: str, rank: int, projector: str, param_size: int,
                  state_size: int | None = None, scale_type: str = "channel", limiter: bool = True,
                  power_iters: int = 2, oversample: int = 8) -> WeightCost:
    """APOLLO: GaLore's moments and (for stored projections) factors, the limiter's float32 norm;
    per step R all-reduced with a left factor, ‖N_k‖² and ‖R_k‖² (tensor-wise factors of a right
    projection) and the limiter's ‖S_k‖² summed as scalars."""
    base = galore_weight(m, n, world, side=side, rank=rank, projector=projector, param_size=param_size,
                         state_size=state_size, power_iters=power_iters, oversample=oversample)
    c = _compute_size(param_size)
    scalars = (2 if scale_type == "tensor" and side == "right" else 0) + (1 if limiter else 0)
    return WeightCost(base.sharded, base.replicated + (4 if limiter else 0),
                      base.steady + Traffic(all_reduce=scalars * c), base.refresh)


def fira_weight(m: int, n: int, world: int, *, side: str, rank: int, projector: str, param_size: int,
                state_size: int | None = None, power_iters: int = 2, oversample: int = 8) -> WeightCost:
    """Fira: APOLLO's channel-wise costs with its limiter (GaLore's moments and factors, the
    limiter's float32 norm; per step R all-reduced with a left factor and ‖S_k‖² summed as one
    scalar: the residual's rows are local on either side)."""
    return apollo_weight(m, n, world, side=side, rank=rank, projector=projector, param_size=param_size,
                         state_size=state_size, scale_type="channel", limiter=True, power_iters=power_iters,
                         oversample=oversample)


def adafactor_weight(shape: Sequence[int], world: int, *, param_size: int, state_size: int | None = None,
                     beta1: bool = False, scale_parameter: bool = True) -> WeightCost:
    """Plain Adafactor on row shards (GaLore-Adafactor's dense branch): a 2-D weight's row EMA
    sharded and its column EMA (n) replicated; a ≥3-D weight's row and column EMAs sharded (their
    dim 0 is the weight's); a vector's v sharded; β1's momentum sharded; the int64 step. Per step
    a 2-D weight all-reduces its column sums and Σ row EMA (n + 1 values), every tensor ΣU² (one)
    and, with ``scale_parameter``, Σw² (one float64)."""
    c = _compute_size(param_size)
    state_size = c if state_size is None else state_size
    rows = shard_rows(shape[0], world) if shape else 1
    replicated, columns = 8, 0
    if len(shape) >= 3:
        sharded = rows * (math.prod(shape[1:-1]) + math.prod(shape[1:-2]) * shape[-1]) * state_size
    elif len(shape) == 2:
        sharded, replicated, columns = rows * state_size, replicated + shape[1] * state_size, shape[1] + 1
    else:
        sharded = _local_numel(shape, world) * state_size
    if beta1:
        sharded += _local_numel(shape, world) * state_size
    return WeightCost(sharded=sharded, replicated=replicated,
                      steady=Traffic(all_reduce=(columns + 1) * c + (8 if scale_parameter else 0)))


def galore_adafactor_weight(m: int, n: int, world: int, *, side: str, rank: int, projector: str, param_size: int,
                            state_size: int | None = None, beta1: bool = False, scale_parameter: bool = True,
                            power_iters: int = 2, oversample: int = 8) -> WeightCost:
    """GaLore-Adafactor: the factored second moment of R (a×b) and β1's momentum (a×b) — a right
    projection's row EMA (m) and momentum (m×r) sharded, its column EMA (r) replicated; a left or
    two-sided projection's all replicated —, the factors as :func:`_factors`, int64 step and seed.
    Per step: a right projection all-reduces its column sums and Σ row EMA (r + 1 values) and
    ΣU² (one), a left one R (as GaLore); with ``scale_parameter`` Σw² (one float64); a refresh's
    sketches."""
    c = _compute_size(param_size)
    state_size = c if state_size is None else state_size
    factors = _factors(m, n, side, rank, world, projector, param_size)
    if side == "right":
        sharded = shard_rows(m, world) * (1 + (rank if beta1 else 0)) * state_size
        replicated = rank * state_size
        steady = Traffic(all_reduce=(rank + 2) * c)
    else:
        a, b = (rank, n) if side == "left" else (rank, rank)
        sharded, replicated = 0, (a + b + (a * b if beta1 else 0)) * state_size
        steady = _reduced_projection(m, n, side, rank, param_size)
    return WeightCost(sharded=sharded + factors[0], replicated=replicated + factors[1] + 16,
                      steady=steady + Traffic(all_reduce=8 if scale_parameter else 0),
                      refresh=refresh_traffic(m, n, side=side, projector=projector, rank=rank,
                                              power_iters=power_iters, oversample=oversample, param_size=param_size))


def frugal_weight(m: int, n: int, world: int, *, side: str, rank: int, projector: str, param_size: int,
                  state_size: int | None = None, thresholded: bool = True, power_iters: int = 2,
                  oversample: int = 8) -> WeightCost:
    """FRUGAL: Adam's moments of the subspace, the stored basis (or r int64 coordinates), int64
    step, Adam step and seed; per step R all-reduced with a left factor (a selection of rows: the
    two r×n moments instead) and, for the signSGD threshold, ‖G‖² and ‖E‖² (two float64
    scalars)."""
    state_size = param_size if state_size is None else state_size
    moments = _low_rank_moments(m, n, side, rank, world, state_size)
    factors = _factors(m, n, side, rank, world, projector, param_size)
    if projector == "coordinates" and side == "left":  # each rank steps its selected rows' moments,
        # re-replicated by one all-reduce of both (memzoo.optim.frugal.FrugalRule._coordinates_on_shard)
        steady = Traffic(all_reduce=2 * rank * n * state_size)
    else:
        steady = _reduced_projection(m, n, side, rank, param_size)
    steady = steady + Traffic(all_reduce=16 if thresholded else 0)
    return WeightCost(sharded=moments[0] + factors[0], replicated=moments[1] + factors[1] + 24, steady=steady,
                      refresh=refresh_traffic(m, n, side=side, projector=projector, rank=rank,
                                              power_iters=power_iters, oversample=oversample, param_size=param_size))


def cosmos_weight(m: int, n: int, world: int, *, rank: int, param_size: int,
                  ns_size: int = 2, ns_steps: int = 5) -> WeightCost:
    """COSMOS on row shards (:mod:`memzoo.optim.cosmos`): M (m×n) and V (m×r) sharded, U (n×r)
    and S (r×r) replicated (float32; float64 for float64 weights), the step. Every step
    all-reduces: a MAX of (non-finite flag, max |G|) in float64; Gᵀ(G·U) (n×r) and
    (G·U')ᵀ(G·U') (r×r) for the subspace; when r < n the Newton–Schulz residual's max |X| and
    ‖X‖² (float64 scalars), its n×n Gram matrix XᵀX in each iteration (accumulated in float32,
    float64 for a float64 ``ns_size``: X·p(XᵀX) = p(XXᵀ)·X, the one form whose Gram matrix sums
    over row shards) and ‖O‖² (float64); ‖D‖² (float64). The first step ("refresh")
    all-reduces the n×n GᵀG in place of the n×r Gᵀ(G·U)."""
    factor = 8 if param_size == 8 else 4
    gram_size = 8 if ns_size == 8 else 4
    rows = shard_rows(m, world)
    newton_schulz = (2 * 8 + ns_steps * n * n * gram_size + 8) if rank < n else 0
    steady = Traffic(all_reduce=2 * 8 + (n * rank + rank * rank) * factor + newton_schulz + 8)
    return WeightCost(sharded=rows * (n + rank) * param_size, replicated=(n * rank + rank * rank) * factor + 8,
                      steady=steady, refresh=Traffic(all_reduce=(n * n - n * rank) * factor))


def mezo_weight(shape: Sequence[int], world: int) -> WeightCost:
    """MeZO: no state (the perturbation is regenerated from a seed); per step only the q
    projected-gradient scalars are all-reduced, counted once per optimizer (:func:`fsdp_estimate`)."""
    return WeightCost()


def sparse_mezo_weight(shape: Sequence[int], world: int, *, masked: bool) -> WeightCost:
    """Sparse-MeZO: the fp32 threshold (replicated) and the bit-packed mask of rank 0's elements
    (1024-element chunks); a threshold refresh of a masked tensor: 4 all-reduces of 256 int64
    counts (radix selection, :func:`memzoo.optim.distributed.sharded_kth_magnitudes`)."""
    mask = -(-_local_numel(shape, world) // 1024) * 128
    return WeightCost(sharded=mask, replicated=4, refresh=Traffic(all_reduce=4 * 256 * 8 if masked else 0))


# ---- a whole model --------------------------------------------------------------------------------
# The registry names the formulas cover (memzoo-bench memory --fsdp), in table order.
FSDP_METHODS: tuple[str, ...] = ("adamw", "lion", "galore_adamw", "natural_galore", "apollo", "apollo_mini",
                                 "fira", "galore_adafactor", "frugal", "cosmos", "adam_mini", "mezo", "sparse_mezo")
# Optimizer names without formulas, and why.
_NOT_COVERED = {
    # Stepped on FSDP2 shards (each rank quantizes its rows in blocks of its own), but not modelled here.
    "galore_adamw_8bit": ("these formulas do not model 8-bit moments: on row shards their codes take 1 byte a value "
                          "and each rank adds 4 bytes per 256-value block of its rows, the communication is "
                          "galore_adamw's"),
    "qzo": "QZO trains a 4-bit model's scales, which the LLaMA presets do not have (its traffic is MeZO's)",
}


def _check_name(name: str) -> None:
    if name not in FSDP_METHODS:
        reason = _NOT_COVERED.get(name, "unknown name")
        raise ValueError(f"no FSDP formulas for {name!r}: {reason}; covered: {', '.join(FSDP_METHODS)}")


@dataclass
class FsdpEstimate:
    """One optimizer on one model and world size (:func:`fsdp_estimate`)."""

    optimizer: str
    status: str  # "implemented", "planned" or "refused" (:func:`_status`)
    world: int
    cost: WeightCost
    gradient_reduce_scatter: int  # bytes one rank sends for FSDP2's gradient reduce-scatter
    refresh_interval: int | None  # steps between refreshes (None: only the first step)
    steady_extra: Traffic = field(default_factory=Traffic)  # per step, once per optimizer (MeZO's scalars)

    def row(self) -> dict[str, Any]:
        world = self.world
        steady = (self.cost.steady + self.steady_extra).sent_per_rank(world)
        refresh = steady + self.cost.refresh.sent_per_rank(world)
        amortized = steady + (self.cost.refresh.sent_per_rank(world) / self.refresh_interval
                              if self.refresh_interval else 0.0)
        rs = self.gradient_reduce_scatter
        return {"optimizer": self.optimizer, "status": self.status,
                "state_sharded_mib": self.cost.sharded / MIB, "state_replicated_mib": self.cost.replicated / MIB,
                "state_mib": (self.cost.sharded + self.cost.replicated) / MIB,
                "steady_mib": steady / MIB, "refresh_mib": refresh / MIB, "refresh_every": self.refresh_interval,
                "amortized_mib": amortized / MIB, "grad_reduce_scatter_mib": rs / MIB,
                "vs_grad_traffic": amortized / rs if rs else None}


def _meta_model(preset: str, dtype: torch.dtype) -> list[tuple[str, torch.nn.Parameter]]:
    """The preset's parameters as meta tensors: shapes and dtype, no storage."""
    return [(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))) for name, shape in
            SHAPE_PRESETS[preset].shapes()]


# The registry's sample settings that the benchmark optimizers take as constructor arguments (a
# given lr needs GaLore-Adafactor's relative_step=False there).
BENCH_HYPER_KEYS = ("lr", "weight_decay", "relative_step")


def _build(name: str, named: list[tuple[str, torch.nn.Parameter]],
           settings: Mapping[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    """The registry's benchmark optimizer for ``name`` on the (meta) parameters: its param groups
    carry every setting the formulas read, validated by the optimizer itself. ``settings`` apply to
    the groups the method projects (those that set a rank or density), or to all."""
    from memzoo.optim.registry import OPTIMIZERS

    info = OPTIMIZERS[name]
    hyper = {key: value for key, value in info.sample_kwargs.items() if key in BENCH_HYPER_KEYS}
    if info.bench_groups is None:
        return info, info.cls([p for _, p in named], **{**info.sample_kwargs, **settings})
    groups = info.bench_groups(named)
    if not any("rank" in group or "density" in group for group in groups):  # the settings are defaults
        return info, info.cls(groups, **{**hyper, **settings})
    tuned = [{**group, **settings} if ("rank" in group or "density" in group) else group for group in groups]
    return info, info.cls(tuned, **hyper)


def _status(info: Any, optimizer: Any = None, projected: Sequence[tuple[Any, Mapping[str, Any]]] = ()) -> str:
    """"implemented" when this memzoo steps the method's weights on FSDP2 row shards (the
    registry's ``projected_shards`` for the weights it projects), "planned" when it refuses them
    today, "refused" when the method's rule refuses these settings on shards (e.g. Natural
    GaLore's history with a right projection)."""
    if not getattr(info, "projected_shards", False):
        return "planned"
    check = getattr(getattr(optimizer, "rule", None), "sharded_problem", None)
    if check is not None and any(check(projector, group) is not None for projector, group in projected):
        return "refused"
    return "implemented"


def fsdp_estimate(name: str, preset: str, world: int, *, dtype: torch.dtype = torch.bfloat16,
                  settings: Mapping[str, Any] | None = None, loss_size: int = 4) -> FsdpEstimate:
    """Per-rank state and communication of optimizer ``name`` (one of :data:`FSDP_METHODS`) on
    preset ``preset`` (:data:`memzoo.bench.presets.SHAPE_PRESETS`) sharded over ``world`` ranks,
    with the registry's benchmark settings (the papers' ranks, which matrices are projected)
    updated by ``settings``; parameters and moments in ``dtype``; zeroth-order losses of
    ``loss_size`` bytes. Nothing is allocated."""
    _check_name(name)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if preset not in SHAPE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(SHAPE_PRESETS)}")
    settings = dict(settings or {})
    size = torch.empty((), dtype=dtype).element_size()
    named = _meta_model(preset, dtype)
    shapes = [tuple(p.shape) for _, p in named]
    rs = gradient_reduce_scatter_bytes(shapes, world, size)
    total = WeightCost()
    interval: int | None = None
    status = "implemented"
    extra = Traffic()
    if name == "adamw":
        for shape in shapes:  # torch.optim.AdamW: a float32 step tensor
            total += adamw_weight(shape, world, param_size=size, step_bytes=4)
        return FsdpEstimate(name, status, world, total, rs, None)
    if name in ("mezo", "sparse_mezo"):
        _, optimizer = _build(name, named, settings)
        extra = Traffic(all_reduce=optimizer.n_samples * loss_size)
        for shape in shapes:
            if name == "mezo":
                total += mezo_weight(shape, world)
            else:
                total += sparse_mezo_weight(shape, world, masked=len(shape) >= 2 or optimizer.mask_1d)
        interval = getattr(optimizer, "threshold_interval", None)
        return FsdpEstimate(name, status, world, total, rs, interval, extra)
    info, optimizer = _build(name, named, settings)
    if name == "lion":
        for group in optimizer.param_groups:
            for param in group["params"]:
                total += lion_weight(param.shape, world, momentum_size=optimizer._momentum_dtype(param, group).itemsize)
        return FsdpEstimate(name, status, world, total, rs, None)
    if name == "adam_mini":
        for group in optimizer.param_groups:
            for param in group["params"]:
                blocks, _ = optimizer._partition(param, group)
                total += adam_mini_weight(param.shape, world, blocks=blocks, param_size=size,
                                          v_size=optimizer._second_moment_dtype(param).itemsize)
        return FsdpEstimate(name, status, world, total, rs, None)
    if name == "cosmos":
        for group in optimizer.param_groups:
            for param in group["params"]:
                rank = optimizer._rank(param, group)
                if rank is None:
                    total += adamw_weight(param.shape, world, param_size=size)
                else:
                    m, n = param.shape
                    total += cosmos_weight(m, n, world, rank=rank, param_size=size,
                                           ns_size=group["ns_dtype"].itemsize)
        return FsdpEstimate(name, _status(info), world, total, rs, None)
    projected = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            projector = optimizer._projector(param, group)
            state_size = optimizer._state_dtype(param, group).itemsize
            if name == "galore_adafactor":  # its moments: float32 for 16-bit weights unless state_dtype is set
                spec = optimizer.rule.state(param.shape, projector, group, optimizer._state_dtype(param, group))
                state_size = next(iter(spec.values()))[1].itemsize
                adafactor = dict(beta1=group["beta1"] is not None, scale_parameter=group["scale_parameter"])
                if projector is None:
                    total += adafactor_weight(param.shape, world, param_size=size, state_size=state_size, **adafactor)
                    continue
            if projector is None:
                total += adamw_weight(param.shape, world, param_size=size, state_size=state_size)
                continue
            projected.append((projector, group))
            interval = projector.settings.update_proj_gap
            (m, n), side, rank, method = projector.shape, projector.side, projector.rank, projector.settings.projector
            common = dict(side=side, rank=rank, projector=method, param_size=size, state_size=state_size,
                          power_iters=projector.settings.power_iters, oversample=projector.settings.oversample)
            if name in ("galore_adamw", "natural_galore"):
                history = group["natural_history"] if group.get("natural") else 0
                total += galore_weight(m, n, world, natural_history=history, **common)
            elif name in ("apollo", "apollo_mini"):
                total += apollo_weight(m, n, world, scale_type=group["scale_type"], limiter=not group["disable_nl"],
                                       **common)
            elif name == "fira":
                total += fira_weight(m, n, world, **common)
            elif name == "galore_adafactor":
                total += galore_adafactor_weight(m, n, world, **adafactor, **common)
            else:  # frugal
                thresholded = group["inactive_update_rule"] == "sign_sgd" and group["inactive_threshold"] > 0
                total += frugal_weight(m, n, world, thresholded=thresholded, **common)
    return FsdpEstimate(name, _status(info, optimizer, projected), world, total, rs, interval)


def _known_settings(name: str) -> set[str]:
    """The settings optimizer ``name`` takes: its group keys and constructor keywords."""
    import inspect

    from memzoo.optim.registry import OPTIMIZERS

    if name == "adamw":
        return set()
    cls = OPTIMIZERS[name].cls
    keys = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "kwargs", "options"}
    rule = getattr(cls, "rule", None)
    if rule is not None:  # low-rank methods: the engine's common group keys and the rule's own
        from memzoo.optim.lowrank import COMMON_DEFAULTS

        keys |= set(COMMON_DEFAULTS) | set(rule.defaults)
    return keys


def fsdp_report(names: Sequence[str], preset: str, world: int, *, dtype: torch.dtype = torch.bfloat16,
                settings: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """:meth:`FsdpEstimate.row` of each optimizer, AdamW first, with its state against AdamW's.
    Each setting goes to the optimizers that take it (``rank`` to the low-rank methods,
    ``n_samples`` to the zeroth-order ones); a setting none of them takes is a ValueError."""
    names = ["adamw", *[n for n in names if n != "adamw"]]
    for name in names:
        _check_name(name)
    settings = dict(settings or {})
    known = {name: _known_settings(name) for name in names}
    unused = [key for key in settings if not any(key in keys for keys in known.values())]
    if unused:
        raise ValueError(f"setting(s) {unused} are taken by none of {names}")
    rows = [fsdp_estimate(name, preset, world, dtype=dtype,
                          settings={k: v for k, v in settings.items() if k in known[name]}).row()
            for name in names]
    for row in rows:
        row["vs_adamw_state"] = row["state_mib"] / rows[0]["state_mib"]
    return rows
