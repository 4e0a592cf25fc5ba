"""torch.compile: compiled models train with memzoo optimizers; a compiled training step runs
optimizer.step() eagerly (fenced), and an LR schedule does not recompile it."""

from __future__ import annotations

import pytest
import torch

from memzoo.optim import GaLoreAdamW, Lion


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 16, generator=generator), torch.randn(64, 4, generator=generator)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


@pytest.mark.parametrize("cls,kwargs", [(Lion, {"lr": 1e-3}), (GaLoreAdamW, {"lr": 1e-2, "rank": 4})],
                         ids=["lion", "galore"])
def test_compiled_training_step_matches_eager_without_recompiles(cls, kwargs) -> None:
    torch._dynamo.reset()
    x, y = _data()
    results = []
    for compiled in (False, True):
        model = _model()
        optimizer = cls(model.parameters(), **kwargs, backend="torch")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)

        def train_step() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        losses = []
        with torch._dynamo.config.patch(error_on_recompile=compiled):
            for _ in range(4):  # the learning rate changes every step
                losses.append(step().item())
                scheduler.step()
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_losses[-1] < compiled_losses[0]
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_is_fenced_for_every_memzoo_optimizer() -> None:
    from memzoo.optim.registry import OPTIMIZERS

    for info in OPTIMIZERS.values():
        assert getattr(info.cls.step, "_memzoo_fenced", False), info.name
