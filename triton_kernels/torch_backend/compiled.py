"""``torch.compile`` for the torch backend's elementwise passes on the CPU.

Eager PyTorch runs one loop per operation, so a pass of k operations reads its inputs k times
(the chunked twins keep a chunk in cache, but still pay k loops per chunk); fused AdamW is one
loop. Inductor compiles a whole pass into one vectorized C++ loop per tensor, which is what lets
Lion (20 bytes per parameter) run faster than fused AdamW (28) on a CPU. The compiled pass runs
the reference's operations in the reference's order, so its results are the reference's.

When it is used (environment variable ``MEMZOO_TORCH_COMPILE``):

- ``auto`` (default): CPU tensors (plain, not DTensor) totalling at least :data:`MIN_NUMEL`
  elements (a pass that saves more per element, such as a Philox draw, sets a lower threshold of
  its own) — below that the compilation (seconds, in the first step; Inductor's on-disk cache
  makes later processes' first steps cheaper) does not pay for itself;
- ``always``: every CPU call (the tests use it on small tensors);
- ``never``: never (the eager chunked path).

Where compiling fails — no C++ compiler installed, an Inductor without CPU support — the pass
warns once, says why, and runs the eager path from then on: same results, slower.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["COMPILE_ENV", "MIN_NUMEL", "CompileFailure", "CompiledPass", "compile_policy"]

COMPILE_ENV = "MEMZOO_TORCH_COMPILE"
POLICIES = ("auto", "always", "never")
# 4M elements: a 60M-parameter model's Lion step saves ~100 ms per step on 2 cores (measured,
# bench/RESULTS.md), so a compilation of 10-30 s pays within a few hundred steps; a smaller set
# of tensors (a test, a head being fine-tuned) would wait longer than it saves.
MIN_NUMEL = 1 << 22
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as DTensor


def compile_policy() -> str:
    """The value of ``MEMZOO_TORCH_COMPILE`` (default ``auto``); a ValueError names a wrong one."""
    policy = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"{COMPILE_ENV}={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


class CompileFailure:
    """Why compiling failed, shared by the passes of one family so that they warn once together
    and all run eagerly from then on (None: no failure yet)."""

    def __init__(self) -> None:
        self.reason: str | None = None


class CompiledPass:
    """One module-level pass function, compiled on first use (``fullgraph``: a graph break would
    silently split the loop), with the eager fallback on failure.

    ``fn`` must be a module-level function (a new function object would recompile every call)
    taking tensors, tensor lists, 0-d tensors for every scalar that may change between steps (a
    Python float would be a compile-time constant: a new learning rate would recompile), and
    Python bools/ints only for what selects code (maximize). ``failure`` is shared by the passes
    of one family (one warning for all); ``min_numel``: the ``auto`` threshold of this pass
    (default :data:`MIN_NUMEL`); ``compile_options`` go to ``torch.compile`` (e.g.
    ``dynamic=False``, Inductor ``options``).
    """

    def __init__(self, fn: Callable[..., None], name: str, *, failure: CompileFailure | None = None,
                 min_numel: int = MIN_NUMEL, **compile_options: Any) -> None:
        self.fn = fn
        self.name = name
        self.min_numel = min_numel
        self.shared = failure if failure is not None else CompileFailure()
        self.compile_options = compile_options
        self.compiled: Callable[..., None] | None = None

    @property
    def failure(self) -> str | None:
        return self.shared.reason

    def wanted(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the compiled pass should run on these tensors (the policy above)."""
        policy = compile_policy()
        if policy == "never" or self.failure is not None:
            return False
        if not all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors):
            return False
        return policy == "always" or sum(t.numel() for t in tensors) >= self.min_numel

    def __call__(self, *args: Any, fallback: Callable[[], None] | None = None) -> None:
        """Run the compiled pass; when compiling fails (now or before, in this family), warn once
        and run ``fallback`` (default: ``fn`` itself, eagerly). Compilation fails before the pass
        writes anything, so the fallback starts from untouched tensors."""
        eager = fallback if fallback is not None else (lambda: self.fn(*args))
        if self.failure is not None:
            eager()
            return
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, **self.compile_options)
        try:
            self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager path
            message = str(error).strip()
            self.shared.reason = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"[:300]
            warnings.warn(f"memzoo: torch.compile of the {self.name} failed ({self.failure}); the torch backend "
                          f"runs it eagerly from now on (same results, slower). Set {COMPILE_ENV}=never to "
                          "skip the attempt.", RuntimeWarning, stacklevel=3)
            eager()
