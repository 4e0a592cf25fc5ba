"""COSMOS (Liu et al. 2025): SOAP in the leading eigensubspace of each weight, Muon on the rest."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
    group_by_device,
    local_tensor,
    resolve_backend,
    zeros_state,
)
from memzoo.optim.sharded import RowShard, lay_out_row_state, row_shard, sharding_problem
from memzoo.reference import cosmos as reference
from memzoo.reference.common import host_values, torch_adam_form

__all__ = ["COSMOS"]

_NS_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
# Residuals (m×n, Newton–Schulz dtype) held at once so that the iteration runs batched over the
# weights of one shape: the step's transient memory beyond the reference's per-weight temporaries.
_BATCH_BYTES = 256 * 2**20
# What COSMOS._new_basis returns: basis U, subspace S, G·U (or None), whether U is the new basis.
_NewBasis = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class COSMOS(MemzooOptimizer):
    r"""COSMOS, as the official ``COSMOS_optim.py`` (lliu606/COSMOS, the current version).

    For an eligible m×n weight (2-D, m ≤ ``max_rows``, in a group whose ``rank`` is not None),
    with r = min(rank, n), a basis U (n×r) of the leading eigenvectors of the EMA of GᵀG
    (exact at the first step, one power iteration + QR per later step), M the momentum sum and
    V the second moment of G·U (m×r):

    .. math::
        \hat G = \frac{G + \beta_1 M}{1 + \beta_1 b_1},\quad
        A = \Big[\frac{\hat G U}{\sqrt{V/b_2} + \epsilon}\Big] U^\top,\quad
        B = \sqrt{mn}\,\frac{O}{\lVert O\rVert},\ O = \mathrm{NS}_5(\hat G - \hat G U U^\top),

    .. math::
        W \leftarrow W(1 - \eta\lambda) - \eta\rho\sqrt{mn}\,\frac{A + \gamma B}{\lVert A + \gamma B\rVert}

    (see :func:`memzoo.reference.cosmos.cosmos_update_`). Every eligible update has RMS η·ρ;
    ``lr_ratio`` ρ is the official "hidden-matrix lr / embedding lr".

    Other parameters (1-D, ≥3-D, matrices with more than ``max_rows`` rows such as vocabulary
    embeddings and heads, and groups with ``rank=None``) get torch-style AdamW at the full lr,
    as the official Adam branch does — without its bug: the official branch hard-codes β1 = 0.9
    in the momentum's (1 − β1) factor and its bias correction whatever the group's β1; here the
    group's β1 is used throughout.

    State per eligible weight: M (m×n) and V (m×r) in the parameter's dtype, U (n×r) and S (r×r)
    in float32 (float64 for float64 weights: the eigendecomposition and QR need it; the official
    code keeps them in the parameter dtype, which fails for bf16), and the step count:
    1 + r/m + r/n + r²/(mn) elements per weight element plus the factors.

    FSDP2: an eligible weight sharded by rows (``Shard(0)``) is stepped on its shards without
    gathering it: M and V sharded like the weight, U and S replicated; the Gram products,
    Newton–Schulz's XᵀX and the norms are all-reduced (see ``_sharded_step`` below and README
    "Distributed training"). Other placements of an eligible weight are refused.

    Args:
        params: parameters or param groups (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``rank``, ``lr_ratio``, ``gamma``, ``max_rows``, ``maximize``, ``ns_dtype``,
            ``nesterov``, ``amsgrad`` per group).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (defaults the official ones).
        lr_ratio: ρ, the eligible matrices' step relative to lr (official default 0.1).
        rank: r, the subspace dimension (official 64); None puts the group on AdamW. Clamped to n.
        gamma: γ, the weight of the Muon part (hard-coded 0.2 in the official code).
        nesterov: the momentum mix Ĝ above (also taken as ``nestrov=``, the official spelling);
            only True, the official default, is implemented: the official False branch ignores
            the momentum (it steps along G/b1), so False raises.
        amsgrad: accepted for the official signature; only False (the official default) is
            implemented.
        max_rows: matrices with more rows go to the AdamW branch (official 10000).
        maximize: maximize the objective.
        ns_dtype: dtype of the Newton–Schulz products (bf16 as the official code).
        backend: "auto", "triton", "torch" or "reference" (see
            :func:`memzoo.optim.resolve_backend`). The Triton backend runs the Newton–Schulz
            iteration as batched GEMM kernels (symmetric X·Xᵀ, the combination in the epilogue);
            "auto" keeps the "torch" path until those kernels have been checked on a GPU.
        foreach, fused, capturable, differentiable: torch.optim's implementation flags, accepted only
            at their defaults (None, None, False, False); see README "torch.optim conventions".
    """

    family = "cosmos"
    _layout_keys = ("rank", "max_rows")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_ratio: float = 0.1,
        rank: int | None = 64,
        weight_decay: float = 0.0,
        gamma: float = 0.2,
        nesterov: bool | None = None,
        amsgrad: bool = False,
        *,
        nestrov: bool | None = None,
        max_rows: int = 10000,
        maximize: bool = False,
        ns_dtype: torch.dtype = torch.bfloat16,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # The official keyword is spelled "nestrov"; both spellings are taken, one value.
        if nesterov is not None and nestrov is not None and nesterov != nestrov:
            raise ValueError(f"nesterov={nesterov!r} and nestrov={nestrov!r} (the official spelling) disagree; give one")
        nesterov = next((value for value in (nesterov, nestrov) if value is not None), True)
        defaults = dict(lr=lr, betas=betas, eps=eps, lr_ratio=lr_ratio, rank=rank, weight_decay=weight_decay,
                        gamma=gamma, nesterov=nesterov, amsgrad=amsgrad, max_rows=max_rows, maximize=maximize,
                        ns_dtype=ns_dtype)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_number("lr_ratio", group["lr_ratio"])
        check_number("gamma", group["gamma"])
        if group["rank"] is not None:
            check_int("rank", group["rank"], low=0)
        check_int("max_rows", group["max_rows"], low=1)
        for flag in ("maximize", "nesterov", "amsgrad"):
            check_bool(flag, group[flag])
        if not group["nesterov"]:
            raise ValueError(
                "nesterov=False is not implemented: the official code's non-Nesterov branch steps along G/b1 and "
                "never reads the momentum it accumulates; use the official default nesterov=True"
            )
        if group["amsgrad"]:
            raise ValueError(
                "amsgrad=True is not implemented (officially it changes only the AdamW branch, for vectors, "
                "embeddings and heads); use amsgrad=False, the official default"
            )
        if group["ns_dtype"] not in _NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r}; expected one of {_NS_DTYPES}")

    def _rank(self, param: torch.Tensor, group: Mapping[str, Any]) -> int | None:
        """The subspace rank of an eligible weight, None for the AdamW branch."""
        if group["rank"] is None or param.dim() != 2 or param.shape[0] > group["max_rows"] or param.numel() == 0:
            return None
        return min(group["rank"], param.shape[1])

    @staticmethod
    def _factor_dtype(param: torch.Tensor) -> torch.dtype:
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        return sharding_problem(param) if self._rank(param, group) is not None else None

    def _shard(self, param: torch.Tensor) -> RowShard | None:
        """The rows of an eligible FSDP2 weight this rank holds (None for a whole tensor)."""
        return row_shard(param, param.shape[0])

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        rank = self._rank(param, group)
        spec: StateSpec = {"step": (torch.Size(()), torch.int64), "exp_avg": (param.shape, param.dtype)}
        if rank is None:
            spec["exp_avg_sq"] = (param.shape, param.dtype)
            return spec
        m, n = param.shape
        spec["exp_avg_sq"] = (torch.Size((m, rank)), param.dtype)  # row-sharded like the weight on FSDP2
        spec["basis"] = (torch.Size((n, rank)), self._factor_dtype(param))
        spec["subspace"] = (torch.Size((rank, rank)), self._factor_dtype(param))
        return spec

    def _init_state(self, param: torch.Tensor, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        for name, (shape, dtype) in self._state_spec(param, group).items():
            state[name] = (torch.zeros((), dtype=dtype) if name == "step" else zeros_state(param, shape, dtype))
        shard = self._shard(param) if self._rank(param, group) is not None else None
        if shard is not None:  # V (m×r) row-sharded like the weight; U, S r-sized, replicated
            spec = self._state_spec(param, group)
            shape, dtype = spec["exp_avg_sq"]
            state["exp_avg_sq"] = shard.distribute(torch.zeros((shard.rows, shape[1]), dtype=dtype,
                                                               device=param.device), shape)
            for name in ("basis", "subspace"):  # plain tensors even where r×r or n×r is the weight's shape
                state[name] = torch.zeros(spec[name][0], dtype=spec[name][1], device=param.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`MemzooOptimizer.load_state_dict`; then the state of eligible FSDP2 weights is
        laid out as the step keeps it, whoever wrote it (one process, or
        ``torch.distributed.checkpoint`` read on another world size by
        :func:`memzoo.optim.distributed.load_optimizer_state`, which shards only what is shaped
        like its parameter): M and V given whole keep this rank's rows, as DTensors sharded like
        the weight; U and S given as DTensors are gathered (a collective: every rank loads)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state and self._rank(param, group) is not None and (shard := self._shard(param)) is not None:
                    lay_out_row_state(state, param.device, shard, ("exp_avg", "exp_avg_sq"))

    def _new_basis(self, param: torch.Tensor, state: dict[str, Any], beta2: float) -> _NewBasis:
        """This step's (basis U, subspace S, G·U or None, whether U is the new one or None) of an
        eligible weight, not yet stored. The subspace
        tracking sees G only through GᵀG and (G·U)ᵀ(G·U): the sign of G (maximize) cancels
        exactly, so no negated copy is made for it. It is scale-safe (a finite G of any size
        gives a finite U and S; see :func:`memzoo.reference.cosmos.cosmos_basis_update`). A
        gradient with NaN or Inf never enters U or S, nor does a non-finite result: the previous
        ones are kept (decided on the device, without a host sync); at the first step the
        subspace is then that of a zero gradient.

        After the first step the basis update also forms G·U' (U' the new basis), which the
        directions need too (V's update): it is returned with the flag saying whether U' was
        kept, for :meth:`_write` to hand it over only then (a kept old basis needs its own G·U).
        None for both at the first step, on meta tensors and on row shards."""
        shard = self._shard(param)
        if shard is not None:
            return (*_sharded_basis(local_tensor(param.grad), shard, state, beta2), None, None)
        kernels = self._kernels(param.device)
        grad = param.grad
        # One pass gives both the finiteness of G (max |G| is NaN or Inf exactly when an element
        # is: aminmax propagates NaN) and the power-of-two scale the basis functions would
        # otherwise compute from their own pass over G. (aminmax, not abs().amax(): no m×n
        # temporary, and in bf16 on a CPU about 15× faster.)
        if grad.numel():
            low, high = torch.aminmax(grad)
            magnitude = torch.maximum(-low, high).to(state["basis"].dtype)
        else:
            magnitude = grad.new_zeros(())
        finite = torch.isfinite(magnitude)
        scale = reference.power_of_two_scale(magnitude)
        if int(state["step"]) == 0:  # one sync per check below, at a weight's first step only
            rank = state["basis"].shape[1]
            meta = grad.device.type == "meta"  # a shape-only run: no values to check
            basis, subspace = (kernels.cosmos_basis_init(grad, rank, beta2=beta2, scale=scale) if meta or bool(finite)
                               else kernels.cosmos_basis_init(torch.zeros_like(grad), rank, beta2=beta2))
            if not meta and not bool(torch.isfinite(basis).all() & torch.isfinite(subspace).all()):
                basis, subspace = kernels.cosmos_basis_init(torch.zeros_like(grad), rank, beta2=beta2)
            return basis, subspace, None, None
        projection = (None if grad.device.type == "meta" else
                      grad.new_empty((grad.shape[0], state["basis"].shape[1]), dtype=state["basis"].dtype))
        basis, subspace = kernels.cosmos_basis_update(grad, state["basis"], state["subspace"], beta2=beta2,
                                                      scale=scale, projection_out=projection)
        keep_new = finite & torch.isfinite(basis).all() & torch.isfinite(subspace).all()
        return (torch.where(keep_new, basis, state["basis"]), torch.where(keep_new, subspace, state["subspace"]),
                projection, None if projection is None else keep_new)

    def _finish(self, pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
                group: Mapping[str, Any]) -> None:
        """Orthogonalize the pending residuals (one batched call per device), then apply the
        pending weights' updates."""
        with_residual = [item for item in pending if item[3] is not None]
        for device, (residuals,) in group_by_device([item[3] for item in with_residual]).items():
            self._kernels(device).orthogonalize_(residuals, residuals)
        for param, low_rank, basis, residual in pending:
            self._kernels(param.device).cosmos_apply_(
                param, low_rank, basis, residual, lr=group["lr"], lr_ratio=group["lr_ratio"], gamma=group["gamma"],
                eps=group["eps"], weight_decay=group["weight_decay"],
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None)."""
        loss = self._run_closure(closure)
        if not self._check_grads():  # skip_nonfinite: nothing is modified this step
            return loss
        # Phase 1 computes every eligible weight's new basis (small n×r, r×r tensors) without
        # writing state; phase 2 writes. An error in phase 1 (out of memory in eigh/QR) modifies
        # nothing.
        plans = []
        # States created or reconciled (after a group edit) in phase 1, installed in phase 2.
        staged: list[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]] = []
        notes: list[str] = []
        for group_index, group in enumerate(self._numeric_groups()):
            beta2 = group["betas"][1]
            adam_items, matrices = [], []
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                stored = self.state.get(param)
                state = self._reconciled_state(param, group, stored, (group_index, param_index), notes)
                if not state:
                    self._init_state(param, group, state)
                if state is not stored:
                    staged.append((param, state, group))
                if self._rank(param, group) is None:
                    adam_items.append((param, state))
                    continue
                matrices.append((param, state, *self._new_basis(param, state, beta2)))
            plans.append((group, adam_items, matrices))
        with deferred_interrupts():  # the writes: an interrupt lands before or after them, not between
            self._install_states(staged, notes)
            self._write(plans)
        return loss

    def _write(self, plans: list[tuple]) -> None:
        """Phase 2: the writes of a planned step (state, then weights)."""
        for group, adam_items, matrices in plans:
            beta1, beta2 = group["betas"]
            adam: dict[tuple[torch.device, int], list[tuple[torch.Tensor, dict[str, Any]]]] = defaultdict(list)
            for param, state in adam_items:
                state["step"] += 1
                adam[(param.device, int(state["step"]))].append((param, state))
            pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
            pending_bytes = 0
            kept = _kept_new_bases([keep_new for *_, keep_new in matrices])
            for (param, state, basis, subspace, projection, _), keep_new in zip(matrices, kept):
                state["step"] += 1
                step = int(state["step"])
                state["basis"].copy_(basis)
                state["subspace"].copy_(subspace)
                shard = self._shard(param)
                if shard is not None:
                    _sharded_step(param, state, shard, group, step)
                    continue
                m, n = param.shape
                residual = (torch.empty((m, n), dtype=group["ns_dtype"], device=param.device)
                            if state["basis"].shape[1] < n else None)
                low_rank = self._kernels(param.device).cosmos_directions_(
                    param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["basis"], residual, step=step,
                    beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"],
                    projected=projection if keep_new else None,
                )
                pending.append((param, low_rank, state["basis"], residual))
                pending_bytes += 0 if residual is None else residual.nbytes
                if pending_bytes >= _BATCH_BYTES:
                    self._finish(pending, group)
                    pending, pending_bytes = [], 0
            self._finish(pending, group)
            for (device, step), items in adam.items():
                # torch.optim.AdamW's step in the shared Adam kernel's form. (Not torch's fused
                # AdamW: its CPU kernel rounds a vector's tail differently from its body, so a
                # row shard would not step bit for bit as the same rows of the whole tensor.)
                step_size, eps = torch_adam_form(group["lr"], (beta1, beta2), group["eps"], True, step)
                resolve_backend(self.backend, device, "galore").adamw_update_(
                    [local_tensor(p) for p, _ in items], [local_tensor(p.grad) for p, _ in items],
                    [local_tensor(s["exp_avg"]) for _, s in items], [local_tensor(s["exp_avg_sq"]) for _, s in items],
                    step_size=step_size, beta1=beta1, beta2=beta2, eps=eps, lr=group["lr"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"], decay_first=True,
                )


def _kept_new_bases(flags: list[torch.Tensor | None]) -> list[bool]:
    """The flags of :meth:`COSMOS._new_basis` as bools (None is False), read with one host sync
    per device for the whole group rather than one per weight."""
    values = iter(host_values([flag for flag in flags if flag is not None]))
    return [flag is not None and bool(next(values)) for flag in flags]


# -- FSDP2 row shards -----------------------------------------------------------------------------
# Rank k holds rows G_k of an m×n weight (FSDP2's Shard(0)); M (m×n) and V (m×r) are row-sharded
# like it, U (n×r) and S (r×r) replicated (every rank computes them from the same all-reduced
# sums, so they hold the same bits). What COSMOS needs of the whole matrix reduces to sums over
# the shards: GᵀG (n×n, first step) or Gᵀ(G·U) (n×r) and (G·U)ᵀ(G·U) (r×r) for the subspace,
# XᵀX (n×n) per Newton–Schulz iteration, max |·| for the power-of-two scales and the Frobenius
# norms. The steps in between are row-local. The math is the reference's (whatever the backend).


def _all_reduce_max(shard: RowShard, values: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=shard.group)
    return values


def _magnitude(local: torch.Tensor) -> torch.Tensor:
    """max |local| in float64 (0 for an empty shard or a non-finite one)."""
    if local.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=local.device)
    magnitude = local.abs().amax().to(torch.float64)
    return torch.where(torch.isfinite(magnitude), magnitude, torch.zeros_like(magnitude))


def _sharded_norm(shard: RowShard) -> Callable[[torch.Tensor], torch.Tensor]:
    """‖X‖_F of a row-sharded X from its local rows: the float64 sum of squares all-reduced."""
    def norm(local: torch.Tensor) -> torch.Tensor:
        squares = local.to(torch.float64).square().sum()
        return shard.all_reduce_(squares).sqrt().to(local.dtype)
    return norm


def _sharded_basis(grad: torch.Tensor, shard: RowShard, state: dict[str, Any],
                   beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`COSMOS._new_basis` from this rank's rows of G: one MAX all-reduce of (non-finite
    flag, max |G|) gives the finiteness vote and the power-of-two scale of the whole G, then
    the reference's basis functions with their Gram matrices summed over the shards."""
    dtype = state["basis"].dtype
    g = grad.to(dtype)
    nonfinite = ~torch.isfinite(g).all() if g.numel() else torch.zeros((), dtype=torch.bool, device=g.device)
    votes = _all_reduce_max(shard, torch.stack([nonfinite.to(torch.float64), _magnitude(g)]))
    finite = votes[0] == 0
    scale = reference.power_of_two_scale(votes[1].to(dtype))
    reduce = shard.all_reduce_
    if int(state["step"]) == 0:  # as unsharded: a non-finite first gradient gives a zero one's subspace
        if not bool(finite):
            g, scale = torch.zeros_like(g), torch.ones_like(scale)
        basis, subspace = reference.cosmos_basis_init(g, state["basis"].shape[1], beta2=beta2, reduce=reduce,
                                                      scale=scale)
        if not bool(torch.isfinite(basis).all() & torch.isfinite(subspace).all()):
            basis, subspace = reference.cosmos_basis_init(torch.zeros_like(g), state["basis"].shape[1], beta2=beta2,
                                                          reduce=reduce, scale=torch.ones_like(scale))
        return basis, subspace
    basis, subspace = reference.cosmos_basis_update(g, state["basis"], state["subspace"], beta2=beta2,
                                                    reduce=reduce, scale=scale)
    keep_new = finite & torch.isfinite(basis).all() & torch.isfinite(subspace).all()
    return torch.where(keep_new, basis, state["basis"]), torch.where(keep_new, subspace, state["subspace"])


def _sharded_newton_schulz5(local: torch.Tensor, shard: RowShard, *, steps: int = 5,
                            eps: float = 1e-7) -> torch.Tensor:
    """:func:`memzoo.reference.cosmos.newton_schulz5` of a row-sharded m×n X (in ``local``'s
    dtype) from its local rows, in the right-multiplied form X ← a·X + b·X·A + c·X·A², A = XᵀX
    (= a·X + b·A'·X + c·A'²·X with A' = X·Xᵀ, the reference's form when m ≤ n; the reference's
    own when m > n): per iteration one n×n all-reduce of the Gram matrix, accumulated in float32
    (float64 for float64) and rounded to the dtype as the reference's product; the Frobenius
    normalization takes one MAX and one sum all-reduce of a scalar."""
    a, b, c = reference.NS_COEFFICIENTS
    dtype = local.dtype
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    scale = reference.power_of_two_scale(_all_reduce_max(shard, _magnitude(local)).to(dtype))
    scaled = local * scale
    x = scaled / (_sharded_norm(shard)(scaled) + eps * scale)
    for _ in range(steps):
        wide = x.to(accumulate)
        gram = shard.all_reduce_(wide.T @ wide).to(dtype)  # XᵀX = Σ_k X_kᵀX_k
        product = x @ gram.T
        x = a * x + b * product + c * (product @ gram.T)
    return x


def _sharded_step(param: torch.Tensor, state: dict[str, Any], shard: RowShard, group: Mapping[str, Any],
                  step: int) -> None:
    """One COSMOS step of a row-sharded eligible weight with this step's U in ``state``: the
    directions and M, V are row-local, Newton–Schulz and the norms reduce over the shards."""
    local = local_tensor(param)
    n = param.shape[1]
    beta1, beta2 = group["betas"]
    residual = (torch.empty((shard.rows, n), dtype=group["ns_dtype"], device=local.device)
                if state["basis"].shape[1] < n else None)
    low_rank = reference.cosmos_directions_(
        local, local_tensor(param.grad), local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]),
        state["basis"], residual, step=step, beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"],
    )
    if residual is not None:
        residual.copy_(_sharded_newton_schulz5(residual, shard))
    reference.cosmos_apply_(
        local, low_rank, state["basis"], residual, lr=group["lr"], lr_ratio=group["lr_ratio"], gamma=group["gamma"],
        eps=group["eps"], weight_decay=group["weight_decay"], norm=_sharded_norm(shard), whole_rows=param.shape[0],
    )
