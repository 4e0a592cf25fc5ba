"""The torch.optim contract, checked for every optimizer in the registry.

An optimizer gets all of these by registering an OptimizerInfo in memzoo.optim.registry.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import KERNEL_DEVICE
from support import assert_close

from memzoo.optim.registry import OPTIMIZERS, OptimizerInfo

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 5), (5,), (1,), (3, 4, 2), (1, 1)]


def cases(*, backends: bool = True, dtypes: bool = True):
    """(info, variant kwargs, backend, dtype) combinations as pytest params."""
    out = []
    for info in OPTIMIZERS.values():
        if info.zeroth_order:  # no gradients: tests/test_zeroth_order.py holds their contract
            continue
        for index, variant in enumerate(info.variants):
            for backend in info.backends if backends else ("torch",):
                for dtype in (d for d in DTYPES if d in info.param_dtypes) if dtypes else (torch.float32,):
                    ident = f"{info.name}-v{index}-{backend}-{str(dtype).removeprefix('torch.')}"
                    out.append(pytest.param(info, variant, backend, dtype, id=ident))
    return out


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(KERNEL_DEVICE, dtype)) for s in SHAPES]
    # A dense, non-contiguous parameter (transposed storage).
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=generator).to(KERNEL_DEVICE, dtype).t()))
    return params


def make_optimizer(info: OptimizerInfo, variant, backend, params, **overrides):
    return info.cls(params, **{**info.sample_kwargs, **variant, **overrides}, backend=backend)


def set_grads(params, generator: torch.Generator) -> None:
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)


def run_steps(optimizer, params, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, generator)
        optimizer.step()


def snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])


def assert_unchanged(optimizer, params, snap) -> None:
    before_params, before_state = snap
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    after_state = optimizer.state_dict()["state"]
    assert after_state.keys() == before_state.keys()
    for key in before_state:
        for name, value in before_state[key].items():
            assert torch.equal(after_state[key][name], value)


@pytest.mark.parametrize("info,variant,backend,dtype", cases())
def test_step_with_closure_returns_loss(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    # Targets from their own stream: drawn like the params (same seed) they would equal them.
    generator = torch.Generator().manual_seed(12345)
    targets = [torch.randn(p.shape, generator=generator).to(p.device, dtype) for p in params]
    optimizer = make_optimizer(info, variant, backend, params)
    before = [p.detach().clone() for p in params]

    def objective():
        return sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(params, targets))

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    # The step moved towards the targets: the loss went down.
    with torch.no_grad():
        assert objective().item() < loss.item()


@pytest.mark.parametrize("info,variant,backend,dtype", cases(dtypes=False))
def test_params_without_grad_are_skipped_and_zero_grad_clears(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    set_grads(params, torch.Generator().manual_seed(0))
    params[1].grad = None
    frozen = params[1].detach().clone()
    optimizer.step()
    assert torch.equal(params[1], frozen)
    assert params[1] not in optimizer.state or not optimizer.state[params[1]]
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("info,variant,backend,dtype", cases(dtypes=False))
def test_param_groups_behave_like_separate_optimizers(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    group_overrides = {"lr": info.sample_kwargs["lr"] * 0.3, "weight_decay": 0.0}
    grouped = info.cls(
        [{"params": params[:3]}, {"params": params[3:], **group_overrides}],
        **{**info.sample_kwargs, **variant}, backend=backend,
    )
    first = make_optimizer(info, variant, backend, twins[:3])
    # Position-seeded streams: the second group's weights sit at positions 3… in `grouped`.
    seed = {"seed": info.sample_kwargs.get("seed", 0) + 3} if info.position_seeded else {}
    second = make_optimizer(info, variant, backend, twins[3:], **group_overrides, **seed)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        set_grads(params, generator)
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        grouped.step()
        first.step()
        second.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)


@pytest.mark.parametrize("info,variant,backend,dtype", cases(dtypes=False))
def test_lr_scheduler_drives_the_step(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 if epoch == 0 else 0.0)
    run_steps(optimizer, params, 1, seed=0)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in params]
    run_steps(optimizer, params, 2, seed=1)
    # lr = 0: no update and no weight decay.
    assert all(torch.equal(p, f) for p, f in zip(params, frozen))


@pytest.mark.parametrize("info,variant,backend,dtype", cases())
def test_state_dict_resume_is_bit_identical(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    run_steps(optimizer, params, 3, seed=0)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make_optimizer(info, {}, backend, resumed_params, lr=0.123)  # hyperparameters come from the file
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(params, resumed_params):
        for key, value in optimizer.state[p].items():
            assert value.dtype == resumed.state[q][key].dtype and torch.equal(value, resumed.state[q][key])
    run_steps(optimizer, params, 3, seed=1)
    run_steps(resumed, resumed_params, 3, seed=1)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS.values() if not i.zeroth_order], ids=lambda i: i.name)
def test_state_loaded_from_a_live_optimizer_is_not_shared(info) -> None:
    """torch.optim keeps the given tensors where no cast is needed; stepping the source after an
    in-memory load must not move the loaded optimizer's state."""
    params = make_params(torch.float32)
    source = make_optimizer(info, {}, "torch", params)
    run_steps(source, params, 2, seed=0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = make_optimizer(info, {}, "torch", copies)
    loaded.load_state_dict(source.state_dict())
    before = copy.deepcopy(loaded.state_dict()["state"])
    run_steps(source, params, 1, seed=1)
    after = loaded.state_dict()["state"]
    for key, entry in before.items():
        for name, value in entry.items():
            assert torch.equal(after[key][name], value), (key, name)


@pytest.mark.parametrize("info,variant,backend,dtype", cases(backends=False, dtypes=False))
def test_load_state_dict_rejects_foreign_or_mismatched(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    run_steps(optimizer, params, 1, seed=0)
    snap = snapshot(optimizer, params)

    adamw = torch.optim.AdamW(params)
    with pytest.raises(ValueError, match="not written by a memzoo optimizer"):
        optimizer.load_state_dict(adamw.state_dict())

    state_dict = optimizer.state_dict()
    renamed = {**state_dict, "memzoo": {**state_dict["memzoo"], "optimizer": "SomethingElse"}}
    with pytest.raises(ValueError, match="SomethingElse"):
        optimizer.load_state_dict(renamed)

    fewer = copy.deepcopy(state_dict)
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="params"):
        optimizer.load_state_dict(fewer)

    reshaped = copy.deepcopy(state_dict)
    first_state = reshaped["state"][0]
    key = next(iter(first_state))
    first_state[key] = first_state[key].reshape(-1)[:1].clone()
    with pytest.raises(ValueError, match=f"state '{key}'"):
        optimizer.load_state_dict(reshaped)

    bad_group = copy.deepcopy(state_dict)
    bad_group["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid lr"):
        optimizer.load_state_dict(bad_group)
    assert_unchanged(optimizer, params, snap)


@pytest.mark.parametrize("info,variant,backend,dtype", cases())
def test_state_bytes_matches_analytic_count(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    assert optimizer.state_bytes() == 0
    run_steps(optimizer, params, 2, seed=0)
    assert optimizer.state_bytes() == info.expected_state_bytes(optimizer) > 0


@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda i: i.name)
def test_bad_constructor_arguments_raise_clear_errors(info) -> None:
    for bad in info.bad_inputs:
        params = make_params(torch.float32)
        before = [p.detach().clone() for p in params]
        with pytest.raises(bad.error, match=bad.match):
            info.cls(params, **{**info.sample_kwargs, **bad.kwargs})
        assert all(torch.equal(p, b) for p, b in zip(params, before)), bad.description
        # The same value in a param group is caught too, naming the group.
        group_kwargs = {k: v for k, v in bad.kwargs.items() if k != "backend"}
        if group_kwargs:
            with pytest.raises(bad.error, match="param group 1"):
                info.cls([{"params": params[:2]}, {"params": params[2:], **group_kwargs}], **info.sample_kwargs)


@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda i: i.name)
def test_unsupported_parameters_are_rejected(info) -> None:
    with pytest.raises(TypeError, match="complex"):
        info.cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], **info.sample_kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        info.cls([torch.zeros(3, dtype=torch.int64)], **info.sample_kwargs)


@pytest.mark.parametrize("info,variant,backend,dtype", cases(dtypes=False))
def test_sparse_gradient_is_rejected_before_any_change(info, variant, backend, dtype) -> None:
    params = make_params(dtype)
    optimizer = make_optimizer(info, variant, backend, params)
    run_steps(optimizer, params, 1, seed=0)
    set_grads(params, torch.Generator().manual_seed(1))
    params[-2].grad = params[-2].grad.to_sparse()  # a late parameter: earlier ones must not move
    snap = snapshot(optimizer, params)
    with pytest.raises(ValueError, match="sparse gradients.*param 4 "):
        optimizer.step()
    assert_unchanged(optimizer, params, snap)


def _trajectory_cases():
    """Every Triton case; the torch path (fast to run) on every variant in fp32 and on the first
    variant in every dtype."""
    return [c for c in cases() if c.values[2] == "triton" or c.values[3] == torch.float32
            or c.values[1] == c.values[0].variants[0]]


@pytest.mark.parametrize("info,variant,backend,dtype", _trajectory_cases())
def test_backends_follow_the_reference_trajectory(info, variant, backend, dtype) -> None:
    """backend="torch" and "triton" against backend="reference" over five steps: parameters and
    every state tensor within the dtype's rounding."""
    assert_follows_the_reference_trajectory(info, variant, backend, dtype)


def assert_follows_the_reference_trajectory(info, variant, backend, dtype) -> None:
    reference_params, params = make_params(dtype), make_params(dtype)
    on_reference = make_optimizer(info, variant, "reference", reference_params)
    optimizer = make_optimizer(info, variant, backend, params)
    run_steps(on_reference, reference_params, 5, seed=3)
    run_steps(optimizer, params, 5, seed=3)
    for p, q in zip(params, reference_params):
        assert_close(p.detach(), q.detach(), info.trajectory_tolerance(backend), what="param")
        for key, value in on_reference.state[q].items():
            other = optimizer.state[p][key]
            if value.dtype == torch.uint8:  # 8-bit codes: a rounding difference may cross one code boundary
                assert (other.int() - value.int()).abs().max() <= 1, key
            elif not value.is_floating_point():  # counters and seeds
                assert torch.equal(other, value), key
            else:
                assert_close(other, value, what=key)


def _cosmos_defects():
    """Wrong COSMOS updates on the torch backend: (name, stage function, defective wrapper)."""
    return [
        ("wrong sign", "cosmos_apply_", lambda apply: lambda *args, **kw: apply(*args, **{**kw, "lr": -kw["lr"]})),
        ("gamma x2", "cosmos_apply_", lambda apply: lambda *args, **kw: apply(*args, **{**kw, "gamma": 2 * kw["gamma"]})),
        ("Muon part dropped", "cosmos_apply_",
         lambda apply: lambda param, low_rank, basis, orthogonal, **kw: apply(param, low_rank, basis, None, **kw)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("defect", _cosmos_defects(), ids=lambda d: d[0])
def test_cosmos_torch_trajectory_tolerance_catches_wrong_updates(defect, dtype, monkeypatch) -> None:
    """COSMOS's torch backend has its own trajectory allowance (its Newton–Schulz rounds
    differently, see optim/registry.py); at that allowance a wrong sign of the update, a doubled
    γ or the Muon part dropped still fails the trajectory test."""
    from memzoo.triton_kernels.torch_backend import cosmos as torch_cosmos

    info = OPTIMIZERS["cosmos"]
    _, stage, defective = defect
    monkeypatch.setattr(torch_cosmos, stage, defective(getattr(torch_cosmos, stage)))
    with pytest.raises(AssertionError, match="param: "):
        assert_follows_the_reference_trajectory(info, info.variants[0], "torch", dtype)


RESUME_PAIRS = [("triton", "torch"), ("torch", "triton"), ("reference", "torch"), ("torch", "reference")]


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS.values() if not i.zeroth_order], ids=lambda i: i.name)
@pytest.mark.parametrize("written_on,resumed_on", RESUME_PAIRS)
def test_checkpoint_resumes_on_the_other_backend(info, written_on, resumed_on) -> None:
    """A state_dict written on one backend loads on another and continues the same trajectory."""
    if {written_on, resumed_on} - {"reference"} - set(info.backends):
        pytest.skip(f"{info.name} runs on {info.backends}")
    params, moved_params = make_params(torch.float32), make_params(torch.float32)
    optimizer = make_optimizer(info, {}, written_on, params)
    run_steps(optimizer, params, 2, seed=0)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    for p, q in zip(params, moved_params):
        q.data.copy_(p.data)
    moved = make_optimizer(info, {}, resumed_on, moved_params)
    moved.load_state_dict(torch.load(buffer, weights_only=True))
    run_steps(optimizer, params, 2, seed=1)
    run_steps(moved, moved_params, 2, seed=1)
    for p, q in zip(params, moved_params):
        assert_close(q.detach(), p.detach(), info.trajectory_tolerance(written_on, resumed_on), what="param")


@pytest.mark.parametrize("info,variant,backend,dtype", cases(dtypes=False))
def test_maximize_follows_the_negated_gradient(info, variant, backend, dtype) -> None:
    up, down = make_params(dtype), make_params(dtype)
    if "maximize" not in make_optimizer(info, variant, backend, make_params(dtype)).defaults:
        pytest.skip("no maximize flag")
    maximizing = make_optimizer(info, variant, backend, up, maximize=True)
    minimizing = make_optimizer(info, variant, backend, down)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_grads(up, generator)
        for p, q in zip(up, down):
            q.grad = -p.grad
        maximizing.step()
        minimizing.step()
    assert all(torch.equal(p, q) for p, q in zip(up, down))


def test_backend_triton_on_cpu_needs_the_interpreter() -> None:
    script = textwrap.dedent("""
        import torch
        from memzoo.optim import Lion
        try:
            Lion([torch.nn.Parameter(torch.zeros(3))], backend="triton")
        except ValueError as exc:
            print("ValueError:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "ValueError: backend='triton' got CPU tensors" in result.stdout, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout
