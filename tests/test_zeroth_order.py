"""The zeroth-order family: the perturbation stream, the SPSA core and its closure protocol,
MeZO, Sparse-MeZO, QZO on bitsandbytes 4-bit layers, checkpoints and distributed ZO."""

from __future__ import annotations

import copy
import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import KERNEL_DEVICE
from support import assert_close

from memzoo.optim import QZO, MeZO, SparseMeZO, collect_quantization_scales
from memzoo.optim.registry import OPTIMIZERS
from memzoo.optim.zeroth_order import magnitude_threshold, sample_seed
from memzoo.reference import zeroth_order as reference
from memzoo.reference.zeroth_order import CHUNK, pack_mask, unpack_mask, zo_normals

ZO_INFOS = [info for info in OPTIMIZERS.values() if info.zeroth_order]
BACKENDS = ["torch", "triton"]


# ---- the stream ------------------------------------------------------------------------------

def test_stream_is_standard_normal_and_reproducible() -> None:
    n = 2**20
    z = zo_normals(sample_seed(0, 0, 0), torch.arange(n))
    # Mean and variance within 5 standard errors (se 1/√n and √(2/n)).
    assert abs(z.double().mean().item()) < 5 / math.sqrt(n)
    assert abs(z.double().var().item() - 1.0) < 5 * math.sqrt(2 / n)
    # Shape: the fraction within one standard deviation and the fourth moment.
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 5 * math.sqrt(0.2166 / n)
    assert abs(z.double().pow(4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    assert torch.equal(z, zo_normals(sample_seed(0, 0, 0), torch.arange(n)))  # equal seeds, equal draws


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_stream_is_independent_across_lanes_parameters_steps_and_samples() -> None:
    n = 2**18
    bound = 5 / math.sqrt(n)
    index = torch.arange(n)
    base = zo_normals(sample_seed(3, 0, 0), index)
    # The four lanes of one Philox call (two Box–Muller pairs): cos/sin partners are independent.
    chunks = base.view(-1, 4, CHUNK // 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_correlation(chunks[:, i], chunks[:, j])) < bound
    # Another parameter (a later stream offset), the next step, another sample, another base seed.
    others = [zo_normals(sample_seed(3, 0, 0), index + n), zo_normals(sample_seed(3, 1, 0), index),
              zo_normals(sample_seed(3, 0, 1), index), zo_normals(sample_seed(4, 0, 0), index)]
    for other in others:
        assert abs(_correlation(base, other)) < bound
        assert not torch.equal(base, other)


def test_sample_seeds_are_distinct_and_in_range() -> None:
    seeds = {sample_seed(base, step, k) for base in (0, 1, 2**62) for step in range(50) for k in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_mask_packing_round_trips_and_matches_bit_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3 * CHUNK, generator=generator) < 0.3
    packed = pack_mask(mask)
    assert packed.numel() == 3 * CHUNK // 8 and torch.equal(unpack_mask(packed), mask)
    byte, bit = reference.mask_bit_positions(torch.arange(3 * CHUNK))
    assert torch.equal(((packed[byte].int() >> bit) & 1).bool(), mask)


def test_kernel_draws_the_reference_stream() -> None:
    """A perturb pass from zeros with ε = 1 writes z itself: the kernel's z is the reference's."""
    from memzoo.triton_kernels import zeroth_order as kernels

    shapes = [(3, 5), (CHUNK + 7,), (1,)]
    offsets = [CHUNK * 9, CHUNK * 10, CHUNK * 12]
    seed = 2**61 + 12345
    params = [torch.zeros(s, device=KERNEL_DEVICE) for s in shapes]
    kernels.zo_apply_(params, offsets, seed=seed, eps=1.0, from_sign=0, to_sign=1)
    for param, offset in zip(params, offsets):
        expected = zo_normals(seed, torch.arange(offset, offset + param.numel())).view(param.shape)
        assert_close(param.cpu(), expected, 8 * 2.0**-24 * expected.abs(), what="kernel z")


def test_kernel_writes_the_reference_mask() -> None:
    from memzoo.triton_kernels import zeroth_order as kernels

    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=generator) for s in [(40, 30), (5,), (2 * CHUNK + 1,)]]
    offsets = [0, 2 * CHUNK, 3 * CHUNK]
    mask_offsets = [0, 256, 384]
    thresholds = [0.5, math.inf, -math.inf]
    bits = {}
    for name, module in (("torch", reference), ("triton", kernels)):
        tensors = [p.clone().to(KERNEL_DEVICE) for p in params]
        bits[name] = torch.zeros(768, dtype=torch.uint8, device=KERNEL_DEVICE)
        module.zo_apply_(tensors, offsets, seed=5, eps=1e-3, from_sign=0, to_sign=1, thresholds=thresholds,
                         mask_bits=bits[name], mask_offsets=mask_offsets, write_mask=True)
    assert torch.equal(bits["torch"].cpu(), bits["triton"].cpu())
    mask = unpack_mask(bits["torch"])
    assert torch.equal(mask[:1200], params[0].reshape(-1).abs() <= 0.5)
    assert mask[2048:2053].all() and not mask[3072:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zo_apply_rejects_bad_arguments_before_any_change(backend: str) -> None:
    from memzoo.triton_kernels import load_family

    module = reference if backend == "torch" else load_family("zeroth_order")
    params = [torch.randn(3, 4, device=KERNEL_DEVICE), torch.randn(5, device=KERNEL_DEVICE)]
    before = [p.clone() for p in params]
    bad_calls = [
        ({"stream_offsets": [0]}, ValueError, "entries"),
        ({"stream_offsets": [0, 100]}, ValueError, "multiple of 1024"),
        ({"from_sign": 2}, ValueError, "from_sign"),
        ({"coefficients": torch.ones(2, device=KERNEL_DEVICE)}, ValueError, "coefficients has shape"),
        ({"coefficients": torch.ones(1, dtype=torch.float64)}, TypeError, "float32"),
        ({"earlier_seeds": [1]}, ValueError, "without coefficients"),
        ({"seed": -1}, ValueError, "seed"),
        ({"thresholds": [1.0, 1.0]}, ValueError, "mask_bits"),
        ({"thresholds": [1.0, 1.0], "mask_offsets": [0, 128], "from_sign": 1, "write_mask": True,
          "mask_bits": torch.zeros(256, dtype=torch.uint8, device=KERNEL_DEVICE)}, ValueError, "unperturbed"),
        ({"thresholds": [1.0, 1.0], "mask_offsets": [0, 128],
          "mask_bits": torch.zeros(100, dtype=torch.uint8, device=KERNEL_DEVICE)}, ValueError, "bytes"),
    ]
    for overrides, error, match in bad_calls:
        kwargs = {"stream_offsets": [0, CHUNK], "seed": 1, "eps": 1e-3, "from_sign": 0, "to_sign": 1, **overrides}
        offsets = kwargs.pop("stream_offsets")
        with pytest.raises(error, match=match):
            module.zo_apply_(params, offsets, **kwargs)
        assert all(torch.equal(p, b) for p, b in zip(params, before)), overrides
    with pytest.raises(TypeError, match="int64"):
        module.zo_apply_([torch.zeros(3, dtype=torch.int64)], [0], seed=1, eps=1e-3, from_sign=0, to_sign=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_three_passes_restore_better_than_the_official_four(dtype: torch.dtype) -> None:
    """Recovering from the stored perturbed value restores every element whose rounding kept
    its bits; the official θ + εz − 2εz + εz in the parameter dtype drifts far more often."""
    generator = torch.Generator().manual_seed(0)
    original = (torch.randn(200, 100, generator=generator) * 0.05).to(dtype)
    x = original.clone()
    for from_sign, to_sign in ((0, 1), (1, -1), (-1, 0)):
        reference.zo_apply_([x], [0], seed=11, eps=1e-3, from_sign=from_sign, to_sign=to_sign)
    ours = (x != original).double().mean().item()
    z = zo_normals(11, torch.arange(x.numel())).view_as(x).to(dtype)
    official = original.clone().add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    theirs = (official != original).double().mean().item()
    assert ours < 0.25 * theirs and ours < 0.1
    # What is not restored exactly is one rounding of the perturbed value away.
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    allowed = 2 * unit * (original.double().abs() + 1e-3 * 5.7) + (1e-7 if dtype == torch.float16 else 0.0)
    assert ((x.double() - original.double()).abs() <= allowed).all()


# ---- the SPSA core -------------------------------------------------------------------------

def _least_squares(dim: int = 6, rows: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    b = torch.randn(rows, generator=generator, dtype=torch.float64)
    theta = torch.randn(dim, generator=generator, dtype=torch.float64)
    return a, b, theta


def test_spsa_estimate_is_unbiased_on_least_squares() -> None:
    """For a quadratic the central difference is exact, ĝ = ∇L·z, so E[ĝ z] = ∇L. Averaged over
    N directions the relative error is about √((d + 1)/N); the bound is four times that."""
    a, b, theta = _least_squares(dim=4)
    param = theta.clone()
    loss = lambda: 0.5 * (a @ param - b).square().sum()  # noqa: E731
    optimizer = MeZO([param], lr=0.0, eps=1e-3, n_samples=500, seed=7, backend="torch")
    estimate = torch.zeros_like(theta)
    steps = 3
    for step in range(steps):
        optimizer.step(loss)
        for k, projected in enumerate(optimizer.last_projected_grads):
            z = zo_normals(sample_seed(7, step, k), torch.arange(theta.numel())).double()
            estimate += projected * z
    assert torch.equal(param, theta)  # lr = 0: every pass restored exactly (float64)
    estimate /= steps * 500
    gradient = a.T @ (a @ theta - b)
    relative = ((estimate - gradient).norm() / gradient.norm()).item()
    assert relative < 4 * math.sqrt((theta.numel() + 1) / (steps * 500)), relative


def test_step_applies_the_mezo_update() -> None:
    """One step by hand: θ ← θ(1 − ηλ) − (η/q) Σ ĝ_k z_k, with ĝ_k the central differences."""
    a, b, theta = _least_squares(seed=1)
    param = theta.clone()
    loss = lambda: 0.5 * (a @ param - b).square().sum()  # noqa: E731
    lr, eps, decay = 0.01, 1e-3, 0.1
    optimizer = MeZO([param], lr=lr, eps=eps, weight_decay=decay, n_samples=3, seed=3, backend="torch")
    returned = optimizer.step(loss)
    expected = theta * (1 - lr * decay)
    losses = []
    for k in range(3):
        z = zo_normals(sample_seed(3, 0, k), torch.arange(theta.numel())).double()
        plus = 0.5 * (a @ (theta + eps * z) - b).square().sum()
        minus = 0.5 * (a @ (theta - eps * z) - b).square().sum()
        losses += [plus, minus]
        expected -= lr / 3 * ((plus - minus) / (2 * eps)) * z
    assert torch.allclose(param, expected, rtol=1e-6, atol=1e-9)
    assert torch.allclose(returned, torch.stack(losses).mean())
    assert optimizer.last_losses.shape == (3, 2) and optimizer.last_projected_grads.shape == (3,)


def test_qzo_steps_follow_the_official_update() -> None:
    """Three QZO steps by hand, as the official zo_step / zo_update (q = 1): ĝ = (L₊ − L₋)/(2ε)
    clipped to [−C, C] (DDC), then Δ ← max(Δ − η ĝ z, 1e-7) — the clip and the floor both act."""
    a, b, theta = _least_squares(seed=2)
    start = theta.abs() + 0.05  # positive, as scales are
    scale = start.clone()
    loss = lambda: 0.5 * (a @ scale - b).square().sum()  # noqa: E731
    lr, eps, clip = 0.2, 1e-3, 20.0
    optimizer = QZO([scale], lr=lr, eps=eps, clip_threshold=clip, seed=4, backend="torch")
    expected, clipped, floored = start.clone(), 0, 0
    for step in range(3):
        optimizer.step(loss)
        z = zo_normals(sample_seed(4, step, 0), torch.arange(theta.numel())).double()
        plus = 0.5 * (a @ (expected + eps * z) - b).square().sum()
        minus = 0.5 * (a @ (expected - eps * z) - b).square().sum()
        estimate = (plus - minus) / (2 * eps)
        clipped += int(estimate.abs() > clip)
        moved = expected - lr * estimate.clamp(-clip, clip) * z
        floored += int((moved < 1e-7).sum())
        expected = moved.clamp_min(1e-7)
        torch.testing.assert_close(scale, expected, rtol=1e-6, atol=1e-9)
    assert clipped and floored


def _mlp(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def _regression_task(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=generator)
    teacher = _mlp(seed + 100)
    with torch.no_grad():
        y = teacher(x)
    return x, y


@pytest.mark.parametrize("cls,kwargs", [(MeZO, {}), (SparseMeZO, {"sparsity": 0.5})], ids=["mezo", "sparse_mezo"])
def test_zeroth_order_lowers_the_loss_of_a_small_model(cls, kwargs) -> None:
    x, y = _regression_task()
    model = _mlp(0)
    closure = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    initial = closure().item()
    optimizer = cls(model.parameters(), lr=0.02, eps=1e-3, backend="torch", **kwargs)
    for _ in range(250):
        optimizer.step(closure)
    assert closure().item() < 0.6 * initial


@pytest.mark.parametrize("cls,kwargs", [(MeZO, {}), (SparseMeZO, {"sparsity": 0.5})], ids=["mezo", "sparse_mezo"])
def test_frozen_parameters_are_neither_perturbed_nor_updated(cls, kwargs) -> None:
    """A LoRA-style model (frozen base layer) given whole: as the official trainers, only the
    parameters with requires_grad move — the same trajectory as an optimizer given those only."""
    x, y = _regression_task()
    runs = []
    for select in (False, True):
        model = _mlp(0)
        model[0].requires_grad_(False)
        frozen = [p.detach().clone() for p in model[0].parameters()]

        def closure():
            assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))  # never perturbed
            return torch.nn.functional.mse_loss(model(x), y)

        params = [p for p in model.parameters() if p.requires_grad] if select else model.parameters()
        optimizer = cls(params, lr=0.02, weight_decay=0.1, seed=3, backend="torch", **kwargs)
        for _ in range(3):
            optimizer.step(closure)
        assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(runs[0][2], _mlp(0)[2].weight)
    model = _mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter .* is frozen"):
        cls(model.parameters(), backend="torch", **kwargs).step(lambda: model(x).sum())


def test_sparse_mezo_with_every_weight_selected_equals_mezo() -> None:
    x, y = _regression_task()
    results = []
    for cls, kwargs in ((MeZO, {}), (SparseMeZO, {"sparsity": 0.0, "mask_1d": True})):
        model = _mlp(0)
        optimizer = cls(model.parameters(), lr=0.02, weight_decay=0.01, eps=1e-3, seed=5, backend="torch", **kwargs)
        for _ in range(5):
            optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mezo_moves_exactly_the_small_weights(backend: str) -> None:
    x, y = _regression_task()
    model = _mlp(0).to(KERNEL_DEVICE)
    xd, yd = x.to(KERNEL_DEVICE), y.to(KERNEL_DEVICE)
    optimizer = SparseMeZO(model.parameters(), lr=0.05, eps=1e-3, sparsity=0.75, backend=backend)
    for step in range(2):  # the second step: the mask from the moved weights, thresholds kept
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step(lambda: torch.nn.functional.mse_loss(model(xd), yd))
        for param, old in zip(model.parameters(), before):
            threshold = optimizer.state[param]["threshold"].item()
            moved = param != old
            if param.dim() >= 2:
                if step == 0:
                    assert threshold == magnitude_threshold(old, 0.75)
                    assert (old.abs() <= threshold).float().mean().item() == 0.25
                assert not moved[old.abs() > threshold].any()  # large weights never move
                assert moved[old.abs() <= threshold].float().mean() > 0.9
            else:
                assert math.isinf(threshold) and moved.float().mean() > 0.9  # 1-D: dense


def test_magnitude_threshold_selects_the_fraction() -> None:
    values = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    assert magnitude_threshold(values, 0.8) == 20.0
    assert magnitude_threshold(values, 0.0) == math.inf
    assert magnitude_threshold(values, 1.0) == -math.inf


@pytest.mark.parametrize("info", ZO_INFOS, ids=lambda i: i.name)
def test_backends_follow_the_same_trajectory(info) -> None:
    x, y = _regression_task()
    results = []
    for backend in ("reference", *BACKENDS):
        model = _mlp(0).to(KERNEL_DEVICE)
        optimizer = info.cls(model.parameters(), **{**info.sample_kwargs, "lr": 0.01}, n_samples=2, backend=backend)
        for _ in range(3):
            optimizer.step(lambda: torch.nn.functional.mse_loss(model(x.to(KERNEL_DEVICE)), y.to(KERNEL_DEVICE)))
        results.append([p.detach().cpu() for p in model.parameters()])
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            assert_close(a, b, 1e-5, what=info.name)


# ---- closure protocol, bad input ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", ZO_INFOS, ids=lambda i: i.name)
def test_bad_closures_raise_with_parameters_restored(info, backend: str) -> None:
    model = _mlp(0).to(KERNEL_DEVICE)
    params = list(model.parameters())
    optimizer = info.cls(params, **info.sample_kwargs, backend=backend)
    before = [p.detach().clone() for p in params]

    def assert_restored() -> None:
        # Within one rounding of the perturbed value, and all but a few elements bit-identical.
        for param, old in zip(params, before):
            assert_close(param.detach(), old, 2 * 2.0**-24 * (old.abs() + 6e-3), what="restored")
        changed = sum(int((param != old).sum()) for param, old in zip(params, before))
        assert changed <= 0.05 * sum(p.numel() for p in params)
        assert optimizer._step_count == 0 and optimizer.last_losses is None

    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    x = torch.randn(4, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="scalar loss"):
        optimizer.step(lambda: model(x))  # (4, 1) outputs, not reduced
    assert_restored()
    with pytest.raises(TypeError, match="the loss"):
        optimizer.step(lambda: "loss")
    assert_restored()
    calls = []

    def fails_second_time():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of data")
        return model(x).sum()

    with pytest.raises(RuntimeError, match="out of data"):
        optimizer.step(fails_second_time)  # at θ − εz
    assert_restored()
    with pytest.raises(RuntimeError):  # backward inside the closure: no graph under no_grad
        optimizer.step(lambda: model(x).sum().backward())
    assert_restored()

    @torch.enable_grad()
    def backpropagates():  # what PyTorch Lightning's automatic optimization closure does
        loss = model(x).sum()
        loss.backward()
        return loss.detach()

    with pytest.raises(RuntimeError, match="ran backward.*automatic_optimization = False"):
        optimizer.step(backpropagates)
    assert_restored()
    assert all(p.grad is None for p in params)


def test_defaults_are_the_official_examples() -> None:
    """MeZO's OPT-13B full-parameter example (lr 1e-6, ε 1e-3, no decay, one direction), the
    paper's sparsity 0.8, QZO's OPT-6.7B example (lr 1e-7, ε 1e-3) with its hard-coded DDC
    threshold 100 and scale floor 1e-7: what a user of the official scripts gets by default."""
    def defaults(cls):
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}

    official = {"lr": 1e-6, "eps": 1e-3, "weight_decay": 0.0, "n_samples": 1}
    assert official.items() <= defaults(MeZO).items()
    assert {**official, "sparsity": 0.8}.items() <= defaults(SparseMeZO).items()
    assert {**official, "lr": 1e-7, "clip_threshold": 100.0, "scale_min": 1e-7}.items() <= defaults(QZO).items()


def test_bad_constructor_arguments() -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    for cls, kwargs, error, match in [
        (MeZO, {"eps": 0.0}, ValueError, "eps"), (MeZO, {"eps": float("inf")}, ValueError, "eps"),
        (MeZO, {"n_samples": 0}, ValueError, "n_samples"), (MeZO, {"seed": -1}, ValueError, "seed"),
        (SparseMeZO, {"threshold_interval": 0}, ValueError, "threshold_interval"),
        (SparseMeZO, {"mask_1d": 1}, TypeError, "mask_1d"),
        (QZO, {"clip_threshold": -1.0}, ValueError, "clip_threshold"),
        (QZO, {"scale_min": float("nan")}, ValueError, "scale_min"),
    ]:
        with pytest.raises(error, match=match):
            cls(params, **kwargs)
    with pytest.raises(TypeError, match="uint8.*collect_quantization_scales"):
        QZO([torch.zeros(4, dtype=torch.uint8)])


# ---- checkpoints and memory -----------------------------------------------------------------------

@pytest.mark.parametrize("info", ZO_INFOS, ids=lambda i: i.name)
def test_state_dict_resume_is_bit_identical(info) -> None:
    x, y = _regression_task()

    def run(model, optimizer, steps):
        for _ in range(steps):
            optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))

    kwargs = {**info.sample_kwargs, "seed": 123, "backend": "torch"}
    if info.name == "sparse_mezo":
        kwargs["threshold_interval"] = 2
    model = _mlp(0)
    optimizer = info.cls(model.parameters(), **kwargs)
    run(model, optimizer, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    run(model, optimizer, 3)
    resumed = _mlp(1)
    resumed.load_state_dict(saved_model)
    fresh = info.cls(resumed.parameters(), **{**kwargs, "seed": 999})
    fresh.load_state_dict(saved)
    run(resumed, fresh, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert fresh.state_dict()["zeroth_order"] == optimizer.state_dict()["zeroth_order"] == {"seed": 123, "step": 6}


def test_load_state_dict_rejects_other_optimizers() -> None:
    model = _mlp(0)
    mezo = MeZO(model.parameters())
    sparse = SparseMeZO(model.parameters())
    with pytest.raises(ValueError, match="'MeZO', not 'SparseMeZO'"):
        sparse.load_state_dict(mezo.state_dict())
    lion_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="zeroth_order"):
        mezo.load_state_dict(lion_state)
    broken = mezo.state_dict()
    broken["zeroth_order"]["seed"] = -5
    with pytest.raises(ValueError, match="seed"):
        mezo.load_state_dict(broken)


@pytest.mark.parametrize("info", ZO_INFOS, ids=lambda i: i.name)
def test_state_bytes_matches_analytic_count(info) -> None:
    model = _mlp(0)
    optimizer = info.cls(model.parameters(), **info.sample_kwargs, backend="torch")
    x, y = _regression_task()
    optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert optimizer.state_bytes() == info.expected_state_bytes(optimizer)
    if info.name == "sparse_mezo":  # 4 thresholds + 4 tensors' bits, one 128-byte chunk each
        assert optimizer.state_bytes() == 4 * 4 + 4 * 128


# ---- QZO -------------------------------------------------------------------------------------------

def _quantized_pair(quant_type: str, compress_statistics: bool = False, outputs: int = 16):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, outputs))
    student = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, compress_statistics=compress_statistics,
                          quant_type=quant_type),
        torch.nn.ReLU(),
        bnb.nn.Linear4bit(64, outputs, compute_dtype=torch.float32, compress_statistics=compress_statistics,
                          quant_type=quant_type),
    )
    student.load_state_dict(teacher.state_dict())
    return teacher, student.to("cpu")  # the move quantizes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qzo_trains_only_the_scales_and_lowers_the_loss(quant_type: str) -> None:
    teacher, student = _quantized_pair(quant_type)
    scales = collect_quantization_scales(student)
    assert [s.numel() for s in scales] == [64 * 64 // 64, 64 * 16 // 64] and scales[0].dtype == torch.float32
    with torch.no_grad():
        for scale in scales:  # a mis-scaled quantization for QZO to repair
            scale.mul_(torch.linspace(0.6, 1.4, scale.numel()))
    packed = [student[i].weight.detach().clone() for i in (0, 2)]
    biases = [student[i].bias.detach().clone() for i in (0, 2)]
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = teacher(x)
    closure = lambda: torch.nn.functional.mse_loss(student(x), y)  # noqa: E731
    initial = closure().item()
    optimizer = QZO(scales, lr=0.03, eps=1e-3, seed=1, backend="torch")
    for _ in range(100):
        optimizer.step(closure)
    assert closure().item() < 0.6 * initial
    for i, weight, bias in zip((0, 2), packed, biases):  # packed 4-bit data and biases untouched
        assert student[i].weight.dtype == torch.uint8 and torch.equal(student[i].weight, weight)
        assert torch.equal(student[i].bias, bias)
    assert all(bool((s > 0).all()) for s in scales)


def test_qzo_clips_the_directional_derivative_and_keeps_scales_positive() -> None:
    _, student = _quantized_pair("nf4")
    scales = collect_quantization_scales(student)
    x = torch.randn(8, 64)
    optimizer = QZO(scales, lr=10.0, eps=1e-3, clip_threshold=0.5, scale_min=1e-4, backend="torch")
    for _ in range(3):
        optimizer.step(lambda: student(x).square().mean() * 1e4)
        assert optimizer.last_projected_grads.abs().max() <= 0.5
    assert all(bool((s >= torch.tensor(1e-4)).all()) for s in scales)  # the fp32 bound
    assert any(bool((s == torch.tensor(1e-4)).any()) for s in scales)  # the clamp was hit


def test_qzo_trains_unquantized_tensors_with_plain_mezo() -> None:
    _, student = _quantized_pair("nf4")
    scales = collect_quantization_scales(student)
    biases = [student[0].bias, student[2].bias]
    before = [b.detach().clone() for b in biases]
    optimizer = QZO([{"params": scales}, {"params": biases, "scales": False, "weight_decay": 0.1}], lr=1e-2)
    x = torch.randn(8, 64)
    optimizer.step(lambda: student(x).square().mean())
    assert all(not torch.equal(b, o) for b, o in zip(biases, before))


def _mis_scaled_eval_task(student, teacher):
    """Collected scales mis-scaled for QZO to repair, and the closure of a regression on the
    teacher; the student in eval mode, as the README asks."""
    student.eval()
    scales = collect_quantization_scales(student)
    with torch.no_grad():
        for scale in scales:
            scale.mul_(torch.linspace(0.6, 1.4, scale.numel()))
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        y = teacher(x)
    return scales, lambda: torch.nn.functional.mse_loss(student(x), y)


def test_qzo_trains_the_scales_an_eval_mode_model_reads() -> None:
    """In eval mode, bitsandbytes (CPUs with AVX512-BF16) re-packs a Linear4bit at its first
    no-grad forward and replaces its scales by a bf16 copy: the collected scales must stay the
    ones the layers read, or QZO moves tensors nothing reads (projected gradient 0, no progress).
    (The re-pack needs layers of a multiple of 32 outputs.)"""
    teacher, student = _quantized_pair("nf4", outputs=32)
    scales, closure = _mis_scaled_eval_task(student, teacher)
    optimizer = QZO(scales, lr=0.03, eps=1e-3, seed=1, backend="torch")
    initial = closure().item()
    for _ in range(12):
        optimizer.step(closure)
        assert optimizer.last_projected_grads.abs().max() > 0
    assert closure().item() < 0.95 * initial
    for index, scale in zip((0, 2), scales):
        assert student[index].weight.quant_state.absmax is scale and scale.dtype == torch.float32


def test_collecting_after_an_eval_forward_undoes_the_cpu_repack() -> None:
    _, student = _quantized_pair("nf4", outputs=32)
    student.eval()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = student(x)  # re-packs the layers where the CPU has AVX512-BF16
    scales = collect_quantization_scales(student)
    assert [(s.dtype, s.shape) for s in scales] == [(torch.float32, (64,)), (torch.float32, (32,))]
    with torch.no_grad():
        after = student(x)
        torch.testing.assert_close(after, before, rtol=0, atol=0.02 * before.abs().max().item())
        scales[0].mul_(1.5)  # the model reads the collected tensors
        assert not torch.allclose(student(x), after, atol=1e-3)


def test_qzo_raises_when_a_layer_stops_reading_its_scales() -> None:
    _, student = _quantized_pair("nf4")
    scales = collect_quantization_scales(student)
    optimizer = QZO(scales, lr=1e-3, backend="torch")
    x = torch.randn(4, 64)
    optimizer.step(lambda: student(x).square().mean())
    state = student[2].weight.quant_state
    state.absmax = state.absmax.clone()  # what a move to another device does
    with pytest.raises(RuntimeError, match="layer '2' no longer reads the scale tensor.*collect_quantization_scales"):
        optimizer.step(lambda: student(x).square().mean())


def test_qzo_refuses_tensors_that_are_not_quantization_scales() -> None:
    model = _mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param group 0: param 0 .*nn.Parameter.*\"scales\": False"):
        QZO(model.parameters())
    with pytest.raises(ValueError, match="param group 1: param 0 .*negative values"):
        QZO([{"params": [torch.rand(4)]}, {"params": [torch.randn(64)]}])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    plain = QZO([{"params": model.parameters(), "scales": False}], lr=1e-2, backend="torch")  # MeZO with DDC
    plain.step(lambda: model(torch.ones(2, 8)).square().sum())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_collect_quantization_scales_explains_what_it_needs() -> None:
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layers.*bnb_4bit_use_double_quant=False"):
        collect_quantization_scales(_mlp(0))
    _, nested = _quantized_pair("nf4", compress_statistics=True)
    with pytest.raises(ValueError, match="double-quantized.*compress_statistics=False"):
        collect_quantization_scales(nested)


# ---- distributed -------------------------------------------------------------------------------

_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from memzoo.optim import MeZO, SparseMeZO
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator)
    cls = MeZO if sys.argv[4] == "mezo" else SparseMeZO
    optimizer = cls(model.parameters(), lr=0.01, eps=1e-3, seed=rank * 1000 + 1, n_samples=2)
    for _ in range(4):
        optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    torch.save({"params": [p.detach() for p in model.parameters()], "grads": optimizer.last_projected_grads,
                "seed": optimizer.state_dict()["zeroth_order"]["seed"]}, sys.argv[3] + f".{rank}")
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("name", ["mezo", "sparse_mezo"])
def test_distributed_ranks_stay_bit_identical(tmp_path, name: str) -> None:
    script = tmp_path / "zo_ddp.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    store, out = tmp_path / "store", tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(store), str(out), name], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert results[0]["seed"] == results[1]["seed"] == 1  # rank 0's seed everywhere
    assert torch.equal(results[0]["grads"], results[1]["grads"])
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


# ---- GPU: memory stays at inference level -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_peak_memory_is_inference_memory(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to(device, dtype)
    x = torch.randn(4, 2048, device=device, dtype=dtype)
    closure = lambda: model(x).float().square().mean()  # noqa: E731
    for backend in ("triton", "torch"):
        optimizer = MeZO(model.parameters(), lr=1e-6, backend=backend)
        optimizer.step(closure)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            closure()
        inference = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        optimizer.step(closure)
        extra = torch.cuda.max_memory_allocated() - base - inference
        if backend == "triton":
            assert extra <= 2**20, extra  # ≤ 1 MiB over inference
