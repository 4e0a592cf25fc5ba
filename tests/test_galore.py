"""GaLoreAdamW against the official package, its inner Adam, and the projector's invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support import official_package

from memzoo.optim import GaLoreAdamW
from memzoo.reference.projector import compute_basis, random_basis


def _official_galore():
    """galore_torch 1.0 (tests/oracles.txt), or a skip."""
    return official_package("galore_torch")


def _hf_adam_reference(param, grads, *, lr, betas, eps, weight_decay):
    """Independent float64 HF-style AdamW (the official code's convention), step by step."""
    beta1, beta2 = betas
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    trajectory = []
    for t, grad in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        param = param - step_size * m / (v.sqrt() + eps)
        param = param - lr * weight_decay * param
        trajectory.append(param.clone())
    return trajectory


def _grads(shape, steps, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("proj_type,shape", [("std", (12, 8)), ("std", (8, 12)), ("reverse_std", (12, 8)),
                                             ("left", (12, 8)), ("right", (8, 12)), ("full", (12, 8))])
def test_follows_the_official_galore_torch_trajectory(proj_type, shape) -> None:
    official = _official_galore()
    kwargs = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    group = {"rank": 3, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    bias_start = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    theirs = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(bias_start.clone())]
    ours = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(bias_start.clone())]
    their_optimizer = official.GaLoreAdamW([{"params": [theirs[0]], **group}, {"params": [theirs[1]]}], **kwargs)
    our_optimizer = GaLoreAdamW([{"params": [ours[0]], **group}, {"params": [ours[1]]}], **kwargs,
                                projector="svd", backend="torch")
    grads = _grads(shape, 8, seed=2, dtype=torch.float32)
    bias_grads = _grads((shape[0],), 8, seed=3, dtype=torch.float32)
    for grad, bias_grad in zip(grads, bias_grads):  # steps 1..8 cross refreshes at steps 1, 4 and 7
        for params in (theirs, ours):
            params[0].grad, params[1].grad = grad.clone(), bias_grad.clone()
        their_optimizer.step()
        our_optimizer.step()
        # "full": on refresh steps R = UᵀGVᵀ is diagonal in exact arithmetic; its ~1e-7
        # off-diagonal rounding noise is divided by √v + ε ≈ 1e-6 in Adam, so a different
        # (equally valid) rounding order of the moment update shows at ~1e-5, still far below
        # one update (lr·scale·|N| ≈ 5e-3): a wrong sign or scale fails either tolerance.
        atol = 2e-5 if proj_type == "full" else 2e-7
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=atol)


def test_identity_projector_is_its_inner_adam_in_float64() -> None:
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    start = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = _grads((9, 5), 6, seed=1)
    expected = _hf_adam_reference(start.clone(), grads, **kwargs)
    for proj_type in ("std", "left", "full"):
        param = torch.nn.Parameter(start.clone())
        optimizer = GaLoreAdamW([param], **kwargs, rank=2, scale=1.0, projector="identity", proj_type=proj_type)
        for grad, want in zip(grads, expected):
            param.grad = grad
            optimizer.step()
            torch.testing.assert_close(param.detach(), want, rtol=1e-12, atol=1e-12)


def test_frozen_svd_basis_is_rotate_adam_rotate_back() -> None:
    """With the basis frozen after step 1: R_t = G_t·Pᵀ, Adam on R_t, W ← W − η·α·N_t·P."""
    lr, betas, eps, scale = 0.03, (0.9, 0.999), 1e-6, 0.5
    start = torch.randn(10, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = _grads((10, 6), 5, seed=5)
    basis = torch.linalg.svd(grads[0], full_matrices=False).Vh[:3]  # right side: m ≥ n
    param = torch.nn.Parameter(start.clone())
    optimizer = GaLoreAdamW([param], lr=lr, betas=betas, eps=eps, rank=3, scale=scale, projector="svd",
                            update_proj_gap=1000)
    m = v = torch.zeros(10, 3, dtype=torch.float64)
    expected = start.clone()
    for t, grad in enumerate(grads, start=1):
        low_rank = grad @ basis.T
        m = betas[0] * m + (1 - betas[0]) * low_rank
        v = betas[1] * v + (1 - betas[1]) * low_rank**2
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        expected = expected - step_size * scale * (m / (v.sqrt() + eps)) @ basis
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)


def test_randomized_basis_spans_the_top_singular_subspace() -> None:
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(200, 20, generator=generator)).Q
    w = torch.linalg.qr(torch.randn(120, 20, generator=generator)).Q
    spectrum = torch.logspace(0, -3, 20)
    matrix = (u * spectrum) @ w.T + 1e-5 * torch.randn(200, 120, generator=generator)
    exact_left, exact_right = compute_basis(matrix, 8, "full", "svd")
    left, right = compute_basis(matrix, 8, "full", "randomized", seed=3, power_iters=2, oversample=8)
    # Cosines of the principal angles between the subspaces are all ≈ 1.
    assert torch.linalg.svdvals(exact_left.T @ left).min() > 0.999
    assert torch.linalg.svdvals(exact_right @ right.T).min() > 0.999
    # And the captured energy equals the optimum.
    captured = (left.T @ matrix @ right.T).norm() / (exact_left.T @ matrix @ exact_right.T).norm()
    assert captured > 0.9999


def test_random_projector_is_regenerated_from_its_seed_and_never_stored() -> None:
    param = torch.nn.Parameter(torch.randn(16, 12))
    optimizer = GaLoreAdamW([param], rank=4, projector="random", update_proj_gap=2, seed=11)
    param.grad = torch.randn(16, 12)
    optimizer.step()
    state = optimizer.state[param]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_seed"}
    left, right = random_basis(int(state["proj_seed"]), (16, 12), 4, "right", "cpu")
    assert left is None and right.shape == (4, 12)
    again = random_basis(int(state["proj_seed"]), (16, 12), 4, "right", "cpu")[1]
    assert torch.equal(right, again)
    # E[PᵀP] = I: entries have variance 1/r.
    big = random_basis(5, (4, 4000), 50, "right", "cpu")[1]
    assert abs(big.var().item() - 1 / 50) < 1e-3


def test_vectors_stay_unprojected_and_conv_weights_are_reshaped() -> None:
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))  # projected as 8 × 27
    bias = torch.nn.Parameter(torch.randn(8))
    optimizer = GaLoreAdamW([conv, bias], rank=4)
    conv.grad, bias.grad = torch.randn_like(conv), torch.randn_like(bias)
    optimizer.step()
    assert optimizer.state[conv]["exp_avg"].shape == (4, 27)  # m < n: left projection, R is r × n
    assert optimizer.state[conv]["proj_left"].shape == (8, 4)
    assert optimizer.state[bias]["exp_avg"].shape == (8,) and "proj_seed" not in optimizer.state[bias]


def test_rank_above_the_matrix_is_truncated_unless_strict() -> None:
    param = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([param], rank=64, projector="svd")
    param.grad = torch.randn(6, 4)
    optimizer.step()
    assert optimizer.state[param]["exp_avg"].shape == (6, 4)
    with pytest.raises(ValueError, match=r"param group 0: param 0: rank 64 exceeds min\(m, n\) = 4"):
        GaLoreAdamW([param], rank=64, strict_rank=True)


def test_auto_keeps_galore_on_the_torch_path_until_its_kernels_are_validated_on_a_gpu() -> None:
    from memzoo.optim import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), "galore").__name__ == "memzoo.triton_kernels.torch_backend.galore"
    assert resolve_backend("triton", torch.device("cpu"), "galore").__name__ == "memzoo.triton_kernels.galore"


# ---- Natural GaLore --------------------------------------------------------------------------

def test_woodbury_natural_gradient_equals_the_direct_solve() -> None:
    from memzoo.reference.galore import natural_gradient

    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3, 7):
        history = torch.randn(rows, 12, generator=generator, dtype=torch.float64)
        g = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        for damping in (1e-3, 0.5, 10.0):
            direct = torch.linalg.solve(damping * torch.eye(12, dtype=torch.float64) + history.T @ history, g.reshape(-1))
            torch.testing.assert_close(natural_gradient(g, history, damping=damping), direct.reshape(3, 4),
                                       rtol=1e-9, atol=1e-9)
    # First step (history = g alone): g̃ = g / (λ + ‖g‖²).
    g = torch.randn(5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(natural_gradient(g, g.reshape(1, -1), damping=1e-3), g / (1e-3 + g.dot(g)))


def test_natural_galore_matches_an_independent_float64_implementation() -> None:
    from memzoo.optim import NaturalGaLore

    lr, betas, eps, damping, keep = 0.05, (0.9, 0.99), 1e-6, 0.1, 3
    start = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = _grads((4, 3), 6, seed=2)
    param = torch.nn.Parameter(start.clone())
    optimizer = NaturalGaLore([param], lr=lr, betas=betas, eps=eps, rank=3, projector="identity",
                              natural_history=keep, damping=damping)
    m = v = torch.zeros(12, dtype=torch.float64)
    expected, history = start.clone().reshape(-1), []
    for t, grad in enumerate(grads, start=1):
        history = (history + [grad.reshape(-1)])[-keep:]  # the last `keep`, current included
        h = torch.stack(history)
        natural = torch.linalg.solve(damping * torch.eye(12, dtype=torch.float64) + h.T @ h, grad.reshape(-1))
        m = betas[0] * m + (1 - betas[0]) * natural
        v = betas[1] * v + (1 - betas[1]) * natural**2
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        expected = expected - step_size * m / (v.sqrt() + eps)
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach().reshape(-1), expected, rtol=1e-9, atol=1e-10)
    assert int(optimizer.state[param]["nat_count"]) == len(grads)


def test_natural_galore_with_huge_damping_is_its_galore_mode() -> None:
    """λ → ∞: g̃ → g/λ, and Adam with ε = 0 is scale-invariant, so the update is the official
    proj_type="galore" one (the same subspace and signs, no natural step); until the first
    re-projection that is GaLoreAdamW's (whose raw SVD signs only matter across a refresh)."""
    from memzoo.optim import NaturalGaLore

    kwargs = dict(lr=0.02, eps=0.0, weight_decay=0.1, rank=3, projector="svd")
    start = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    natural, plain, galore = (torch.nn.Parameter(start.clone()) for _ in range(3))
    natural_optimizer = NaturalGaLore([natural], damping=1e12, update_proj_gap=2, **kwargs)
    plain_optimizer = NaturalGaLore([plain], proj_type="galore", update_proj_gap=2, **kwargs)
    assert plain_optimizer.param_groups[0]["natural"] is False and "nat_history" not in plain_optimizer._state_spec(
        plain, plain_optimizer.param_groups[0])
    galore_optimizer = GaLoreAdamW([galore], proj_type="full", update_proj_gap=100, **kwargs)
    for step, grad in enumerate(_grads((9, 7), 5, seed=4)):
        natural.grad, plain.grad, galore.grad = grad.clone(), grad.clone(), grad.clone()
        natural_optimizer.step()
        plain_optimizer.step()
        galore_optimizer.step()
        if step < 2:
            torch.testing.assert_close(plain.detach(), galore.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(natural.detach(), plain.detach(), rtol=1e-8, atol=1e-10)
    assert not torch.equal(natural.detach(), start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_natural_galore_steps_same_shaped_weights_together_as_the_reference_steps_each(monkeypatch, dtype) -> None:
    """backend="torch" updates same-shaped weights together (one natural-gradient call per shape
    and step); over six steps (two refreshes; the history of three wraps around) it follows the
    reference's trajectory, states included, and one weight's NaN gradient at step 5 makes that
    weight NaN on both backends and leaves the others on the trajectory."""
    from memzoo.optim import NaturalGaLore
    from memzoo.triton_kernels.torch_backend import galore as torch_galore
    from support import assert_close

    shapes = [(8, 6), (6, 8), (8, 6), (5,), (8, 6), (6, 8)]
    generator = torch.Generator().manual_seed(5)
    start = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).to(dtype) for shape in shapes] for _ in range(6)]
    grads[4][2] = torch.full(shapes[2], math.nan, dtype=dtype)
    calls = []
    batched = torch_galore.natural_gradients_with_grams
    monkeypatch.setattr(torch_galore, "natural_gradients_with_grams",
                        lambda g, *args, **kwargs: calls.append(len(g)) or batched(g, *args, **kwargs))
    runs = {}
    for backend in ("reference", "torch"):
        params = [torch.nn.Parameter(tensor.clone()) for tensor in start]
        optimizer = NaturalGaLore(params, lr=0.05, weight_decay=0.1, rank=3, update_proj_gap=3, natural_history=3,
                                  backend=backend)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
        runs[backend] = (params, optimizer)
    assert sorted(calls) == [2] * 6 + [3] * 6  # the two 6×8 and the three 8×6 weights, every step
    for index, (ours, theirs) in enumerate(zip(*(params for params, _ in runs.values()))):
        states = [runs[backend][1].state[param] for backend, param in (("reference", ours), ("torch", theirs))]
        assert states[0].keys() == states[1].keys()
        pairs = [("param", ours.detach(), theirs.detach())] + [(key, states[0][key], states[1][key]) for key in states[0]]
        for key, expected, actual in pairs:
            if not expected.is_floating_point():
                assert torch.equal(actual, expected), (index, key)
                continue
            assert torch.equal(actual.isnan(), expected.isnan()), (index, key)
            poisoned = index == 2 and key in ("param", "exp_avg", "exp_avg_sq", "nat_history")
            assert bool(actual.isnan().any()) == poisoned, (index, key)
            assert_close(actual.nan_to_num(), expected.nan_to_num(), what=f"weight {index} {key}")


@pytest.mark.parametrize("edit", ["history_row", "history_shifted", "count", "load_state_dict", "natural_history",
                                  "backend_switch", "none"])
def test_natural_galore_kept_gram_is_never_stale(monkeypatch, edit) -> None:
    """The torch backend keeps each weight's H·Hᵀ between steps and computes only the written
    row's products; whatever changes the history otherwise — an in-place write, an edited count,
    a loaded state_dict, an edited natural_history (the history rebuilt), steps on another
    backend — makes the next step compute it whole, and the trajectory stays the reference's."""
    from memzoo.optim import NaturalGaLore
    from memzoo.triton_kernels.torch_backend import galore as torch_galore
    from support import assert_close

    generator = torch.Generator().manual_seed(11)
    start = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    grads = [torch.randn(6, 8, generator=generator, dtype=torch.float64) for _ in range(8)]
    stale_calls = []
    with_grams = torch_galore.natural_gradients_with_grams
    monkeypatch.setattr(torch_galore, "natural_gradients_with_grams",
                        lambda g, h, grams, stale, **kwargs: stale_calls.append(stale[0]) or
                        with_grams(g, h, grams, stale, **kwargs))
    runs = {}
    for backend in ("reference", "torch"):
        param = torch.nn.Parameter(start.clone())
        optimizer = NaturalGaLore([param], lr=0.05, rank=3, update_proj_gap=100, natural_history=3, damping=1e-2,
                                  backend=backend)
        saved = None
        for step, grad in enumerate(grads):
            if step == 5:  # the history has wrapped around; the edit, on both backends alike
                state = optimizer.state[param]
                if edit == "history_row":
                    state["nat_history"][1].normal_(generator=torch.Generator().manual_seed(3))
                elif edit == "history_shifted":
                    state["nat_history"].add_(torch.linspace(-1.0, 2.0, 9, dtype=torch.float64))
                elif edit == "count":  # rows 0 and 1 now the history, row 1 rewritten (row 0's
                    state["nat_count"].fill_(1)  # products would still be right: only recomputed)
                elif edit == "load_state_dict":
                    optimizer.load_state_dict(saved)
                elif edit == "natural_history":
                    optimizer.param_groups[0]["natural_history"] = 4
            if edit == "backend_switch" and backend == "torch":
                optimizer.backend = "reference" if step in (3, 4) else "torch"
            param.grad = grad.clone()
            optimizer.step()
            if step == 1:
                saved = copy.deepcopy(optimizer.state_dict())
        runs[backend] = (param, optimizer.state[param])
    (expected, expected_state), (actual, actual_state) = runs.values()
    assert_close(actual.detach(), expected.detach(), what="param")
    assert torch.equal(actual_state["nat_count"], expected_state["nat_count"])
    for key in ("exp_avg", "exp_avg_sq", "nat_history"):
        assert_close(actual_state[key], expected_state[key], what=key)
    # The whole Gram at the first step and after each change the step did not make, else one
    # row (the torch steps' indices: with the backend switched, steps 3 and 4 are not theirs).
    whole = {"none": [0], "backend_switch": [0, 3]}.get(edit, [0, 5])
    assert [index for index, row in enumerate(stale_calls) if row is None] == whole, stale_calls


def _tensorly_signed(factor: torch.Tensor) -> torch.Tensor:
    """Each column with its largest-magnitude entry positive (the first on a tie): tensorly's
    svd_flip, which the official Tucker factors go through."""
    index = factor.abs().argmax(dim=0)
    return factor * factor[index, torch.arange(factor.shape[1])].sign()


def test_natural_galore_follows_the_official_algorithm_across_refreshes() -> None:
    """The official SubSpaceAdamW with its example's groups (proj_type="natural_galore"),
    written out in float64: on steps 0, 15, 30 (its iter, counted before the increment) the
    Tucker factors of G, i.e. its top-r left and right singular vectors U, V, each signed as
    tensorly signs them; R = UᵀGV; the last s projected gradients H (kept across refreshes);
    g̃ = (λI + HᵀH)⁻¹·vec(R); HF Adam on g̃ (ε added to √v, bias correction in the step size);
    W ← W − η_t·α·U·N·Vᵀ, then W ← W − lr·λ_w·W; unprojected parameters plain HF AdamW. Moments
    and history cross each refresh, so a basis whose signs flip leaves this trajectory at the
    second refresh (step 16)."""
    from memzoo.optim import NaturalGaLore

    rank, gap, history, damping, steps = 8, 15, 20, 1e-3, 40
    lr, betas, eps, weight_decay, scale = 0.01, (0.9, 0.999), 1e-6, 0.01, 0.25
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(24, 16, generator=generator, dtype=torch.float64)
    noises = [0.5 * torch.randn(24, 16, generator=generator, dtype=torch.float64) for _ in range(steps)]
    start, bias_start = torch.randn(24, 16, generator=generator, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    weight, bias = torch.nn.Parameter(start.clone()), torch.nn.Parameter(bias_start.clone())
    groups = [{"params": [bias]},  # the official example's, unchanged
              {"params": [weight], "rank": rank, "update_proj_gap": gap, "scale": scale,
               "proj_type": "natural_galore", "natural_history": history}]
    optimizer = NaturalGaLore(groups, lr=lr, weight_decay=weight_decay)

    w, b = start.clone(), bias_start.clone()
    m, v = torch.zeros(rank * rank, dtype=torch.float64), torch.zeros(rank * rank, dtype=torch.float64)
    mb, vb = torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    past: list[torch.Tensor] = []
    for t in range(1, steps + 1):
        grad, bias_grad = w - target + noises[t - 1], b - target.mean(0)
        weight.grad, bias.grad = grad.clone(), bias_grad.clone()
        optimizer.step()

        if (t - 1) % gap == 0:
            u_full, _, vh_full = torch.linalg.svd(grad, full_matrices=False)
            u, vt = _tensorly_signed(u_full[:, :rank]), _tensorly_signed(vh_full[:rank].T)
        g = (u.T @ grad @ vt).reshape(-1)
        past = (past + [g])[-history:]
        h = torch.stack(past)
        natural = torch.linalg.solve(damping * torch.eye(g.numel(), dtype=torch.float64) + h.T @ h, g)
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        m = betas[0] * m + (1 - betas[0]) * natural
        v = betas[1] * v + (1 - betas[1]) * natural**2
        w = w - step_size * scale * (u @ (m / (v.sqrt() + eps)).reshape(rank, rank) @ vt.T)
        w = w - lr * weight_decay * w
        mb = betas[0] * mb + (1 - betas[0]) * bias_grad
        vb = betas[1] * vb + (1 - betas[1]) * bias_grad**2
        b = b - step_size * mb / (vb.sqrt() + eps)
        b = b - lr * weight_decay * b
        torch.testing.assert_close(weight.detach(), w, rtol=1e-7, atol=1e-9, msg=lambda text: f"step {t}: {text}")
        torch.testing.assert_close(bias.detach(), b, rtol=1e-9, atol=1e-12)
    assert (w - start).norm() > 0.1  # it moved


def test_natural_galore_official_arguments() -> None:
    from memzoo.optim import NaturalGaLore

    weight = torch.nn.Parameter(torch.randn(6, 5))
    optimizer = NaturalGaLore([weight], 1e-3, (0.9, 0.999), 1e-6, 0.0, 7, False, rank=2, proj_type="natural_galore")
    group = optimizer.param_groups[0]
    assert (group["natural_history"], group["proj_type"], group["natural"], group["projector"]) == (7, "full", True, "svd")
    with pytest.raises(ValueError, match="amsgrad=True is not implemented"):
        NaturalGaLore([weight], amsgrad=True)
    with pytest.raises(ValueError, match="param group 0: proj_type 'online_galore' .* not implemented"):
        NaturalGaLore([{"params": [weight], "rank": 2, "proj_type": "online_galore"}])


def test_8bit_moments_follow_the_32bit_run_in_a_quarter_of_the_memory() -> None:
    start = torch.randn(256, 96, generator=torch.Generator().manual_seed(5))
    runs = {}
    for bits in (32, 8):
        param = torch.nn.Parameter(start.clone())
        optimizer = GaLoreAdamW([param], lr=1e-2, rank=32, projector="svd", update_proj_gap=5, optim_bits=bits)
        for grad in _grads((256, 96), 12, seed=6, dtype=torch.float32):
            param.grad = grad
            optimizer.step()
        moments = sum(v.nbytes for k, v in optimizer.state[param].items() if k.startswith("exp_avg"))
        runs[bits] = (param.detach() - start, moments, optimizer.state[param])
    (delta32, bytes32, _), (delta8, bytes8, state8) = runs[32], runs[8]
    assert state8["exp_avg"].dtype == torch.uint8 and state8["exp_avg_absmax"].shape == (32,)
    assert bytes8 == 2 * (256 * 32 + 4 * 32) and bytes32 == 2 * 256 * 32 * 4
    assert ((delta8 - delta32).norm() / delta32.norm()).item() < 0.05


def test_coordinates_projector_selects_one_side_and_refuses_full_at_construction() -> None:
    """RandK rows/columns (the shared projector's coordinates method) store only their indices;
    a two-sided request fails when the optimizer is built, not in the middle of a step."""
    weight = torch.nn.Parameter(torch.randn(12, 8))
    optimizer = GaLoreAdamW([weight], rank=3, projector="coordinates", backend="torch")
    weight.grad = torch.randn(12, 8)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["proj_indices"].shape == (3,) and "proj_right" not in state
    with pytest.raises(ValueError, match="coordinates projector selects rows or columns"):
        GaLoreAdamW([weight], rank=3, projector="coordinates", proj_type="full")


def test_galore_torch_positional_call_runs_unchanged() -> None:
    """galore_torch.GaLoreAdamW(params, lr, betas, eps, weight_decay, correct_bias,
    no_deprecation_warning) with its group keys."""
    weight = torch.nn.Parameter(torch.randn(6, 5))
    groups = [{"params": [weight], "rank": 2, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    optimizer = GaLoreAdamW(groups, 1e-3, (0.9, 0.999), 1e-6, 0.0, True, True)
    weight.grad = torch.randn(6, 5)
    optimizer.step()
    assert optimizer.state[weight]["exp_avg"].shape == (6, 2)
    with pytest.raises(TypeError, match="no_deprecation_warning"):
        GaLoreAdamW(groups, no_deprecation_warning="yes")


def test_natural_galore_signs_its_randomized_factors_and_galore_keeps_raw_svd_signs() -> None:
    """Natural GaLore's randomized factors follow the official sign convention too; GaLoreAdamW's
    SVD factors are torch.linalg.svd's, unsigned (galore-torch's)."""
    from memzoo.optim import NaturalGaLore

    grad = torch.randn(20, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    natural, plain = torch.nn.Parameter(torch.zeros(20, 12, dtype=torch.float64)), torch.nn.Parameter(
        torch.zeros(20, 12, dtype=torch.float64))
    natural_optimizer = NaturalGaLore([natural], rank=4, projector="randomized")
    plain_optimizer = GaLoreAdamW([plain], rank=4, projector="svd", proj_type="full")
    natural.grad, plain.grad = grad.clone(), grad.clone()
    natural_optimizer.step()
    plain_optimizer.step()
    left, right = natural_optimizer.state[natural]["proj_left"], natural_optimizer.state[natural]["proj_right"]
    torch.testing.assert_close(left, _tensorly_signed(left), rtol=0, atol=0)
    torch.testing.assert_close(right.T, _tensorly_signed(right.T), rtol=0, atol=0)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    torch.testing.assert_close(plain_optimizer.state[plain]["proj_left"], u[:, :4])
    torch.testing.assert_close(plain_optimizer.state[plain]["proj_right"], vh[:4])
