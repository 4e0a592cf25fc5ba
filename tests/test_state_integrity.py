"""No silent damage (issue 18): group edits between steps, all-or-nothing first refreshes,
interrupted steps, and checkpoints that are checked field by field (with an optional digest)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_hardening import InjectedFailure, _fail_on_call, assert_same, make_params, set_grads, snapshot

from memzoo.optim import COSMOS
from memzoo.optim.registry import OPTIMIZERS

FIRST_ORDER = [info for info in OPTIMIZERS.values() if not info.zeroth_order]


def reload(optimizer, params, factory):
    """A fresh optimizer on copies of ``params`` loaded from ``optimizer``'s serialized state."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = factory(copies)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    return copies, twin


# ---- a failed first refresh is all-or-nothing (item 4) ------------------------------------------

@pytest.mark.parametrize("name", ["galore_adamw", "natural_galore", "frugal", "apollo"])
def test_a_failing_first_refresh_creates_no_state(name, monkeypatch) -> None:
    import memzoo.optim.projector as projector_module

    info = OPTIMIZERS[name]
    kwargs = {**info.sample_kwargs, "projector": "svd"} if name != "apollo" else {**info.sample_kwargs, "proj": "svd"}
    factory = lambda ps: info.cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], **kwargs,  # noqa: E731
                                  backend="torch")
    params = make_params()
    optimizer = factory(params)
    set_grads(params, 0)
    snap = snapshot(optimizer, params)
    monkeypatch.setattr(projector_module, "compute_bases", _fail_on_call(projector_module.compute_bases, 2))
    with pytest.raises(InjectedFailure):
        optimizer.step()
    assert len(optimizer.state) == 0
    assert_same(optimizer, params, snap)
    reload(optimizer, params, factory)  # the state_dict still loads
    monkeypatch.undo()
    optimizer.step()  # the retried first step is the first step
    twin_params = make_params()
    twin = factory(twin_params)
    set_grads(twin_params, 0)
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_a_failing_first_cosmos_basis_creates_no_state(monkeypatch) -> None:
    import memzoo.reference.cosmos as cosmos_reference
    # Imported before the patch: its `from memzoo.reference.cosmos import …` would otherwise keep
    # the failing function for the rest of the session (the torch twin is used by reload below).
    import memzoo.triton_kernels.torch_backend.cosmos  # noqa: F401

    params = make_params()
    optimizer = COSMOS(params, **OPTIMIZERS["cosmos"].sample_kwargs, backend="reference")
    set_grads(params, 0)
    monkeypatch.setattr(cosmos_reference, "cosmos_basis_init", _fail_on_call(cosmos_reference.cosmos_basis_init, 2))
    with pytest.raises(InjectedFailure):
        optimizer.step()
    assert len(optimizer.state) == 0
    reload(optimizer, params, lambda ps: COSMOS(ps, **OPTIMIZERS["cosmos"].sample_kwargs, backend="torch"))


# ---- group edits between steps (item 3) ---------------------------------------------------------

def _edit_dtype(dtype):
    def edit(optimizer, params):
        for param in params:
            param.data = param.data.to(dtype)
    return edit


def _edit_group(**values):
    def edit(optimizer, params):
        for group in optimizer.param_groups:
            group.update(values)
    return edit


# (optimizer, extra kwargs, the edit, what the warning says)
EDITS = [
    ("galore_adamw", {"projector": "svd"}, _edit_group(rank=3), "restarted"),
    ("galore_adamw", {"projector": "svd"}, _edit_group(proj_type="reverse_std"), "restarted"),
    ("galore_adamw", {"projector": "random"}, _edit_group(projector="svd"), "rebuilt"),
    ("galore_adamw", {"projector": "svd"}, _edit_group(projector="random"), "rebuilt"),
    ("galore_adamw", {}, _edit_group(state_dtype=torch.bfloat16), "cast"),
    ("galore_adamw", {}, _edit_dtype(torch.bfloat16), "cast"),
    ("galore_adamw", {"min_8bit_size": 1}, _edit_group(optim_bits=8), "restarted"),
    ("natural_galore", {}, _edit_group(natural_history=5), "rebuilt"),
    ("apollo", {}, _edit_group(disable_nl=True), "rebuilt"),
    ("apollo", {"disable_nl": True}, _edit_group(disable_nl=False), None),  # the limiter starts recording
    ("frugal", {}, _edit_group(density=0.25), "restarted"),
    ("frugal", {}, _edit_group(proj_type="reverse_std"), "restarted"),
    ("cosmos", {}, _edit_group(rank=1), "restarted"),
    ("cosmos", {}, _edit_dtype(torch.bfloat16), "cast"),
    ("lion", {}, _edit_group(momentum_dtype=torch.bfloat16), "cast"),
    ("lion", {}, _edit_dtype(torch.float16), "cast"),
]


@pytest.mark.parametrize("name, kwargs, edit, note", EDITS, ids=[f"{e[0]}-{i}" for i, e in enumerate(EDITS)])
def test_group_edits_between_steps_adapt_the_state_and_it_still_loads(name, kwargs, edit, note) -> None:
    info = OPTIMIZERS[name]
    factory = lambda ps: info.cls(ps, **{**info.sample_kwargs, **kwargs}, backend="torch")  # noqa: E731
    params = make_params()
    optimizer = factory(params)
    for seed in range(2):  # the next step refreshes (gap 2)
        set_grads(params, seed)
        optimizer.step()
    edit(optimizer, params)
    for seed in (2, 3):
        set_grads(params, seed)
        if seed == 2 and note is not None:
            with pytest.warns(RuntimeWarning, match=note):
                optimizer.step()
        else:
            optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    # The state matches the edited settings: it loads, and the loaded copy continues identically.
    twin_params, twin = reload(optimizer, params, lambda ps: factory(ps))
    for seed in (4, 5):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        optimizer.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_reverting_a_rank_edit_restarts_again_and_keeps_working() -> None:
    info = OPTIMIZERS["galore_adamw"]
    params = make_params()
    optimizer = info.cls(params, **info.sample_kwargs, projector="svd", backend="torch")
    for seed, rank in enumerate((2, 2, 3, 2, 2)):
        optimizer.param_groups[0]["rank"] = rank
        set_grads(params, seed)
        if seed in (2, 3):
            with pytest.warns(RuntimeWarning, match=r"param group 0, param 0 \(shape \(7, 5\).*restarted as at a first "
                                                     r"step \('exp_avg' is"):
                optimizer.step()
        else:
            optimizer.step()
    assert int(optimizer.state[params[0]]["step"]) == 2  # restarted at the revert (step 4), stepped twice
    reload(optimizer, params, lambda ps: info.cls(ps, **info.sample_kwargs, projector="svd", backend="torch"))


# ---- checkpoints (item 6) ------------------------------------------------------------------------

def _stepped(name: str, steps: int = 2):
    info = OPTIMIZERS[name]
    factory = lambda ps: info.cls(ps, **info.sample_kwargs, backend="torch")  # noqa: E731
    params = make_params()
    optimizer = factory(params)
    for seed in range(steps):
        if info.zeroth_order:
            optimizer.step(lambda: sum(p.square().sum() for p in params))
        else:
            set_grads(params, seed)
            optimizer.step()
    return params, optimizer, factory


@pytest.mark.parametrize("name, key", [("apollo", "growth_limit"), ("frugal", "inactive_lr_scale"), ("cosmos", "gamma"),
                                       ("natural_galore", "damping"), ("lion", "weight_decay"), ("mezo", "lr")])
def test_a_saved_group_missing_a_key_is_refused_naming_it(name, key) -> None:
    params, optimizer, factory = _stepped(name)
    broken = copy.deepcopy(optimizer.state_dict())
    del broken["param_groups"][0][key]
    broken["param_groups"][0]["lb"] = 0.1  # a flipped bit in a key's name
    fresh = factory(make_params())
    with pytest.raises(ValueError, match=rf"param group 0: missing '{key}'; unknown 'lb'"):
        fresh.load_state_dict(broken)
    assert len(fresh.state) == 0 and "lb" not in fresh.param_groups[0]


@pytest.mark.parametrize("name, key, value, message", [
    ("galore_adamw", "step", -1, r"'step' is -1, expected ≥ 0"),
    ("frugal", "adam_step", -5, r"'adam_step' is -5"),
    ("cosmos", "exp_avg_sq", -1.0, r"'exp_avg_sq' has negative values"),
    ("apollo", "limiter_norm", -2.0, r"'limiter_norm' has negative values"),
])
def test_impossible_state_values_are_refused_naming_the_field(name, key, value, message) -> None:
    params, optimizer, factory = _stepped(name)
    broken = copy.deepcopy(optimizer.state_dict())
    broken["state"][0][key].fill_(value)
    with pytest.raises(ValueError, match=rf"state {message}.* for param group 0, param 0"):
        factory(make_params()).load_state_dict(broken)


def _malformations(state_dict):
    """Structural damage of the kinds bit flips produce (a changed type, key or count)."""
    yield "params id a string", lambda sd: sd["param_groups"][0]["params"].__setitem__(0, "0")
    yield "params id repeated", lambda sd: sd["param_groups"][0]["params"].__setitem__(1, 0)
    yield "state key unknown", lambda sd: sd["state"].__setitem__(999, sd["state"][0])
    yield "state key a string", lambda sd: sd["state"].__setitem__("x", {})
    yield "state entry a list", lambda sd: sd["state"].__setitem__(0, [1, 2])
    yield "state entry key an int", lambda sd: sd["state"][0].__setitem__(7, torch.zeros(()))
    yield "group a list", lambda sd: sd["param_groups"].__setitem__(0, [0])
    yield "betas a string", lambda sd: sd["param_groups"][0].__setitem__("betas", "ab")
    yield "lr None", lambda sd: sd["param_groups"][0].__setitem__("lr", None)
    yield "memzoo a list", lambda sd: sd.__setitem__("memzoo", [1])
    yield "memzoo key renamed", lambda sd: sd["memzoo"].__setitem__("skipped_stepz", sd["memzoo"].pop("skipped_steps"))
    yield "format a float", lambda sd: sd["memzoo"].__setitem__("format", 2.0)
    yield "top-level key renamed", lambda sd: sd.__setitem__("statf", sd.pop("state"))
    yield "unknown top-level key", lambda sd: sd.__setitem__("extra", 1)


@pytest.mark.parametrize("name", ["galore_adamw", "cosmos", "sparse_mezo"])
def test_structurally_damaged_state_dicts_raise_value_error_only(name) -> None:
    params, optimizer, factory = _stepped(name)
    for what, damage in _malformations(optimizer.state_dict()):
        broken = copy.deepcopy(optimizer.state_dict())
        damage(broken)
        fresh = factory(make_params())
        with pytest.raises(ValueError):
            fresh.load_state_dict(broken)
        assert len(fresh.state) == 0, what


@pytest.mark.parametrize("name", ["galore_adamw", "apollo", "cosmos", "mezo"])
def test_bit_flips_in_saved_checkpoints_raise_value_error_or_load_exactly(name) -> None:
    from memzoo.optim.base import state_digest

    params, optimizer, factory = _stepped(name)
    buffer = io.BytesIO()
    optimizer.save_checkpoint(buffer)
    saved = buffer.getvalue()
    expected = state_digest(optimizer.state_dict())
    generator = torch.Generator().manual_seed(18)
    positions = torch.randint(0, len(saved) * 8, (40,), generator=generator).tolist()
    outcomes = {"refused": 0, "exact": 0}
    for bit in positions:
        damaged = bytearray(saved)
        damaged[bit // 8] ^= 1 << (bit % 8)
        fresh = factory(make_params())
        try:
            fresh.load_checkpoint(io.BytesIO(bytes(damaged)))
        except ValueError:
            outcomes["refused"] += 1
            assert len(fresh.state) == 0
            continue
        outcomes["exact"] += 1
        assert state_digest(fresh.state_dict()) == expected, bit
    assert outcomes["refused"] > 0
    # The undamaged file loads exactly, and a digest can be required.
    fresh = factory(make_params())
    fresh.load_checkpoint(io.BytesIO(saved), require_digest=True)
    assert state_digest(fresh.state_dict()) == expected
    plain = io.BytesIO()
    torch.save(optimizer.state_dict(), plain)
    with pytest.raises(ValueError, match="has no digest"):
        fresh.load_checkpoint(io.BytesIO(plain.getvalue()), require_digest=True)


def test_a_changed_value_is_caught_by_the_digest_only() -> None:
    params, optimizer, factory = _stepped("galore_adamw")
    state_dict = optimizer.state_dict()
    buffer = io.BytesIO()
    optimizer.save_checkpoint(buffer)
    stored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    stored["param_groups"][0]["lr"] = 0.10048828125  # one mantissa bit of 0.1: plausible, and wrong
    stored["state"][0]["exp_avg"][0, 0] += 1.0
    damaged = io.BytesIO()
    torch.save(stored, damaged)
    with pytest.raises(ValueError, match="does not match its digest"):
        factory(make_params()).load_checkpoint(io.BytesIO(damaged.getvalue()))
    assert state_dict["param_groups"][0]["lr"] == 0.1


# ---- interrupted steps (item 5) ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) during each test. A process started in
    the background by a non-interactive shell (``cmd &``) inherits SIGINT ignored; the step then
    rightly drops a Ctrl-C, as the process asked, and the real-signal tests below would fail for
    the environment's sake, not the code's."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_on_call(original, failing_calls, *, real_signal: bool):
    """A wrapper of ``original`` that, on the given calls, interrupts: with a real SIGINT raised
    at that point (Python runs the handler there, deterministically) or a KeyboardInterrupt
    raised directly before ``original`` runs."""
    import signal

    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) in failing_calls:
            if real_signal:
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    return wrapper


def _zo(name, params, backend):
    info = OPTIMIZERS[name]
    return info.cls([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}], **info.sample_kwargs,
                    n_samples=2, backend=backend)


def _loss(params):
    return lambda: sum((p - 0.3).square().sum() for p in params)


def _assert_restored(params, before, eps) -> None:
    """θ is put back: bitwise where the perturbed value kept θ's bits, and within one unit in the
    last place of the perturbed magnitude per perturbation undone (two: θ → θ+εz → θ−εz → θ)
    where its rounding lost some (the documented bound)."""
    exact = total = 0
    for p, q in zip(params, before):
        magnitude = q.abs() + 8 * eps
        ulp = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
        assert ((p - q).abs() <= 2 * ulp).all()
        exact += int((p == q).sum())
        total += q.numel()
    assert exact >= 0.9 * total


@pytest.mark.parametrize("name, backend, module", [
    ("mezo", "reference", "memzoo.reference.zeroth_order"),
    ("sparse_mezo", "reference", "memzoo.reference.zeroth_order"),
    ("mezo", "torch", "memzoo.triton_kernels.torch_backend.zeroth_order"),
])
def test_zeroth_order_steps_interrupted_anywhere_are_undone_or_completed(name, backend, module, monkeypatch) -> None:
    import importlib

    zo_reference = importlib.import_module(module)
    params = make_params()
    optimizer = _zo(name, params, backend)
    optimizer.step(_loss(params))
    before_params, before = snapshot(optimizer, params)
    eps = optimizer.eps
    # 2 samples × 3 passes × 2 groups = 12 kernel calls; calls 11 and 12 write the update.
    cases = [("closure", evaluation, False) for evaluation in (1, 2, 3, 4)]
    cases += [("kernel", call, real) for call in (2, 3, 6, 8, 10) for real in (False, True)]
    for where, call, real in cases:
        closure = _loss(params)
        if where == "closure":
            closure = _interrupt_on_call(closure, {call}, real_signal=False)
        else:
            monkeypatch.setattr(zo_reference, "zo_apply_", _interrupt_on_call(zo_reference.zo_apply_, {call},
                                                                              real_signal=real))
        with pytest.raises(KeyboardInterrupt):
            optimizer.step(closure)
        monkeypatch.undo()
        _assert_restored(params, before_params, eps)
        after = optimizer.state_dict()
        assert after["zeroth_order"] == before["zeroth_order"] and after["memzoo"] == before["memzoo"], (where, call)
        for key, entry in before["state"].items():
            for state_name, value in entry.items():
                assert torch.equal(after["state"][key][state_name], value), (where, call)
        with torch.no_grad():  # the next try starts from θ
            for p, q in zip(params, before_params):
                p.copy_(q)
    # A Ctrl-C while the update is written is held until the step is complete: fully after.
    twin_params = [p.detach().clone() for p in params]
    twin = _zo(name, twin_params, backend)
    twin.load_state_dict(optimizer.state_dict())
    twin.step(_loss(twin_params))
    monkeypatch.setattr(zo_reference, "zo_apply_", _interrupt_on_call(zo_reference.zo_apply_, {11}, real_signal=True))
    with pytest.raises(KeyboardInterrupt):
        optimizer.step(_loss(params))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    assert optimizer.state_dict()["zeroth_order"] == twin.state_dict()["zeroth_order"]


@pytest.mark.parametrize("name, module, function", [
    ("lion", "memzoo.reference.lion", "lion_update_"),
    ("galore_adamw", "memzoo.reference.galore", "galore_apply_"),
    ("frugal", "memzoo.reference.frugal", "frugal_apply_"),
    ("cosmos", "memzoo.reference.cosmos", "cosmos_apply_"),
])
def test_a_ctrl_c_while_a_first_order_step_writes_is_held_until_the_step_is_complete(name, module, function,
                                                                                     monkeypatch) -> None:
    import importlib

    info = OPTIMIZERS[name]
    params, twin_params = make_params(), make_params()
    optimizer = info.cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **info.sample_kwargs,
                         backend="reference")
    twin = info.cls([{"params": twin_params[:2]}, {"params": twin_params[2:], "lr": 0.05}], **info.sample_kwargs,
                    backend="reference")
    for seed in range(3):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        twin.step()
        if seed < 2:
            optimizer.step()
            continue
        kernels = importlib.import_module(module)
        monkeypatch.setattr(kernels, function, _interrupt_on_call(getattr(kernels, function), {1}, real_signal=True))
        with pytest.raises(KeyboardInterrupt):
            optimizer.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    assert copy.deepcopy(optimizer.state_dict())["state"].keys() == twin.state_dict()["state"].keys()


def test_a_keyboard_interrupt_in_the_closure_or_the_refresh_modifies_nothing(monkeypatch) -> None:
    import memzoo.optim.projector as projector_module

    params = make_params()
    for info in FIRST_ORDER:
        optimizer = info.cls(params, **info.sample_kwargs, backend="torch")
        snap = snapshot(optimizer, params)
        with pytest.raises(KeyboardInterrupt):
            optimizer.step(_interrupt_on_call(_loss(params), {1}, real_signal=False))
        assert_same(optimizer, params, snap)
    optimizer = OPTIMIZERS["galore_adamw"].cls(params, **OPTIMIZERS["galore_adamw"].sample_kwargs,
                                               projector="svd", backend="torch")
    set_grads(params, 0)
    snap = snapshot(optimizer, params)
    monkeypatch.setattr(projector_module, "compute_bases",
                        _interrupt_on_call(projector_module.compute_bases, {1}, real_signal=True))
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert len(optimizer.state) == 0
    assert_same(optimizer, params, snap)
