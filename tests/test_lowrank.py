"""The low-rank engine's contract: a method is a rule composed into LowRankOptimizer.

- every rule's kernel functions exist, with the reference's signature, in each backend module
  of its family (no hidden re-export requirement discovered at run time);
- no low-rank optimizer inherits from another method;
- a rule's state is declared once: the engine creates exactly the declared state, counts it in
  ``state_bytes`` and refuses a checkpoint that lacks a declared entry;
- a new rule written in a few lines (here: a projected Adam whose updates are clipped, with a
  counter of its own) trains, resumes bit-identically and is batched by shape with no change to
  the engine.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from memzoo.optim import registry
from memzoo.optim.base import StateSpec
from memzoo.optim.lowrank import LowRankOptimizer, LowRankRule, WeightStep, adam_step_size, low_rank_updates
from memzoo.optim.projector import Projector
from memzoo.triton_kernels import has_family

LOW_RANK = sorted({info.cls for info in registry.OPTIMIZERS.values() if issubclass(info.cls, LowRankOptimizer)},
                  key=lambda cls: cls.__name__)


def test_the_low_rank_methods_are_rules_of_the_engine() -> None:
    assert {cls.__name__ for cls in LOW_RANK} >= {"GaLoreAdamW", "NaturalGaLore", "APOLLO", "FRUGAL"}
    for cls in LOW_RANK:
        # Composed, not inherited: between the class and the engine there is no other method.
        assert cls.__mro__[1] is LowRankOptimizer, cls.__mro__
        assert isinstance(cls.rule, LowRankRule)
        assert cls.family == cls.rule.family


def _backend_modules(family: str) -> list[Any]:
    modules = [importlib.import_module(f"memzoo.reference.{family}"),
               importlib.import_module(f"memzoo.triton_kernels.torch_backend.{family}")]
    if has_family(family):
        modules.append(importlib.import_module(f"memzoo.triton_kernels.{family}"))
    return modules


@pytest.mark.parametrize("cls", LOW_RANK, ids=lambda cls: cls.__name__)
def test_every_backend_of_a_rule_family_provides_its_kernels_with_the_reference_signature(cls) -> None:
    rule = cls.rule
    reference, *others = _backend_modules(rule.family)
    for name in rule.kernels:
        assert hasattr(reference, name), f"memzoo.reference.{rule.family} lacks {name}"
        expected = list(inspect.signature(getattr(reference, name)).parameters)
        for module in others:
            assert hasattr(module, name), f"{module.__name__} lacks {name}, which {type(rule).__name__} calls"
            assert list(inspect.signature(getattr(module, name)).parameters) == expected, (module.__name__, name)


@pytest.mark.parametrize("name", sorted(name for name, info in registry.OPTIMIZERS.items()
                                        if issubclass(info.cls, LowRankOptimizer)))
def test_state_is_exactly_the_declaration(name: str) -> None:
    info = registry.OPTIMIZERS[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3, 7)),
              torch.nn.Parameter(torch.randn(5))]
    optimizer = info.cls(params, **info.sample_kwargs)
    for _ in range(3):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            spec = optimizer._state_spec(param, group)
            assert set(state) == set(spec), (set(state) ^ set(spec))
            for key, (shape, dtype) in spec.items():
                assert (state[key].shape, state[key].dtype) == (shape, dtype), key


class ClippedRule(LowRankRule):
    """A rule written for this test: GaLore whose low-rank update is clipped to [-c, c], with a
    counter of clipped steps — a new method in the engine by its rule alone."""

    family = "galore"
    defaults = dict(clip=0.5)

    def validate(self, group: Mapping[str, Any]) -> None:
        if not isinstance(group["clip"], float) or not group["clip"] > 0:
            raise ValueError(f"Invalid clip: {group['clip']!r}")

    def state(self, shape: torch.Size, projector: Projector | None, group: Mapping[str, Any],
              state_dtype: torch.dtype) -> StateSpec:
        return {} if projector is None else {"clipped": (torch.Size(()), torch.int64)}

    def update(self, engine: LowRankOptimizer, group: Mapping[str, Any], items: list[WeightStep]) -> None:
        kernels = engine.kernels(items[0].param.device)
        updates = low_rank_updates(items)
        factors = [engine.factors(item) for item in items]
        beta1, beta2 = group["betas"]
        kernels.galore_adam_project_([item.param.grad for item in items], [item.state["exp_avg"] for item in items],
                                     [item.state["exp_avg_sq"] for item in items], updates,
                                     lefts=[f[0] for f in factors], rights=[f[1] for f in factors], beta1=beta1,
                                     beta2=beta2, eps=group["eps"])
        for item, update in zip(items, updates):
            item.state["clipped"] += int(update.abs().max() > group["clip"])
            update.clamp_(-group["clip"], group["clip"])
        kernels.galore_apply_([item.param for item in items], updates, lefts=[f[0] for f in factors],
                              rights=[f[1] for f in factors],
                              step_size=adam_step_size(group["lr"], group["betas"], items[0].step),
                              scale=group["scale"], lr=group["lr"], weight_decay=group["weight_decay"])


class ClippedGaLore(LowRankOptimizer):
    rule = ClippedRule()

    def __init__(self, params: Any, lr: float = 1e-2, *, clip: float = 0.5, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, clip=clip), **options)


def _train(optimizer: LowRankOptimizer, params: list[torch.nn.Parameter], steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def test_a_new_rule_trains_resumes_and_declares_its_state_once() -> None:
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4))]
    optimizer = ClippedGaLore(params, rank=2, update_proj_gap=2, clip=0.05, projector="svd")
    start = [p.detach().clone() for p in params]
    _train(optimizer, params, 3, seed=0)
    # Same-shaped weights are updated together: every projected weight has the counter, the
    # vector (dense AdamW branch) has none.
    for param, before in zip(params[:3], start):
        assert int(optimizer.state[param]["clipped"]) == 3  # Adam's first steps are ±1 ≫ 0.05: clipped
        assert not torch.equal(param, before)
    assert "clipped" not in optimizer.state[params[3]]
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ClippedGaLore(resumed_params, rank=2, update_proj_gap=2, clip=0.05, projector="svd")
    resumed.load_state_dict(saved)
    _train(optimizer, params, 3, seed=1)
    _train(resumed, resumed_params, 3, seed=1)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert optimizer.state_bytes() == resumed.state_bytes()
    # A checkpoint without the declared counter is refused before anything is touched.
    broken = copy.deepcopy(optimizer.state_dict())
    del broken["state"][0]["clipped"]
    fresh = ClippedGaLore([torch.nn.Parameter(p.detach().clone()) for p in params], rank=2, update_proj_gap=2,
                          clip=0.05, projector="svd")
    with pytest.raises(ValueError, match="clipped"):
        fresh.load_state_dict(broken)
    assert not fresh.state


def test_a_new_rule_validates_its_group_keys_and_refuses_unknown_ones() -> None:
    param = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="Invalid clip"):
        ClippedGaLore([param], rank=2, clip=-1.0)
    with pytest.raises(ValueError, match="unknown key 'clp'.*did you mean 'clip'"):
        ClippedGaLore([{"params": [param], "clp": 0.1}], rank=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'cilp'"):
        ClippedGaLore([param], rank=2, cilp=0.1)


def test_state_bytes_of_a_new_rule_is_its_declaration() -> None:
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = ClippedGaLore(params, rank=2, projector="svd")
    _train(optimizer, params, 1, seed=0)
    expected = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            expected += sum(shape.numel() * dtype.itemsize for shape, dtype in
                            optimizer._state_spec(param, group).values())
    assert optimizer.state_bytes() == expected
    # 8×4 projected at rank 2 (right side): m, v 8×2 fp32, factor 2×4, step + seed + counter.
    assert expected == 2 * 8 * 2 * 4 + 2 * 4 * 4 + 3 * 8 + (2 * 4 * 4 + 8)


def test_every_triton_family_module_states_its_flags() -> None:
    import pkgutil

    import memzoo.triton_kernels as package
    from memzoo.triton_kernels import TritonFamily, load_family

    families = [info.name for info in pkgutil.iter_modules(package.__path__)
                if not info.ispkg and info.name not in ("multi_tensor", "registry")]
    assert {"galore", "apollo", "frugal", "lion", "cosmos", "zeroth_order", "random"} <= set(families)
    for family in families:
        module = load_family(family)
        assert isinstance(module, TritonFamily)
        assert isinstance(module.AUTO, bool) and isinstance(module.INTERPRETED, bool), family
