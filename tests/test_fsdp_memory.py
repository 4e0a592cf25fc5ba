"""memzoo-bench memory --fsdp: the formulas of memzoo.bench.fsdp_memory against hand-derived
small cases, against the registry's state counts on one rank, and the command's table."""

from __future__ import annotations

import json

import pytest
import torch

from memzoo.bench.cli import main
from memzoo.bench.fsdp_memory import (
    BENCH_HYPER_KEYS,
    FSDP_METHODS,
    Traffic,
    adafactor_weight,
    apollo_weight,
    cosmos_weight,
    fsdp_estimate,
    frugal_weight,
    galore_adafactor_weight,
    galore_weight,
    gradient_reduce_scatter_bytes,
    refresh_traffic,
    shard_rows,
    sparse_mezo_weight,
)
from memzoo.bench.presets import SHAPE_PRESETS


def test_ring_bytes_and_fsdp_reduce_scatter() -> None:
    # All-reduce of S: 2(W−1)/W·S sent per rank; all-gather of s per rank: (W−1)·s.
    assert Traffic(all_reduce=100, all_gather=10).sent_per_rank(4) == 2 * 3 / 4 * 100 + 3 * 10
    assert Traffic(all_reduce=100, all_gather=10).sent_per_rank(1) == 0
    # torch.chunk rows on rank 0: ⌈m/W⌉, at most m.
    assert [shard_rows(6, w) for w in (1, 2, 4, 8)] == [6, 3, 2, 1]
    # (6, 4) padded to 4 blocks of 2 rows, (5,) to 4 blocks of 2: (W−1) blocks sent, bf16.
    assert gradient_reduce_scatter_bytes([(6, 4), (5,)], 4, 2) == 3 * 2 * 4 * 2 + 3 * 2 * 1 * 2


def test_galore_right_projection_of_a_6x4_weight_on_two_ranks() -> None:
    # m = 6 ≥ n = 4: right side, r = 2, fp32, randomized with p = 2 power iterations and
    # oversample 8 (w = min(10, 6, 4) = 4). Rank 0 holds 3 rows.
    cost = galore_weight(6, 4, 2, side="right", rank=2, projector="randomized", param_size=4)
    assert cost.sharded == 2 * 3 * 2 * 4  # exp_avg and exp_avg_sq: rank 0's 3 rows × r, fp32
    assert cost.replicated == 2 * 4 * 4 + 16  # Q (r×n) + int64 step and seed
    assert cost.steady == Traffic()  # R_k = G_k·Qᵀ is local
    # Gᵀ·Ω and 2 power iterations' Gᵀ·Q (n×w fp32), 2 + 1 Gram matrices (w×w fp64), one int64.
    assert cost.refresh == Traffic(all_reduce=3 * 4 * 4 * 4 + 3 * 8 * 4 * 4 + 8)
    assert cost.refresh.sent_per_rank(2) == 584
    # The exact SVD instead: GᵀG (n×n, float64) and the finiteness flag.
    assert refresh_traffic(6, 4, side="right", projector="svd", rank=2, power_iters=2, oversample=8,
                           param_size=4) == Traffic(all_reduce=8 * 16 + 8)


def test_galore_left_projection_of_a_4x6_weight_on_two_ranks() -> None:
    # m = 4 < n = 6: left side; rank 0 holds 2 rows of P (m×r); the moments (r×n) are replicated.
    cost = galore_weight(4, 6, 2, side="left", rank=2, projector="randomized", param_size=4)
    assert cost.sharded == 2 * 2 * 4
    assert cost.replicated == 2 * 2 * 6 * 4 + 16
    assert cost.steady == Traffic(all_reduce=2 * 6 * 4)  # R = Σ P_kᵀ·G_k, r×n fp32, every step
    assert cost.steady.sent_per_rank(2) == 48
    # Range finder on the row shards: 3 Gram matrices (w = 4, fp64), 2 Gᵀ·basis and the final
    # basisᵀ·G (n×w fp32), the flag; the signs: an all-gather of 2r fp32 values.
    assert cost.refresh == Traffic(all_reduce=3 * 8 * 16 + 3 * 6 * 4 * 4 + 8, all_gather=2 * 2 * 4)
    # Seeded projections are regenerated on every rank: no refresh traffic, no stored factor.
    seeded = galore_weight(4, 6, 2, side="left", rank=2, projector="random", param_size=4)
    assert seeded.refresh == Traffic() and seeded.sharded == 0


def test_apollo_frugal_and_cosmos_small_cases() -> None:
    channel = apollo_weight(6, 4, 2, side="right", rank=2, projector="random", param_size=4)
    assert (channel.sharded, channel.replicated) == (2 * 3 * 2 * 4, 16 + 4)  # limiter norm: fp32 scalar
    assert channel.steady == Traffic(all_reduce=4)  # the limiter's ‖S_k‖²
    tensor = apollo_weight(6, 4, 2, side="right", rank=1, projector="random", param_size=4, scale_type="tensor")
    assert tensor.steady == Traffic(all_reduce=3 * 4)  # ‖N_k‖², ‖R_k‖² and ‖S_k‖²
    no_limiter = apollo_weight(4, 6, 2, side="left", rank=2, projector="random", param_size=4, limiter=False)
    assert no_limiter.steady == Traffic(all_reduce=2 * 6 * 4)
    # FRUGAL, 2 coordinates (columns) of a 6×4 weight: moments of rank 0's rows, the indices,
    # step, Adam step and seed; ‖G‖² and ‖E‖² in float64 each step.
    frugal = frugal_weight(6, 4, 2, side="right", rank=2, projector="coordinates", param_size=4)
    assert (frugal.sharded, frugal.replicated) == (2 * 3 * 2 * 4, 8 * 2 + 24)
    assert frugal.steady == Traffic(all_reduce=16) and frugal.refresh == Traffic()
    # COSMOS, bf16 6×4 at r = 2: M and V rows, U and S fp32. Per step: the (flag, max |G|) vote
    # (2 fp64), Gᵀ(GU) and (GU)ᵀ(GU) fp32, the residual's max and ‖X‖² (fp64), five 4×4 Gram
    # matrices accumulated in fp32, ‖O‖² and ‖D‖² (fp64); the first step GᵀG instead of Gᵀ(GU).
    cosmos = cosmos_weight(6, 4, 2, rank=2, param_size=2)
    assert (cosmos.sharded, cosmos.replicated) == (3 * (4 + 2) * 2, (4 * 2 + 2 * 2) * 4 + 8)
    assert cosmos.steady == Traffic(all_reduce=16 + (8 + 4) * 4 + 16 + 5 * 16 * 4 + 8 + 8)
    assert cosmos.refresh == Traffic(all_reduce=(16 - 8) * 4)
    # r = n: no complement, no Newton–Schulz; float64 factors and Gram matrices.
    assert cosmos_weight(6, 4, 2, rank=4, param_size=8, ns_size=8).steady == \
        Traffic(all_reduce=16 + (16 + 16) * 8 + 8)
    # Sparse-MeZO: rank 0's 12 of 24 elements in one 1024-element chunk of mask bits.
    assert sparse_mezo_weight((6, 4), 2, masked=True) == \
        sparse_mezo_weight((6, 4), 1, masked=True) == type(cosmos)(sharded=128, replicated=4,
                                                                   refresh=Traffic(all_reduce=4 * 2048))


def test_galore_adafactor_small_cases() -> None:
    # 6×4 right projection, r = 2, bf16 weight (float32 state and math), β1: rank 0's 3 rows of the
    # row EMA and momentum, the column EMA (r) and Q (r×n bf16) replicated with step and seed.
    # Per step: column sums + Σ row EMA (r + 1) and ΣU² in float32, Σw² in float64.
    right = galore_adafactor_weight(6, 4, 2, side="right", rank=2, projector="random", param_size=2, beta1=True)
    assert (right.sharded, right.replicated) == (3 * (1 + 2) * 4, 2 * 4 + 16)
    assert right.steady == Traffic(all_reduce=(2 + 1 + 1) * 4 + 8) and right.refresh == Traffic()
    # 4×6 left projection: R (r×n) all-reduced as GaLore's; its row (r) and column (n) EMAs replicated.
    left = galore_adafactor_weight(4, 6, 2, side="left", rank=2, projector="random", param_size=4,
                                   scale_parameter=False)
    assert (left.sharded, left.replicated) == (0, (2 + 6) * 4 + 16)
    assert left.steady == Traffic(all_reduce=2 * 6 * 4)
    # Dense: a 5×3 weight's column EMA (3) replicated, its column sums + Σ row EMA (4) and ΣU² reduced;
    # a 5×3×2 weight's EMAs (5×3 and 5×2) are rank 0's 3 rows; a vector's v its 3 elements.
    assert adafactor_weight((5, 3), 2, param_size=4) == \
        type(right)(sharded=3 * 4, replicated=3 * 4 + 8, steady=Traffic(all_reduce=(4 + 1) * 4 + 8))
    assert adafactor_weight((5, 3, 2), 2, param_size=4, beta1=True) == \
        type(right)(sharded=3 * (3 + 2 + 6) * 4, replicated=8, steady=Traffic(all_reduce=4 + 8))
    assert adafactor_weight((5,), 2, param_size=4, scale_parameter=False) == \
        type(right)(sharded=3 * 4, replicated=8, steady=Traffic(all_reduce=4))


@pytest.mark.parametrize("name", ["galore_adamw", "natural_galore", "apollo", "apollo_mini", "frugal", "cosmos",
                                  "lion", "galore_adafactor", "adam_mini"])
def test_one_rank_state_is_the_registry_count(name) -> None:
    """On one rank nothing is sharded: the formulas' state equals the registry's analytic count
    (held to the real state tensors by the contract suite) for the benchmark settings on tiny."""
    from memzoo.bench.presets import make_named_parameters
    from memzoo.optim.registry import OPTIMIZERS

    info = OPTIMIZERS[name]
    named = make_named_parameters("tiny", torch.float32, "cpu")
    if info.bench_groups is None:
        optimizer = info.cls([p for _, p in named], **info.sample_kwargs, backend="torch")
    else:
        hyper = {k: v for k, v in info.sample_kwargs.items() if k in BENCH_HYPER_KEYS}
        optimizer = info.cls(info.bench_groups(named), **hyper, backend="torch")
    optimizer.step()
    estimate = fsdp_estimate(name, "tiny", 1, dtype=torch.float32)
    assert estimate.cost.sharded + estimate.cost.replicated == info.expected_state_bytes(optimizer) > 0
    assert estimate.row()["steady_mib"] == estimate.row()["amortized_mib"] == 0.0  # one rank: no traffic


def test_sharded_state_shrinks_and_replicated_parts_stay() -> None:
    one, eight = (fsdp_estimate("galore_adamw", "350m", world, dtype=torch.bfloat16) for world in (1, 8))
    assert eight.cost.replicated == one.cost.replicated
    assert one.cost.sharded / 8 <= eight.cost.sharded < one.cost.sharded / 8 * 1.01
    # 350m's down_proj (1024×2736) is projected from the left: R (256×2736 fp32) all-reduced per step.
    assert eight.cost.steady == Traffic(all_reduce=24 * 256 * 2736 * 4)
    adamw = fsdp_estimate("adamw", "350m", 8, dtype=torch.bfloat16)
    assert adamw.gradient_reduce_scatter == 7 * sum(-(-s[0] // 8) * (s[1] if len(s) > 1 else 1) * 2
                                                    for _, s in SHAPE_PRESETS["350m"].shapes())
    # MeZO: nothing but q loss differences; a rank-2048 GaLore on 70B's k_proj (1024 rows) is clamped.
    assert fsdp_estimate("mezo", "70b", 64, settings={"n_samples": 4}).cost.steady == Traffic()
    assert fsdp_estimate("mezo", "70b", 64, settings={"n_samples": 4}).steady_extra == Traffic(all_reduce=16)
    # Adam-mini on 350m (24 layers, 16 heads of 64): q and k one v per head, the norms one per
    # tensor, all replicated and their g² sums all-reduced (fp32); rows' v sharded with the rows.
    mini = fsdp_estimate("adam_mini", "350m", 8, dtype=torch.bfloat16)
    spanning_blocks = 24 * (2 * 16 + 2) + 1
    assert mini.cost.steady == Traffic(all_reduce=4 * spanning_blocks)
    assert mini.cost.replicated == 4 * spanning_blocks + 8 * len(SHAPE_PRESETS["350m"].shapes())
    with pytest.raises(ValueError, match="world"):
        fsdp_estimate("lion", "350m", 0)


def test_memory_fsdp_prints_the_computed_table(tmp_path, capsys) -> None:
    path = tmp_path / "fsdp.json"
    assert main(["memory", "--fsdp", "8,64", "--preset", "1b", "--dtype", "bf16", "--optimizer",
                 "galore_adamw,apollo_mini,mezo", "--set", "rank=512", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimate=computed-from-formulas" in out.splitlines()[0] and "not measured" in out
    assert "vs_grad_traffic" in out and "state_replicated_mib" in out
    report = json.loads(path.read_text())
    assert [(row["world"], row["optimizer"]) for row in report["rows"]] == \
        [(w, n) for w in (8, 64) for n in ("adamw", "galore_adamw", "apollo_mini", "mezo")]
    galore = report["rows"][1]
    # rank=512 reached the projected group: 1b's down_proj R is 512×5461 fp32 per layer.
    assert galore["steady_mib"] == pytest.approx(2 * 7 / 8 * 24 * 512 * 5461 * 4 / 2**20)
    assert galore["vs_grad_traffic"] == pytest.approx(galore["amortized_mib"] / galore["grad_reduce_scatter_mib"])
    # Shapes-only presets and --set need --fsdp.
    assert main(["memory", "--preset", "70b"]) == 2
    assert "need --fsdp" in capsys.readouterr().err
    assert set(FSDP_METHODS) >= {"adamw", "lion", "galore_adamw", "apollo", "apollo_mini", "frugal", "cosmos", "mezo"}


def _rank0_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    from torch.distributed.tensor import DTensor

    return sum((value.to_local() if isinstance(value, DTensor) else value).nbytes
               for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor))


def test_rank0_state_and_collectives_of_fully_sharded_tiny_match_the_formulas(monkeypatch) -> None:
    """Rank 0 of 2, in-process (torch's fake process group: collectives do nothing, shards and
    state have their real shapes): fully_shard the tiny decoder, step every first-order method
    this memzoo steps on row shards, count rank 0's state tensors (a DTensor's local rows) and
    record the optimizer's collectives: a refresh step (the first) and a steady one. Methods
    still planned are skipped here: their optimizers refuse the shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")

    from memzoo.bench.fsdp_memory import _build
    from memzoo.bench.model import Decoder, DecoderConfig

    recorded = []

    def recorder(kind, collective):
        def record(tensor, *args, **kwargs):
            # all_gather_into_tensor(output, input): each rank contributes its input.
            recorded.append((kind, (args[0] if kind == "all_gather" else tensor).nbytes))
            return collective(tensor, *args, **kwargs)
        return record

    def traffic() -> Traffic:
        total = Traffic(all_reduce=sum(n for kind, n in recorded if kind == "all_reduce"),
                        all_gather=sum(n for kind, n in recorded if kind == "all_gather"))
        recorded.clear()
        return total

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    monkeypatch.setattr(dist, "all_reduce", recorder("all_reduce", dist.all_reduce))
    monkeypatch.setattr(dist, "all_gather_into_tensor", recorder("all_gather", dist.all_gather_into_tensor))
    try:
        checked = []
        for name in FSDP_METHODS:
            estimate = fsdp_estimate(name, "tiny", 2, dtype=torch.float32)
            if estimate.status != "implemented" or name in ("mezo", "sparse_mezo"):
                continue
            shape = SHAPE_PRESETS["tiny"]
            model = Decoder(DecoderConfig(hidden=shape.hidden, intermediate=shape.intermediate, layers=shape.layers,
                                          heads=1, seq_len=8, vocab=shape.vocab))
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
            named = [(n.removesuffix(".weight"), p) for n, p in model.named_parameters()]
            assert sorted((n, tuple(p.shape)) for n, p in named) == sorted(shape.shapes())
            for _, param in named:  # finite gradients of rank 0's rows, without a forward
                param.grad = param.detach() * 0.5 + 0.01
            if name == "adamw":
                optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-3, foreach=True)
            else:
                optimizer = _build(name, named, {})[1]
            recorded.clear()
            optimizer.step()
            assert _rank0_state_bytes(optimizer) == estimate.cost.sharded + estimate.cost.replicated, name
            assert traffic() == estimate.cost.steady + estimate.cost.refresh, name  # every projector refreshed
            optimizer.step()
            assert traffic() == estimate.cost.steady, name
            checked.append(name)
        assert {"adamw", "lion"} <= set(checked)
    finally:
        dist.destroy_process_group()


def test_status_follows_what_the_optimizers_step_on_shards() -> None:
    from memzoo.optim.registry import OPTIMIZERS

    # The registry marks the methods that step projected row shards (absent: none does yet).
    sharded = getattr(OPTIMIZERS["galore_adamw"], "projected_shards", False)
    assert fsdp_estimate("galore_adamw", "tiny", 2).status == ("implemented" if sharded else "planned")
    # Natural GaLore's history of a right projection would be row-sharded: refused on shards.
    natural_right = fsdp_estimate("natural_galore", "tiny", 2, settings={"proj_type": "right"}).status
    assert natural_right == ("refused" if getattr(OPTIMIZERS["natural_galore"], "projected_shards", False)
                             else "planned")
    assert fsdp_estimate("cosmos", "tiny", 2).status == "implemented"
    assert fsdp_estimate("lion", "tiny", 2).status == fsdp_estimate("mezo", "tiny", 2).status == "implemented"
