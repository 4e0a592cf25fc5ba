"""FRUGAL's reductions (AdamW, signSGD), its split by hand, and the subspace rules, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memzoo.optim import FRUGAL
from memzoo.reference.projector import project, project_back


def _grads(shape, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def _run(optimizer, params, grads):
    for grad in grads:
        for param, g in zip(params, grad):
            param.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (3, 4, 2)])
def test_coordinates_covering_every_coordinate_is_adamw(shape) -> None:
    """Density 1 with the coordinate projection: the residual vanishes and the state-full part
    is torch's AdamW on every coordinate (torch-Adam ε, decay first), for weights and vectors."""
    kwargs = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    start = [torch.randn(shape, dtype=torch.float64), torch.randn(shape[0], dtype=torch.float64)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    frugal = FRUGAL(ours, density=1.0, projector="coordinates", update_proj_gap=100, backend="torch", **kwargs)
    adamw = torch.optim.AdamW(theirs, **kwargs)
    grads = list(zip(_grads(shape, 6, seed=1), _grads((shape[0],), 6, seed=2)))
    for grad in grads:
        _run(frugal, ours, [grad])
        _run(adamw, theirs, [grad])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule,expected", [("sign_sgd", torch.sign), ("sgd", lambda g: g)])
def test_density_zero_is_pure_signsgd_or_sgd(rule, expected) -> None:
    lr, wd, scale = 0.01, 0.2, 0.5
    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    optimizer = FRUGAL([weight], lr=lr, weight_decay=wd, density=0.0, inactive_update_rule=rule,
                       inactive_lr_scale=scale, backend="torch")
    for grad in _grads((6, 4), 4, seed=3):
        before = weight.detach().clone()
        _run(optimizer, [weight], [[grad]])
        torch.testing.assert_close(weight.detach(), before * (1 - lr * wd) - lr * scale * expected(grad),
                                   rtol=1e-13, atol=1e-15)
    assert optimizer.state[weight]["exp_avg"].numel() == 0  # no state-full part


def test_columns_split_by_hand() -> None:
    """Half the columns (m ≥ n: columns) are Adam's, the others move by −lr·sign(G)."""
    lr, betas, eps = 0.05, (0.8, 0.9), 1e-8
    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    start = weight.detach().clone()
    optimizer = FRUGAL([weight], lr=lr, betas=betas, eps=eps, weight_decay=0.0, density=0.5,
                       projector="coordinates", update_proj_gap=10, backend="torch")
    grads = _grads((6, 4), 3, seed=4)
    _run(optimizer, [weight], [[g] for g in grads])
    columns = optimizer.state[weight]["proj_indices"]
    assert columns.numel() == 2 and torch.equal(columns, columns.sort().values)
    others = torch.tensor([c for c in range(4) if c not in columns.tolist()])
    expected_free = start[:, others] - lr * sum(torch.sign(g[:, others]) for g in grads)
    torch.testing.assert_close(weight.detach()[:, others], expected_free, rtol=1e-13, atol=1e-15)
    reference = torch.nn.Parameter(start[:, columns].clone())
    adam = torch.optim.Adam([reference], lr=lr, betas=betas, eps=eps)
    _run(adam, [reference], [[g[:, columns]] for g in grads])
    torch.testing.assert_close(weight.detach()[:, columns], reference.detach(), rtol=1e-12, atol=1e-14)


def test_svd_subspace_update_lies_in_the_subspace_and_the_residual_is_its_complement() -> None:
    """With the "no" rule the update (beside decay) lies in the subspace's row space; with
    "sgd" and inactive_lr_scale κ the extra move is −lr·κ·(G − G·PᵀP), orthogonal to it."""
    lr, kappa = 0.01, 0.3
    start = torch.randn(8, 5, dtype=torch.float64)
    grad = torch.randn(8, 5, dtype=torch.float64)
    moves = {}
    for rule in ("no", "sgd"):
        weight = torch.nn.Parameter(start.clone())
        optimizer = FRUGAL([weight], lr=lr, weight_decay=0.0, density=0.4, projector="svd", inactive_update_rule=rule,
                           inactive_lr_scale=kappa, backend="torch")
        _run(optimizer, [weight], [[grad]])
        moves[rule] = weight.detach() - start
        basis = optimizer.state[weight]["proj_right"]  # r×n, orthonormal rows
    complement = torch.eye(5, dtype=torch.float64) - basis.T @ basis
    assert basis.shape == (2, 5)
    torch.testing.assert_close(moves["no"] @ complement, torch.zeros(8, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(moves["sgd"] - moves["no"], -lr * kappa * (grad @ complement), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reset", [True, False])
def test_a_new_subspace_resets_the_moments_unless_told_otherwise(reset) -> None:
    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    optimizer = FRUGAL([weight], betas=(0.5, 0.9), density=0.5, projector="coordinates", update_proj_gap=2,
                       reset_statistics=reset, backend="torch")
    grads = _grads((6, 4), 3, seed=5)
    _run(optimizer, [weight], [[g] for g in grads])  # steps 1, 2; step 3 switches the subspace
    state = optimizer.state[weight]
    columns = state["proj_indices"]
    current = grads[2][:, columns]
    if reset:  # fresh moments: m = (1 − β1)·R, and bias correction restarted
        torch.testing.assert_close(state["exp_avg"], 0.5 * current)
        assert int(state["adam_step"]) == 1
    else:
        assert not torch.allclose(state["exp_avg"], 0.5 * current)
        assert int(state["adam_step"]) == 3
    assert int(state["step"]) == 3


def test_density_sets_the_rank_per_matrix_and_rejects_rank() -> None:
    wide, tall = torch.nn.Parameter(torch.randn(4, 40)), torch.nn.Parameter(torch.randn(40, 4))
    optimizer = FRUGAL([wide, tall], density=0.25, projector="coordinates")
    for weight in (wide, tall):
        weight.grad = torch.randn_like(weight)
    optimizer.step()
    # std: rows of the wide matrix (m < n), columns of the tall one: round(0.25·4) = 1 each.
    assert optimizer.state[wide]["exp_avg"].shape == (1, 40)
    assert optimizer.state[tall]["exp_avg"].shape == (40, 1)
    with pytest.raises(ValueError, match="density"):
        FRUGAL([{"params": [wide], "rank": 2, "density": 0.5}])


# -- the split is a projection, for every kind of subspace --------------------------------------

def _projection(optimizer, weight):
    """up(down(·)) of the weight's current subspace, from the optimizer's own factors."""
    group = optimizer.param_groups[0]
    projector = optimizer._projector(weight, group)
    left, right = projector.factors(optimizer.state[weight], weight.device, weight.dtype)
    return lambda x: project_back(project(x, left, right), left, right)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), density=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       projector=st.sampled_from(["svd", "randomized", "random", "coordinates"]),
       proj_type=st.sampled_from(["std", "reverse_std", "left", "right"]), seed=st.integers(0, 2**16))
def test_up_of_down_is_an_orthogonal_projection(m, n, density, projector, proj_type, seed) -> None:
    """P = up∘down is idempotent and the residual X − P(X) is orthogonal to the subspace, so
    G − up(down(G)) is the complement FRUGAL's state-free rule moves along."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(m, n, generator=generator, dtype=torch.float64))
    optimizer = FRUGAL([weight], density=density, projector=projector, proj_type=proj_type, seed=seed,
                       backend="torch")
    weight.grad = torch.randn(m, n, generator=generator, dtype=torch.float64)
    optimizer.step()
    down_up = _projection(optimizer, weight)
    x, y = (torch.randn(m, n, generator=generator, dtype=torch.float64) for _ in range(2))
    px = down_up(x)
    torch.testing.assert_close(down_up(px), px, rtol=0, atol=1e-12)  # idempotent
    assert abs(float(((x - px) * down_up(y)).sum())) < 1e-12 * float(x.norm() * y.norm())  # orthogonal residual


def test_random_subspace_is_orthonormal_and_regenerated_from_its_seed() -> None:
    weight = torch.nn.Parameter(torch.randn(40, 24, dtype=torch.float64))
    optimizer = FRUGAL([weight], density=0.5, projector="random", update_proj_gap=3, backend="torch")
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    assert {"proj_left", "proj_right"}.isdisjoint(state)  # nothing stored but the seed
    _, right = optimizer._projector(weight, optimizer.param_groups[0]).factors(state, weight.device, weight.dtype)
    assert right.shape == (12, 24)
    torch.testing.assert_close(right @ right.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)


def test_random_subspace_descends_a_quadratic() -> None:
    """signSGD on the complement of an orthonormal subspace and Adam inside it: the official
    operator drives 0.5‖W − T‖² to under 2 % of its start in 40 steps (0.1–1.1 % over seeds
    0–4); the Gaussian basis (E[PᵀP] = I only on average) left 6–18 %: its "complement"
    G − up(down(G)) pushed subspace directions the wrong way."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    weight = torch.nn.Parameter(torch.zeros(16, 8, dtype=torch.float64))
    optimizer = FRUGAL([weight], lr=0.05, weight_decay=0.0, density=0.25, projector="random", update_proj_gap=10,
                       backend="torch")
    start = 0.5 * float(target.square().sum())
    for _ in range(40):
        weight.grad = (weight - target).detach()
        optimizer.step()
    assert 0.5 * float((weight.detach() - target).square().sum()) < 0.02 * start


# -- the official surface -----------------------------------------------------------------------

def test_official_group_format_projects_with_the_official_density() -> None:
    """prepare_proj_params' groups: {"is_proj_params": True} without a density is ρ = 0.25 (the
    official default), False is AdamW; a constructor density applies to the projected group."""
    weight, other = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16, 8))
    groups = [{"params": [other], "is_proj_params": False}, {"params": [weight], "is_proj_params": True}]
    for kwargs, expected in (({}, 0.25), ({"density": 0.5}, 0.5)):
        optimizer = FRUGAL(groups, projector="coordinates", **kwargs)
        assert [group["density"] for group in optimizer.param_groups] == [None, expected]
        assert "is_proj_params" not in optimizer.param_groups[1]
        for param in (weight, other):
            param.grad = torch.randn_like(param)
        optimizer.step()
        assert optimizer.state[weight]["exp_avg"].shape == (16, int(8 * expected))
        assert optimizer.state[other]["exp_avg"].shape == (16, 8)


def test_official_keyword_arguments_are_mapped_to_ours() -> None:
    weight, other = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))
    # The official GaloreAdamW's keywords (FRUGAL's proj_type is the kind of projection there).
    optimizer = FRUGAL([weight, other], proj_params=[weight], update_gap=7, proj_type="randperm",
                       proj_side="left", _example_state_init=False, no_deprecation_warning=True)
    regular, projected = optimizer.param_groups
    assert regular["params"] == [other] and regular["density"] is None
    assert projected["params"] == [weight] and projected["density"] == 0.25
    assert (projected["update_proj_gap"], projected["projector"], projected["proj_type"]) == (7, "coordinates", "left")
    # CoordAdamW's coord_choice, and official keys in a group.
    optimizer = FRUGAL([{"params": [weight], "is_proj_params": True, "update_gap": 3, "coord_choice": "columns"}])
    group = optimizer.param_groups[0]
    assert (group["update_proj_gap"], group["projector"], group["proj_type"]) == (3, "coordinates", "right")
    with pytest.raises(TypeError, match="'update_gapp' \\(did you mean 'update_gap'\\?\\)"):
        FRUGAL([weight], update_gapp=3)
    with pytest.raises(ValueError, match="give one"):
        FRUGAL([{"params": [weight], "update_gap": 3, "update_proj_gap": 5, "density": 0.5}])
    with pytest.raises(ValueError, match="block variant"):
        FRUGAL([weight], block_order="random")
    with pytest.raises(ValueError, match="coord_choice"):
        FRUGAL([weight], coord_choice="randk")


def test_coordinate_count_truncates_as_the_official_code() -> None:
    """CoordAdamW keeps int(n·ρ) columns (0.3 of 32 → 9); the SVD projector round(n·ρ) (→ 10)."""
    weight = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64))
    for projector, expected in (("coordinates", 9), ("svd", 10)):
        optimizer = FRUGAL([weight], density=0.3, projector=projector)
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        assert optimizer.state[weight]["exp_avg"].shape == (64, expected)


def test_correct_bias_false_is_the_official_uncorrected_adam() -> None:
    lr, betas, eps = 0.1, (0.9, 0.99), 1e-8
    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    start, grad = weight.detach().clone(), torch.randn(6, 4, dtype=torch.float64)
    optimizer = FRUGAL([weight], lr=lr, betas=betas, eps=eps, weight_decay=0.0, density=1.0,
                       projector="coordinates", correct_bias=False)
    weight.grad = grad
    optimizer.step()
    m, v = (1 - betas[0]) * grad, (1 - betas[1]) * grad * grad
    torch.testing.assert_close(weight.detach(), start - lr * m / (v.sqrt() + eps), rtol=1e-13, atol=1e-15)


# -- the official algorithm, written out -----------------------------------------------------------

def _official_frugal_svd(weight, grads, *, lr, betas, eps, weight_decay, density, gap, kappa, reset_statistics):
    """The official GaloreAdamW (FRUGAL, ``proj_type="svd"``, ``proj_side="std"``,
    ``inactive_update_rule="sign_sgd"``) written out in float64 for one m×n weight: a subspace
    switch when the step counter is missing or a multiple of ``gap`` (top-r right singular vectors of
    the current gradient for m ≥ n, left ones otherwise; r = round(ρ·side)); moments zeroed and the
    counter restarted at a switch when ``reset_statistics``; decoupled decay first; torch-Adam on
    R = down(G) (ε after dividing √v by √(1−β2^t)); signSGD on E = G − up(down(G))."""
    m, n = weight.shape
    right = m >= n
    rank = round((n if right else m) * density)
    beta1, beta2 = betas
    state: dict = {}
    trajectory = []
    for grad in grads:
        if "step" not in state or state["step"] % gap == 0:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            state["P"] = vh[:rank] if right else u[:, :rank]
            if reset_statistics or "exp_avg" not in state:
                shape = (m, rank) if right else (rank, n)
                state["exp_avg"] = torch.zeros(shape, dtype=grad.dtype)
                state["exp_avg_sq"] = torch.zeros(shape, dtype=grad.dtype)
                state["step"] = 0
        P = state["P"]
        down = (lambda x: x @ P.T) if right else (lambda x: P.T @ x)
        up = (lambda x: x @ P) if right else (lambda x: P @ x)
        weight = weight * (1 - lr * weight_decay)
        state["step"] += 1
        t = state["step"]
        low = down(grad)
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * low
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * low * low
        denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t) + eps
        update = up(-(lr / (1 - beta1 ** t)) * state["exp_avg"] / denom)
        update = update - lr * kappa * torch.sign(grad - up(down(grad)))
        weight = weight + update
        trajectory.append(weight.clone())
    return trajectory


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
@pytest.mark.parametrize("reset_statistics", [True, False])
def test_svd_subspace_follows_the_official_algorithm_across_refreshes(shape, reset_statistics) -> None:
    """14 steps with subspace switches at steps 1, 6 and 11 (gap 5): every step's weight equals the
    official GaloreAdamW's, written out above, on both sides and with or without the statistics
    reset (``inactive_threshold=0`` is the official signSGD on every residual)."""
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    start = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = _grads(shape, 14, seed=11)
    expected = _official_frugal_svd(start.clone(), grads, density=0.5, gap=5, kappa=0.3,
                                    reset_statistics=reset_statistics, **hyper)
    weight = torch.nn.Parameter(start.clone())
    optimizer = FRUGAL([weight], density=0.5, projector="svd", update_proj_gap=5, inactive_lr_scale=0.3,
                       inactive_threshold=0.0, reset_statistics=reset_statistics, backend="torch", **hyper)
    for step, (grad, official) in enumerate(zip(grads, expected), start=1):
        weight.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(weight.detach(), official, rtol=1e-10, atol=1e-12, msg=f"step {step}")
