"""Zeroth-order fine-tuning with forward passes only: one SPSA core (MeZO's seed trick) and
three optimizers on it, MeZO (Malladi et al. 2023), Sparse-MeZO (Liu et al. 2024) and QZO
(Shang et al. 2025).

Memory is inference memory: no gradients and no per-element state. A step perturbs the
parameters in place along z ~ N(0, I) regenerated from (seed, element index) by the
``zeroth_order`` kernels, evaluates the closure at θ + εz and θ − εz, and folds the restore and
the update into the third pass over the parameters (see :mod:`memzoo.reference.zeroth_order`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memzoo.optim.base import (Backend, MemzooOptimizer, StateSpec, check_bool, check_int, check_lr, check_number,
                               deferred_interrupts, is_dtensor, local_tensor)
from memzoo.optim.distributed import (FSDPResharder, gathered_copies, row_block, row_block_problem, shard_groups,
                                      sharded_kth_magnitudes)
from memzoo.reference.zeroth_order import CHUNK, MASK_BYTES_PER_CHUNK

__all__ = ["QZO", "MeZO", "SparseMeZO", "ZerothOrderOptimizer", "collect_quantization_scales"]

_MASK64 = 2**64 - 1


def _mix64(value: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers that scatters nearby inputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(base_seed: int, step: int, sample: int) -> int:
    """The Philox seed of sample ``sample`` of step ``step`` (0-based), in [0, 2**63)."""
    return _mix64(_mix64(_mix64(base_seed) ^ step) ^ sample) >> 1


@dataclass(frozen=True)
class _Shard:
    """Where this rank's elements of a sharded (DTensor) parameter lie in the whole tensor: a block
    of ``numel`` elements from element ``start`` (FSDP2 shards whole rows). The stream indexes the
    whole tensor, so the local elements draw the unsharded tensor's z. The kernels take tensors
    that start on a chunk boundary of the stream: the ``head`` elements before the first boundary
    go through a scratch tensor of at most one chunk (its mask bits at ``head_mask_offset``), the
    rest is passed in place."""

    start: int
    numel: int
    head: int
    head_mask_offset: int


@dataclass
class _Bucket:
    """The perturbed tensors of one param group on one device, with their stream (and mask) offsets
    and, for sharded ones, where their local elements lie (``shards``; None for whole tensors)."""

    group_index: int
    device: torch.device
    params: list[torch.Tensor]
    stream_offsets: list[int]
    mask_offsets: list[int]
    shards: list[_Shard | None]


def _chunks(numel: int) -> int:
    return -(-numel // CHUNK)


def _trained(param: torch.Tensor) -> bool:
    """False for a frozen parameter (an nn.Parameter with requires_grad=False): the official
    trainers perturb and update ``[p for p in model.parameters() if p.requires_grad]`` only."""
    return param.requires_grad or not isinstance(param, torch.nn.Parameter)


def _scalar_loss(value: Any) -> torch.Tensor:
    """The closure's loss as a 0-d float64 tensor, or a clear error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}; "
                "reduce it (e.g. loss.mean()) before returning"
            )
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"the closure must return the loss (a scalar tensor or a number), got {type(value).__name__}")


class ZerothOrderOptimizer(MemzooOptimizer):
    r"""The zeroth-order core: two-point SPSA with the seed trick (MeZO, Algorithm 1).

    For q = ``n_samples`` directions z_k (seeded; regenerated, never stored):

    .. math::
        \hat g_k = \frac{L(\theta + \epsilon z_k) - L(\theta - \epsilon z_k)}{2\epsilon},\qquad
        \theta \leftarrow \theta(1 - \eta\lambda) - \frac{\eta}{q}\sum_k \hat g_k z_k

    ``step(closure)`` needs a closure that runs a forward pass on one batch and returns the loss
    (a scalar tensor or a number). It is run under ``torch.no_grad()``, 2q times per step, at the
    perturbed points; it must not call ``backward``, and the model should be in eval mode (both
    evaluations must see the same function: dropout would make them differ). A closure that
    raises, or returns something other than a scalar, leaves the parameters where they were; one
    that runs ``backward()`` (PyTorch Lightning's automatic optimization) raises and says to use
    manual optimization.

    Every element of every tensor in the param groups is perturbed (put what you train in the
    groups, e.g. biases and norms in a group with ``weight_decay=0`` as the official code
    excludes them from decay), except frozen parameters: an ``nn.Parameter`` with
    ``requires_grad=False`` (e.g. the base weights of a LoRA model) is skipped — neither
    perturbed nor updated, nor decayed — as the official trainers select the parameters with
    ``requires_grad`` only; plain tensors are trained as given. Freezing or unfreezing between
    steps takes effect at the next step; a step with every parameter frozen raises. The estimate and the losses of the last step are kept in
    ``last_projected_grads`` (q,) and ``last_losses`` (q, 2) (device tensors; ``.tolist()`` them
    for logging). ``step`` returns the mean of the 2q losses.

    Distributed (DDP, FSDP2): when ``torch.distributed`` is initialized, the first step broadcasts
    rank 0's seed, and every step all-reduces (averages) the q projected gradients over
    ``process_group`` — the optimizer's only communication, q scalars. The closure returns this
    rank's loss on its own batch, not reduced across ranks: the mean of the ranks' estimates is
    the estimate for the loss averaged over the global batch, and all ranks apply the same
    update. Every rank calls ``step`` (under FSDP2 the closure's forward passes are collectives),
    and ``process_group`` holds every rank that holds shards of the parameters (the default,
    the world, does).

    FSDP2 (``fully_shard``; DTensor parameters split in row blocks, ``Shard(0)``, uneven shards
    included): each rank perturbs and updates only its own rows, drawing for each element the z
    of its position in the whole tensor, so the perturbation and the update are those of the
    unsharded tensor, element for element. FSDP2 keeps the root module's gathered parameters from
    one forward to the next; before each pass over the parameters, the gathered copies of the
    FSDP2 trees that own them are dropped (:class:`~memzoo.optim.distributed.FSDPResharder`), so
    the next forward all-gathers the shards as changed (one all-gather of the root's parameters
    per forward, as their change requires). Sparse-MeZO's thresholds are selected exactly over
    the shards (:func:`sharded_magnitude_thresholds`). With the same losses, a sharded run equals
    the unsharded one bit for bit. Build the optimizer from ``model.parameters()`` while the
    model is sharded (before the first forward, or after ``model.reshard()``): read after a
    forward, the root's parameters are FSDP2's gathered copies, refused at the first step.

    State: the base seed and the step count (in ``state_dict()["zeroth_order"]``), so a resumed
    run draws the same directions. ``state_bytes()`` counts tensors only.

    Non-finite losses: by default a NaN/Inf loss propagates through the update into the parameters
    (as a NaN gradient does in torch.optim); with ``skip_nonfinite=True`` the step puts the
    parameters back to θ, applies no update, counts the skip in ``skipped_steps`` and moves on to
    the next directions. An exception from the closure also puts the parameters back first.

    All-or-nothing (any BaseException: an error, KeyboardInterrupt, SystemExit). The step keeps
    ``position``, the perturbation the parameters carry (0 or ±ε·z of the current sample), and
    sets it inside the same :func:`~memzoo.optim.base.deferred_interrupts` block as the pass that
    changes it, so a Ctrl-C lands between passes, never inside one or between a pass and its
    bookkeeping. An exception while the parameters are perturbed (in the closure, between passes,
    in the estimate) runs one recovering pass from ``position`` to θ and propagates; a pass that
    fails after some groups moved moves them back first. The update pass, the thresholds
    Sparse-MeZO prepared and the step count are written together as one block: a Ctrl-C there is
    delivered once the step is complete. Only an error raised by a kernel in the middle of
    writing the update (no interrupt can cause one) leaves the groups before it updated and puts
    the others back. A chunked fast path does the same per pass: its chunks are one pass.

    How exactly θ comes back. A recovering pass computes round(x − s·ε·z) from the stored
    x = round(θ + s·ε·z): bitwise θ wherever that rounding kept θ's bits, which is every element
    whose perturbed value stays in θ's binade or a finer one. Where it crossed into a coarser
    binade (|θ + εz| > |θ| across a power of two, or |εz| ≫ |θ|), the stored value no longer
    determines θ and the recovered value is the nearest one consistent with it: within one unit
    in the last place of |θ| + |εz| per perturbation undone (two for θ → θ+εz → θ−εz → θ),
    without bias. No memory is kept for those bits: an exact restore would have to store them for
    every such element, and they are many (11 % of N(0, 0.02²) fp32 weights at ε = 1e-3, 8 % in
    bf16): a sparse copy (index + value) of about 0.9 byte per fp32 element, a fifth of the
    weights — against the method's promise of inference memory. The tests hold the restore to
    this bound (and ≥ 90 % of the elements bitwise).
    """

    family = "zeroth_order"
    _extra_state_dict_keys = ("zeroth_order",)
    # The layout of the passes (rebuilt from the param groups at the next step) and the FSDP2
    # modules it found: never copied with the optimizer (a deep copy would copy the modules).
    _CACHES = {"_layout_key": lambda: None, "_buckets": list, "_mask_bytes": dict,
               "_resharder": lambda: FSDPResharder(())}

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        eps: float,
        n_samples: int,
        seed: int,
        process_group: Any = None,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        check_number("eps", eps)
        if not eps > 0 or math.isinf(eps):
            raise ValueError(f"Invalid eps: {eps} (must be a finite number > 0)")
        check_int("n_samples", n_samples, low=1, high=2**20)
        check_int("seed", seed, low=0, high=2**63)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite)
        self.eps = float(eps)
        self.n_samples = n_samples
        self.process_group = process_group
        self._base_seed = seed
        self._step_count = 0
        self._seed_synced = False
        self.last_projected_grads: torch.Tensor | None = None
        self.last_losses: torch.Tensor | None = None

    # -- hooks for subclasses -------------------------------------------------------------
    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        check_lr(group["lr"])
        check_number("weight_decay", group["weight_decay"])

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        return {}

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        # Each rank perturbs and updates its own rows, drawing the unsharded tensor's z for them.
        return row_block_problem(param)

    def _thresholds(self, bucket: _Bucket) -> list[float] | None:
        """Per tensor of the bucket, the magnitude threshold of a masked perturbation, or None."""
        return None

    def _before_step(self) -> None:
        """Prepare per-step data from the unperturbed parameters (Sparse-MeZO's thresholds),
        without writing state: :meth:`_commit_step` stores it with the update."""

    def _commit_step(self) -> None:
        """Store what :meth:`_before_step` prepared; runs with the update, as one write."""

    def _clip_projected(self, projected: torch.Tensor) -> torch.Tensor:
        return projected

    def _clamp_min(self, group: Mapping[str, Any]) -> float | None:
        return None

    # -- layout ---------------------------------------------------------------------------
    def _layout(self) -> list[_Bucket]:
        """Buckets of (group, device) with stream offsets over all groups in order (each tensor's
        offset a multiple of CHUNK, from whole tensors' sizes: the same on every rank and in an
        unsharded run) and per-device mask offsets for the local elements; rebuilt when the
        groups change. Finds the FSDP2 modules of sharded parameters (:class:`FSDPResharder`)."""
        key = tuple((id(p), p.numel(), p.device, _trained(p)) for group in self.param_groups for p in group["params"])
        if key == self._layout_key:
            return self._buckets
        buckets: dict[tuple[int, torch.device], _Bucket] = {}
        stream, mask_bytes = 0, {}
        sharded, whole = [], []

        def reserve_mask(device: torch.device, numel: int) -> int:
            offset = mask_bytes.get(device, 0)
            mask_bytes[device] = offset + _chunks(numel) * MASK_BYTES_PER_CHUNK
            return offset

        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.numel() == 0 or not _trained(param):
                    continue
                bucket = buckets.setdefault((group_index, param.device),
                                            _Bucket(group_index, param.device, [], [], [], []))
                shard = None
                if is_dtensor(param):
                    sharded.append(param)
                    start, numel = row_block(param)
                    head = min(-(stream + start) % CHUNK, numel)
                    shard = _Shard(start, numel, head, reserve_mask(param.device, CHUNK) if head else 0)
                    local_numel = numel - head
                else:
                    whole.append((f"param group {group_index}, param {param_index}", param))
                    local_numel = param.numel()
                bucket.params.append(param)
                bucket.stream_offsets.append(stream)
                bucket.mask_offsets.append(reserve_mask(param.device, local_numel))
                bucket.shards.append(shard)
                stream += _chunks(param.numel()) * CHUNK
        copies = gathered_copies([param for _, param in whole]) if sharded or torch.distributed.is_initialized() else []
        if copies:
            raise ValueError(
                f"{type(self).__name__}: {'; '.join(whole[index][0] for index in copies)} "
                f"{'is' if len(copies) == 1 else 'are'} FSDP2's gathered copies of parameters, not the parameters "
                "(the model's parameters were read after a forward pass, while its root module was unsharded), so "
                "a step would change a copy that FSDP2 frees. Build the optimizer from model.parameters() before "
                "the first forward pass, or after model.reshard()"
            )
        self._resharder = FSDPResharder(sharded)
        self._layout_key, self._buckets, self._mask_bytes = key, list(buckets.values()), mask_bytes
        return self._buckets

    def _mask_buffer(self, device: torch.device) -> torch.Tensor | None:
        return None

    # -- the passes ---------------------------------------------------------------------------
    def _move(self, seed: int, from_sign: int, to_sign: int, *, first: bool = False,
              coefficients: list[torch.Tensor] | None = None, earlier_seeds: tuple[int, ...] = ()) -> None:
        """One pass over every bucket of the layout ``step`` computed (``_layout`` is called once
        per step, not per pass: its key walks every parameter), all-or-nothing: a SIGINT is held
        until the pass ends, and an error raised while a perturbation pass (no update) is under
        way moves the buckets already moved back before it propagates. An update cannot be undone:
        an error raised by the update pass (the kernel writing a group's tensors) leaves the
        groups before it updated and puts the others back at θ."""
        if self._resharder:  # the next forward must gather the shards this pass changes
            self._resharder.reshard()
        moved = 0
        with deferred_interrupts():
            try:
                for bucket in self._buckets:
                    self._move_bucket(bucket, seed, from_sign, to_sign, first, coefficients, earlier_seeds)
                    moved += 1
            except BaseException:
                if coefficients is None:
                    for bucket in self._buckets[:moved]:
                        self._move_bucket(bucket, seed, to_sign, from_sign, False, None, ())
                else:
                    for bucket in self._buckets[moved:]:
                        self._move_bucket(bucket, seed, from_sign, 0, False, None, ())
                raise

    def _move_bucket(self, bucket: _Bucket, seed: int, from_sign: int, to_sign: int, first: bool,
                     coefficients: list[torch.Tensor] | None, earlier_seeds: tuple[int, ...]) -> None:
        """One pass over one bucket (one group's tensors on one device)."""
        group = self.param_groups[bucket.group_index]
        thresholds = self._thresholds(bucket)
        masked = thresholds is not None
        update = {}
        if coefficients is not None:
            update = dict(coefficients=coefficients[bucket.group_index].to(bucket.device),
                          earlier_seeds=earlier_seeds, decay=1.0 - float(group["lr"]) * group["weight_decay"],
                          clamp_min=self._clamp_min(group))
        tensors, stream_offsets, mask_offsets, piece_thresholds = [], [], [], []
        heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (local head, its scratch copy) to write back
        for index, (param, stream_offset, mask_offset, shard) in enumerate(
                zip(bucket.params, bucket.stream_offsets, bucket.mask_offsets, bucket.shards)):
            threshold = thresholds[index] if masked else None
            if shard is None:
                tensors.append(param)
                stream_offsets.append(stream_offset)
                mask_offsets.append(mask_offset)
                piece_thresholds.append(threshold)
                continue
            # A view of the rank's shard (FSDP2's sharded storage, which its all-gather reads),
            # taken at every pass: FSDP2 may swap the storage (e.g. when a state_dict loads).
            local = local_tensor(param).view(-1)
            first_index = stream_offset + shard.start
            if shard.head:
                lead = first_index % CHUNK
                scratch = local.new_zeros(lead + shard.head)
                scratch[lead:].copy_(local[:shard.head])
                heads.append((local[:shard.head], scratch[lead:]))
                tensors.append(scratch)
                stream_offsets.append(first_index - lead)
                mask_offsets.append(shard.head_mask_offset)
                piece_thresholds.append(threshold)
            if shard.numel > shard.head:
                tensors.append(local[shard.head:])
                stream_offsets.append(first_index + shard.head)
                mask_offsets.append(mask_offset)
                piece_thresholds.append(threshold)
        if tensors:
            self._kernels(bucket.device).zo_apply_(
                tensors, stream_offsets, seed=seed, eps=self.eps, from_sign=from_sign, to_sign=to_sign,
                thresholds=piece_thresholds if masked else None,
                mask_bits=self._mask_buffer(bucket.device) if masked else None,
                mask_offsets=mask_offsets if masked else None, write_mask=masked and first, **update,
            )
        for local_head, scratch_head in heads:
            local_head.copy_(scratch_head)

    def _evaluate(self, closure: Callable[[], Any]) -> torch.Tensor:
        gradless = [p for group in self.param_groups for p in group["params"] if p.grad is None]
        with torch.no_grad():
            loss = _scalar_loss(closure())
        backpropagated = [p for p in gradless if p.grad is not None]
        if backpropagated:
            # A closure that re-enables autograd and runs backward() (PyTorch Lightning's automatic
            # optimization does) would silently cost a first-order step per evaluation.
            for param in backpropagated:
                param.grad = None
            raise RuntimeError(
                f"{type(self).__name__}: the closure ran backward() (parameters got gradients); a zeroth-order "
                "step needs forward passes only, and a backward per evaluation costs first-order memory and time. "
                "The closure must only compute the loss. Under PyTorch Lightning, use manual optimization: set "
                "self.automatic_optimization = False in the LightningModule and, in training_step, call "
                "self.optimizers().step(closure=lambda: self.compute_loss(batch))"
            )
        return loss

    def _sync_seed(self, device: torch.device) -> None:
        """Distributed: every rank takes rank 0's base seed before the first step."""
        if self._seed_synced:
            return
        self._seed_synced = True
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or self._step_count:
            return
        seed = torch.tensor([self._base_seed], dtype=torch.int64, device=device)
        source = torch.distributed.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        torch.distributed.broadcast(seed, src=source, group=self.process_group)
        self._base_seed = int(seed.item())

    def _average_across_ranks(self, projected: torch.Tensor) -> torch.Tensor:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return projected
        torch.distributed.all_reduce(projected, group=self.process_group)
        return projected / torch.distributed.get_world_size(self.process_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step (2q closure evaluations); returns the mean loss of the evaluations."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure: a function that runs a forward pass on "
                "the batch and returns the loss (no backward), e.g. step(lambda: loss_fn(model(x), y))"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._check_changed_values()
        buckets = self._layout()
        if not buckets:
            if any(not _trained(p) for group in self.param_groups for p in group["params"]):
                raise ValueError(
                    f"{type(self).__name__}: every parameter in the param groups is frozen (an nn.Parameter with "
                    "requires_grad=False), so there is nothing to train; zeroth-order optimizers, as the official "
                    "trainers, perturb and update only parameters with requires_grad=True (unfreeze what you "
                    "train: param.requires_grad_(True))"
                )
            return self._evaluate(closure)
        device = buckets[0].device
        self._sync_seed(device)
        self._before_step()
        seeds = [sample_seed(self._base_seed, self._step_count, k) for k in range(self.n_samples)]
        losses = []
        # The perturbation the parameters carry: position · ε·z(seed). Each pass sets it as it
        # ends, inside the pass's deferred_interrupts block, so the except clause always knows
        # where the parameters are.
        seed, position = seeds[0], 0
        try:
            for k, seed in enumerate(seeds):
                with deferred_interrupts():
                    self._move(seed, 0, 1, first=k == 0)
                    position = 1
                plus = self._evaluate(closure)
                with deferred_interrupts():
                    self._move(seed, 1, -1)
                    position = -1
                minus = self._evaluate(closure)
                losses.append(torch.stack([plus.to(device), minus.to(device)]))
                if k < len(seeds) - 1:
                    with deferred_interrupts():
                        self._move(seed, -1, 0)
                        position = 0
            losses = torch.stack(losses)  # (q, 2)
            projected = self._average_across_ranks((losses[:, 0] - losses[:, 1]) / (2.0 * self.eps))
            skip = self.skip_nonfinite and not bool(torch.isfinite(projected).all())
            if not skip:
                projected = self._clip_projected(projected)
                # The last sample's direction goes with the restoring pass's seed; the others follow it.
                order = [len(seeds) - 1, *range(len(seeds) - 1)]
                weights = projected[order] / len(seeds)
                coefficients = [(float(group["lr"]) * weights).to(torch.float32) for group in self.param_groups]
            with deferred_interrupts():  # the update and the step's bookkeeping, as one
                if skip:
                    # A NaN/Inf loss (on any rank: the average carries it to all): back to θ, no
                    # update. The seed stream moves on, so the next step does not retry the same
                    # direction.
                    self._move(seeds[-1], -1, 0)
                    self.skipped_steps += 1
                else:
                    position = 0  # the update pass puts back what it does not update if it fails
                    self._move(seeds[-1], -1, 0, coefficients=coefficients, earlier_seeds=tuple(seeds[:-1]))
                position = 0
                self._commit_step()
                self._step_count += 1
                self.last_projected_grads, self.last_losses = projected, losses
        except BaseException:
            if position:
                self._move(seed, position, 0)  # back to θ, then let the error through
            raise
        return losses.mean()

    # -- memory and checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["zeroth_order"] = {"seed": self._base_seed, "step": self._step_count}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of the same optimizer class; the seed and step count come with it."""
        meta = state_dict.get("zeroth_order") if isinstance(state_dict, Mapping) else None
        if not isinstance(meta, Mapping) or set(meta) != {"seed", "step"}:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing or malformed 'zeroth_order' "
                             "entry (seed and step count); was it saved by a zeroth-order optimizer?")
        check_int("seed", meta["seed"], low=0, high=2**63)
        check_int("step", meta["step"], low=0)
        super().load_state_dict(state_dict)
        self._base_seed, self._step_count, self._seed_synced = meta["seed"], meta["step"], True


class MeZO(ZerothOrderOptimizer):
    r"""MeZO (Malladi et al. 2023): zeroth-order SGD with in-place seeded perturbations.

    Defaults are the official ones (ε = 1e-3; lr 1e-6 as in the OPT-13B full-parameter grid).
    The official code restores θ + εz − 2εz + εz in the parameter dtype, which drifts in
    fp16/bf16 (MeZO issue #42); here each pass recovers the unperturbed point from the stored
    one and the update is fused into the restore, so three passes touch each parameter per
    sample instead of four. See :class:`ZerothOrderOptimizer` for the closure and options.

    Args:
        params: tensors or param groups (``lr``, ``weight_decay`` per group).
        lr: learning rate η.
        eps: perturbation size ε.
        weight_decay: decoupled decay λ (θ ← θ(1 − ηλ) − η ĝ z).
        n_samples: q, directions averaged per step (2q forward passes).
        seed: base seed of the directions (rank 0's is used by every rank).
        process_group: the group whose ranks average their estimates (default: the world); under
            FSDP2 it must hold every rank holding shards of the parameters.
        backend: "auto", "triton", "torch" or "reference" (see :func:`memzoo.optim.resolve_backend`).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 n_samples: int = 1, seed: int = 0, process_group: Any = None, backend: Backend = "auto",
                 skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, n_samples=n_samples, seed=seed,
                         process_group=process_group, backend=backend,
                         skip_nonfinite=skip_nonfinite)


# Tensors above this size get their threshold from a strided subsample of this many elements
# (an exact k-th value would need a full-size temporary, and torch.quantile refuses > 2^24).
_THRESHOLD_SAMPLE = 2**24


def magnitude_threshold(param: torch.Tensor, sparsity: float) -> float:
    """Sparse-MeZO's per-layer threshold: the (1 − sparsity) quantile of |θ| (as the k-th
    smallest value, k = round((1 − sparsity)·n)), so |θ| ≤ h selects that fraction of the
    smallest-magnitude weights; +inf for sparsity 0, −inf when nothing is selected."""
    if sparsity == 0.0:
        return math.inf
    flat = param.detach().reshape(-1)
    if flat.numel() > _THRESHOLD_SAMPLE:
        flat = flat[:: -(-flat.numel() // _THRESHOLD_SAMPLE)]
    k = round((1.0 - sparsity) * flat.numel())
    if k == 0:
        return -math.inf
    value = flat.float().abs().kthvalue(k).values
    return float(value.item())


def sharded_magnitude_thresholds(params: list[torch.Tensor], sparsities: list[float]) -> list[float]:
    """:func:`magnitude_threshold` of DTensor parameters (row blocks, see
    :func:`~memzoo.optim.distributed.row_block`), exactly as on the whole tensors (same subsample
    above 2^24 elements), without gathering them: :func:`~memzoo.optim.distributed.sharded_kth_magnitudes`
    on each rank's elements, one selection for all tensors sharded over the same process groups
    (FSDP2: one) — 4 all-reduces of 2 KiB per tensor. A collective: every rank calls it with the
    same tensors."""
    values: list[float] = [0.0] * len(params)
    selections: dict[tuple, list[tuple[int, torch.Tensor, int]]] = {}
    for index, (param, sparsity) in enumerate(zip(params, sparsities)):
        if sparsity == 0.0:
            values[index] = math.inf
            continue
        numel = param.numel()
        stride = -(-numel // _THRESHOLD_SAMPLE) if numel > _THRESHOLD_SAMPLE else 1
        k = round((1.0 - sparsity) * -(-numel // stride))
        if k == 0:
            values[index] = -math.inf
            continue
        start, count = row_block(param)
        local = local_tensor(param).detach().reshape(-1)[:count]
        # The whole tensor's subsample is every stride-th element from element 0.
        groups = shard_groups(param)
        selections.setdefault(tuple(map(id, groups)), []).append((index, local[(-start) % stride::stride], k))
    for key, items in selections.items():
        groups = shard_groups(params[items[0][0]])
        found = sharded_kth_magnitudes([shard for _, shard, _ in items], [k for _, _, k in items], groups)
        for (index, _, _), value in zip(items, found):
            values[index] = value
    return values


class SparseMeZO(ZerothOrderOptimizer):
    r"""Sparse-MeZO (Liu et al. 2024): MeZO that perturbs and updates only the small-magnitude
    weights of each layer, z ← m ⊙ z with m = [|θ| ≤ h_layer].

    ``sparsity`` (per group, default 0.8 as in the paper) is the fraction of each layer left
    alone: h is the (1 − sparsity) quantile of |θ| (:func:`magnitude_threshold`), computed at the
    first step and every ``threshold_interval`` steps (None: never again; the paper fixes h
    before training). The mask itself is dynamic, as the paper's: it is recomputed every step
    from the unperturbed weights against h, by the step's first pass, and kept bit-packed (one
    bit per element, ``state_bytes()`` counts it) so the three passes of the step use the same
    mask although the weights move. Unselected elements are never changed (no decay either).

    Which tensors are masked is not pinned down by the paper: by default ≥2-D weights are and
    1-D/0-D tensors (norms, biases) are perturbed densely (``mask_1d=True`` masks them too).
    Other arguments as :class:`MeZO`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 sparsity: float = 0.8, *, threshold_interval: int | None = None, mask_1d: bool = False,
                 n_samples: int = 1, seed: int = 0, process_group: Any = None, backend: Backend = "auto",
                 skip_nonfinite: bool = False) -> None:
        if threshold_interval is not None:
            check_int("threshold_interval", threshold_interval, low=1)
        check_bool("mask_1d", mask_1d)
        self.threshold_interval = threshold_interval
        self.mask_1d = mask_1d
        self._mask_buffers: dict[torch.device, torch.Tensor] = {}
        self._threshold_values: dict[int, float] = {}
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, sparsity=sparsity), eps=eps,
                         n_samples=n_samples, seed=seed, process_group=process_group, backend=backend,
                         skip_nonfinite=skip_nonfinite)

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        super()._validate_group(group, group_index)
        check_number("sparsity", group["sparsity"], high=1.0)

    def _masked(self, param: torch.Tensor) -> bool:
        return param.dim() >= 2 or self.mask_1d

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        return {"threshold": (torch.Size([]), torch.float32)}

    def _before_step(self) -> None:
        refresh = self._step_count == 0 or (self.threshold_interval is not None
                                            and self._step_count % self.threshold_interval == 0)
        # id(param) → (param, this step's threshold, whether it is new): stored by _commit_step.
        self._step_thresholds: dict[int, tuple[torch.Tensor, float, bool]] = {}
        sharded: list[tuple[torch.Tensor, float]] = []
        for group in self.param_groups:
            for param in group["params"]:
                if not _trained(param):
                    continue
                state = self.state.get(param) or {}
                if refresh or "threshold" not in state:
                    if self._masked(param) and is_dtensor(param):
                        sharded.append((param, group["sparsity"]))
                        continue
                    value = magnitude_threshold(param, group["sparsity"]) if self._masked(param) else math.inf
                    self._step_thresholds[id(param)] = (param, value, True)
                else:
                    value = self._threshold_values.get(id(param))
                    if value is None:  # loaded from a state_dict
                        value = float(state["threshold"].item())
                    self._step_thresholds[id(param)] = (param, value, False)
        if sharded:
            values = sharded_magnitude_thresholds([param for param, _ in sharded], [sparsity for _, sparsity in sharded])
            for (param, _), value in zip(sharded, values):
                self._step_thresholds[id(param)] = (param, value, True)

    def _commit_step(self) -> None:
        for param, value, new in self._step_thresholds.values():
            if new:
                self.state[param]["threshold"] = torch.tensor(value, dtype=torch.float32, device=param.device)
            self._threshold_values[id(param)] = value

    def _thresholds(self, bucket: _Bucket) -> list[float]:
        return [self._step_thresholds[id(param)][1] for param in bucket.params]

    def _mask_buffer(self, device: torch.device) -> torch.Tensor:
        size = self._mask_bytes[device]
        buffer = self._mask_buffers.get(device)
        if buffer is None or buffer.numel() != size:
            buffer = self._mask_buffers[device] = torch.zeros(size, dtype=torch.uint8, device=device)
        return buffer

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._threshold_values.clear()

    def state_bytes(self) -> int:
        """Thresholds (one fp32 per tensor) plus the bit-packed mask of a step (1 bit per element)."""
        return super().state_bytes() + sum(buffer.numel() for buffer in self._mask_buffers.values())


# The layer each collected scale tensor belongs to (weakly held: neither keeps the other alive),
# so that QZO can check at every step that the model still reads the tensor it trains.
_SCALE_LAYERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class _ScaleLayer:
    name: str
    layer: weakref.ReferenceType


def _layer_quant_state(layer: torch.nn.Module) -> Any:
    """The quantization state a 4-bit layer computes with: its weight's, or, when FSDP2 has
    replaced the weight by a DTensor of the packed bytes (which carries none), the layer's own
    copy, which bitsandbytes puts back on the gathered weight at every forward."""
    state = getattr(layer.weight, "quant_state", None)
    return getattr(layer, "quant_state", None) if state is None and is_dtensor(layer.weight) else state


def _unpack_cpu_inference_layout(name: str, layer: torch.nn.Module) -> None:
    """Undo bitsandbytes' CPU inference re-pack of a ``Linear4bit`` (AVX512-BF16 CPUs, done at the
    layer's first no-grad forward in eval mode): the packed weight back to the standard layout and
    the scales back to one float32 per block in block order (0.50's own inverse leaves them as the
    transposed bf16 copy). The model then computes with the same scales, rounded to bf16 once."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as exc:  # pragma: no cover - present wherever the re-pack exists
        raise ValueError(
            f"layer {name!r} was re-packed by bitsandbytes for CPU inference (bf16 scales) and this bitsandbytes "
            "cannot undo it; collect the scales before the model's first forward in eval mode"
        ) from exc
    weight = layer.weight
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    weight.data = data
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).to(torch.float32)
    weight.quant_state = state
    layer.quant_state = state  # the copy bitsandbytes restores a sharded (FSDP2) weight's state from


def collect_quantization_scales(model: torch.nn.Module) -> list[torch.Tensor]:
    """The continuous quantization scales of a bitsandbytes 4-bit model (``Linear4bit``, NF4 or
    FP4): each layer's ``weight.quant_state.absmax`` (float32, one per block of weights), in
    module order — the tensors :class:`QZO` trains.

    The layers are made to keep reading these tensors: on CPUs with AVX512-BF16, bitsandbytes
    (0.50) re-packs a ``Linear4bit`` at its first no-grad forward in eval mode and replaces its
    scales by a transposed bf16 copy — scales collected before would no longer be read, and bf16
    is too coarse for ε = 1e-3 perturbations and 1e-7 updates anyway. So this turns that re-pack
    off for the collected layers (``layer.support_avx512bf16_for_cpu = False``; set it back to
    True after fine-tuning for the faster CPU kernel) and undoes one already done.

    Collect them after the model is on its final device (moving a 4-bit layer re-creates its
    quantization state; :class:`QZO` raises if a layer stops reading its collected scales).
    Under FSDP2 (``fully_shard``), collect them before sharding or after: FSDP2 shards the packed
    4-bit weights, while the scales stay whole on every rank (they are not parameters), and every
    rank perturbs them alike. Raises ValueError when the model has no 4-bit layers, or when its scales are
    double-quantized (8-bit absmax), which cannot be perturbed meaningfully.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("QZO needs bitsandbytes (pip install bitsandbytes)") from exc
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = _layer_quant_state(module)
        if state is None:
            raise ValueError(f"layer {name!r} is not quantized yet: move the model to its device "
                             "(which quantizes Linear4bit weights) before collecting the scales")
        packed = getattr(state, "packing_format_for_cpu", False)
        if packed and is_dtensor(module.weight):
            raise ValueError(f"layer {name!r} was re-packed by bitsandbytes for CPU inference and then sharded by "
                             "FSDP2; collect the scales before fully_shard(...) (which keeps the standard layout)")
        if (state.nested and not packed) or getattr(state, "original_nested", False) or state.absmax.dtype == torch.uint8:
            raise ValueError(
                f"layer {name!r} has double-quantized scales (8-bit absmax): QZO perturbs float scales. "
                "Load the model with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=False) "
                "or build the layers with bnb.nn.Linear4bit(..., compress_statistics=False)"
            )
        layers.append((name, module, packed))
    if not layers:
        raise ValueError(
            "the model has no bitsandbytes 4-bit layers (bnb.nn.Linear4bit): quantize it first, e.g. "
            "from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=False))"
        )
    scales = []
    for name, module, packed in layers:  # every layer checked before any is changed
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if packed:
            _unpack_cpu_inference_layout(name, module)
        absmax = _layer_quant_state(module).absmax
        _SCALE_LAYERS[absmax] = _ScaleLayer(name, weakref.ref(module))
        scales.append(absmax)
    return scales


class QZO(ZerothOrderOptimizer):
    r"""QZO (Shang et al. 2025): zeroth-order fine-tuning of a 4-bit quantized model through its
    continuous quantization scales Δ (w = Δ·w̄; the packed 4-bit w̄ is never touched).

    Q-SPSA as MeZO on the scales, with the paper's directional-derivative clipping (DDC):
    ĝ ← clip(ĝ, −C, C) with C = ``clip_threshold`` (the official code's 100; None disables), and
    the update keeps scales positive, Δ ← max(Δ − η ĝ z, ``scale_min``) (the code's 1e-7).

    ``params`` are the scales from :func:`collect_quantization_scales` (or groups of them); at
    every step QZO checks that each layer still reads the scale tensor it trains, and raises
    otherwise (the layer was moved or re-quantized after collection). Other tensors given as
    scales (e.g. the scale buffers of another 4-bit format) are trained as given; an
    ``nn.Parameter`` (a weight or bias: quantization scales are not parameters) or a tensor with
    negative values is refused. Other trainable tensors (norms, biases, an unquantized head) go in a group with
    ``"scales": False``: they get plain MeZO (decay, no clamp), the official
    ``--train_unquantized`` option. Scale groups get no weight decay unless asked for.

    Args: as :class:`MeZO`, plus ``clip_threshold``, ``scale_min`` and ``scales`` (the default of
    the group key: False trains every group as plain MeZO with DDC). Defaults: lr 1e-7, ε 1e-3
    (the official OPT-6.7B example).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-7, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 clip_threshold: float | None = 100.0, scale_min: float = 1e-7, scales: bool = True,
                 n_samples: int = 1, seed: int = 0, process_group: Any = None, backend: Backend = "auto",
                 skip_nonfinite: bool = False) -> None:
        if clip_threshold is not None:
            check_number("clip_threshold", clip_threshold)
        check_number("scale_min", scale_min)
        self.clip_threshold = clip_threshold
        self.scale_min = float(scale_min)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, scales=scales), eps=eps,
                         n_samples=n_samples, seed=seed, process_group=process_group, backend=backend,
                         skip_nonfinite=skip_nonfinite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for index, param in enumerate(params):
            if isinstance(param, torch.Tensor) and param.dtype == torch.uint8:
                raise TypeError(
                    f"param group {len(self.param_groups)}, param {index} is uint8: double-quantized or packed "
                    "4-bit data; pass the float scales from memzoo.optim.collect_quantization_scales(model)"
                )
        super().add_param_group({**param_group, "params": params})

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        super()._validate_group(group, group_index)
        check_bool("scales", group["scales"])
        if not group["scales"]:
            return
        for index, param in enumerate(group.get("params", ())):
            problem = ("is an nn.Parameter (a weight or bias; quantization scales are not parameters)"
                       if isinstance(param, torch.nn.Parameter)
                       else "has negative values (quantization scales are positive)"
                       if param.is_floating_point() and bool((param < 0).any()) else None)
            if problem:
                raise ValueError(
                    f"param {index} (shape {tuple(param.shape)}, {param.dtype}) {problem}: QZO trains the "
                    "4-bit quantization scales from memzoo.optim.collect_quantization_scales(model); train "
                    "other tensors (biases, norms) by plain MeZO in a group with \"scales\": False"
                )

    def _check_scales_read(self, when: str) -> None:
        """Raise unless every collected scale tensor is still the one its layer reads."""
        for group in self.param_groups:
            if not group["scales"]:
                continue
            for param in group["params"]:
                owner = _SCALE_LAYERS.get(param)
                if owner is None:
                    continue
                layer = owner.layer()
                state = None if layer is None else _layer_quant_state(layer)
                if state is not None and state.absmax is not param:
                    raise RuntimeError(
                        f"QZO: layer {owner.name!r} no longer reads the scale tensor this optimizer trains "
                        f"({when}): bitsandbytes replaced weight.quant_state.absmax (the model was moved to another "
                        "device, re-quantized, or re-packed for CPU inference after "
                        "layer.support_avx512bf16_for_cpu was set back to True). Collect the scales again with "
                        "collect_quantization_scales(model) once the model is on its final device, and build "
                        "the optimizer from them"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One QZO step (2q closure evaluations); raises if a layer stopped reading its scales."""
        self._check_scales_read("before this step")
        loss = super().step(closure)
        self._check_scales_read("during this step; its perturbation may be left in the layer's new scales")
        return loss

    def _clip_projected(self, projected: torch.Tensor) -> torch.Tensor:
        if self.clip_threshold is None:
            return projected
        return projected.clamp(-self.clip_threshold, self.clip_threshold)

    def _clamp_min(self, group: Mapping[str, Any]) -> float | None:
        return self.scale_min if group["scales"] else None
