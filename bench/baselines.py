"""Other libraries' optimizers, timed by ``memzoo-bench step --baseline NAME`` in the same run
as ours, on the same parameters and (for low-rank methods) the same param groups.

Each is optional: a baseline whose package is not installed is reported, not fatal.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BASELINES", "import_galore_torch", "import_official", "make_baseline"]

Named = list[tuple[str, torch.nn.Parameter]]


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"baseline needs the package {module!r} ({exc})") from None


def import_official(module: str) -> Any:
    """An official optimizer package (``galore_torch``, ``apollo_torch``). They import
    transformers only for a version check; where transformers is absent that import is stubbed
    for the duration of the import."""
    stubbed = []
    if "transformers" not in sys.modules:
        try:
            importlib.import_module("transformers.utils.versions")
        except ImportError:
            for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
                sys.modules[name] = types.ModuleType(name)
                stubbed.append(name)
            sys.modules["transformers.utils.versions"].require_version = lambda *args, **kwargs: None
    try:
        return _require(module)
    finally:
        for name in stubbed:
            del sys.modules[name]


def import_galore_torch() -> Any:
    """The official ``galore_torch`` module (see :func:`import_official`)."""
    return import_official("galore_torch")


def _paper_groups(named: Named) -> list[dict[str, Any]]:
    from memzoo.optim.registry import get_optimizer_info

    groups = get_optimizer_info("galore_adamw").bench_groups(named)
    return [{**g, "proj_type": "std"} if "rank" in g else g for g in groups]


def _apollo_torch(named: Named, name: str) -> torch.optim.Optimizer:
    """apollo-torch's APOLLOAdamW on the groups of our registry entry ``name`` (same ranks,
    scales and gap; ``proj_type`` std)."""
    from memzoo.optim.registry import get_optimizer_info

    groups = [{**g, "proj_type": "std"} if "rank" in g else g for g in get_optimizer_info(name).bench_groups(named)]
    return import_official("apollo_torch").APOLLOAdamW(groups, lr=1e-3, weight_decay=0.0)


def _lion_pytorch(named: Named, use_triton: bool) -> torch.optim.Optimizer:
    lion = _require("lion_pytorch")
    return lion.Lion([p for _, p in named], lr=1e-4, weight_decay=0.1, use_triton=use_triton)


def _pytorch_optimizer(name: str, named: Named) -> torch.optim.Optimizer:
    """pytorch-optimizer's Lion, SOAP or Muon with their documented defaults. Muon takes the
    hidden matrices (attention, MLP); embeddings, head and vectors go to its AdamW groups."""
    module = _require("pytorch_optimizer")
    params = [p for _, p in named]
    if name == "Lion":
        return module.Lion(params, lr=1e-4, weight_decay=0.1)
    if name == "SOAP":
        return module.SOAP(params, lr=3e-3)
    hidden = [p for n, p in named if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    return module.Muon([{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], lr=0.02)


def _bnb(name: str, named: Named, **kwargs: Any) -> torch.optim.Optimizer:
    optim = _require("bitsandbytes.optim")
    return getattr(optim, name)([p for _, p in named], **kwargs)


BASELINES: dict[str, Callable[[Named], torch.optim.Optimizer]] = {
    "lion_pytorch": lambda named: _lion_pytorch(named, use_triton=False),
    "lion_pytorch_triton": lambda named: _lion_pytorch(named, use_triton=True),
    "pytorch_optimizer_lion": lambda named: _pytorch_optimizer("Lion", named),
    "pytorch_optimizer_soap": lambda named: _pytorch_optimizer("SOAP", named),
    "pytorch_optimizer_muon": lambda named: _pytorch_optimizer("Muon", named),
    "bnb_adamw8bit": lambda named: _bnb("AdamW8bit", named, lr=1e-3, weight_decay=0.01),
    "bnb_lion8bit": lambda named: _bnb("Lion8bit", named, lr=1e-4, weight_decay=0.1),
    # The official GaLore on the paper's groups (rank by width, scale 0.25, gap 200, std).
    "galore_torch": lambda named: import_galore_torch().GaLoreAdamW(_paper_groups(named), lr=1e-3, weight_decay=0.0),
    # The official APOLLO and APOLLO-Mini on the groups of our apollo / apollo_mini rows.
    "apollo_torch": lambda named: _apollo_torch(named, "apollo"),
    "apollo_mini_torch": lambda named: _apollo_torch(named, "apollo_mini"),
}


def make_baseline(name: str, named: Named) -> torch.optim.Optimizer:
    """The baseline optimizer ``name`` over ``named``; ValueError if unknown or not installed."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(sorted(BASELINES))}")
    return BASELINES[name](named)
