"""Layer-wise updates: each parameter is stepped as soon as its gradient is ready, and the gradient
is freed, so a model's full set of gradients never exists at once (how GaLore trains a 7B model in
24 GB). Works for any optimizer whose update is per parameter (Lion, GaLore, Natural GaLore,
APOLLO, FRUGAL, COSMOS, torch.optim's element-wise ones)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LayerwiseOptimizer"]


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    params = list(params)
    if not params:
        raise ValueError("LayerwiseOptimizer got an empty parameter list")
    if all(isinstance(p, torch.Tensor) for p in params):
        return [{"params": params}]
    return [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
            for g in params]


class LayerwiseOptimizer(torch.optim.Optimizer):
    r"""One ``optimizer_class`` instance per parameter, stepped from the parameter's
    ``register_post_accumulate_grad_hook`` during ``backward()``; the gradient is then set to
    None. Peak memory drops by the gradients of all but the layers in flight.

    Usage::

        optimizer = LayerwiseOptimizer(model.parameters(), memzoo.optim.GaLoreAdamW, lr=1e-2, rank=128)
        for batch in data:
            loss_fn(model(batch)).backward()   # every parameter is updated here
            optimizer.step()                   # marks the end of the iteration (no math)

    The updates are the ordinary step's, parameter by parameter (seeded projections keep their
    per-weight seeds: the wrapper passes ``seed + position`` to optimizers with a ``seed``).
    ``param_groups`` are the inner optimizers' groups, so LR schedulers work unchanged.
    ``skip_nonfinite=True`` (passed on to memzoo optimizers) skips per parameter: a parameter whose
    gradient has NaN/Inf keeps its value and state while the others step, since no hook sees all
    gradients. Under FSDP2 the hooks run on the reduced, sharded gradients, and each rank steps
    its shards.

    What it cannot do, by construction (each gradient is applied and freed as soon as it exists):

    - gradient accumulation over micro-batches: a second ``backward()`` before ``step()`` raises;
      sum the micro-batch losses before one backward, or use the ordinary optimizer;
    - clipping by the global gradient norm (:meth:`clip_grad_norm_` raises): it needs every
      gradient at once; use the ordinary optimizer, or clip per parameter with
      ``max_grad_norm`` (each gradient's own norm, applied in the hook);
    - zeroth-order optimizers (no gradients): use them directly.
    """

    def __init__(self, params: Iterable[Any], optimizer_class: Callable[..., torch.optim.Optimizer], *,
                 max_grad_norm: float | None = None, **kwargs: Any) -> None:
        if getattr(optimizer_class, "family", None) == "zeroth_order":
            raise TypeError(f"{optimizer_class.__name__} takes no gradients; layer-wise updates do not apply to it")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a number > 0 or None)")
        # A ``seed`` may be taken by a base class's __init__ (through **kwargs), so look down the MRO.
        seeded = any("seed" in inspect.signature(klass.__init__).parameters
                     for klass in inspect.getmro(optimizer_class) if "__init__" in vars(klass))
        base_seed = kwargs.pop("seed", 0) if seeded else None
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        position = 0
        for group in _groups(params):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                if param in self._inner:
                    raise ValueError(f"parameter of shape {tuple(param.shape)} appears twice in the groups")
                extra = {"seed": base_seed + position} if seeded else {}
                self._inner[param] = optimizer_class([{"params": [param], **hyper}], **kwargs, **extra)
                position += 1
        self.max_grad_norm = max_grad_norm
        super().__init__(list(self._inner), {})
        # The inner optimizers' groups themselves, so that LR schedulers and users edit those.
        self.param_groups = [inner.param_groups[0] for inner in self._inner.values()]
        self._applied: set[int] = set()
        self._handles = [param.register_post_accumulate_grad_hook(self._apply) for param in self._inner]

    def _apply(self, param: torch.Tensor) -> None:
        key = id(param)
        if key in self._applied:
            raise RuntimeError(
                "LayerwiseOptimizer: a second backward() before step(): gradient accumulation over micro-batches "
                "is not possible in layer-wise mode (each gradient is applied and freed as soon as it is ready). "
                "Sum the micro-batch losses before one backward(), or use the ordinary optimizer; and call "
                "step() once per iteration"
            )
        self._applied.add(key)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        self._inner[param].step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End of an iteration (the updates ran during backward). With a closure, runs it (its
        backward applies the updates) and returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._applied.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are already freed by the hooks; clears any left (e.g. from a hook-less path)."""
        for param in self._inner:
            param.grad = None

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "clipping by the global gradient norm needs every gradient at once, and layer-wise mode frees each one "
            "as soon as it is applied: use the ordinary optimizer, or LayerwiseOptimizer(..., max_grad_norm=...) "
            "to clip each parameter's gradient by its own norm"
        )

    def remove_hooks(self) -> None:
        """Detach from the parameters (e.g. to switch back to an ordinary optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"layerwise": [inner.state_dict() for inner in self._inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of a LayerwiseOptimizer over the same parameters; every inner state is
        checked (by the inner optimizers) before any is loaded."""
        inner = state_dict.get("layerwise") if isinstance(state_dict, dict) else None
        if not isinstance(inner, list):
            raise ValueError("not a LayerwiseOptimizer state_dict (no 'layerwise' list)")
        if len(inner) != len(self._inner):
            raise ValueError(f"state_dict has {len(inner)} parameters' states, this optimizer {len(self._inner)}")
        backups = [optimizer.state_dict() for optimizer in self._inner.values()]
        done = []
        try:
            for optimizer, saved in zip(self._inner.values(), inner):
                optimizer.load_state_dict(saved)
                done.append(optimizer)
        except (TypeError, ValueError, KeyError):
            for optimizer, backup in zip(done, backups):
                optimizer.load_state_dict(backup)
            raise

    @property
    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The per-parameter optimizers, in parameter order."""
        return list(self._inner.values())

    def state_bytes(self) -> int:
        """Bytes of optimizer state, summed over the parameters' optimizers (torch.optim ones
        counted by their state tensors)."""
        total = 0
        for inner in self._inner.values():
            if hasattr(inner, "state_bytes"):
                total += inner.state_bytes()
            else:
                total += sum(value.nbytes for state in inner.state.values() for value in state.values()
                             if isinstance(value, torch.Tensor))
        return total
