"""The stateful half of the shared projector: settings of a param group, and per-weight state.

The state lives in the optimizer's per-parameter state dict as tensors only, so it round-trips
through ``state_dict`` and loads with ``torch.load(weights_only=True)``:

- ``proj_seed``: int64 scalar; seeds the randomized range finder and the random projection.
- ``proj_left`` (m×r) and/or ``proj_right`` (r×n): stored factors, in the parameter's dtype as the
  official code keeps them. The ``random`` and ``random_orthonormal`` methods store none: they
  regenerate their factors from the seed on every step.
- ``proj_indices`` (r,) int64: the ``coordinates`` method's selected rows (left) or columns
  (right); its 0/1 factors are built from them when used.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memzoo.optim.base import StateSpec, check_int, check_number, local_tensor
from memzoo.optim.sharded import RowShard, sharded_bases
from memzoo.reference.projector import (
    METHODS,
    PROJ_TYPES,
    REFRESH_SEED_STEP,
    SEEDED_METHODS,
    SIGN_CONVENTIONS,
    Randn,
    compute_bases,
    matrix_shape,
    projection_side,
    projector_factors,
    random_basis,
    random_coordinates,
    refresh_due,
    side_length,
)
from memzoo.reference.random import philox_randn

__all__ = ["Projector", "ProjectorSettings", "RefreshRequest", "compute_refreshes", "refresh_projectors_"]

# Most power iterations a randomized refresh may run (2 is the default, 1–4 the usual range).
MAX_POWER_ITERS = 64


@dataclass(frozen=True)
class ProjectorSettings:
    """Projection settings of one param group (the official GaLore group keys plus ours), and
    the sign convention of computed singular vectors, which the optimizer fixes (``signs``:
    "raw" for GaLore as galore-torch, "canonical" for Natural GaLore as its official code)."""

    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    projector: str
    power_iters: int
    oversample: int
    strict_rank: bool
    signs: str = "raw"

    # The fields read from a param group (``signs`` is the optimizer's, not a group key).
    GROUP_KEYS: ClassVar[tuple[str, ...]] = ("rank", "update_proj_gap", "scale", "proj_type", "projector",
                                             "power_iters", "oversample", "strict_rank")

    @classmethod
    def from_group(cls, group: Mapping[str, Any], *, signs: str = "raw") -> ProjectorSettings:
        settings = cls(**{name: group[name] for name in cls.GROUP_KEYS}, signs=signs)
        settings.validate()
        return settings

    def validate(self) -> None:
        check_int("rank", self.rank, low=1)
        check_int("update_proj_gap", self.update_proj_gap, low=1)
        check_number("scale", self.scale)
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(f"Invalid proj_type: {self.proj_type!r}; expected one of {PROJ_TYPES}")
        if self.projector not in METHODS:
            raise ValueError(f"Invalid projector: {self.projector!r}; expected one of {METHODS}")
        # Each iteration is two products and a QR of the whole weight: beyond this many a
        # refresh would run for hours (2**70 ran forever) and gains nothing in fp32.
        check_int("power_iters", self.power_iters, low=0, high=MAX_POWER_ITERS + 1)
        check_int("oversample", self.oversample, low=0)
        if not isinstance(self.strict_rank, bool):
            raise ValueError(f"Invalid strict_rank: {self.strict_rank!r} (expected a bool)")
        if self.signs not in SIGN_CONVENTIONS:
            raise ValueError(f"Invalid signs: {self.signs!r}; expected one of {SIGN_CONVENTIONS}")


class Projector:
    """The projection of one ≥2-D weight. Its side is fixed from the weight's shape.

    Rank: GaLore silently truncates ``rank`` to min(m, n); so does this class unless
    ``strict_rank`` is set, which makes a larger rank a ValueError. The ``identity`` method (for
    tests) projects onto the whole space, whatever the rank.
    """

    def __init__(self, settings: ProjectorSettings, weight_shape: torch.Size | tuple[int, ...]) -> None:
        self.settings = settings
        self.shape = matrix_shape(weight_shape)
        self.side = projection_side(self.shape, settings.proj_type)
        m, n = self.shape
        if settings.strict_rank and settings.rank > min(m, n) and settings.projector != "identity":
            raise ValueError(
                f"rank {settings.rank} exceeds min(m, n) = {min(m, n)} of a weight of shape "
                f"{tuple(weight_shape)} (projected as {m}×{n}); lower the rank or set strict_rank=False"
            )
        if settings.projector == "coordinates" and self.side == "full":
            raise ValueError("the coordinates projector selects rows or columns: proj_type 'full' is not supported")
        self.rank = min(settings.rank, m, n)
        uses_left, uses_right = self.side in ("left", "full"), self.side in ("right", "full")
        identity = settings.projector == "identity"
        self.low_rank_shape = (
            (m if identity else self.rank) if uses_left else m,
            (n if identity else self.rank) if uses_right else n,
        )
        self._factor_shapes = {
            "proj_left": (m, self.low_rank_shape[0]) if uses_left else None,
            "proj_right": (self.low_rank_shape[1], n) if uses_right else None,
        }

    def state_spec(self, factor_dtype: torch.dtype) -> StateSpec:
        spec: StateSpec = {"proj_seed": (torch.Size(()), torch.int64)}
        if self.settings.projector == "coordinates":
            spec["proj_indices"] = (torch.Size((self.rank,)), torch.int64)
        elif self.settings.projector not in SEEDED_METHODS:
            for name, shape in self._factor_shapes.items():
                if shape is not None:
                    spec[name] = (torch.Size(shape), factor_dtype)
        return spec

    def due(self, state: Mapping[str, Any], step: int) -> bool:
        """GaLore refreshes on steps 1, T+1, 2T+1, … (``step`` is the count before this one)."""
        return refresh_due(state, step, self.settings.update_proj_gap)

    def seed_at(self, state: Mapping[str, Any], step: int, base_seed: int) -> int:
        """The seed of the refresh at ``step`` (from ``base_seed`` at the first one); the caller
        records ``base_seed`` as ``proj_seed`` then."""
        current = int(state["proj_seed"]) if "proj_seed" in state else base_seed
        return (current + step * REFRESH_SEED_STEP) % 2**31

    def refresh_(self, state: dict[str, Any], grad_matrix: torch.Tensor, step: int, base_seed: int,
                 factor_dtype: torch.dtype, *, randn: Randn = philox_randn) -> None:
        """Recompute the factors from the current gradient (as an m×n matrix)."""
        refresh_projectors_([RefreshRequest(self, state, grad_matrix, step, base_seed, factor_dtype)], randn=randn)

    def factors(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype, *,
                randn: Randn = philox_randn,
                rows: range | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The factors (left, right), stored or regenerated from the seed with ``randn``.
        ``rows``: a row shard's, whose rows of the left factor are returned (the right factor is
        always whole); a stored left factor is then a DTensor sharded like the weight."""
        left, right = projector_factors(state, self.shape, rank=self.rank, side=self.side,
                                        method=self.settings.projector, dtype=dtype, device=device, randn=randn,
                                        rows=rows)
        return (None if left is None else local_tensor(left)), right


@dataclass
class RefreshRequest:
    """One projector due for a refresh, with the gradient (as its m×n matrix) to refresh from."""

    projector: Projector
    state: dict[str, Any]
    grad_matrix: torch.Tensor
    step: int
    base_seed: int
    factor_dtype: torch.dtype
    # For a row-sharded weight: its rows (``grad_matrix`` holds only those).
    shard: RowShard | None = None


# Refreshes of same-shaped matrices are batched, a chunk's stacked gradients kept under this size.
_REFRESH_CHUNK_BYTES = 256 * 2**20


# A computed refresh not yet stored: (per-parameter state, key, new tensor).
RefreshWrite = tuple[dict[str, Any], str, torch.Tensor]


def refresh_projectors_(requests: list[RefreshRequest], *, randn: Randn = philox_randn) -> None:
    """Refresh many projectors at once (:func:`compute_refreshes`, then the writes)."""
    for state, name, value in compute_refreshes(requests, randn=randn):
        state[name] = value


def compute_refreshes(requests: list[RefreshRequest], *, randn: Randn = philox_randn) -> list[RefreshWrite]:
    """The new projector state of many projectors, computed without writing any (the caller
    stores each (state, key, tensor) as part of its step's writes): requests with the same settings, shape, device and dtype
    are stacked and their bases computed by one batched call per chunk (one GEMM, Cholesky and
    eigen-solve per chunk instead of per matrix). Same result as refreshing them one by one.
    ``randn`` draws the sketches (the backend's Philox generator).

    All-or-nothing: every new factor is computed before any state is written, so an error (e.g.
    out of memory in a batched decomposition) leaves every projector as it was. A gradient with
    NaN or Inf never becomes a subspace: that weight keeps its previous factors (or, at its first
    refresh, gets the seeded random Gaussian factors) and a RuntimeWarning names it."""
    writes: list[RefreshWrite] = []
    classes: dict[tuple, list[tuple[RefreshRequest, int]]] = {}
    for request in requests:
        state, projector = request.state, request.projector
        first = "proj_seed" not in state
        seed = projector.seed_at(state, request.step, request.base_seed)
        if projector.settings.projector in SEEDED_METHODS:
            # Only the seed changes; the factors are regenerated from it each step.
            writes.append((state, "proj_seed", torch.tensor(seed, dtype=torch.int64)))
            continue
        if first:
            writes.append((state, "proj_seed", torch.tensor(request.base_seed, dtype=torch.int64)))
        if projector.settings.projector == "coordinates":  # new random rows or columns
            indices = random_coordinates(seed, side_length(projector.shape, projector.side), projector.rank)
            writes.append((state, "proj_indices", indices.to(request.grad_matrix.device)))
            continue
        grad = request.grad_matrix
        shard_key = None if request.shard is None else request.shard.key
        key = (projector.settings, projector.shape, grad.device, grad.dtype, request.factor_dtype, shard_key)
        classes.setdefault(key, []).append((request, seed))
    skipped: list[RefreshRequest] = []
    for (settings, (m, n), device, dtype, factor_dtype, _), members in classes.items():
        projector = members[0][0].projector
        shard = members[0][0].shard
        chunk = max(1, _REFRESH_CHUNK_BYTES // (m * n * 4))
        for begin in range(0, len(members), chunk):
            part = members[begin:begin + chunk]
            grads = torch.stack([r.grad_matrix for r, _ in part])
            # One sync per chunk, on refresh steps; meta tensors (shape-only runs) have no values to check.
            if device.type == "meta":
                finite = [True] * len(part)
            elif shard is None:
                finite = torch.isfinite(grads).flatten(1).all(1).tolist()
            else:  # every rank decides from every shard
                bad = (~torch.isfinite(grads)).flatten(1).sum(1, dtype=torch.int64) if grads.numel() else \
                    torch.zeros(len(part), dtype=torch.int64, device=device)
                finite = (shard.all_reduce_(bad) == 0).tolist()
            if not all(finite):
                for (request, seed), ok in zip(part, finite):
                    if ok:
                        continue
                    skipped.append(request)
                    if request.state.get("proj_left") is None and request.state.get("proj_right") is None:
                        left, right = random_basis(seed, projector.shape, projector.rank, projector.side, device,
                                                   factor_dtype, randn=randn,
                                                   rows=None if shard is None else shard.index)
                        if left is not None and shard is not None:
                            left = shard.distribute(left, (m, left.shape[1]))
                        writes += [(request.state, name, f) for name, f in (("proj_left", left), ("proj_right", right))
                                   if f is not None]
                keep = [index for index, ok in enumerate(finite) if ok]
                part = [part[index] for index in keep]
                grads = grads[keep]
                if not part:
                    continue
            seeds = torch.tensor([seed for _, seed in part], dtype=torch.int64, device=device)
            if shard is None:
                left, right = compute_bases(grads, projector.rank, projector.side, settings.projector, seeds=seeds,
                                            power_iters=settings.power_iters, oversample=settings.oversample,
                                            signs=settings.signs, randn=randn)
            else:
                left, right = sharded_bases(grads, shard, n, projector.rank, projector.side, settings.projector,
                                            seeds=seeds, power_iters=settings.power_iters,
                                            oversample=settings.oversample, signs=settings.signs, randn=randn)
            del grads
            for index, (request, _) in enumerate(part):
                for name, factors in (("proj_left", left), ("proj_right", right)):
                    if factors is not None:  # an owned, contiguous copy: not a view of the batch
                        value = torch.empty(factors.shape[1:], dtype=factor_dtype, device=device).copy_(factors[index])
                        if name == "proj_left" and shard is not None:  # its rows: sharded like the weight
                            value = shard.distribute(value, (m, value.shape[1]))
                        writes.append((request.state, name, value))
    if skipped:
        shapes = ", ".join(str(tuple(request.grad_matrix.shape)) for request in skipped[:5])
        warnings.warn(
            f"{len(skipped)} projector refresh(es) got a gradient with NaN or Inf (matrices {shapes}"
            f"{', …' if len(skipped) > 5 else ''}): their previous subspace is kept (a seeded random one at the "
            "first refresh); the update itself propagates the non-finite values as torch.optim does. "
            "Pass skip_nonfinite=True to skip such steps instead.",
            RuntimeWarning, stacklevel=3,
        )
    return writes
