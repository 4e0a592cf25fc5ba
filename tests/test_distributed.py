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
    # Layer-wise hooks would run before DDP averages the gradients: refused at the first update.
    from memzoo.optim import LayerwiseOptimizer, Lion
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-2)
    try:
        torch.nn.functional.mse_loss(model(x), y).backward()
        results["layerwise"] = "accepted"
    except RuntimeError as error:
        results["layerwise"] = str(error)
    results["layerwise:unchanged"] = all(torch.equal(a, b) for a, b in zip(results[names[-1]], model.parameters()))
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


def _run_two_ranks(source: str, names: list[str], tmp_path) -> list[dict]:
    """Run ``source`` as ranks 0 and 1 of a gloo group (argv: rank, store, out, names); each
    rank's ``torch.save``d results."""
    script = tmp_path / "script.py"
    script.write_text(source)
    store, out = tmp_path / "store", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(store), str(out), ",".join(names)],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


def test_ddp_ranks_stay_bit_identical(tmp_path) -> None:
    names = [name for name, info in OPTIMIZERS.items() if not info.zeroth_order]
    results = _run_two_ranks(_SCRIPT, names, tmp_path)
    for name in names:
        for a, b in zip(results[0][name], results[1][name]):
            assert torch.equal(a, b), name
    for result in results:  # was: each rank stepped on its own gradient, silently
        assert "before DistributedDataParallel averages it" in result["layerwise"] and "fully_shard" in result["layerwise"]
        assert result["layerwise:unchanged"]


_FSDP_SCRIPT = textwrap.dedent("""
    import copy, io, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from memzoo.optim import MeZO
    from memzoo.optim.registry import OPTIMIZERS
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    names = sys.argv[4].split(",")
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    results = {}

    def make_model():
        torch.manual_seed(0)
        # Uneven shards: 3 rows of the head on 2 ranks.
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 12),
                                   torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))

    def shard(model, **kwargs):
        for layer in model:
            if isinstance(layer, torch.nn.Linear) and not set(layer.parameters()) & kwargs.get("ignored_params", set()):
                fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    for name in names:
        info = OPTIMIZERS[name]
        kwargs = {**info.sample_kwargs, "backend": "torch"}
        # Low-rank methods project whole matrices: sharded weights must raise, naming the fix.
        try:
            info.cls(shard(make_model()).parameters(), **kwargs)
            results[name + ":projected"] = "accepted"
        except ValueError as exc:
            results[name + ":projected"] = str(exc)
        # Per-element math (Lion; the AdamW branch of the low-rank methods) runs on the shards and
        # must equal the same optimizer stepping whole tensors with the gathered gradients.
        plain = {**kwargs, **{key: None for key in ("rank", "density") if key in kwargs}}
        replica = make_model()
        model = shard(make_model())
        if not info.shards:  # refuses sharded parameters whatever its settings (Adam-mini's blocks span ranks)
            results[name] = dict(refused=results[name + ":projected"])
            continue
        optimizer = info.cls(model.parameters(), **plain)
        reference = info.cls(replica.parameters(), **plain)
        generator = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            x, y = torch.randn(8, 12, generator=generator), torch.randn(8, 3, generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for whole, sharded in zip(replica.parameters(), model.parameters()):
                whole.grad = sharded.grad.full_tensor()
            optimizer.step()
            reference.step()
        gathered = [p.full_tensor() for p in model.parameters()]
        same = all(torch.equal(a, b) for a, b in zip(gathered, replica.parameters()))
        states = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        resumed = info.cls(model.parameters(), **plain)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        round_trip = all(
            type(a) is type(b) and torch.equal(getattr(a, "to_local", lambda: a)(), getattr(b, "to_local", lambda: b)())
            for p in model.parameters() for a, b in zip(optimizer.state[p].values(), resumed.state[p].values()))
        results[name] = dict(same=same, sharded_state=all(isinstance(v, DTensor) for v in states) and bool(states),
                             state_bytes=(optimizer.state_bytes(), reference.state_bytes()), round_trip=round_trip,
                             params=gathered)

    try:
        OPTIMIZERS["galore_adamw"].cls(shard(make_model()).parameters(), optim_bits=8)
        results["galore:8bit"] = "accepted"
    except ValueError as exc:
        results["galore:8bit"] = str(exc)
    # Zeroth-order: sharded parameters are refused; trainable ones kept whole (ignored_params) work.
    try:
        MeZO(shard(make_model()).parameters(), lr=1e-3)
        results["mezo:sharded"] = "accepted"
    except ValueError as exc:
        results["mezo:sharded"] = str(exc)
    model = make_model()
    trainable = set(model[4].parameters())
    shard(model, ignored_params=trainable)
    optimizer = MeZO(list(model[4].parameters()), lr=1e-2, eps=1e-3, seed=rank)  # rank 0's seed wins
    before = [p.detach().clone() for p in model[4].parameters()]
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x, y = torch.randn(8, 12, generator=generator), torch.randn(8, 3, generator=generator)
        optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    results["mezo:ignored"] = [p.detach().clone() for p in model[4].parameters()]
    results["mezo:moved"] = any(not torch.equal(a, b) for a, b in zip(before, model[4].parameters()))
    # Layer-wise updates: FSDP2 runs the post-accumulate-grad hooks on the sharded gradients.
    from memzoo.optim import LayerwiseOptimizer, Lion
    model, reference_model = shard(make_model()), shard(make_model())
    layerwise = LayerwiseOptimizer(model.parameters(), Lion, lr=1e-2, weight_decay=0.1)
    plain = Lion(reference_model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(8, 12, generator=generator)
        model(x).square().mean().backward()
        layerwise.step()
        reference_model(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
    results["layerwise"] = all(torch.equal(a.full_tensor(), b.full_tensor())
                               for a, b in zip(model.parameters(), reference_model.parameters()))
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


def test_fsdp2_per_element_on_shards_low_rank_refuse(tmp_path) -> None:
    """FSDP2 (fully_shard, DTensor parameters) on 2 gloo processes: per-element updates run on each
    rank's shards and equal whole-tensor steps bit for bit, with DTensor state that round-trips
    through torch.save / torch.load(weights_only=True); projected weights are refused with the fix."""
    names = [name for name, info in OPTIMIZERS.items() if not info.zeroth_order]
    results = _run_two_ranks(_FSDP_SCRIPT, names, tmp_path)
    for name in names:
        if not OPTIMIZERS[name].shards:
            for result in results:
                assert "DTensor" in result[name]["refused"] and "DistributedDataParallel" in result[name]["refused"]
            continue
        for result in results:
            assert result[name]["same"], name
            assert result[name]["sharded_state"], name
            assert result[name]["round_trip"], name
            sharded_bytes, whole_bytes = result[name]["state_bytes"]
            assert sharded_bytes < 0.75 * whole_bytes, (name, sharded_bytes, whole_bytes)
            message = result[name + ":projected"]
            if name == "lion":
                assert message == "accepted"
            else:
                assert "DTensor" in message and "DistributedDataParallel" in message, (name, message)
        for a, b in zip(results[0][name]["params"], results[1][name]["params"]):
            assert torch.equal(a, b), name
    for result in results:
        assert result["layerwise"]
        assert "optim_bits=32" in result["galore:8bit"]
        assert "ignored_params" in result["mezo:sharded"]
        assert result["mezo:moved"]
    for a, b in zip(results[0]["mezo:ignored"], results[1]["mezo:ignored"]):
        assert torch.equal(a, b)
