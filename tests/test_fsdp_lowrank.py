"""Low-rank optimizers on FSDP2 row shards (gloo, CPU): 2 and 3 processes, uneven shards, every
projector side; the sharded run against one process stepping whole tensors on the same
gradients, over steps that cross projector refreshes; per-rank state sharded like the weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from memzoo.optim import APOLLO, FRUGAL, FiraAdamW, GaLoreAdamW, NaturalGaLore
    from memzoo.optim.distributed import load_optimizer_state
    rank, world, store, out, checkpoint = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.set_num_threads(1)

    def canonical(cls):
        # The optimizer with its singular vectors signed canonically, as on row shards (raw
        # LAPACK signs cannot be reproduced from shards).
        rule = type("CanonicalRule", (type(cls.rule),), {"signs": "canonical"})()
        return type("Canonical" + cls.__name__, (cls,), {"rule": rule})

    def make_model():
        torch.manual_seed(0)
        # 16×12 (right side under "std"), 7×16 (left: 7 rows, uneven on 2 and 3 ranks), 2×7
        # (an empty shard on 3 ranks).
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7),
                                   torch.nn.Tanh(), torch.nn.Linear(7, 2))

    def shard(model):
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        return fully_shard(model)

    CASES = {  # name: (sharded optimizer, whole-tensor optimizer, options)
        "galore:randomized": (GaLoreAdamW, canonical(GaLoreAdamW), dict(rank=3)),
        "galore:randomized:full": (GaLoreAdamW, canonical(GaLoreAdamW), dict(rank=2, proj_type="full")),
        "galore:randomized:reverse": (GaLoreAdamW, canonical(GaLoreAdamW), dict(rank=2, proj_type="reverse_std", maximize=True)),
        "galore:svd": (GaLoreAdamW, canonical(GaLoreAdamW), dict(rank=3, projector="svd")),
        "galore:random": (GaLoreAdamW, GaLoreAdamW, dict(rank=3, projector="random", proj_type="full")),
        "natural_galore": (NaturalGaLore, NaturalGaLore, dict(rank=2, natural_history=3, damping=1.0)),
        "apollo": (APOLLO, APOLLO, dict(rank=3, scale=4.0)),
        "apollo:svd": (APOLLO, canonical(APOLLO), dict(rank=2, proj="svd", scale_front=True)),
        "apollo_mini": (APOLLO, APOLLO, dict(rank=1, scale=128.0, scale_type="tensor")),
        "frugal": (FRUGAL, canonical(FRUGAL), dict(density=0.5, inactive_threshold=0.3)),
        "frugal:random": (FRUGAL, FRUGAL, dict(density=0.25, projector="random", proj_type="reverse_std")),
        "frugal:coordinates": (FRUGAL, FRUGAL, dict(density=0.5, projector="coordinates", proj_type="left")),
        "frugal:coordinates:right": (FRUGAL, FRUGAL, dict(density=0.5, projector="coordinates",
                                                          inactive_update_rule="sgd")),
        # Fira: right residual rows local, left ones from the all-reduced R; the limiter's ‖S‖
        # all-reduced (recorded on step 1, limiting from step 2; growth_limit 1.0 makes it bite).
        "fira": (FiraAdamW, canonical(FiraAdamW), dict(rank=3, scale=0.5, growth_limit=1.0)),
        "fira:svd:reverse": (FiraAdamW, canonical(FiraAdamW), dict(rank=2, projector="svd", proj_type="reverse_std",
                                                                  maximize=True)),
    }
    # Saved by 2 ranks after 2 steps, resumed by 3 (DCP resharding the row-sharded state).
    RESUMED = ("galore:randomized", "galore:svd", "apollo", "frugal")
    names = sys.argv[6].split(",") if len(sys.argv) > 6 else list(CASES)
    results, recorded, saved = {}, {}, {}

    def train(model, optimizer, replica, reference, steps, generator, record=None):
        # Steps the sharded optimizer, and the whole-tensor one on the same (gathered) gradients.
        for _ in range(steps):
            x = torch.randn(8, 12, generator=generator)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            gradients = [p.grad.full_tensor() for p in model.parameters()]
            if record is not None:
                record.append(gradients)
            for whole, gradient in zip(replica.parameters(), gradients):
                whole.grad = gradient
            optimizer.step()
            reference.step()

    if world == 3:  # resume the 2 ranks' checkpoints, against a whole-tensor run replaying their gradients
        recorded = torch.load(checkpoint + ".gradients")
        for name in recorded:
            cls, reference_cls, options = CASES[name]
            kwargs = dict(lr=0.02, weight_decay=0.1, update_proj_gap=2, backend="torch", **options)
            model, replica = shard(make_model()), make_model()
            optimizer, reference = cls(model.parameters(), **kwargs), reference_cls(replica.parameters(), **kwargs)
            states = {"model": get_model_state_dict(model)}
            dcp.load(states, checkpoint_id=f"{checkpoint}/{name}")
            set_model_state_dict(model, states["model"])
            load_optimizer_state(optimizer, f"{checkpoint}/{name}")
            for gradients in recorded[name]:
                for whole, gradient in zip(replica.parameters(), gradients):
                    whole.grad = gradient
                reference.step()
            train(model, optimizer, replica, reference, 2, torch.Generator().manual_seed(400 + rank))
            results["resumed:" + name] = [(p.full_tensor(), q.detach().clone())
                                          for p, q in zip(model.parameters(), replica.parameters())]
    for name in names:
        cls, reference_cls, options = CASES[name]
        kwargs = dict(lr=0.02, weight_decay=0.1, update_proj_gap=2, backend="torch", **options)
        model, replica = shard(make_model()), make_model()
        optimizer, reference = cls(model.parameters(), **kwargs), reference_cls(replica.parameters(), **kwargs)
        generator = torch.Generator().manual_seed(100 + rank)
        # Refreshes on steps 1 and 3.
        train(model, optimizer, replica, reference, 2, generator, recorded.setdefault(name, []))
        if world == 2 and name in RESUMED:
            dcp.save({"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()},
                     checkpoint_id=f"{checkpoint}/{name}")
        train(model, optimizer, replica, reference, 2, generator)
        params = [(p.full_tensor(), q.detach().clone()) for p, q in zip(model.parameters(), replica.parameters())]
        states = []
        for p, q in zip(model.parameters(), replica.parameters()):
            assert optimizer.state[p].keys() == reference.state[q].keys(), name
            for key, value in optimizer.state[p].items():
                whole = reference.state[q][key]
                sharded = isinstance(value, DTensor)
                states.append(dict(key=key, rows=p.shape[0], numel=p.numel(), sharded=sharded,
                                   same_shape=tuple(value.shape) == tuple(whole.shape),
                                   local=value.to_local().nbytes if sharded else value.nbytes, whole=whole.nbytes,
                                   value=None if sharded else value.clone()))
        results[name] = dict(params=params, states=states, bytes=optimizer.state_bytes())
    if world == 2 and rank == 0:
        torch.save({name: recorded[name] for name in RESUMED if name in recorded}, checkpoint + ".gradients")
    # Cholesky-QR over row shards falls back to TSQR where the Gram matrix is singular (a zero or
    # rank-deficient gradient at a refresh): still an orthonormal basis holding the column space.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from memzoo.optim.sharded import orthonormal_rows, row_shard
    row = row_shard(distribute_tensor(torch.zeros(7, 4), init_device_mesh("cpu", (world,)), [Shard(0)]), 7)
    chunk = -(-7 // world)
    results["tsqr"] = []
    for matrix in (torch.outer(torch.arange(1.0, 8.0), torch.tensor([1.0, -2.0, 0.5, 3.0])), torch.zeros(7, 4)):
        local = orthonormal_rows(matrix[row.offset: row.offset + row.rows].unsqueeze(0), row)[0]
        padded = row.all_gather(torch.cat([local, local.new_zeros(chunk - row.rows, 4)]))  # (world, chunk, 4)
        basis = torch.cat([padded[k, : max(0, min(chunk, 7 - k * chunk))] for k in range(world)])
        results["tsqr"].append((basis, matrix))
    try:  # Natural GaLore's history of a right projection would be row-sharded: refused with the fix
        NaturalGaLore(shard(make_model()).parameters(), rank=2, proj_type="std")
        results["refused:natural_right"] = "accepted"
    except ValueError as exc:
        results["refused:natural_right"] = str(exc)
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


def run_ranks(world: int, tmp_path, checkpoint: str, names: list[str] | None = None) -> list[dict]:
    """The script on ``world`` gloo ranks (2 ranks write DCP checkpoints under ``checkpoint``,
    3 ranks resume them); each rank's results."""
    script = tmp_path / f"script{world}.py"
    script.write_text(_SCRIPT)
    store, out = tmp_path / f"store{world}", tmp_path / f"out{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = [",".join(names)] if names else []
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(store), str(out), checkpoint,
                               *extra],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    failed = [err for proc, err in zip(procs, errors) if proc.returncode != 0]
    # The rank that failed first, not those that lost their peer.
    failed.sort(key=lambda err: "closed by peer" in err or "Connection reset" in err)
    assert not failed, failed[0][-4000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]


CASES = ('galore:randomized', 'galore:randomized:full', 'galore:randomized:reverse', 'galore:svd', 'galore:random', 'natural_galore', 'apollo', 'apollo:svd', 'apollo_mini', 'frugal', 'frugal:random', 'frugal:coordinates', 'frugal:coordinates:right', 'fira', 'fira:svd:reverse')
# Selections of rows or columns move numbers without arithmetic across shards: bitwise equal.
_BITWISE = ("frugal:coordinates", "frugal:coordinates:right")
# Elsewhere sums over the shards are added in another order (projections Σ_k P_kᵀG_k, Gram
# matrices, norms): after 4 steps at lr 0.02 the weights (|w| ≲ 0.5) agree to ~1e-6 (Adam
# normalizes near-zero projected entries, |ΔR|/ε; Natural GaLore's solve amplifies by ~1/λ).
# A wrong sign, side or shard offset moves them by ~lr.
_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """The script on 2 gloo ranks (which save DCP checkpoints) and then on 3 (which resume them)."""
    tmp_path = tmp_path_factory.mktemp("fsdp_lowrank")
    checkpoint = str(tmp_path / "checkpoint")
    return {world: run_ranks(world, tmp_path, checkpoint) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_low_rank_on_fsdp2_row_shards_equals_whole_tensors(runs, world) -> None:
    """GaLore (randomized / svd / random; std, full, reverse_std; maximize), Natural GaLore,
    APOLLO (channel, svd, Mini), FRUGAL (svd, random, row and column coordinates) stepping FSDP2
    row shards (7 rows on 2 and 3 ranks, 2 rows on 3: an empty shard) equal one process stepping
    the whole tensors on the same gradients, over two projector refreshes; their state is
    sharded like the weights, or replicated (and identical on every rank) where it is r-sized."""
    results = runs[world]
    assert {name for name in results[0] if not name.startswith(("resumed:", "refused:", "tsqr"))} == set(CASES)
    for basis, matrix in results[0]["tsqr"]:  # orthonormal, and it holds the column space
        assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
        assert torch.allclose(basis @ (basis.T @ matrix), matrix, atol=1e-4)
    message = results[0]["refused:natural_right"]
    assert "proj_type 'full'" in message and "DistributedDataParallel" in message, message
    for name in CASES:
        result = results[0][name]
        for sharded, whole in result["params"]:
            if name in _BITWISE:
                assert torch.equal(sharded, whole), name
            else:
                assert torch.allclose(sharded, whole, rtol=0, atol=_ATOL), (name, (sharded - whole).abs().max())
        for other in results[1:]:  # every rank gathers the same weights
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(result["params"], other[name]["params"])), name
        per_rank = [rank_result[name]["states"] for rank_result in results]
        for rank_states, rank_result in zip(per_rank, results):
            assert rank_result[name]["bytes"] == sum(state["local"] for state in rank_states), name
        for index, state in enumerate(per_rank[0]):
            assert state["same_shape"], (name, state["key"])
            if state["sharded"]:  # 1/world of it on each rank, ⌈rows/world⌉ rows at most
                locals_ = [rank_states[index]["local"] for rank_states in per_rank]
                assert sum(locals_) == state["whole"], (name, state["key"])
                most = -(-state["rows"] // world)
                assert max(locals_) * state["rows"] <= state["whole"] * most, (name, state["key"])
            else:  # replicated: a counter, or r-sized (r×n ≤ m×n), the same on every rank
                value = state["value"]
                assert value.dim() == 0 or value.numel() <= state["numel"], (name, state["key"], value.shape)
                for rank_states in per_rank[1:]:
                    assert torch.equal(rank_states[index]["value"], value), (name, state["key"])


def test_low_rank_resumes_from_dcp_on_another_world_size(runs) -> None:
    """GaLore (randomized, svd), APOLLO and FRUGAL saved with torch.distributed.checkpoint by 2
    ranks after 2 steps and resumed by 3 ranks (row-sharded moments and left factors resharded,
    a refresh at the first resumed step) equal an uninterrupted whole-tensor run on the same
    gradients, within the bound of the sharded steps."""
    resumed = {name: value for name, value in runs[3][0].items() if name.startswith("resumed:")}
    assert len(resumed) == 4
    for name, params in resumed.items():
        for sharded, whole in params:
            assert torch.allclose(sharded, whole, rtol=0, atol=_ATOL), (name, (sharded - whole).abs().max())


def test_the_optimizers_marked_projected_shards_are_the_ones_tested_here() -> None:
    from memzoo.optim.registry import OPTIMIZERS

    marked = {info.cls.__name__ for info in OPTIMIZERS.values() if info.projected_shards}
    # A new one: add its cases to _SCRIPT's CASES.
    assert marked == {"GaLoreAdamW", "NaturalGaLore", "APOLLO", "FRUGAL", "FiraAdamW"}
