"""COSMOS: Newton–Schulz, the subspace tracking, and its two reductions (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from memzoo.optim import COSMOS
from memzoo.reference.cosmos import cosmos_basis_init, cosmos_basis_update, cosmos_update_, newton_schulz5
from memzoo.triton_kernels.torch_backend import cosmos as torch_cosmos


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 5), (1, 7)])
def test_newton_schulz_approximates_the_polar_factor(shape) -> None:
    matrix = _random(shape, 0)
    result = newton_schulz5(matrix, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    # The quintic's fixed coefficients leave singular values in a band around 1 (Muon's design),
    # with the singular vectors of the input.
    values = torch.linalg.svdvals(result)
    assert values.min() > 0.6 and values.max() < 1.25
    aligned = u.T @ result @ vh.T
    assert torch.allclose(aligned, torch.diag(torch.diagonal(aligned)), atol=1e-6)
    assert (torch.diagonal(aligned) > 0.6).all()
    assert torch.allclose(newton_schulz5(matrix.T, dtype=torch.float64), result.T, atol=1e-12)
    assert torch.equal(newton_schulz5(torch.zeros(shape, dtype=torch.float64), dtype=torch.float64),
                       torch.zeros(shape, dtype=torch.float64))


def test_newton_schulz_in_bf16_stays_close_to_float64() -> None:
    matrix = _random((32, 48), 1)
    low = newton_schulz5(matrix).double()
    high = newton_schulz5(matrix, dtype=torch.float64)
    assert ((low - high).norm() / high.norm()).item() < 0.05


def test_basis_init_takes_the_leading_eigenvectors() -> None:
    grad = _random((12, 8), 2)
    basis, subspace = cosmos_basis_init(grad, 3, beta2=0.9)
    _, _, vh = torch.linalg.svd(grad)
    assert torch.allclose(basis @ basis.T, vh[:3].T @ vh[:3], atol=1e-10)  # the same subspace
    projected = grad @ basis
    assert torch.allclose(subspace, 0.1 * projected.T @ projected, atol=1e-12)


def test_basis_update_tracks_the_subspace_of_a_steady_gradient() -> None:
    left, _ = torch.linalg.qr(_random((12, 8), 3))
    right, _ = torch.linalg.qr(_random((8, 8), 5))
    grad = left @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 1.0, 0.8, 0.5, 0.2, 0.1], dtype=torch.float64)) @ right.T
    basis, subspace = cosmos_basis_init(_random((12, 8), 4), 3, beta2=0.9)  # start elsewhere
    for _ in range(200):
        basis, subspace = cosmos_basis_update(grad, basis, subspace, beta2=0.9)
        assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-10)
    _, _, vh = torch.linalg.svd(grad)
    assert torch.allclose(basis @ basis.T, vh[:3].T @ vh[:3], atol=1e-6)
    # S is then the EMA of Uᵀ GᵀG U = UᵀGᵀGU itself.
    assert torch.allclose(subspace, basis.T @ grad.T @ grad @ basis, rtol=1e-6)


def _hparams(**overrides):
    return {"lr": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "gamma": 0.2, "lr_ratio": 0.5,
            "weight_decay": 0.1, "ns_dtype": torch.float64, **overrides}


def _state(m, n, rank, seed):
    return (_random((m, n), seed), _random((m, n), seed + 1), _random((m, n), seed + 2) * 0.1,
            _random((m, rank), seed + 3).abs() * 0.01)


def test_full_rank_with_a_frozen_basis_is_soap() -> None:
    """r = n and a fixed orthogonal basis: Adam on the rotated gradient G·U (Nesterov mix as
    COSMOS's, second moment of G·U), rotated back and normalized — SOAP's one-sided update; the
    Muon part is empty (no complement), so γ changes nothing."""
    m, n, step = 7, 5, 3
    basis, _ = torch.linalg.qr(_random((n, n), 10))
    results = []
    for gamma in (0.2, 5.0):
        param, grad, exp_avg, exp_avg_sq = _state(m, n, n, 11)
        w0, m0, v0 = param.clone(), exp_avg.clone(), exp_avg_sq.clone()
        cosmos_update_(param, grad, exp_avg, exp_avg_sq, basis, step=step, **_hparams(gamma=gamma))
        results.append(param)
    assert torch.equal(results[0], results[1])
    h = _hparams()
    rotated_grad, rotated_momentum = grad @ basis, (h["beta1"] * m0 + grad) @ basis
    second = h["beta2"] * v0 + (1 - h["beta2"]) * rotated_grad**2
    bias1 = (1 - h["beta1"] ** step) / (1 - h["beta1"])
    nesterov = (rotated_grad + h["beta1"] * rotated_momentum) / (1 + h["beta1"] * bias1)
    adam = nesterov / (second.sqrt() / math.sqrt(1 - h["beta2"] ** step) + h["eps"])
    direction = adam @ basis.T
    expected = w0 * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * h["lr_ratio"] * math.sqrt(m * n) * direction / (
        direction.norm() + h["eps"])
    assert torch.allclose(results[0], expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(exp_avg_sq, second, rtol=1e-12)


def test_rank_zero_is_muon() -> None:
    """r = 0: no subspace, D = γ·B, so the step is Muon's: NS5 of the Nesterov momentum,
    scaled to RMS lr·ρ (whatever γ > 0)."""
    m, n, step = 6, 9, 4
    h = _hparams()
    param, grad, exp_avg, exp_avg_sq = _state(m, n, 0, 20)
    w0, m0 = param.clone(), exp_avg.clone()
    cosmos_update_(param, grad, exp_avg, exp_avg_sq, torch.zeros(n, 0, dtype=torch.float64), step=step, **h)
    momentum = h["beta1"] * m0 + grad
    bias1 = (1 - h["beta1"] ** step) / (1 - h["beta1"])
    orthogonal = newton_schulz5((grad + h["beta1"] * momentum) / (1 + h["beta1"] * bias1), dtype=torch.float64)
    expected = w0 * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * h["lr_ratio"] * math.sqrt(m * n) * orthogonal / (
        orthogonal.norm())
    assert torch.allclose(param, expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(exp_avg, momentum)
    update = param - w0 * (1 - h["lr"] * h["weight_decay"])
    assert update.square().mean().sqrt().item() == pytest.approx(h["lr"] * h["lr_ratio"], rel=1e-6)


def test_rank_none_is_torch_adamw() -> None:
    """The Adam branch with the group's β1 (the official code hard-codes 0.9) is torch's AdamW."""
    params = [_random((5, 4), 30).requires_grad_(), _random((3,), 31).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = COSMOS(params, lr=0.01, betas=(0.95, 0.98), rank=None, weight_decay=0.1, backend="torch")
    theirs = torch.optim.AdamW(twins, lr=0.01, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        for p, q in zip(params, twins):
            p.grad = _random(p.shape, 40 + step)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_vocabulary_sized_matrices_and_vectors_take_the_adam_branch() -> None:
    embedding = torch.nn.Parameter(torch.randn(30, 4))
    hidden = torch.nn.Parameter(torch.randn(8, 4))
    norm = torch.nn.Parameter(torch.ones(4))
    optimizer = COSMOS([embedding, hidden, norm], rank=2, max_rows=20, backend="torch")
    for p in (embedding, hidden, norm):
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.state[embedding]["exp_avg_sq"].shape == (30, 4) and "basis" not in optimizer.state[embedding]
    assert optimizer.state[norm]["exp_avg_sq"].shape == (4,)
    assert optimizer.state[hidden]["exp_avg_sq"].shape == (8, 2) and optimizer.state[hidden]["basis"].shape == (4, 2)


def test_cosmos_lowers_the_loss_of_a_small_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.sin(x @ torch.randn(16, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = COSMOS(model.parameters(), lr=0.01, rank=4, lr_ratio=1.0, backend="torch")
    loss = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    initial = loss().item()
    for _ in range(100):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.3 * initial


def test_orthogonalize_rejects_bad_arguments() -> None:
    from memzoo.triton_kernels import load_family

    for module in (pytest.importorskip("memzoo.reference.cosmos"), load_family("cosmos")):
        matrix = torch.randn(3, 4)
        with pytest.raises(ValueError, match="takes matrices"):
            module.orthogonalize_([torch.randn(3)], [torch.empty(3)])
        with pytest.raises(ValueError, match="outputs\\[0\\] has shape"):
            module.orthogonalize_([matrix], [torch.empty(4, 3)])
        with pytest.raises(TypeError, match="float16"):
            module.orthogonalize_([matrix], [torch.empty(3, 4, dtype=torch.float16)])
        with pytest.raises(ValueError, match="steps"):
            module.orthogonalize_([matrix], [torch.empty(3, 4)], steps=-1)


def test_reference_rejects_mismatched_state() -> None:
    param, grad, exp_avg, exp_avg_sq = _state(4, 3, 2, 50)
    before = param.clone()
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        cosmos_update_(param, grad, exp_avg, exp_avg_sq[:, :1], torch.zeros(3, 2, dtype=torch.float64), step=1,
                       **_hparams())
    assert torch.equal(param, before)


def test_optimizer_step_is_the_backend_step_per_weight() -> None:
    """The optimizer batches Newton–Schulz over weights of one shape; each weight's result is
    still its backend's cosmos_update_ for that weight alone (bit for bit), and the torch
    backend's stays within float64 rounding of the reference's."""
    hyper = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, lr_ratio=0.5, gamma=0.2, weight_decay=0.1)
    params = [torch.nn.Parameter(_random((6, 5), 60 + i) * (1 + 10 * i)) for i in range(3)]
    twins = [p.detach().clone() for p in params]
    references = [p.detach().clone() for p in params]
    optimizer = COSMOS(params, rank=2, ns_dtype=torch.float64, backend="torch", **hyper)
    states = [(torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, 2, dtype=torch.float64)) for _ in range(6)]
    bases = [None] * 3
    for step in range(1, 4):
        for i, (param, twin, reference) in enumerate(zip(params, twins, references)):
            param.grad = _random((6, 5), 100 * step + i) * (1 + 10 * i)
            if step == 1:
                bases[i] = cosmos_basis_init(param.grad, 2, beta2=0.95)
            else:
                bases[i] = cosmos_basis_update(param.grad, *bases[i], beta2=0.95)
            for update, weight, state in ((torch_cosmos.cosmos_update_, twin, states[i]),
                                          (cosmos_update_, reference, states[3 + i])):
                update(weight, param.grad, *state, bases[i][0], step=step, lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8,
                       gamma=0.2, lr_ratio=0.5, weight_decay=0.1, ns_dtype=torch.float64)
        optimizer.step()
    for param, twin, reference in zip(params, twins, references):
        assert torch.equal(param.detach(), twin)
        torch.testing.assert_close(twin, reference, rtol=1e-12, atol=1e-12)


def _official_newton_schulz5(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The official zeropower_via_newtonschulz5, written out (in the input's dtype, not bf16)."""
    x = matrix / (matrix.norm() + eps)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        b = a @ x
        x = 3.4445 * x - 4.7750 * b + 2.0315 * a @ b
    return x.T if tall else x


def _official_cosmos_run(start, grads, *, lr, betas, eps, lr_ratio, rank, weight_decay, gamma=0.2):
    """COSMOS_optim.py (lliu606/COSMOS at 61de180, nestrov=True) on one eligible m×n weight,
    written out step by step: the trajectory of the weight."""
    beta1, beta2 = betas
    weight = start.clone()
    m, n = weight.shape
    momentum, second = torch.zeros_like(weight), torch.zeros(m, rank, dtype=weight.dtype)
    trajectory = []
    for step, grad in enumerate(grads, start=1):
        momentum = beta1 * momentum + grad
        b1 = (1 - beta1**step) / (1 - beta1)
        b2 = 1 - beta2**step
        if step == 1:
            basis = torch.linalg.svd(grad.T @ grad)[0][:, :rank]
            subspace = (1 - beta2) * (grad @ basis).T @ (grad @ basis)
        else:
            previous = basis
            basis = torch.linalg.qr(beta2 * basis @ subspace + (1 - beta2) * grad.T @ (grad @ basis)).Q
            turn = previous.T @ basis
            subspace = beta2 * turn.T @ subspace @ turn + (1 - beta2) * (grad @ basis).T @ (grad @ basis)
        low_rank = grad @ basis
        second = beta2 * second + (1 - beta2) * low_rank * low_rank
        mixed = (grad + beta1 * momentum) / (1 + beta1 * b1)
        projected = mixed @ basis
        soap = (projected / (second.sqrt() / math.sqrt(b2) + eps)) @ basis.T
        muon = _official_newton_schulz5(mixed - projected @ basis.T)
        scale = math.sqrt(m * n)
        direction = soap + gamma * scale * muon / (muon.norm() + eps)
        weight = weight * (1 - lr * weight_decay)
        weight = weight - scale * lr_ratio * lr * direction / (direction.norm() + eps)
        trajectory.append(weight)
    return trajectory


@pytest.mark.parametrize("shape", [(8, 12), (12, 7)])
def test_follows_the_official_update_written_out_across_basis_updates(shape) -> None:
    """The official README settings (lr 2e-3, betas (0.95, 0.95), nestrov=True, weight_decay 0.1,
    lr_ratio 0.2), rank 3: every step — the exact basis at step 1, then 4 power-iteration + QR
    basis updates — against the official step written out, in float64 with Newton–Schulz in
    float64 (the official code runs it in bf16: ns_dtype=torch.bfloat16, our default)."""
    settings = dict(lr=2e-3, betas=(0.95, 0.95), weight_decay=0.1, lr_ratio=0.2)
    start = _random(shape, 70)
    grads = [_random(shape, 71 + t) * (1 + 0.3 * t) for t in range(5)]
    expected = _official_cosmos_run(start, grads, eps=1e-8, rank=3, **settings)
    weight = torch.nn.Parameter(start.clone())
    optimizer = COSMOS([weight], nestrov=True, rank=3, ns_dtype=torch.float64, backend="torch", **settings)
    for grad, official in zip(grads, expected):
        weight.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(weight.detach(), official, rtol=1e-10, atol=1e-12)


def test_official_readme_call_and_signature_build_unchanged() -> None:
    """The official README's call, positional arguments in the official order, both spellings
    of nesterov; what is not implemented is refused with the reason, nothing modified."""
    weight = torch.nn.Parameter(_random((6, 5), 80))
    before = weight.detach().clone()
    readme = COSMOS([weight], lr=2e-3, betas=(0.95, 0.95), nestrov=True, weight_decay=0.1, lr_ratio=0.2)
    positional = COSMOS([weight], 1e-3, (0.9, 0.999), 1e-8, 0.1, 64, 0, 0.2, True, False)
    for optimizer in (readme, positional, COSMOS([weight], nesterov=True, amsgrad=False)):
        group = optimizer.param_groups[0]
        assert group["nesterov"] is True and group["amsgrad"] is False
    assert (readme.param_groups[0]["lr_ratio"], positional.param_groups[0]["rank"]) == (0.2, 64)
    with pytest.raises(ValueError, match="nesterov=False is not implemented.*never reads the momentum"):
        COSMOS([weight], nestrov=False)
    with pytest.raises(ValueError, match="amsgrad=True is not implemented"):
        COSMOS([weight], amsgrad=True)
    with pytest.raises(ValueError, match="param group 0: amsgrad=True"):
        COSMOS([{"params": [weight], "amsgrad": True}])
    with pytest.raises(ValueError, match="disagree"):
        COSMOS([weight], nesterov=True, nestrov=False)
    assert torch.equal(weight, before)


def test_torch_orthogonalize_shares_buffers_and_rounds_as_the_reference() -> None:
    """The torch twin runs Newton–Schulz in place in work buffers shared by the matrices of one
    shape: in one call, same-shaped matrices of very different scales, a tall one (iterated on a
    transposed view) and an empty one come out bit for bit as the reference's, in bf16 and fp32.
    Negative control: the same check tells apart an iteration that rounds differently (Muon's
    X ← a·X + (b·A + c·A²)·X, the same polynomial), so equality here is not vacuous."""
    from memzoo.reference.cosmos import NS_COEFFICIENTS, frobenius_normalize, orthogonalize_

    generator = torch.Generator().manual_seed(5)
    shapes = [(12, 9), (12, 9), (9, 12), (12, 9), (0, 4)]
    matrices = [torch.randn(shape, generator=generator) * scale for shape, scale in zip(shapes, (1e-3, 1, 1, 1e4, 1))]
    for dtype in (torch.bfloat16, torch.float32):
        expected = [torch.empty(shape, dtype=dtype) for shape in shapes]
        actual = [torch.full(shape, float("nan"), dtype=dtype) for shape in shapes]
        orthogonalize_(matrices, expected)
        torch_cosmos.orthogonalize_(matrices, actual)
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), dtype
        if dtype == torch.bfloat16:
            bf16_expected = expected
    a, b, c = NS_COEFFICIENTS
    x = frobenius_normalize(matrices[0].bfloat16(), eps=1e-7).T  # 12×9: iterated as 9×12
    for _ in range(5):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    assert not torch.equal(x.T, bf16_expected[0])
    torch.testing.assert_close(x.T, bf16_expected[0], rtol=0, atol=0.05)  # the same polynomial, otherwise

