"""FRUGAL's reductions (AdamW, signSGD), its split by hand, and the subspace rules, in float64."""

from __future__ import annotations

import pytest
import torch

from memzoo.optim import FRUGAL


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
