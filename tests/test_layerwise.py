"""Layer-wise updates: the ordinary step's parameters, gradients freed in backward, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from memzoo.optim import APOLLO, COSMOS, FRUGAL, GaLoreAdamW, Lion, MeZO
from memzoo.optim.layerwise import LayerwiseOptimizer, _AppliedGradient

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
        # applied and freed in backward: each .grad is a stand-in without storage until step()
        assert all(isinstance(p.grad, _AppliedGradient) for p in layerwise_model.parameters())
        layerwise.step()
        assert all(p.grad is None for p in layerwise_model.parameters())
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


# ---- what trainers do to an optimizer ------------------------------------------------------------

def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = _batch(step)
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_schedules_reach_the_updates_after_load_state_dict() -> None:
    # accelerate's prepare does optimizer.load_state_dict(optimizer.state_dict()); so does any resume.
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(layerwise, lambda step: min(1.0, step / 2))  # lr 0, 0.05, 0.1
    layerwise.load_state_dict(layerwise.state_dict())
    assert all(group is inner.param_groups[0] for group, inner in zip(layerwise.param_groups,
                                                                      layerwise.inner_optimizers))
    before = [p.detach().clone() for p in model.parameters()]
    _train_step(model, layerwise, 0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # lr 0
    warmup.step()
    _train_step(model, layerwise, 1)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # lr 0.05 reached the updates
    assert all(inner.param_groups[0]["lr"] == pytest.approx(0.05) for inner in layerwise.inner_optimizers)


def test_global_norm_clipping_sees_the_true_norm_and_refuses_to_clip_too_late() -> None:
    model, reference_model = _model(), _model()
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-3)
    x, y = _batch(0)
    torch.nn.functional.mse_loss(reference_model(x), y).backward()
    true_norm = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), float("inf"))
    torch.nn.functional.mse_loss(model(x), y).backward()
    for foreach in (False, True):  # what Trainer logs as grad_norm (was 0.0), and a clip with nothing to clip
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"), foreach=foreach) == true_norm
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), 2 * float(true_norm), foreach=foreach) == true_norm
    reference_norms = [torch.linalg.vector_norm(p.grad) for p in reference_model.parameters()]
    assert [p.grad.data.norm(2) for p in model.parameters()] == reference_norms  # Lightning's grad_norm()
    with pytest.raises(RuntimeError, match=r"already applied.*global norm, [0-9.]+, exceeds.*max_grad_norm=0"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 * float(true_norm))  # was: 0.0, nothing clipped
    assert all(p.grad is None for p in model.parameters())  # a refusal ends the iteration
    layerwise.step()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="only answers for its norm"):
        model[0].weight.grad.sum()
    model.cpu()  # e.g. a trainer's teardown after the error
    layerwise.step()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(layerwise)  # was: AssertionError "No inf checks were recorded"
    layerwise.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()  # the next iteration is unaffected
    layerwise.step()


def test_added_param_group_trains_like_the_others() -> None:
    ordinary_model, layerwise_model = _model(), _model()
    first, *rest = range(len(list(ordinary_model.children())))
    ordinary = GaLoreAdamW(ordinary_model[first].parameters(), lr=1e-2, rank=2, backend="torch")
    layerwise = LayerwiseOptimizer(layerwise_model[first].parameters(), GaLoreAdamW, lr=1e-2, rank=2, backend="torch")
    for optimizer, model in ((ordinary, ordinary_model), (layerwise, layerwise_model)):
        later = [p for index in rest for p in model[index].parameters()]
        optimizer.add_param_group({"params": later, "lr": 2e-2, "rank": None})
    assert len(layerwise.param_groups) == len(list(layerwise_model.parameters()))
    for step in range(3):
        ordinary.zero_grad()
        _train_step(ordinary_model, ordinary, step)
        _train_step(layerwise_model, layerwise, step)
        assert all(p.grad is None for p in layerwise_model.parameters())
    for a, b in zip(ordinary_model.parameters(), layerwise_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="appears twice"):
        layerwise.add_param_group({"params": [layerwise_model[first].weight]})
    named = LayerwiseOptimizer(_model().named_parameters(), Lion)  # torch >= 2.6 accepts named parameters
    assert len(named.param_groups) == len(list(_model().parameters()))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        layerwise.add_param_group({"params": [frozen]})


def test_hooks_run_once_per_step_and_state_dict_hooks_run() -> None:
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-3)
    calls: list[str] = []
    handles = [
        register_optimizer_step_post_hook(lambda *args: calls.append("global post")),
        layerwise.register_step_post_hook(lambda *args: calls.append("post")),
        layerwise.register_state_dict_pre_hook(lambda opt: calls.append("state_dict pre")),
        layerwise.register_state_dict_post_hook(lambda opt, sd: calls.append("state_dict post")),
        layerwise.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre")),
        layerwise.register_load_state_dict_post_hook(lambda opt: calls.append("load post")),
    ]
    try:
        _train_step(model, layerwise, 0)
        layerwise.load_state_dict(layerwise.state_dict())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["post", "global post", "state_dict pre", "state_dict post", "load pre", "load post"]


def test_one_cycle_with_momentum_cycling() -> None:
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-3, betas=(0.9, 0.99))
    assert layerwise.defaults["betas"] == (0.9, 0.99)
    schedule = torch.optim.lr_scheduler.OneCycleLR(layerwise, max_lr=1e-2, total_steps=4, cycle_momentum=True)
    for step in range(2):
        _train_step(model, layerwise, step)
        schedule.step()
    assert all(group["betas"][0] < 0.95 for group in layerwise.param_groups)


class _FailingSGD(torch.optim.SGD):
    fail = True

    def step(self, closure=None):
        if _FailingSGD.fail:
            raise ValueError("bad update")
        return super().step(closure)


def test_an_exception_in_an_update_is_raised_again_by_the_next_backward() -> None:
    model = _model()
    layerwise = LayerwiseOptimizer(model.parameters(), _FailingSGD, lr=0.1)
    x, y = _batch(0)
    for _ in range(2):  # was: "a second backward() before step()" the second time
        with pytest.raises(ValueError, match="bad update"):
            torch.nn.functional.mse_loss(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
    _FailingSGD.fail = False
    try:
        _train_step(model, layerwise, 0)
    finally:
        _FailingSGD.fail = True


def test_a_newer_layerwise_optimizer_takes_the_parameters_over() -> None:
    # Lightning calls configure_optimizers again on resume; a user may rebuild the optimizer.
    model = _model()
    older = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    newer = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    _train_step(model, newer, 0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # was: the older one stepped too
    assert all(inner.state for inner in newer.inner_optimizers)  # momentum buffers: the newer one stepped
    assert not any(inner.state for inner in older.inner_optimizers)
    newer.remove_hooks()
    torch.nn.functional.mse_loss(model(_batch(1)[0]), _batch(1)[1]).backward()
    assert all(p.grad is not None and type(p.grad) is torch.Tensor for p in model.parameters())  # no hooks left


def test_grad_scaler_unscales_each_gradient_in_its_update() -> None:
    ordinary_model, layerwise_model = _model(), _model()
    ordinary = Lion(ordinary_model.parameters(), lr=1e-3, backend="torch")
    ordinary_scaler, scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    layerwise = LayerwiseOptimizer(layerwise_model.parameters(), Lion, lr=1e-3, backend="torch", grad_scaler=scaler)
    for step in range(3):
        x, y = _batch(step)
        for model, optimizer, step_scaler in ((ordinary_model, ordinary, ordinary_scaler),
                                              (layerwise_model, layerwise, scaler)):
            step_scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            step_scaler.unscale_(optimizer)  # what a trainer's clip does first
            assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))) < 100  # unscaled
            step_scaler.step(optimizer)
            step_scaler.update()
            optimizer.zero_grad()
    for a, b in zip(ordinary_model.parameters(), layerwise_model.parameters()):
        assert torch.equal(a, b)
    # An Inf in one scaled gradient: that parameter keeps its value, the scaler backs off.
    before = [p.detach().clone() for p in layerwise_model.parameters()]
    handle = layerwise_model[2].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    scale = scaler.get_scale()
    x, y = _batch(3)
    scaler.scale(torch.nn.functional.mse_loss(layerwise_model(x), y)).backward()
    scaler.step(layerwise)
    scaler.update()
    layerwise.zero_grad()
    handle.remove()
    assert scaler.get_scale() == scale / 2
    moved = [not torch.equal(p, b) for p, b in zip(layerwise_model.parameters(), before)]
    assert moved[2] is False and moved[0] is True
