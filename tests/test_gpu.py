"""Checks that need CUDA (skipped elsewhere): dispatch on GPU tensors and kernels at real sizes."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import KERNEL_TESTS
from support import check_pair

from memzoo.optim import Lion, resolve_backend

LION = KERNEL_TESTS["lion.lion_update_"]

pytestmark = pytest.mark.gpu


def test_auto_picks_triton_for_cuda_tensors() -> None:
    assert resolve_backend("auto", torch.device("cuda"), "lion").__name__ == "memzoo.triton_kernels.lion"
    assert resolve_backend("auto", torch.device("cpu"), "lion").__name__ == "memzoo.triton_kernels.torch_backend.lion"


@pytest.mark.parametrize("dtypes", [{"param": torch.float32, "state": None},
                                    {"param": torch.bfloat16, "state": torch.float32},
                                    {"param": torch.float32, "state": torch.bfloat16}])
def test_lion_kernel_at_llama_layer_sizes(dtypes) -> None:
    shapes = [(2736, 1024), (1024, 2736), (1024,), (32000, 1024), (1,), (4097,)]
    check_pair(LION, shapes, dtypes, LION.pair.bench_hparams, "contiguous", "cuda", seed=0)


def test_lion_optimizer_steps_model_on_cuda() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)).cuda()
    optimizer = Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    inputs, targets = torch.randn(256, 64, device="cuda"), torch.randn(256, 1, device="cuda")
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("pair_name", ["galore.galore_adam_project_", "galore.galore_apply_"])
def test_galore_kernels_at_llama_layer_sizes(pair_name, side) -> None:
    # Tolerances follow from TF32's unit roundoff through tests/kernel_cases.py's error bounds.
    kernel = KERNEL_TESTS[pair_name]
    for dtype in (torch.float32, torch.bfloat16):
        dtypes = {role: options[0] for role, options in kernel.pair.dtype_options.items()}
        dtypes["param"] = dtype
        hparams = {**kernel.pair.bench_hparams, "side": side, "rank": 256}
        check_pair(kernel, [(2736, 1024)], dtypes, hparams, "contiguous", "cuda", seed=0)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_galore_triton_and_torch_trajectories_agree_on_cuda(precision, monkeypatch) -> None:
    from memzoo.optim import GaLoreAdamW
    from memzoo.triton_kernels import galore as galore_kernels

    monkeypatch.setattr(galore_kernels, "PRECISION", precision)
    start = [torch.randn(1024, 512, device="cuda"), torch.randn(512, device="cuda"),
             torch.randn(256, 512, device="cuda"), torch.randn(256, 512, device="cuda")]
    lr, steps = 1e-3, 6
    results, factors = {}, {}
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = GaLoreAdamW([{"params": [params[0], *params[2:]], "rank": 128, "update_proj_gap": 3},
                                 {"params": params[1:2]}], lr=lr, projector="svd", backend=backend)
        generator = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, device="cuda")
            optimizer.step()
        results[backend] = [p.detach() for p in params]
        factors[backend] = optimizer.state[params[0]]["proj_right"]
    for a, b, s in zip(results["triton"], results["torch"], start):
        moved_triton, moved_torch = a - s, b - s
        difference = (moved_triton - moved_torch).abs()
        # Each step rounds the fp32 weight once; two implementations may differ by an ulp there.
        rounding = 2 * steps * torch.finfo(torch.float32).eps * s.abs().max()
        if precision == "ieee":  # fp32 products: only the summation order differs
            assert (difference <= rounding + 1e-4 * moved_torch.abs()).all()
            continue
        # TF32 (u = 2^-11) flips the sign of Adam's early, sign-like update N wherever |R| lies
        # within TF32 rounding of 0, and each flip moves a row of the weight by ≤ 2·lr·|N|·|P|.
        # Such elements must be few and bounded, the whole move close: a wrong sign or scale of
        # the update would give a relative difference of order 1.
        assert (difference > rounding + 1e-2 * moved_torch.abs()).double().mean() < 0.1
        assert difference.max() <= 4 * steps * lr * factors["torch"].abs().max()
        assert difference.norm() <= 0.05 * moved_torch.norm()
