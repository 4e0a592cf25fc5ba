"""Helpers shared by the tests: dtype-aware tolerances and shape strategies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from hypothesis import strategies as st

from memzoo.bench.baselines import import_official
from memzoo.bench.kernel_cases import as_list, clone_case

if TYPE_CHECKING:
    from kernel_cases import KernelTest

# How to get the official packages the trajectory tests compare against (pinned in that file).
ORACLE_INSTALL = "pip install --no-deps -r tests/oracles.txt"
# The start of the reason of every test skipped for a missing official package (the run's
# summary counts them: tests/conftest.py).
ORACLE_SKIP = "official package not installed:"


def official_package(module: str) -> Any:
    """The official optimizer package ``module`` (``galore_torch``, ``apollo_torch``), or a skip
    that says how to install it."""
    try:
        return import_official(module)
    except ValueError:
        pytest.skip(f"{ORACLE_SKIP} {module} (for the comparison with the official code: {ORACLE_INSTALL})")


# Relative tolerance per storage dtype: one unit in the last place (results are rounded once
# from fp32 math, and an implementation may differ from another by one rounding).
RTOL = {torch.float64: 1e-12, torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Absolute floor for values near zero (inputs are O(1); fp32 intermediate rounding is ~1e-7).
ATOL = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}

# Sizes that have broken element-wise kernels before: single elements, odd sizes around block
# boundaries, empty tensors. Listed so failures reproduce without hypothesis' database.
AWKWARD_SHAPES = [(1,), (311,), (9999,), (0,), (4097,), (17, 33), (3, 1, 5), ()]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, extra=0.0, *, what: str = "",
                 extra_rtol: float = 0.0) -> None:
    """|actual − expected| ≤ atol + rtol·|expected| + extra, element-wise, with the tolerances of
    the storage dtype; ``extra`` widens it where the math is discontinuous. Where either side is
    not finite the two must be the same: NaN where NaN, the same infinity where infinity (a NaN
    compares false with any bound, so a plain bound check would accept NaN for a number)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    dtype = expected.dtype
    actual64, expected64 = actual.double(), expected.double()
    difference = (actual64 - expected64).abs()
    bound = ATOL[dtype] + (RTOL[dtype] + extra_rtol) * expected64.abs()
    if isinstance(extra, torch.Tensor):
        bound = bound + extra.to(bound.device).double()
    else:
        bound = bound + extra
    nonfinite = ~torch.isfinite(actual64) | ~torch.isfinite(expected64)
    same = (actual64 == expected64) | (actual64.isnan() & expected64.isnan())
    bad = torch.where(nonfinite, ~same, difference > bound)
    if bad.any():
        index = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {index}: "
            f"actual {actual[tuple(index)].item()!r}, expected {expected[tuple(index)].item()!r}, "
            f"allowed {bound[tuple(index)].item():.3g}"
        )


@st.composite
def shapes(draw, max_dims: int = 3, max_side: int = 40, min_dims: int = 0) -> tuple[int, ...]:
    dims = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.integers(1, max_side)) for _ in range(dims))


def log_uniform(low: float, high: float):
    import math

    return st.floats(math.log(low), math.log(high)).map(math.exp)


def check_pair(kernel: KernelTest, shape_list, dtypes, hparams, layout, device, seed,
               backend: str = "triton") -> None:
    """Run the reference and ``backend``'s twin ("triton" or "torch") on copies of one case;
    compare the outputs under dtype tolerances (widened where the math is discontinuous) and
    check inputs are untouched."""
    generator = torch.Generator().manual_seed(seed)
    pair = kernel.pair
    case = pair.make_case(shape_list, dtypes, device, generator, hparams, layout)
    expected, actual = clone_case(case), clone_case(case)
    extra = kernel.extra_tolerance(case)
    pair.reference()(*expected.args, **expected.kwargs)
    pair.implementation(backend)(*actual.args, **actual.kwargs)
    for slot, output in enumerate(case.outputs):
        for index, (a, e) in enumerate(zip(as_list(actual.args[output]), as_list(expected.args[output]))):
            assert a.stride() == e.stride()
            assert_close(a, e, extra[slot][index],
                         what=f"{pair.name} ({backend}) output {output}[{index}] {dtypes} {layout}",
                         extra_rtol=kernel.extra_rtol)
    # Inputs that are not outputs must be left exactly as they were.
    for position, (before, after) in enumerate(zip(case.args, actual.args)):
        if position not in case.outputs:
            for b, a in zip(as_list(before), as_list(after)):
                same = torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
                assert same, f"{pair.name} modified input {position}"
