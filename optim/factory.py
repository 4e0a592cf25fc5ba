"""``create_optimizer(model, name, ...)``: every memzoo optimizer from a model in one call, with
the param groups real training code needs (target matrices for the low-rank methods, no weight
decay for biases and norms)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memzoo.optim.registry import FactoryName, OptimizerInfo, factory_names

__all__ = ["FACTORY_NAMES", "FactoryEntry", "create_optimizer", "factory_class_and_settings", "list_optimizers", "target_parameters"]

# The module names an output head usually has; excluded from the default targets (as PEFT's and
# Hugging Face's "all-linear" exclude the output layer).
_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")


def _is_head(name: str, module: torch.nn.Module, embedding_weights: set[int]) -> bool:
    return name.split(".")[-1] in _HEAD_NAMES or id(module.weight) in embedding_weights


def _matches(targets: str | Sequence[str], name: str) -> bool:
    """Hugging Face's optim_target_modules rule: a string is a regex matched against the whole
    module name; a list matches a name equal to, containing, or fully matching one of its items."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or target in name or re.fullmatch(target, name) is not None for target in targets)


def target_parameters(model: torch.nn.Module,
                      target_modules: str | Sequence[str] | None = None) -> list[torch.nn.Parameter]:
    """The weights a low-rank method projects: those of ``nn.Linear`` modules whose names match
    ``target_modules`` (a regex, or a list of names / substrings / regexes, as Hugging Face's
    ``optim_target_modules``); by default (None or ``"all-linear"``) every Linear layer except an
    output head (named ``lm_head``, ``head``, ``output``, ``classifier`` or ``score``, or tied to
    an ``nn.Embedding``). Embeddings are never targets."""
    if target_modules is not None and not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be a regex string or a list of strings, got {type(target_modules).__name__}")
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    default = target_modules is None or (isinstance(target_modules, str)
                                         and target_modules.replace("_", "-").lower() == "all-linear")
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
            continue
        if default:
            if not _is_head(name, module, embedding_weights):
                found.append(module.weight)
        elif _matches(target_modules, name):
            found.append(module.weight)
    return found


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], no_decay: str | Sequence[str] | None,
                  weight_decay: float | None) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and one with weight_decay 0: by default the 1-D and
    0-D tensors (biases, norm weights); ``no_decay`` names them instead (same matching rule as
    target_modules, on parameter names); ``[]`` decays everything."""
    if no_decay is None:
        exempt = [p for _, p in named if p.dim() <= 1]
    else:
        exempt = [p for n, p in named if _matches(no_decay, n)]
    exempt_ids = {id(p) for p in exempt}
    decayed = [p for _, p in named if id(p) not in exempt_ids]
    groups = []
    if decayed:
        groups.append({"params": decayed, **({} if weight_decay is None else {"weight_decay": weight_decay})})
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


@dataclass(frozen=True)
class FactoryEntry:
    """A create_optimizer name: its :class:`~memzoo.optim.registry.FactoryName` and the registry
    record it builds (None: torch's AdamW)."""

    factory_name: FactoryName
    info: OptimizerInfo | None

    @property
    def summary(self) -> str:
        return self.factory_name.summary

    @property
    def fixed(self) -> Mapping[str, Any]:
        return self.factory_name.fixed

    @property
    def zeroth_order(self) -> bool:
        return self.info is not None and self.info.zeroth_order

    @property
    def named(self) -> bool:
        return self.info is not None and self.info.named_params

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return torch.optim.AdamW if self.info is None else self.info.cls

    def build(self, groups: list[dict[str, Any]], *, layerwise: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
        """The class built with the name's fixed keywords; ``layerwise=True`` wraps one instance
        per parameter in :class:`LayerwiseOptimizer`."""
        cls = self.optimizer_class()
        if layerwise:
            from memzoo.optim.layerwise import LayerwiseOptimizer

            return LayerwiseOptimizer(groups, cls, **{**self.fixed, **kwargs})
        return cls(groups, **{**self.fixed, **kwargs})


# Derived from the registry's records (memzoo.optim.registry): add a name there, not here.
FACTORY_NAMES: dict[str, FactoryEntry] = {name.name: FactoryEntry(name, info) for name, info in factory_names()}


def list_optimizers() -> dict[str, str]:
    """Every name :func:`create_optimizer` takes, with a one-line description."""
    return {name: entry.summary for name, entry in FACTORY_NAMES.items()}


def factory_class_and_settings(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class that :func:`create_optimizer` builds for ``name`` and the keywords the name
    fixes (``galore_adamw_8bit`` → GaLoreAdamW, ``optim_bits=8``); ValueError for unknown names."""
    entry = FACTORY_NAMES.get(name.lower())
    if entry is None:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(FACTORY_NAMES)}")
    return entry.optimizer_class(), dict(entry.fixed)


def create_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float | None = None,
    *,
    target_modules: str | Sequence[str] | None = None,
    no_decay: str | Sequence[str] | None = None,
    train_unquantized: bool = False,
    layerwise: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (case-insensitive; see :func:`list_optimizers`) over ``model``'s
    trainable parameters.

    - Low-rank methods (GaLore, GaLore-Adafactor, Natural GaLore, APOLLO, APOLLO-Mini, Fira, FRUGAL,
      COSMOS) project the weights chosen by :func:`target_parameters` (``target_modules``, Hugging
      Face's ``optim_target_modules`` rule; default every Linear layer but the output head) with the
      paper's rank or density unless ``rank=`` / ``density=`` is given; every other parameter
      goes to a plain group (AdamW inside the same optimizer).
    - Biases and norm weights (1-D and 0-D tensors) get ``weight_decay=0``; ``no_decay`` names
      other parameters instead (parameter-name substrings or regexes; ``[]`` decays everything).
    - ``adam_mini`` gets the parameters with their names (its blocks follow them) and the model's
      hidden size and attention heads from a Hugging Face-style ``model.config``
      (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``) unless ``dim=``,
      ``n_heads=``, ``n_kv_heads=`` are given; a model with query / key weights and neither
      raises a ``ValueError`` asking for them.
    - ``qzo`` trains the float scales of the model's bitsandbytes 4-bit layers
      (:func:`memzoo.optim.collect_quantization_scales`), plus the other trainable parameters by
      plain zeroth-order steps with ``train_unquantized=True``.
    - ``layerwise=True`` returns a :class:`memzoo.optim.LayerwiseOptimizer` over the same groups:
      each parameter is stepped during ``backward()`` and its gradient freed (not for the
      zeroth-order methods, which take no gradients).
    - Every other keyword goes to the optimizer's constructor (``betas``, ``weight_decay``,
      ``backend``, ``update_proj_gap``, ...).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer takes an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or name.lower() not in FACTORY_NAMES:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(FACTORY_NAMES)}")
    key = name.lower()
    entry = FACTORY_NAMES[key]
    if not isinstance(layerwise, bool):
        raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
    if layerwise and entry.zeroth_order:
        raise ValueError(f"{key} takes no gradients: layer-wise updates do not apply; use it without layerwise=True")
    if layerwise:
        kwargs["layerwise"] = True
    if lr is not None:
        kwargs["lr"] = lr
    weight_decay = kwargs.pop("weight_decay", None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if key == "qzo":
        from memzoo.optim.zeroth_order import collect_quantization_scales

        groups: list[dict[str, Any]] = [{"params": collect_quantization_scales(model)}]
        if train_unquantized:
            groups += [{**g, "scales": False} for g in _decay_groups(named, no_decay, weight_decay)]
        return entry.build(groups, **kwargs)
    if entry.named:
        names = {id(p): n for n, p in named}
        groups = [{**g, "params": [(names[id(p)], p) for p in g["params"]]}
                  for g in _decay_groups(named, no_decay, weight_decay)]
        if not groups:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        kwargs = {**entry.optimizer_class().settings_from_model(model, kwargs), **kwargs}
        return entry.build(groups, **({} if weight_decay is None else {"weight_decay": weight_decay}), **kwargs)
    switch = None if entry.info is None else entry.info.target_key
    if switch is None:
        groups = _decay_groups(named, no_decay, weight_decay)
        if not groups:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        return entry.build(groups, **({} if weight_decay is None else {"weight_decay": weight_decay}), **kwargs)
    targets = target_parameters(model, target_modules)
    if not targets:
        raise ValueError(
            f"no target matrices for {key}: target_modules={target_modules!r} matched no trainable nn.Linear "
            "layer (names are those of model.named_modules())"
        )
    switch_value = kwargs.pop(switch, entry.info.default_rank)
    target_ids = {id(p) for p in targets}
    rest = [(n, p) for n, p in named if id(p) not in target_ids]
    groups = [{"params": targets, switch: switch_value,
               **({} if weight_decay is None else {"weight_decay": weight_decay})}]
    groups += [{**g, switch: None} for g in _decay_groups(rest, no_decay, weight_decay)]
    return entry.build(groups, **({} if weight_decay is None else {"weight_decay": weight_decay}), **kwargs)
