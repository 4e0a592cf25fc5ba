"""Issue 18 ("no silent damage"): values that used to corrupt an optimizer without a trace —
sign(±Inf) as a finite step, overflowing Gram matrices, ill-conditioned natural-gradient
solves, non-finite or out-of-range hyperparameters, signSGD on rounding noise."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from memzoo.optim import COSMOS, FRUGAL, QZO, GaLoreAdamW, Lion, MeZO, NaturalGaLore
from memzoo.optim.registry import OPTIMIZERS
from memzoo.reference.cosmos import cosmos_basis_init, cosmos_basis_update, newton_schulz5
from memzoo.reference.galore import natural_gradient

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: LAPACK calls on a few-element matrix cost ~15 ms each with a
    thread pool on a busy machine and well under 1 ms on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- sign-based updates: a non-finite input writes NaN, never a finite step -----------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_inf_gradient_is_a_nan_weight_not_a_permanent_drift(backend) -> None:
    weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    optimizer = Lion([weight], lr=0.1, backend=backend)
    weight.grad = torch.ones(8)
    weight.grad[2], weight.grad[5] = float("inf"), -float("inf")
    optimizer.step()
    hit = torch.zeros(8, dtype=torch.bool)
    hit[[2, 5]] = True
    assert torch.isnan(weight[hit]).all()  # before: ±lr, a finite step with an Inf momentum behind it
    assert torch.isfinite(weight[~hit]).all()
    # Later finite gradients pointing the other way: the damaged elements stay visibly NaN
    # (before: they kept moving by lr in the direction of the old Inf, against these gradients).
    for _ in range(3):
        weight.grad = -torch.sign(torch.linspace(-1.0, 1.0, 8)) - 0.5
        optimizer.step()
    assert torch.isnan(weight[hit]).all() and torch.isfinite(weight[~hit]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frugal_signsgd_of_an_inf_residual_is_nan(backend) -> None:
    # density 0: the whole gradient is the residual, so the Inf reaches signSGD alone (a projection
    # would spread it as Inf·0 = NaN through the matrix products first).
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    optimizer = FRUGAL([{"params": [weight], "density": 0.0}], lr=0.1, backend=backend)
    weight.grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    weight.grad[0, 3], weight.grad[4, 1] = float("inf"), -float("inf")
    optimizer.step()
    hit = torch.zeros(6, 8, dtype=torch.bool)
    hit[0, 3] = hit[4, 1] = True
    assert torch.isnan(weight[hit]).all()  # before: a finite step of ±lr
    assert torch.isfinite(weight[~hit]).all()


# ---- COSMOS: a huge finite gradient must not write a NaN basis -------------------------------------

def test_cosmos_subspace_tracking_is_scale_invariant() -> None:
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(9, 6, generator=generator)
    basis, subspace = cosmos_basis_init(grad, 3, beta2=0.95)
    huge_basis, huge_subspace = cosmos_basis_init(grad * 1e20, 3, beta2=0.95)  # GᵀG ≈ 1e40 > fp32's range
    torch.testing.assert_close(huge_basis @ huge_basis.T, basis @ basis.T, atol=1e-5, rtol=0)
    assert torch.isfinite(huge_subspace).all()  # S itself saturates at fp32's largest value
    later = torch.randn(9, 6, generator=generator)
    # float64 holds every intermediate of the huge fp32 case: it is the oracle.
    expected, _ = cosmos_basis_update(later.double() * 1e20, basis.double(), subspace.double(), beta2=0.95)
    huge_updated, huge_later_subspace = cosmos_basis_update(later * 1e20, basis, subspace, beta2=0.95)
    torch.testing.assert_close(huge_updated.double() @ huge_updated.double().T, expected @ expected.T, atol=1e-5,
                               rtol=0)
    assert torch.isfinite(huge_later_subspace).all()
    # Newton–Schulz's normalization: a huge complement is orthogonalized, not zeroed by ‖X‖ = Inf.
    torch.testing.assert_close(newton_schulz5(grad * 1e20, dtype=torch.float32), newton_schulz5(grad, dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosmos_huge_finite_gradient_keeps_weights_basis_and_steps_finite(backend) -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=generator))
    lr, lr_ratio = 0.01, 0.5
    optimizer = COSMOS([weight], lr=lr, lr_ratio=lr_ratio, rank=2, ns_dtype=torch.float32, backend=backend,
                       skip_nonfinite=True)
    for step in range(4):
        weight.grad = torch.randn(6, 8, generator=generator) * (1e20 if step == 1 else 1.0)
        before = weight.detach().clone()
        optimizer.step()
        state = optimizer.state[weight]
        assert torch.isfinite(weight).all() and torch.isfinite(state["basis"]).all(), step  # before: NaN from step 1
        assert torch.isfinite(state["subspace"]).all(), step
        # Every COSMOS step has RMS lr·ρ (no decay here): a zeroed direction would not move at all.
        rms = (weight.detach() - before).square().mean().sqrt().item()
        assert rms == pytest.approx(lr * lr_ratio, rel=1e-3), step
    assert optimizer.skipped_steps == 0  # the gradient was finite: nothing to skip


@pytest.mark.parametrize("cls, kwargs", [(GaLoreAdamW, {"rank": 2}), (FRUGAL, {"density": 0.5})],
                         ids=["galore", "frugal"])
def test_other_low_rank_methods_stay_finite_on_a_huge_gradient(cls, kwargs) -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=generator))
    optimizer = cls([{"params": [weight], **kwargs}], lr=0.01, update_proj_gap=2, backend="torch")
    for step in range(4):  # the huge gradient lands on a refresh step (1, 3 with gap 2)
        weight.grad = torch.randn(6, 8, generator=generator) * (1e20 if step == 2 else 1.0)
        optimizer.step()
        assert torch.isfinite(weight).all(), step
        assert torch.isfinite(optimizer.state[weight]["proj_left"]).all(), step


# ---- Natural GaLore: the Woodbury solve must not fail on ordinary gradient histories --------------

def _collinear_history(seed: int) -> torch.Tensor:
    """Five fp32 projected gradients as a few steps of training make them: nearly parallel, of
    norm ≈ 100 (I + H·Hᵀ/λ at λ = 1e-3 then has condition ≈ 1e8; fp32 Cholesky failed on 62
    of these 100)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(4, generator=generator) * 100
    return torch.stack([base * (1 + 0.01 * t) + 0.05 * torch.randn(4, generator=generator) for t in range(5)])


def test_natural_gradient_is_accurate_on_ill_conditioned_histories() -> None:
    for seed in range(100):
        history = _collinear_history(seed)
        result = natural_gradient(history[-1], history, damping=1e-3)
        wide = history.double()
        exact = torch.linalg.solve(1e-3 * torch.eye(4, dtype=torch.float64) + wide.T @ wide, wide[-1])
        assert result.dtype == torch.float32
        torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=0, msg=f"seed {seed}")
    # Non-finite input still propagates (as NaN, decided without a host sync).
    history[2, 1] = float("inf")
    assert torch.isnan(natural_gradient(history[-1], history, damping=1e-3)).all()


def test_natural_galore_keeps_a_small_regression_finite_over_many_seeds() -> None:
    """The issue's experiment, small: a 10×5 weight and a bias, rank 2, lr 1e-3, 5 steps of a
    summed squared error; fp32 Cholesky turned the weight into NaN in almost every seed."""
    nonfinite = []
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.nn.Parameter(torch.randn(10, 5, generator=generator))
        bias = torch.nn.Parameter(torch.randn(10, generator=generator))
        inputs, targets = torch.randn(32, 5, generator=generator), torch.randn(32, 10, generator=generator)
        optimizer = NaturalGaLore([{"params": [weight], "rank": 2}, {"params": [bias]}], lr=1e-3, backend="torch")
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = (inputs @ weight.T + bias - targets).square().sum()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not torch.isfinite(weight).all():
            nonfinite.append(seed)
        else:
            assert losses[-1] < losses[0], seed  # and the natural-gradient steps descend
    assert nonfinite == []


# ---- hyperparameters: finite, in range, checked again at every step --------------------------------

def test_zeroth_order_constructor_numbers_must_be_finite() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="Invalid scale_min: inf"):
        QZO(params, lr=1e-3, scale_min=math.inf)
    with pytest.raises(ValueError, match="Invalid clip_threshold: inf"):
        QZO(params, lr=1e-3, clip_threshold=math.inf)
    with pytest.raises(ValueError, match="Invalid eps: an int of 1329 bits"):
        MeZO(params, lr=1e-3, eps=10**400)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # it was called after
@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda info: info.name)
def test_a_scheduler_that_makes_lr_nan_is_stopped_before_the_step_changes_anything(info) -> None:
    generator = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(7, 5, generator=generator)),
              torch.nn.Parameter(torch.randn(5, generator=generator))]
    optimizer = info.cls(params, **info.sample_kwargs, backend="torch")

    def step() -> None:
        if info.zeroth_order:
            optimizer.step(lambda: sum(p.square().sum() for p in params))
            return
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()

    step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: math.nan if epoch >= 1 else 1.0)
    scheduler.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])
    with pytest.raises(ValueError, match=r"param group 0: Invalid lr: nan .*scheduler.*modified nothing"):
        step()  # before: the step ran, and the NaN surfaced only when the checkpoint was refused
    for value, key in ((math.inf, "lr"), (-1.0, "weight_decay"), (math.inf, "weight_decay")):
        optimizer.param_groups[0]["lr"] = 0.01
        optimizer.param_groups[0][key] = value
        with pytest.raises(ValueError, match=f"param group 0: Invalid {key}"):
            step()
    optimizer.param_groups[0]["weight_decay"] = 0.0
    optimizer.param_groups[0]["lr"] = torch.tensor(math.nan)  # a 0-d tensor lr is held to the same rule
    with pytest.raises(ValueError, match="param group 0: Invalid lr: nan"):
        step()
    optimizer.param_groups[0]["lr"] = 0.01
    if "betas" in optimizer.param_groups[0]:  # OneCycleLR / CyclicLR write betas
        optimizer.param_groups[0]["betas"] = (math.nan, 0.9)
        with pytest.raises(ValueError, match="param group 0: Invalid beta parameter at index 0"):
            step()
    for param, saved in zip(params, before[0]):
        assert torch.equal(param.detach(), saved)
    after = optimizer.state_dict()["state"]
    assert after.keys() == before[1].keys()
    for key, entry in before[1].items():
        for name, value in entry.items():
            assert torch.equal(after[key][name], value), (key, name)


# ---- FRUGAL: signSGD on a residual that is rounding noise ------------------------------------------

def _rank_one_frugal_step(seed: int, backend: str = "torch", **kwargs) -> tuple[float, float, torch.Tensor]:
    """One FRUGAL step on ½‖Wx − y‖² for one sample: G = (Wx − y)xᵀ has rank 1, so the rank-3
    SVD subspace holds all of it and the residual is rounding noise. (loss before, after, W)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(8, 6, generator=generator))
    x, y = torch.randn(6, generator=generator), torch.randn(8, generator=generator)
    optimizer = FRUGAL([{"params": [weight], "density": 0.5}], lr=1e-3, weight_decay=0.0, backend=backend, **kwargs)
    before = 0.5 * (weight @ x - y).square().sum()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        return before.item(), (0.5 * (weight @ x - y).square().sum()).item(), weight.detach()


def test_frugal_takes_no_signsgd_step_on_a_residual_of_rounding_noise() -> None:
    official_rises = 0
    for seed in range(200):
        before, after, _ = _rank_one_frugal_step(seed)
        assert after < before, seed  # before the fix: the default rose in about a third of these runs
        official_before, official_after, _ = _rank_one_frugal_step(seed, inactive_threshold=0.0)
        official_rises += official_after > official_before
    assert official_rises > 30  # the official update (still reachable) is the one that rose
    # A genuine residual (a full-rank gradient, half of it outside the subspace) is untouched, for
    # orthonormal and for Gaussian (not orthonormal) subspaces alike.
    for projector in ("svd", "random"):
        weights = []
        for threshold in (1e-2, 0.0):
            weight = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(7)))
            optimizer = FRUGAL([{"params": [weight], "density": 0.5}], lr=1e-3, projector=projector, backend="torch",
                               inactive_threshold=threshold)
            for seed in range(3):
                weight.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(8 + seed))
                optimizer.step()
            weights.append(weight.detach())
        assert torch.equal(weights[0], weights[1]), projector


@pytest.mark.parametrize("backend", BACKENDS)
def test_frugal_noise_threshold_drops_exactly_the_signsgd_term(backend) -> None:
    # (The two backends' SVDs may pick different trailing singular vectors of a rank-1 G, so
    # each backend is compared with itself: thresholded = no residual step at all.)
    for seed in range(2):
        _, _, thresholded = _rank_one_frugal_step(seed, backend)
        _, _, without = _rank_one_frugal_step(seed, backend, inactive_threshold=0.0, inactive_lr_scale=0.0)
        _, _, official = _rank_one_frugal_step(seed, backend, inactive_threshold=0.0)
        assert torch.equal(thresholded, without)
        moved = (official - without).abs() > 0.5e-3  # official: sign(noise) moves a coordinate by lr
        assert moved.float().mean() > 0.5


def test_frugal_checkpoint_from_before_the_threshold_resumes_with_the_official_update() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = FRUGAL([{"params": [weight], "density": 0.5}], lr=1e-3, backend="torch")
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["inactive_threshold"]  # as written before the option existed
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["inactive_threshold"] == 0.0
    optimizer.step()
    with pytest.raises(ValueError, match="Invalid inactive_threshold"):
        FRUGAL([weight], density=0.5, inactive_threshold=1.0)
