"""Triton kernels with the same names and signatures as :mod:`memzoo.reference`.

Importing this package does not import Triton; the family modules (``memzoo.triton_kernels.lion``,
...) do, and are only imported by the backend dispatch when Triton is wanted.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Protocol, cast, runtime_checkable

__all__ = ["TritonFamily", "has_family", "interpret_mode_requested", "load_family", "triton_import_error"]


@runtime_checkable
class TritonFamily(Protocol):
    """What every ``memzoo.triton_kernels.<family>`` module provides besides its kernel functions
    (which carry the names and signatures of ``memzoo.reference.<family>``'s; the functions a
    low-rank rule calls are listed in its ``LowRankRule.kernels``)."""

    # Validated by the GPU equivalence suite: backend="auto" may pick these kernels for CUDA tensors.
    AUTO: bool
    # The kernels were decorated in Triton's interpreter mode (TRITON_INTERPRET=1 at import):
    # they run on CPU tensors, and only on them.
    INTERPRETED: bool


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton cannot be used here, or None when it imports."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def interpret_mode_requested() -> bool:
    """Whether TRITON_INTERPRET=1 is set (Triton then runs kernels on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def has_family(family: str) -> bool:
    """Whether ``memzoo.triton_kernels.<family>`` exists (without importing it)."""
    return importlib.util.find_spec(f"memzoo.triton_kernels.{family}") is not None


def load_family(family: str) -> TritonFamily:
    """Import ``memzoo.triton_kernels.<family>`` (which imports Triton)."""
    module = importlib.import_module(f"memzoo.triton_kernels.{family}")
    missing = [name for name in ("AUTO", "INTERPRETED") if not isinstance(getattr(module, name, None), bool)]
    if missing:
        raise TypeError(f"memzoo.triton_kernels.{family} lacks the TritonFamily flags {missing} (bools)")
    return cast(TritonFamily, module)
