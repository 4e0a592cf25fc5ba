"""The shared multi-tensor machinery: storage rounding and the dense-layout rule."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE

from memzoo.triton_kernels.multi_tensor import is_dense, to_storage


@triton.jit
def _round_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, to_storage(tl.load(src + offs, mask=mask), dst.dtype.element_ty), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_storage_rounds_like_torch(dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=generator) * torch.logspace(-30, 30, 4096)
    # Exact ties between two bf16 values (both parities), subnormals, signed zeros, infinities.
    ties = (torch.arange(1, 257, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.4e38, -3.4e38])
    src = torch.cat([values, ties, -ties, special]).to(KERNEL_DEVICE)
    dst = torch.empty(src.shape, dtype=dtype, device=KERNEL_DEVICE)
    _round_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), BLOCK=1024)
    assert torch.equal(dst.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       src.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32))
    nan = torch.full((4,), float("nan"), device=KERNEL_DEVICE)
    _round_kernel[(1,)](nan, dst[:4], 4, BLOCK=4)
    assert torch.isnan(dst[:4].float()).all()


def test_is_dense() -> None:
    base = torch.zeros(4, 6)
    assert is_dense(base) and is_dense(base.t()) and is_dense(torch.zeros(2, 1, 3).permute(2, 0, 1))
    assert not is_dense(base[:, ::2]) and not is_dense(base[:, :3])
    assert is_dense(torch.zeros(0)) and is_dense(torch.zeros(()))
    assert not is_dense(torch.zeros(3).expand(4, 3))


def test_one_launch_per_dtype_bucket_and_copies_only_where_needed() -> None:
    from memzoo.triton_kernels.multi_tensor import plan_launches

    shapes = [(3, 5), (7,), (1,), (64, 33)] * 50  # 200 tensors
    params = [torch.zeros(s) for s in shapes] + [torch.zeros(4, dtype=torch.bfloat16)]
    grads = [torch.zeros_like(p) for p in params]
    states = [torch.zeros_like(p) for p in params]
    params[0] = torch.zeros(5, 3).t()  # dense, but its grad and state are laid out differently → copied
    launches, finish = plan_launches([params, grads, states], [True, False, True], 4096,
                                     (torch.float32, torch.bfloat16))
    assert len(launches) == 2
    fp32, bf16 = sorted(launches, key=lambda launch: launch.bases[0].dtype != torch.float32)
    assert fp32.num_tensors == 200 and bf16.num_tensors == 1
    assert fp32.tensors[0][0] is not params[0] and fp32.tensors[0][1] is params[1]
    assert fp32.num_blocks == sum(-(-torch.Size(s).numel() // 4096) for s in shapes)
    with pytest.raises(ValueError, match="supports"):
        plan_launches([params, grads, states], [True, False, True], 4096, (torch.float32,))
    finish()


def _views(buffer: torch.Tensor, dtype: torch.dtype, numel: int, byte_offsets: list[int]) -> list[torch.Tensor]:
    size = torch.empty((), dtype=dtype).element_size()
    return [buffer[start:start + numel * size].view(dtype) for start in byte_offsets]


def _lion_matches_reference(params, grads, exp_avgs) -> None:
    from memzoo.reference.lion import lion_update_ as reference
    from memzoo.triton_kernels.lion import lion_update_ as kernel

    hparams = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1}
    expected = [[t.clone() for t in ts] for ts in (params, grads, exp_avgs)]
    reference(*expected, **hparams)
    kernel(params, grads, exp_avgs, **hparams)
    for actual, wanted in zip([*params, *exp_avgs], [*expected[0], *expected[2]]):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


def test_launch_caches_are_not_fooled_by_reused_addresses() -> None:
    """Tensors of another dtype (or layout) at the addresses of an earlier call's tensors get
    their own offsets and plan: a table cached by address alone once sent a bf16 launch to fp32
    offsets, i.e. twice as far (an illegal address on the GPU)."""
    generator = torch.Generator().manual_seed(0)
    buffers = [torch.zeros(4096, dtype=torch.uint8, device=KERNEL_DEVICE) for _ in range(3)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # same addresses, same numels
        lists = [_views(buffer, dtype, 40, [0, 1024, 2048]) for buffer in buffers]
        for tensors in lists:
            for tensor in tensors:
                tensor.copy_(torch.randn(40, generator=generator).to(dtype))
        _lion_matches_reference(*lists)

    def forms(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = buffer[:48].view(torch.float32)  # two dense (2, 3, 2) views with different strides
        return flat.view(2, 2, 3).permute(0, 2, 1), flat.view(3, 2, 2).permute(1, 0, 2)

    (p, _), (g_a, g_b), (m, _) = (forms(buffer) for buffer in buffers)
    for g in (g_a, g_b):  # the second call differs from the first only in the grads' strides
        for tensor in (p, g, m):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        _lion_matches_reference([p], [g], [m])

    from memzoo.triton_kernels.lion import lion_update_

    bad = buffers[1][:48].view(torch.float32).view(3, 2, 2)  # same address and numel, wrong shape
    with pytest.raises(ValueError):
        lion_update_([p], [bad], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
