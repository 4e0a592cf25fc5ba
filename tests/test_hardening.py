"""Hardening (issue 9): shared validation of param groups, the non-finite policy, all-or-nothing
steps under injected failures, versioned state_dicts, and fuzzing of every optimizer through the
registry."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memzoo.optim import COSMOS, MeZO, GaLoreAdamW
from memzoo.optim.base import STATE_FORMAT
from memzoo.optim.registry import OPTIMIZERS

FIRST_ORDER = [info for info in OPTIMIZERS.values() if not info.zeroth_order]
SHAPES = [(7, 5), (5,), (3, 4, 2), (6, 6)]


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def set_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_same(optimizer, params, snap) -> None:
    before_params, before = snap
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    after = optimizer.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for key, entry in before["state"].items():
        assert after["state"][key].keys() == entry.keys()
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), (key, name)
    assert after["memzoo"] == before["memzoo"]


# ---- 1. validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda i: i.name)
def test_param_group_layout_errors_name_the_parameter_and_the_fix(info) -> None:
    a, b = make_params()[:2]
    build = lambda groups: info.cls(groups, **info.sample_kwargs, backend="torch")  # noqa: E731
    with pytest.raises(ValueError, match=r"param group 1, param 0 \(shape \(7, 5\).*same tensor as param group 0, param 0"):
        build([{"params": [a]}, {"params": [a, b]}])
    with pytest.raises(ValueError, match=r"param group 0, param 2 .*same tensor as param group 0, param 0.*remove"):
        build([a, b, a])
    with pytest.raises(ValueError, match=r"param group 1 has no parameters"):
        build([{"params": [a]}, {"params": []}])
    with pytest.raises(ValueError, match=r"param group 0, param 1 \(shape \(5,\).*not a leaf.*detach"):
        build([a, b * 2])
    with pytest.raises(TypeError, match="not a set"):
        build({a, b})
    with pytest.raises(TypeError, match="skip_nonfinite"):
        info.cls([a], **info.sample_kwargs, skip_nonfinite=1)


def test_add_param_group_failure_leaves_the_optimizer_as_it_was() -> None:
    a, b, c, _ = make_params()
    optimizer = GaLoreAdamW([a], lr=0.1, rank=2, backend="torch")
    with pytest.raises(ValueError, match="same tensor"):
        optimizer.add_param_group({"params": [b, a]})
    with pytest.raises(ValueError, match="Invalid lr"):
        optimizer.add_param_group({"params": [c], "lr": float("nan")})
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["params"][0] is a


# ---- 2. non-finite values -------------------------------------------------------------------------

@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
def test_skip_nonfinite_skips_the_whole_step_and_counts_it(info) -> None:
    params = make_params()
    optimizer = info.cls(params, **info.sample_kwargs, backend="torch", skip_nonfinite=True)
    set_grads(params, 0)
    optimizer.step()
    snap = snapshot(optimizer, params)
    set_grads(params, 1)
    params[2].grad[1, 2, 0] = float("nan")
    params[0].grad[0, 0] = float("inf")
    optimizer.step()
    assert optimizer.skipped_steps == 1
    snap[1]["memzoo"]["skipped_steps"] = 1
    assert_same(optimizer, params, snap)
    # The skipped step leaves no trace: the next step equals that of a run that never saw it.
    twin_params = make_params()
    twin = info.cls(twin_params, **info.sample_kwargs, backend="torch")
    for step_seed in (0, 2):
        set_grads(params, step_seed)
        set_grads(twin_params, step_seed)
        if step_seed:
            optimizer.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    assert optimizer.state_dict()["memzoo"]["skipped_steps"] == 1


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
def test_nonfinite_gradients_propagate_but_never_corrupt_the_subspace(info) -> None:
    params = make_params()
    optimizer = info.cls(params, **info.sample_kwargs, backend="torch")
    for seed in range(2):  # the sample settings refresh on steps 1 and 3 (gap 2)
        set_grads(params, seed)
        optimizer.step()
    set_grads(params, 5)
    params[0].grad.fill_(float("nan"))
    params[3].grad[1, 1] = float("inf")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        optimizer.step()  # a refresh step for the low-rank methods
    assert not torch.isfinite(params[0]).all()  # propagated, as torch.optim does
    for param in params[:1] + params[3:]:
        for name, value in optimizer.state[param].items():
            if name in ("proj_left", "proj_right", "basis", "subspace", "proj_indices"):
                assert torch.isfinite(value.float()).all(), (info.name, name)


def test_a_first_refresh_from_a_nan_gradient_warns_and_keeps_a_usable_subspace() -> None:
    params = make_params()
    optimizer = GaLoreAdamW(params, lr=0.1, rank=2, projector="svd", backend="torch")
    set_grads(params, 0)
    params[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf \(matrices \(7, 5\)\).*skip_nonfinite=True"):
        optimizer.step()  # the exact SVD would raise on a NaN matrix
    factor = optimizer.state[params[0]]["proj_left"] if "proj_left" in optimizer.state[params[0]] else \
        optimizer.state[params[0]]["proj_right"]
    assert torch.isfinite(factor).all() and factor.abs().sum() > 0
    assert torch.isfinite(params[3]).all()  # the other weights are unaffected


@pytest.mark.parametrize("skip", [False, True])
def test_zeroth_order_nonfinite_loss(skip: bool) -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = MeZO(params, lr=1e-2, eps=1e-3, backend="torch", skip_nonfinite=skip)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = sum(p.square().sum() for p in params)
        return loss * float("nan") if len(calls) == 2 else loss

    optimizer.step(closure)
    if skip:  # back to θ (the restore recovers the stored values), no update, the skip counted
        for p, q in zip(params, before):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        assert optimizer.skipped_steps == 1 and optimizer.state_dict()["zeroth_order"]["step"] == 1
    else:  # propagated, as torch.optim would
        assert all(not torch.isfinite(p).all() for p in params)


# ---- 3. all-or-nothing steps ----------------------------------------------------------------------

class InjectedFailure(RuntimeError):
    pass


def _fail_on_call(original, failing_call: int):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise InjectedFailure("out of memory (injected)")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", ["galore_adamw", "natural_galore", "frugal"])
def test_a_failing_projector_refresh_modifies_nothing(name, monkeypatch) -> None:
    import memzoo.optim.projector as projector_module

    info = OPTIMIZERS[name]
    params = make_params()
    # Two groups, so the failure comes after the first group's refresh has been computed.
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    optimizer = info.cls(groups, **info.sample_kwargs, backend="torch")
    set_grads(params, 0)
    optimizer.step()
    set_grads(params, 1)
    optimizer.step()
    snap = snapshot(optimizer, params)
    set_grads(params, 2)  # step 3 refreshes every projector
    monkeypatch.setattr(projector_module, "compute_bases", _fail_on_call(projector_module.compute_bases, 2))
    with pytest.raises(InjectedFailure):
        optimizer.step()
    assert_same(optimizer, params, snap)
    monkeypatch.undo()
    optimizer.step()  # and the retried step is the step that would have been taken
    twin_params = make_params()
    twin = info.cls([{"params": twin_params[:2]}, {"params": twin_params[2:], "lr": 0.05}], **info.sample_kwargs,
                    backend="torch")
    for seed in range(3):
        set_grads(twin_params, seed)
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_a_failing_cosmos_basis_update_modifies_nothing(monkeypatch) -> None:
    params = make_params()
    optimizer = COSMOS(params, **OPTIMIZERS["cosmos"].sample_kwargs, backend="torch")
    set_grads(params, 0)
    optimizer.step()
    snap = snapshot(optimizer, params)
    set_grads(params, 1)
    kernels = optimizer._kernels(params[0].device)  # the module backend="torch" runs
    monkeypatch.setattr(kernels, "cosmos_basis_update", _fail_on_call(kernels.cosmos_basis_update, 2))
    with pytest.raises(InjectedFailure):
        optimizer.step()
    assert_same(optimizer, params, snap)


def test_a_failing_closure_modifies_nothing() -> None:
    params = make_params()
    for info in FIRST_ORDER:
        optimizer = info.cls(params, **info.sample_kwargs, backend="torch")
        snap = snapshot(optimizer, params)

        def closure():
            raise InjectedFailure("the forward pass failed")

        with pytest.raises(InjectedFailure):
            optimizer.step(closure)
        assert_same(optimizer, params, snap)


# ---- 4. state_dict format -------------------------------------------------------------------------

def test_older_state_format_is_migrated_and_newer_is_refused() -> None:
    params = make_params()
    optimizer = GaLoreAdamW(params, lr=0.1, rank=2, backend="torch", skip_nonfinite=True)
    set_grads(params, 0)
    optimizer.step()
    state_dict = optimizer.state_dict()
    assert state_dict["memzoo"] == {"optimizer": "GaLoreAdamW", "format": STATE_FORMAT, "skipped_steps": 0}
    old = copy.deepcopy(state_dict)
    old["memzoo"] = {"optimizer": "GaLoreAdamW", "format": 1}  # as memzoo 0.1.0.dev0 wrote it
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    resumed = GaLoreAdamW(make_params(), lr=0.1, rank=2, backend="torch")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.skipped_steps == 0 and old["memzoo"] == {"optimizer": "GaLoreAdamW", "format": 1}
    newer = {**state_dict, "memzoo": {**state_dict["memzoo"], "format": STATE_FORMAT + 1}}
    with pytest.raises(ValueError, match="Unsupported memzoo state format"):
        resumed.load_state_dict(newer)


def test_mismatches_are_reported_field_by_field_and_nothing_changes() -> None:
    params = make_params()
    optimizer = GaLoreAdamW(params, lr=0.1, rank=2, backend="torch")
    set_grads(params, 0)
    optimizer.step()
    snap = snapshot(optimizer, params)
    broken = copy.deepcopy(optimizer.state_dict())
    broken["state"][0]["exp_avg"] = broken["state"][0]["exp_avg"][:1].clone()
    del broken["state"][1]["exp_avg_sq"]
    broken["state"][2]["step"] = broken["state"][2]["step"].double()
    broken["memzoo"]["skipped_steps"] = -3
    with pytest.raises(ValueError) as raised:
        optimizer.load_state_dict(broken)
    message = str(raised.value)
    assert "4 mismatches" in message
    for fragment in ("state 'exp_avg' for param group 0, param 0", "param group 0, param 1 (shape (5,)",
                     "state 'step' for param group 0, param 2", "skipped_steps is -3"):
        assert fragment in message
    assert_same(optimizer, params, snap)


# ---- 5. fuzzing -----------------------------------------------------------------------------------

FUZZ_SHAPES = st.sampled_from([(0,), (1,), (1, 9), (9, 1), (4, 6), (6, 4), (0, 5), (2, 3, 4), (1, 1), (3,), ()])


@st.composite
def layouts(draw):
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        groups.append({
            "shapes": draw(st.lists(FUZZ_SHAPES, min_size=1, max_size=3)),
            "lr": draw(st.sampled_from([0.0, 1e-3, 0.1])),
            "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        })
    return groups, draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])), draw(st.integers(0, 2**16))


def _build(info, layout, dtype, seed, params=None):
    generator = torch.Generator().manual_seed(seed)
    fresh = params is None
    params, flat, groups = [] if fresh else params, iter(params or []), []
    for spec in layout:
        group_params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) if fresh else next(flat)
                        for shape in spec["shapes"]]
        if fresh:
            params += group_params
        groups.append({"params": group_params, "lr": spec["lr"], "weight_decay": spec["weight_decay"]})
    return params, info.cls(groups, **info.sample_kwargs, backend="torch")


@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda i: i.name)
@settings(max_examples=8)
@given(case=layouts())
def test_fuzz_layouts_shapes_dtypes(info, case) -> None:
    """Random groups, shapes (0-size, 1×N, N×1, 3-D), dtypes and hyperparameters: every step
    works or raises a documented error, finite input gives finite parameters, and a state_dict
    round trip (torch.save / torch.load(weights_only=True)) continues bit-identically."""
    layout, dtype, seed = case
    try:
        params, optimizer = _build(info, layout, dtype, seed)
    except ValueError as exc:  # documented construction errors only
        assert "param group" in str(exc), exc
        return
    twin_params, twin = _build(info, layout, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)

    def step(ps, opt, grads):
        if info.zeroth_order:
            opt.step(lambda: sum((p.float() - 0.5).square().sum() for p in ps))
        else:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()

    for index in range(3):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
        step(params, optimizer, grads)
        if index == 1:  # the twin resumes from a serialized copy of the optimizer
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            _, twin = _build(info, layout, dtype, seed, params=twin_params)
            twin.load_state_dict(torch.load(buffer, weights_only=True))
        elif index == 2:
            step(twin_params, twin, grads)
    for p, q in zip(params, twin_params):
        assert torch.isfinite(p).all(), info.name
        assert torch.equal(p, q), info.name


def test_checkpoint_files_that_are_truncated_or_hold_code_are_refused(tmp_path) -> None:
    params = make_params()
    optimizer = GaLoreAdamW(params, lr=0.1, rank=2, backend="torch")
    set_grads(params, 0)
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    snap = snapshot(optimizer, params)
    resumed_params = make_params()
    resumed = GaLoreAdamW(resumed_params, lr=0.1, rank=2, backend="torch")
    resumed.load_checkpoint(path)
    assert resumed.state_dict()["state"].keys() == snap[1]["state"].keys()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read the checkpoint .*truncated.pt"):
        optimizer.load_checkpoint(truncated)
    hostile = tmp_path / "hostile.pt"
    torch.save({"state": {}, "param_groups": [], "memzoo": InjectedFailure("not a tensor")}, hostile)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        optimizer.load_checkpoint(hostile)
    malformed = {**optimizer.state_dict(), "param_groups": [{"lr": 0.1}]}
    with pytest.raises(ValueError, match="malformed state_dict"):
        optimizer.load_state_dict(malformed)
    assert_same(optimizer, params, snap)
