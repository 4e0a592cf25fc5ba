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
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from memzoo.reference.common import compute_dtype
from memzoo.reference.random import philox_randn

__all__ = [
    "METHODS",
    "PROJ_TYPES",
    "REFRESH_SEED_STEP",
    "SEEDED_METHODS",
    "SIGN_CONVENTIONS",
    "canonical_signs",
    "compute_basis",
    "compute_bases",
    "matrix_shape",
    "project",
    "project_back",
    "projection_side",
    "projector_factors",
    "random_basis",
    "random_orthonormal_basis",
    "refresh_due",
    "refreshed_projector",
    "side_length",
    "random_coordinates",
    "selection_factor",
    "step_projector_",
]

Side = Literal["left", "right", "full"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
METHODS: tuple[str, ...] = ("svd", "randomized", "random", "random_orthonormal", "identity", "coordinates")
# Signs of computed singular vectors: as returned, or tensorly's convention (canonical_signs).
SIGN_CONVENTIONS: tuple[str, ...] = ("raw", "canonical")
# Methods whose factors are regenerated from the seed on every use (nothing stored).
SEEDED_METHODS: tuple[str, ...] = ("random", "random_orthonormal")


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


def side_length(shape: tuple[int, int], side: Side) -> int:
    """The dimension a one-sided projection reduces: n (the columns) for right, m (the rows)
    for left."""
    if side == "full":
        raise ValueError("a two-sided ('full') projection reduces both dimensions")
    return shape[1] if side == "right" else shape[0]


def _orthonormal(matrices: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases (B, m, k) of the column spaces of ``matrices`` (B, m, k), m ≥ k.

    Cholesky-QR with the k×k Gram matrix and the triangular solve in float64: Q = Y·L⁻ᵀ with
    LLᵀ = YᵀY. One batched GEMM, Cholesky and solve instead of a Householder QR per matrix
    (several times faster on GPUs); float64 keeps Q orthonormal to ~1e-8 up to cond(Y) ≈ 1e6.
    Where a Gram matrix is numerically singular (a rank-deficient sketch: a zero or low-rank
    gradient) the batch falls back to Householder QR, which still returns an orthonormal basis.
    """
    wide = matrices.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(wide.mT @ wide)
    if info.device.type != "meta" and bool((info != 0).any()):  # meta (shape-only runs): no values
        return torch.linalg.qr(matrices, mode="reduced").Q
    return torch.linalg.solve_triangular(factor.mT, wide, upper=True, left=False).to(matrices.dtype)


# The Philox normal generator: this module's (PyTorch) by default; the optimizers pass their
# backend's (:func:`memzoo.triton_kernels.random.philox_randn` on GPUs), the same stream.
Randn = Callable[[int | torch.Tensor, torch.Tensor], torch.Tensor]


def random_basis(seed: int | torch.Tensor, shape: tuple[int, int], rank: int, side: Side,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, *, randn: Randn = philox_randn,
                 rows: range | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gaussian factors with N(0, 1/r) entries (so E[PᵀP] = I), regenerated from ``seed``:
    element (i, j) of the left factor (m×r) has offset i·r + j, of the right factor (r×n)
    offset m·r + i·n + j (left first when both exist). ``rows``: only those rows of the left
    factor (a row shard's), drawn from their own offsets. ``seed`` may be a 1-D integer tensor
    of B seeds: the B weights' factors, stacked (B, …), drawn in one call of ``randn`` (factor b
    is the one seed b gives alone)."""
    m, n = shape
    left = right = None
    scale = 1.0 / math.sqrt(rank)
    batch = (seed.numel(),) if isinstance(seed, torch.Tensor) else ()
    seeds = seed.view(-1, 1) if isinstance(seed, torch.Tensor) else seed  # one stream per row of normals
    if side in ("left", "full"):
        rows = range(m) if rows is None else rows
        offsets = torch.arange(rows.start * rank, rows.stop * rank, device=device)
        left = randn(seeds, offsets).view(*batch, len(rows), rank).mul_(scale).to(dtype)
    if side in ("right", "full"):
        start = m * rank if side == "full" else 0
        offsets = torch.arange(start, start + rank * n, device=device)
        right = randn(seeds, offsets).view(*batch, rank, n).mul_(scale).to(dtype)
    return left, right


def random_orthonormal_basis(seed: int, shape: tuple[int, int], rank: int, side: Side, device: torch.device | str,
                             dtype: torch.dtype = torch.float32, *,
                             randn: Randn = philox_randn) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Orthonormal factors spanning a uniformly random rank-``rank`` subspace (left: orthonormal
    columns, right: orthonormal rows), regenerated from ``seed``: :func:`random_basis`'s Gaussian
    orthonormalized (QR with a positive triangular diagonal, so the subspace is Haar-distributed,
    as ``torch.nn.init.orthogonal_`` draws the official FRUGAL's; Householder, not Cholesky-QR:
    the factor is regenerated every step and one small QR is cheaper than a batched Cholesky). With them up(down(G)) is the
    orthogonal projection of G onto the subspace, and G − up(down(G)) its complement."""
    left, right = random_basis(seed, shape, rank, side, device, compute_dtype(dtype), randn=randn)
    if left is not None:
        left = _haar_columns(left).to(dtype)
    if right is not None:
        right = _haar_columns(right.T).T.to(dtype)
    return left, right


def _haar_columns(gaussian: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns from a Gaussian (k×r, k ≥ r): Householder QR with R's diagonal made
    positive (Q·sign(diag R)), which makes the result Haar-distributed."""
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.diagonal(r).sign()
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def canonical_signs(factor: torch.Tensor, dim: int) -> torch.Tensor:
    """``factor`` with each basis vector (its entries run along ``dim``) multiplied by ±1 so that
    its entry of largest magnitude (the first one on a tie) is positive: tensorly's ``svd_flip``
    convention, which the official Natural GaLore's Tucker factors follow (each factor on its
    own). A singular vector's sign is arbitrary; fixing it makes the basis a function of the
    subspace, so moments carried across a refresh keep their meaning."""
    index = factor.abs().argmax(dim=dim, keepdim=True)
    signs = factor.gather(dim, index).sign()
    return factor * torch.where(signs == 0, torch.ones_like(signs), signs)


def random_coordinates(seed: int, size: int, count: int) -> torch.Tensor:
    """``count`` distinct coordinates out of ``size``, sorted (int64, on the CPU): the first
    ``count`` of a permutation drawn by a CPU generator seeded with ``seed`` (the same on every
    device). FRUGAL's RandK row or column selection."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:count].sort().values


def selection_factor(indices: torch.Tensor, size: int, side: Side, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 factor selecting coordinates ``indices`` out of ``size``: right (r×size, columns
    of G) or left (size×r, rows). With it project() gathers the coordinates and project_back()
    scatters them into zeros, exactly (products with 0 and 1 only)."""
    rows = torch.zeros((indices.numel(), size), dtype=dtype, device=indices.device)
    rows[torch.arange(indices.numel(), device=indices.device), indices] = 1
    return rows if side == "right" else rows.T


def _range_basis(matrices: torch.Tensor, rank: int, seeds: torch.Tensor, power_iters: int,
                 oversample: int, randn: Randn) -> torch.Tensor:
    """Top-``rank`` left singular vectors (B, m, r) of ``matrices`` (B, m, n) by a seeded range
    finder with power iterations, then Rayleigh–Ritz (Halko, Martinsson & Tropp 2011, Alg. 4.4
    and 5.1). The Ritz rotation comes from the eigenvectors of the small Gram matrix
    (QᵀA)(QᵀA)ᵀ, so the result is Q·U, orthonormal even where A is rank-deficient."""
    batch, m, n = matrices.shape
    width = min(rank + oversample, m, n)
    offsets = torch.arange(n * width, device=matrices.device)
    sketch = randn(seeds.view(-1, 1), offsets).view(batch, n, width).to(matrices.dtype)
    basis = _orthonormal(matrices @ sketch)
    for _ in range(power_iters):
        basis = _orthonormal(matrices @ _orthonormal(matrices.mT @ basis))
    small = (basis.mT @ matrices).to(torch.float64)  # (B, w, n)
    _, vectors = torch.linalg.eigh(small @ small.mT)  # ascending eigenvalues = σ²
    top = vectors.flip(-1)[..., :rank].to(matrices.dtype)
    return basis @ top


def compute_bases(matrices: torch.Tensor, rank: int, side: Side, method: str, *, seeds: torch.Tensor | None = None,
                  power_iters: int = 2, oversample: int = 8, signs: str = "raw",
                  randn: Randn = philox_randn) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Batched :func:`compute_basis`: ``matrices`` is (B, m, n), ``seeds`` an int64 tensor of B
    seeds (the ``randomized`` and ``random*`` methods); factors come back with a leading B.
    ``signs`` of the ``svd``/``randomized`` singular vectors: ``"raw"`` as the decomposition
    returns them (torch.linalg.svd's, galore-torch's), ``"canonical"`` by :func:`canonical_signs`."""
    if signs not in SIGN_CONVENTIONS:
        raise ValueError(f"Invalid signs: {signs!r}; expected one of {SIGN_CONVENTIONS}")
    batch, m, n = matrices.shape
    work = matrices.to(compute_dtype(matrices.dtype))
    uses_left, uses_right = side in ("left", "full"), side in ("right", "full")
    if method == "identity":
        eye = lambda size: torch.eye(size, device=matrices.device, dtype=work.dtype).expand(batch, size, size)  # noqa: E731
        return (eye(m) if uses_left else None, eye(n) if uses_right else None)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")
    if method not in METHODS:
        raise ValueError(f"Invalid projector method: {method!r}; expected one of {METHODS}")
    if method in ("randomized", *SEEDED_METHODS) and (seeds is None or seeds.shape != (batch,)):
        raise ValueError(f"the {method!r} projector needs one seed per matrix ({batch})")
    left = right = None
    if method in SEEDED_METHODS:
        draw = random_basis if method == "random" else random_orthonormal_basis
        pairs = [draw(int(seed), (m, n), rank, side, matrices.device, work.dtype, randn=randn)
                 for seed in seeds.tolist()]
        stack = lambda factors: torch.stack(factors) if factors[0] is not None else None  # noqa: E731
        return stack([p[0] for p in pairs]), stack([p[1] for p in pairs])
    if method == "svd":
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        left, right = u[..., :rank], vh[..., :rank, :]
    else:
        # Each side from its own range finder (on A for the left factor, on Aᵀ for the right),
        # so each factor is an orthonormal Q·U even for rank-deficient gradients.
        if uses_left:
            left = _range_basis(work, rank, seeds, power_iters, oversample, randn)
        if uses_right:
            right = _range_basis(work.mT, rank, seeds, power_iters, oversample, randn).mT
    left, right = (left if uses_left else None, right if uses_right else None)
    if signs == "canonical":
        left = None if left is None else canonical_signs(left, dim=-2)
        right = None if right is None else canonical_signs(right, dim=-1)
    return left, right


def compute_basis(matrix: torch.Tensor, rank: int, side: Side, method: str, *, seed: int = 0,
                  power_iters: int = 2, oversample: int = 8,
                  signs: str = "raw") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Factors (left m×r or None, right r×n or None) that span the top-``rank`` subspace of
    ``matrix`` (m×n) on ``side``. ``rank`` must be ≤ min(m, n); ``identity`` ignores it and
    returns identity factors (a test device: the projection then changes nothing)."""
    seeds = torch.tensor([seed], dtype=torch.int64, device=matrix.device)
    left, right = compute_bases(matrix.unsqueeze(0), rank, side, method, seeds=seeds, power_iters=power_iters,
                                oversample=oversample, signs=signs)
    return (None if left is None else left[0], None if right is None else right[0])


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


# -- One weight's projector in a whole step (the ``*_step`` functions of the low-rank families) --

# A refresh at step k seeds its stream with the previous seed + k times this golden-ratio
# increment (mod 2³¹): consecutive refreshes draw well-separated streams.
REFRESH_SEED_STEP = 0x9E3779B1


def refresh_due(state: Mapping[str, torch.Tensor], step: int, update_proj_gap: int) -> bool:
    """GaLore's schedule: a new subspace on steps 1, T+1, 2T+1, … (``step`` counts the steps
    taken before this one), and on a weight's first step (no ``proj_seed`` yet)."""
    return step % update_proj_gap == 0 or "proj_seed" not in state


def refreshed_projector(state: Mapping[str, torch.Tensor], grad_matrix: torch.Tensor, *, step: int, base_seed: int,
                        rank: int, side: Side, method: str, power_iters: int, oversample: int, signs: str,
                        factor_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The projector entries of one weight's state after a refresh at ``step`` from the m×n
    gradient ``grad_matrix`` (already negated when maximizing); ``state`` is only read.

    ``proj_seed``: the refresh's seed is (current + step·REFRESH_SEED_STEP) mod 2³¹, current
    being the stored ``proj_seed`` (``base_seed`` at the first refresh). The seeded methods store
    that seed and nothing else (their factors are regenerated from it on every step); the others
    keep ``proj_seed`` = ``base_seed`` and store what the seed and the gradient give: the factors
    ``proj_left`` / ``proj_right`` (in ``factor_dtype``) or, for ``coordinates``, the selected
    rows or columns ``proj_indices``. A gradient with NaN or Inf never becomes a subspace: the
    previous factors are kept (a seeded Gaussian pair at the first refresh)."""
    first = "proj_seed" not in state
    seed = ((base_seed if first else int(state["proj_seed"])) + step * REFRESH_SEED_STEP) % 2**31
    if method in SEEDED_METHODS:
        return {"proj_seed": torch.tensor(seed, dtype=torch.int64)}
    new = {"proj_seed": torch.tensor(base_seed, dtype=torch.int64)} if first else {}
    if method == "coordinates":
        indices = random_coordinates(seed, side_length(tuple(grad_matrix.shape), side), rank)
        return {**new, "proj_indices": indices.to(grad_matrix.device)}
    if not bool(torch.isfinite(grad_matrix).all()):
        if state.get("proj_left") is not None or state.get("proj_right") is not None:
            return new
        left, right = random_basis(seed, tuple(grad_matrix.shape), rank, side, grad_matrix.device, factor_dtype)
    else:
        left, right = compute_basis(grad_matrix, rank, side, method, seed=seed, power_iters=power_iters,
                                    oversample=oversample, signs=signs)
    factors = {"proj_left": left, "proj_right": right}
    # Owned, contiguous copies: a state tensor, not a view of the decomposition's output.
    return {**new, **{name: torch.empty(factor.shape, dtype=factor_dtype, device=factor.device).copy_(factor)
                      for name, factor in factors.items() if factor is not None}}


def projector_factors(state: Mapping[str, torch.Tensor], shape: tuple[int, int], *, rank: int, side: Side,
                      method: str, dtype: torch.dtype, device: torch.device | str, randn: Randn = philox_randn,
                      rows: range | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The factors (left, right) a step projects an m×n matrix with: regenerated from
    ``proj_seed`` (the seeded methods, their normals drawn by ``randn``), the 0/1 selection of
    ``proj_indices`` (coordinates), or the stored ``proj_left`` / ``proj_right``; regenerated
    ones in ``dtype``. ``rows``: only those rows of a regenerated or selection left factor (a
    row shard's; a stored one is returned as stored)."""
    if method == "random":
        return random_basis(int(state["proj_seed"]), shape, rank, side, device, dtype, randn=randn, rows=rows)
    if method == "random_orthonormal":
        # The Haar QR needs the whole m×r Gaussian (a row shard draws it all, then takes its rows).
        left, right = random_orthonormal_basis(int(state["proj_seed"]), shape, rank, side, device, dtype, randn=randn)
    elif method == "coordinates":
        factor = selection_factor(state["proj_indices"].to(device), side_length(shape, side), side, dtype)
        left, right = (None, factor) if side == "right" else (factor, None)
    else:
        return state.get("proj_left"), state.get("proj_right")
    if rows is not None and left is not None:
        left = left[rows.start: rows.stop]
    return left, right


def step_projector_(state: dict[str, torch.Tensor], grad_matrix: torch.Tensor, *, step: int, base_seed: int,
                    rank: int, side: Side, method: str, update_proj_gap: int, power_iters: int, oversample: int,
                    signs: str, maximize: bool,
                    dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """A whole step's use of one weight's projector: refresh ``state``'s proj_* entries when due
    (:func:`refresh_due`; from −G when maximizing: maximizing f is minimizing −f), then return
    the factors to project with (``dtype``, the weight's) and whether the subspace is new."""
    due = refresh_due(state, step, update_proj_gap)
    if due:
        state.update(refreshed_projector(state, -grad_matrix if maximize else grad_matrix, step=step,
                                         base_seed=base_seed, rank=rank, side=side, method=method,
                                         power_iters=power_iters, oversample=oversample, signs=signs,
                                         factor_dtype=dtype))
    left, right = projector_factors(state, tuple(grad_matrix.shape), rank=rank, side=side, method=method, dtype=dtype,
                                    device=grad_matrix.device)
    return left, right, due
