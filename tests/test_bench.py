"""memzoo-bench runs end to end on tiny settings and writes the documented JSON."""

from __future__ import annotations

import json

import pytest
import torch

from memzoo.bench.cli import main
from memzoo.bench.presets import PRESETS
from memzoo.optim.factory import FACTORY_NAMES
from memzoo.bench.kernel_cases import KERNELS


def test_presets_match_the_llama_shapes() -> None:
    # The 350m set of the published comparisons: 368M parameters in 168 matrices, 49 vectors, 2 embeddings.
    shapes = [shape for _, shape in PRESETS["350m"].shapes()]
    assert PRESETS["350m"].numel() == 367_969_280
    assert sum(len(s) == 1 for s in shapes) == 49
    assert sum(len(s) == 2 and 32000 not in s for s in shapes) == 168


def test_step_reports_lion_against_adamw(tmp_path, capsys) -> None:
    path = tmp_path / "step.json"
    assert main(["step", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "2",
                 "--optimizer", "lion", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["command"] == "step" and report["preset"] == "tiny" and report["torch"]
    adamw, lion = report["rows"]
    assert adamw["optimizer"] == "adamw (torch)" and lion["optimizer"] == "lion"
    for row in report["rows"]:
        assert {"first_ms", "ms", "min_ms", "refresh_ms", "state_mib", "peak_extra_mib", "vs_adamw_time", "vs_adamw_state",
                "backend", "params"} <= row.keys()
        assert row["ms"] > 0 and row["params"] == PRESETS["tiny"].numel()
    # Lion holds one fp32 momentum per parameter.
    assert lion["state_mib"] * 2**20 == PRESETS["tiny"].numel() * 4
    # The CPU peak is measured (torch.profiler's allocation events), not left empty: Lion's chunked
    # pass holds at most its scratch buffers (5 chunks of 2^17 float32) beyond its state.
    assert 0 <= lion["peak_extra_mib"] <= 5 * 2**17 * 4 / 2**20 + 0.01
    assert "lion" in capsys.readouterr().out


def test_peak_extra_bytes_on_the_cpu_follows_allocations_and_frees() -> None:
    """Hand-derived: b (4 MB) and c (4 MB) live together, b is freed before d (4 MB): the peak is
    8 MB, not 12 MB (frees counted) and not 4 MB (both live at once); in-place work allocates (almost) nothing."""
    from memzoo.bench.timing import peak_extra_bytes

    a = torch.ones(1000, 1000)

    def temporaries() -> None:
        b = a * 2
        c = b + 1
        del b
        d = c * 3  # noqa: F841

    peak = peak_extra_bytes(temporaries, torch.device("cpu"))
    assert 8_000_000 <= peak < 8_000_000 + 4096
    assert peak_extra_bytes(lambda: a.mul_(1.5), torch.device("cpu")) < 64  # the wrapped scalar only


def test_step_interleaves_says_what_it_measures_and_shows_only_applicable_columns(capsys) -> None:
    """Every list_optimizers() name is accepted (galore_adamw_8bit was refused); the contenders are
    timed round by round; the table has no zeroth-order or refresh columns for Lion alone."""
    assert main(["step", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "2",
                 "--optimizer", "lion,galore_adamw_8bit"]) == 0
    out = capsys.readouterr().out
    assert "timing: interleaved rounds" in out and "note: preset tiny" in out
    assert "galore_adamw_8bit" in out and "min_ms" in out
    capsys.readouterr()
    assert main(["step", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "1"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("optimizer"))
    assert "forward_ms" not in header and "refresh_ms" not in header and "ms" in header.split()


def test_step_help_lists_every_optimizer_name(capsys) -> None:
    from memzoo.optim import list_optimizers

    with pytest.raises(SystemExit):
        main(["step", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in list_optimizers())


def test_time_interleaved_alternates_the_contenders() -> None:
    from memzoo.bench.timing import Contender, time_interleaved

    calls = []
    contenders = [Contender(name, lambda name=name: calls.append(name), lambda first, times: {"n": len(times)})
                  for name in "ab"]
    rows = time_interleaved(contenders, torch.device("cpu"), warmup=1, iters=2)
    assert calls == ["a", "b"] * 4 and rows == [{"n": 2}, {"n": 2}]


def test_step_runs_galore_with_paper_groups(tmp_path) -> None:
    path = tmp_path / "step.json"
    assert main(["step", "--device", "cpu", "--preset", "60m", "--warmup", "0", "--iters", "1",
                 "--optimizer", "galore_adamw", "--json", str(path)]) == 0
    adamw, galore = json.loads(path.read_text())["rows"]
    # 60m at the paper's rank 128: the 56 attention/MLP matrices hold (2r/min + r/max)·mn state
    # elements instead of 2·mn; embeddings, head and norms keep full AdamW state.
    shapes = [shape for name, shape in PRESETS["60m"].shapes() if "attn" in name or "mlp" in name]
    projected = sum(2 * max(s) * 128 + 128 * min(s) for s in shapes)
    full = sum(torch.Size(s).numel() for _, s in PRESETS["60m"].shapes()) - sum(torch.Size(s).numel() for s in shapes)
    expected_bytes = 4 * (projected + 2 * full) + 8 * len(PRESETS["60m"].shapes()) + 8 * len(shapes)
    assert galore["optimizer"] == "galore_adamw"
    assert galore["refresh_ms"] > 0 and adamw["refresh_ms"] is None
    assert galore["state_mib"] * 2**20 == pytest.approx(expected_bytes, rel=1e-12)
    assert galore["state_mib"] < 0.85 * adamw["state_mib"]


class _PeriodInState(torch.optim.Optimizer):
    """Keeps a refresh period in each parameter's state, as pytorch-optimizer's SOAP does, and
    counts the steps that refresh (step % period == 0)."""

    def __init__(self, params) -> None:
        super().__init__(params, {})
        self.refreshes = 0

    def step(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state.setdefault("precondition_frequency", 10)
                state["count"] = state.get("count", 0) + 1
                self.refreshes += state["count"] % state["precondition_frequency"] == 0


def test_refresh_step_forces_the_period_kept_in_state_and_restores_it() -> None:
    from memzoo.bench.cli import _refresh_step_ms

    optimizer = _PeriodInState([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))])
    optimizer.step()  # state exists, count 1: no refresh at period 10
    assert optimizer.refreshes == 0
    assert _refresh_step_ms(optimizer, torch.device("cpu")) > 0
    # _refresh_step_ms runs an untimed step, then the timed one: both refresh both parameters.
    assert optimizer.refreshes == 4
    assert all(state["precondition_frequency"] == 10 for state in optimizer.state.values())
    assert _refresh_step_ms(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), torch.device("cpu")) is None


def test_refresh_step_of_pytorch_optimizer_soap_runs_its_eigenbasis_qr(monkeypatch) -> None:
    soap = pytest.importorskip("pytorch_optimizer").SOAP
    from memzoo.bench.cli import _refresh_step_ms

    params = [torch.nn.Parameter(torch.randn(6, 4))]
    optimizer = soap(params, lr=1e-3)
    params[0].grad = torch.randn(6, 4)
    optimizer.step()
    calls = []
    original = type(optimizer).get_orthogonal_matrix_qr
    monkeypatch.setattr(type(optimizer), "get_orthogonal_matrix_qr",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    optimizer.step()
    assert not calls  # step 2 of a 10-step period: no refresh
    assert _refresh_step_ms(optimizer, torch.device("cpu")) > 0
    assert calls == [1, 1]  # the untimed step and the timed one
    assert optimizer.state[params[0]]["precondition_frequency"] == 10


def test_step_runs_the_triton_backend(tmp_path) -> None:
    path = tmp_path / "step.json"
    assert main(["step", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "1",
                 "--backend", "triton", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["rows"][1]["backend"] == "triton"


def test_step_reports_zeroth_order_forward_and_overhead_apart(tmp_path) -> None:
    path = tmp_path / "step.json"
    assert main(["step", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "2",
                 "--optimizer", "mezo,sparse_mezo,qzo", "--baseline", "mezo_official", "--json", str(path)]) == 0
    rows = {row["optimizer"]: row for row in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"adamw (torch)", "mezo", "sparse_mezo", "qzo", "mezo_official"}
    numel = PRESETS["tiny"].numel()
    for name in ("mezo", "sparse_mezo", "qzo", "mezo_official"):
        row = rows[name]
        assert row["forward_ms"] > 0 and row["pass_ms"] > 0 and row["ms"] > 0
        assert row["overhead_ms"] == pytest.approx(row["ms"] - 2 * row["forward_ms"])
        assert row["peak_over_inference_mib"] >= 0  # measured on the CPU too (torch.profiler's events)
    # The official-style step draws each tensor's z whole (torch.normal): its peak holds at least
    # the largest tensor's z.
    largest = max(torch.Size(shape).numel() for _, shape in PRESETS["tiny"].shapes())
    assert rows["mezo_official"]["peak_over_inference_mib"] * 2**20 >= 4 * largest
    assert rows["mezo"]["params"] == numel and rows["mezo"]["state_mib"] == 0
    # Sparse-MeZO: one threshold per tensor and one mask bit per element (chunks of 1024).
    chunks = sum(-(-torch.Size(shape).numel() // 1024) for _, shape in PRESETS["tiny"].shapes())
    assert rows["sparse_mezo"]["state_mib"] * 2**20 == 4 * len(PRESETS["tiny"].shapes()) + 128 * chunks
    # QZO trains the NF4 absmax scales of the attention/MLP matrices: one per 64 weights.
    matrices = [shape for name, shape in PRESETS["tiny"].shapes() if "attn" in name or "mlp" in name]
    assert rows["qzo"]["params"] == sum(torch.Size(s).numel() for s in matrices) // 64


def test_kernels_reports_every_registered_kernel(tmp_path) -> None:
    path = tmp_path / "kernels.json"
    assert main(["kernels", "--device", "cpu", "--preset", "tiny", "--warmup", "0", "--iters", "2",
                 "--no-compile", "--bandwidth-mib", "16", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["copy_bandwidth_gb_s"] > 0
    assert {row["kernel"] for row in report["rows"]} == set(KERNELS)
    eager = [row for row in report["rows"] if row["backend"] == "torch eager"]
    assert eager and all(row["ms"] > 0 and row["gb_s"] > 0 and row["pct_of_floor"] > 0 for row in eager)
    triton_rows = [row for row in report["rows"] if row["backend"] == "triton"]
    assert triton_rows and all(row["ms"] is None and "CUDA" in row["note"] for row in triton_rows)


def test_unknown_optimizer_lists_valid_names(capsys) -> None:
    """memzoo-bench step takes every create_optimizer name, and an unknown one lists them."""
    assert main(["step", "--device", "cpu", "--optimizer", "adamz", "--iters", "1"]) == 2
    assert f"valid names: {', '.join(FACTORY_NAMES)}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["kernels", "--help"], ["step", "--help"]])
def test_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "memzoo-bench" in capsys.readouterr().out
