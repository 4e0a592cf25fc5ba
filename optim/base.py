"""Shared machinery of every memzoo optimizer: backend dispatch, validation, state accounting.

The one documented choice of implementation lives in :func:`resolve_backend`. It falls back from
Triton to the fast PyTorch path silently only when the user asked for nothing (``backend="auto"``)
and raises when an explicit request cannot be honoured, as torch.optim does for ``fused=True``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import math
import os
import pickle
import signal
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import IO, Any, ClassVar, Literal

import torch

from memzoo.triton_kernels import has_family, interpret_mode_requested, load_family, triton_import_error

__all__ = [
    "BACKENDS",
    "MemzooOptimizer",
    "deferred_interrupts",
    "StateSpec",
    "backend_name",
    "group_by_device",
    "is_dtensor",
    "local_tensor",
    "resolve_backend",
    "state_digest",
]

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")

# Version of the layout written by MemzooOptimizer.state_dict under the "memzoo" key.
STATE_FORMAT = 3


def _format_1_to_2(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Format 2 counts the steps skipped for non-finite values (``skip_nonfinite``)."""
    return {**state_dict, "memzoo": {**state_dict["memzoo"], "format": 2, "skipped_steps": 0}}


def _format_2_to_3(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Format 3 groups carry every group key of their optimizer, and a group missing one is
    refused as damaged. Format 2 groups may lack keys added since they were written:
    :meth:`MemzooOptimizer._migrate` gives those the optimizer's defaults."""
    return {**state_dict, "memzoo": {**state_dict["memzoo"], "format": 3}}


# Migrations of the state_dict layout, format k → k + 1, applied in order when an older
# checkpoint loads (each returns a new dict; the caller's is never modified).
STATE_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _format_1_to_2, 2: _format_2_to_3}


def migrate_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` brought to :data:`STATE_FORMAT` through :data:`STATE_MIGRATIONS`."""
    state_dict = dict(state_dict)
    version = state_dict["memzoo"].get("format")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STATE_FORMAT:
        raise ValueError(f"Unsupported memzoo state format {version!r} (this version reads formats 1 to {STATE_FORMAT}; "
                         "a newer memzoo wrote it?)")
    while version < STATE_FORMAT:
        state_dict = STATE_MIGRATIONS[version](state_dict)
        version = state_dict["memzoo"]["format"]
    return state_dict

# Where save_checkpoint stores the digest of the state_dict, beside its entries.
DIGEST_KEY = "memzoo_digest"
# Group keys a saved group may carry or not: torch.optim records the names of named parameters.
_OPTIONAL_GROUP_KEYS = frozenset({"param_names"})
# State tensors that are counts or seeds (never negative) and ones that are never negative.
_COUNTERS = ("step", "adam_step", "nat_count", "proj_seed")
_NONNEGATIVE = ("exp_avg_sq", "exp_avg_absmax", "limiter_norm")


def state_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a state_dict's contents: every key and value in a canonical order,
    tensors by dtype, shape and bytes (a DTensor by its local shard), numbers by their exact
    repr. Equal for a state_dict and its ``torch.save`` / ``torch.load`` round trip."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = local_tensor(value).detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(local_tensor(value).shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy())  # the bytes, without a copy
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}:".encode())
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}:".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state_dict)
    return digest.hexdigest()


_deferring = False


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block and deliver it when the block ends.

    A step's writes (the weight updates, installing new state, a zeroth-order pass over the
    parameters) run inside it, so an interrupt lands before them or after them, never between
    two tensors or two groups: the step stays all-or-nothing. The previous handler then runs
    as it would have (Python's raises KeyboardInterrupt). Signals reach only the main thread,
    so elsewhere, and nested, this does nothing; it costs two ``signal.signal`` calls."""
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not installed from Python: leave it alone
        yield
        return
    received: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


# (shape, dtype) every per-parameter state tensor must have; checked when a state_dict loads.
StateSpec = dict[str, tuple[torch.Size, torch.dtype]]


def resolve_backend(requested: str, device: torch.device, family: str) -> ModuleType:
    """Return the module whose functions compute ``family``'s math for tensors on ``device``:
    ``memzoo.reference.<family>``, ``memzoo.triton_kernels.torch_backend.<family>`` or
    ``memzoo.triton_kernels.<family>`` (same function names and signatures in all three).

    - ``"reference"``: the per-tensor reference, the truth the others are tested against (slow).
    - ``"torch"``: the fast pure-PyTorch path (chunked multi-tensor passes, batched matrix
      products); runs on every device.
    - ``"auto"``: Triton for CUDA tensors when Triton imports and the family's kernels are marked
      ``AUTO = True`` (validated on a GPU), otherwise ``"torch"``. Falls back silently: the user
      asked for nothing in particular.
    - ``"triton"``: Triton, or a ``ValueError`` saying why it cannot run here (an explicit request
      is never silently replaced). CPU tensors run only through Triton's interpreter, which must
      be enabled (``TRITON_INTERPRET=1``) before the kernel module is first imported, because
      Triton fixes the mode when it decorates.
    """
    if requested not in BACKENDS:
        raise ValueError(f"Invalid backend: {requested!r}; expected one of {BACKENDS}")
    if requested == "reference":
        return importlib.import_module(f"memzoo.reference.{family}")
    if requested == "torch":
        return importlib.import_module(f"memzoo.triton_kernels.torch_backend.{family}")
    if requested == "auto":
        if device.type == "cuda" and has_family(family) and triton_import_error() is None:
            kernels = load_family(family)
            if kernels.AUTO:
                return kernels
        return importlib.import_module(f"memzoo.triton_kernels.torch_backend.{family}")
    if not has_family(family):
        raise ValueError(f"backend='triton': {family} has no Triton kernels yet; use backend='torch' or 'auto'")
    error = triton_import_error()
    if error is not None:
        raise ValueError(
            f"backend='triton' was requested but Triton does not import ({error}); "
            "install triton or use backend='torch'"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' supports CUDA tensors (and CPU ones through the interpreter), got {device}")
    kernels = load_family(family)
    if device.type == "cpu" and not kernels.INTERPRETED:
        hint = (
            "TRITON_INTERPRET=1 is set now, but the kernels were already compiled for the GPU when "
            "memzoo.triton_kernels was first imported"
            if interpret_mode_requested()
            else "set TRITON_INTERPRET=1 in the environment before importing memzoo"
        )
        raise ValueError(
            "backend='triton' got CPU tensors: Triton runs on the CPU only through its interpreter; "
            f"{hint}, or use backend='torch'"
        )
    return kernels


def backend_name(module: ModuleType) -> str:
    """Which backend a module returned by :func:`resolve_backend` is: "reference", "torch" or
    "triton" (what ``"auto"`` chose, for reports)."""
    if module.__name__.startswith("memzoo.reference."):
        return "reference"
    return "torch" if module.__name__.startswith("memzoo.triton_kernels.torch_backend.") else "triton"


def group_by_device(*tensor_lists: Sequence[torch.Tensor]) -> dict[torch.device, tuple[list[torch.Tensor], ...]]:
    """Split parallel lists of tensors by the device of the first list's tensors."""
    if not tensor_lists[0]:
        return {}
    if len(set(map(torch.Tensor.get_device, tensor_lists[0]))) == 1:  # the usual case: one device
        return {tensor_lists[0][0].device: tuple(list(tensors) for tensors in tensor_lists)}
    buckets: dict[torch.device, tuple[list[torch.Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in tensor_lists)
    )
    for items in zip(*tensor_lists, strict=True):
        bucket = buckets[items[0].device]
        for out, item in zip(bucket, items):
            out.append(item)
    return dict(buckets)


def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


_DTENSOR = _dtensor_class()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter or its state)."""
    return _DTENSOR is not None and isinstance(tensor, _DTENSOR)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage: in-place updates reach the
    DTensor), the tensor itself otherwise. Per-element math on FSDP2 parameters runs on the
    shards: each rank updates the elements it owns, exactly as on the whole tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def zeros_state(param: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero state tensor of ``shape``; for a DTensor parameter and a state of its own shape,
    a DTensor sharded like it (FSDP2 then shards the optimizer state with the parameter)."""
    if is_dtensor(param) and tuple(shape) == tuple(param.shape):
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.zeros(shape, dtype=dtype, device=param.device)


def whole_matrix_problem(optimizer: str) -> str:
    """The error of a low-rank method given an FSDP2-sharded weight to project."""
    return (
        f"{optimizer} needs each projected weight whole (its subspace and its update are computed from all "
        "of G and W), and FSDP2 / tensor parallelism shards it. Use DistributedDataParallel with this "
        "optimizer (its state is already low-rank), or put the sharded weights in a param group that "
        "projects nothing (plain AdamW on each shard), or use a per-element optimizer such as Lion with FSDP2"
    )


# Keys that torch and training frameworks put in param groups, accepted by every memzoo optimizer
# although no memzoo rule reads them (any other key a rule does not know is refused, see
# MemzooOptimizer.add_param_group):
FOREIGN_GROUP_KEYS: frozenset[str] = frozenset({
    "initial_lr",  # every torch.optim.lr_scheduler (LRScheduler.__init__ sets it)
    "max_lr", "min_lr", "base_momentum", "max_momentum",  # torch's OneCycleLR / CyclicLR
    "swa_lr",  # torch.optim.swa_utils.SWALR
    "param_names",  # torch's named-parameter groups (Optimizer(model.named_parameters()))
    "name",  # a group's label: Lightning's LearningRateMonitor, users' own code
    "lr_scale",  # timm's layer-wise learning-rate decay groups (read by timm's schedulers)
})


_SET_ERROR = ("{where} must be an ordered collection (a list), not a set: the order decides which saved state "
              "goes with which parameter when a checkpoint loads")


def _describe(group_index: int, param_index: int, param: torch.Tensor) -> str:
    return f"param group {group_index}, param {param_index} (shape {tuple(param.shape)}, {param.dtype})"


# Ints must fit in 64 bits: kernels and state take integer scalars as int64.
INT64_LIMIT = 2**63


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 high_inclusive: bool = True) -> None:
    """Raise unless ``value`` is a finite real number in ``[low, high]`` (or ``[low, high)``).

    Never Inf or NaN, whatever ``high``; an int must fit in 64 bits (kernels take scalars as
    int64 or double). The value is read through ``float()``, which also serves a 0-d tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} {value!r}")
    bracket = "]" if high_inclusive else ")"
    expected = f"must be a finite number ≥ {low}" if high == math.inf else f"must be a number in [{low}, {high}{bracket}"
    if isinstance(value, int) and not -INT64_LIMIT <= value < INT64_LIMIT:
        shown = f"an int of {value.bit_length()} bits" if value.bit_length() > 80 else f"{value}"
        raise ValueError(f"Invalid {name}: {shown} ({expected}; ints must fit in 64 bits)")
    number = float(value)
    upper_ok = number <= high if high_inclusive else number < high
    if not math.isfinite(number) or number < low or not upper_ok:
        raise ValueError(f"Invalid {name}: {number} ({expected})")


def check_bool(name: str, value: Any) -> None:
    """Raise a TypeError unless ``value`` is a bool (a flag given as 1 or "yes" is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a bool, got {value!r}")


def check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) in [low, high); no bound given means
    2**63 (ints must fit in 64 bits)."""
    high = INT64_LIMIT if high is None else high
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value >= high:
        shown = f"an int of {value.bit_length()} bits" if isinstance(value, int) and value.bit_length() > 80 else repr(value)
        upper = "2**63" if high == INT64_LIMIT else str(high)
        raise ValueError(f"Invalid {name}: {shown} (expected an int in [{low}, {upper}))")


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_state_dtype(name: str, value: Any, allowed: tuple[torch.dtype, ...]) -> torch.dtype | None:
    """A state-dtype option: None (the parameter's dtype), or one of ``allowed`` given as a
    torch.dtype or by name ("fp32", "bfloat16", …); ValueError for anything else."""
    if value is None:
        return None
    dtype = _DTYPE_NAMES.get(value) if isinstance(value, str) else value
    if dtype not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; expected None or one of {allowed}")
    return dtype


def check_betas(betas: Any, count: int) -> None:
    """Raise unless ``betas`` is a sequence of ``count`` numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid betas: {betas!r} (expected a tuple of {count} numbers in [0, 1))")
    for index, beta in enumerate(betas):
        check_number(f"beta parameter at index {index}", beta, high=1.0, high_inclusive=False)


def check_lr(value: Any) -> None:
    """Raise unless ``value`` is a learning rate: a number ≥ 0 or, as torch.optim accepts (e.g.
    for schedules under torch.compile), a one-element floating-point Tensor holding one. The
    step reads a Tensor lr as a Python float (:meth:`MemzooOptimizer._numeric_groups`)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"Invalid lr: a Tensor lr must be floating point, got {value.dtype}")
        if value.requires_grad:
            raise ValueError("lr as a Tensor that requires grad is not supported (memzoo steps are not "
                             "differentiable); pass lr.detach()")
        if value.device.type == "meta":  # no value to check
            return
        value = value.item()
    check_number("lr", value)


# torch.optim's implementation flags and the only values memzoo accepts (their torch defaults),
# with why another value cannot be honoured. The implementation is chosen with ``backend``.
_IMPLEMENTATION_FLAGS: dict[str, tuple[Any, str]] = {
    "foreach": (None, "memzoo chooses its implementation with backend= ('torch': PyTorch, 'triton': fused "
                      "multi-tensor kernels, 'auto': Triton where validated); leave foreach=None"),
    "fused": (None, "fused kernels are backend='triton' (backend='auto' picks them where they are validated); "
                    "leave fused=None"),
    "capturable": (False, "a memzoo step decides on the host (step counts, projector refreshes), so it cannot "
                          "be captured in a CUDA graph; leave capturable=False"),
    "differentiable": (False, "memzoo steps update in place under no_grad (and in Triton kernels), so autograd "
                              "cannot differentiate through them; leave differentiable=False"),
}


def check_implementation_flags(**flags: Any) -> None:
    """Raise a ValueError that says why for a torch.optim implementation flag (``foreach``,
    ``fused``, ``capturable``, ``differentiable``) set to anything but its torch default."""
    for name, value in flags.items():
        default, reason = _IMPLEMENTATION_FLAGS[name]
        if value is not default:
            raise ValueError(f"{name}={value!r} is not supported: {reason}")


class MemzooOptimizer(torch.optim.Optimizer):
    """Base of every memzoo optimizer.

    Subclasses set ``family`` (the name of their reference/kernel modules), implement
    :meth:`_validate_group` and :meth:`_state_spec`, and in ``step`` obtain the math through
    :meth:`_kernels`. The base class rejects unsupported parameters and layouts when they are
    added, rejects sparse gradients before any update, reports :meth:`state_bytes`, and makes
    ``state_dict`` / ``load_state_dict`` strict (tagged with the optimizer's name and a format
    version that older checkpoints are migrated from, checked field by field, dtypes of state kept
    as saved).

    Non-finite values: with ``skip_nonfinite=True`` a step whose gradients are not all finite
    returns before modifying anything and counts itself in ``skipped_steps`` (kept in the
    state_dict); by default NaN/Inf propagate into the weights as in torch.optim (sign-based
    steps write NaN for them, never a finite step: :func:`memzoo.reference.common.sign`), while
    the subspace-tracking optimizers keep their projectors and bases finite (see their docs). The
    whole policy, per optimizer, is in the README ("Bad input, non-finite values, failures").
    """

    family: ClassVar[str]
    # Group keys of the official code that :meth:`_translate_group` maps to ours: known keys
    # (never refused as unknown), offered as suggestions for a misspelled key.
    official_group_keys: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # torch.compile fence: a compiled training step graph-breaks at optimizer.step() and runs
        # it eagerly (our kernels, SVD/QR/eigh, Python-side state) instead of tracing it; the
        # learning rate and other hyperparameters are then plain Python numbers that no graph
        # depends on, so LR schedules never trigger recompiles.
        if "step" in vars(cls) and not getattr(cls.step, "_memzoo_fenced", False):
            fenced = torch.compiler.disable(cls.step, recursive=True)
            fenced._memzoo_fenced = True
            cls.step = fenced

    # Attributes that only cache what param_groups and state determine, with the factory of
    # their empty value: created empty by __init__, left out of pickles and deep copies (a
    # copy rebuilds them), and emptied when a state_dict loads.
    _CACHES: ClassVar[dict[str, Callable[[], Any]]] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, backend: Backend = "auto",
                 skip_nonfinite: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        check_bool("skip_nonfinite", skip_nonfinite)
        check_implementation_flags(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR.format(where="params"))
        self._reset_caches()
        self.backend: Backend = backend
        self.skip_nonfinite = skip_nonfinite
        # Steps skipped because of non-finite values (skip_nonfinite=True); in the state_dict.
        self.skipped_steps = 0
        # param → _layout_key under which its state was last checked (see _reconciled_state).
        self._layouts: dict[torch.Tensor, tuple] = {}
        super().__init__(params, defaults)
        # Fail at construction, not at the first step, when an explicit backend cannot run.
        for device in {p.device for group in self.param_groups for p in group["params"]}:
            resolve_backend(backend, device, self.family)

    # -- copies ---------------------------------------------------------------------------
    def _reset_caches(self) -> None:
        for name, empty in self._CACHES.items():
            setattr(self, name, empty())

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: every attribute (torch.optim keeps only
        defaults, state and param_groups, and a copy then lacks ``backend``, ``skip_nonfinite``,
        …) except the caches and, as in torch.optim, the registered hooks."""
        return {name: value for name, value in self.__dict__.items()
                if name not in self._CACHES and not (name.startswith("_optimizer_") and name.endswith("hooks"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.optim's __setstate__ (also run by load_state_dict) adds "differentiable" to
        # defaults, from where add_param_group would copy it into new groups: memzoo has no such
        # hyperparameter (see check_implementation_flags).
        added = "differentiable" not in self.__dict__.get("defaults", state.get("defaults", {}))
        super().__setstate__(state)
        if added:
            self.defaults.pop("differentiable", None)
        self._reset_caches()

    # -- hooks for subclasses -------------------------------------------------------------
    def _validate_group(self, group: Mapping[str, Any], group_index: int) -> None:
        """Raise ValueError/TypeError naming the group when a hyperparameter is invalid."""
        raise NotImplementedError

    def _state_spec(self, param: torch.Tensor, group: Mapping[str, Any]) -> StateSpec:
        """Shape and dtype of each state tensor that ``param`` has once it has been stepped."""
        raise NotImplementedError

    # Group keys that the shapes and dtypes of a parameter's state depend on (beside the
    # parameter's own shape and dtype): an edit of one between steps is reconciled by
    # _reconciled_state before the step writes anything.
    _layout_keys: ClassVar[tuple[str, ...]] = ()
    # Sets of state keys that the step rebuilds itself when they are absent (a projector, which
    # is then refreshed; a history, which starts over): an edit that invalidates one of them
    # drops the set instead of restarting the whole state.
    _rebuilt_units: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # Whether a group's lr may be None (an optimizer that computes its own step size, as
    # Adafactor's relative step): the per-step check then lets None through.
    _lr_optional: ClassVar[bool] = False

    # -- state across group edits -----------------------------------------------------------
    def _layout_key(self, param: torch.Tensor, group: Mapping[str, Any]) -> tuple:
        return (param.dtype, param.shape, *(group[key] for key in self._layout_keys))

    def _reconciled_state(self, param: torch.Tensor, group: Mapping[str, Any], stored: dict[str, Any] | None,
                          where: tuple[int, int], notes: list[str]) -> dict[str, Any]:
        """``param``'s state as this step must see it, computed without modifying the stored one.

        The stored dict itself when it matches the group's current settings and the parameter's
        dtype and shape (checked once per change of :meth:`_layout_key`, so the common step costs
        one tuple comparison). Otherwise a new dict, which the step installs with
        :meth:`_install_states` only once nothing can fail, after a group edit or a dtype change
        (``model.bfloat16()``) between steps:

        - a floating-point state tensor whose dtype changed is cast (``state_dtype``,
          ``momentum_dtype``, the parameter's dtype);
        - a rebuilt unit (:attr:`_rebuilt_units`: a projector, Natural GaLore's history, APOLLO's
          limiter norm) that no longer fits is dropped, and the step rebuilds it;
        - anything else that no longer fits (a moment of another shape: ``rank``, ``proj_type``,
          ``density``, COSMOS ``rank``; 8-bit ↔ 32-bit moments) restarts the state: an empty
          dict, which the step fills as at the parameter's first step.

        Each change is described in ``notes`` (the step warns once). A new parameter (no state)
        gets an empty dict."""
        if not stored:
            return {}
        if self._layouts.get(param) == self._layout_key(param, group):
            return stored
        spec = self._state_spec(param, group)
        units = {name: unit for unit in self._rebuilt_units for name in unit}
        state, changes, dropped, restart = dict(stored), [], set(), None
        for name in sorted(stored.keys() | spec.keys()):
            value, expected = stored.get(name), spec.get(name)
            if expected is None or value is None:
                problem = f"'{name}' is no longer used" if expected is None else f"'{name}' is missing"
            elif not isinstance(value, torch.Tensor):
                problem = f"'{name}' is a {type(value).__name__}"
            elif value.shape != expected[0]:
                problem = f"'{name}' is {tuple(value.shape)}, now {tuple(expected[0])}"
            elif value.dtype != expected[1]:
                if value.is_floating_point() and expected[1].is_floating_point:
                    state[name] = value.to(expected[1])
                    changes.append(f"'{name}' cast from {value.dtype} to {expected[1]}")
                    continue
                problem = f"'{name}' is {value.dtype}, now {expected[1]}"
            else:
                continue
            if name in units:
                dropped.add(units[name])
            elif restart is None:
                restart = problem
        if restart is not None:
            state, changes = {}, [f"restarted as at a first step ({restart})"]
        else:
            for unit in sorted(dropped):
                present = [name for name in unit if state.pop(name, None) is not None]
                if present:
                    changes.append(f"{', '.join(map(repr, present))} rebuilt")
        if not changes:
            self._layouts[param] = self._layout_key(param, group)
            return stored
        group_index, param_index = where
        notes.append(f"{_describe(group_index, param_index, param)}: " + "; ".join(changes))
        return state

    def _install_states(self, staged: Sequence[tuple[torch.Tensor, dict[str, Any], Mapping[str, Any]]],
                        notes: Sequence[str]) -> None:
        """Install the states a step staged (new ones, or reconciled by :meth:`_reconciled_state`);
        called once every fallible computation that precedes the writes has succeeded."""
        for param, state, group in staged:
            self.state[param] = state
            self._layouts[param] = self._layout_key(param, group)
        if notes:
            more = f"; and {len(notes) - 5} more" if len(notes) > 5 else ""
            warnings.warn(
                f"{type(self).__name__}: state that no longer matched its param group's settings or its parameter's "
                "dtype was adapted before this step: " + "; ".join(notes[:5]) + more, RuntimeWarning, stacklevel=3)

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A param group in the official code's format (keys in :attr:`official_group_keys`)
        rewritten with our keys, before any check; ``group`` is the caller's copy, free to change.
        Raises ValueError for official settings that are not implemented."""
        return group

    def _check_group_keys(self, group: Mapping[str, Any]) -> None:
        """Refuse a key that no rule of this optimizer reads (a misspelling would otherwise be
        ignored silently: ``{"rnak": 8}`` would train with the default), naming the closest
        valid key."""
        known = set(self.defaults) | {"params"} | FOREIGN_GROUP_KEYS
        unknown = [key for key in group if key not in known]
        if not unknown:
            return
        key = unknown[0]
        names = sorted(known | self.official_group_keys)
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        options = sorted((set(self.defaults) | self.official_group_keys) - {"params"})
        raise ValueError(
            f"unknown key {key!r}{hint}; {type(self).__name__} param groups take 'params' and {options}, "
            f"plus keys torch and trainers add ({sorted(FOREIGN_GROUP_KEYS)})"
        )

    # -- parameters -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group_index = len(self.param_groups)
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError(f"param group {group_index} must be a dict with a 'params' entry, got "
                            f"{type(param_group).__name__}")
        try:
            param_group = self._translate_group(dict(param_group))
            self._check_group_keys(param_group)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {group_index}: {exc}") from None
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR.format(where=f"param group {group_index}: params"))
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not params:
            raise ValueError(f"param group {group_index} has no parameters; leave the group out or give it some")
        # Named parameters ((name, tensor) pairs, e.g. model.named_parameters()), as torch ≥ 2.6:
        # the names are kept in the group's "param_names" and in the state_dict.
        if any(isinstance(item, tuple) for item in params):
            if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in params):
                raise ValueError(f"param group {group_index}: all optimizer params should be with/without names. "
                                 "Some param names are missing (give every parameter as a (name, tensor) pair, "
                                 "or none)")
            param_group = {**param_group, "params": [item[1] for item in params],
                           "param_names": [item[0] for item in params]}
            params = param_group["params"]
        names = param_group.get("param_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params)
                                  or not all(isinstance(name, str) for name in names)):
            raise ValueError(f"param group {group_index}: param_names must be a list of {len(params)} strings, "
                             f"one per parameter, got {names!r}")
        # Where each parameter already is: a parameter in two places would be stepped twice.
        seen = {id(p): (g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])}
        for param_index, param in enumerate(params):
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"param group {group_index}, param {param_index}: expected a Tensor, got {type(param).__name__}")
            if id(param) in seen:
                # torch.optim only warns for a duplicate inside a group; it would be stepped twice.
                first_group, first_index = seen[id(param)]
                where = "some parameters appear in more than one parameter group: " if first_group != group_index else ""
                raise ValueError(
                    f"{where}{_describe(group_index, param_index, param)} is the same tensor as param group "
                    f"{first_group}, param {first_index}; each parameter may appear once (remove the duplicate)"
                )
            seen[id(param)] = (group_index, param_index)
            if not param.is_leaf:
                raise ValueError(
                    f"{_describe(group_index, param_index, param)} is not a leaf tensor (it was computed from "
                    "others), so it receives no .grad; optimize the leaf (an nn.Parameter, or x.detach().requires_grad_())"
                )
            if param.is_complex():
                raise TypeError(
                    f"{type(self).__name__} does not support complex parameters ({_describe(group_index, param_index, param)}); "
                    "optimize torch.view_as_real(param) instead"
                )
            if param.is_sparse or not param.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__} needs dense floating-point parameters, got "
                    f"{param.layout} {_describe(group_index, param_index, param)}"
                )
        merged = {**self.defaults, **param_group}
        try:
            self._validate_group(merged, group_index)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {group_index}: {exc}") from None
        self._check_dtensors(params, merged, group_index)
        super().add_param_group(param_group)

    def _check_changed_values(self) -> None:
        """Check, at every step, the group values that code outside the optimizer changes
        between steps (LR schedulers write ``lr``, OneCycleLR / CyclicLR also ``betas``; some
        schedules ``weight_decay``): a NaN, Inf or negative value raises a ValueError naming
        the group before anything is modified, instead of stepping on silently. A few type
        checks per group when the values are plain floats."""
        for group_index, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay"):
                value = group.get(key)
                if key not in group or (type(value) is float and 0.0 <= value < math.inf):  # the fast path
                    continue
                if value is None and key == "lr" and self._lr_optional:
                    continue
                try:
                    if key == "lr":
                        check_lr(value)  # reads a tensor lr (as torch.optim accepts) by its value
                    else:
                        check_number(key, value)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"param group {group_index}: {exc}. It was valid when the group was added, so "
                                    "it was changed since (an LR scheduler?); this step modified nothing") from None
            betas = group.get("betas")
            if betas is not None and not (type(betas) is tuple and len(betas) == len(self.defaults["betas"])
                                          and all(type(b) is float and 0.0 <= b < 1.0 for b in betas)):
                try:
                    check_betas(betas, len(self.defaults["betas"]))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"param group {group_index}: {exc}; this step modified nothing") from None

    def _check_grads(self) -> bool:
        """Reject what no memzoo step can use, before any parameter or state is modified:
        group values changed into invalid ones since they were checked
        (:meth:`_check_changed_values`), sparse gradients. Returns False when the step is to be
        skipped (``skip_nonfinite`` and a gradient with NaN or Inf); the skip is counted in
        ``skipped_steps``."""
        self._check_changed_values()
        for group_index, group in enumerate(self.param_groups):
            grads = [param.grad for param in group["params"]]
            if set(grad.layout for grad in grads if grad is not None) <= {torch.strided}:
                continue  # the per-step fast path
            for param_index, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is not None and grad.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({_describe(group_index, param_index, param)}); use dense gradients, "
                        "e.g. nn.Embedding(..., sparse=False)"
                    )
        if self.skip_nonfinite and not self._grads_finite():
            self.skipped_steps += 1
            return False
        return True

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite: one max-|g| reduction per tensor and one host sync
        per step. Sharded (DTensor) gradients are agreed on across ranks, so every rank makes the
        same decision (replicated ones, as under DDP, are identical already)."""
        grads, sharded_device = [], None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if sharded_device is None and is_dtensor(param.grad):
                    sharded_device = param.grad.device
                grad = local_tensor(param.grad)
                if grad.numel() > 0:  # a rank's shard may be empty (uneven sharding)
                    grads.append(grad)
        flags = []
        for (bucket,) in group_by_device(grads).values():
            norms = torch._foreach_norm(bucket, math.inf)
            flags.append(torch.stack([norm.float() for norm in norms]).isfinite().all())
        finite = torch.stack([flag.cpu() for flag in flags]).all() if flags else torch.tensor(True)
        if sharded_device is not None and torch.distributed.is_initialized():
            flag = finite.to(device=sharded_device, dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        return bool(finite)

    def _check_dtensors(self, params: Sequence[torch.Tensor], group: Mapping[str, Any], group_index: int) -> None:
        """Raise for DTensor parameters (FSDP2, tensor parallel) that ``group`` cannot update."""
        for param_index, param in enumerate(params):
            if is_dtensor(param):
                problem = self._dtensor_problem(param, group)
                if problem:
                    raise ValueError(
                        f"{type(self).__name__}: {_describe(group_index, param_index, param)} is a DTensor "
                        f"(placements {tuple(param.placements)}): {problem}"
                    )

    def _dtensor_problem(self, param: torch.Tensor, group: Mapping[str, Any]) -> str | None:
        """Why this DTensor parameter cannot be stepped with ``group``'s settings and what to do
        instead; None when it can (per-element math runs on the local shard)."""
        return None

    def _resharding_problem(self, saved: Mapping[int, Mapping[str, torch.Size]]) -> str | None:
        """Why state saved with these global shapes (parameter index → state key → shape, from a
        ``torch.distributed.checkpoint``'s metadata, possibly of another world size) cannot be
        laid out on this run's shards; None when it can (DCP reshards DTensor state)."""
        return None

    def _reshard_loaded(self, state: dict[int, dict[str, Any]]) -> None:
        """Rewrite, in place, state that ``torch.distributed.checkpoint`` read from another world
        size into this run's layout before :meth:`load_state_dict` checks it (parameter index →
        state key → value); nothing to do where DCP reshards DTensor state itself."""

    def _numeric_groups(self) -> list[dict[str, Any]]:
        """The param groups as a step reads them: a Tensor lr (accepted as torch.optim does)
        becomes a Python float here, at the boundary, because the kernels take scalars (one host
        read per group and step when it lives on a GPU). Other groups are returned as they are."""
        return [{**group, "lr": group["lr"].item()}
                if isinstance(group["lr"], torch.Tensor) and group["lr"].device.type != "meta" else group
                for group in self.param_groups]

    def _kernels(self, device: torch.device) -> ModuleType:
        """The reference, torch or Triton module that computes this optimizer's math on ``device``."""
        return resolve_backend(self.backend, device, self.family)

    def _run_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # -- memory ---------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of tensors held in optimizer state (each storage counted once)."""
        seen: set[tuple[torch.device, int]] = set()
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    storage = local_tensor(value).untyped_storage()
                    key = (value.device, storage.data_ptr())
                    if key not in seen:
                        seen.add(key)
                        total += storage.nbytes()
        return total

    # -- checkpoints ----------------------------------------------------------------------
    # Top-level entries of a state_dict besides state, param_groups and memzoo (a subclass's own).
    _extra_state_dict_keys: ClassVar[tuple[str, ...]] = ()

    def _meta(self) -> dict[str, Any]:
        """The state_dict's "memzoo" entry."""
        return {"optimizer": type(self).__name__, "format": STATE_FORMAT, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["memzoo"] = self._meta()
        return state_dict

    def _migrate(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Bring an older checkpoint to the current layout (subclasses add their own steps).

        A group key added in a later version is missing from checkpoints written before format 3:
        their groups take this optimizer's default for it (as torch.optim's ``__setstate__`` does
        for new flags). From format 3 on, a missing key is damage, and refused."""
        migrated = migrate_state_dict(state_dict)
        groups = migrated["param_groups"]
        if state_dict["memzoo"]["format"] < 3 and isinstance(groups, (list, tuple)):
            migrated["param_groups"] = [{**self.defaults, **group} if isinstance(group, Mapping) else group
                                        for group in groups]
        return migrated

    def save_checkpoint(self, file: str | os.PathLike | IO[bytes]) -> None:
        """``torch.save`` the state_dict with its SHA-256 digest beside it (key ``memzoo_digest``,
        see :func:`state_digest`), so that :meth:`load_checkpoint` notices any change of a value
        since (a flipped bit in a hyperparameter or a moment), not only changes of structure."""
        state_dict = self.state_dict()
        torch.save({**state_dict, DIGEST_KEY: state_digest(state_dict)}, file)

    def load_checkpoint(self, file: str | os.PathLike | IO[bytes], *, require_digest: bool = False) -> None:
        """Load a state_dict saved with :meth:`save_checkpoint` or ``torch.save(optimizer.state_dict(), file)``.

        The file is read with ``torch.load(weights_only=True)`` (no code runs) onto the CPU; a
        truncated or corrupted file, or one holding arbitrary pickled objects, raises a
        ``ValueError`` naming it, and the optimizer is left unchanged, as it is by every check of
        :meth:`load_state_dict`. A file written by :meth:`save_checkpoint` carries a digest of
        its contents, checked here: a changed value raises a ``ValueError`` too.
        ``require_digest=True`` refuses files without one."""
        name = getattr(file, "name", file)
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file trips the unpickler in many ways (KeyError, IndexError, …)
            raise ValueError(f"cannot read the checkpoint {name!s}: it is truncated, corrupted, or holds objects "
                             f"other than tensors and plain containers ({type(exc).__name__}: {exc})") from exc
        if isinstance(state_dict, Mapping) and DIGEST_KEY in state_dict:
            state_dict = dict(state_dict)
            digest = state_dict.pop(DIGEST_KEY)
            if not isinstance(digest, str) or digest != state_digest(state_dict):
                raise ValueError(f"the checkpoint {name!s} does not match its digest ('{DIGEST_KEY}'): its contents "
                                 "changed after save_checkpoint wrote it (a damaged file?)")
        elif require_digest:
            raise ValueError(f"the checkpoint {name!s} has no digest ('{DIGEST_KEY}'); write it with "
                             "optimizer.save_checkpoint(file), or pass require_digest=False")
        self.load_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by the same optimizer class, after checking every field.

        Older formats are migrated first. Every mismatch (param counts, hyperparameters and
        group keys, state keys, shapes, dtypes, impossible values such as a negative step) is
        reported in one ``ValueError``, field by field, and nothing is modified when there is
        one; a state_dict too malformed to be checked field by field raises a ``ValueError``
        too. Unlike torch.optim, state tensors keep their saved dtype (e.g. fp32 momentum of
        bf16 parameters); they move to their parameter's device.
        """
        try:
            state_dict, skipped, restore = self._checked_state_dict(state_dict)
        except ValueError:
            raise
        except Exception as exc:  # untrusted input: report whatever check its structure tripped
            raise ValueError(f"{type(self).__name__}.load_state_dict: malformed state_dict "
                             f"({type(exc).__name__}: {exc})") from exc
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        self._layouts.clear()  # loaded states are checked against the groups at the next step
        # torch.optim casts floating state to the parameter's dtype; put the saved dtype back
        # from the original tensor (a cast back would have lost bits). torch.optim also keeps the
        # given tensor itself where no cast or move is needed (step counters, same-dtype moments):
        # loaded from another live optimizer's state_dict, both would then update one tensor in
        # place. Every loaded tensor is this optimizer's own.
        for param, key, value in restore:
            loaded = self.state[param][key]
            if not isinstance(loaded, torch.Tensor):  # a count saved as an int: its tensor, made when checked
                self.state[param][key] = value
            elif loaded.dtype != value.dtype or loaded is value:
                self.state[param][key] = value.to(device=param.device, copy=True)

    def _checked_state_dict(self, state_dict: Any) -> tuple[dict[str, Any], int, list]:
        """The migrated state_dict, its skipped-step count and the (param, key, tensor) state to
        restore; ValueError listing every problem."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and 'param_groups'")
        meta = state_dict.get("memzoo")
        if not isinstance(meta, Mapping):
            raise ValueError(f"This state_dict was not written by a memzoo optimizer; {name} cannot load it")
        if meta.get("optimizer") != name:
            raise ValueError(f"This state_dict was written by {meta.get('optimizer')!r}, not {name!r}")
        state_dict = self._migrate(state_dict)
        problems: list[str] = []
        unknown = set(state_dict) - {"state", "param_groups", "memzoo", *self._extra_state_dict_keys}
        if unknown:
            problems.append(f"unknown top-level entries {sorted(map(repr, unknown))}")
        meta_keys = set(self._meta())
        if set(state_dict["memzoo"]) != meta_keys:
            problems.append(f"'memzoo' has keys {sorted(map(repr, state_dict['memzoo']))}, "
                            f"expected {sorted(map(repr, meta_keys))}")
        skipped = state_dict["memzoo"].get("skipped_steps")
        saved_groups = state_dict["param_groups"]
        if not isinstance(state_dict["state"], Mapping) or not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups):
            raise ValueError(f"{name}.load_state_dict: malformed state_dict ('state' must be a dict and "
                             "'param_groups' a list of dicts with a 'params' list)")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}")
        saved_state = state_dict["state"]
        saved_ids = [param_id for saved in saved_groups for param_id in saved["params"]]
        if any(isinstance(i, bool) or not isinstance(i, int) for i in saved_ids) or len(set(saved_ids)) != len(saved_ids):
            raise ValueError(f"{name}.load_state_dict: malformed state_dict (the groups' 'params' must be "
                             f"distinct ints, got {saved_ids[:20]!r})")
        stray = [key for key in saved_state if key not in set(saved_ids)]
        if stray:
            problems.append(f"'state' has entries {stray[:5]!r} for no parameter of the param groups")
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            problems.append(f"skipped_steps is {skipped!r}, expected an int ≥ 0")
        restore: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                problems.append(f"param group {group_index} has {len(group['params'])} params, "
                                f"the state_dict's has {len(saved['params'])}")
                continue
            expected_keys = set(group) - {"params"}
            missing = expected_keys - set(saved) - _OPTIONAL_GROUP_KEYS
            extra = set(saved) - expected_keys - {"params"} - _OPTIONAL_GROUP_KEYS
            if missing or extra:
                problems.append(f"state_dict param group {group_index}: " + "; ".join(
                    [f"missing {', '.join(map(repr, sorted(missing)))}"] * bool(missing)
                    + [f"unknown {', '.join(map(repr, sorted(map(str, extra))))}"] * bool(extra)))
                continue
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._validate_group(merged, group_index)
                self._check_dtensors(group["params"], merged, group_index)
            except (TypeError, ValueError) as exc:
                problems.append(f"state_dict param group {group_index}: {exc}")
                continue
            for param_index, (param_id, param) in enumerate(zip(saved["params"], group["params"])):
                if param_id not in saved_state:
                    continue
                spec = self._state_spec(param, merged)
                entry = saved_state[param_id]
                where = _describe(group_index, param_index, param)
                if not isinstance(entry, Mapping):
                    problems.append(f"state for {where} is a {type(entry).__name__}, expected a dict")
                    continue
                if set(entry) != set(spec):
                    problems.append(f"state for {where} has keys {sorted(map(repr, entry))}, expected {sorted(spec)}")
                    continue
                shapes_ok = True
                for key, (shape, dtype) in spec.items():
                    value = entry[key]
                    if (not shape and not dtype.is_floating_point and isinstance(value, int)
                            and not isinstance(value, bool) and value >= 0):
                        # A count saved as a Python int (torch.optim loads such older checkpoints);
                        # kept on the CPU, as torch.optim keeps its step counts.
                        value = torch.tensor(value, dtype=dtype)
                    if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype:
                        got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                               else type(value).__name__)
                        problems.append(f"state '{key}' for {where} is {got}, expected {tuple(shape)} {dtype}")
                        shapes_ok = False
                        continue
                    restore.append((param, key, value))
                if shapes_ok:
                    problems += [f"state {problem} for {where}" for problem in self._implausible_state(param, merged, entry)]
        if problems:
            raise ValueError(f"{name}.load_state_dict: the state_dict does not match this optimizer "
                             f"({len(problems)} mismatches):\n  " + "\n  ".join(problems))
        return state_dict, skipped, restore

    def _implausible_state(self, param: torch.Tensor, group: Mapping[str, Any], entry: Mapping[str, torch.Tensor]) -> list[str]:
        """Values no step can have written, in a state of the right shapes and dtypes (a
        negative step count, a negative second moment …), each as "'key' is …"."""
        problems = []
        for key, value in entry.items():
            value = local_tensor(value)
            if key in _COUNTERS and int(value) < 0:
                problems.append(f"'{key}' is {int(value)}, expected ≥ 0")
            elif key in _NONNEGATIVE and value.numel() and bool((value < 0).any()):
                problems.append(f"'{key}' has negative values ({float(value.min())}), expected ≥ 0")
        return problems
