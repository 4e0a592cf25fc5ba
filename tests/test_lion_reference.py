"""The Lion reference against hand-derived values and the algorithm's invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import log_uniform, shapes

from memzoo.reference.lion import lion_update_


def test_hand_derived_step() -> None:
    # lr 0.1, λ 0.5 → decay 0.95; c = 0.9·m + 0.1·g; m' = 0.99·m + 0.01·g.
    param = torch.tensor([1.0, -2.0, 0.5, 3.0, 2.0], dtype=torch.float64)
    grad = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    exp_avg = torch.tensor([0.0, 1.0, -1.0, -10.0, 0.0], dtype=torch.float64)
    lion_update_([param], [grad], [exp_avg], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.5)
    # c = [0.05, 0.8, -0.9, -8.8, 0] → signs [+, +, −, −, 0]; W·0.95 − 0.1·sign(c)
    torch.testing.assert_close(param, torch.tensor([0.85, -2.0, 0.575, 2.95, 1.9], dtype=torch.float64))
    torch.testing.assert_close(exp_avg, torch.tensor([0.005, 0.98, -0.99, -9.88, 0.0], dtype=torch.float64))


def test_maximize_equals_negated_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    p1, g, m1 = (torch.randn(50, generator=generator, dtype=torch.float64) for _ in range(3))
    p2, m2 = p1.clone(), m1.clone()
    lion_update_(p1, g, m1, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=True)
    lion_update_(p2, -g, m2, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
    assert torch.equal(p1, p2) and torch.equal(m1, m2)


@given(shape=shapes(), lr=log_uniform(1e-6, 1.0), beta1=st.floats(0, 0.999), beta2=st.floats(0, 0.999),
       seed=st.integers(0, 2**31 - 1))
def test_every_element_moves_by_lr_or_zero(shape, lr, beta1, beta2, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    param, grad, exp_avg = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    grad.view(-1)[::3] = 0.0  # some c = 0 when the momentum is zero too
    exp_avg.view(-1)[::3] = 0.0
    before, momentum_before = param.clone(), exp_avg.clone()
    lion_update_(param, grad, exp_avg, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0)
    step = (param - before).abs()
    c = beta1 * momentum_before + (1 - beta1) * grad
    expected_step = torch.where(c == 0, torch.zeros_like(c), torch.full_like(c, lr))
    torch.testing.assert_close(step, expected_step, rtol=0, atol=1e-12)
    # Descent direction: each moving element moves against sign(c).
    assert bool(((param - before) * c <= 0).all())
    torch.testing.assert_close(exp_avg, beta2 * momentum_before + (1 - beta2) * grad, rtol=1e-14, atol=1e-14)


@given(lr=log_uniform(1e-6, 1.0), weight_decay=st.floats(0, 10), seed=st.integers(0, 2**31 - 1))
def test_decoupled_weight_decay(lr, weight_decay, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    param, grad, exp_avg = (torch.randn(64, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = param * (1 - lr * weight_decay) - lr * torch.sign(0.9 * exp_avg + 0.1 * grad)
    lion_update_(param, grad, exp_avg, lr=lr, beta1=0.9, beta2=0.99, weight_decay=weight_decay)
    torch.testing.assert_close(param, expected, rtol=1e-13, atol=1e-13)


def test_zero_betas_is_sign_sgd() -> None:
    generator = torch.Generator().manual_seed(1)
    param, grad = torch.randn(100, generator=generator), torch.randn(100, generator=generator)
    expected = param - 0.01 * torch.sign(grad)
    exp_avg = torch.randn(100, generator=generator)
    lion_update_(param, grad, exp_avg, lr=0.01, beta1=0.0, beta2=0.0, weight_decay=0.0)
    assert torch.equal(param, expected)
    assert torch.equal(exp_avg, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_once_from_fp32(dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    param32, grad32, exp32 = (torch.randn(1000, generator=generator) for _ in range(3))
    param, grad, exp_avg = param32.to(dtype), grad32.to(dtype), exp32.to(dtype)
    p_ref, m_ref = param.float(), exp_avg.float()
    lion_update_(p_ref, grad.float(), m_ref, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    lion_update_(param, grad, exp_avg, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    assert torch.equal(param, p_ref.to(dtype)) and torch.equal(exp_avg, m_ref.to(dtype))


def test_mismatched_shapes_and_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        lion_update_([torch.zeros(3)], [torch.zeros(4)], [torch.zeros(3)], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0)
    with pytest.raises(ValueError, match="length"):
        lion_update_([torch.zeros(3)], [], [torch.zeros(3)], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0)
