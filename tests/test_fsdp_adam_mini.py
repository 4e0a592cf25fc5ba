"""Adam-mini on FSDP2 row shards (gloo, 2 and 3 processes, uneven and empty shards): blocks within
rows step locally (bit for bit the unsharded step), blocks spanning rows (heads that straddle
shards, whole tensors) add their g² sums over the ranks; a DCP checkpoint of 2 ranks resumes on 3."""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_distributed import _run_ranks

_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from memzoo.optim import AdamMini
    from memzoo.optim.distributed import load_optimizer_state
    rank, store, out, world, checkpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)

    class Model(torch.nn.Module):
        # dim 8, 2 heads: a head is 4 rows of q_proj; its 8 rows shard 4/4 on 2 ranks, 3/3/2 on 3
        # (heads straddle ranks); embed 10 rows, lm_head 5, mlp 2 (an empty shard on 3 ranks).
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(10, 8)
            self.q_proj = torch.nn.Linear(8, 8, bias=False)
            self.k_proj = torch.nn.Linear(8, 4, bias=False)
            self.v_proj = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.lm_head = torch.nn.Linear(8, 5, bias=False)
            self.mlp = torch.nn.Linear(8, 2, bias=False)

        def forward(self, tokens):
            h = self.embed(tokens)
            a = torch.tanh(self.q_proj(h) + self.v_proj(h) + self.k_proj(h).repeat(1, 2))
            return self.lm_head(self.norm(a)) + self.mlp(h).sum(-1, keepdim=True)

    def shard(model):
        for child in model.children():
            fully_shard(child)
        return fully_shard(model)

    def make(model):
        return AdamMini(model.named_parameters(), lr=2e-2, weight_decay=0.1, dim=8, n_heads=2)

    def batch(step):  # the same batch on every rank: the averaged gradient is the whole batch's
        generator = torch.Generator().manual_seed(step)
        return torch.randint(0, 10, (6,), generator=generator), torch.randn(6, 5, generator=generator)

    def train(model, optimizer, steps, replica=None, reference=None):
        for step in steps:
            tokens, target = batch(step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(tokens), target).backward()
            if replica is not None:
                for whole, sharded in zip(replica.parameters(), model.parameters()):
                    whole.grad = sharded.grad.full_tensor()
                reference.step()
            optimizer.step()

    results = {}
    for dtype in (torch.float64, torch.float32):
        model, replica = shard(Model().to(dtype)), Model().to(dtype)
        optimizer, reference = make(model), make(replica)
        train(model, optimizer, range(3), replica, reference)
        results[str(dtype)] = {name: (p.full_tensor(), q.detach().clone())
                               for (name, p), q in zip(model.named_parameters(), replica.parameters())}
        if dtype == torch.float64:
            state = {name: optimizer.state[p] for name, p in model.named_parameters()}
            results["sharded_v"] = {name: isinstance(s["exp_avg_sq"], DTensor) for name, s in state.items()}
            results["sharded_m"] = all(isinstance(s["exp_avg"], DTensor) for s in state.values())
            results["state_bytes"] = (optimizer.state_bytes(), reference.state_bytes())
            results["v"] = {name: (s["exp_avg_sq"].full_tensor() if isinstance(s["exp_avg_sq"], DTensor)
                                   else s["exp_avg_sq"]) for name, s in state.items()}
    if world == 2:  # negative control: ranks that keep their own partial sums of g², never added
        from memzoo.optim.sharded import RowShard
        summed = RowShard.all_reduce_many_
        RowShard.all_reduce_many_ = lambda self, tensors: tensors
        model, replica = shard(Model().to(torch.float64)), Model().to(torch.float64)
        train(model, make(model), range(3), replica, make(replica))
        results["unsummed"] = (model.k_proj.weight.full_tensor() - replica.k_proj.weight).abs().max()
        RowShard.all_reduce_many_ = summed
    # DCP: 2 ranks save after 2 steps; 3 ranks load that and take step 3.
    model = shard(Model().to(torch.float64))
    optimizer = make(model)
    if world == 2:
        train(model, optimizer, range(2))
        dcp.save({"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()}, checkpoint_id=checkpoint)
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        load_optimizer_state(optimizer, checkpoint)
        train(model, optimizer, range(2, 3))
        results["resumed"] = {name: p.full_tensor() for name, p in model.named_parameters()}
    # A parameter given one v per element and two dimensions cannot be cut by rows: refused.
    odd = fully_shard(torch.nn.Linear(4, 4, bias=False))
    try:
        AdamMini([("attn_bias", odd.weight)], dim=4, n_heads=1)
        results["refused"] = None
    except ValueError as error:
        results["refused"] = str(error)
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")

# Blocks within rows: the unsharded bits. Blocks spanning rows: sums in another order.
WITHIN_ROWS = ("embed.weight", "v_proj.weight", "v_proj.bias", "norm.bias", "lm_head.weight", "mlp.weight")
SPANNING = ("q_proj.weight", "k_proj.weight", "norm.weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    tmp_path = tmp_path_factory.mktemp("fsdp_adam_mini")
    checkpoint = str(tmp_path / "checkpoint")
    return {world: _run_ranks(_SCRIPT, [str(world), checkpoint], tmp_path, world=world) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_adam_mini_on_shards_equals_one_process(runs, world) -> None:
    for result in runs[world]:
        for dtype, bound in (("torch.float64", 1e-12), ("torch.float32", 2e-6)):
            params = result[dtype]
            assert set(params) == set(WITHIN_ROWS + SPANNING)
            for name in WITHIN_ROWS:
                assert torch.equal(*params[name]), (world, dtype, name)
            for name in SPANNING:
                sharded, whole = params[name]
                assert (sharded - whole).abs().max() <= bound, (world, dtype, name)
        # m sharded like every parameter; v sharded where blocks lie within rows, replicated (one
        # value per head / tensor) where they span them; per-rank bytes about 1/world.
        assert result["sharded_m"]
        assert result["sharded_v"] == {name: name in WITHIN_ROWS for name in WITHIN_ROWS + SPANNING}
        sharded_bytes, whole_bytes = result["state_bytes"]
        assert sharded_bytes < (1 / world + 0.2) * whole_bytes
        assert "one v per element" in result["refused"] and "DistributedDataParallel" in result["refused"]
    for other in runs[world][1:]:  # replicated v: the same bits on every rank
        for name in SPANNING:
            assert torch.equal(other["v"][name], runs[world][0]["v"][name])


def test_adam_mini_resumes_from_dcp_on_another_world_size(runs) -> None:
    """Saved by 2 ranks after 2 steps, resumed by 3 for step 3: the uninterrupted run's weights
    (float64; spanning blocks within the bound of the order of their sums)."""
    for result in runs[3]:
        for name, resumed in result["resumed"].items():
            _, whole = result["torch.float64"][name]
            assert (resumed - whole).abs().max() <= 1e-12, name


def test_the_sum_over_the_shards_is_needed(runs) -> None:
    """Negative control: ranks that keep their own partial sums of g² (no all-reduce) are off by far
    more than the bound above on a block spanning both ranks (k_proj: one head, 2 rows each)."""
    for result in runs[2]:
        assert result["unsummed"] > 1e-4
