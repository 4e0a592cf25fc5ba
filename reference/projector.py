"""Low-rank gradient projection, shared by GaLore, Natural GaLore, APOLLO, FRUGAL and COSMOS.

A weight of shape (m, n) (≥3-D weights are viewed as (shape[0], prod(shape[1:])), i.e. output
channels × everything else) is projected on one side or both:

- ``right``: P is r×n (top right singular vectors as rows); R = G·Pᵀ (m×r); back: N·P.
- ``left``: P is m×r (top left singular vectors as columns); R = Pᵀ·G (r×n); back: P·N.
- ``full``: both; R = Aᵀ·G·Bᵀ (r×r); back: A·N·B.

The side comes from the full weight's shape and ``proj_type`` once (GaLore's rule), never from
the shape of a low-rank tensor, so a square R cannot flip it (the official ``reverse_std`` bug).
Bases are computed in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from memzoo.reference.common import compute_dtype
from memzoo.reference.random import philox_randn

__all__ = [
    "METHODS",
    "PROJ_TYPES",
    "compute_basis",
    "matrix_shape",
    "project",
    "project_back",
    "projection_side",
    "random_basis",
]

Side = Literal["left", "right", "full"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
METHODS: tuple[str, ...] = ("svd", "randomized", "random", "identity")


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (m, n) matrix a ≥2-D weight is projected as: (shape[0], prod(shape[1:]))."""
    if len(shape) < 2:
        raise ValueError(f"only ≥2-D weights are projected, got shape {tuple(shape)}")
    return shape[0], math.prod(shape[1:])


def projection_side(shape: tuple[int, int], proj_type: str) -> Side:
    """GaLore's side rule: ``std`` projects the shorter side (right when m ≥ n)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"Invalid proj_type: {proj_type!r}; expected one of {PROJ_TYPES}")


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def random_basis(seed: int, shape: tuple[int, int], rank: int, side: Side, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gaussian factors with N(0, 1/r) entries (so E[PᵀP] = I), regenerated from ``seed``:
    element (i, j) of the left factor (m×r) has offset i·r + j, of the right factor (r×n)
    offset m·r + i·n + j (left first when both exist)."""
    m, n = shape
    left = right = None
    scale = 1.0 / math.sqrt(rank)
    if side in ("left", "full"):
        left = philox_randn(seed, torch.arange(m * rank)).view(m, rank).mul_(scale)
        left = left.to(device=device, dtype=dtype)
    if side in ("right", "full"):
        start = m * rank if side == "full" else 0
        right = philox_randn(seed, torch.arange(start, start + rank * n)).view(rank, n).mul_(scale)
        right = right.to(device=device, dtype=dtype)
    return left, right


def _randomized_svd(matrix: torch.Tensor, rank: int, seed: int, power_iters: int,
                    oversample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left (m×r) and right (r×n) singular vectors by a seeded range finder with
    ``power_iters`` power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1)."""
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    sketch = philox_randn(seed, torch.arange(n * width)).view(n, width).to(matrix.device, matrix.dtype)
    basis = _orthonormal(matrix @ sketch)
    for _ in range(power_iters):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    small_u, _, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ small_u)[:, :rank], vh[:rank]


def compute_basis(matrix: torch.Tensor, rank: int, side: Side, method: str, *, seed: int = 0,
                  power_iters: int = 2, oversample: int = 8) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Factors (left m×r or None, right r×n or None) that span the top-``rank`` subspace of
    ``matrix`` (m×n) on ``side``. ``rank`` must be ≤ min(m, n); ``identity`` ignores it and
    returns identity factors (a test device: the projection then changes nothing)."""
    m, n = matrix.shape
    work = matrix.to(compute_dtype(matrix.dtype))
    if method == "identity":
        eye = lambda size: torch.eye(size, device=matrix.device, dtype=work.dtype)  # noqa: E731
        return (eye(m) if side in ("left", "full") else None, eye(n) if side in ("right", "full") else None)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")
    if method == "random":
        return random_basis(seed, (m, n), rank, side, matrix.device, work.dtype)
    if method == "svd":
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        u, vh = u[:, :rank], vh[:rank]
    elif method == "randomized":
        u, vh = _randomized_svd(work, rank, seed, power_iters, oversample)
    else:
        raise ValueError(f"Invalid projector method: {method!r}; expected one of {METHODS}")
    return (u if side in ("left", "full") else None, vh if side in ("right", "full") else None)


def project(matrix: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """R = leftᵀ·G·rightᵀ, with an absent factor meaning identity (GaLore eq. for R_t)."""
    out = matrix
    if left is not None:
        out = left.T @ out
    if right is not None:
        out = out @ right.T
    return out


def project_back(low_rank: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """left·N·right, with an absent factor meaning identity (GaLore's G̃_t = P·N_t)."""
    out = low_rank
    if left is not None:
        out = left @ out
    if right is not None:
        out = out @ right
    return out
