"""Fira: the whole-step reference against the official ``fira`` 1.0.2 package, the torch twin
against the reference, and the cases where the official code is degenerate."""

from __future__ import annotations

import pytest
import torch
from support import assert_close, official_package

from memzoo.reference import fira as reference
from memzoo.reference.galore import galore_adam_project_
from memzoo.reference.projector import project
from memzoo.triton_kernels.torch_backend import fira as torch_fira

# The whole-step function's group keys that the official optimizer does not have: its exact SVD.
STEP_KEYS = dict(seed=0, correct_bias=True, projector="svd", power_iters=2, oversample=8, strict_rank=False,
                 state_dtype=None, growth_limit=1.01, maximize=False)

# Gradient magnitudes per step: growth (×3, ×4, ×6) trips the limiter, shrinking passes.
_GRAD_SCALES = (1.0, 3.0, 0.5, 2.0, 4.0, 1.0, 6.0, 1.0)


def _grads(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * scale for scale in _GRAD_SCALES]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_whole_step_follows_the_official_fira_trajectory(proj_type) -> None:
    """Rank group with an m≥n and an m<n weight (right and left projections, swapped by
    reverse_std) plus a dense group; 8 steps with update_proj_gap 3 cross refreshes at steps 1,
    4 and 7; α = 0.25 (applied inside the back-projection officially) and decay on."""
    official = official_package("fira")
    shapes = [(12, 8), (8, 12), (12,)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    ours = [start.clone() for start in starts]
    hparams = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    optimizer = official.FiraAdamW([{"params": theirs[:2], "rank": 3, "update_proj_gap": 3, "alpha": 0.25,
                                     "proj_type": proj_type}, {"params": theirs[2:]}],
                                   no_deprecation_warning=True, **hparams)
    states = [{} for _ in ours]
    grads = [_grads(shape, 10 + i) for i, shape in enumerate(shapes)]
    limited = 0
    for t in range(len(_GRAD_SCALES)):
        for param, grad in zip(theirs, grads):
            param.grad = grad[t].clone()
        optimizer.step()
        for i, state in enumerate(states):
            group = dict(rank=3 if i < 2 else None, update_proj_gap=3, scale=0.25, proj_type=proj_type)
            ours[i], states[i] = reference.fira_step(ours[i], grads[i][t], state, **group, **STEP_KEYS, **hparams)
            if "limiter_norm" in state:
                limited += bool(torch.isclose(states[i]["limiter_norm"], 1.01 * state["limiter_norm"], rtol=1e-6))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=5e-7)
    assert limited >= 2  # the limiter bound the update norm on some steps
    assert all(int(state["step"]) == len(_GRAD_SCALES) for state in states)
    moved = min((a - s).abs().max().item() for a, s in zip(ours, starts))
    assert moved > 1e-3  # a comparison of weights that moved


def _case(shape, side, rank, generator, dtype=torch.float32):
    m, n = shape
    grad = torch.randn(shape, generator=generator).to(dtype)
    if side == "right":
        left, right = None, torch.linalg.qr(torch.randn(n, rank, generator=generator).to(dtype)).Q.T.contiguous()
        low_rank = (m, rank)
    else:
        left, right = torch.linalg.qr(torch.randn(m, rank, generator=generator).to(dtype)).Q.contiguous(), None
        low_rank = (rank, n)
    update = torch.randn(low_rank, generator=generator).to(dtype)
    param = torch.randn(shape, generator=generator).to(dtype)
    return param, grad, update, left, right


@pytest.mark.parametrize("record_only,limiter,maximize", [(True, True, False), (False, True, True),
                                                           (False, False, False)])
def test_torch_twin_matches_the_reference(record_only, limiter, maximize) -> None:
    generator = torch.Generator().manual_seed(3)
    cases = [_case((17, 9), "right", 4, generator), _case((6, 13), "left", 2, generator),
             _case((9, 9), "right", 9, generator), _case((5, 7), "left", 1, generator)]
    params = [c[0] for c in cases]
    grads = [c[1] for c in cases]
    updates = [c[2] for c in cases]
    lefts = [c[3] for c in cases]
    rights = [c[4] for c in cases]
    norms = [torch.tensor(0.1 + i, dtype=torch.float32) for i in range(len(cases))] if limiter else None
    hparams = dict(lefts=lefts, rights=rights, step_size=0.03, scale=0.25, lr=0.02, weight_decay=0.1,
                   record_only=record_only, maximize=maximize)
    expected_params = [p.clone() for p in params]
    expected_norms = None if norms is None else [n.clone() for n in norms]
    reference.fira_apply_(expected_params, grads, updates, expected_norms, **hparams)
    torch_fira.fira_apply_(params, grads, updates, norms, **hparams)
    for a, e in zip(params, expected_params):
        assert_close(a, e, 1e-6, what="weight")
    for a, e in zip(norms or [], expected_norms or []):
        assert_close(a, e, what="limiter norm")


@pytest.mark.parametrize("module", [reference, torch_fira], ids=["reference", "torch"])
def test_given_projections_and_limiter_sizes_replace_the_local_ones(module) -> None:
    """What a row shard passes (R all-reduced, ‖S‖ over every shard): given the whole matrix's
    own R and ‖S‖ the step is unchanged; given other values, the kernel uses them (the recorded
    ρ is the given size; the torch twin agrees with the reference on arbitrary ones)."""
    generator = torch.Generator().manual_seed(5)
    cases = [_case((11, 7), "right", 3, generator), _case((6, 13), "left", 2, generator)]
    params, grads, updates, lefts, rights = (list(column) for column in zip(*cases))
    hparams = dict(lefts=lefts, rights=rights, step_size=0.03, scale=0.25, lr=0.02, weight_decay=0.1, maximize=True)
    projections = [project(g, left, right) for g, left, right in zip(grads, lefts, rights)]
    sizes = [reference.fira_residual(g, u, left, right, scale=0.25).norm()
             for g, u, left, right in zip(grads, updates, lefts, rights)]
    for record_only in (True, False):
        norms = [torch.tensor(0.5), torch.tensor(0.2)]
        plain, given = [p.clone() for p in params], [p.clone() for p in params]
        plain_norms, given_norms = [n.clone() for n in norms], [n.clone() for n in norms]
        module.fira_apply_(plain, grads, updates, plain_norms, record_only=record_only, **hparams)
        module.fira_apply_(given, grads, updates, given_norms, record_only=record_only, projections=projections,
                           limiter_sizes=sizes, **hparams)
        for a, b in zip(plain + plain_norms, given + given_norms):
            assert_close(a, b, 1e-6, what="with the whole matrix's own R and ‖S‖")
    other_projections = [2.0 * r for r in projections]
    other_sizes = [3.0 * size for size in sizes]
    results = []
    for kernels in (reference, torch_fira):
        stepped, norms = [p.clone() for p in params], [torch.tensor(0.5), torch.tensor(0.2)]
        kernels.fira_apply_(stepped, grads, updates, norms, record_only=False, projections=other_projections,
                            limiter_sizes=other_sizes, **hparams)
        results.append(stepped + norms)
    for a, b in zip(*results):
        assert_close(a, b, 1e-6, what="torch twin with given R and ‖S‖")
    recorded = [torch.tensor(0.0), torch.tensor(0.0)]
    module.fira_apply_([p.clone() for p in params], grads, updates, recorded, record_only=True,
                       limiter_sizes=other_sizes, **hparams)
    assert all(torch.equal(a, b) for a, b in zip(recorded, other_sizes))
    with pytest.raises(ValueError, match="limiter_sizes"):
        module.fira_apply_([p.clone() for p in params], grads, updates, recorded, limiter_sizes=sizes[:1], **hparams)


def test_channel_is_the_rank_dimension_where_the_official_code_is_degenerate() -> None:
    """A left projection keeping every column (r = n of a tall 7×4 weight): the official code
    reads its channel dimension from N's shape (4×4: rows) and crashes on the broadcast; here the
    factors are per column of G, as for every other left projection."""
    generator = torch.Generator().manual_seed(5)
    param, grad, update, left, _ = _case((7, 4), "left", 4, generator, torch.float64)
    weight = param.clone()
    reference.fira_apply_(weight, grad, update, None, lefts=left, rights=None, step_size=0.1, scale=0.5, lr=0.1,
                          weight_decay=0.0)
    low_rank = left.T @ grad
    factors = update.norm(dim=0) / (low_rank.norm(dim=0) + 1e-8)  # one per column
    residual = (grad - 0.5 * left @ low_rank) * factors
    expected = param - 0.1 * (0.5 * left @ update + residual)
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-12)
    norm_dim = 0 if update.shape[0] < update.shape[1] else 1  # the official rule
    with pytest.raises(RuntimeError):
        (grad - 0.5 * left @ low_rank) * (update.norm(dim=norm_dim) / low_rank.norm(dim=norm_dim)).unsqueeze(1)


def test_bad_input_is_rejected_before_anything_is_written() -> None:
    generator = torch.Generator().manual_seed(6)
    param, grad, update, _, right = _case((8, 6), "right", 3, generator)
    weight = param.clone()
    kwargs = dict(step_size=0.1, scale=1.0, lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="one side"):
        reference.fira_apply_([weight, weight], [grad, grad], [update, update], None, lefts=[None, None],
                              rights=[right, None], **kwargs)
    with pytest.raises(ValueError, match="update has shape"):
        torch_fira.fira_apply_(weight, grad, update.T, None, lefts=None, rights=right, **kwargs)
    with pytest.raises(ValueError, match="growth_limit"):
        reference.fira_apply_(weight, grad, update, None, lefts=None, rights=right, growth_limit=0.5, **kwargs)
    assert torch.equal(weight, param)
    with pytest.raises(ValueError, match="proj_type: 'full'"):
        reference.fira_step(weight, grad, {}, lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=2,
                            update_proj_gap=2, scale=1.0, proj_type="full", **STEP_KEYS)
    assert torch.equal(weight, param)


def test_with_alpha_one_and_full_rank_the_residual_vanishes_and_fira_is_galore() -> None:
    """r = min(m, n) and α = 1: G − P·Pᵀ·G = 0, so Fira's step is GaLore's (same moments)."""
    generator = torch.Generator().manual_seed(7)
    param, grad, _, _, right = _case((9, 5), "right", 5, generator, torch.float64)
    exp_avg, exp_avg_sq, update = (torch.zeros(9, 5, dtype=torch.float64) for _ in range(3))
    galore_adam_project_(grad, exp_avg, exp_avg_sq, update, lefts=None, rights=right, beta1=0.9, beta2=0.99,
                         eps=1e-8)
    weight = param.clone()
    reference.fira_apply_(weight, grad, update, torch.zeros(()), lefts=None, rights=right, step_size=0.01,
                          scale=1.0, lr=0.01, weight_decay=0.0, record_only=True)
    torch.testing.assert_close(weight, param - 0.01 * update @ right, rtol=1e-12, atol=1e-13)


def test_torch_module_has_the_reference_names_and_signatures() -> None:
    """backend="torch" swaps the family module: every reference function is there, same signature."""
    import inspect

    for name in reference.__all__:
        ours, theirs = getattr(torch_fira, name), getattr(reference, name)
        assert name in torch_fira.__all__
        if callable(theirs):
            assert inspect.signature(ours) == inspect.signature(theirs), name
        else:
            assert ours == theirs, name


def test_optimizer_follows_the_official_fira_trajectory() -> None:
    """FiraAdamW (torch backend, exact SVD, the official group keys with ``alpha``) against
    ``fira.FiraAdamW``: the same setting as the whole-step test, through the engine."""
    from memzoo.optim import FiraAdamW

    official = official_package("fira")
    shapes = [(12, 8), (8, 12), (12,)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    ours = [torch.nn.Parameter(start.clone()) for start in starts]
    hparams = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    group = {"rank": 3, "update_proj_gap": 3, "alpha": 0.25, "proj_type": "std"}
    their_optimizer = official.FiraAdamW([{"params": theirs[:2], **group}, {"params": theirs[2:]}],
                                         no_deprecation_warning=True, **hparams)
    our_optimizer = FiraAdamW([{"params": ours[:2], **group}, {"params": ours[2:]}], no_deprecation_warning=True,
                              projector="svd", backend="torch", **hparams)
    grads = [_grads(shape, 10 + i) for i, shape in enumerate(shapes)]
    for t in range(len(_GRAD_SCALES)):
        for params in (theirs, ours):
            for param, grad in zip(params, grads):
                param.grad = grad[t].clone()
        their_optimizer.step()
        our_optimizer.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-6)
    assert our_optimizer.param_groups[0]["scale"] == 0.25  # alpha, under our name
