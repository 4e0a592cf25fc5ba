"""The stateful half of the shared projector: settings of a param group, and per-weight state.

The state lives in the optimizer's per-parameter state dict as tensors only, so it round-trips
through ``state_dict`` and loads with ``torch.load(weights_only=True)``:

- ``proj_seed``: int64 scalar; seeds the randomized range finder and the random projection.
- ``proj_left`` (m×r) and/or ``proj_right`` (r×n): stored factors, in the parameter's dtype as the
  official code keeps them. The ``random`` method stores none: it regenerates its factors from
  the seed on every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from memzoo.optim.base import StateSpec, check_int, check_number
from memzoo.reference.projector import (
    METHODS,
    PROJ_TYPES,
    compute_basis,
    matrix_shape,
    projection_side,
    random_basis,
)

__all__ = ["Projector", "ProjectorSettings"]

# Golden-ratio increment: consecutive refreshes get well-separated seeds.
_SEED_STEP = 0x9E3779B1


@dataclass(frozen=True)
class ProjectorSettings:
    """Projection settings of one param group (the official GaLore group keys plus ours)."""

    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    projector: str
    power_iters: int
    oversample: int
    strict_rank: bool

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> ProjectorSettings:
        settings = cls(**{name: group[name] for name in cls.__dataclass_fields__})
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
        check_int("power_iters", self.power_iters, low=0)
        check_int("oversample", self.oversample, low=0)
        if not isinstance(self.strict_rank, bool):
            raise ValueError(f"Invalid strict_rank: {self.strict_rank!r} (expected a bool)")


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
        if self.settings.projector != "random":
            for name, shape in self._factor_shapes.items():
                if shape is not None:
                    spec[name] = (torch.Size(shape), factor_dtype)
        return spec

    def due(self, state: Mapping[str, Any], step: int) -> bool:
        """GaLore refreshes on steps 1, T+1, 2T+1, … (``step`` is the count before this one)."""
        return step % self.settings.update_proj_gap == 0 or "proj_seed" not in state

    def refresh_(self, state: dict[str, Any], grad_matrix: torch.Tensor, step: int, base_seed: int,
                 factor_dtype: torch.dtype) -> None:
        """Recompute the factors from the current gradient (as an m×n matrix)."""
        if "proj_seed" not in state:
            state["proj_seed"] = torch.tensor(base_seed, dtype=torch.int64)
        seed = (int(state["proj_seed"]) + step * _SEED_STEP) % 2**31
        if self.settings.projector == "random":
            # Only the seed changes; the factors are regenerated from it each step.
            state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)
            return
        s = self.settings
        left, right = compute_basis(grad_matrix, self.rank, self.side, s.projector, seed=seed,
                                    power_iters=s.power_iters, oversample=s.oversample)
        for name, factor in (("proj_left", left), ("proj_right", right)):
            if factor is not None:
                state[name] = factor.to(factor_dtype).contiguous()

    def factors(self, state: Mapping[str, Any], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.settings.projector == "random":
            return random_basis(int(state["proj_seed"]), self.shape, self.rank, self.side, device, dtype)
        return state.get("proj_left"), state.get("proj_right")
