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
    from memzoo.optim import APOLLO, COSMOS, FRUGAL, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, NaturalGaLore
    from memzoo.optim.distributed import load_optimizer_state
    rank, world, store, out, checkpoint = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.set_num_threads(1)

    def canonical(cls):
        # The optimizer with its singular vectors signed canonically, as on row shards (raw
        # LAPACK signs cannot be reproduced from shards).
        rule = type("CanonicalRule", (type(cls.rule),), {"signs": "canonical"})()
        return type("Canonical" + cls.__name__, (cls,), {"rule": rule})

    def make_model(hidden=16):
        torch.manual_seed(0)
        # 16×12 (right side under "std"), 7×16 (left: 7 rows, uneven on 2 and 3 ranks), 2×7
        # (an empty shard on 3 ranks).
        return torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 7),
                                   torch.nn.Tanh(), torch.nn.Linear(7, 2))

    def make_conv_model():
        torch.manual_seed(0)
        # A 5×3×2 convolution weight (≥3-D: dim 0 sharded 3/2 and 2/2/1), 7×15 (uneven) and 2×7
        # (an empty shard on 3 ranks).
        return torch.nn.Sequential(torch.nn.Unflatten(1, (3, 4)), torch.nn.Conv1d(3, 5, 2), torch.nn.Tanh(),
                                   torch.nn.Flatten(), torch.nn.Linear(15, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))

    MODELS = {"mlp": make_model, "conv": make_conv_model}

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
        # GaLore-Adafactor: a right projection's column EMA, mean(row EMA) and RMS(U) all-reduced
        # (16×12), left ones on the all-reduced R (7×16; 2×7 with an empty shard); the relative
        # step's RMS(W) all-reduced; β1 momentum rows; clipping biting; biases as DTensors.
        "galore_adafactor": (GaLoreAdafactor, canonical(GaLoreAdafactor), dict(
            lr=None, rank=3, scale=0.5, beta1=0.9, clip_threshold=0.5)),
        # Right projections only, a ≥3-D weight's (5×3×2 as 5×6) and an empty shard's (2×7).
        "galore_adafactor:svd:reverse": (GaLoreAdafactor, canonical(GaLoreAdafactor), dict(
            model="conv", rank=2, projector="svd", proj_type="reverse_std", maximize=True, relative_step=False,
            clip_threshold=0.5)),
        # Plain Adafactor on every shard: a ≥3-D weight's means are local, a 2-D weight's column
        # EMA (n values) all-reduced (7×15 uneven, 2×7 empty), vectors' RMS(U).
        "galore_adafactor:dense": (GaLoreAdafactor, GaLoreAdafactor, dict(model="conv", lr=None, beta1=0.5)),
    }
    # Saved by 2 ranks after 2 steps, resumed by 3 (DCP resharding the row-sharded state).
    RESUMED = ("galore:randomized", "galore:svd", "apollo", "frugal", "galore_adafactor")

    def settings(name):
        # (model factory, optimizer arguments) of a case.
        cls, reference_cls, options = CASES[name]
        options = dict(options)
        build = MODELS[options.pop("model", "mlp")]
        return build, {**dict(lr=0.02, weight_decay=0.1, update_proj_gap=2, backend="torch"), **options}
    names = sys.argv[6].split(",") if len(sys.argv) > 6 else list(CASES)
    results, recorded, saved = {}, {}, {}

    def train(model, optimizer, replica, reference, steps, generator, record=None):
        # Steps the sharded optimizer, and the whole-tensor one on the same (gathered) gradients.
        for _ in range(steps):
            x = torch.randn(8, 12, generator=generator).to(next(replica.parameters()).dtype)
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
            cls, reference_cls, _ = CASES[name]
            build, kwargs = settings(name)
            model, replica = shard(build()), build()
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
        cls, reference_cls, _ = CASES[name]
        build, kwargs = settings(name)
        model, replica = shard(build()), build()
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
    # COSMOS: the 16×12 weight's Newton–Schulz runs on Xᵀ in the reference (m > n), the 7×16's on
    # X; a basis initialization (eigh of GᵀG) then two updates (a power iteration each step).
    COSMOS_CASES = {  # name: (weight dtype, options)
        "cosmos:float64": (torch.float64, dict(ns_dtype=torch.float64)),
        "cosmos:float32": (torch.float32, dict(ns_dtype=torch.float32, maximize=True, gamma=0.5)),
        "cosmos:bfloat16": (torch.float32, dict()),  # the official bf16 Newton–Schulz
    }

    def cosmos_groups(model):
        # The 2×7 weight at rank 1: its gradient has rank ≤ 2, and a rank-2 subspace would leave a
        # complement of rounding noise that Newton–Schulz normalizes to an O(1) direction (COSMOS's
        # own property, sharded or not).
        first, second, third = (layer for layer in model if isinstance(layer, torch.nn.Linear))
        return [{"params": [first.weight, first.bias, second.weight, second.bias]},
                {"params": [third.weight, third.bias], "rank": 1}]

    def cosmos_pair(dtype, options):  # (sharded model, whole model, their optimizers)
        kwargs = dict(lr=0.02, weight_decay=0.1, rank=3, lr_ratio=0.5, betas=(0.9, 0.95), backend="torch", **options)
        model, replica = shard(make_model().to(dtype)), make_model().to(dtype)
        return model, replica, COSMOS(cosmos_groups(model), **kwargs), COSMOS(cosmos_groups(replica), **kwargs)

    # Saved by 2 ranks after 2 steps (M and V row-sharded, U and S replicated), resumed by 3.
    COSMOS_RESUMED = ("cosmos:float64", "cosmos:float32")
    if world == 3:
        cosmos_recorded = torch.load(checkpoint + ".cosmos_gradients")
        for name in COSMOS_RESUMED:
            model, replica, optimizer, reference = cosmos_pair(*COSMOS_CASES[name])
            states = {"model": get_model_state_dict(model)}
            dcp.load(states, checkpoint_id=f"{checkpoint}/{name}")
            set_model_state_dict(model, states["model"])
            load_optimizer_state(optimizer, f"{checkpoint}/{name}")
            layout = [(key, tuple(value.placements) if isinstance(value, DTensor) else None)
                      for p in model.parameters() for key, value in optimizer.state[p].items()]
            loaded_bytes = optimizer.state_bytes()
            for gradients in cosmos_recorded[name]:
                for whole, gradient in zip(replica.parameters(), gradients):
                    whole.grad = gradient
                reference.step()
            train(model, optimizer, replica, reference, 2, torch.Generator().manual_seed(500 + rank))
            results["resumed:" + name] = dict(
                params=[(p.full_tensor(), q.detach().clone()) for p, q in zip(model.parameters(), replica.parameters())],
                layout=layout, bytes=loaded_bytes)
    cosmos_recorded = {}
    for name, (dtype, options) in COSMOS_CASES.items():
        model, replica, optimizer, reference = cosmos_pair(dtype, options)
        generator = torch.Generator().manual_seed(200 + rank)
        train(model, optimizer, replica, reference, 2, generator, cosmos_recorded.setdefault(name, []))
        if world == 2 and name in COSMOS_RESUMED:
            dcp.save({"model": get_model_state_dict(model), "optimizer": optimizer.state_dict()},
                     checkpoint_id=f"{checkpoint}/{name}")
        train(model, optimizer, replica, reference, 1, generator)
        params, states = [], []
        for p, q in zip(model.parameters(), replica.parameters()):
            params.append((p.full_tensor(), q.detach().clone()))
            assert optimizer.state[p].keys() == reference.state[q].keys(), name
            for key, value in optimizer.state[p].items():
                sharded = isinstance(value, DTensor)
                states.append(dict(key=key, shape=tuple(p.shape), sharded=sharded,
                                   placements=tuple(value.placements) if sharded else None,
                                   local=value.to_local().nbytes if sharded else value.nbytes,
                                   value=value.full_tensor() if sharded else value.clone(),
                                   whole=reference.state[q][key].clone()))
        results[name] = dict(params=params, states=states, bytes=optimizer.state_bytes())
    # An Inf in one shard's gradient (row 6 of the 7×16 weight, on the last rank) at a basis
    # update: every rank keeps U and S, as one process does.
    model, replica = shard(make_model()), make_model()
    kwargs = dict(lr=0.02, rank=3, backend="torch")
    optimizer, reference = COSMOS(cosmos_groups(model), **kwargs), COSMOS(cosmos_groups(replica), **kwargs)
    generator = torch.Generator().manual_seed(300 + rank)
    train(model, optimizer, replica, reference, 2, generator)
    weight, whole_weight = model[2].weight, replica[2].weight
    before = {key: optimizer.state[weight][key].clone() for key in ("basis", "subspace")}
    whole_before = {key: reference.state[whole_weight][key].clone() for key in ("basis", "subspace")}
    optimizer.zero_grad()
    model(torch.randn(8, 12, generator=generator)).square().mean().backward()
    for whole, gradient in zip(replica.parameters(), [p.grad.full_tensor() for p in model.parameters()]):
        whole.grad = gradient
    whole_weight.grad[6, 0] = float("inf")
    if rank == world - 1:
        weight.grad.to_local()[-1, 0] = float("inf")
    optimizer.step()
    reference.step()
    results["cosmos:nonfinite"] = dict(
        kept=all(torch.equal(optimizer.state[weight][key], value) for key, value in before.items()),
        whole_kept=all(torch.equal(reference.state[whole_weight][key], value) for key, value in whole_before.items()),
        basis=optimizer.state[weight]["basis"].clone())
    if world == 2 and rank == 0:
        torch.save({name: recorded[name] for name in RESUMED if name in recorded}, checkpoint + ".gradients")
        torch.save({name: cosmos_recorded[name] for name in COSMOS_RESUMED}, checkpoint + ".cosmos_gradients")
    # 8-bit moments on row shards: the 100×12 weight's right-projected moments (100×8: 4 blocks of
    # 256 whole; 2 blocks per rank on 2 ranks, 2, 2, 1 on 3) are quantized by each rank in blocks
    # of its rows; the 7×100 and 2×7 weights' (left; for Natural GaLore every weight's: two-sided)
    # moments are replicated, quantized whole; the biases' moments (100, 7, 2 values: an empty
    # shard on 3 ranks) are sharded like them.
    import io
    import bitsandbytes.functional as bnb_functional
    from memzoo.optim.quantized_state import QuantizedMoment

    def nearest_code_error(signed):  # the largest |x − nearest code| over x in [−1, 1] ([0, 1])
        code = bnb_functional.create_dynamic_map(signed=signed).sort().values
        return max(code.diff().max().item() / 2, 1 - code[-1].item(), (1 + code[0].item()) if signed else code[0].item())

    def decoded(state, name):  # (the moment's values, each value's quantization error bound), whole
        codes, absmax = state[name], state[name + "_absmax"]
        moment = QuantizedMoment(signed=name == "exp_avg")
        error = nearest_code_error(moment.signed)
        local_codes = codes.to_local() if isinstance(codes, DTensor) else codes
        local_absmax = (absmax.to_local() if isinstance(absmax, DTensor) else absmax).reshape(-1)
        values = moment.decode(local_codes, local_absmax)
        bound = error * local_absmax[torch.arange(values.numel()) // 256].view(values.shape) if values.numel() else values
        if isinstance(codes, DTensor):
            values, bound = (DTensor.from_local(t, codes.device_mesh, codes.placements, shape=codes.shape,
                                                stride=codes.stride()).full_tensor() for t in (values, bound))
        return values, bound

    CASES_8BIT = {
        "galore:8bit": (GaLoreAdamW, canonical(GaLoreAdamW), dict(rank=8)),
        "apollo:8bit": (APOLLO, APOLLO, dict(rank=8, scale=4.0)),
        "fira:8bit": (FiraAdamW, canonical(FiraAdamW), dict(rank=8, scale=0.5, growth_limit=1.0)),
        "natural_galore:8bit": (NaturalGaLore, NaturalGaLore, dict(rank=8, natural_history=3, damping=1.0)),
    }
    for name, (cls, reference_cls, options) in CASES_8BIT.items():
        kwargs = dict(lr=0.02, weight_decay=0.1, update_proj_gap=2, backend="torch", min_8bit_size=1, **options)
        model, replica, replica32 = shard(make_model(100)), make_model(100), make_model(100)
        optimizer = cls(model.parameters(), optim_bits=8, **kwargs)
        reference = reference_cls(replica.parameters(), optim_bits=8, **kwargs)
        reference32 = reference_cls(replica32.parameters(), **kwargs)
        generator = torch.Generator().manual_seed(600 + rank)
        result = results[name] = dict(moments=[])
        for step in range(4):  # refreshes on steps 1 and 3
            x = torch.randn(8, 12, generator=generator)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            gradients = [p.grad.full_tensor() for p in model.parameters()]
            for copy in (replica, replica32):
                for whole, gradient in zip(copy.parameters(), gradients):
                    whole.grad = gradient
            for each in (optimizer, reference, reference32):
                each.step()
            if step == 0:  # from zero moments: m = (1 − β1)R, v = (1 − β2)R², one quantization apart
                for p, q in zip(model.parameters(), replica.parameters()):
                    for key in ("exp_avg", "exp_avg_sq"):
                        result["moments"].append((key, tuple(p.shape), decoded(optimizer.state[p], key),
                                                  decoded(reference.state[q], key)))
        result["params"] = [(p.full_tensor(), q.detach().clone(), w.detach().clone(), s.detach().clone())
                            for p, q, w, s in zip(model.parameters(), replica.parameters(), replica32.parameters(),
                                                  make_model(100).parameters())]
        result["states"] = [
            dict(key=key, shape=tuple(p.shape), sharded=isinstance(value, DTensor),
                 placements=tuple(value.placements) if isinstance(value, DTensor) else None,
                 global_shape=tuple(value.shape), whole_shape=tuple(reference.state[q][key].shape),
                 local=(value.to_local() if isinstance(value, DTensor) else value).nbytes,
                 value=None if isinstance(value, DTensor) else value.clone())
            for p, q in zip(model.parameters(), replica.parameters()) for key, value in optimizer.state[p].items()]
        result["bytes"] = optimizer.state_bytes()
        if name != "galore:8bit":
            continue
        # Per-rank torch.save / torch.load(weights_only=True), then one more step each: bitwise.
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        resumed = cls(model.parameters(), optim_bits=8, **kwargs)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        same_state = lambda other: all(  # noqa: E731
            optimizer.state[p].keys() == other.state[p].keys() and all(
                type(value) is type(other.state[p][key]) and torch.equal(local(value), local(other.state[p][key]))
                for key, value in optimizer.state[p].items()) for p in model.parameters())
        result["round_trip"] = same_state(resumed)
        before = [p.to_local().clone() for p in model.parameters()]
        optimizer.zero_grad()
        model(torch.randn(8, 12, generator=generator)).square().mean().backward()
        optimizer.step()
        after = [p.to_local().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, value in zip(model.parameters(), before):
                p.to_local().copy_(value)
        resumed.step()  # the same gradients
        result["round_trip_step"] = all(torch.equal(p.to_local(), value) for p, value in zip(model.parameters(), after))
        # DCP: saved by 2 ranks, loaded by 2 (bitwise) and by 3 (re-blocked: one more quantization).
        if world == 2:
            dcp.save({"optimizer": optimizer.state_dict()}, checkpoint_id=f"{checkpoint}/{name}")
            loaded = cls(model.parameters(), optim_bits=8, **kwargs)
            load_optimizer_state(loaded, f"{checkpoint}/{name}")
            result["dcp_same_world"] = same_state(loaded)
            saved_moments = [(key, decoded(optimizer.state[p], key)[0]) for p in model.parameters()
                             for key in ("exp_avg", "exp_avg_sq")]
            if rank == 0:
                torch.save(saved_moments, checkpoint + ".8bit_moments")
        else:
            resumed = cls(model.parameters(), optim_bits=8, **kwargs)
            load_optimizer_state(resumed, f"{checkpoint}/{name}")
            result["dcp_other_world"] = [
                (key, decoded(resumed.state[p], key),
                 tuple(resumed.state[p][key + "_absmax"].shape), isinstance(resumed.state[p][key], DTensor))
                for p in model.parameters() for key in ("exp_avg", "exp_avg_sq")]
            result["dcp_saved"] = torch.load(checkpoint + ".8bit_moments", weights_only=True)
            resumed.step()  # the resumed state steps (the last gradients)
            whole = cls(replica.parameters(), optim_bits=8, **kwargs)  # blocks of whole moments: refused
            try:
                load_optimizer_state(whole, f"{checkpoint}/{name}")
                result["dcp_whole_refused"] = "accepted"
            except ValueError as exc:
                result["dcp_whole_refused"] = str(exc) if not whole.state else "touched"
            result["dcp_other_world_steps"] = all(torch.isfinite(p.to_local()).all() for p in model.parameters())
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
    try:  # GaLore-Adafactor's plain Adafactor reduces over row shards: column shards are refused
        from torch.distributed.tensor import Shard
        GaLoreAdafactor(fully_shard(torch.nn.Linear(12, 6), shard_placement_fn=lambda p: Shard(p.dim() - 1)).parameters())
        results["refused:adafactor_columns"] = "accepted"
    except ValueError as exc:
        results["refused:adafactor_columns"] = str(exc)
    torch.save(results, out + f".{rank}")
    dist.destroy_process_group()
""")


def run_ranks(world: int, tmp_path, checkpoint: str, names: list[str] | None = None,
              source: str = _SCRIPT) -> list[dict]:
    """The script on ``world`` gloo ranks (2 ranks write DCP checkpoints under ``checkpoint``,
    3 ranks resume them); each rank's results. ``source``: another script taking the same
    arguments (rank, world, store file, output prefix, checkpoint[, names])."""
    script = tmp_path / f"script{world}.py"
    script.write_text(source)
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


CASES = ('galore:randomized', 'galore:randomized:full', 'galore:randomized:reverse', 'galore:svd', 'galore:random',
         'natural_galore', 'apollo', 'apollo:svd', 'apollo_mini', 'frugal', 'frugal:random', 'frugal:coordinates',
         'frugal:coordinates:right', 'fira', 'fira:svd:reverse', 'galore_adafactor', 'galore_adafactor:svd:reverse',
         'galore_adafactor:dense')
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
    assert {name for name in results[0] if not name.startswith(("resumed:", "refused:", "tsqr", "cosmos:"))
            and not name.endswith(":8bit")} == set(CASES)
    for basis, matrix in results[0]["tsqr"]:  # orthonormal, and it holds the column space
        assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
        assert torch.allclose(basis @ (basis.T @ matrix), matrix, atol=1e-4)
    message = results[0]["refused:natural_right"]
    assert "proj_type 'full'" in message and "DistributedDataParallel" in message, message
    message = results[0]["refused:adafactor_columns"]
    assert "Shard(dim=1)" in message and "row sharding" in message and "DistributedDataParallel" in message, message
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
    resumed = {name: value for name, value in runs[3][0].items()
               if name.startswith("resumed:") and not name.startswith("resumed:cosmos")}
    assert len(resumed) == 5
    for name, params in resumed.items():
        for sharded, whole in params:
            assert torch.allclose(sharded, whole, rtol=0, atol=_ATOL), (name, (sharded - whole).abs().max())


_COSMOS_CASES = ("cosmos:float64", "cosmos:float32", "cosmos:bfloat16")
# The sharded step adds its sums (Gram matrices, norms) in another order than one process, and
# uses X·(XᵀX) where the reference uses (X·Xᵀ)·X for m ≤ n. COSMOS is ill-conditioned in its
# rounding: Newton–Schulz multiplies the residual's small singular directions by up to a⁵ ≈ 480
# and every update is renormalized, so a 1-ulp relative change of the gradient alone moves the
# unsharded weights by ~2e-13 (float64), ~4e-4 (float32) and ~5e-3 (bf16 Newton–Schulz) after one
# step of RMS lr·ρ = 0.01. The bounds (observed: 1.5e-13, 3.5e-4, RMS 2.7e-3): the largest
# difference of a weight, and for bf16 its RMS. A wrong sign, scale, shard offset or
# orientation moves weights by ~0.01 RMS per step, for 3 steps.
_COSMOS_MAX = {"cosmos:float64": 1e-12, "cosmos:float32": 2e-3, "cosmos:bfloat16": None}
_COSMOS_RMS = {"cosmos:float64": 1e-12, "cosmos:float32": 5e-4, "cosmos:bfloat16": 5e-3}


def _aligned_signs(basis: torch.Tensor, whole_basis: torch.Tensor) -> torch.Tensor:
    """The column signs of ``basis`` matched to ``whole_basis`` (eigenvectors and QR columns are
    defined up to sign; COSMOS's update and U·S·Uᵀ do not depend on them)."""
    signs = (basis * whole_basis).sum(0).sign()
    return torch.where(signs == 0, torch.ones_like(signs), signs)


@pytest.mark.parametrize("world", [2, 3])
def test_cosmos_on_fsdp2_row_shards_equals_whole_tensors(runs, world) -> None:
    """COSMOS stepping FSDP2 row shards (16, 7 and 2 rows on 2 and 3 ranks: uneven and empty
    shards; Newton–Schulz with m > n and m < n) equals one process stepping the whole tensors
    over 3 steps (basis initialization, two basis updates), in float64, in float32 (maximize,
    γ = 0.5) and with the official bf16 Newton–Schulz, within the bounds above. M (m×n) and V
    (m×r) are DTensors sharded like the weight (M bitwise the whole run's rows: it is row-local);
    U (n×r) and S (r×r) are plain tensors with the same bits on every rank, equal to the whole
    run's up to the eigenvectors' signs."""
    from torch.distributed.tensor import Shard

    results = runs[world]
    for name in _COSMOS_CASES:
        result = results[0][name]
        for sharded, whole in result["params"]:
            difference = sharded - whole
            if _COSMOS_MAX[name] is not None:
                assert difference.abs().max() <= _COSMOS_MAX[name], (name, difference.abs().max())
            assert difference.square().mean().sqrt() <= _COSMOS_RMS[name], (name, difference.square().mean().sqrt())
        for other in results[1:]:
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(result["params"], other[name]["params"])), name
        for rank_result in results:
            assert rank_result[name]["bytes"] == sum(state["local"] for state in rank_result[name]["states"]), name
        states = result["states"]
        tight = name == "cosmos:float64"
        for index, state in enumerate(states):
            value, whole = state["value"], state["whole"]
            assert value.shape == whole.shape, (name, state["key"])
            if state["key"] in ("exp_avg", "exp_avg_sq"):
                assert state["sharded"] and state["placements"] == (Shard(0),), (name, state["key"], state["shape"])
                locals_ = [rank_result[name]["states"][index]["local"] for rank_result in results]
                assert sum(locals_) == whole.nbytes, (name, state["key"])
                assert max(locals_) * state["shape"][0] <= whole.nbytes * -(-state["shape"][0] // world)
                if state["key"] == "exp_avg" or len(state["shape"]) == 1:  # row-local (or AdamW): bitwise
                    assert torch.equal(value, whole), (name, state["key"], state["shape"])
                else:  # V = EMA of (G·U)², U as below
                    atol = (1e-9 if tight else 1e-5) * whole.abs().max().item()
                    assert torch.allclose(value, whole, rtol=0, atol=atol), (name, state["shape"])
            else:  # step, U, S: replicated, the same bits on every rank
                assert not state["sharded"], (name, state["key"])
                for rank_result in results[1:]:
                    assert torch.equal(rank_result[name]["states"][index]["value"], value), (name, state["key"])
        factors = {(state["shape"], state["key"]): state for state in states if state["key"] in ("basis", "subspace")}
        for (shape, key), state in factors.items():
            if key != "basis":
                continue
            signs = _aligned_signs(state["value"], state["whole"])
            subspace, whole_subspace = factors[(shape, "subspace")]["value"], factors[(shape, "subspace")]["whole"]
            atol = 1e-10 if tight else 1e-3
            assert torch.allclose(state["value"] * signs, state["whole"], rtol=0, atol=atol), (name, shape)
            assert torch.allclose(subspace * signs[:, None] * signs[None, :], whole_subspace, rtol=0,
                                  atol=atol * whole_subspace.abs().max().item()), (name, shape)


def test_cosmos_resumes_from_dcp_on_another_world_size(runs) -> None:
    """COSMOS saved with torch.distributed.checkpoint by 2 ranks after 2 steps (its basis
    initialization and a first update) and resumed by 3 ranks with load_optimizer_state equals an
    uninterrupted whole-tensor run over 2 more steps, within the bounds of the sharded steps: M
    and V (m×r) resharded by rows, U (n×r) and S (r×r) replicated, and each rank holding what a
    3-rank run holds. Was: V came back whole on every rank (DCP makes a plain tensor of every
    state not shaped like its weight), and the first resumed step failed."""
    from torch.distributed.tensor import Shard

    fresh = {name: [result[name]["bytes"] for result in runs[3]] for name in ("cosmos:float64", "cosmos:float32")}
    for name in fresh:
        resumed = [result["resumed:" + name] for result in runs[3]]
        for sharded, whole in resumed[0]["params"]:
            difference = (sharded - whole).abs().max()
            assert difference <= _COSMOS_MAX[name], (name, difference)
        for other in resumed[1:]:
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed[0]["params"], other["params"])), name
        assert [result["bytes"] for result in resumed] == fresh[name], name
        for result in resumed:
            for key, placements in result["layout"]:
                if key in ("exp_avg", "exp_avg_sq"):
                    assert placements == (Shard(0),), (name, key, placements)
                else:
                    assert placements is None, (name, key, placements)


@pytest.mark.parametrize("world", [2, 3])
def test_cosmos_on_row_shards_keeps_its_subspace_on_every_rank_at_a_nonfinite_gradient(runs, world) -> None:
    """An Inf in one rank's rows of a gradient at a basis update: every rank keeps U and S (the
    non-finiteness is voted over the shards, the Gram sums carry it to every rank), as the
    whole-tensor run does."""
    results = [rank_result["cosmos:nonfinite"] for rank_result in runs[world]]
    assert results[0]["whole_kept"]
    assert all(result["kept"] for result in results)
    assert all(torch.equal(result["basis"], results[0]["basis"]) for result in results[1:])


def test_the_optimizers_marked_projected_shards_are_the_ones_tested_here() -> None:
    from memzoo.optim.registry import OPTIMIZERS

    marked = {info.cls.__name__ for info in OPTIMIZERS.values() if info.projected_shards}
    # A new one: add its cases to _SCRIPT's CASES.
    assert marked == {"GaLoreAdamW", "NaturalGaLore", "APOLLO", "FRUGAL", "FiraAdamW", "COSMOS", "GaLoreAdafactor"}


_8BIT_CASES = ("galore:8bit", "apollo:8bit", "fira:8bit", "natural_galore:8bit")


@pytest.mark.parametrize("world", [2, 3])
def test_8bit_moments_on_fsdp2_row_shards(runs, world) -> None:
    """8-bit moments (optim_bits=8) of GaLore, APOLLO, Fira and Natural GaLore on FSDP2 row
    shards (uneven and empty shards, 4 steps crossing two refreshes). Each rank quantizes its rows of a row-sharded
    moment (right-projected m×r, or a bias's) in blocks of its own: the codes are a DTensor
    sharded like the weight, the absmax one row of block scales per rank; r-sized moments (of
    left projections) are replicated and quantized whole, as one process does. Was: refused.
    Saved by DCP on 2 ranks and resumed on 3, the moments are re-blocked: within one more
    quantization error (e·absmax of the new block) of the saved ones (was: refused).

    Bounds. A decoded value is within e·absmax of its block of the value encoded (e: the
    largest distance from a point of [−1, 1], or [0, 1] for v, to its nearest code of the
    dynamic map, ≈ 0.007), so after the first step (from zero moments, the same R up to the
    order of sums) the sharded and whole runs' moments differ elementwise by at most the sum
    of both bounds (a wrong sign or a row offset breaks it: checked). Afterwards the two runs
    carry different quantization errors; the weights after 4 steps then differ by no more than
    twice the largest change 8-bit storage itself makes in the whole run (max |W₈ − W₃₂| over
    the model; observed up to 1.2×), itself under half the largest distance a weight moved."""
    from torch.distributed.tensor import Shard

    results = runs[world]
    for name in _8BIT_CASES:
        result = results[0][name]
        for key, shape, (values, bound), (whole, whole_bound) in result["moments"]:
            limit = bound + whole_bound + 1e-5 * whole.abs().max()
            assert ((values - whole).abs() <= limit).all(), (name, key, shape, ((values - whole).abs() - limit).max())
            if whole.numel() > 1 and whole.abs().max() > 0:  # negative controls: the bound can tell
                wrong = -values if key == "exp_avg" else values.roll(1, 0)
                assert ((wrong - whole).abs() > limit).any(), (name, key, shape)
        # Over the model: the largest difference, change by 8-bit storage, distance moved.
        difference, quantization, moved = (max((a - b).abs().max() for a, b in pairs) for pairs in (
            [(sharded, whole) for sharded, whole, _, _ in result["params"]],
            [(whole, whole32) for _, whole, whole32, _ in result["params"]],
            [(whole, start) for _, whole, _, start in result["params"]]))
        assert difference <= 2 * quantization + _ATOL, (name, difference, quantization)
        assert 2 * quantization + _ATOL <= 0.5 * moved, (name, quantization, moved)  # a wrong step would show
        for other in results[1:]:  # every rank gathers the same weights
            assert all(torch.equal(a[0], b[0]) for a, b in zip(result["params"], other[name]["params"])), name
        per_rank = [rank_result[name]["states"] for rank_result in results]
        for rank_states, rank_result in zip(per_rank, results):
            assert rank_result[name]["bytes"] == sum(state["local"] for state in rank_states), name
        for index, state in enumerate(per_rank[0]):
            key, rows = state["key"], state["shape"][0]
            locals_ = [rank_states[index]["local"] for rank_states in per_rank]
            if key.endswith("_absmax") and state["sharded"]:  # a row of ⌈⌈m/world⌉·r/256⌉ scales per rank
                ranks, blocks = state["global_shape"]
                whole_codes = next(s for s in per_rank[0] if s["key"] == key[: -len("_absmax")] and
                                   s["shape"] == state["shape"])["whole_shape"]
                row = 1 if len(whole_codes) == 1 else whole_codes[1]
                assert ranks == world and blocks == -(-(-(-rows // world) * row) // 256), (name, key, state)
                assert locals_ == [4 * blocks] * world, (name, key)
            elif state["sharded"]:  # codes (1 byte a value) and 32-bit state: 1/world on each rank
                assert state["global_shape"] == state["whole_shape"], (name, key)
                assert state["placements"] == (Shard(0),), (name, key)
                most = -(-rows // world)
                assert max(locals_) * rows <= sum(locals_) * most, (name, key)
            else:  # replicated: a counter or r-sized, the same bits on every rank, laid out as one process
                assert state["global_shape"] == state["whole_shape"], (name, key)
                for rank_states in per_rank[1:]:
                    assert torch.equal(rank_states[index]["value"], state["value"]), (name, key)
        codes = [s for s in per_rank[0] if s["key"] in ("exp_avg", "exp_avg_sq")]
        right = name != "natural_galore:8bit"  # Natural GaLore projects two-sided: r×r moments
        assert all(s["sharded"] for s in codes if s["shape"] == (100,) or right and s["shape"][0] == 100), name
        assert not all(s["sharded"] for s in codes), name  # the left projections' moments
    galore = [rank_result["galore:8bit"] for rank_result in results]
    assert all(result["round_trip"] and result["round_trip_step"] for result in galore)
    if world == 2:
        assert all(result["dcp_same_world"] for result in galore)
    else:  # resumed on 3: within one more quantization error (in the new blocks) of the saved moments
        for result in galore:
            assert result["dcp_other_world_steps"]
            message = result["dcp_whole_refused"]
            assert "quantized by 2 row shards and this run quantizes them by one process" in message, message
            for (key, (values, bound), absmax_shape, sharded), (saved_key, saved) in zip(
                    result["dcp_other_world"], result["dcp_saved"], strict=True):
                assert key == saved_key and values.shape == saved.shape, (key, saved_key)
                limit = bound + 1e-6 * saved.abs().max()
                excess = ((values - saved).abs() - limit).max() if values.numel() else 0
                assert excess <= 0, (key, values.shape, excess)
                if sharded:  # re-blocked: this run's blocks, one row of scales per rank
                    assert absmax_shape[0] == 3, (key, absmax_shape)
                if saved.numel() > 1 and saved.abs().max() > 0:  # negative control: the bound can tell
                    assert ((values.roll(1, 0) - saved).abs() > limit).any(), (key, values.shape)


def test_8bit_rows_decode_with_the_scales_of_the_rank_that_saved_them() -> None:
    """Re-blocking on another world size: the rows a new rank holds of a 100×8 8-bit moment
    quantized on 2 row shards (blocks of 256 counted from each old rank's first row) decode
    bitwise as the old ranks decode them, across block boundaries that fall inside the new
    shards (34·8 is not a multiple of 256); with the old ranks' scales swapped they do not."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from memzoo.optim.lowrank import LowRankOptimizer
    from memzoo.optim.quantized_state import QuantizedMoment

    moment, shape = QuantizedMoment(signed=True), torch.Size((100, 8))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 100)[:, None]
    codes, expected, absmax = torch.empty(shape, dtype=torch.uint8), torch.empty(shape), torch.zeros(2, 2)
    for old_rank in range(2):
        rows = slice(50 * old_rank, 50 * old_rank + 50)
        moment.encode_(codes[rows], absmax[old_rank], values[rows])
        expected[rows] = moment.decode(codes[rows], absmax[old_rank])
    for offset, count in ((0, 34), (34, 34), (68, 32)):  # torch.chunk of 100 rows by 3
        shard = SimpleNamespace(offset=offset, rows=count)
        rows = codes[offset: offset + count]
        decoded = LowRankOptimizer._decoded_rows(moment, rows, absmax, shard, shape)
        assert torch.equal(decoded, expected[offset: offset + count]), offset
        swapped = LowRankOptimizer._decoded_rows(moment, rows, absmax.flip(0), shard, shape)
        assert not torch.allclose(swapped, expected[offset: offset + count], rtol=0.1), offset
