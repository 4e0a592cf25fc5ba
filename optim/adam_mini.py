"""Adam-mini (Zhang et al. 2024): Adam with one second-moment value per parameter block."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

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
    is_dtensor,
    local_tensor,
)
from memzoo.optim.sharded import RowShard, lay_out_row_state, row_shard, sharding_problem
from memzoo.reference.adam_mini import (
    BlockPartition,
    adam_mini_blocks,
    block_rule,
    check_block_names,
    decays,
    partition,
)
from memzoo.reference.common import compute_dtype

__all__ = ["AdamMini"]


class AdamMini(MemzooOptimizer):
    r"""Adam-mini: Adam whose second moment is one value per block (Zhang et al. 2024, Algorithm 1).

    For each block b of a parameter, with t the step count and bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ:

    .. math::
        W \leftarrow W(1 - \eta\lambda);\quad m \leftarrow \beta_1 m + (1-\beta_1) g;\quad
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{i \in b}\, g_i^2;\quad
        W_b \leftarrow W_b - \eta\,\frac{m_b / \mathrm{bc1}}{\sqrt{v_b / \mathrm{bc2}} + \epsilon}

    Blocks follow the official package ``adam-mini`` 1.1.1, by parameter name (give
    ``model.named_parameters()``): one block per attention head for queries and keys
    (``dim²/n_heads`` elements each), one per row for embeddings, output heads, values,
    attention output projections and MLPs (per token, per output neuron), one per element
    (plain Adam) for biases, one per tensor for everything else (norms); see
    :mod:`memzoo.reference.adam_mini` for the exact name rules and the few cases where 1.1.1
    fails and memzoo defines the result. Parameters whose name contains ``norm``, ``ln`` or
    ``bias`` take no weight decay, as in 1.1.1. :meth:`block_partitions` lists what each
    parameter got.

    Parameters given without names (``model.parameters()``, or groups of tensors) are one block
    each — 1.1.1's rule for names it does not know — and a warning says so for those of two or
    more dimensions: pass ``model.named_parameters()`` (or groups of ``(name, tensor)`` pairs)
    for the per-head / per-neuron partition.

    State per parameter: ``exp_avg`` (the parameter's shape and dtype), ``exp_avg_sq`` (one
    float32 value per block, float64 for float64 parameters; 1.1.1 keeps it in the parameter's
    dtype) and an int64 ``step``: about half of AdamW's state.

    Args:
        params: ``model.named_parameters()``, named or plain param groups (each group may set
            its own lr, betas, eps, weight_decay, maximize, dim, n_heads, n_kv_heads), or plain
            parameters (one block each).
        lr, betas, eps, weight_decay: as in 1.1.1 (defaults 1e-3, (0.9, 0.999), 1e-8, 0.0);
            weight decay is decoupled (W ← W·(1 − lr·λ)).
        named_parameters: the official keyword for ``params`` (give one of the two).
        dim: the model's hidden size (1.1.1's default 2048).
        n_heads: its number of attention heads (default 32); a query / key weight must be a
            whole number of heads of ``dim²/n_heads`` elements.
        n_kv_heads: key / value heads under grouped-query attention (default ``n_heads``); must
            divide ``n_heads``. As in 1.1.1, a key weight's blocks are counted from its size.
        block_names: extra name fragments per rule, joining 1.1.1's sets, e.g.
            ``{"head": ["c_q", "c_k"], "row": ["c_attn"]}`` (what 1.1.1 users add to
            ``optimizer.wqk_names`` / ``mlp_names`` / …); ``{"tensor": ["v_proj"]}`` takes a name
            out of the head / row rules (one block; biases stay per element), see
            :func:`memzoo.reference.adam_mini.block_rule`.
        maximize: maximize the objective instead of minimizing it, like torch.optim.
        model_sharding: 1.1.1's deprecated flag, accepted and ignored (FSDP2 parameters are
            stepped on their shards whatever it says, see below).
        verbose: print each parameter's blocks at construction (1.1.1 prints by default).
        backend: "auto" (the "torch" path: Adam-mini has no Triton kernels), "torch" (runs of
            whole blocks in cache-sized chunks, every device) or "reference" (the per-tensor
            truth, slow); "triton" raises; see :func:`memzoo.optim.resolve_backend`.
        foreach, fused, capturable, differentiable: torch.optim's implementation flags, accepted
            only at their defaults (None, None, False, False).

    FSDP2 (``fully_shard``, row shards ``Shard(0)``, uneven or empty) parameters are stepped on
    their shards, no rank gathering a weight or a gradient: where blocks lie within rows (rows,
    elements of a vector) m and v are sharded like the parameter and the step is the unsharded
    one bit for bit; where a block spans rows (a head, a whole tensor) each rank sums g² over its
    part, one all-reduce per step adds the parts (one value per such block), and v is replicated
    (one value per block). Other placements (tensor parallelism) are refused.
    """

    family = "adam_mini"
    _layout_keys = ("dim", "n_heads", "block_names")
    _CACHES = {
        # param → ((name, dim, n_heads, block_names), its partition, whether weight decay applies)
        "_partitions": dict,
    }
    _partitions: dict[torch.Tensor, tuple[tuple, BlockPartition, bool]]

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        named_parameters: Iterable[Any] | None = None,
        dim: int = 2048,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        block_names: Mapping[str, list[str]] | None = None,
        maximize: bool = False,
        model_sharding: bool | None = None,
        verbose: bool = False,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if (params is None) == (named_parameters is None):
            raise TypeError("AdamMini takes the parameters once: as params (first argument) or as named_parameters=")
        if model_sharding not in (None, True, False):
            raise TypeError(f"Invalid model_sharding: expected None or a bool, got {model_sharding!r}")
        check_bool("verbose", verbose)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, dim=dim,
                        n_heads=n_heads, n_kv_heads=n_kv_heads, block_names=block_names)
        super().__init__(params if named_parameters is None else named_parameters, defaults, backend=backend,
                         skip_nonfinite=skip_nonfinite, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)
        if verbose:
            for group_index, name, rule, blocks in self.block_partitions():
                print(f"Adam-mini: param group {group_index}, {name}: {blocks} block(s) ({rule})")

    # Attributes of a model's config that hold dim, n_heads and n_kv_heads (Hugging Face's first,
    # then other common spellings: nanoGPT, Meta's LLaMA, memzoo-bench's Decoder).
    _CONFIG_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "dim": ("hidden_size", "n_embd", "d_model", "dim", "hidden"),
        "n_heads": ("num_attention_heads", "n_head", "n_heads", "heads"),
        "n_kv_heads": ("num_key_value_heads", "n_kv_heads"),
    }

    @classmethod
    def settings_from_model(cls, model: torch.nn.Module, given: Mapping[str, Any]) -> dict[str, int]:
        """``dim``, ``n_heads`` and ``n_kv_heads`` read from ``model.config`` for those not in
        ``given`` (what :func:`memzoo.optim.create_optimizer` passes on). A ValueError asks for
        them when the model has query / key weights (blocks per head) and they are neither given
        nor in its config: 1.1.1's defaults (2048, 32) fit few models."""
        config = getattr(model, "config", None)
        found: dict[str, int] = {}
        for key, fields in cls._CONFIG_FIELDS.items():
            if key in given:
                continue
            value = next((getattr(config, f) for f in fields if isinstance(getattr(config, f, None), int)), None)
            if value is not None:
                found[key] = value
        missing = [key for key in ("dim", "n_heads") if key not in given and key not in found]
        heads = [name for name, p in model.named_parameters() if p.requires_grad and block_rule(name) == "head"]
        if missing and heads:
            raise ValueError(
                f"adam_mini cuts query and key weights ({heads[0]}, …) into one block per attention head, and "
                f"{type(model).__name__} has no config giving {' and '.join(missing)}: pass "
                + ", ".join(f"{key}=" for key in missing) + " (the hidden size and the number of attention heads)")
        return found

    # -- validation -----------------------------------------------------------------------
    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        check_int("dim", group["dim"], low=1)
        check_int("n_heads", group["n_heads"], low=1)
        if group["n_kv_heads"] is not None:
            check_int("n_kv_heads", group["n_kv_heads"], low=1)
            if group["n_heads"] % group["n_kv_heads"]:
                raise ValueError(f"Invalid n_kv_heads: {group['n_kv_heads']} does not divide n_heads = "
                                 f"{group['n_heads']} (grouped-query attention shares each key/value head among "
                                 "n_heads/n_kv_heads query heads)")
        check_block_names(group["block_names"])
        names = group.get("param_names")
        for param_index, param in enumerate(group["params"]):
            name = names[param_index] if names is not None else None
            # raises for query / key weights that are not whole heads
            partition(name, param.shape, dim=group["dim"], n_heads=group["n_heads"], block_names=group["block_names"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("param_names") is None:
            unnamed = [index for index, param in enumerate(group["params"]) if param.dim() >= 2]
            if unnamed:
                shown = ", ".join(map(str, unnamed[:8])) + (", …" if len(unnamed) > 8 else "")
                warnings.warn(
                    f"AdamMini: param group {len(self.param_groups) - 1} has matrices without names (params {shown}): "
                    "each is one block (Adam-mini's rule for names it does not know), not one per attention head or "
                    "neuron; give model.named_parameters() for the official partition", UserWarning, stacklevel=5)

    # -- partition --------------------------------------------------------------------------
    def _partition(self, param: torch.Tensor, group: Mapping[str, Any],
                   param_index: int | None = None) -> tuple[BlockPartition, bool]:
        """``param``'s blocks and whether weight decay applies to it, from its name in ``group``
        (found by ``param_index`` when the caller knows it, else by a search of the group)."""
        names = group.get("param_names")
        name = None
        if names is not None:
            if param_index is not None and group["params"][param_index] is param:
                name = names[param_index]
            else:
                name = next((n for p, n in zip(group["params"], names) if p is param), None)
        key = (name, group["dim"], group["n_heads"], group["block_names"])
        cached = self._partitions.get(param)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        blocks = partition(name, param.shape, dim=group["dim"], n_heads=group["n_heads"],
                           block_names=group["block_names"])
        self._partitions[param] = (key, blocks, decays(name))
        return blocks, decays(name)

    def block_partitions(self) -> list[tuple[int, str, str, int]]:
        """(group index, parameter name or ``param <index>``, rule, number of blocks) for every
        parameter: the rule is ``"head"``, ``"row"``, ``"element"`` (Adam) or ``"tensor"``."""
        out = []
        for group_index, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for param_index, param in enumerate(group["params"]):
                blocks, _ = self._partition(param, group, param_index)
                name = names[param_index] if names is not None else f"param {param_index}"
                out.append((group_index, name, blocks.rule, blocks.blocks))
        return out

    @staticmethod
    def _second_moment_dtype(param: torch.Tensor) -> torch.dtype:
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        blocks, _ = self._partition(param, group)
        return {
            "step": (torch.Size(()), torch.int64),
            "exp_avg": (param.shape, param.dtype),
            "exp_avg_sq": (torch.Size((blocks.blocks,)), self._second_moment_dtype(param)),
        }

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        problem = sharding_problem(param)
        if problem is not None:
            return problem
        blocks, _ = self._partition(param, group)
        if blocks.rule == "element" and param.dim() > 1:
            return ("its name gives it one v per element (a bias), kept as a flat vector that FSDP2's row shards do not "
                    "cut along rows; name it otherwise (or list it in block_names) or use DistributedDataParallel")
        return None

    @staticmethod
    def _rows_hold_blocks(param: torch.Tensor, blocks: BlockPartition) -> bool:
        """Whether each block lies within one row (a row per block, or an element of a vector):
        on FSDP2 row shards its v is then sharded like the parameter and the step is local."""
        return param.numel() > 0 and blocks.rule in ("row", "element")

    def _shard(self, param: torch.Tensor) -> RowShard | None:
        """The rows of an FSDP2 parameter this rank holds (None for a whole tensor)."""
        return row_shard(param, param.shape[0]) if is_dtensor(param) and param.numel() > 0 else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`MemzooOptimizer.load_state_dict`; then the state of FSDP2 parameters is laid out
        as the step keeps it, whoever wrote it (one process, or ``torch.distributed.checkpoint``
        read on another world size): m, and v where blocks lie within rows, given whole keep this
        rank's rows as DTensors sharded like the parameter; v of blocks spanning rows (heads,
        whole tensors) is replicated."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state and (shard := self._shard(param)) is not None:
                    blocks, _ = self._partition(param, group)
                    sharded = ("exp_avg", "exp_avg_sq") if self._rows_hold_blocks(param, blocks) else ("exp_avg",)
                    lay_out_row_state(state, param.device, shard, sharded)

    # -- step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None).

        The parameters of a group go through one multi-tensor call per (device, step count,
        whether weight decay applies)."""
        loss = self._run_closure(closure)
        if not self._check_grads():  # skip_nonfinite: nothing is modified this step
            return loss
        staged: list[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]] = []
        notes: list[str] = []
        plans = []
        for group_index, group in enumerate(self._numeric_groups()):
            # (device, step count after this step, decays) → params, grads, m, v, step tensors
            buckets: dict[tuple[torch.device, int, bool], tuple[list, list, list, list, list]] = {}
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                blocks, decayed = self._partition(param, group, param_index)
                stored = self.state.get(param)
                state = self._reconciled_state(param, group, stored, (group_index, param_index), notes)
                if not state:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros(blocks.blocks, dtype=self._second_moment_dtype(param),
                                                      device=param.device)
                    shard = self._shard(param)
                    if shard is not None and self._rows_hold_blocks(param, blocks):  # v sharded like the rows
                        state["exp_avg_sq"] = shard.distribute(state["exp_avg_sq"][shard.offset: shard.offset + shard.rows],
                                                               state["exp_avg_sq"].shape)
                if state is not stored:
                    staged.append((param, state, group))
                bucket = buckets.setdefault((param.device, int(state["step"]) + 1, decayed), ([], [], [], [], []))
                for out, item in zip(bucket, (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    out.append(item)
            plans.append((group, buckets))
        with deferred_interrupts():  # the writes: an interrupt lands before or after them, not between
            self._install_states(staged, notes)
            self._write(plans)
        return loss

    def _write(self, plans: list[tuple]) -> None:
        """The writes of a planned step: one update per (group, device, step count, decay); FSDP2
        shards as :meth:`_write_shards` says."""
        for group, buckets in plans:
            beta1, beta2 = group["betas"]
            for (device, step, decayed), (params, grads, exp_avgs, exp_avg_sqs, steps) in buckets.items():
                hparams = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"] if decayed else 0.0, step=step)
                whole = [i for i, param in enumerate(params) if self._shard(param) is None]
                if whole:
                    self._kernels(device).adam_mini_update_(*([items[i] for i in whole] for items in (
                        params, grads, exp_avgs, exp_avg_sqs)), **hparams, maximize=group["maximize"])
                if len(whole) < len(params):
                    self._write_shards(group, *([items[i] for i in range(len(params)) if i not in set(whole)]
                                                for items in (params, grads, exp_avgs, exp_avg_sqs)), hparams)
                torch._foreach_add_(steps, 1)

    def _write_shards(self, group: Mapping[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                      exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], hparams: dict[str, Any]) -> None:
        """FSDP2 row shards. A block within a row (rows, vector elements): this rank's rows are
        whole blocks, its v is sharded like them, and the kernel runs on the local tensors — the
        unsharded step's bits. A block spanning rows (a head, a whole tensor): each rank sums g²
        over its part of every block, one all-reduce per step adds the parts (every rank joins,
        an empty shard with zeros), and v, replicated, is updated alike everywhere; the mean
        differs from one process's only in the order of its additions."""
        local = [i for i, param in enumerate(params)
                 if self._rows_hold_blocks(param, self._partition(param, group)[0])]
        rows = [i for i in local if local_tensor(params[i]).numel() > 0]
        if rows:
            self._kernels(params[rows[0]].device).adam_mini_update_(
                *([local_tensor(items[i]) for i in rows] for items in (params, grads, exp_avgs, exp_avg_sqs)),
                **hparams, maximize=group["maximize"])
        spanning = [i for i in range(len(params)) if i not in set(local)]
        if not spanning:
            return
        parts = [_block_rows(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], self._partition(params[i], group)[0],
                             self._shard(params[i]), group["maximize"]) for i in spanning]
        sums = [torch.zeros_like(v) for v in (exp_avg_sqs[i] for i in spanning)]
        for total, part in zip(sums, parts):
            total[part.first: part.first + part.g.shape[0]] = (part.g * part.g).sum(dim=1)
        sums = self._shard(params[spanning[0]]).all_reduce_many_(sums)  # one collective for the spanning blocks
        for i, part, total in zip(spanning, parts, sums):
            block_numel = self._partition(params[i], group)[0].block_numel
            p, m, v = adam_mini_blocks(part.p, part.g, part.m, exp_avg_sqs[i].to(part.g.dtype), total / block_numel,
                                       **hparams, first_block=part.first)
            part.write(params[i], exp_avgs[i], p, m)
            exp_avg_sqs[i].copy_(v)


class _BlockRows(NamedTuple):
    """A rank's shard of a parameter as whole blocks: the blocks ``first``… it touches, as rows
    of ``block_numel`` elements (p, g, m in the compute dtype, zero outside the shard), and where
    the shard's elements sit in them (``start``, ``count``)."""

    p: torch.Tensor
    g: torch.Tensor
    m: torch.Tensor
    first: int
    start: int
    count: int

    def write(self, param: torch.Tensor, exp_avg: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> None:
        """Copy this shard's elements of the updated rows into the local tensors."""
        if self.count:
            local_tensor(param).view(-1).copy_(p.reshape(-1)[self.start: self.start + self.count])
            local_tensor(exp_avg).view(-1).copy_(m.reshape(-1)[self.start: self.start + self.count])


def _block_rows(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                blocks: BlockPartition, shard: RowShard, maximize: bool) -> _BlockRows:
    """The blocks a rank's rows touch, padded to whole blocks (see :class:`_BlockRows`)."""
    local_param = local_tensor(param)
    dtype = compute_dtype(param.dtype, grad.dtype, exp_avg.dtype, exp_avg_sq.dtype)
    row_numel = param.numel() // param.shape[0]
    begin, count = shard.offset * row_numel, local_param.numel()  # this rank's elements of the whole tensor
    first = begin // blocks.block_numel if count else 0
    last = (begin + count - 1) // blocks.block_numel if count else -1
    start = begin - first * blocks.block_numel

    def rows(tensor: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        out = torch.zeros((last - first + 1) * blocks.block_numel, dtype=dtype, device=local_param.device)
        if count:
            values = local_tensor(tensor).reshape(-1).to(dtype)
            out[start: start + count] = -values if sign < 0 else values
        return out.view(last - first + 1, blocks.block_numel)

    return _BlockRows(rows(param), rows(grad, -1.0 if maximize else 1.0), rows(exp_avg), first, start, count)
