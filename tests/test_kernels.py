"""Every registered Triton kernel against its reference (through the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from hypothesis import given
from hypothesis import strategies as st
from support import AWKWARD_SHAPES, check_pair, log_uniform, shapes

from memzoo.triton_kernels.registry import KERNELS, LAYOUTS, KernelPair

PAIRS = list(KERNELS.values())


def _hparams(pair: KernelPair):
    fields = {
        name: (log_uniform(low, high) if low > 0 else st.floats(low, high))
        for name, (low, high) in pair.hparam_ranges.items()
    }
    fields.update({flag: st.booleans() for flag in pair.flags})
    return st.fixed_dictionaries(fields)


def _dtypes(pair: KernelPair):
    return st.fixed_dictionaries({role: st.sampled_from(options) for role, options in pair.dtype_options.items()})


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
@given(data=st.data())
def test_kernel_matches_reference(pair: KernelPair, data) -> None:
    shape_list = data.draw(st.lists(shapes(), min_size=1, max_size=4), label="shapes")
    check_pair(
        pair,
        shape_list,
        data.draw(_dtypes(pair), label="dtypes"),
        data.draw(_hparams(pair), label="hparams"),
        data.draw(st.sampled_from(LAYOUTS), label="layout"),
        KERNEL_DEVICE,
        data.draw(st.integers(0, 2**31 - 1), label="seed"),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_kernel_awkward_shapes(pair: KernelPair, layout: str) -> None:
    """All awkward shapes in one multi-tensor call, every dtype combination."""
    for param_dtype in pair.dtype_options["param"]:
        dtypes = {role: options[-1] for role, options in pair.dtype_options.items()}
        dtypes["param"] = param_dtype
        hparams = {**pair.bench_hparams, "lr": 0.05}
        check_pair(pair, AWKWARD_SHAPES, dtypes, hparams, layout, KERNEL_DEVICE, seed=1234)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_kernel_rejects_mismatched_shapes(pair: KernelPair) -> None:
    generator = torch.Generator().manual_seed(0)
    dtypes = {role: options[0] for role, options in pair.dtype_options.items()}
    case = pair.make_case([(3, 4)], dtypes, KERNEL_DEVICE, generator, pair.bench_hparams)
    case.args[1][0] = case.args[1][0].reshape(4, 3)
    for fn in (pair.reference(), pair.triton()):
        with pytest.raises(ValueError, match="shape"):
            fn(*case.args, **case.kwargs)
