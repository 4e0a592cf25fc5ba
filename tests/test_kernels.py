"""Every registered Triton kernel (through the interpreter on CPU) and its ``"torch"`` backend
twin against the reference."""

from __future__ import annotations

import importlib
import inspect
import itertools

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import KERNEL_TESTS, KernelTest
from support import AWKWARD_SHAPES, check_pair, log_uniform, shapes

from memzoo.bench.kernel_cases import KERNELS, LAYOUTS, as_list

KERNEL_LIST = list(KERNEL_TESTS.values())


def test_every_benchmarked_kernel_is_tested() -> None:
    """memzoo-bench kernels times the records of memzoo.bench.kernel_cases; each has its test
    record in tests/kernel_cases.py (and no test record names a kernel the benchmark lacks)."""
    assert list(KERNEL_TESTS) == list(KERNELS)
    assert all(test.pair is KERNELS[name] for name, test in KERNEL_TESTS.items())


def _hparams(kernel: KernelTest):
    fields = {
        name: (log_uniform(low, high) if low > 0 else st.floats(low, high))
        for name, (low, high) in kernel.hparam_ranges.items()
    }
    fields.update({flag: st.booleans() for flag in kernel.flags})
    fields.update({name: st.sampled_from(options) for name, options in kernel.choices.items()})
    return st.fixed_dictionaries(fields)


def _dtypes(kernel: KernelTest):
    return st.fixed_dictionaries({role: st.sampled_from(options)
                                  for role, options in kernel.pair.dtype_options.items()})


def _skip_if_torch_twin_is_the_reference(kernel: KernelTest, backend: str) -> None:
    if backend == "torch" and kernel.pair.torch_path() is kernel.pair.reference():
        pytest.skip(f"backend='torch' runs the reference's own {kernel.name}")


def _check_drawn_case(kernel: KernelTest, data, backend: str) -> None:
    _skip_if_torch_twin_is_the_reference(kernel, backend)
    low, high = kernel.pair.shape_dims
    shape_list = data.draw(st.lists(shapes(min_dims=low, max_dims=high), min_size=1, max_size=kernel.max_tensors),
                           label="shapes")
    check_pair(
        kernel,
        shape_list,
        data.draw(_dtypes(kernel), label="dtypes"),
        data.draw(_hparams(kernel), label="hparams"),
        data.draw(st.sampled_from(LAYOUTS), label="layout"),
        KERNEL_DEVICE,
        data.draw(st.integers(0, 2**31 - 1), label="seed"),
        backend,
    )


@pytest.mark.parametrize("pair", KERNEL_LIST, ids=lambda p: p.name)
@given(data=st.data())
def test_kernel_matches_reference(pair: KernelTest, data) -> None:
    _check_drawn_case(pair, data, "triton")


@pytest.mark.parametrize("pair", KERNEL_LIST, ids=lambda p: p.name)
@settings(max_examples=15)
@given(data=st.data())
def test_torch_path_matches_reference(pair: KernelTest, data) -> None:
    """The "torch" backend's twin under the same draws and tolerances as the kernel."""
    _check_drawn_case(pair, data, "torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", KERNEL_LIST, ids=lambda p: p.name)
def test_kernel_awkward_shapes(pair: KernelTest, layout: str, backend: str) -> None:
    """The awkward shapes (all in one call for multi-tensor kernels), every dtype combination and
    every discrete choice on contiguous tensors; on strided and transposed ones (where only the
    addressing differs) the first and last combination of choices, which keeps the interpreted
    suite within its time budget (the "torch" twins run every combination on every layout)."""
    _skip_if_torch_twin_is_the_reference(pair, backend)
    low, high = pair.pair.shape_dims
    awkward = [s for s in AWKWARD_SHAPES if low <= len(s) <= high]
    groups = [awkward] if pair.max_tensors >= len(awkward) else [[s] for s in awkward]
    settings = [dict(zip(pair.choices, values)) for values in itertools.product(*pair.choices.values())]
    if backend == "triton" and layout != "contiguous" and len(settings) > 2:
        settings = [settings[0], settings[-1]]
    for param_dtype in pair.pair.dtype_options["param"]:
        dtypes = {role: options[-1] for role, options in pair.pair.dtype_options.items()}
        dtypes["param"] = param_dtype
        for choice in settings or [{}]:
            hparams = {**pair.pair.bench_hparams, **choice}
            if "lr" in hparams:
                hparams["lr"] = 0.05
            for shape_list in groups:
                check_pair(pair, shape_list, dtypes, hparams, layout, KERNEL_DEVICE, seed=1234, backend=backend)


@pytest.mark.parametrize("pair", KERNEL_LIST, ids=lambda p: p.name)
def test_kernel_rejects_mismatched_shapes(pair: KernelTest) -> None:
    generator = torch.Generator().manual_seed(0)
    kernel = pair.pair
    dtypes = {role: options[0] for role, options in kernel.dtype_options.items()}
    hparams = {**kernel.bench_hparams, **{name: options[0] for name, options in pair.choices.items()}}
    case = kernel.make_case([(3, 4)], dtypes, KERNEL_DEVICE, generator, hparams)
    if not all(isinstance(t, torch.Tensor) for t in as_list(case.args[1])):
        pytest.skip("the second argument is not tensors (its checks have their own tests)")
    # Give the second argument a wrong shape.
    args = list(case.args)
    wrong = lambda t: torch.zeros(t.shape[0] + 1, 7, dtype=t.dtype, device=t.device)  # noqa: E731
    args[1] = wrong(args[1]) if isinstance(args[1], torch.Tensor) else [wrong(t) for t in args[1]]
    for fn in (kernel.reference(), kernel.triton(), kernel.torch_path()):
        with pytest.raises(ValueError, match="shape"):
            fn(*args, **case.kwargs)


# Families without Triton kernels (no KernelPair) have a torch twin all the same.
@pytest.mark.parametrize("family", sorted({pair.family for pair in KERNELS.values()} | {"random", "adam_mini"}))
def test_torch_path_has_the_reference_names_and_signatures(family: str) -> None:
    """backend="torch" swaps the module: every reference function must be there, same signature."""
    reference = importlib.import_module(f"memzoo.reference.{family}")
    fast = importlib.import_module(f"memzoo.triton_kernels.torch_backend.{family}")
    assert set(reference.__all__) <= set(fast.__all__)
    for name in reference.__all__:
        ours, theirs = getattr(fast, name), getattr(reference, name)
        if callable(theirs):
            assert inspect.signature(ours) == inspect.signature(theirs), name
        else:
            assert ours == theirs, name
