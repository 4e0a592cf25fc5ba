"""The PyTorch Philox stream equals Triton's tl.randn for the same (seed, offset)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE
from hypothesis import given
from hypothesis import strategies as st

from memzoo.reference.random import philox_randn


@triton.jit
def _randn_kernel(out, offsets, seed, n, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    tl.store(out + index, tl.randn(seed, tl.load(offsets + index, mask=mask, other=0)), mask=mask)


def _triton_randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    offsets = offsets.to(KERNEL_DEVICE)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=KERNEL_DEVICE)
    _randn_kernel[(triton.cdiv(offsets.numel(), 256),)](out, offsets, seed, offsets.numel(), BLOCK=256)
    return out.cpu()


@given(seed=st.integers(0, 2**31 - 1), start=st.integers(0, 2**40), count=st.integers(1, 300))
def test_matches_triton_randn(seed: int, start: int, count: int) -> None:
    offsets = torch.arange(start, start + count, dtype=torch.int64)
    torch.testing.assert_close(philox_randn(seed, offsets), _triton_randn(seed, offsets), rtol=1e-5, atol=1e-5)


def test_is_standard_normal_and_seeded() -> None:
    offsets = torch.arange(200_000)
    sample = philox_randn(7, offsets)
    assert abs(sample.mean().item()) < 0.01 and abs(sample.std().item() - 1) < 0.01
    assert torch.equal(sample, philox_randn(7, offsets))
    assert not torch.equal(sample[:100], philox_randn(8, offsets[:100]))
    assert torch.equal(philox_randn(7, offsets[50:60]), sample[50:60])  # a counter: any slice alone


def test_rejects_bad_seed_and_offsets() -> None:
    with pytest.raises(ValueError, match="seed"):
        philox_randn(-1, torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        philox_randn(1, torch.zeros(3))


@given(seed=st.integers(0, 2**31 - 1), start=st.integers(0, 2**40), count=st.integers(0, 3000),
       streams=st.integers(1, 3))
def test_triton_twin_draws_the_same_stream(seed: int, start: int, count: int, streams: int) -> None:
    """memzoo.triton_kernels.random.philox_randn against the reference, bit for bit: one seed,
    and a column of seeds (the batched sketches)."""
    from memzoo.triton_kernels.random import philox_randn as triton_philox_randn

    offsets = torch.arange(start, start + count, dtype=torch.int64, device=KERNEL_DEVICE)
    # The same bits: the Philox words are integers, and the Box–Muller step is shared.
    assert torch.equal(triton_philox_randn(seed, offsets), philox_randn(seed, offsets))
    seeds = torch.arange(seed, seed + streams, dtype=torch.int64, device=KERNEL_DEVICE).view(-1, 1)
    actual = triton_philox_randn(seeds, offsets)
    assert actual.shape == (streams, count)
    assert torch.equal(actual, philox_randn(seeds, offsets))


def test_triton_twin_rejects_what_the_reference_rejects() -> None:
    from memzoo.triton_kernels.random import philox_randn as triton_philox_randn

    with pytest.raises(ValueError, match="seed"):
        triton_philox_randn(-1, torch.arange(3, device=KERNEL_DEVICE))
    with pytest.raises(TypeError, match="integer"):
        triton_philox_randn(1, torch.zeros(3, device=KERNEL_DEVICE))
