"""Low-rank methods on FSDP2 row shards: where a shard lies, and the collectives that replace a
whole matrix.

FSDP2 (``fully_shard``) splits each weight along dim 0: rank k holds rows ``[offset, offset +
rows)`` of the m×n matrix G a projector sees (``torch.chunk`` sizes, so shards may be uneven or
empty). No rank ever holds a whole weight or a whole gradient here; what the low-rank methods
need of the whole matrix reduces to sums over the row shards G_k:

- a right factor Q (r×n) is replicated: R_k = G_k·Qᵀ, its moments and the back-projection
  N_k·Q are local rows (state sharded like the weight);
- a left factor P (m×r) is row-sharded like the weight: R = PᵀG = Σ_k P_kᵀ·G_k is one r×n
  all-reduce per step, after which R and its moments are replicated (r-sized) and the
  back-projection P_k·N is local;
- refreshes (:func:`sharded_bases`): the randomized range finder needs all-reduces of n×w
  sketches (Σ G_kᵀ·(G_k·Ω)) and w×w Gram matrices (Cholesky-QR over row shards), w = r +
  oversample; the exact SVD comes from the eigen-decomposition of GᵀG = Σ G_kᵀ·G_k (one n×n
  all-reduce per refresh, in float64), left vectors as G_k·V orthonormalized over the shards;
- seeded factors are regenerated on every rank (its rows of P, the whole Q), no communication.

Every replicated quantity comes out of an all-reduce, so all ranks hold the same bits and make
the same decisions (eigenvector signs included). Against the unsharded step the sums differ only
in the order of their additions; tests/test_fsdp_lowrank.py bounds the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from memzoo.optim.base import is_dtensor
from memzoo.reference.projector import METHODS, Randn, Side, canonical_signs, _orthonormal

__all__ = ["RowShard", "lay_out_row_state", "row_shard", "sharded_bases", "sharding_problem"]


@dataclass(frozen=True, eq=False)
class RowShard:
    """The rows of an m×n weight matrix that this rank holds, and how to reach the others."""

    mesh: Any  # DeviceMesh
    placements: tuple[Any, ...]
    group: Any  # the process group over which the row shards add up to the whole matrix
    offset: int
    rows: int
    total: int

    @property
    def key(self) -> tuple:
        """What weights batched together must share (same group, same rows)."""
        return (id(self.group), self.offset, self.rows, self.total)

    @property
    def index(self) -> range:
        return range(self.offset, self.offset + self.rows)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the row shards, in place (every rank gets the same bits)."""
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_many_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum several tensors over the row shards with one collective (a flat buffer)."""
        if not tensors:
            return tensors
        flat = self.all_reduce_(torch.cat([tensor.reshape(-1) for tensor in tensors]))
        return [chunk.view_as(tensor) for chunk, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world, *shape): every rank's ``tensor``, in the order of the rows they hold."""
        world = torch.distributed.get_world_size(self.group)
        out = torch.empty((world * tensor.numel(),), dtype=tensor.dtype, device=tensor.device)
        torch.distributed.all_gather_into_tensor(out, tensor.contiguous().reshape(-1), group=self.group)
        return out.view(world, *tensor.shape)

    def distribute(self, local: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A DTensor of global ``shape`` (first dim m) whose local rows are ``local``, sharded
        like the weight (so it checkpoints and reshards with it)."""
        from torch.distributed.tensor import DTensor

        shape = torch.Size(shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=shape, stride=stride)


def lay_out_row_state(state: dict[str, Any], device: torch.device, shard: RowShard, sharded: Any) -> None:
    """Lay out a loaded state dict of a row-sharded weight as the step keeps it, whoever wrote it
    (one process, or ``torch.distributed.checkpoint`` read on any world size, which creates a
    plain tensor for every state not shaped like the parameter): the keys in ``sharded`` (first
    dim the weight's m rows) given whole keep this rank's rows, as a DTensor sharded like the
    weight; every other tensor given as a DTensor (r-sized, replicated) is gathered whole (a
    collective: every rank loads). Rows are copied onto ``device`` (the weight's)."""
    for name, value in list(state.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if name in sharded and not is_dtensor(value):
            rows = value[shard.offset: shard.offset + shard.rows].to(device, copy=True)
            state[name] = shard.distribute(rows, value.shape)
        elif name not in sharded and is_dtensor(value):
            state[name] = value.full_tensor()


def sharding_problem(param: torch.Tensor) -> str | None:
    """Why a DTensor weight's projection cannot run on its shards (None when it can: one mesh
    dimension places it ``Shard(0)``, FSDP2's row sharding, the others ``Replicate``, as HSDP's;
    only the 1-D FSDP2 mesh is tested)."""
    from torch.distributed.tensor import Replicate, Shard

    shards = [p for p in param.placements if isinstance(p, Shard)]
    if len(shards) != 1 or shards[0].dim != 0 or not all(
            isinstance(p, (Shard, Replicate)) for p in param.placements):
        return (f"its placements {tuple(param.placements)} are not FSDP2's row sharding (one Shard(0), "
                "the rest Replicate), the one layout projected weights are stepped on")
    return None


def row_shard(param: torch.Tensor, matrix_rows: int) -> RowShard | None:
    """The rows of the (m = ``matrix_rows``)×n matrix that this rank holds of a DTensor weight
    sharded as :func:`sharding_problem` accepts; None for a plain tensor."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    dim = next(i for i, p in enumerate(placements) if isinstance(p, Shard))
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    rows = local_shape[0]
    return RowShard(mesh, placements, mesh.get_group(dim), offset[0] if rows else matrix_rows, rows, matrix_rows)


# -- refreshes on row shards ----------------------------------------------------------------------
def orthonormal_rows(matrices: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """The local rows of an orthonormal basis of the column space of a row-sharded (B, m, k)
    matrix, given its local rows (B, rows, k): Cholesky-QR with the k×k Gram matrix all-reduced
    in float64 (the reference's :func:`memzoo.reference.projector._orthonormal`, summed over the
    shards). A numerically singular Gram matrix (a rank-deficient sketch) falls back to TSQR: a
    local Householder QR on each rank, then one QR of the stacked k×k triangles (all-gathered)."""
    wide = matrices.to(torch.float64)
    gram = shard.all_reduce_(wide.mT @ wide)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return _tsqr(matrices, shard)
    return torch.linalg.solve_triangular(factor.mT, wide, upper=True, left=False).to(matrices.dtype)


def _tsqr(matrices: torch.Tensor, shard: RowShard) -> torch.Tensor:
    batch, rows, k = matrices.shape
    local_q, local_r = torch.linalg.qr(matrices, mode="reduced")  # (B, rows, h), (B, h, k), h = min(rows, k)
    height = local_r.shape[-2]
    padded = torch.zeros((batch, k, k), dtype=matrices.dtype, device=matrices.device)
    padded[:, :height] = local_r
    triangles = shard.all_gather(padded)  # (world, B, k, k)
    heights = shard.all_gather(torch.tensor([height], device=matrices.device)).view(-1).tolist()
    # Only the triangles' real rows: a padding row would let the stacked QR put a basis vector
    # where no local Q column exists (the stack is rank-deficient here).
    stacked = torch.cat([triangles[j, :, :h] for j, h in enumerate(heights)], dim=1)  # (B, Σh, k), Σh ≥ k
    outer_q = torch.linalg.qr(stacked, mode="reduced").Q
    start = sum(heights[: torch.distributed.get_rank(shard.group)])
    return local_q @ outer_q[:, start: start + height]


def canonical_signs_rows(left: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """:func:`memzoo.reference.projector.canonical_signs` of a row-sharded (B, m, r) factor's
    columns from its local rows: each column's entry of largest magnitude over all shards (the
    first on a tie, shards in row order) made positive; one all-gather of 2·B·r values."""
    batch, rows, rank = left.shape
    if rows:
        index = left.abs().argmax(dim=-2, keepdim=True)
        signed = left.gather(-2, index).squeeze(-2)
    else:
        signed = torch.zeros((batch, rank), dtype=left.dtype, device=left.device)
    # An empty shard bids −1 so that it never wins.
    magnitude = signed.abs() if rows else -torch.ones_like(signed)
    gathered = shard.all_gather(torch.stack([magnitude, signed]))  # (world, 2, B, r)
    winner = gathered[:, 0].argmax(dim=0, keepdim=True)  # the first shard holding the largest magnitude
    signs = gathered[:, 1].gather(0, winner).squeeze(0).sign()
    return left * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(-2)


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors.flip(-1)[..., :rank]


def _left_range(local: torch.Tensor, shard: RowShard, n: int, rank: int, seeds: torch.Tensor, power_iters: int,
                oversample: int, randn: Randn) -> torch.Tensor:
    """The reference's ``_range_basis`` on A = G (row-sharded): the local rows of the left factor."""
    batch = local.shape[0]
    width = min(rank + oversample, shard.total, n)
    sketch = randn(seeds.view(-1, 1), torch.arange(n * width, device=local.device)).view(batch, n, width)
    basis = orthonormal_rows(local @ sketch.to(local.dtype), shard)
    for _ in range(power_iters):
        basis = orthonormal_rows(local @ _orthonormal(shard.all_reduce_(local.mT @ basis)), shard)
    small = shard.all_reduce_(basis.mT @ local).to(torch.float64)  # (B, w, n)
    return basis @ _top_eigenvectors(small @ small.mT, rank).to(local.dtype)


def _right_range(local: torch.Tensor, shard: RowShard, n: int, rank: int, seeds: torch.Tensor, power_iters: int,
                 oversample: int, randn: Randn) -> torch.Tensor:
    """The reference's ``_range_basis`` on A = Gᵀ (column-sharded): the whole right factor."""
    batch = local.shape[0]
    width = min(rank + oversample, shard.total, n)
    # The rows of the m×w sketch Ω this rank's columns of A meet.
    offsets = torch.arange(shard.offset * width, (shard.offset + shard.rows) * width, device=local.device)
    sketch = randn(seeds.view(-1, 1), offsets).view(batch, shard.rows, width).to(local.dtype)
    basis = _orthonormal(shard.all_reduce_(local.mT @ sketch))  # Gᵀ·Ω, (B, n, w)
    for _ in range(power_iters):
        basis = _orthonormal(shard.all_reduce_(local.mT @ orthonormal_rows(local @ basis, shard)))
    projected = (local @ basis).to(torch.float64)  # (basisᵀ·A)ᵀ, row-sharded (B, rows, w)
    top = _top_eigenvectors(shard.all_reduce_(projected.mT @ projected), rank).to(local.dtype)
    return (basis @ top).mT


def sharded_bases(local: torch.Tensor, shard: RowShard, n: int, rank: int, side: Side, method: str, *,
                  seeds: torch.Tensor, power_iters: int, oversample: int, signs: str,
                  randn: Randn) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`memzoo.reference.projector.compute_bases` for row-sharded matrices: ``local``
    holds this rank's rows (B, rows, n) of B m×n matrices. Returns (the local rows (B, rows, r)
    of the left factors or None, the whole right factors (B, r, n) or None).

    ``randomized``: the same range finder and sketch as unsharded, the same subspace up to the
    order of the sums. ``svd``: the top-r eigenvectors of GᵀG (float64, one n×n all-reduce) as
    the right factor, G·V orthonormalized over the shards as the left one. ``identity``: identity
    factors.

    Signs: the raw signs of a LAPACK SVD or eigen-solver are not a continuous function of its
    input (summing in another order can flip a vector), so they cannot be reproduced from shards;
    the vectors are signed canonically (:func:`canonical_signs`) whatever ``signs`` says. The
    subspace, and the first step after a refresh, do not depend on signs; moments carried across
    a refresh do (as they depend on the raw signs of the unsharded run)."""
    if method not in ("svd", "randomized", "identity"):
        raise ValueError(f"sharded_bases computes 'svd', 'randomized' or 'identity' bases, not {method!r} "
                         f"(one of {METHODS})")
    batch, rows, _ = local.shape
    work_dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
    work = local.to(work_dtype)
    uses_left, uses_right = side in ("left", "full"), side in ("right", "full")
    left = right = None
    if method == "identity":
        eye = torch.eye(max(shard.total, n), dtype=work_dtype, device=local.device)
        left = eye[shard.offset: shard.offset + rows, : shard.total].expand(batch, rows, shard.total)
        right = eye[:n, :n].expand(batch, n, n)
        return (left if uses_left else None, right if uses_right else None)
    if method == "svd":
        wide = work.to(torch.float64)
        vectors = _top_eigenvectors(shard.all_reduce_(wide.mT @ wide), rank)  # (B, n, r): V
        if uses_right:
            right = vectors.mT.to(work_dtype)
        if uses_left:  # G·V = U·Σ: orthogonal columns, normalized over the shards
            left = orthonormal_rows((wide @ vectors).to(work_dtype), shard)
    else:
        if uses_left:
            left = _left_range(work, shard, n, rank, seeds, power_iters, oversample, randn)
        if uses_right:
            right = _right_range(work, shard, n, rank, seeds, power_iters, oversample, randn)
    left = None if left is None else canonical_signs_rows(left, shard)
    right = None if right is None else canonical_signs(right, dim=-1)
    return left, right
