"""memzoo-bench train / zo / memory on their tiny presets (few steps): the model, the corpus rule,
the documented JSON, and real properties (every optimizer lowers the loss; analytic state bytes
equal the measured ones)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memzoo.bench.cli import main
from memzoo.bench.corpus import load_corpus, split_of, stdlib_files
from memzoo.bench.model import Decoder, DecoderConfig
from memzoo.bench.train import DEFAULT_TRAIN, RunStore, bracket_lr, lr_lambda, steps_to_reach

TINY = DecoderConfig(hidden=32, intermediate=48, layers=2, heads=2, seq_len=16)


def test_decoder_is_causal_and_counts_its_parameters() -> None:
    torch.manual_seed(0)
    model = Decoder(TINY)
    assert sum(p.numel() for p in model.parameters()) == TINY.numel()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])  # positions before 9 do not see the change
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    loss = model.loss(tokens)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1  # near-uniform at init


def test_rotary_scores_depend_on_relative_position_only() -> None:
    # RoPE (Su et al. 2021): rotated q·k depends on i − j, and on nothing else of i and j.
    model = Decoder(TINY)
    head_dim = TINY.hidden // TINY.heads
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def rotate(x: torch.Tensor, i: int) -> torch.Tensor:
        first, second = x.chunk(2)
        return x * model.rope_cos[i] + torch.cat((-second, first)) * model.rope_sin[i]

    assert torch.allclose(rotate(q, 5) @ rotate(k, 2), rotate(q, 12) @ rotate(k, 9), atol=1e-5)
    assert not torch.allclose(rotate(q, 5) @ rotate(k, 2), rotate(q, 5) @ rotate(k, 4), atol=1e-3)


def test_corpus_rule_split_and_hash() -> None:
    files = stdlib_files()
    paths = [relative for relative, _ in files]
    assert paths == sorted(paths) and len(paths) > 100
    assert not any(part in {"test", "tests", "site-packages", "idlelib"} for p in paths for part in p.split("/")[:-1])
    corpus = load_corpus()
    assert corpus.sha256 == load_corpus().sha256 and len(corpus.sha256) == 64
    assert sum(corpus.files.values()) == len(files)
    for name, count in corpus.files.items():
        assert count == sum(split_of(p) == name for p in paths) and count > 0
    assert sum(t.numel() for t in corpus.splits.values()) == sum(p.stat().st_size + 1 for _, p in files)


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    factor = lr_lambda(100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(99) == pytest.approx(0.1, abs=1e-3)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 99))


def test_sweep_picks_the_lowest_final_loss() -> None:
    best, runs = bracket_lr("x", 1.0, [0.5, 1.0, 2.0], lambda lr, seed: {"lr": lr, "loss": (lr - 1.1) ** 2}, "loss")
    assert best["lr"] == 1.0 and len(runs) == 3 and set(best["lr_sweep"]) == {"0.5", "1", "2"}
    assert best["lr_edge"] is None and best["seeds"] == 1 and best["loss_std"] == 0.0
    assert steps_to_reach([(0, 3.0), (10, 2.5), (20, 2.0)], 2.4) == 20
    assert steps_to_reach([(0, 3.0)], 2.0) is None


def _quadratic_in_log_lr(optimum: float, calls: list[tuple[float, int]]):
    """A deterministic fake run: final loss (log10 lr − log10 optimum)² + 0.01·seed, a curve."""
    def run(lr: float, seed: int) -> dict:
        calls.append((lr, seed))
        loss = (math.log10(lr) - math.log10(optimum)) ** 2 + 0.01 * seed
        return {"lr": lr, "loss": loss, "val_curve": [(0, 5.0 + seed), (10, loss)], "tokens_per_s": 100.0 + seed}
    return run


@pytest.mark.parametrize("optimum, expected_lr, edge, extra_runs", [
    (2e-2, 1e-2, None, 1),  # best at the top of 1e-4..1e-2: one more lr (1e-1) brackets it
    (1e-8, 1e-6, "low", 2),  # far below: two extensions (1e-5, 1e-6), still at the edge, marked
    (1e-3, 1e-3, None, 0),  # interior from the start: nothing added
])
def test_sweep_extends_past_an_edge_until_bracketed_and_marks_what_stayed(optimum, expected_lr, edge,
                                                                         extra_runs) -> None:
    calls: list[tuple[float, int]] = []
    best, runs = bracket_lr("x", 1e-3, [0.1, 1.0, 10.0], _quadratic_in_log_lr(optimum, calls), "loss",
                            seed=0, seeds=1, max_extensions=2)
    assert len(calls) == 3 + extra_runs and len(runs) == len(calls)
    assert best["lr"] == pytest.approx(expected_lr) and best["lr_edge"] == edge


def test_sweep_runs_the_best_lr_at_every_seed_and_reports_mean_and_spread() -> None:
    calls: list[tuple[float, int]] = []
    best, runs = bracket_lr("x", 1.0, [0.1, 1.0, 10.0], _quadratic_in_log_lr(1.0, calls), "loss", seed=5, seeds=3)
    assert calls == [(0.1, 5), (1.0, 5), (10.0, 5), (1.0, 6), (1.0, 7)]
    assert best["seed_losses"] == pytest.approx([0.05, 0.06, 0.07]) and best["seeds"] == 3
    assert best["loss"] == pytest.approx(0.06) and best["loss_std"] == pytest.approx(0.01)
    assert (best["loss_min"], best["loss_max"]) == pytest.approx((0.05, 0.07))
    assert [step for step, _ in best["val_curve"]] == [0, 10]  # the seeds' curves averaged
    assert [loss for _, loss in best["val_curve"]] == pytest.approx([11.0, 0.06])
    assert best["tokens_per_s"] == pytest.approx(106)
    assert best["lr_sweep"]["1"] == pytest.approx(0.05)  # the sweep itself is at the first seed


def test_run_store_keeps_finished_runs_and_keys_them_by_command(tmp_path) -> None:
    calls: list[tuple[float, int]] = []
    fake = _quadratic_in_log_lr(1.0, calls)

    def sweep(store: RunStore) -> dict:
        return bracket_lr("x", 1.0, [0.1, 1.0, 10.0],
                          lambda lr, seed: store.run({"lr": lr, "seed": seed}, lambda: fake(lr, seed)),
                          "loss", seeds=2)[0]

    first = sweep(RunStore(tmp_path, {"steps": 10}))
    assert len(calls) == 4 and len(list((tmp_path / "runs").glob("*.json"))) == 4
    assert not list(tmp_path.rglob("*.tmp"))  # written through a rename: whole or absent
    again = RunStore(tmp_path, {"steps": 10})
    assert sweep(again) == first and len(calls) == 4 and again.measured == 0  # nothing rerun
    next(iter(sorted((tmp_path / "runs").glob("*seed1*.json")))).unlink()  # as if interrupted there
    resumed = RunStore(tmp_path, {"steps": 10})
    assert sweep(resumed) == first and resumed.measured == 1 and calls[-1] == (1.0, 1)
    other = RunStore(tmp_path, {"steps": 20})  # another command: nothing is reused
    sweep(other)
    assert other.measured == 4


def test_train_every_optimizer_lowers_the_loss(tmp_path) -> None:
    path = tmp_path / "train.json"
    assert main(["train", "--device", "cpu", "--steps", "20", "--lr-factors", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["command"] == "train" and report["preset"] == "tiny" and len(report["corpus_sha256"]) == 64
    assert [row["optimizer"] for row in report["rows"]] == ["adamw", *DEFAULT_TRAIN]
    for row, run in zip(report["rows"], report["runs"]):
        assert {"lr", "val_loss", "tokens_per_s", "peak_mib", "state_mib", "vs_adamw_loss", "vs_adamw_state",
                "lr_sweep"} <= row.keys()
        curve = run["val_curve"]
        assert run["steps"] == 20 and len(run["train_loss"]) == 20 and curve[0][0] == 0 and curve[-1][0] == 20
        assert curve[-1][1] < curve[0][1] - 0.1, (row["optimizer"], curve)  # it learned something
        assert row["val_loss"] == curve[-1][1] and row["tokens_per_s"] > 0
    states = {row["optimizer"]: row["state_mib"] for row in report["rows"]}
    assert states["lion"] == pytest.approx(states["adamw"] / 2, rel=1e-3)
    assert states["galore_adamw"] < states["adamw"] and states["apollo_mini"] < states["apollo"]


def test_train_sweep_resumes_from_its_directory(tmp_path) -> None:
    out, path = tmp_path / "sweep", tmp_path / "train.json"
    argv = ["train", "--device", "cpu", "--steps", "2", "--optimizer", "lion", "--lr-factors", "1,3",
            "--max-lr-extensions", "1", "--seeds", "2", "--threads", "1", "--out", str(out), "--json", str(path)]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the command only
    first = json.loads(path.read_text())
    files = sorted((out / "runs").glob("*.json"))
    assert len(files) == len(first["runs"]) >= 2 * 3  # per optimizer: 2 lrs, ≤ 1 extension, 1 more seed
    for row in first["rows"]:
        assert row["seeds"] == 2 and len(row["seed_losses"]) == 2 and row["val_loss_std"] is not None
        assert len(row["lr_sweep"]) in (2, 3) and row["lr_edge"] in (None, "low", "high")
    table = json.loads((out / "report.json").read_text())
    assert table["partial"] is False and table["rows"] == first["rows"] and (out / "table.md").exists()
    written = {file: file.stat().st_mtime_ns for file in files[1:]}
    files[0].unlink()  # as if the sweep had been killed before that run finished
    assert main(argv) == 0
    resumed = json.loads(path.read_text())
    # Only the missing run was trained again (same batches and initialization: same loss).
    assert files[0].exists() and {file: file.stat().st_mtime_ns for file in files[1:]} == written
    assert [row["val_loss"] for row in resumed["rows"]] == pytest.approx([row["val_loss"] for row in first["rows"]])


def test_train_plot_is_written_when_matplotlib_is_present(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path, report = tmp_path / "curves.png", tmp_path / "train.json"
    assert main(["train", "--device", "cpu", "--steps", "3", "--lr-factors", "1", "--optimizer", "lion",
                 "--plot", str(path), "--json", str(report)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"  # from the JSON, as for results measured without matplotlib
    assert main(["plot", str(report), str(again)]) == 0 and again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zo_fine_tunes_from_a_cached_checkpoint(tmp_path, capsys) -> None:
    pytest.importorskip("bitsandbytes")
    path = tmp_path / "zo.json"
    argv = ["zo", "--device", "cpu", "--steps", "40", "--pretrain-steps", "60", "--lr-factors", "1",
            "--cache-dir", str(tmp_path / "cache"), "--lr", "mezo=3e-4", "--lr", "sparse_mezo=1e-3",
            "--lr", "qzo=3e-4", "--json", str(path)]
    assert main(argv) == 0
    report = json.loads(path.read_text())
    assert [row["method"] for row in report["rows"]] == ["mezo", "sparse_mezo", "qzo", "adamw"]
    for row in report["rows"]:
        assert {"initial_loss", "final_loss", "forward_passes", "peak_over_inference", "state_mib",
                "val_curve"} <= row.keys()
        assert row["final_loss"] < row["initial_loss"], row["method"]
        assert row["forward_passes"] == 40 * (1 if row["method"] == "adamw" else 2)
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["mezo"]["state_mib"] == 0 and rows["qzo"]["initial_loss"] != rows["mezo"]["initial_loss"]
    assert list((tmp_path / "cache").glob("zo-tiny-*-60-0.pt"))
    capsys.readouterr()
    assert main([*argv, "--optimizer", "mezo", "--steps", "2", "--seeds", "2"]) == 0
    assert "(cached)" in capsys.readouterr().out
    row = json.loads(path.read_text())["rows"][0]
    assert row["seeds"] == 2 and row["final_loss"] == pytest.approx(sum(row["seed_losses"]) / 2)
    assert row["seed_losses"][0] != row["seed_losses"][1]  # another seed: other directions and batches
    assert row["val_curve"][-1][1] == pytest.approx(row["final_loss"])  # the seeds' mean curve


def test_memory_analytic_state_equals_measured(tmp_path) -> None:
    path = tmp_path / "memory.json"
    assert main(["memory", "--device", "cpu", "--preset", "tiny", "--batch", "1", "--seq-len", "32",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["command"] == "memory" and report["rows"][0]["optimizer"] == "adamw"
    for row in report["rows"]:
        assert row["state_analytic_mib"] == row["state_mib"], row["optimizer"]
        assert row["allocated_mib"] == pytest.approx(row["params_mib"] + row["state_mib"])
        assert row["state_mib"] > 0
    rows = {row["optimizer"]: row for row in report["rows"]}
    assert rows["galore_adamw_8bit"]["state_mib"] < rows["galore_adamw"]["state_mib"]


def test_memory_layerwise_rows(tmp_path) -> None:
    path = tmp_path / "memory.json"
    assert main(["memory", "--device", "cpu", "--preset", "tiny", "--batch", "1", "--seq-len", "16",
                 "--optimizer", "lion", "--layerwise", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["optimizer"] for row in rows] == ["adamw", "adamw (layerwise)", "lion", "lion (layerwise)"]
    for row in rows:
        assert row["state_analytic_mib"] == row["state_mib"] > 0
    assert rows[1]["state_mib"] == rows[0]["state_mib"] and rows[3]["state_mib"] == rows[2]["state_mib"]


@pytest.mark.parametrize("preset,rank", [("tiny", 16), ("130m", 256)])
def test_train_runs_each_low_rank_method_at_the_rank_its_step_benchmark_uses(preset: str, rank: int) -> None:
    """train and step take the rank from the same record: the paper's for the width (GaLore's
    130M/350M rank 256 at width 768, where train ran a quarter of the width, 192), a quarter of
    the width where the paper trained none (tiny: 16)."""
    from memzoo.bench.presets import PRESETS
    from memzoo.bench.train import build_optimizer
    from memzoo.optim.registry import OPTIMIZERS

    hidden = PRESETS[preset].hidden
    model = Decoder(DecoderConfig(hidden=hidden, intermediate=16, layers=1, heads=hidden // 32, seq_len=8))
    named = [(name, torch.nn.Parameter(torch.empty(shape, device="meta"))) for name, shape in PRESETS[preset].shapes()]
    for name in ("galore_adamw", "natural_galore", "apollo", "fira", "galore_adafactor"):
        optimizer = build_optimizer(name, model, 1e-3, 100, "torch")
        assert [g["rank"] for g in optimizer.param_groups if g["rank"] is not None] == [rank], name
        assert OPTIMIZERS[name].bench_groups(named)[0]["rank"] == rank, name


def test_train_rejects_unknown_names(capsys) -> None:
    assert main(["train", "--device", "cpu", "--optimizer", "mezo"]) == 2
    assert "no training setting" in capsys.readouterr().err
    assert main(["zo", "--device", "cpu", "--optimizer", "lion"]) == 2
    assert "zo fine-tunes with" in capsys.readouterr().err
    assert main(["train", "--device", "cpu", "--lr", "lion"]) == 2
    for bad, message in ((["--seeds", "0"], "--seeds and --threads must be >= 1"),
                         (["--threads", "0"], "--seeds and --threads must be >= 1"),
                         (["--max-lr-extensions", "-1"], "--max-lr-extensions >= 0"),
                         (["--lr-factors", "1,-3"], "--lr-factors takes positive numbers")):
        assert main(["train", "--device", "cpu", *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
