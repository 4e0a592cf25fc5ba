"""Whole steps held to the truth: each low-rank optimizer's step of every weight equals its
whole-step reference function (reference/<family>.py ``*_step``) applied to a copy of the weight
and of its state before the step.

The optimizers are driven only through their public classes and ``optimizer.state[p]``, so these
tests hold any rewrite of optim/ to the same steps. Every case runs 5 steps with
``update_proj_gap=2`` (projector refreshes on steps 1, 3 and 5), non-zero weight decay (another
value in the second group) and a learning rate lowered before every step (a schedule), in
fp32 and bf16, over a group holding an m ≥ n weight, a transposed (non-contiguous) m < n weight
and a vector (the dense branch inside a projected group), and a group without projection.

Comparisons:
- backend="reference": bitwise (torch.equal). The optimizer calls the same per-kernel reference
  functions on the same inputs (its batches by shape hold one matrix each here), so the step
  function reproduces every rounding; any difference is a different composition.
- backend="torch": within the storage dtype's rounding (tests/support.assert_close: about one
  unit in the last place, 1e-6 absolute near zero). Its kernels sum in another order
  (batched bmm, chunked passes), so the fp32 math differs in the last bits and the stored
  result by at most one rounding. Counters, seeds and indices are compared exactly.

Negative controls show that a step function wrong in a sign, in the order of decay and update
or in the refresh schedule fails these comparisons, and the step functions are held, without
any optimizer, to the methods they reduce to (GaLore with the identity projector: its Adam;
FRUGAL with every coordinate: its AdamW, itself torch.optim.AdamW's).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
from support import assert_close

from memzoo.optim import APOLLO, FRUGAL, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, NaturalGaLore
from memzoo.reference.apollo import apollo_step
from memzoo.reference.fira import fira_step
from memzoo.reference.frugal import frugal_dense_step, frugal_step
from memzoo.reference.galore import galore_adafactor_step, galore_dense_step, galore_step, natural_galore_step

STEPS = 5
GAP = 2
SEED = 5  # the optimizers' base seed: weight i's projector seed is SEED + i
HYPER = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.5)
DENSE = dict(weight_decay=0.1)  # the group without projection


def make_params(dtype: torch.dtype) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(projected group, unprojected group): a frozen 4×4 weight that never gets a gradient (it
    still counts in the weights' seed indices), a 6×4 weight (m ≥ n), a 3×7 one stored transposed
    (m < n, non-contiguous), a 2×3×2 one (read as 2×6), a vector; and a 4×3 weight in a group
    without projection."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=generator).to(dtype)  # noqa: E731
    projected = [randn(4, 4), randn(6, 4), randn(7, 3).t(), randn(2, 3, 2), randn(5)]
    return [torch.nn.Parameter(t) for t in projected], [torch.nn.Parameter(randn(4, 3))]


FROZEN = 0  # the index of the parameter without gradients


# Each method: (name, optimizer factory (projected, dense, backend, maximize), step function).
Make = Callable[[list, list, str, bool], torch.optim.Optimizer]


def galore(**settings) -> Make:
    return lambda projected, dense, backend, maximize: GaLoreAdamW(
        [{"params": projected, "rank": 2, "update_proj_gap": GAP, "scale": 0.25, **settings},
         {"params": dense, **DENSE}], **HYPER, seed=SEED, maximize=maximize, backend=backend)


def natural_galore(**settings) -> Make:
    return lambda projected, dense, backend, maximize: NaturalGaLore(
        [{"params": projected, "rank": 2, "update_proj_gap": GAP, "scale": 0.25, **settings},
         {"params": dense, **DENSE}], **HYPER, natural_history=3, seed=SEED, maximize=maximize, backend=backend)


def apollo(mini: bool = False, **settings) -> Make:
    def make(projected, dense, backend, maximize):
        if mini:  # APOLLO.mini's settings (rank 1, tensor-wise, scale 128) on the group carrying a rank
            return APOLLO.mini([{"params": projected, "rank": 1}, {"params": dense, **DENSE}], **HYPER,
                               update_proj_gap=GAP, seed=SEED, maximize=maximize, backend=backend)
        return APOLLO([{"params": projected, "rank": 2, "update_proj_gap": GAP, "scale": 4.0, **settings},
                       {"params": dense, **DENSE}], **HYPER, seed=SEED, maximize=maximize, backend=backend)
    return make


def frugal(**settings) -> Make:
    return lambda projected, dense, backend, maximize: FRUGAL(
        [{"params": projected, "density": 0.5, **settings}, {"params": dense, **DENSE}], **HYPER, update_proj_gap=GAP,
        inactive_lr_scale=0.5, seed=SEED, maximize=maximize, backend=backend)


def fira(**settings) -> Make:
    return lambda projected, dense, backend, maximize: FiraAdamW(
        [{"params": projected, "rank": 2, "update_proj_gap": GAP, "alpha": 0.25, **settings},
         {"params": dense, **DENSE}], **HYPER, seed=SEED, maximize=maximize, backend=backend)


def galore_adafactor(**settings) -> Make:
    # Adafactor has no betas; a given lr needs relative_step=False (a group may turn it back on).
    return lambda projected, dense, backend, maximize: GaLoreAdafactor(
        [{"params": projected, "rank": 2, "update_proj_gap": GAP, "scale": 0.25, **settings},
         {"params": dense, **DENSE}], lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], relative_step=False,
        seed=SEED, maximize=maximize, backend=backend)


METHODS = [
    *[(f"galore-{projector}-{proj_type}", galore(projector=projector, proj_type=proj_type), galore_step)
      for projector in ("svd", "randomized", "random") for proj_type in ("std", "left", "full")],
    ("galore-identity-std", galore(projector="identity"), galore_step),
    ("galore-svd-reverse_std-fp32_state-uncorrected",
     galore(projector="svd", proj_type="reverse_std", state_dtype=torch.float32, correct_bias=False), galore_step),
    ("natural_galore", natural_galore(), natural_galore_step),
    ("natural_galore-std", natural_galore(proj_type="std"), natural_galore_step),
    ("natural_galore-randomized", natural_galore(projector="randomized"), natural_galore_step),
    ("natural_galore-unpreconditioned", natural_galore(natural=False), natural_galore_step),
    *[(f"apollo-{scale_type}-{proj}-{'nl' if not disable_nl else 'no_nl'}",
       apollo(scale_type=scale_type, proj=proj, disable_nl=disable_nl), apollo_step)
      for scale_type in ("channel", "tensor") for proj in ("random", "svd") for disable_nl in (False, True)],
    ("apollo-scale_front", apollo(scale_front=True, proj="randomized"), apollo_step),
    ("apollo-reverse_std-growth_limit", apollo(proj_type="reverse_std", growth_limit=1.2), apollo_step),
    ("apollo_mini", apollo(mini=True), apollo_step),
    *[(f"frugal-{projector}-{'reset' if reset else 'keep'}-{rule}",
       frugal(projector=projector, reset_statistics=reset, inactive_update_rule=rule), frugal_step)
      for projector in ("svd", "coordinates", "random") for reset in (True, False) for rule in ("sign_sgd", "sgd")],
    ("frugal-randomized-no-official", frugal(projector="randomized", inactive_update_rule="no",
                                             inactive_threshold=0.0, proj_params_lr_scale=0.5), frugal_step),
    ("frugal-coordinates-reverse_std-uncorrected", frugal(projector="coordinates", proj_type="reverse_std",
                                                          correct_bias=False, state_dtype=torch.float32), frugal_step),
    ("fira", fira(), fira_step),
    ("fira-svd-reverse_std-growth_limit", fira(projector="svd", proj_type="reverse_std", growth_limit=1.2), fira_step),
    ("galore_adafactor", galore_adafactor(), galore_adafactor_step),
    ("galore_adafactor-svd-full-beta1-relative_step",
     galore_adafactor(projector="svd", proj_type="full", beta1=0.9, relative_step=True, clip_threshold=0.5),
     galore_adafactor_step),
]


def group_hyper(step: Callable, group: dict) -> dict:
    """The keyword arguments ``step`` takes from a param group: all of its keywords but ``seed``,
    each of which the group must carry (a renamed group key fails here, not silently)."""
    names = [name for name, p in inspect.signature(step).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"]
    missing = [name for name in names if name not in group]
    assert not missing, f"{step.__name__} takes {missing}, which the param group does not carry"
    assert group.get("optim_bits", 32) == 32, "the step functions keep 32-bit moments"
    return {name: group[name] for name in names}


def assert_same(actual: torch.Tensor, expected: torch.Tensor, exact: bool, what: str) -> None:
    """Equal (NaN where NaN), or within the dtype's rounding when not ``exact``."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.dtype, expected.dtype)
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: differs"
        return
    # support.assert_close lets a NaN pass against any value (NaN > bound is False): NaNs are checked here.
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN in different places"
    if exact:
        same = torch.allclose(actual, expected, rtol=0.0, atol=0.0, equal_nan=True)
        assert same, f"{what}: differs (max |Δ| {(actual.double() - expected.double()).nan_to_num().abs().max()})"
    else:
        assert_close(actual.nan_to_num(), expected.nan_to_num(), what=what)


def check_steps(make: Make, step: Callable, dtype: torch.dtype, backend: str, maximize: bool, *,
                keywords_of: Callable | None = None, poison: dict[tuple[int, int], float] | None = None) -> None:
    """Step the optimizer STEPS times; after each step every weight and its state must equal
    ``step`` applied to copies of them taken before the step (exactly on backend="reference").
    ``step`` takes the group keys that ``keywords_of`` (default: ``step``) names; ``poison``
    puts a value into the first element of the gradient of (step index, param index)."""
    projected, dense = make_params(dtype)
    params = projected + dense
    optimizer = make(projected, dense, backend, maximize)
    group_of = {param: group for group in optimizer.param_groups for param in group["params"]}
    generator = torch.Generator().manual_seed(1)
    for count in range(STEPS):
        for group in optimizer.param_groups:  # a schedule: the step reads the group's lr of the moment
            group["lr"] *= 0.8
        for index, param in enumerate(params):
            param.grad = None if index == FROZEN else torch.randn(param.shape, generator=generator).to(dtype)
            if (count, index) in (poison or {}):
                param.grad.view(-1)[0] = poison[count, index]
        before = [(param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()})
                  for param in params]
        optimizer.step()
        for index, (param, (weight, state)) in enumerate(zip(params, before)):
            where = f"step {count + 1}, param {index} {tuple(param.shape)}"
            if param.grad is None:  # untouched, no state
                assert torch.equal(param.detach(), weight) and not optimizer.state[param], where
                continue
            inputs = (weight.clone(), {k: v.clone() for k, v in state.items()})
            expected_weight, expected_state = step(weight, param.grad, state, seed=SEED + index,
                                                   **group_hyper(keywords_of or step, group_of[param]))
            for name, value in [("weight", weight), *state.items()]:  # a step function writes only copies
                assert_same(value, inputs[1].get(name, inputs[0]), True, f"{where}: the step function changed {name}")
            actual_state = optimizer.state[param]
            assert set(actual_state) == set(expected_state), (where, sorted(actual_state), sorted(expected_state))
            exact = backend == "reference"
            assert_same(param.detach(), expected_weight, exact, f"{where}: weight")
            for key, value in expected_state.items():
                assert_same(actual_state[key], value, exact, f"{where}: state {key!r}")


# (backend, maximize, dtype): both backends in both dtypes maximizing, and the reference minimizing
# (the sign handling is not dtype-dependent).
CASES = [("reference", True, torch.float32), ("reference", True, torch.bfloat16), ("reference", False, torch.float32),
         ("torch", True, torch.float32), ("torch", True, torch.bfloat16)]


@pytest.mark.parametrize("backend,maximize,dtype", CASES,
                         ids=[f"{b}-{'max' if m else 'min'}-{str(d).removeprefix('torch.')}" for b, m, d in CASES])
@pytest.mark.parametrize("name,make,step", METHODS, ids=[m[0] for m in METHODS])
def test_optimizer_steps_are_the_whole_step_reference(name, make, step, backend, maximize, dtype) -> None:
    check_steps(make, step, dtype, backend, maximize)


# APOLLO's scaling factors were float32 for every weight, so a float64 weight's update was only
# float32-accurate (|Δ| ≈ 5e-9 after one step); they are in the weight's compute dtype now.
@pytest.mark.parametrize("name,make,step", [pytest.param(*method, id=method[0]) for method in METHODS])
def test_float64_weights_step_in_float64(name, make, step) -> None:
    """The math of float64 weights is float64 throughout (bitwise the step function's)."""
    check_steps(make, step, torch.float64, "reference", maximize=True)


# Negative controls: the comparison above fails for a step function that is wrong in a sign, in
# the order of decay and update, or in the projector schedule (checked on backend="torch", the
# tolerant comparison, in fp32: a decay-order error of lr·λ·η_t·|update| ≈ 4e-4 is below bf16's
# resolution of weights of size 1).
def flipped_sign(step: Callable) -> Callable:
    return lambda *args, maximize, **kwargs: step(*args, maximize=not maximize, **kwargs)


def decay_reordered(step: Callable) -> Callable:
    """The decay on the other side of the update: W·(1 − lr·λ) before it for GaLore / APOLLO
    (theirs is after), after it for FRUGAL (theirs is before)."""
    def wrong(param, grad, state, *, lr, weight_decay, **kwargs):
        if step is frugal_step:
            new, new_state = step(param, grad, state, lr=lr, weight_decay=0.0, **kwargs)
            return new * (1.0 - lr * weight_decay), new_state
        return step(param * (1.0 - lr * weight_decay), grad, state, lr=lr, weight_decay=0.0, **kwargs)
    return wrong


def stale_projector(step: Callable) -> Callable:
    return lambda *args, update_proj_gap, **kwargs: step(*args, update_proj_gap=10**6, **kwargs)


CONTROLS = [method for method in METHODS if method[0] in (
    "galore-svd-std", "natural_galore", "apollo-channel-random-nl", "frugal-svd-reset-sign_sgd")]


@pytest.mark.parametrize("perturb", [flipped_sign, decay_reordered, stale_projector], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name,make,step", CONTROLS, ids=[m[0] for m in CONTROLS])
def test_a_wrong_step_function_fails_the_comparison(name, make, step, perturb) -> None:
    with pytest.raises(AssertionError, match=r"step \d, param \d \(.*\): (weight|state)"):
        check_steps(make, perturb(step), torch.float32, "torch", maximize=True, keywords_of=step)


@pytest.mark.filterwarnings("ignore:.*projector refresh.*NaN or Inf:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name,make,step", [m for m in METHODS if m[0] in (
    "galore-svd-full", "natural_galore", "apollo-channel-svd-nl", "frugal-svd-reset-sign_sgd")], ids=lambda v: v
    if isinstance(v, str) else "")
def test_a_nonfinite_gradient_at_a_refresh_is_the_reference_step(name, make, step, backend) -> None:
    """A NaN gradient on a weight's first refresh (a seeded Gaussian subspace instead) and an Inf
    one on a later refresh of another weight (its previous subspace kept): still the reference
    step, NaNs where it has them."""
    check_steps(make, step, torch.float32, backend, maximize=False, poison={(0, 3): math.nan, (2, 1): math.inf})


# The step functions against trusted methods they must reduce to (no optimizer involved).
def _run_pair(first: Callable, second: Callable, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Five steps of two step functions from the same weight and gradients: the weights equal
    bitwise after each step."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=generator, dtype=dtype)
    one, one_state, two, two_state = weight, {}, weight, {}
    for count in range(STEPS):
        grad = torch.randn(shape, generator=generator, dtype=dtype)
        one, one_state = first(one, grad, one_state)
        two, two_state = second(two, grad, two_state)
        assert torch.equal(one, two), f"step {count + 1}: max |Δ| {(one - two).abs().max()}"


ADAM = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, correct_bias=True, state_dtype=None,
            maximize=True)


@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_galore_step_with_the_identity_projector_is_its_adam(shape, dtype) -> None:
    """The identity projector and scale 1 make GaLore's step its inner (HF) Adam exactly, every
    step, across refreshes: projections by identity factors are exact."""
    galore = dict(rank=2, update_proj_gap=GAP, scale=1.0, proj_type="full", projector="identity", power_iters=2,
                  oversample=8, strict_rank=False)
    _run_pair(lambda w, g, s: galore_step(w, g, s, seed=0, **ADAM, **galore),
              lambda w, g, s: galore_dense_step(w, g, s, **ADAM), shape, dtype)


@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_frugal_step_covering_every_coordinate_is_its_adamw(shape, dtype) -> None:
    """Coordinates with density 1: the residual vanishes and FRUGAL's step is its torch-AdamW
    branch exactly (one subspace for the whole run: a refresh restarts FRUGAL's moments, which
    AdamW never does)."""
    frugal = dict(density=1.0, update_proj_gap=10**6, projector="coordinates", proj_type="std", power_iters=2,
                  oversample=8, reset_statistics=True, inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                  inactive_threshold=0.0, proj_params_lr_scale=1.0)
    _run_pair(lambda w, g, s: frugal_step(w, g, s, seed=0, **ADAM, **frugal),
              lambda w, g, s: frugal_dense_step(w, g, s, **ADAM), shape, dtype)


def test_frugal_dense_step_is_torch_adamw() -> None:
    """FRUGAL's dense branch against torch.optim.AdamW itself (float64, maximizing)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    theirs = torch.nn.Parameter(weight.clone())
    adamw = torch.optim.AdamW([theirs], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5, maximize=True)
    state = {}
    for _ in range(STEPS):
        grad = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        theirs.grad = grad.clone()
        adamw.step()
        weight, state = frugal_dense_step(weight, grad, state, **ADAM)
        torch.testing.assert_close(weight, theirs.detach(), rtol=1e-12, atol=1e-14)
