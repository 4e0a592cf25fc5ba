"""Checks that need CUDA (skipped elsewhere): dispatch on GPU tensors and kernels at real sizes."""

from __future__ import annotations

import pytest
import torch
from support import check_pair

from memzoo.optim import Lion, resolve_backend
from memzoo.triton_kernels.registry import LION

pytestmark = pytest.mark.gpu


def test_auto_picks_triton_for_cuda_tensors() -> None:
    assert resolve_backend("auto", torch.device("cuda"), "lion").__name__ == "memzoo.triton_kernels.lion"
    assert resolve_backend("auto", torch.device("cpu"), "lion").__name__ == "memzoo.reference.lion"


@pytest.mark.parametrize("dtypes", [{"param": torch.float32, "state": None},
                                    {"param": torch.bfloat16, "state": torch.float32},
                                    {"param": torch.float32, "state": torch.bfloat16}])
def test_lion_kernel_at_llama_layer_sizes(dtypes) -> None:
    shapes = [(2736, 1024), (1024, 2736), (1024,), (32000, 1024), (1,), (4097,)]
    check_pair(LION, shapes, dtypes, LION.bench_hparams, "contiguous", "cuda", seed=0)


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
