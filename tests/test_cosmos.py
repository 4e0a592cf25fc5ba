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


def test_torch_step_given_the_same_orthogonalization_is_the_reference_step(monkeypatch) -> None:
    """Stage by stage in float32 (the torch path's Newton–Schulz rounds differently by design,
    see test_torch_orthogonalize_is_at_least_as_accurate_as_the_reference): the optimizer's
    residuals are the reference's within float32 rounding, and given the reference's O for
    them, its weights and states after each of 3 steps (same-shaped, tall and wide weights,
    weights of different scales) are the reference step's within float32 rounding."""
    from memzoo.reference.cosmos import cosmos_apply_, cosmos_directions_, orthogonalize_
    from support import assert_close

    hyper = dict(lr=0.01, eps=1e-8, lr_ratio=0.5, gamma=0.2, weight_decay=0.1)
    shapes = [(6, 5), (6, 5), (5, 7), (8, 3)]
    params = [torch.nn.Parameter(_random(shape, 90 + i).float() * (1 + 10 * i)) for i, shape in enumerate(shapes)]
    references = [p.detach().clone() for p in params]
    optimizer = COSMOS(params, rank=2, betas=(0.9, 0.95), ns_dtype=torch.float32, backend="torch", **hyper)
    states = [(torch.zeros(shape), torch.zeros(shape[0], 2)) for shape in shapes]
    bases = [None] * len(shapes)
    for step in range(1, 4):
        residuals, orthogonals = [], []
        for i, (param, reference) in enumerate(zip(params, references)):
            param.grad = _random(param.shape, 100 * step + i).float() * (1 + 10 * i)
            bases[i] = (cosmos_basis_init(param.grad, 2, beta2=0.95) if step == 1
                        else cosmos_basis_update(param.grad, *bases[i], beta2=0.95))
            residual = torch.empty(param.shape)
            low_rank = cosmos_directions_(reference, param.grad, *states[i], bases[i][0], residual, step=step,
                                          beta1=0.9, beta2=0.95, eps=1e-8)
            orthogonal = torch.empty_like(residual)
            orthogonalize_([residual], [orthogonal])
            cosmos_apply_(reference, low_rank, bases[i][0], orthogonal, **hyper)
            residuals.append(residual)
            orthogonals.append(orthogonal)

        # Ĝ − Ĝ·U·Uᵀ cancels: its rounding is that of Ĝ's n-term products, |Ĝ| ≤ |G| + |M|.
        scales = [param.shape[1] * 2.0**-24 * (param.grad.abs().max() + momentum.abs().max())
                  for param, (momentum, _) in zip(params, states)]

        def inject(matrices, outputs, *, expected=residuals, given=orthogonals, scales=scales):
            assert len(matrices) == len(expected)
            for matrix, output, residual, orthogonal, scale in zip(matrices, outputs, expected, given, scales):
                assert_close(matrix, residual, scale, what="residual")
                output.copy_(orthogonal)

        monkeypatch.setattr(torch_cosmos, "orthogonalize_", inject)
        optimizer.step()
        for param, reference, (momentum, second) in zip(params, references, states):
            assert_close(param.detach(), reference, what=f"weight at step {step}")
            assert_close(optimizer.state[param]["exp_avg"], momentum, what="exp_avg")
            assert_close(optimizer.state[param]["exp_avg_sq"], second, what="exp_avg_sq")


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


def _conditioned(m, n, rank, scale, generator):
    """An m×n float32 matrix with singular values 1 … 0.05 (log-spaced) times ``scale``, the
    last min(m, n) − ``rank`` of them zero, in random singular bases; and an orthonormal basis
    of its column space (float64)."""
    k = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, -1.3, k, dtype=torch.float64)
    values[rank:] = 0
    return ((left * values) @ right.T * scale).float(), left[:, :rank]


# (m, n, rank, scale): tall, wide and square, full rank and rank-deficient, 1e-3 … 1e4; two of
# one shape share the work buffers of one call.
_NS_CASES = [(12, 9, 9, 1e-3), (12, 9, 9, 1.0), (9, 12, 9, 1e4), (64, 64, 64, 1.0), (32, 96, 32, 10.0),
             (96, 32, 32, 0.1), (12, 9, 5, 1.0), (9, 12, 3, 1.0), (64, 64, 40, 1.0), (96, 32, 20, 3.0)]


def _assert_orthogonalize_accuracy(orthogonalize, dtype) -> None:
    """``orthogonalize`` (the torch twin's form: each of the 3 products of an iteration rounded
    once) against the float64 iteration of the same ``dtype`` input, per matrix of _NS_CASES:

    - in the input's column space (where the iteration converges; a rank-deficient input's
      null directions only carry rounding, grown by the quintic's slope a ≈ 3.44 per iteration
      to O(1)): relative Frobenius error ≤ 5 iterations × 3 products × (u + k·2⁻²⁴), u the
      dtype's unit roundoff and k·2⁻²⁴ the float32 accumulation over the longest inner
      dimension k (each product a relative perturbation of at most that; the iteration does
      not amplify them in the band [0.7, 1.2] its singular values reach);
    - in bf16 (where the output rounding dominates; in fp32 both are at the accumulation's
      noise), everywhere and in the column space: no farther from float64 than the
      reference's own result (which rounds after every operation)."""
    from memzoo.reference.cosmos import orthogonalize_

    unit = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    generator = torch.Generator().manual_seed(5)
    made = [_conditioned(m, n, rank, scale, generator) for m, n, rank, scale in _NS_CASES]
    matrices = [matrix for matrix, _ in made] + [torch.zeros(0, 4)]
    actual = [torch.full(matrix.shape, float("nan"), dtype=dtype) for matrix in matrices]
    expected = [torch.empty(matrix.shape, dtype=dtype) for matrix in matrices]
    orthogonalize(matrices, actual)
    orthogonalize_(matrices, expected)
    assert actual[-1].shape == (0, 4)
    for (matrix, columns), ours, theirs, case in zip(made, actual, expected, _NS_CASES):
        exact = newton_schulz5(matrix.to(dtype).double(), dtype=torch.float64)
        ours_error, theirs_error = ours.double() - exact, theirs.double() - exact
        on_range = columns @ (columns.T @ ours_error)
        bound = 15 * (unit + max(matrix.shape) * 2.0**-24) * exact.norm()
        assert on_range.norm() <= bound, (case, dtype, (on_range.norm() / exact.norm()).item())
        if dtype == torch.bfloat16:
            assert on_range.norm() <= (columns @ (columns.T @ theirs_error)).norm(), case
            assert ours_error.norm() <= theirs_error.norm(), case


def test_torch_orthogonalize_is_at_least_as_accurate_as_the_reference(monkeypatch) -> None:
    """The torch twin's Newton–Schulz (Muon's association, one rounding per product, work buffers
    shared by the matrices of one shape) is within its rounding bound of the float64 iteration
    and no farther from it than the reference, in bf16 and fp32; the same when it writes over
    its inputs (as the optimizer calls it). Negative controls: one iteration fewer, or a wrong
    coefficient (2.315 for 2.0315), fails the check."""
    for dtype in (torch.bfloat16, torch.float32):
        _assert_orthogonalize_accuracy(torch_cosmos.orthogonalize_, dtype)
    inputs = [_random((12, 9), 6).bfloat16(), _random((12, 9), 7).bfloat16(), _random((9, 12), 8).bfloat16()]
    separate = [torch.empty_like(matrix) for matrix in inputs]
    torch_cosmos.orthogonalize_(inputs, separate)
    torch_cosmos.orthogonalize_(inputs, inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, separate))

    def one_fewer(matrices, outputs):
        torch_cosmos.orthogonalize_(matrices, outputs, steps=4)

    with pytest.raises(AssertionError):
        _assert_orthogonalize_accuracy(one_fewer, torch.bfloat16)
    a, b, _ = torch_cosmos.NS_COEFFICIENTS
    monkeypatch.setattr(torch_cosmos, "NS_COEFFICIENTS", (a, b, 2.315))
    with pytest.raises(AssertionError):
        _assert_orthogonalize_accuracy(torch_cosmos.orthogonalize_, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_directions_given_the_projection_of_their_basis_are_the_same_bits(backend) -> None:
    """``projected`` (G·U, from the basis update) only saves the product: given G·U of this
    basis the directions are bit for bit those that form it (maximize too: only its square is
    used); given another basis's, V differs."""
    from memzoo.reference import cosmos as reference

    module = reference if backend == "reference" else torch_cosmos
    param, grad = _random((7, 5), 200).float(), _random((7, 5), 201).float() * 1e3
    basis = torch.linalg.qr(_random((5, 2), 202)).Q.float()
    other = torch.linalg.qr(_random((5, 2), 203)).Q.float()
    for maximize in (False, True):
        outcomes = []
        for projected in (None, grad @ basis, grad @ other):
            momentum, second = _random((7, 5), 204).float(), _random((7, 2), 205).float().abs()
            residual = torch.empty(7, 5)
            low_rank = module.cosmos_directions_(param, grad, momentum, second, basis, residual, step=3, beta1=0.9,
                                                 beta2=0.95, eps=1e-8, maximize=maximize, projected=projected)
            outcomes.append((low_rank, momentum, second, residual))
        for formed, given in zip(outcomes[0], outcomes[1]):
            assert torch.equal(formed, given)
        assert not torch.equal(outcomes[0][2], outcomes[2][2])


@pytest.mark.parametrize("magnitude", [1.0, 1e-30, 1e30])
def test_basis_update_writes_the_projection_on_the_new_basis(magnitude) -> None:
    """``projection_out`` is G·U' for the basis returned (not the previous one), at G's own scale
    (the update works on G·s, s a power of two; the division by s is exact)."""
    grad = _random((9, 6), 210).float() * magnitude
    basis, subspace = cosmos_basis_init(_random((9, 6), 211).float(), 3, beta2=0.95)
    projection = torch.full((9, 3), float("nan"))
    new_basis, new_subspace = cosmos_basis_update(grad, basis, subspace, beta2=0.95, projection_out=projection)
    expected_basis, expected_subspace = cosmos_basis_update(grad, basis, subspace, beta2=0.95)
    assert torch.equal(new_basis, expected_basis) and torch.equal(new_subspace, expected_subspace)
    exact = grad.double() @ new_basis.double()
    torch.testing.assert_close(projection.double(), exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    assert not torch.allclose(projection, grad @ basis, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="projection_out"):
        cosmos_basis_update(grad, basis, subspace, beta2=0.95, projection_out=torch.empty(9, 2))


def test_a_rejected_new_basis_does_not_hand_over_its_projection(monkeypatch) -> None:
    """When the guard keeps the previous basis (here: a basis update that returns a non-finite
    basis for a finite G), the directions use G·U of the kept basis, not the product that the
    rejected update formed: the step is the per-weight step with the previous basis."""
    hyper = dict(lr=0.01, eps=1e-8, lr_ratio=0.5, gamma=0.2, weight_decay=0.1)
    params = [torch.nn.Parameter(_random((6, 5), 220 + i)) for i in range(2)]
    twins = [p.detach().clone() for p in params]
    optimizer = COSMOS(params, rank=2, betas=(0.9, 0.95), ns_dtype=torch.float64, backend="torch", **hyper)
    states = [(torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, 2, dtype=torch.float64)) for _ in params]
    real_update = torch_cosmos.cosmos_basis_update
    calls = []

    def rejected_for_the_first(grad, basis, subspace, **kwargs):
        new_basis, new_subspace = real_update(grad, basis, subspace, **kwargs)
        calls.append(kwargs.get("projection_out") is not None)
        if len(calls) % 2 == 1:  # the first weight's: non-finite, so the guard keeps the old one
            return torch.full_like(new_basis, float("nan")), new_subspace
        return new_basis, new_subspace

    monkeypatch.setattr(torch_cosmos, "cosmos_basis_update", rejected_for_the_first)
    bases = [None, None]
    for step in (1, 2):
        for i, (param, twin) in enumerate(zip(params, twins)):
            param.grad = _random((6, 5), 230 + 10 * step + i)
            if step == 1:
                bases[i] = cosmos_basis_init(param.grad, 2, beta2=0.95)
            elif i == 1:
                bases[i] = real_update(param.grad, *bases[i], beta2=0.95)
            torch_cosmos.cosmos_update_(twin, param.grad, *states[i], bases[i][0], step=step, beta1=0.9, beta2=0.95,
                                        ns_dtype=torch.float64, **hyper)
        optimizer.step()
    assert calls == [True, True]  # the projection was formed, so the guard had one to withhold
    for param, twin, (momentum, second) in zip(params, twins, states):
        assert torch.equal(param.detach(), twin)
        assert torch.equal(optimizer.state[param]["exp_avg_sq"], second)


@pytest.mark.parametrize("exponent", [-40, -10, 0, 80])
def test_torch_orthogonalize_normalizes_any_finite_scale(exponent) -> None:
    """The torch path's ‖X‖ is summed in float32 on a CPU only where that cannot overflow or
    underflow (else in float64): at every scale its Newton–Schulz is the reference's."""
    from memzoo.reference.cosmos import orthogonalize_

    matrix = (_random((12, 7), 240) * 2.0**exponent).float()
    expected, actual = torch.empty(12, 7), torch.empty(12, 7)
    orthogonalize_([matrix], [expected])
    torch_cosmos.orthogonalize_([matrix], [actual])
    assert expected.abs().max() > 0.1 or exponent < -30  # (tiny: eps dominates ‖X‖ + eps in both)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5)
