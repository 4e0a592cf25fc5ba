"""Layer-wise updates: the ordinary step's parameters, gradients freed in backward, clear errors."""

from __future__ import annotations

import pytest
import torch

from memzoo.optim import APOLLO, COSMOS, FRUGAL, GaLoreAdamW, Lion, MeZO
from memzoo.optim.layerwise import LayerwiseOptimizer

CASES = [
    (Lion, {"lr": 1e-3, "weight_decay": 0.1}),
    (GaLoreAdamW, {"lr": 1e-2, "rank": 2, "update_proj_gap": 2, "weight_decay": 0.1}),
    (GaLoreAdamW, {"lr": 1e-2, "rank": 2, "update_proj_gap": 2, "projector": "random", "seed": 3}),
    (APOLLO, {"lr": 1e-2, "rank": 2, "update_proj_gap": 2}),
    (FRUGAL, {"lr": 1e-2, "density": 0.5, "update_proj_gap": 2, "projector": "coordinates"}),
    (COSMOS, {"lr": 1e-2, "rank": 2}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6), torch.nn.LayerNorm(6),
                               torch.nn.Linear(6, 1))


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_layerwise_steps_equal_the_ordinary_steps(cls, kwargs) -> None:
    ordinary_model, layerwise_model = _model(), _model()
    backend = {} if cls is torch.optim.AdamW else {"backend": "torch"}
    ordinary = cls(ordinary_model.parameters(), **kwargs, **backend)
    layerwise = LayerwiseOptimizer(layerwise_model.parameters(), cls, **kwargs, **backend)
    for step in range(4):
        x, y = _batch(step)
        ordinary.zero_grad()
        torch.nn.functional.mse_loss(ordinary_model(x), y).backward()
        ordinary.step()
        torch.nn.functional.mse_loss(layerwise_model(x), y).backward()
        assert all(p.grad is None for p in layerwise_model.parameters())  # applied and freed in backward
        layerwise.step()
    for a, b in zip(ordinary_model.parameters(), layerwise_model.parameters()):
        assert torch.equal(a, b)


def test_gradient_accumulation_and_global_clipping_are_refused_clearly() -> None:
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-3)
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation over micro-batches"):
        torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="global gradient norm.*max_grad_norm"):
        layerwise.clip_grad_norm_(1.0)
    with pytest.raises(TypeError, match="takes no gradients"):
        LayerwiseOptimizer(model.parameters(), MeZO)
    with pytest.raises(ValueError, match="appears twice"):
        LayerwiseOptimizer([{"params": list(model.parameters())}, {"params": [model[0].weight]}], Lion)


def test_per_parameter_clipping_and_lr_schedules() -> None:
    model, reference_model = _model(), _model()
    layerwise = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(layerwise, lambda step: 0.5**step)
    x, y = _batch(0)
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        torch.nn.functional.mse_loss(model(x), y).backward()
        layerwise.step()
        scheduler.step()
        for param, old in zip(model.parameters(), before):  # ‖Δ‖ = lr·‖clipped g‖ ≤ lr·0.01
            assert (param - old).norm() <= 0.1 * 0.5**step * 0.01 * (1 + 1e-4)
    assert all(group["lr"] == pytest.approx(0.025) for group in layerwise.param_groups)
    del reference_model


def test_state_dict_round_trip_and_mismatch() -> None:
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), GaLoreAdamW, lr=1e-2, rank=2, backend="torch")
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    layerwise.step()
    saved = layerwise.state_dict()
    twin_model = _model()
    twin_model.load_state_dict(model.state_dict())
    twin = LayerwiseOptimizer(twin_model.parameters(), GaLoreAdamW, lr=1e-2, rank=2, backend="torch")
    twin.load_state_dict(saved)
    assert twin.state_bytes() == layerwise.state_bytes() > 0
    for m, opt in ((model, layerwise), (twin_model, twin)):
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    other = LayerwiseOptimizer(_model().parameters(), Lion)
    with pytest.raises(ValueError, match="written by 'GaLoreAdamW', not 'Lion'"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="not a LayerwiseOptimizer state_dict"):
        other.load_state_dict(Lion(_model().parameters()).state_dict())


@pytest.mark.gpu
def test_layerwise_lowers_peak_memory() -> None:
    device = torch.device("cuda")
    peaks = {}
    for mode in ("ordinary", "layerwise"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to(device)
        optimizer = (Lion(model.parameters(), lr=1e-4) if mode == "ordinary"
                     else LayerwiseOptimizer(model.parameters(), Lion, lr=1e-4))
        x = torch.randn(8, 2048, device=device)
        for _ in range(2):
            torch.cuda.reset_peak_memory_stats()
            model(x).square().mean().backward()
            optimizer.step()
            if mode == "ordinary":
                optimizer.zero_grad()
        peaks[mode] = torch.cuda.max_memory_allocated()
        del model, optimizer
    grads = 8 * (2048 * 2048 + 2048) * 4
    assert peaks["layerwise"] <= peaks["ordinary"] - 0.75 * grads


def test_skip_nonfinite_skips_only_the_parameter_with_the_nonfinite_gradient() -> None:
    from memzoo.optim import Lion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = LayerwiseOptimizer(model.parameters(), Lion, lr=0.1, skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    model[1].weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    after = list(model.parameters())
    assert torch.equal(after[2], before[2])  # the NaN gradient's parameter did not move
    assert not torch.equal(after[0], before[0]) and all(torch.isfinite(p).all() for p in after)
