"""What sharded training needs beyond per-element math on the local shards.

- Where a DTensor parameter's local elements lie in the whole tensor (:func:`row_block`), so that a
  seeded stream indexed by element (the zeroth-order perturbations) draws on each rank exactly the
  numbers the unsharded tensor gets.
- FSDP2 bookkeeping for optimizers that change parameters between forward passes
  (:class:`FSDPResharder`): the next forward must all-gather from the changed shards.
- An exact k-th smallest magnitude over a tensor sharded across ranks (:func:`sharded_kth_magnitudes`,
  Sparse-MeZO's threshold) from 4 all-reduces of 256-bin histograms.
- Resuming an optimizer from a ``torch.distributed.checkpoint`` (DCP) checkpoint on any world size
  (:func:`load_optimizer_state`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from memzoo.optim.base import MemzooOptimizer, is_dtensor, zeros_state

__all__ = ["FSDPResharder", "load_optimizer_state", "row_block", "row_block_problem", "sharded_kth_magnitudes"]


# -- where a shard lies ------------------------------------------------------------------------
def row_block_problem(param: torch.Tensor) -> str | None:
    """Why the local tensor of DTensor ``param`` is not one contiguous block of the whole tensor's
    elements in row-major order (None when it is: every placement ``Shard(0)`` or ``Replicate``,
    as FSDP2's row sharding, and a contiguous local tensor)."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in param.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            return (f"its placement {placement} does not split it into row blocks; zeroth-order steps take "
                    "parameters sharded along dim 0 (FSDP2's default Shard(0)) or replicated")
    if not param.to_local().is_contiguous():
        return "its local tensor is not contiguous (the perturbation is written in place, in memory order)"
    return None


def row_block(param: torch.Tensor) -> tuple[int, int]:
    """(index of the first local element in the whole tensor, number of local elements) of a
    DTensor whose local tensor is a block of whole rows (see :func:`row_block_problem`)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    numel = 1
    for size in local_shape:
        numel *= size
    if numel == 0:
        return 0, 0
    row = 1
    for size in param.shape[1:]:
        row *= size
    return (offset[0] * row if offset else 0), numel


def shard_groups(param: torch.Tensor) -> tuple[Any, ...]:
    """The process groups over which ``param``'s shards add up to the whole tensor (the mesh
    dimensions placed ``Shard``; empty for a replicated DTensor or a plain tensor)."""
    from torch.distributed.tensor import Shard

    if not is_dtensor(param):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(param.placements) if isinstance(placement, Shard))


# -- FSDP2 ------------------------------------------------------------------------------------
def _fsdp_state_class() -> type | None:
    for path in ("torch.distributed.fsdp._fully_shard._fsdp_state", "torch.distributed._composable.fsdp._fsdp_state"):
        try:
            module = __import__(path, fromlist=["FSDPState"])
        except ImportError:
            continue
        return module.FSDPState
    return None


def _fsdp_states() -> list[Any]:
    """Every live FSDP2 state (one per ``fully_shard`` call), from torch's registry of composable
    states."""
    if not torch.distributed.is_available():
        return []
    state_class = _fsdp_state_class()
    if state_class is None:
        return []
    from torch.distributed._composable_state import _module_state_mapping

    states = []
    for reference in list(_module_state_mapping.values()):
        state = reference()
        if isinstance(state, state_class) and all(state is not seen for seen in states):
            states.append(state)
    return states


def _fsdp_params(state: Any) -> list[Any]:
    return [fsdp_param for group in state._fsdp_param_groups for fsdp_param in group.fsdp_params]


class FSDPResharder:
    """Makes the next forward pass of FSDP2 modules read their parameters from the shards.

    FSDP2 all-gathers a module's parameters before its forward and frees the gathered copy after
    it, except for the root module (``reshard_after_forward`` defaults to False there), whose
    gathered copy lives on until the end of the backward pass. An optimizer that changes the shards
    between forward passes without a backward (zeroth-order steps) would have its change missed
    by the root's next forward. :meth:`reshard` drops every gathered copy of the FSDP2 trees that
    own the given parameters (``reset_iter_state()`` on each root, which also discards a
    prefetched all-gather and the per-forward bookkeeping FSDP2 otherwise accumulates until a
    backward; ``reshard()`` on each module before the first forward or on a torch without it), so
    the next forward all-gathers the current shards. Costs one all-gather of the root's
    parameters per forward, which any change of them between forwards needs anyway.

    FSDP2's internals are reached through its registry of module states (torch has no public
    map from a parameter to its FSDP module); a torch whose internals differ raises a
    ``RuntimeError`` here rather than training on stale parameters.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        wanted = {id(param) for param in params if is_dtensor(param)}
        self._states: list[Any] = []
        if not wanted:
            return
        try:
            for state in _fsdp_states():
                if any(id(fsdp_param.sharded_param) in wanted for fsdp_param in _fsdp_params(state)):
                    self._states.append(state)
        except AttributeError as exc:  # pragma: no cover - another torch's internals
            raise RuntimeError(f"memzoo cannot find the FSDP2 modules of the sharded parameters in torch "
                               f"{torch.__version__} ({exc}); please report it") from exc

    def __bool__(self) -> bool:
        return bool(self._states)

    def reshard(self) -> None:
        """Drop the gathered copies, so that the next forward all-gathers the shards."""
        roots: list[Any] = []
        for state in self._states:
            root = next((other for other in state._state_ctx.all_states if other._is_root), None)
            if root is None:  # before the first forward: nothing is gathered unless asked for
                for module in state._modules:
                    module.reshard()
            elif all(root is not seen for seen in roots):
                roots.append(root)
        for root in roots:
            module = root._modules[0]
            if hasattr(module, "reset_iter_state"):
                module.reset_iter_state()
            else:  # pragma: no cover - torch < 2.13
                for state in root._state_ctx.all_states:
                    for owned in state._modules:
                        owned.reshard()


def gathered_copies(params: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the tensors in ``params`` that are FSDP2's gathered copy of a parameter rather
    than the parameter (``model.parameters()`` read while the root module was unsharded, after a
    forward pass without backward)."""
    copies: set[int] = set()
    for state in _fsdp_states():
        for fsdp_param in _fsdp_params(state):
            for name in ("_unsharded_param", "_sharded_post_forward_param"):
                copy = getattr(fsdp_param, name, None)
                if copy is not None:
                    copies.add(id(copy))
    return [index for index, tensor in enumerate(params) if id(tensor) in copies]


# -- an exact order statistic over shards -------------------------------------------------------
_SELECT_SLICE = 1 << 22  # elements whose bit patterns are materialized at a time


def _digit_counts(values: torch.Tensor, prefix: int, shift: int) -> torch.Tensor:
    """How many elements of ``values`` have |x|'s float32 bit pattern agree with ``prefix`` above
    bit ``shift + 8``, by their byte at ``shift`` (256 counts, int64)."""
    counts = torch.zeros(256, dtype=torch.int64, device=values.device)
    for start in range(0, values.numel(), _SELECT_SLICE):
        bits = values[start:start + _SELECT_SLICE].float().abs().view(torch.int32)
        if shift < 24:
            bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
        counts += torch.bincount(((bits >> shift) & 0xFF).long(), minlength=256)
    return counts


def sharded_kth_magnitudes(shards: Sequence[torch.Tensor], ks: Sequence[int], groups: Sequence[Any]) -> list[float]:
    """For each tensor t whose elements are split over ranks (``shards[t]``: this rank's, 1-D),
    the ``ks[t]``-th smallest |x| in float32 (1-based, as ``x.float().abs().kthvalue(k)`` of the
    whole tensor), exactly.

    Radix selection on the bit patterns of |x| (non-negative float32 values order as their int32
    bit patterns): four rounds, each counting the candidates by one byte of the pattern and
    summing the counts over ``groups`` (the process groups whose ranks hold the other shards, all
    summed in turn). Costs 4 passes over the local elements and 4 all-reduces of a (tensors, 256)
    int64 tensor (2 KiB per tensor), whatever the tensor's size; no element leaves its rank.
    """
    if not shards:
        return []
    device = shards[0].device
    prefixes, remaining = [0] * len(shards), list(ks)
    for shift in (24, 16, 8, 0):
        counts = torch.stack([_digit_counts(shard, prefix, shift).to(device) for shard, prefix in zip(shards, prefixes)])
        for group in groups:
            torch.distributed.all_reduce(counts, group=group)
        cumulative = counts.cumsum(dim=1).cpu()
        for index in range(len(shards)):
            digit = int(torch.searchsorted(cumulative[index], remaining[index]))
            if digit > 255:
                raise ValueError(f"k = {ks[index]} exceeds the number of elements ({int(cumulative[index, -1])})")
            remaining[index] -= int(cumulative[index, digit - 1]) if digit else 0
            prefixes[index] |= digit << shift
    return [torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item() for prefix in prefixes]


# -- checkpoints ----------------------------------------------------------------------------
def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint_id: str | os.PathLike | None = None, *,
                         key: str = "optimizer", storage_reader: Any = None, process_group: Any = None) -> None:
    """Load into ``optimizer`` the state saved with ``torch.distributed.checkpoint.save({key:
    optimizer.state_dict(), ...}, checkpoint_id=...)``, on this world size, whatever the one that
    saved it: DTensor state (sharded like FSDP2 parameters) is resharded to this run's shards by
    DCP; replicated state (step counts, seeds, Sparse-MeZO's thresholds) is read by every rank.

    ``dcp.load`` fills tensors that exist: a fresh optimizer has no state yet, so the state tensors
    are first created from the checkpoint's metadata (shape and dtype of each saved entry),
    sharded like their parameter when shaped like it; hyperparameters and memzoo's bookkeeping
    come with them. The result then goes through the optimizer's own ``load_state_dict`` with
    all its checks, so a checkpoint of another optimizer or other param groups raises a
    ``ValueError`` and changes nothing. Every rank calls this (it is a collective), as
    ``dcp.load``; ``storage_reader`` replaces the default ``FileSystemReader(checkpoint_id)``.

    8-bit moments of row-sharded weights, quantized in blocks of each rank's rows, saved on
    another world size are decoded with the saved blocks and encoded again in this run's
    (``MemzooOptimizer._reshard_loaded``): one more 8-bit quantization error per value, where the
    same world size loads bitwise. State that cannot be laid out on this run's shards is refused
    with a ``ValueError`` before anything is loaded (``MemzooOptimizer._resharding_problem``).

    Works for any optimizer whose ``state_dict`` keys its state by parameter index (memzoo's,
    torch.optim's); the parameters must be given in the same order as when saving.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if storage_reader is None:
        if checkpoint_id is None:
            raise ValueError("load_optimizer_state needs checkpoint_id (a DCP checkpoint directory) or a storage_reader")
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    metadata = storage_reader.read_metadata()
    params = [param for group in optimizer.param_groups for param in group["params"]]
    prefix = f"{key}.state."
    if not any(name == key or name.startswith(f"{key}.") for name in metadata.state_dict_metadata):
        raise ValueError(f"the checkpoint has no entry {key!r}; saved keys: "
                         f"{sorted({name.split('.')[0] for name in metadata.state_dict_metadata})}")
    state: dict[int, dict[str, Any]] = {}
    for name, entry in metadata.state_dict_metadata.items():
        if not name.startswith(prefix):
            continue
        index, _, state_key = name[len(prefix):].partition(".")
        if not index.isdigit() or int(index) >= len(params) or not state_key or "." in state_key:
            raise ValueError(f"checkpoint entry {name!r} is not the state of one of the optimizer's {len(params)} "
                             "parameters (saved from optimizer.state_dict() with other param groups?)")
        if isinstance(entry, TensorStorageMetadata):
            value = zeros_state(params[int(index)], entry.size, entry.properties.dtype)
        else:
            value = None  # a non-tensor value: read as saved
        state.setdefault(int(index), {})[state_key] = value
    template = optimizer.state_dict()
    template["state"] = state
    loaded = {key: template}
    # DCP loads only entries the template has and fails on any it lacks: compare the structures
    # first (hyperparameters, memzoo's bookkeeping) for a clear error.
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    expected = set(flatten_state_dict(loaded)[0])
    saved = {name for name in metadata.state_dict_metadata if name.startswith(f"{key}.")}
    if expected != saved:
        raise ValueError(
            f"the checkpoint's {key!r} was not saved from a state_dict like this {type(optimizer).__name__}'s "
            f"(another optimizer, or other param groups): it lacks {sorted(expected - saved)[:6]} and has "
            f"{sorted(saved - expected)[:6]}"
        )
    problem = optimizer._resharding_problem(
        {index: {name: metadata.state_dict_metadata[f"{prefix}{index}.{name}"].size
                 for name, value in entry.items() if value is not None} for index, entry in state.items()}
    ) if isinstance(optimizer, MemzooOptimizer) else None
    if problem:
        raise ValueError(f"the checkpoint's {key!r} cannot be loaded on this world size: {problem}")
    dcp.load(loaded, storage_reader=storage_reader, process_group=process_group)
    if isinstance(optimizer, MemzooOptimizer):
        optimizer._reshard_loaded(loaded[key]["state"])
    optimizer.load_state_dict(loaded[key])
