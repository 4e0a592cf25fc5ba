"""Layer-wise updates: each parameter is stepped as soon as its gradient is ready, and the gradient
is freed, so a model's full set of gradients never exists at once (how GaLore trains a 7B model in
24 GB). Works for any optimizer whose update is per parameter (Lion, GaLore, Natural GaLore,
APOLLO, FRUGAL, COSMOS, torch.optim's element-wise ones)."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LayerwiseOptimizer"]

# The LayerwiseOptimizer whose hooks update each parameter: a newer one over the same parameter
# takes it over (Lightning's configure_optimizers on resume, a rebuilt optimizer), or both would
# step it, the older one with its stale state.
# Keyed by id (tensors compare by value), with a weak reference that drops the entry with the tensor.
_OWNERS: dict[int, tuple[weakref.ref[torch.Tensor], LayerwiseOptimizer]] = {}


def _owner(param: torch.Tensor) -> LayerwiseOptimizer | None:
    entry = _OWNERS.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def _set_owner(param: torch.Tensor, owner: LayerwiseOptimizer | None) -> None:
    if owner is None:
        _OWNERS.pop(id(param), None)
    else:
        _OWNERS[id(param)] = (weakref.ref(param, lambda _, key=id(param): _OWNERS.pop(key, None)), owner)


def _tensors(items: Iterable[Any]) -> list[Any]:
    """Parameters, from tensors or from ``named_parameters()`` pairs (whose names are dropped)."""
    return [item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else item
            for item in items]


def _names(items: list[Any]) -> list[str] | None:
    """The names of ``named_parameters()`` pairs (kept for optimizers that read them: Adam-mini's
    blocks follow them), None for plain tensors."""
    if items and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in items):
        return [item[0] for item in items]
    return None


def _group(group: dict[str, Any]) -> dict[str, Any]:
    items = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
    names = _names(items)
    return {**group, "params": _tensors(items), **({"param_names": names} if names is not None else {})}


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    params = list(params)
    if not params:
        raise ValueError("LayerwiseOptimizer got an empty parameter list")
    if not any(isinstance(p, dict) for p in params):
        return [_group({"params": params})]
    return [_group(g) for g in params]


_FREED = (
    "LayerwiseOptimizer applied this parameter's gradient during backward() and freed it, so until step() "
    "its .grad only answers for its norm (what torch.nn.utils.clip_grad_norm_ and trainers' grad-norm logging "
    "read). To read a gradient, register a hook that runs before the update (param.register_hook)"
)
_DATA_PARALLEL = (
    "LayerwiseOptimizer on whole (unsharded) parameters with torch.distributed running on {world} ranks: its hooks "
    "run on each rank's local gradient, before DistributedDataParallel averages it, so the ranks would step "
    "apart. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard; its hooks see the reduced, sharded "
    "gradients), or use the ordinary optimizer"
)
_UNKNOWN_SCALER = (
    "a GradScaler is unscaling gradients that LayerwiseOptimizer already applied during backward(), still "
    "scaled, since it was not told about the scaler: give it the scaler before the first backward(), "
    "LayerwiseOptimizer(..., grad_scaler=scaler) or optimizer.grad_scaler = scaler (Hugging Face Trainer: "
    "trainer.accelerator.scaler; accelerate: accelerator.scaler; Lightning: trainer.precision_plugin.scaler); "
    "each gradient is then unscaled in its update. Or train in bf16, which needs no scaler"
)
_CLIP_TOO_LATE = (
    "clipping by the global gradient norm would scale gradients that LayerwiseOptimizer already applied during "
    "backward(){detail}: it needs every gradient at once. Turn the "
    "trainer's global clip off (Hugging Face TrainingArguments(max_grad_norm=0), no accelerator.clip_grad_norm_ / "
    "Lightning gradient_clip_val) and clip each parameter's gradient by its own norm, in the update, with "
    "LayerwiseOptimizer(..., max_grad_norm=...) (create_optimizer(..., layerwise=True, max_grad_norm=...)); or "
    "use the ordinary optimizer"
)
# Metadata that a stand-in gradient answers like the gradient (device, dtype, shape, ...).
_METADATA = {"device", "dtype", "shape", "layout", "ndim", "is_sparse", "is_cuda", "is_meta", "is_nested",
             "is_quantized", "is_mkldnn", "requires_grad", "is_leaf", "grad_fn", "names"}
_METADATA_METHODS = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point,
                     torch.Tensor.is_complex, torch.Tensor.__len__}


class _AppliedGradient(torch.Tensor):
    """Stands in a parameter's ``.grad`` between its layer-wise update and ``step()``: a stride-0
    view of one zero (no memory) that keeps the 2-norm of the gradient that was applied. Norms are
    answered from it (a trainer's grad-norm logging and ``clip_grad_norm_`` see the true global
    norm, not 0); scaling by 1 (a clip that has nothing to clip) is a no-op; a GradScaler's unscale
    learns whether the (already unscaled) gradient had Inf/NaN; a clip that would scale, and any
    other use, raise and say why, since the gradient is gone."""

    applied_norm: torch.Tensor
    # None: no GradScaler unscaled it in the hook; else whether it had Inf/NaN (update skipped).
    found_inf: bool | None
    owner: LayerwiseOptimizer

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return cls._answer(func, args, kwargs or {})
        except RuntimeError:
            # Any refusal ends the iteration (every stand-in cleared), so that what the caller does
            # next (a trainer's teardown moving the model, a retry) meets ordinary None gradients.
            for owner in {id(t.owner): t.owner for t in _stand_ins(args)}.values():
                owner._drop_iteration()
            raise

    @classmethod
    def _answer(cls, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if func in _METADATA_METHODS or (getattr(func, "__name__", "") == "__get__"
                                         and getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__get__" and getattr(func.__self__, "__name__", "") == "data":
            return args[0]  # ``grad.data`` is the stand-in again (Lightning's grad_norm reads p.grad.data.norm())
        if func is torch.linalg.vector_norm or func is torch._foreach_norm or func in (torch.Tensor.norm, torch.norm):
            tensors = args[0] if func is torch._foreach_norm else [args[0]]
            order_key = "p" if func in (torch.Tensor.norm, torch.norm) else "ord"
            order = args[1] if len(args) > 1 else kwargs.get(order_key, 2)
            if order not in (2, "fro") or kwargs.get("dim") is not None or len(args) > 2:
                raise RuntimeError(f"{_FREED} (the norm kept is the whole tensor's 2-norm, not ord={order!r})")
            with torch._C.DisableTorchFunctionSubclass():
                norms = [t.applied_norm if isinstance(t, _AppliedGradient) else torch.linalg.vector_norm(t)
                         for t in tensors]
            dtype = kwargs.get("dtype")
            norms = [norm.to(dtype) if dtype is not None else norm for norm in norms]
            return norms if func is torch._foreach_norm else norms[0]
        if func is torch.Tensor.mul_ or func is torch._foreach_mul_:
            tensors, scale = (args[0], args[1]) if func is torch._foreach_mul_ else ([args[0]], args[1])
            if not bool(torch.as_tensor(scale == 1).all()):
                norm = torch.linalg.vector_norm(torch.stack([t.applied_norm for t in tensors
                                                              if isinstance(t, _AppliedGradient)]))
                detail = f" (their global norm, {float(norm):.4g}, exceeds max_norm)"
                raise RuntimeError(_CLIP_TOO_LATE.format(detail=detail))
            return args[0]
        if func is torch._amp_foreach_non_finite_check_and_unscale_:
            tensors, found_inf = args[0], args[1]
            applied = [t for t in tensors if isinstance(t, _AppliedGradient)]
            if any(t.found_inf is None for t in applied):
                raise RuntimeError(_UNKNOWN_SCALER)
            with torch._C.DisableTorchFunctionSubclass():
                plain = [t for t in tensors if not isinstance(t, _AppliedGradient)]
                if plain:
                    func(plain, *args[1:], **kwargs)
                if any(t.found_inf for t in applied):
                    found_inf.fill_(1.0)
            return None
        raise RuntimeError(_FREED)


def _stand_ins(args: Any) -> list[_AppliedGradient]:
    found = []
    for arg in args:
        if isinstance(arg, _AppliedGradient):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(_stand_ins(arg))
    return found


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _applied_gradient(owner: LayerwiseOptimizer, param: torch.Tensor, norm: torch.Tensor,
                      found_inf: bool | None) -> torch.Tensor | None:
    # Sharded (DTensor) and other tensor-subclass parameters take no stand-in: their grad is freed.
    if type(param.detach()) is not torch.Tensor:
        return None
    key = (param.dtype, param.device)
    if key not in _ZEROS:  # one shared, never written zero per dtype and device
        _ZEROS[key] = torch.zeros((), dtype=param.dtype, device=param.device)
    stand_in = torch.Tensor._make_subclass(_AppliedGradient, _ZEROS[key].expand(param.shape), False)
    stand_in.applied_norm = norm
    stand_in.found_inf = found_inf
    stand_in.owner = owner
    return stand_in


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _unhooked_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` without the global step hooks, which belong to the wrapper's step (they
    would otherwise fire once per parameter); the inner optimizer's own hooks still run."""
    step = type(optimizer).step
    step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    for pre_hook in optimizer._optimizer_step_pre_hooks.values():
        pre_hook(optimizer, (), {})
    step(optimizer)
    for post_hook in optimizer._optimizer_step_post_hooks.values():
        post_hook(optimizer, (), {})


class LayerwiseOptimizer(torch.optim.Optimizer):
    r"""One ``optimizer_class`` instance per parameter, stepped from the parameter's
    ``register_post_accumulate_grad_hook`` during ``backward()``; the gradient is then freed.
    Peak memory drops by the gradients of all but the layers in flight.

    Usage::

        optimizer = LayerwiseOptimizer(model.parameters(), memzoo.optim.GaLoreAdamW, lr=1e-2, rank=128)
        for batch in data:
            loss_fn(model(batch)).backward()   # every parameter is updated here
            optimizer.step()                   # marks the end of the iteration (no math)

    The updates are the ordinary step's, parameter by parameter (seeded projections keep their
    per-weight seeds: the wrapper passes ``seed + position`` to optimizers with a ``seed``).
    ``param_groups`` holds one group per parameter, and each is the very dict its inner optimizer
    reads (also after ``load_state_dict``), so LR schedulers work unchanged; ``defaults`` are the
    inner optimizer's (``OneCycleLR(cycle_momentum=True)`` finds ``betas``). ``add_param_group``
    adds parameters that train like the others. Step hooks (global and the wrapper's) run once per
    ``step()``, i.e. after the iteration's updates; state_dict hooks run as in torch.optim.
    fp16 mixed precision: give the ``GradScaler`` (``grad_scaler=scaler`` or, once the trainer made
    it, ``optimizer.grad_scaler = scaler``) and each update unscales its gradient first; a
    parameter whose scaled gradient has Inf/NaN skips the update, and ``scaler.step`` /
    ``scaler.update`` learn of it and back off the scale as usual. A scaler the wrapper was not
    given raises at its first ``unscale_``/``step`` (the first iteration's updates ran on scaled
    gradients: nothing in backward tells them apart).
    ``skip_nonfinite=True`` (passed on to memzoo optimizers) skips per parameter: a parameter whose
    gradient has NaN/Inf keeps its value and state while the others step, since no hook sees all
    gradients. Under FSDP2 the hooks run on the reduced, sharded gradients, and each rank steps
    its shards; under DDP (whole parameters, several ranks) they would run before the averaging,
    so the first update raises and says so. A newer LayerwiseOptimizer over a parameter takes it
    over (this one's hooks on it are removed), as when Lightning calls ``configure_optimizers``
    again to resume. If an update raises, the iteration is dropped (every gradient freed), so the
    next ``backward()`` reports the real problem again.

    What it cannot do, by construction (each gradient is applied and freed as soon as it exists):

    - gradient accumulation over micro-batches: a second ``backward()`` before ``step()`` raises;
      sum the micro-batch losses before one backward, or use the ordinary optimizer;
    - clipping by the global gradient norm: between an update and ``step()`` the parameter's
      ``.grad`` is a stand-in that raises on any use, so ``torch.nn.utils.clip_grad_norm_`` (what
      Trainer, accelerate and Lightning call) raises and says what to do instead of returning 0:
      clip per parameter with ``max_grad_norm`` (each gradient's own norm, applied in the hook);
    - zeroth-order optimizers (no gradients): use them directly.
    """

    def __init__(self, params: Iterable[Any], optimizer_class: Callable[..., torch.optim.Optimizer], *,
                 max_grad_norm: float | None = None, grad_scaler: torch.amp.GradScaler | None = None,
                 **kwargs: Any) -> None:
        if getattr(optimizer_class, "family", None) == "zeroth_order":
            raise TypeError(f"{optimizer_class.__name__} takes no gradients; layer-wise updates do not apply to it")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a number > 0 or None)")
        # A ``seed`` may be taken by a base class's __init__ (through **kwargs), so look down the MRO.
        self._seeded = any("seed" in inspect.signature(klass.__init__).parameters
                           for klass in inspect.getmro(optimizer_class) if "__init__" in vars(klass))
        self._base_seed = kwargs.pop("seed", 0) if self._seeded else None
        self._optimizer_class = optimizer_class
        self._kwargs = kwargs
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._handles: dict[torch.Tensor, list[Any]] = {}
        self._applied: set[torch.Tensor] = set()
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        self._inverse_scale: torch.Tensor | None = None  # this iteration's, read at its first update
        # torch.optim's __init__ calls add_param_group for every group (below), which builds the
        # inner optimizers; the defaults become theirs there.
        super().__init__(_groups(params), {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters (with their hyperparameters) that train layer-wise like the others: one
        inner optimizer each, hooked; nothing is added if any of them is refused."""
        group = _groups([param_group])[0]
        names = group.get("param_names")
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        built: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for index, param in enumerate(group["params"]):
            if not param.requires_grad:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} does not require grad, so it has no gradient hook to "
                    "update it from: pass only the trainable parameters, e.g. "
                    "[p for p in model.parameters() if p.requires_grad] (memzoo.create_optimizer does)"
                )
            if param in self._inner or param in built:
                raise ValueError(f"parameter of shape {tuple(param.shape)} appears twice in the groups")
            extra = {"seed": self._base_seed + len(self._inner) + len(built)} if self._seeded else {}
            inner_params = [(names[index], param)] if names is not None else [param]
            built[param] = self._optimizer_class([{"params": inner_params, **hyper}], **self._kwargs, **extra)
        for param, inner in built.items():
            self._inner[param] = inner
            self.param_groups.append(inner.param_groups[0])
            previous = _owner(param)
            if previous is not None and previous is not self:
                previous._release(param)
            _set_owner(param, self)
            self._handles[param] = [param.register_hook(self._check_accumulation(param)),
                                    param.register_post_accumulate_grad_hook(self._apply)]
        if not self.defaults and built:
            self.defaults.update(next(iter(built.values())).defaults)

    def _check_accumulation(self, param: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def check(grad: torch.Tensor) -> None:  # before the new gradient is accumulated into .grad
            if param in self._applied:
                raise RuntimeError(
                    "LayerwiseOptimizer: a second backward() before step(): gradient accumulation over micro-batches "
                    "is not possible in layer-wise mode (each gradient is applied and freed as soon as it is ready). "
                    "Sum the micro-batch losses before one backward(), or use the ordinary optimizer; and call "
                    "step() once per iteration"
                )
        return check

    def _relink_groups(self) -> None:
        """Make each inner optimizer read the wrapper's group dict again (torch's load_state_dict
        builds new group dicts, which an LR scheduler holding the wrapper would never reach)."""
        for group, inner in zip(self.param_groups, self._inner.values()):
            current = inner.param_groups[0]
            if current is not group:
                group.clear()
                group.update(current)
                inner.param_groups[0] = group

    def _apply(self, param: torch.Tensor) -> None:
        self._applied.add(param)
        found_inf = None
        try:
            if type(param.detach()) is torch.Tensor and _world_size() > 1:
                raise RuntimeError(_DATA_PARALLEL.format(world=_world_size()))
            if self.grad_scaler is not None and self.grad_scaler.is_enabled() and type(param.grad) is torch.Tensor:
                found_inf = self._unscale(param.grad)
            if self.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            else:
                norm = (torch.linalg.vector_norm(param.grad, dtype=torch.float32) if type(param.grad) is torch.Tensor
                        else None)
            if not found_inf:  # an Inf/NaN scaled gradient: this parameter skips the step, the scaler backs off
                _unhooked_step(self._inner[param])
        except BaseException:
            self._drop_iteration()  # the next backward starts clean and meets the real problem again
            raise
        param.grad = None if norm is None else _applied_gradient(self, param, norm, found_inf)

    def _unscale(self, grad: torch.Tensor) -> bool:
        """Divide a GradScaler-scaled gradient by the scale, as ``GradScaler.unscale_`` would; True
        if it has Inf/NaN."""
        if self._inverse_scale is None:
            self._inverse_scale = torch.full((1,), 1.0 / self.grad_scaler.get_scale(), dtype=torch.float32)
        found_inf = torch.zeros(1, dtype=torch.float32, device=grad.device)
        torch._amp_foreach_non_finite_check_and_unscale_([grad], found_inf, self._inverse_scale.to(grad.device))
        return bool(found_inf)

    def _drop_iteration(self) -> None:
        for param in self._applied:
            param.grad = None
        self._applied.clear()
        self._inverse_scale = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End of an iteration (the updates ran during backward). With a closure, runs it (its
        backward applies the updates) and returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._drop_iteration()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are already freed by the hooks; clears any left (e.g. from a hook-less path)."""
        for param in self._inner:
            param.grad = None
        self._applied.clear()
        self._inverse_scale = None

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_CLIP_TOO_LATE.format(detail=""))

    def remove_hooks(self) -> None:
        """Detach from the parameters (e.g. to switch back to an ordinary optimizer)."""
        for param in list(self._handles):
            self._release(param)

    def _release(self, param: torch.Tensor) -> None:
        for handle in self._handles.pop(param, ()):
            handle.remove()
        if _owner(param) is self:
            _set_owner(param, None)

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {"layerwise": [inner.state_dict() for inner in self._inner.values()]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of a LayerwiseOptimizer over the same parameters; every inner state is
        checked (by the inner optimizers) before any is loaded. The groups stay the same dicts."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
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
        finally:
            self._relink_groups()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

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
