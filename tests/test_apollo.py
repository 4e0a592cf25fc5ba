"""APOLLO and APOLLO-Mini against the official package, Adam's update norms, and by hand."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from support import official_package

from memzoo.optim import APOLLO
from memzoo.reference.apollo import apollo_apply_, apollo_scales_


def _official_apollo():
    """apollo-torch 1.0.3 (tests/oracles.txt), or a skip."""
    return official_package("apollo_torch")


def _grads(shape, steps, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("scale_type,scale_front", [("channel", False), ("tensor", True)])
def test_follows_the_official_apollo_torch_trajectory_with_the_svd_projection(shape, scale_type, scale_front) -> None:
    """With proj="svd" (deterministic) every step of apollo-torch's APOLLOAdamW is reproduced:
    projection refreshes, channel and tensor scaling, the limiter, √scale, decay after."""
    official = _official_apollo()
    kwargs = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    group = {"rank": 3, "update_proj_gap": 3, "scale": 4.0, "proj": "svd", "proj_type": "std",
             "scale_type": scale_type}
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    bias_start = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    theirs = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(bias_start.clone())]
    ours = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(bias_start.clone())]
    their_optimizer = official.APOLLOAdamW([{"params": [theirs[0]], **group}, {"params": [theirs[1]]}],
                                           scale_front=scale_front, **kwargs)
    our_optimizer = APOLLO([{"params": [ours[0]], **group}, {"params": [ours[1]]}], scale_front=scale_front,
                           backend="torch", **kwargs)
    # Gradients growing step by step so that the limiter acts on some steps.
    grads = [g * (1 + 0.5 * t) for t, g in enumerate(_grads(shape, 8, seed=2, dtype=torch.float32))]
    bias_grads = _grads((shape[0],), 8, seed=3, dtype=torch.float32)
    for grad, bias_grad in zip(grads, bias_grads):  # refreshes at steps 1, 4 and 7
        for params in (theirs, ours):
            params[0].grad, params[1].grad = grad.clone(), bias_grad.clone()
        their_optimizer.step()
        our_optimizer.step()
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    limited = float(their_optimizer.state[theirs[0]]["scaled_grad"])
    assert float(our_optimizer.state[ours[0]]["limiter_norm"]) == pytest.approx(limited, rel=1e-5)


def _hf_adam_updates(grads, betas, eps):
    """N_t = m_t/(√v_t + ε) of HF-style Adam on each gradient, in float64."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    updates = []
    for grad in grads:
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        updates.append(m / (v.sqrt() + eps))
    return updates


@pytest.mark.parametrize("scale_type", ["tensor", "channel"])
@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
def test_identity_projection_gives_updates_along_g_with_adams_norms(scale_type, shape) -> None:
    """The reduction of the APOLLO issue, in float64: identity projection, limiter off, scale
    1: every update is −η_t·s·G, along the gradient (per channel for channel scaling), and its
    norm (per channel) is η_t times the norm of Adam's update N."""
    lr, betas, eps = 0.03, (0.9, 0.99), 1e-6
    weight = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    optimizer = APOLLO([weight], lr=lr, betas=betas, eps=eps, rank=2, proj="identity", scale_type=scale_type,
                       disable_nl=True, backend="torch")
    grads = _grads(shape, 5, seed=4)
    adam = _hf_adam_updates(grads, betas, eps)
    # Channels: rows of G when the right side is projected (m ≥ n), columns otherwise.
    dim = None if scale_type == "tensor" else (1 if shape[0] >= shape[1] else 0)
    for t, (grad, n) in enumerate(zip(grads, adam), start=1):
        before = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        delta = weight.detach() - before
        norms = (lambda x: x.norm()) if dim is None else (lambda x: x.norm(dim=dim))
        # Along G, with a non-negative factor per channel: Δ = −c·G, c ≥ 0.
        factor = norms(delta) / norms(grad)
        expanded = factor if dim is None else factor.unsqueeze(dim)
        torch.testing.assert_close(delta, -expanded * grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(norms(delta), step_size * norms(n), rtol=1e-7, atol=0)


def test_the_limiter_caps_norm_growth_at_the_growth_limit() -> None:
    """By hand: ρ records ‖S‖ first; a 10× larger S is cut to γ·ρ; a smaller one passes."""
    weight = torch.zeros(4, 3, dtype=torch.float64)
    grad = torch.ones(4, 3, dtype=torch.float64)
    factors = torch.full((1, 1), 0.5, dtype=torch.float64)
    rho = torch.zeros((), dtype=torch.float32)
    kwargs = dict(step_size=1.0, scale=1.0, lr=1.0, weight_decay=0.0, growth_limit=1.01)
    apollo_apply_(weight, grad, factors, rho, record_only=True, **kwargs)
    first = 0.5 * math.sqrt(12)  # ‖S‖ = 0.5·‖1‖
    assert float(rho) == pytest.approx(first, rel=1e-6)
    torch.testing.assert_close(weight, -0.5 * grad)
    weight.zero_()
    apollo_apply_(weight, 10 * grad, factors, rho, **kwargs)
    assert weight.norm().item() == pytest.approx(1.01 * first, rel=1e-6)  # grown by γ, not 10×
    assert float(rho) == pytest.approx(1.01 * first, rel=1e-6)
    weight.zero_()
    apollo_apply_(weight, 0.5 * grad, factors, rho, **kwargs)  # shrinking passes unchanged
    torch.testing.assert_close(weight, -0.25 * grad)
    assert float(rho) == pytest.approx(0.25 * math.sqrt(12), rel=1e-6)


def test_scale_enters_as_its_square_root_after_the_limiter() -> None:
    weight_1 = torch.zeros(3, 2, dtype=torch.float64)
    weight_4 = torch.zeros(3, 2, dtype=torch.float64)
    grad = torch.randn(3, 2, dtype=torch.float64)
    factors = torch.rand(3, 1, dtype=torch.float64)
    rho_1, rho_4 = torch.zeros(()), torch.zeros(())
    for weight, scale, rho in ((weight_1, 1.0, rho_1), (weight_4, 4.0, rho_4)):
        apollo_apply_(weight, grad, factors, rho, step_size=0.1, scale=scale, lr=0.1, weight_decay=0.0,
                      record_only=True)
    torch.testing.assert_close(weight_4, 2 * weight_1)
    torch.testing.assert_close(rho_4, rho_1)  # ρ is measured before √α (scale_front=False)


def test_scales_by_hand_for_a_right_projection() -> None:
    """One step from zero moments with β1 = β2 = 0: m = R, v = R², N = R/(|R|+ε) ≈ sign(R), so a
    row's factor is ‖sign(R_i)‖/‖R_i‖ = √r/‖R_i‖."""
    grad = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0], [0.5, 0.5, 0.5], [-6.0, 0.0, 8.0]], dtype=torch.float64)
    right = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # keeps columns 0, 1
    exp_avg = torch.zeros(4, 2, dtype=torch.float64)
    exp_avg_sq = torch.zeros(4, 2, dtype=torch.float64)
    scales = torch.empty(4, 1, dtype=torch.float64)
    apollo_scales_(grad, exp_avg, exp_avg_sq, scales, lefts=None, rights=right, beta1=0.0, beta2=0.0, eps=1e-12)
    r = grad[:, :2]
    expected = (r != 0).sum(dim=1, keepdim=True).double().sqrt() / (r.norm(dim=1, keepdim=True) + 1e-8)
    torch.testing.assert_close(scales, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(exp_avg, r)
    tensor_scale = torch.empty(1, 1, dtype=torch.float64)
    apollo_scales_(grad, torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64), tensor_scale,
                   lefts=None, rights=right, beta1=0.0, beta2=0.0, eps=1e-12)
    assert tensor_scale.item() == pytest.approx(math.sqrt(int((r != 0).sum())) / (r.norm().item() + 1e-8), rel=1e-9)


def test_scales_shapes_are_checked_against_the_side() -> None:
    grad = torch.randn(6, 4)
    right = torch.randn(2, 4)
    moments = lambda: (torch.zeros(6, 2), torch.zeros(6, 2))  # noqa: E731
    for bad in (torch.empty(1, 4), torch.empty(6), torch.empty(2, 1)):
        with pytest.raises(ValueError, match="scales has shape"):
            apollo_scales_(grad, *moments(), bad, lefts=None, rights=right, beta1=0.9, beta2=0.99, eps=1e-6)
    with pytest.raises(ValueError, match="one side"):
        apollo_scales_(grad, torch.zeros(2, 2), torch.zeros(2, 2), torch.empty(1, 1), lefts=torch.randn(6, 2),
                       rights=right, beta1=0.9, beta2=0.99, eps=1e-6)
    with pytest.raises(TypeError, match="float32"):
        apollo_scales_(grad, *moments(), torch.empty(6, 1, dtype=torch.bfloat16), lefts=None, rights=right,
                       beta1=0.9, beta2=0.99, eps=1e-6)


def test_random_projection_is_regenerated_and_reseeded_every_gap() -> None:
    weight = torch.nn.Parameter(torch.randn(10, 6))
    optimizer = APOLLO([weight], rank=2, update_proj_gap=3, backend="torch")
    seeds = []
    for _ in range(7):
        weight.grad = torch.randn(10, 6)
        optimizer.step()
        seeds.append(int(optimizer.state[weight]["proj_seed"]))
    state = optimizer.state[weight]
    assert "proj_left" not in state and "proj_right" not in state  # nothing stored but the seed
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3] == seeds[4] == seeds[5] != seeds[6]
    assert state["exp_avg"].shape == (10, 2)  # m ≥ n: R = G·Pᵀ is m×r


def test_mini_defaults_and_its_state_is_two_vectors_per_matrix() -> None:
    weights = [torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(16, 48))]
    bias = torch.nn.Parameter(torch.randn(64))
    optimizer = APOLLO.mini([{"params": weights, "rank": 1}, {"params": [bias]}])
    group = optimizer.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"], group["projector"]) == (1, "tensor", 128.0, "random")
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    bias.grad = torch.randn_like(bias)
    optimizer.step()
    # Per matrix: m and v of max(m, n)×1, step, seed, limiter norm; the bias: two full moments.
    matrices = sum(2 * max(w.shape) * 4 + 8 + 8 + 4 for w in weights)
    assert optimizer.state_bytes() == matrices + 2 * 64 * 4 + 8
    assert matrices < 0.1 * sum(2 * w.numel() * 4 for w in weights)  # AdamW's: 2 values per weight


def test_official_group_keys_and_clear_errors() -> None:
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = APOLLO([{"params": [weight], "rank": 2, "proj": "svd", "scale_type": "tensor"}])
    assert optimizer.param_groups[0]["projector"] == "svd" and "proj" not in optimizer.param_groups[0]
    with pytest.raises(TypeError, match="proj="):
        APOLLO([weight], projector="svd")
    with pytest.raises(ValueError, match="both 'proj' and 'projector'"):
        APOLLO([{"params": [weight], "rank": 2, "proj": "svd", "projector": "random"}])
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="projects one side"):
        APOLLO([weight], rank=2, proj_type="full")
    assert torch.equal(weight, before)


def _readme_mini_groups(lowrank, regular, proj="random", update_proj_gap=200):
    """The param groups of apollo-torch's README (APOLLO-Mini), unchanged but for proj and gap."""
    return [{"params": regular},
            {"params": lowrank, "rank": 1, "proj": proj, "scale_type": "tensor", "scale": 128,
             "update_proj_gap": update_proj_gap, "proj_type": "std"}]


@pytest.mark.parametrize("build", ["APOLLO", "APOLLO.mini"])
def test_mini_with_apollo_torch_groups_follows_the_official_trajectory(build) -> None:
    """apollo-torch's README groups, given to APOLLO or APOLLO.mini, mean what they mean there:
    the group without a rank (embedding, norm) is AdamW, not projected at rank 1. With
    proj="svd" (deterministic) every parameter follows the official trajectory across
    projection refreshes (gap 3: steps 1, 4, 7)."""
    official = _official_apollo()
    generator = torch.Generator().manual_seed(5)
    starts = [torch.randn(shape, generator=generator) for shape in ((12, 8), (20, 6), (6,))]
    ours = APOLLO.mini if build == "APOLLO.mini" else APOLLO
    runs = []
    for make in (lambda groups: official.APOLLOAdamW(groups, lr=0.01, weight_decay=0.01),
                 lambda groups: ours(groups, lr=0.01, weight_decay=0.01, backend="torch")):
        params = [torch.nn.Parameter(start.clone()) for start in starts]  # weight; embedding, norm
        optimizer = make(_readme_mini_groups([params[0]], params[1:], proj="svd", update_proj_gap=3))
        trajectory = []
        for grads in zip(*(_grads(p.shape, 8, seed=10 + i, dtype=torch.float32) for i, p in enumerate(params))):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
            trajectory.append([p.detach().clone() for p in params])
        runs.append(trajectory)
    for theirs, ours in zip(*runs):
        for their_param, our_param in zip(theirs, ours):
            torch.testing.assert_close(our_param, their_param, rtol=1e-5, atol=1e-6)


def test_official_readme_configurations_build_unchanged() -> None:
    """The README's code (groups, keyword arguments) builds our optimizer, and every keyword
    argument both share has the official default."""
    official = _official_apollo()
    lowrank = [torch.nn.Parameter(torch.randn(16, 8))]
    regular = [torch.nn.Parameter(torch.randn(8))]
    for optimizer in (APOLLO(_readme_mini_groups(lowrank, regular), lr=0.01),
                      APOLLO.mini(_readme_mini_groups(lowrank, regular), lr=0.01)):
        regular_group, projected = optimizer.param_groups
        assert regular_group["rank"] is None and projected["rank"] == 1
        assert (projected["projector"], projected["scale_type"], projected["scale"]) == ("random", "tensor", 128)
        for param in lowrank + regular:
            param.grad = torch.randn_like(param)
        optimizer.step()
    theirs = inspect.signature(official.APOLLOAdamW.__init__).parameters
    ours = inspect.signature(APOLLO.__init__).parameters
    shared = [name for name in theirs if name in ours and theirs[name].default is not inspect.Parameter.empty]
    assert len(shared) >= 7, shared
    for name in shared:
        assert ours[name].default == theirs[name].default, name


def test_mini_refuses_groups_that_project_nothing() -> None:
    weight, bias = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6))
    with pytest.raises(ValueError, match="no param group carries a 'rank'.*\"rank\": 1"):
        APOLLO.mini([{"params": [weight]}, {"params": [bias], "rank": None}])
    assert APOLLO.mini([weight, bias]).param_groups[0]["rank"] == 1  # a plain list: one projected group
    assert APOLLO.mini([{"params": [weight]}], rank=2).param_groups[0]["rank"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_draws_a_refreshs_projections_in_one_call_per_shape(dtype) -> None:
    """At a refresh the torch backend draws the new random projections of a batch of
    same-shaped weights in one Philox call (one stream per weight), not one call per weight; each
    weight's kept factors are exactly its seed's (random_basis through the reference Philox),
    right and left sides. Changing update_proj_gap keeps them (they depend on the projection's
    layout and seed only)."""
    from memzoo.reference.projector import random_basis

    torch.manual_seed(0)
    shapes = [(12, 7)] * 3 + [(5, 9)] * 2  # right projections, then left ones (m < n)
    weights = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in shapes]
    optimizer = APOLLO(weights, lr=0.1, rank=3, update_proj_gap=2, backend="torch")
    calls = []
    draw = optimizer._randn
    optimizer._randn = lambda seed, offsets: (calls.append(tuple(torch.as_tensor(seed).shape)), draw(seed, offsets))[1]
    for step in range(4):  # a refresh at step 1; the gap becomes 5 before step 3: no refresh, no new draw
        if step == 2:
            optimizer.param_groups[0]["update_proj_gap"] = 5
        for weight in weights:
            weight.grad = torch.randn(weight.shape).to(dtype)
        calls.clear()
        optimizer.step()
        assert calls == ([(3, 1), (2, 1)] if step == 0 else [])
        for weight, shape in zip(weights, shapes):
            seed = int(optimizer.state[weight]["proj_seed"])
            side = "right" if shape[0] >= shape[1] else "left"
            (_, seed_kept, *_), factors = optimizer._seeded_factors[weight]
            assert seed_kept == seed
            for kept, alone in zip(factors, random_basis(seed, shape, 3, side, "cpu", dtype)):
                assert (kept is None) == (alone is None) and (kept is None or torch.equal(kept, alone))


def test_torch_backend_keeps_the_regenerated_projection_until_the_next_refresh() -> None:
    """On the torch backend the Philox projection is drawn once per refresh and kept (the
    official APOLLO stores it); the reference regenerates it every step. Same trajectory, and
    the kept factors are exactly the seed's: a stale projection after a refresh would differ."""
    from memzoo.reference.projector import random_basis

    torch.manual_seed(0)
    weights = {backend: torch.nn.Parameter(torch.randn(12, 7)) for backend in ("torch", "reference")}
    weights["reference"].data.copy_(weights["torch"])
    optimizers = {backend: APOLLO([weight], lr=0.1, rank=3, update_proj_gap=2, backend=backend)
                  for backend, weight in weights.items()}
    kept = []
    for _ in range(4):  # refreshes at steps 1 and 3
        grad = torch.randn(12, 7)
        for backend, weight in weights.items():
            weight.grad = grad.clone()
            optimizers[backend].step()
        state = optimizers["torch"].state[weights["torch"]]
        (key, factors), = optimizers["torch"]._seeded_factors.values()
        assert key[1] == int(state["proj_seed"])
        fresh = random_basis(int(state["proj_seed"]), (12, 7), 3, "right", "cpu")
        assert factors[0] is None and torch.equal(factors[1], fresh[1])
        kept.append(factors[1])
    assert kept[0] is kept[1] and kept[2] is kept[3]  # drawn once per refresh
    assert not torch.equal(kept[1], kept[2])  # a new projection after the refresh
    assert not optimizers["reference"]._seeded_factors  # the reference keeps nothing
    torch.testing.assert_close(weights["torch"], weights["reference"], rtol=1e-5, atol=1e-6)
