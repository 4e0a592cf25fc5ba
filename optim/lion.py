"""Lion optimizer (Chen et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from memzoo.optim.base import (
    Backend,
    MemzooOptimizer,
    StateSpec,
    check_bool,
    check_betas,
    check_lr,
    check_number,
    deferred_interrupts,
    group_by_device,
    local_tensor,
    resolve_state_dtype,
)

__all__ = ["Lion"]

_MOMENTUM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Lion(MemzooOptimizer):
    r"""Lion: sign of an interpolated momentum (Chen et al. 2023, Algorithm 2).

    Per element, with decoupled weight decay exactly as the paper and the official code:

    .. math::
        W \leftarrow W (1 - \eta\lambda);\quad
        c = \beta_1 m + (1-\beta_1) g;\quad
        W \leftarrow W - \eta\,\mathrm{sign}(c);\quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    State: one momentum tensor ``exp_avg`` per parameter (1 element per parameter; no step
    counter, Lion has no bias correction). The paper advises an lr 3-10x smaller than AdamW's and
    a weight decay 3-10x larger.

    Args:
        params: parameters or param groups (each group may set its own lr, betas, weight_decay,
            maximize, momentum_dtype).
        lr: learning rate η.
        betas: (β1, β2), the interpolation and the momentum coefficients, each in [0, 1).
        weight_decay: decoupled decay λ (the step multiplies W by 1 − lr·λ).
        maximize: maximize the objective instead of minimizing it, like torch.optim.
        momentum_dtype: dtype of ``exp_avg``: None (the parameter's dtype, as the official
            code), torch.float32 (recommended for bf16 parameters: small (1 − β2)·g increments
            are lost in a bf16 momentum), torch.bfloat16 (half the state) or torch.float16.
        backend: "auto" (Triton for CUDA tensors when it imports, else "torch"), "triton",
            "torch" (chunked multi-tensor PyTorch, every device) or "reference" (the per-tensor
            truth, slow); see :func:`memzoo.optim.resolve_backend`. The Triton step is one fused
            multi-tensor launch per (device, dtypes) bucket of each param group.
        foreach, fused, capturable, differentiable: torch.optim's implementation flags, accepted only
            at their defaults (None, None, False, False); see README "torch.optim conventions".
    """

    family = "lion"
    _layout_keys = ("momentum_dtype",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        momentum_dtype: torch.dtype | str | None = None,
        backend: Backend = "auto",
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        momentum_dtype=momentum_dtype)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)

    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_number("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        resolve_state_dtype("momentum_dtype", group["momentum_dtype"], _MOMENTUM_DTYPES)

    def _momentum_dtype(self, param: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        return resolve_state_dtype("momentum_dtype", group["momentum_dtype"], _MOMENTUM_DTYPES) or param.dtype

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        return {"exp_avg": (param.shape, self._momentum_dtype(param, group))}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (or None)."""
        loss = self._run_closure(closure)
        if not self._check_grads():  # skip_nonfinite: nothing is modified this step
            return loss
        staged: list[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]] = []
        notes: list[str] = []
        plans = []
        for group_index, group in enumerate(self._numeric_groups()):
            params, exp_avgs = [], []
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                stored = self.state.get(param)
                state = self._reconciled_state(param, group, stored, (group_index, param_index), notes)
                if not state:
                    state["exp_avg"] = torch.zeros_like(
                        param, dtype=self._momentum_dtype(param, group), memory_format=torch.preserve_format
                    )
                if state is not stored:
                    staged.append((param, state, group))
                params.append(param)
                exp_avgs.append(state["exp_avg"])
            plans.append((group, params, exp_avgs))
        with deferred_interrupts():  # the writes: an interrupt lands before or after them, not between
            self._install_states(staged, notes)
            self._write(plans)
        return loss

    def _write(self, plans: list[tuple]) -> None:
        """The writes of a planned step: one update per (group, device)."""
        for group, params, exp_avgs in plans:
            grads = [param.grad for param in params]
            beta1, beta2 = group["betas"]
            for device, lists in group_by_device(params, grads, exp_avgs).items():
                ps, gs, ms = ([local_tensor(t) for t in ts] for ts in lists)  # FSDP2: each rank its shards
                self._kernels(device).lion_update_(
                    ps, gs, ms, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], maximize=group["maximize"],
                )
