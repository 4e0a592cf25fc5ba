"""``create_optimizer(model, name, ...)``: every memzoo optimizer from a model in one call, with
the param groups real training code needs (target matrices for the low-rank methods, no weight
decay for biases and norms)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FACTORY_NAMES", "create_optimizer", "factory_class_and_settings", "list_optimizers", "target_parameters"]

# The module names an output head usually has; excluded from the default targets (as PEFT's and
# Hugging Face's "all-linear" exclude the output layer).
_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")


@dataclass(frozen=True)
class _Entry:
    summary: str
    build: _Builder
    # The group key that switches a group's projection on (None: not a low-rank method).
    switch: str | None = None
    # Its value for the target matrices when the caller gives none (the paper's setting).
    switch_default: Any = None
    zeroth_order: bool = False
    # Reads parameter names (Adam-mini's partition): its groups carry (name, tensor) pairs, and the
    # class's settings_from_model(model) fills keywords the caller left out (hidden size, heads).
    named: bool = False


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
class _Builder:
    """Builds the class at ``cls_path`` (imported when called) with ``fixed`` keywords;
    ``layerwise=True`` wraps one instance per parameter in :class:`LayerwiseOptimizer`."""

    cls_path: str
    fixed: Mapping[str, Any]

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        module_name, _, attr = self.cls_path.rpartition(".")
        return getattr(importlib.import_module(module_name), attr)

    def __call__(self, groups: list[dict[str, Any]], *, layerwise: bool = False,
                 **kwargs: Any) -> torch.optim.Optimizer:
        cls = self.optimizer_class()
        if layerwise:
            from memzoo.optim.layerwise import LayerwiseOptimizer

            return LayerwiseOptimizer(groups, cls, **{**self.fixed, **kwargs})
        return cls(groups, **{**self.fixed, **kwargs})


def _build(cls_path: str, **fixed: Any) -> _Builder:
    return _Builder(cls_path, fixed)


FACTORY_NAMES: dict[str, _Entry] = {
    "adamw": _Entry("torch.optim.AdamW (passthrough, with the same param groups)", _build("torch.optim.AdamW")),
    "lion": _Entry("Lion (Chen et al. 2023): sign of interpolated momentum, 1 state element per parameter",
                   _build("memzoo.optim.Lion")),
    "galore_adamw": _Entry("GaLore (Zhao et al. 2024): AdamW in a refreshed rank-r gradient subspace",
                           _build("memzoo.optim.GaLoreAdamW"), "rank", 128),
    "galore_adamw_8bit": _Entry("GaLore with 8-bit (bitsandbytes blockwise) moments",
                                _build("memzoo.optim.GaLoreAdamW", optim_bits=8), "rank", 128),
    "natural_galore": _Entry("Natural GaLore (Das 2024): GaLore with a Woodbury natural-gradient preconditioner",
                             _build("memzoo.optim.NaturalGaLore"), "rank", 128),
    "apollo": _Entry("APOLLO (Zhu et al. 2025): channel-wise AdamW scaling estimated in a random rank-r space",
                     _build("memzoo.optim.APOLLO"), "rank", 256),
    "apollo_mini": _Entry("APOLLO-Mini: rank 1, one tensor-wise scaling factor (SGD-like memory)",
                          _build("memzoo.optim.APOLLO", scale=128.0, scale_type="tensor"), "rank", 1),
    "fira": _Entry("Fira (Chen et al. 2024): GaLore plus the residual gradient, scaled per channel and norm-limited",
                   _build("memzoo.optim.FiraAdamW"), "rank", 128),
    "galore_adafactor": _Entry("GaLore with Adafactor (galore-torch's GaLoreAdafactor): factored second moment in "
                               "the subspace", _build("memzoo.optim.GaLoreAdafactor"), "rank", 128),
    "frugal": _Entry("FRUGAL (Zmushko et al. 2024): Adam in a subspace, signSGD on the rest",
                     _build("memzoo.optim.FRUGAL"), "density", 0.25),
    "cosmos": _Entry("COSMOS (Liu et al. 2025): SOAP in the leading eigensubspace, Muon on the complement",
                     _build("memzoo.optim.COSMOS"), "rank", 64),
    "adam_mini": _Entry("Adam-mini (Zhang et al. 2024): Adam with one second moment per block (head, neuron, tensor)",
                        _build("memzoo.optim.AdamMini"), named=True),
    "mezo": _Entry("MeZO (Malladi et al. 2023): zeroth-order SGD from two forward passes, inference memory",
                   _build("memzoo.optim.MeZO"), zeroth_order=True),
    "sparse_mezo": _Entry("Sparse-MeZO (Liu et al. 2024): MeZO on the small-magnitude weights of each layer",
                          _build("memzoo.optim.SparseMeZO"), zeroth_order=True),
    "qzo": _Entry("QZO (Shang et al. 2025): zeroth-order fine-tuning of a 4-bit model through its scales",
                  _build("memzoo.optim.QZO"), zeroth_order=True),
}


def list_optimizers() -> dict[str, str]:
    """Every name :func:`create_optimizer` takes, with a one-line description."""
    return {name: entry.summary for name, entry in FACTORY_NAMES.items()}


def factory_class_and_settings(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class that :func:`create_optimizer` builds for ``name`` and the keywords the name
    fixes (``galore_adamw_8bit`` → GaLoreAdamW, ``optim_bits=8``); ValueError for unknown names."""
    entry = FACTORY_NAMES.get(name.lower())
    if entry is None:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(FACTORY_NAMES)}")
    return entry.build.optimizer_class(), dict(entry.build.fixed)


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
        kwargs = {**entry.build.optimizer_class().settings_from_model(model, kwargs), **kwargs}
        return entry.build(groups, **({} if weight_decay is None else {"weight_decay": weight_decay}), **kwargs)
    if entry.switch is None:
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
    switch_value = kwargs.pop(entry.switch, entry.switch_default)
    target_ids = {id(p) for p in targets}
    rest = [(n, p) for n, p in named if id(p) not in target_ids]
    groups = [{"params": targets, entry.switch: switch_value,
               **({} if weight_decay is None else {"weight_decay": weight_decay})}]
    groups += [{**g, entry.switch: None} for g in _decay_groups(rest, no_decay, weight_decay)]
    return entry.build(groups, **({} if weight_decay is None else {"weight_decay": weight_decay}), **kwargs)
