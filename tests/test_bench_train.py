"""memzoo-bench train / zo / memory on their tiny presets (few steps): the model, the corpus rule,
the documented JSON, and real properties (every optimizer lowers the loss; analytic state bytes
equal the measured ones)."""

from __future__ import annotations

import json

import pytest
import torch

from memzoo.bench.cli import main
from memzoo.bench.corpus import load_corpus, split_of, stdlib_files
from memzoo.bench.model import Decoder, DecoderConfig
from memzoo.bench.train import DEFAULT_TRAIN, lr_lambda, steps_to_reach, sweep_lrs

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
    best, runs = sweep_lrs("x", 1.0, [0.5, 1.0, 2.0], lambda lr: {"lr": lr, "loss": (lr - 1.1) ** 2}, "loss")
    assert best["lr"] == 1.0 and len(runs) == 3 and set(best["lr_sweep"]) == {"0.5", "1", "2"}
    assert steps_to_reach([(0, 3.0), (10, 2.5), (20, 2.0)], 2.4) == 20
    assert steps_to_reach([(0, 3.0)], 2.0) is None


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
    assert main([*argv[:-2], "--optimizer", "mezo", "--steps", "1"]) == 0
    assert "(cached)" in capsys.readouterr().out


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


def test_train_rejects_unknown_names(capsys) -> None:
    assert main(["train", "--device", "cpu", "--optimizer", "mezo"]) == 2
    assert "no training setting" in capsys.readouterr().err
    assert main(["zo", "--device", "cpu", "--optimizer", "lion"]) == 2
    assert "zo fine-tunes with" in capsys.readouterr().err
    assert main(["train", "--device", "cpu", "--lr", "lion"]) == 2
