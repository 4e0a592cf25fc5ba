"""DDP with every first-order optimizer: 2 processes on gloo (CPU), ranks stay bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support import assert_close

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


def _run_ranks(source: str, arguments: list[str], tmp_path, world: int = 2) -> list[dict]:
    """Run ``source`` as the ``world`` ranks of a gloo group (argv: rank, store, out, then
    ``arguments``); each rank's ``torch.save``d results (the file ``out.<rank>``)."""
    script = tmp_path / f"script{world}.py"
    script.write_text(source)
    store, out = tmp_path / f"store{world}", tmp_path / f"out{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(store), str(out), *arguments],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]


def _run_two_ranks(source: str, names: list[str], tmp_path) -> list[dict]:
    """Run ``source`` as ranks 0 and 1 of a gloo group (argv: rank, store, out, names)."""
    return _run_ranks(source, [",".join(names)], tmp_path)


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
        # Projected sharded weights: stepped on the shards (tests/test_fsdp_lowrank.py) or refused,
        # naming the fix.
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
        if not info.shards:  # refuses sharded parameters whatever its settings
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
        # GaLore-Adafactor's dense branch reduces over the shards (sums in another order): within
        # 1e-5 (the bound of tests/test_fsdp_lowrank.py), its column EMAs of 2-D weights replicated.
        reduces = getattr(getattr(info.cls, "rule", None), "dense_row_shards", False)
        same = all(torch.allclose(a, b, rtol=0, atol=1e-5) if reduces else torch.equal(a, b)
                   for a, b in zip(gathered, replica.parameters()))
        states = [v for p, s in optimizer.state.items() for v in s.values()
                  if v.dim() > 0 and not (reduces and not isinstance(v, DTensor) and v.numel() < p.numel())]
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

    try:  # 8-bit moments are quantized in blocks of each rank's rows (tests/test_fsdp_lowrank.py): column shards refused
        from torch.distributed.tensor import Shard
        columns = shard(make_model(), shard_placement_fn=lambda p: Shard(p.dim() - 1))
        OPTIMIZERS["galore_adamw"].cls(columns.parameters(), optim_bits=8, min_8bit_size=1)
        results["galore:8bit"] = "accepted"
    except ValueError as exc:
        results["galore:8bit"] = str(exc)
    # Zeroth-order with the trainable parameters kept whole (ignored_params): plain replicas.
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


def test_fsdp2_per_element_on_shards_projected_stepped_or_refused(tmp_path) -> None:
    """FSDP2 (fully_shard, DTensor parameters) on 2 gloo processes: per-element updates run on each
    rank's shards and equal whole-tensor steps bit for bit (GaLore-Adafactor's dense branch, which
    reduces over the shards, within 1e-5), with DTensor state that round-trips
    through torch.save / torch.load(weights_only=True); projected weights are accepted where the
    method steps them on row shards, refused with the fix elsewhere."""
    names = [name for name, info in OPTIMIZERS.items() if not info.zeroth_order and info.shards_tested_in is None]
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
            if name == "lion" or OPTIMIZERS[name].projected_shards:
                assert message == "accepted"
            else:
                assert "DTensor" in message and "DistributedDataParallel" in message, (name, message)
        for a, b in zip(results[0][name]["params"], results[1][name]["params"]):
            assert torch.equal(a, b), name
    for result in results:
        assert result["layerwise"]
        assert "optim_bits=32" in result["galore:8bit"] and "blocks of each rank's rows" in result["galore:8bit"]
        assert result["mezo:moved"]
    for a, b in zip(results[0]["mezo:ignored"], results[1]["mezo:ignored"]):
        assert torch.equal(a, b)


# Zeroth-order optimizers on FSDP2 shards, and DCP checkpoints resumed on another world size. One
# script, run on 2 ranks (which save the checkpoint) and then on 3 (which resume from it).
_ZO_DCP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from memzoo.optim import QZO, MeZO, SparseMeZO, collect_quantization_scales
    from memzoo.optim import zeroth_order as zeroth_order_module
    from memzoo.optim.distributed import load_optimizer_state
    from memzoo.optim.registry import OPTIMIZERS
    rank, store, out, world, checkpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    mse = torch.nn.functional.mse_loss
    results = {}

    def make_model(quantized=False):
        torch.manual_seed(0)
        # Uneven row shards on 2 and 3 ranks (77, 5 and 3 rows); the 77x40 weight's shards start
        # inside a 1024-element chunk of the perturbation stream.
        first = torch.nn.Linear(40, 77)
        if quantized:
            import bitsandbytes as bnb
            first = bnb.nn.Linear4bit(40, 77, compress_statistics=False, quant_type="nf4")
        return torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(77, 5), torch.nn.LayerNorm(5),
                                   torch.nn.Linear(5, 3)).to("cpu")

    def shard(model, **kwargs):
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, **kwargs)
        # The LayerNorm stays in the root's group, which FSDP2 keeps gathered from one forward to the next.
        return fully_shard(model, **kwargs)

    def batch(generator):
        return torch.randn(6, 40, generator=generator), torch.randn(6, 3, generator=generator)

    def params(optimizer):  # the sharded parameters (model.parameters() lists gathered copies after a forward)
        return [p for group in optimizer.param_groups for p in group["params"]]

    def whole(optimizer):
        return [getattr(p, "full_tensor", p.detach)() for p in params(optimizer)]

    def equal(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    # 1. Sharded zeroth-order steps equal unsharded ones, bit for bit (each rank its own batch).
    def zeroth_order(name, make_optimizer, quantized=False):
        model, replica = shard(make_model(quantized)), make_model(quantized)
        optimizer, reference = make_optimizer(model), make_optimizer(replica)
        generator = torch.Generator().manual_seed(100 + rank)
        losses = []
        for _ in range(3):
            x, y = batch(generator)
            losses.append((optimizer.step(lambda: mse(model(x), y)), reference.step(lambda: mse(replica(x), y))))
        start = make_model(quantized).parameters()
        results[name] = dict(same=equal(whole(optimizer), whole(reference)), losses=all(a == b for a, b in losses),
                             moved=not equal(replica.parameters(), start), params=whole(optimizer))
        return optimizer, reference

    def qzo(model):
        scales = collect_quantization_scales(model)
        others = [p for p in model.parameters() if p.is_floating_point()]  # biases, LayerNorm, head: plain MeZO
        return QZO([{"params": scales}, {"params": others, "scales": False}], lr=1e-4, eps=1e-3, seed=7)

    # Above this many elements a threshold is taken from every n-th element: small here, so that the
    # 77x40 weight (3080) takes every 7th, the sample crossing the shards' starts.
    zeroth_order_module._THRESHOLD_SAMPLE = 500
    zeroth_order("mezo", lambda m: MeZO(m.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7))
    zeroth_order("mezo:q2", lambda m: MeZO(m.parameters(), lr=1e-2, eps=1e-3, n_samples=2, seed=7))
    sparse, sparse_reference = zeroth_order("sparse_mezo", lambda m: SparseMeZO(
        m.parameters(), lr=1e-2, eps=1e-3, sparsity=0.6, threshold_interval=2, seed=7))
    results["sparse_mezo"]["thresholds"] = [
        (float(sparse.state[p]["threshold"]), float(sparse_reference.state[q]["threshold"]))
        for p, q in zip(params(sparse), params(sparse_reference))]
    zeroth_order("qzo", qzo, quantized=True)

    # 2. The single-process run (one rank's group: no averaging; its closure averages all ranks'
    # losses in float64) agrees up to the rounding of the loss sums.
    model, single = shard(make_model()), make_model()
    optimizer = MeZO(model.parameters(), lr=1e-2, eps=1e-3, seed=7)
    alone = [dist.new_group([r]) for r in range(world)][rank]
    solo = MeZO(single.parameters(), lr=1e-2, eps=1e-3, seed=7, process_group=alone)
    generators = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    for _ in range(3):
        batches = [batch(generator) for generator in generators]
        x, y = batches[rank]
        optimizer.step(lambda: mse(model(x), y))
        solo.step(lambda: torch.stack([mse(single(a), b).double() for a, b in batches]).mean())
    results["single"] = (whole(optimizer), whole(solo))

    # 3. Refused: column shards; FSDP2's gathered copies (parameters read after a forward pass).
    try:
        MeZO(fully_shard(torch.nn.Linear(12, 6), shard_placement_fn=lambda p: Shard(p.dim() - 1)).parameters())
        results["refused:columns"] = "accepted"
    except ValueError as exc:
        results["refused:columns"] = str(exc)
    model = shard(make_model())
    with torch.no_grad():
        model(torch.zeros(1, 40))
    optimizer = MeZO(model.parameters(), lr=1e-2)
    try:
        optimizer.step(lambda: model(torch.zeros(1, 40)).sum())
        results["refused:gathered"] = "accepted"
    except ValueError as exc:
        results["refused:gathered"] = str(exc)

    # 4. DCP: 2 ranks train FIRST steps and save model and optimizer; 3 ranks resume and train MORE
    # steps, against an uninterrupted unsharded run (first-order: replaying the gradients the
    # sharded runs had; zeroth-order: the same batch on every rank, whose mean loss is then exact
    # on 2 and on 3 ranks, so the whole run does not depend on the world size).
    FIRST, MORE = 2, 2
    first_order = [name for name, info in OPTIMIZERS.items()
                   if not info.zeroth_order and info.shards and info.shards_tested_in is None]
    makers = {name: (lambda m, info=OPTIMIZERS[name]: info.cls(m.parameters(), **{
        **info.sample_kwargs, "backend": "torch", **{key: None for key in ("rank", "density") if key in info.sample_kwargs}}))
        for name in first_order}
    makers["mezo"] = lambda m: MeZO(m.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)
    makers["sparse_mezo"] = lambda m: SparseMeZO(m.parameters(), lr=1e-2, eps=1e-3, sparsity=0.6,
                                                 threshold_interval=3, seed=7)

    def train(name, model, optimizer, steps, generator, record=None, reference=None):
        # Steps optimizer, and the unsharded reference = (model, optimizer) beside it.
        reference_model, reference = reference or (None, None)
        for _ in range(steps):
            x, y = batch(generator)
            if name in first_order:
                optimizer.zero_grad()
                mse(model(x), y).backward()
                gradients = [p.grad.full_tensor() for p in params(optimizer)]
                if record is not None:
                    record.append(gradients)
                if reference is not None:
                    for p, gradient in zip(params(reference), gradients):
                        p.grad = gradient
                    reference.step()
                optimizer.step()
            else:
                optimizer.step(lambda: mse(model(x), y))
                if reference is not None:
                    reference.step(lambda: mse(reference_model(x), y))

    models = {name: shard(make_model()) for name in makers}
    optimizers = {name: makers[name](models[name]) for name in makers}
    if world == 2:
        gradients = {name: [] for name in first_order}
        for name in makers:
            seed = 200 + rank if name in first_order else 300
            train(name, models[name], optimizers[name], FIRST, torch.Generator().manual_seed(seed), gradients.get(name))
        dcp.save({**{f"model_{name}": get_model_state_dict(models[name]) for name in makers},
                  **{f"optimizer_{name}": optimizers[name].state_dict() for name in makers}}, checkpoint_id=checkpoint)
        if rank == 0:
            torch.save(gradients, checkpoint + ".gradients")
    else:
        gradients = torch.load(checkpoint + ".gradients")
        states = {f"model_{name}": get_model_state_dict(models[name]) for name in makers}
        dcp.load(states, checkpoint_id=checkpoint)
        for name in makers:
            set_model_state_dict(models[name], states[f"model_{name}"])
            load_optimizer_state(optimizers[name], checkpoint, key=f"optimizer_{name}")
            reference_model = make_model()
            reference = makers[name](reference_model)
            if name in first_order:
                for recorded in gradients[name]:
                    for p, gradient in zip(params(reference), recorded):
                        p.grad = gradient
                    reference.step()
                generator = torch.Generator().manual_seed(400 + rank)
            else:
                generator = torch.Generator().manual_seed(300)
                train(name, reference_model, reference, FIRST, generator)
            train(name, models[name], optimizers[name], MORE, generator, reference=(reference_model, reference))
            results[f"resumed:{name}"] = dict(same=equal(whole(optimizers[name]), whole(reference)),
                                              close=all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in
                                                        zip(whole(optimizers[name]), whole(reference))),
                                              moved=not equal(reference_model.parameters(), make_model().parameters()))
        try:
            load_optimizer_state(optimizers["lion"], checkpoint, key="optimizer_mezo")
            results["resumed:wrong"] = "accepted"
        except ValueError as exc:
            results["resumed:wrong"] = str(exc)
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def fsdp2_zeroth_order_runs(tmp_path_factory) -> dict[int, list[dict]]:
    """The script above on 2 gloo ranks (which save a DCP checkpoint) and then on 3 (which resume)."""
    tmp_path = tmp_path_factory.mktemp("fsdp2_zo")
    checkpoint = str(tmp_path / "checkpoint")
    return {world: _run_ranks(_ZO_DCP_SCRIPT, [str(world), checkpoint], tmp_path, world) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_zeroth_order_equals_unsharded(fsdp2_zeroth_order_runs, world) -> None:
    """MeZO (q = 1, 2), Sparse-MeZO and QZO on FSDP2 row shards (uneven, cut inside stream chunks,
    the root's LayerNorm kept gathered between forwards) take the unsharded steps bit for bit:
    same losses, same parameters, same Sparse-MeZO thresholds (selected across shards). Was:
    refused (and, without resharding the root between passes, its forward reads stale weights)."""
    results = fsdp2_zeroth_order_runs[world]
    for result in results:
        for name in ("mezo", "mezo:q2", "sparse_mezo", "qzo"):
            assert result[name]["same"] and result[name]["losses"] and result[name]["moved"], (world, name)
        thresholds = result["sparse_mezo"]["thresholds"]
        assert all(a == b for a, b in thresholds) and any(0 < a < 1 for a, _ in thresholds), thresholds
        sharded, single = result["single"]
        for a, b in zip(sharded, single):
            # The estimates differ by the rounding of float64 loss sums (~1e-16 relative): at
            # most one float32 rounding of each update coefficient, far below a step (lr·ĝ·z ~ 1e-3).
            assert_close(a, b, extra=1e-6, what="single-process run")
        assert "does not split it into row blocks" in result["refused:columns"]
        assert "gathered copies" in result["refused:gathered"] and "model.reshard()" in result["refused:gathered"]
    for a, b in zip(results[0]["mezo"]["params"], results[-1]["mezo"]["params"]):
        assert torch.equal(a, b)


def test_dcp_checkpoint_resumes_on_another_world_size(fsdp2_zeroth_order_runs) -> None:
    """Model and optimizer saved with torch.distributed.checkpoint on 2 ranks, resumed on 3 with
    memzoo.optim.distributed.load_optimizer_state: Lion and the AdamW branch of every low-rank
    class (DTensor moments resharded), GaLore-Adafactor's plain Adafactor (row EMAs resharded,
    within 1e-5), MeZO and Sparse-MeZO (seed, step count, thresholds) then step exactly as an
    uninterrupted unsharded run. Another optimizer's checkpoint is refused."""
    for result in fsdp2_zeroth_order_runs[3]:
        resumed = {key: value for key, value in result.items() if key.startswith("resumed:") and key != "resumed:wrong"}
        assert len(resumed) == len([n for n, i in OPTIMIZERS.items()
                                    if not i.zeroth_order and i.shards and i.shards_tested_in is None]) + 2
        for name, outcome in resumed.items():
            # GaLore-Adafactor reduces over the shards (sums in another order): within 1e-5.
            cls = OPTIMIZERS.get(name.removeprefix("resumed:"))
            reduces = cls is not None and getattr(getattr(cls.cls, "rule", None), "dense_row_shards", False)
            assert (outcome["close"] if reduces else outcome["same"]) and outcome["moved"], name
        assert "'optimizer_mezo' was not saved from a state_dict like this Lion's" in result["resumed:wrong"]


def test_load_optimizer_state_needs_a_checkpoint() -> None:
    from memzoo.optim import Lion
    from memzoo.optim.distributed import load_optimizer_state

    with pytest.raises(ValueError, match="needs checkpoint_id"):
        load_optimizer_state(Lion([torch.zeros(3, requires_grad=True)]))


def test_radix_selection_is_kthvalue() -> None:
    """The selection behind Sparse-MeZO's sharded thresholds, on one rank: the k-th smallest |x| of
    every dtype, with ties, zeros of both signs, ±inf, at the ends and in the middle."""
    from memzoo.optim.distributed import sharded_kth_magnitudes

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3001, generator=generator)
    values[::7] = values[1::7]  # ties
    values[:5] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        tensor = values.to(dtype)
        ks = [1, 2, 6, 1500, 2999, 3001]
        expected = [tensor.float().abs().kthvalue(k).values.item() for k in ks]
        assert sharded_kth_magnitudes([tensor] * len(ks), ks, ()) == expected, dtype
