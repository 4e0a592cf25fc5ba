"""Conformance with torch.optim: the behaviours that torch's own generic optimizer tests
(``TestOptimRenewed`` in torch's test/test_optim.py) check, for every first-order memzoo
optimizer, plus torch.optim's conventions for every registered optimizer (copies, tensor lr).

Our CI cannot download torch's test file, and torch's shipped OptimizerInfo machinery
(``torch.testing._internal.common_optimizers``) imports torch's internal test utilities, which
need the ``expecttest`` package; so the same checks are written here, one function per torch
test (``COVERED``), over this file's table of configurations (``CONFORMANCE``, the analogue of
torch's ``optim_inputs_func``). ``INAPPLICABLE`` lists torch's generic tests that do not apply,
each with the reason; ``test_every_torch_generic_test_is_covered_or_listed`` keeps the lists
complete.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from memzoo.optim import (
    APOLLO,
    COSMOS,
    FRUGAL,
    OPTIMIZERS,
    AdamMini,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    Lion,
    NaturalGaLore,
)


@dataclass(frozen=True)
class Conformance:
    """A first-order optimizer as torch's generic tests see it: the class and the constructor
    keyword arguments of each configuration (torch's ``optim_inputs_func``), none of them
    torch's implementation flags (foreach, fused, differentiable)."""

    cls: type[torch.optim.Optimizer]
    configs: tuple[dict[str, Any], ...]
    fixed: dict[str, Any] = field(default_factory=dict)  # given with every config
    # The state's shapes follow the parameter names (Adam-mini's blocks): a state_dict saved
    # without names does not fit an optimizer given names, and load_state_dict refuses it.
    named_layout: bool = False

    def inputs(self) -> list[dict[str, Any]]:
        return [{**self.fixed, **config} for config in self.configs]


# Each projecting configuration projects the (10, 5) weights of torch's tests (a small rank, a
# short refresh gap so that refreshes happen within the tests' steps); the second one adds weight
# decay and maximize, as torch's inputs do.
CONFORMANCE: dict[str, Conformance] = {
    "lion": Conformance(Lion, ({"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.1, "maximize": True})),
    "galore_adamw": Conformance(GaLoreAdamW, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3},
                                              {"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True,
                                               "projector": "svd"})),
    "galore_adamw_8bit": Conformance(GaLoreAdamW, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3},),
                                     fixed={"optim_bits": 8, "min_8bit_size": 1}),
    "natural_galore": Conformance(NaturalGaLore, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3, "natural_history": 3},
                                                  {"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True})),
    "apollo": Conformance(APOLLO, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3},
                                   {"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True, "proj": "svd"})),
    "apollo_mini": Conformance(APOLLO, ({"lr": 1e-2, "update_proj_gap": 3},),
                               fixed={"rank": 1, "scale": 128.0, "scale_type": "tensor"}),
    "frugal": Conformance(FRUGAL, ({"lr": 1e-2, "density": 0.4, "update_proj_gap": 3, "weight_decay": 0.0},
                                   {"lr": 1e-2, "density": 0.4, "weight_decay": 0.1, "maximize": True,
                                    "projector": "coordinates"})),
    "cosmos": Conformance(COSMOS, ({"lr": 1e-2, "rank": 2}, {"lr": 1e-2, "rank": 2, "weight_decay": 0.1,
                                                              "maximize": True})),
    "fira": Conformance(FiraAdamW, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3},
                                    {"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True, "projector": "svd"})),
    # A given lr with relative_step=False (galore-torch's rule; its default lr=None is a relative step).
    "galore_adafactor": Conformance(GaLoreAdafactor, ({"lr": 1e-2, "rank": 2, "update_proj_gap": 3},
                                                      {"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True,
                                                       "projector": "svd"}),
                                    fixed={"lr": 1e-2, "relative_step": False}),
    "adam_mini": Conformance(AdamMini, ({"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.1, "maximize": True,
                                                       "betas": (0.9, 0.95)}), named_layout=True),
}
NAMES = list(CONFORMANCE)
# Steps of the direction tests (torch runs 20; 10 show the same on these small problems, in half the time).
STEPS = 10

# torch's generic tests (TestOptimRenewed, torch 2.6 – 2.13) → the test here that checks the same
# behaviour for every optimizer of CONFORMANCE.
COVERED: dict[str, str] = {
    "test_optim_infos_do_not_specify_global_cliquey_kwargs": "test_configs_do_not_specify_implementation_flags",
    "test_errors": "test_errors",
    "test_forloop_goes_right_direction": "test_goes_right_direction",
    "test_param_group_with_lrscheduler_goes_right_direction": "test_param_group_with_lrscheduler_goes_right_direction",
    "test_tensor_lr": "test_tensor_lr",
    "test_param_groups_weight_decay": "test_param_groups_weight_decay",
    "test_param_groups_lr": "test_param_groups_lr",
    "test_step_is_noop_when_params_have_no_grad": "test_step_is_noop_when_params_have_no_grad",
    "test_step_is_noop_for_zero_grads": "test_step_is_noop_for_zero_grads",
    "test_optimizer_can_be_printed": "test_optimizer_can_be_printed",
    "test_state_dict_deterministic": "test_state_dict_deterministic",
    "test_can_load_older_state_dict": "test_can_load_older_state_dict",
    "test_can_load_from_to_named_state_dict": "test_can_load_from_to_named_state_dict",
    "test_save_load_equality_with_weights_only": "test_save_load_equality_with_weights_only",
    "test_load_nontensor_step": "test_load_nontensor_step",
    "test_state_dict_pre_hook": "test_state_dict_hooks",
    "test_state_dict_post_hook": "test_state_dict_hooks",
    "test_state_dict_pre_post_hook": "test_state_dict_hooks",
    "test_load_state_dict_pre_hook_and_prepend": "test_load_state_dict_hooks",
    "test_load_state_dict_post_hook": "test_load_state_dict_hooks",
    "test_load_state_dict_pre_post_hook": "test_load_state_dict_hooks",
    "test_step_pre_hook": "test_step_hooks",
    "test_step_post_hook": "test_step_hooks",
    "test_step_all_hooks": "test_step_hooks",
    "test_deepcopy_copies_all_public_attrs": "test_deepcopy_copies_all_public_attrs",
    "test_non_empty_state": "test_non_empty_state",
}

_NO_FOREACH = ("memzoo has no foreach flag (foreach=None is the only value accepted): the implementation is "
               "chosen with backend=, and tests/test_optimizers.py holds backend='triton' to backend='torch' step by step")
_NO_FUSED = ("memzoo has no fused flag (fused=None is the only value accepted): fused kernels are backend='triton', "
             "tested against the reference in tests/test_optimizers.py and tests/test_kernels.py")
# torch's generic tests that do not apply to memzoo's first-order optimizers, with the reason.
INAPPLICABLE: dict[str, str] = {
    "test_rosenbrock_sparse": "sparse gradients are refused (ValueError before any update): every memzoo optimizer "
                              "keeps dense state; tests/test_hardening.py checks the refusal",
    "test_complex": "complex parameters are refused at construction (TypeError: optimize torch.view_as_real(param)); "
                    "the projections and sign updates are defined for real tensors",
    "test_complex_2d": "complex parameters are refused at construction, as for test_complex",
    "test_foreach_matches_forloop": _NO_FOREACH,
    "test_set_default_dtype_works_with_foreach": _NO_FOREACH,
    "test_foreach_large_tensor": _NO_FOREACH,
    "test_peak_memory_foreach": _NO_FOREACH,
    "test_defaults_changed_to_foreach": _NO_FOREACH,
    "test_mixed_device_dtype": _NO_FOREACH + "; it also needs two CUDA devices",
    "test_fused_matches_forloop": _NO_FUSED,
    "test_fused_error_on_params_on_meta": _NO_FUSED + "; meta parameters step (test_meta_parameters_step here)",
    "test_fused_large_tensor": _NO_FUSED,
    "test_fused_does_not_step_if_foundinf": _NO_FUSED,
    "test_fused_cpu_matches_cuda": _NO_FUSED,
    "test_cpu_load_state_dict": "it loads a state_dict into a fused or capturable optimizer on CUDA: memzoo has "
                                "neither flag (capturable=False is the only value accepted: a step decides on the host)",
    "test_second_order_optims_return_consistent_types": "it runs only for optimizers whose step requires a closure "
                                                        "(LBFGS); memzoo's first-order optimizers take an optional one",
    "test_forloop_goes_right_direction_multigpu": "needs two CUDA devices (CI has none); several devices in one "
                                                  "group go through group_by_device, tested on CPU tensors",
    "test_state_dict_with_cuda_params": "needs a CUDA device (CI has none); tests/test_gpu.py moves state between "
                                        "devices where one exists",
}

# Entries of torch's error inputs (get_error_inputs_for_all_optims) where memzoo deliberately differs.
ERROR_INPUT_DIFFERENCES: dict[str, str] = {
    "a param group cannot have duplicate parameters": (
        "torch warns (UserWarning) and steps the parameter twice; memzoo refuses it with a ValueError naming both "
        "positions, as it refuses any input that would silently damage training"),
}


def _model_params(contiguous: bool = True) -> tuple[Parameter, Parameter, torch.Tensor]:
    if contiguous:
        return Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    return Parameter(torch.randn(10, 5, 2)[..., 0]), Parameter(torch.randn(10, 2)[..., 0]), torch.randn(5)


def _loss(weight: torch.Tensor, bias: torch.Tensor, inpt: torch.Tensor) -> torch.Tensor:
    return (weight.mv(inpt) + bias).pow(2).sum()


def _fwd_bwd(optimizer: torch.optim.Optimizer, weight: torch.Tensor, bias: torch.Tensor,
             inpt: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = _loss(weight, bias, inpt)
    loss.backward()
    return loss


def _named(params: list[torch.Tensor], named: bool) -> list[Any]:
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))


def _without_param_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _assert_same(actual: Any, expected: Any) -> None:
    """Equal structure, equal values: tensors bit for bit (and dtype), the rest with ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
        assert torch.equal(actual, expected), (actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert actual == expected, (actual, expected)


def test_every_torch_generic_test_is_covered_or_listed() -> None:
    assert not set(COVERED) & set(INAPPLICABLE)
    assert len(set(COVERED) | set(INAPPLICABLE)) == 44  # TestOptimRenewed's generic tests
    for name in set(COVERED.values()):
        assert callable(globals().get(name)), name
    assert all(reason.strip() for reason in (*INAPPLICABLE.values(), *ERROR_INPUT_DIFFERENCES.values()))


@pytest.mark.parametrize("name", NAMES)
def test_configs_do_not_specify_implementation_flags(name: str) -> None:
    for kwargs in CONFORMANCE[name].inputs():
        assert not {"foreach", "fused", "differentiable", "capturable"} & set(kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_errors(name: str) -> None:
    """torch's get_error_inputs_for_all_optims, with memzoo's documented difference."""
    cls, kwargs = CONFORMANCE[name].cls, CONFORMANCE[name].inputs()[0]
    sample, sample2 = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable of Tensors"):
        cls(sample, **kwargs)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": sample}, {"params": sample}], **kwargs)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([sample], **{**kwargs, "lr": torch.tensor([0.001, 0.001])})
    with pytest.raises(ValueError, match="all optimizer params should be with/without names. Some param names are missing"):
        cls([("weight", sample), sample2], **kwargs)
    with pytest.raises(ValueError, match=re.escape("all optimizer param groups should be with/without names. "
                                                   "cannot add param group with names to the optimizer")):
        cls([{"params": [sample], "lr": 1e-2}, {"params": [("weight", sample2)]}], **kwargs)
    # ERROR_INPUT_DIFFERENCES: torch warns here.
    with pytest.raises(ValueError, match="each parameter may appear once"):
        cls([sample, sample], **kwargs)


@pytest.mark.parametrize("contiguous, with_lrsched", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("name", NAMES)
def test_goes_right_direction(name: str, contiguous: bool, with_lrsched: bool) -> None:
    schedulers = ([lambda o: StepLR(o, gamma=0.9, step_size=10)], [ReduceLROnPlateau]) if with_lrsched else ([],)
    for scheduler_constructors in schedulers:
        for kwargs in CONFORMANCE[name].inputs():
            weight, bias, inpt = _model_params(contiguous)
            optimizer = CONFORMANCE[name].cls([weight, bias], **kwargs)
            scheduler_list = [make(optimizer) for make in scheduler_constructors]
            initial = _fwd_bwd(optimizer, weight, bias, inpt).item()
            for _ in range(STEPS):
                loss = _fwd_bwd(optimizer, weight, bias, inpt)
                optimizer.step()
                for scheduler in scheduler_list:
                    scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            final = _loss(weight, bias, inpt).item()
            assert final > initial if kwargs.get("maximize") else final < initial, (kwargs, initial, final)


@pytest.mark.parametrize("name", NAMES)
def test_param_group_with_lrscheduler_goes_right_direction(name: str) -> None:
    cls = CONFORMANCE[name].cls
    for scheduler_constructors in ([lambda o: StepLR(o, gamma=0.9, step_size=10)], [ReduceLROnPlateau]):
        weight, bias, inpt = _model_params()
        optimizer = cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **CONFORMANCE[name].fixed)
        schedulers = [make(optimizer) for make in scheduler_constructors]
        initial = _loss(weight, bias, inpt).item()
        for _ in range(STEPS):
            loss = optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, inpt))
            for scheduler in schedulers:
                scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
        assert _loss(weight, bias, inpt).item() < initial


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name: str) -> None:
    """A Tensor lr gives the float lr's trajectory; a scheduler edits it in place, and the
    optimizer loads its own state_dict with it (it refused it before)."""
    for kwargs in CONFORMANCE[name].inputs():
        weight, bias, inpt = _model_params()
        weight_c, bias_c = (p.detach().clone().requires_grad_(True) for p in (weight, bias))
        # 2^-10: the same value as a float32 Tensor and as a float (torch.tensor(1e-3) is 1e-3 + 4.7e-11,
        # a different lr, which Natural GaLore's history amplifies past the tolerance within 5 steps).
        reference = CONFORMANCE[name].cls([weight, bias], **{**kwargs, "lr": 2**-10})
        optimizer = CONFORMANCE[name].cls([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(2**-10)})
        for _ in range(5):
            _fwd_bwd(reference, weight, bias, inpt)
            _fwd_bwd(optimizer, weight_c, bias_c, inpt)
            reference.step()
            optimizer.step()
            torch.testing.assert_close(weight_c, weight)
            torch.testing.assert_close(bias_c, bias)
        scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
        scheduler.step()
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
        optimizer.load_state_dict(optimizer.state_dict())
        _fwd_bwd(optimizer, weight_c, bias_c, inpt)
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_weight_decay(name: str) -> None:
    for kwargs in CONFORMANCE[name].inputs():
        weight, bias, inpt = _model_params()
        optimizer = CONFORMANCE[name].cls([dict(params=[weight], **kwargs),
                                           dict(params=[bias], **{**kwargs, "weight_decay": 0.0})])
        initial = _loss(weight, bias, inpt).item()
        for _ in range(STEPS):
            _fwd_bwd(optimizer, weight, bias, inpt)
            optimizer.step()
        final = _loss(weight, bias, inpt).item()
        assert final > initial if kwargs.get("maximize") else final < initial


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_lr(name: str) -> None:
    """A group's own lr is used; a parameter of a group whose lr is 1e-28 does not move."""
    for kwargs in CONFORMANCE[name].inputs():
        weight, bias, inpt = _model_params()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        optimizer = CONFORMANCE[name].cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])],
                                          **{**CONFORMANCE[name].fixed, "lr": 1e-28})
        initial = _loss(weight, bias, inpt).item()
        for _ in range(STEPS):
            _fwd_bwd(optimizer, weight, bias, inpt)
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        final = _loss(weight, bias, inpt).item()
        assert final > initial if kwargs.get("maximize") else final < initial
        assert torch.equal(irrelevant, irrelevant_clone)


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_when_params_have_no_grad(name: str) -> None:
    """No parameter has a gradient (step() before backward(), a frozen branch, an unused
    expert): nothing changes and nothing is raised (the low-rank optimizers raised 'Tensor list
    must have at least one tensor')."""
    for kwargs in CONFORMANCE[name].inputs():
        params = [torch.randn(6, 4) for _ in range(2)]
        before = [p.clone() for p in params]
        optimizer = CONFORMANCE[name].cls(params, **kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert not any(optimizer.state.values())
        # A group without gradients beside one with them (an unused expert): the latter steps.
        used, unused = Parameter(torch.randn(6, 4)), Parameter(torch.randn(6, 4))
        unused_before = unused.detach().clone()
        optimizer = CONFORMANCE[name].cls([{"params": [used]}, {"params": [unused]}], **kwargs)
        for _ in range(3):
            used.grad = torch.randn_like(used)
            optimizer.step()
        assert torch.equal(unused, unused_before) and not optimizer.state[unused]
        assert optimizer.state[used]


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_for_zero_grads(name: str) -> None:
    for kwargs in CONFORMANCE[name].inputs():
        if kwargs.get("weight_decay", 0) != 0:  # decay moves parameters whatever the gradient
            continue
        param = torch.randn(5, 1, requires_grad=True)
        old = param.detach().clone()
        optimizer = CONFORMANCE[name].cls([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert torch.equal(param, old)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_can_be_printed(name: str) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for kwargs in CONFORMANCE[name].inputs():
        assert type(CONFORMANCE[name].cls(params, **kwargs)).__name__ in repr(CONFORMANCE[name].cls(params, **kwargs))


# Named → unnamed, unnamed → named and unnamed → unnamed (named → named adds nothing to those).
NAMED_PAIRS = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("named0, named1", NAMED_PAIRS)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_deterministic(name: str, named0: bool, named1: bool) -> None:
    cls = CONFORMANCE[name].cls
    for kwargs in CONFORMANCE[name].inputs():
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        inpt = torch.randn(3)
        optimizer = cls(_named([weight, bias], named0), **kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, weight, bias, inpt)
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = cls(_named([weight_c, bias_c], named1), **kwargs)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(3):
            _fwd_bwd(optimizer, weight, bias, inpt)
            _fwd_bwd(optimizer_c, weight_c, bias_c, inpt)
            optimizer.step()
            optimizer_c.step()
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        _assert_same(_without_param_names(optimizer_c.state_dict()), _without_param_names(optimizer.state_dict()))
        if named0 or named1:
            assert optimizer_c.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        _assert_same(_without_param_names(optimizer_c.state_dict())["param_groups"][-1],
                     _without_param_names(optimizer.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("name", NAMES)
def test_can_load_older_state_dict(name: str) -> None:
    """torch deletes the flags added after the optimizer's first release (its
    ``not_og_supported_flags``) and loads. memzoo's equivalent is the state format: a checkpoint
    of an older format without a group key added since (here maximize, and torch's flags, which
    memzoo never stores) loads with the key's default and steps; the current format (3) requires
    every key, as a missing one means a damaged checkpoint (tests/test_hardening.py)."""
    for kwargs in CONFORMANCE[name].inputs():
        model = _conv_model()
        inpt = torch.rand(1, 4, 16, 16)
        optimizer = CONFORMANCE[name].cls(model.parameters(), **kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            model(inpt).sum().backward()
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        assert not {"foreach", "differentiable", "capturable", "fused"} & set(old["param_groups"][0])
        old["memzoo"]["format"] = 2
        for group in old["param_groups"]:
            del group["maximize"]
        optimizer.load_state_dict(old)
        assert optimizer.param_groups[0]["maximize"] is optimizer.defaults["maximize"]
        optimizer.zero_grad()
        model(inpt).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("named0, named1", NAMED_PAIRS)
@pytest.mark.parametrize("name", NAMES)
def test_can_load_from_to_named_state_dict(name: str, named0: bool, named1: bool) -> None:
    """model.named_parameters() is accepted (torch ≥ 2.6) and its names kept in the state_dict."""
    for kwargs in CONFORMANCE[name].inputs():
        model = _conv_model()
        inpt = torch.rand(1, 4, 16, 16)
        optimizer = CONFORMANCE[name].cls(model.named_parameters() if named0 else model.parameters(), **kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            model(inpt).sum().backward()
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        optimizer2 = CONFORMANCE[name].cls(model.named_parameters() if named1 else model.parameters(), **kwargs)
        if CONFORMANCE[name].named_layout and named1 and not named0:
            with pytest.raises(ValueError, match=r"state 'exp_avg_sq' for param group 0, param 1 .* is \(1,\)"):
                optimizer2.load_state_dict(state_dict)
            continue
        optimizer2.load_state_dict(state_dict)
        optimizer2.zero_grad()
        model(inpt).sum().backward()
        optimizer2.step()
        if named0 or named1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight", "0.bias", "1.weight", "1.bias"]
        else:
            assert "param_names" not in optimizer2.state_dict()["param_groups"][0]


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_save_load_equality_with_weights_only(name: str, named: bool) -> None:
    for kwargs in CONFORMANCE[name].inputs():
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        inpt = torch.randn(3)
        optimizer = CONFORMANCE[name].cls(_named([weight, bias], named), **kwargs)
        for _ in range(3):
            optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, inpt))
        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            _assert_same(torch.load(buffer, weights_only=weights_only), state_dict)


@pytest.mark.parametrize("name", NAMES)
def test_load_nontensor_step(name: str) -> None:
    """A state_dict whose step counts are Python numbers (older checkpoints) loads and steps
    as the one with tensors does."""
    for kwargs in CONFORMANCE[name].inputs():
        params = [Parameter(torch.randn(6, 4)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer = CONFORMANCE[name].cls(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for state in state_dict["state"].values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].item()
        copies = [p.detach().clone() for p in params]
        twin = CONFORMANCE[name].cls([Parameter(c) for c in copies], **kwargs)
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        optimizer.load_state_dict(state_dict)
        for group, twin_group in zip(optimizer.param_groups, twin.param_groups):
            for p, q in zip(group["params"], twin_group["params"]):
                q.grad = p.grad.clone()
        optimizer.step()
        twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin.param_groups[0]["params"]))
        assert all(isinstance(s["step"], torch.Tensor) for s in optimizer.state.values() if "step" in s)


def _state_dict_pre_hook(optimizer: torch.optim.Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks(name: str) -> None:
    kwargs = CONFORMANCE[name].inputs()[0]
    for pre, post in ((True, False), (False, True), (True, True)):
        optimizer = CONFORMANCE[name].cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
        if pre:
            optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
        if post:
            optimizer.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optimizer.state_dict()
        if pre and not post:
            assert state_dict["state"]["test"] == 1
        if post:
            assert state_dict["ran_state_dict_pre_hook"] is pre and "test" not in state_dict["state"]


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_hooks(name: str) -> None:
    kwargs = CONFORMANCE[name].inputs()[0]

    def set_lr(value: float, returned: bool) -> Callable:
        def hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
            if returned:
                state_dict = copy.deepcopy(state_dict)
            state_dict["param_groups"][0]["lr"] = value
            return state_dict if returned else None
        return hook

    def post_hook(optimizer: torch.optim.Optimizer) -> None:
        optimizer.state["ran_load_state_dict_post_hook"] = optimizer.param_groups[0]["lr"]

    optimizer = CONFORMANCE[name].cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
    state_dict = optimizer.state_dict()
    optimizer.register_load_state_dict_pre_hook(set_lr(0.002, returned=False))
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002
    optimizer.register_load_state_dict_pre_hook(set_lr(0.003, returned=True), prepend=True)
    optimizer.register_load_state_dict_post_hook(post_hook)
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["lr"] == 0.002  # the prepended hook ran first
    assert optimizer.state["ran_load_state_dict_post_hook"] == 0.002


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks(name: str) -> None:
    """Pre/post, local/global step hooks fire in torch's order, also when no parameter has a
    gradient (the low-rank optimizers raised there)."""
    params = [torch.tensor([1.0, 1.0])]
    data: list[int] = []
    for kwargs in CONFORMANCE[name].inputs():
        optimizer, plain = CONFORMANCE[name].cls(params, **kwargs), SGD(params)
        data.clear()
        handles = [register_optimizer_step_pre_hook(lambda *_: data.append(0)),
                   register_optimizer_step_post_hook(lambda *_: data.append(5))]
        try:
            for opt in (optimizer, plain):
                handles += [opt.register_step_pre_hook(lambda *_: data.append(1)),
                            opt.register_step_post_hook(lambda *_: data.append(2))]
            optimizer.step()
            plain.step()
            optimizer.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        assert data == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_copies_all_public_attrs(name: str) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for kwargs in CONFORMANCE[name].inputs():
        optimizer = CONFORMANCE[name].cls(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        public = {k for k in vars(optimizer) if not k.startswith("_")}
        assert public == {k for k in vars(copy.deepcopy(optimizer)) if not k.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_non_empty_state(name: str) -> None:
    model = torch.nn.Linear(5, 5)
    for kwargs in CONFORMANCE[name].inputs():
        optimizer = CONFORMANCE[name].cls(model.parameters(), **kwargs)
        optimizer.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        assert optimizer.state and all(len(state) > 0 for state in optimizer.state.values())


# -- torch.optim conventions beyond TestOptimRenewed ----------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_meta_parameters_step(name: str) -> None:
    """On the meta device (deferred initialization, shape-only memory estimates) a step creates
    the state's shapes, as torch.optim's optimizers do; GaLore, FRUGAL and COSMOS read values
    there and failed."""
    for kwargs in CONFORMANCE[name].inputs():
        with torch.device("meta"):
            model = torch.nn.Linear(5, 10)
        optimizer = CONFORMANCE[name].cls(model.parameters(), **kwargs)
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        optimizer.step()
        optimizer.step()
        live = CONFORMANCE[name].cls(torch.nn.Linear(5, 10).parameters(), **kwargs)
        for p in live.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        live.step()
        for p, q in zip(model.parameters(), live.param_groups[0]["params"]):
            meta_state, live_state = optimizer.state[p], live.state[q]
            assert set(meta_state) == set(live_state)
            assert all(meta_state[k].shape == live_state[k].shape for k in live_state)


@pytest.mark.parametrize("flag, value", [("foreach", True), ("foreach", False), ("fused", True),
                                         ("fused", False), ("capturable", True), ("differentiable", True)])
@pytest.mark.parametrize("name", NAMES)
def test_implementation_flags(name: str, flag: str, value: bool) -> None:
    """torch's implementation flags are accepted at their defaults and refused otherwise with
    the reason; they are not hyperparameters (not in the groups or the state_dict)."""
    cls, kwargs = CONFORMANCE[name].cls, CONFORMANCE[name].inputs()[0]
    weight = Parameter(torch.randn(6, 4))
    optimizer = cls([weight], **kwargs, foreach=None, fused=None, capturable=False, differentiable=False)
    assert not {"foreach", "fused", "capturable", "differentiable"} & set(optimizer.param_groups[0])
    with pytest.raises(ValueError, match=f"{flag}={value} is not supported: .*(backend=|leave {flag}=)"):
        cls([weight], **kwargs, **{flag: value})


def _registered_step(info: Any, optimizer: torch.optim.Optimizer, params: list[Parameter]) -> None:
    if info.zeroth_order:
        optimizer.step(lambda: sum((p.float() ** 2).sum() for p in params))
        return
    for p in params:
        p.grad = p.detach().clone()
    optimizer.step()


def _registered(name: str, lr: Any = None) -> tuple[Any, torch.optim.Optimizer, list[Parameter]]:
    info = OPTIMIZERS[name]
    params = [Parameter(torch.randn(6, 4)), Parameter(torch.randn(6))]
    kwargs = {**info.sample_kwargs, **({} if lr is None else {"lr": lr})}
    return info, info.cls(params, **kwargs), params


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_copy_then_step(name: str, how: str) -> None:
    """copy.deepcopy / pickle of a stepped optimizer keeps its settings (the copies lacked
    skip_nonfinite, backend, …: AttributeError at step) and continues exactly as the original."""
    info, optimizer, params = _registered(name)
    _registered_step(info, optimizer, params)
    if how == "deepcopy":
        twin_optimizer = copy.deepcopy(optimizer)
    else:
        twin_optimizer = pickle.loads(pickle.dumps(optimizer))
    twin_params = [p for group in twin_optimizer.param_groups for p in group["params"]]
    assert twin_params[0] is not params[0] and torch.equal(twin_params[0], params[0])
    public = {k: v for k, v in vars(optimizer).items() if not k.startswith("_") and not isinstance(v, (dict, list))}
    twin_public = {k: v for k, v in vars(twin_optimizer).items() if k in public}
    assert twin_public.keys() == public.keys()
    assert all(not isinstance(v, (bool, int, float, str)) or twin_public[k] == v for k, v in public.items())
    for _ in range(2):
        _registered_step(info, optimizer, params)
        _registered_step(info, twin_optimizer, twin_params)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    assert "differentiable" not in twin_optimizer.defaults


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr_every_registered_optimizer(name: str) -> None:
    """Every registered optimizer takes a one-element Tensor lr (converted to a float at the
    step's boundary, so the Triton kernels get a scalar) and follows the float lr's trajectory."""
    info, optimizer, params = _registered(name)
    lr = info.sample_kwargs["lr"]
    torch.manual_seed(0)
    _, tensor_optimizer, tensor_params = _registered(name, lr=torch.tensor(lr, dtype=torch.float64))
    with torch.no_grad():
        for p, q in zip(params, tensor_params):
            q.copy_(p)
    for _ in range(2):
        _registered_step(info, optimizer, params)
        _registered_step(info, tensor_optimizer, tensor_params)
    for p, q in zip(params, tensor_params):
        torch.testing.assert_close(q, p)
    tensor_optimizer.load_state_dict(tensor_optimizer.state_dict())
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        info.cls(params, **{**info.sample_kwargs, "lr": torch.zeros(2)})
    with pytest.raises(ValueError, match="lr as a Tensor that requires grad is not supported"):
        info.cls(params, **{**info.sample_kwargs, "lr": torch.tensor(lr, requires_grad=True)})


@pytest.mark.parametrize("name", ["lion", "galore_adamw"])
def test_tensor_lr_reaches_triton_kernels_as_a_float(name: str) -> None:
    """backend='triton' (interpreted on CPU tensors in CI): the kernels take scalars, and a
    Tensor lr is converted at the step's boundary, giving the float lr's parameters."""
    info = OPTIMIZERS[name]
    params = [Parameter(torch.randn(6, 4)), Parameter(torch.randn(6))]
    twins = [Parameter(p.detach().clone()) for p in params]
    kwargs = {**info.sample_kwargs, "backend": "triton"}
    optimizer = info.cls(params, **kwargs)
    tensor_optimizer = info.cls(twins, **{**kwargs, "lr": torch.tensor(info.sample_kwargs["lr"])})
    for _ in range(2):
        _registered_step(info, optimizer, params)
        _registered_step(info, tensor_optimizer, twins)
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p)
