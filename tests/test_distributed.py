"""DDP with every first-order optimizer: 2 processes on gloo (CPU), ranks stay bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from memzoo.optim.registry import OPTIMIZERS

_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from memzoo.optim.registry import OPTIMIZERS
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    names = sys.argv[4].split(",")
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    results = {}
    for name in names:
        info = OPTIMIZERS[name]
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 12), torch.nn.LayerNorm(12),
            torch.nn.Linear(12, 3)))
        # Ranks' global RNGs differ from here on: an optimizer drawing from it would diverge.
        torch.manual_seed(1000 + rank)
        # Low-rank methods refresh on steps 1 and 3 (gap 2), from the ranks' averaged gradient.
        kwargs = {**info.sample_kwargs, "backend": "torch"}
        optimizer = info.cls(model.parameters(), **kwargs)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(3):
            x, y = torch.randn(8, 12, generator=generator), torch.randn(8, 3, generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        results[name] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


def test_ddp_ranks_stay_bit_identical(tmp_path) -> None:
    names = [name for name, info in OPTIMIZERS.items() if not info.zeroth_order]
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT)
    store, out = tmp_path / "store", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(store), str(out), ",".join(names)],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for name in names:
        for a, b in zip(results[0][name], results[1][name]):
            assert torch.equal(a, b), name
