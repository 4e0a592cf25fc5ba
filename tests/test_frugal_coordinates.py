"""FRUGAL's RandK (coordinate) subspaces on the ``"torch"`` backend: the selection as indices
(gathers and one pass over W instead of 0/1 factor products), held to the reference — which
defines the update by those products — also where they spread a non-finite value over its row."""

from __future__ import annotations

import pytest
import torch

import memzoo.triton_kernels.torch_backend.frugal as fast
from memzoo.optim import FRUGAL
from memzoo.reference import frugal as reference

INF, NAN = float("inf"), float("nan")
HPARAMS = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=0.05, residual_step=0.01, residual_rule="sign_sgd",
               decay=0.01, residual_threshold=1e-2)


def _case(side: str, seed: int = 0) -> tuple[list[torch.Tensor], ...]:
    """Two 6×8 (left: 8×6) float32 matrices, their moments and 3 selected columns (rows) each."""
    generator = torch.Generator().manual_seed(seed)
    shape = (6, 8) if side == "right" else (8, 6)
    size = 8
    params, grads, exp_avgs, exp_avg_sqs, indices = [], [], [], [], []
    for _ in range(2):
        chosen = torch.randperm(size, generator=generator)[:3].sort().values
        low_rank = (6, 3) if side == "right" else (3, 6)
        params.append(torch.randn(shape, generator=generator))
        grads.append(torch.randn(shape, generator=generator))
        exp_avgs.append(torch.randn(low_rank, generator=generator))
        exp_avg_sqs.append(torch.randn(low_rank, generator=generator).abs())
        indices.append(chosen)
    return params, grads, exp_avgs, exp_avg_sqs, indices


def _entry(side: str, chosen: torch.Tensor, selected: bool) -> tuple[int, int]:
    """A (row, column) of a matrix at a selected coordinate or at an unselected one."""
    mask = torch.zeros(8, dtype=torch.bool)
    mask[chosen] = True
    coordinate = int(torch.nonzero(mask if selected else ~mask)[1])
    return (2, coordinate) if side == "right" else (coordinate, 2)


def _assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """NaN where the reference has NaN, the same infinities, the finite values to float32 rounding."""
    assert torch.equal(actual.isnan(), expected.isnan()), (what, actual, expected)
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], expected[infinite]), what
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-6, atol=1e-7, msg=what)


def _run_both(case: tuple[list[torch.Tensor], ...], side: str, **overrides) -> None:
    expected = tuple([t.clone() for t in tensors] for tensors in case)
    actual = tuple([t.clone() for t in tensors] for tensors in case)
    hparams = {**HPARAMS, **overrides}
    reference.frugal_coordinates_step_(*expected, side=side, **hparams)
    fast.frugal_coordinates_step_(*actual, side=side, **hparams)
    for name, position in (("params", 0), ("exp_avgs", 2), ("exp_avg_sqs", 3)):
        for index, (a, e) in enumerate(zip(actual[position], expected[position])):
            _assert_same_values(a, e, f"{name}[{index}]")


# (tensor, where in it, value): G at a selected or unselected coordinate; a moment's entry.
NONFINITE = [("grad", True, INF), ("grad", False, INF), ("grad", True, NAN), ("grad", False, NAN),
             ("grad", False, -INF), ("exp_avg", True, INF), ("exp_avg_sq", True, NAN)]


def _damage(case: tuple[list[torch.Tensor], ...], side: str, tensor: str, selected: bool, value: float) -> None:
    params, grads, exp_avgs, exp_avg_sqs, indices = case
    if tensor == "grad":
        grads[0][_entry(side, indices[0], selected)] = value
    else:  # an entry of R's shape: row 2 of m×r (columns) or column 2 of r×n (rows)
        moment = exp_avgs[0] if tensor == "exp_avg" else exp_avg_sqs[0]
        moment[(2, 1) if side == "right" else (1, 2)] = value


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("tensor, selected, value", NONFINITE,
                         ids=[f"{t}-{'selected' if s else 'unselected'}-{v}" for t, s, v in NONFINITE])
def test_nonfinite_gradient_or_moment_gives_the_reference_values(side, tensor, selected, value) -> None:
    """The reference's 0/1 products make a non-finite G entry a NaN row of R, up(N) and E (and a
    non-finite N entry a NaN row of up(N)); the other matrix of the call takes the gathers."""
    for rule, threshold in (("sign_sgd", 1e-2), ("sgd", 0.0), ("no", 0.0)):
        case = _case(side)
        _damage(case, side, tensor, selected, value)
        _run_both(case, side, residual_rule=rule, residual_threshold=threshold)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_plain_gather_fails_the_nonfinite_comparison(side, monkeypatch) -> None:
    """Negative control: with the exactness check off (gathers for every matrix, as a plain index
    implementation does) each non-finite case above differs from the reference."""
    monkeypatch.setattr(fast, "_gather_is_exact", lambda value: True)
    for tensor, selected, value in NONFINITE:
        case = _case(side)
        _damage(case, side, tensor, selected, value)
        with pytest.raises(AssertionError):
            _run_both(case, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_finite_matrices_never_form_the_factors(side, monkeypatch) -> None:
    """A finite call gathers: no 0/1 factor, no composition of the factor kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the factor path ran on finite inputs")

    monkeypatch.setattr(fast, "run_coordinates_step", forbidden)
    monkeypatch.setattr(fast, "selection_factor", forbidden)
    case = _case(side)
    fast.frugal_coordinates_step_(*case, side=side, **HPARAMS)


def test_bad_indices_are_refused_before_anything_is_written() -> None:
    case = _case("right")
    before = [t.clone() for t in case[0]]
    repeated = [case[4][0], torch.tensor([1, 1, 2])]
    for module in (reference, fast):
        with pytest.raises(ValueError, match="distinct"):
            module.frugal_coordinates_step_(*case[:4], repeated, side="right", **HPARAMS)
        with pytest.raises(ValueError, match="distinct"):
            module.frugal_coordinates_step_(*case[:4], [case[4][0], torch.tensor([0, 3, 8])], side="right", **HPARAMS)
        with pytest.raises(TypeError, match="int64"):
            module.frugal_coordinates_step_(*case[:4], [case[4][0], case[4][1].float()], side="right", **HPARAMS)
        with pytest.raises(ValueError, match="side"):
            module.frugal_coordinates_step_(*case, side="full", **HPARAMS)
    assert all(torch.equal(a, b) for a, b in zip(case[0], before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_inf_gradient_gives_the_reference_trajectory(dtype) -> None:
    """The optimizer (RandK columns) on the torch backend vs the reference backend over steps with
    an Inf in one gradient: the same NaN rows in the weight and the moments, the rest as close as
    the finite steps."""
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(12, 8, generator=generator).to(dtype), torch.randn(8, 12, generator=generator).to(dtype)]
    grads = [[torch.randn(t.shape, generator=generator).to(dtype) for t in start] for _ in range(3)]
    grads[1][0][4, 5] = INF
    grads[1][1][2, 7] = -INF
    results = []
    for backend in ("reference", "torch"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = FRUGAL(params, lr=0.05, weight_decay=0.1, density=0.5, projector="coordinates",
                           update_proj_gap=2, backend=backend)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append((params, optimizer))
    (expected, reference_optimizer), (actual, fast_optimizer) = results
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a.isnan(), e.isnan()) and a.isnan().any(), index
        torch.testing.assert_close(a[~e.isnan()], e[~e.isnan()])
        for name in ("exp_avg", "exp_avg_sq"):
            ours, theirs = fast_optimizer.state[a][name], reference_optimizer.state[e][name]
            assert torch.equal(ours.isnan(), theirs.isnan()), (index, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("signed", [True, False])
def test_compiled_pass_function_is_the_chunked_pass(dtype, signed) -> None:
    """The function the CompiledPass compiles (run eagerly here; compiling it costs ~30 s) gives
    the chunked pass's values, per-matrix coefficients included (0: the decay alone)."""
    generator = torch.Generator().manual_seed(5)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in ((9, 7), (3, 300))]
    grads = [torch.randn(w.shape, generator=generator).to(dtype) for w in weights]
    grads[0][1, 2] = 0.0  # sign(0) = 0
    coefficients, decay = [-0.01, 0.0], 0.02
    chunked = [w.clone() for w in weights]
    for weight, grad, coefficient in zip(chunked, grads, coefficients):
        fast._decay_and_residual_pass([weight], [grad], decay=decay, coefficient=coefficient, signed=signed)
    fast._residual_pass(weights, grads, [torch.tensor(c) for c in coefficients], torch.tensor(1.0 - decay), signed)
    for ours, theirs in zip(weights, chunked):
        torch.testing.assert_close(ours, theirs, rtol=2**-23 if dtype == torch.float32 else 2**-7, atol=0.0)


def test_a_failing_compile_falls_back_to_the_chunked_pass(monkeypatch) -> None:
    """MEMZOO_TORCH_COMPILE=always where compiling fails: one RuntimeWarning, the reference's values."""
    from memzoo.triton_kernels.torch_backend import compiled

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler (injected)")
        return run

    monkeypatch.setenv(compiled.COMPILE_ENV, "always")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fast, "_COMPILED_RESIDUAL", compiled.CompiledPass(fast._residual_pass, "FRUGAL residual pass"))
    with pytest.warns(RuntimeWarning, match="FRUGAL residual pass"):
        _run_both(_case("right"), "right")
    _run_both(_case("left"), "left")  # no second warning needed: eager from now on


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_squared_norm_by_chunks_is_the_whole_norm(dtype) -> None:
    """‖G‖² of a low-precision gradient larger than a chunk is summed chunk by chunk (no float32
    copy of G): like the reference's vector_norm, a float32 sum within its rounding of the exact
    value (2·10⁵ terms: ~1e-5 relative; a chunk dropped or counted twice: ≥ 0.2)."""
    from memzoo.triton_kernels.torch_backend.elementwise import CHUNK

    grad = torch.randn(3, CHUNK // 2 + 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = torch.linalg.vector_norm(grad.double()).square()
    whole = torch.linalg.vector_norm(grad, dtype=torch.float32).double().square()  # the reference's
    torch.testing.assert_close(whole, exact, rtol=5e-5, atol=0.0)
    torch.testing.assert_close(fast._squared_norm(grad, torch.float32), exact, rtol=5e-5, atol=0.0)
    transposed = grad.T  # dense, not contiguous: chunks in memory order
    torch.testing.assert_close(fast._squared_norm(transposed, torch.float32), exact, rtol=5e-5, atol=0.0)
