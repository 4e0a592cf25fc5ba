"""``memzoo-bench``: kernel and optimizer-step microbenchmarks.

    memzoo-bench kernels [--preset P] [--dtype D] [--json PATH]
    memzoo-bench step --optimizer lion [--preset 350m] [--set KEY=VALUE] [--baseline NAME] [--json PATH]
    memzoo-bench step --optimizer mezo,sparse_mezo,qzo --baseline mezo_official
    memzoo-bench train [--preset tiny|small|60m|130m] [--optimizer lion,galore_adamw,...] [--plot PNG] [--json PATH]
    memzoo-bench zo [--preset tiny|small|60m|130m] [--optimizer mezo,sparse_mezo,qzo,adamw] [--plot PNG]
        train and zo: [--seeds N] [--out DIR] (resumable: a rerun skips the runs kept in DIR)
    memzoo-bench memory [--preset tiny..1b] [--optimizer ...] [--json PATH]
    memzoo-bench memory --fsdp 8,64 [--preset 350m..70b] [--dtype bf16] [--set KEY=VALUE]   (computed, not measured)

Every command prints a table and can write JSON. Defaults finish in about a minute on a CPU
(preset ``tiny``; ``step`` uses ``60m``, whose step times memory traffic as a real model's does,
where ``tiny`` times Python overhead); on CUDA the default preset is ``350m``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import gc
import json
import platform
import sys
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from memzoo.bench.baselines import BASELINES
from memzoo.bench.fsdp_memory import FSDP_METHODS
from memzoo.bench.memory import DEFAULT_MEMORY, run_memory
from memzoo.bench.presets import DTYPES, PRESETS, SHAPE_PRESETS, make_named_parameters
from memzoo.bench.timing import Contender, copy_bandwidth, median, optimizer_state_bytes, peak_extra_bytes, time_call, time_interleaved
from memzoo.bench.train import DEFAULT_TRAIN, DEFAULT_ZO, TRAIN_PRESETS, plot_report, run_train, run_zo
from memzoo.bench.zeroth_order import OfficialMeZO, prepare_zeroth_order
from memzoo.optim.base import BACKENDS
from memzoo.optim.factory import list_optimizers

__all__ = ["main"]

MIB = 2**20


def _environment(device: torch.device) -> dict[str, Any]:
    from memzoo.triton_kernels import triton_import_error

    triton_version = None
    if triton_import_error() is None:
        import triton

        triton_version = triton.__version__
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs_on(device: torch.device) -> str | None:
    """None when Triton kernels can be timed on ``device``, else the reason they are not."""
    from memzoo.triton_kernels import triton_import_error

    if device.type != "cuda":
        return "needs CUDA (the CPU interpreter is for testing, not timing)"
    error = triton_import_error()
    return None if error is None else f"triton does not import: {error}"


# ---- kernels ------------------------------------------------------------------------------

def run_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from memzoo.bench.kernel_cases import KERNELS, as_list, clone_case

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device, args.bandwidth_mib * MIB)
    named_shapes = PRESETS[args.preset].shapes()
    shapes = [shape for _, shape in named_shapes]
    # Projection kernels run on every matrix GaLore projects (attention and MLP), as in one step.
    projected = [shape for name, shape in named_shapes if ("attn" in name or "mlp" in name) and len(shape) == 2]
    generator = torch.Generator(device="cpu").manual_seed(0)
    triton_reason = _triton_runs_on(device)
    rows = []
    for name, pair in KERNELS.items():
        if args.kernel and name not in args.kernel:
            continue
        dtypes = {role: options[0] for role, options in pair.dtype_options.items()}
        dtypes["param"] = DTYPES[args.dtype]
        case = pair.make_case(projected if pair.shape_dims[0] >= 2 else shapes, dtypes, device, generator,
                              pair.bench_hparams)
        nbytes = pair.bytes_moved(case)
        candidates: list[tuple[str, Callable[..., None] | None, str | None]] = [("torch eager", pair.reference(), None)]
        if args.compile:
            candidates.append(("torch.compile", torch.compile(pair.reference()), None))
        candidates.append(("triton", None if triton_reason else pair.triton(), triton_reason))
        for backend, fn, reason in candidates:
            row: dict[str, Any] = {"kernel": name, "backend": backend, "dtype": args.dtype,
                                   "numel": sum(t.numel() for t in as_list(case.args[0])), "bytes": nbytes}
            if fn is None:
                rows.append({**row, "ms": None, "gb_s": None, "pct_of_floor": None, "note": reason})
                continue
            work = clone_case(case)
            first, times = time_call(functools.partial(fn, *work.args, **work.kwargs), device,
                                     warmup=args.warmup, iters=args.iters)
            seconds = median(times)
            rows.append({**row, "first_ms": first * 1e3, "ms": seconds * 1e3, "gb_s": nbytes / seconds / 1e9,
                         "pct_of_floor": 100 * (nbytes / bandwidth) / seconds, "note": ""})
            del work
    return {"command": "kernels", "preset": args.preset, "copy_bandwidth_gb_s": bandwidth / 1e9,
            **_environment(device), "rows": rows}


# ---- step ---------------------------------------------------------------------------------

def _make_adamw(named: list[tuple[str, torch.nn.Parameter]]) -> tuple[torch.optim.Optimizer, str]:
    params = [p for _, p in named]
    try:
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True), "fused"
    except (RuntimeError, ValueError):  # fused is not available for this device/dtype
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True), "foreach"


def _prepare_optimizer(label: str,
                       make: Callable[[list[tuple[str, torch.nn.Parameter]]], tuple[torch.optim.Optimizer, str]],
                       args: argparse.Namespace, device: torch.device) -> Contender:
    """A first-order contender on its own copy of the preset's parameters (same values and
    gradients for every contender)."""
    named = make_named_parameters(args.preset, DTYPES[args.dtype], device)
    params = [p for _, p in named]
    optimizer, backend = make(named)

    def finish(first: float, times: list[float]) -> dict[str, Any]:
        nonlocal optimizer, params, named
        refresh_ms = _refresh_step_ms(optimizer, device)
        if args.profile:
            _print_profile(label, optimizer.step, device)
            with _every_projector_refreshing(optimizer) as has_projectors:
                if has_projectors:
                    _print_profile(f"{label}, refresh step", optimizer.step, device)
        peak_extra_mib = peak_extra_bytes(optimizer.step, device) / MIB
        row = {"optimizer": label, "backend": backend, "dtype": args.dtype, "params": sum(p.numel() for p in params),
               "first_ms": first * 1e3, "ms": median(times) * 1e3, "min_ms": min(times) * 1e3,
               "refresh_ms": refresh_ms, "state_mib": optimizer_state_bytes(optimizer) / MIB,
               "peak_extra_mib": peak_extra_mib}
        optimizer = params = named = None  # freed before the next row is finished
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    return Contender(label, optimizer.step, finish)


def _print_profile(label: str, step: Callable[[], object], device: torch.device, rows: int = 15) -> None:
    """torch.profiler's table of one step: where the time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort_by.replace("cuda", "device"), row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # older torch names it cuda
        table = averages.table(sort_by=sort_by, row_limit=rows)
    print(f"--- profile of one step: {label} ---\n{table}", flush=True)


@contextlib.contextmanager
def _every_projector_refreshing(optimizer: torch.optim.Optimizer) -> Iterator[bool]:
    """Within: every projector refreshes on each step (update_proj_gap forced to 1; for
    pytorch-optimizer's SOAP, the eigenbasis refresh period). Yields whether the optimizer has
    projectors at all."""
    groups = [g for g in optimizer.param_groups
              if (g.get("rank") is not None or g.get("density") is not None) and "update_proj_gap" in g]
    # Each period as (the mapping that holds it, its key): our param groups; galore-torch and
    # apollo-torch copy the gap into a projector object in each parameter's state (its attribute
    # dictionary); pytorch-optimizer's SOAP keeps its eigenbasis QR period (precondition_frequency,
    # 10 by default) in each parameter's state.
    soap = [(state, "precondition_frequency") for state in optimizer.state.values()
            if "precondition_frequency" in state]
    periods = ([(group, "update_proj_gap") for group in groups]
               + [(vars(v), "update_proj_gap") for state in optimizer.state.values() for v in state.values()
                  if "update_proj_gap" in getattr(v, "__dict__", {})]
               + soap)
    saved = [holder[key] for holder, key in periods]
    for holder, key in periods:
        holder[key] = 1
    try:
        yield bool(groups) or bool(soap)
    finally:
        for (holder, key), period in zip(periods, saved):
            holder[key] = period


def _refresh_step_ms(optimizer: torch.optim.Optimizer, device: torch.device) -> float | None:
    """One steady-state step in which every projector refreshes, in ms; None for optimizers
    without projectors."""
    with _every_projector_refreshing(optimizer) as has_projectors:
        if not has_projectors:
            return None
        _, times = time_call(optimizer.step, device, warmup=0, iters=1)
    return times[0] * 1e3


def _parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--set momentum_dtype=bf16 --set rank=128``); values are Python
    literals where they parse as one, else strings."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            settings[key] = text
    return settings


def _resolve_step_names(names: Sequence[str]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, registry record, fixed keywords) for each ``--optimizer`` name: every
    :func:`~memzoo.optim.list_optimizers` name (``galore_adamw_8bit`` is GaLoreAdamW with
    ``optim_bits=8``); ``adamw`` is the reference row every table has."""
    from memzoo.optim.factory import FACTORY_NAMES, factory_class_and_settings

    resolved = []
    for name in names:
        key = name.lower()
        if key == "adamw":
            continue
        factory_class_and_settings(key)  # a ValueError listing the valid names for an unknown one
        entry = FACTORY_NAMES[key]
        # The record's own name keeps its sample keywords (APOLLO-Mini's scale among them); an
        # alias adds the keywords it fixes (galore_adamw_8bit: optim_bits=8).
        resolved.append((key, entry.info, {} if key == entry.info.name else dict(entry.fixed)))
    return resolved


def _preset_note(preset: str, device: torch.device) -> str | None:
    """What the preset measures on this device, for a reader of the table."""
    if device.type == "cpu" and preset == "tiny":
        return ("preset tiny (0.2M parameters) times Python and dispatch overhead, not memory traffic; "
                "--preset 60m (58M) is the CPU comparison in bench/RESULTS.md")
    return None


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    from memzoo.bench.baselines import make_baseline
    from memzoo.optim.base import backend_name, resolve_backend

    device = torch.device(args.device)
    settings = _parse_settings(args.set or [])
    contenders = [_prepare_optimizer("adamw (torch)", _make_adamw, args, device)]
    for label, info, fixed in _resolve_step_names(args.optimizer):
        label += "".join(f" {k}={v}" for k, v in settings.items())
        if info.zeroth_order:  # forward passes only: forward time and optimizer overhead apart
            def make_zo(tensors, info=info, fixed=fixed):
                optimizer = info.cls(tensors, **{**info.sample_kwargs, **fixed, **settings}, backend=args.backend)
                return optimizer, backend_name(resolve_backend(args.backend, device, info.cls.family))

            contenders.append(prepare_zeroth_order(label, make_zo, info.name == "qzo", args, device))
            continue

        def make(named, info=info, fixed=fixed):
            if info.bench_groups is None:
                optimizer = info.cls([p for _, p in named], **{**info.sample_kwargs, **fixed, **settings},
                                     backend=args.backend)
            else:  # the paper's setting on the preset (ranks, which matrices are projected)
                # The sample lr and decay (with GaLore-Adafactor's relative_step=False, which a given lr needs).
                hyper = {k: v for k, v in info.sample_kwargs.items() if k in ("lr", "weight_decay", "relative_step")}
                optimizer = info.cls(info.bench_groups(named), **{**hyper, **fixed, **settings}, backend=args.backend)
            return optimizer, backend_name(resolve_backend(args.backend, device, info.cls.family))

        contenders.append(_prepare_optimizer(label, make, args, device))
    missing = []
    for name in args.baseline or []:
        if name == "mezo_official":
            contenders.append(prepare_zeroth_order(name, lambda tensors: (OfficialMeZO(tensors), "baseline"), False,
                                                   args, device))
            continue
        try:
            contenders.append(_prepare_optimizer(
                name, lambda named, name=name: (make_baseline(name, named), "baseline"), args, device))
        except ValueError as exc:  # not installed: say so in the table, time the rest
            missing.append({"optimizer": name, "backend": "baseline", "dtype": args.dtype, "ms": None,
                            "state_mib": None, "note": str(exc)})
    rows = time_interleaved(contenders, device, warmup=args.warmup, iters=args.iters) + missing
    baseline = rows[0]
    for row in rows:
        if row["ms"] is not None:
            row["vs_adamw_time"] = row["ms"] / baseline["ms"]
        if row["state_mib"] is not None and baseline["state_mib"]:
            row["vs_adamw_state"] = row["state_mib"] / baseline["state_mib"]
    report = {"command": "step", "preset": args.preset, "preset_params": PRESETS[args.preset].numel(),
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "timing": f"interleaved rounds: {args.warmup} warm-up + {args.iters} timed; ms = median, min_ms = min",
              **_environment(device), "rows": rows}
    note = _preset_note(args.preset, device)
    if note:
        report["note"] = note
    return report


# ---- output -------------------------------------------------------------------------------

def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The rows as an aligned text table of ``columns``, leaving out the columns that no row has
    a value for (zeroth-order columns in a first-order comparison, refresh times without projectors)."""
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    cells = [list(columns)] + [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


COLUMNS = {
    "kernels": ["kernel", "backend", "dtype", "numel", "ms", "gb_s", "pct_of_floor", "note"],
    # first_ms: the first step (allocates state; low-rank methods also build their projectors);
    # ms: median steady step; refresh_ms: a steady step in which every projector is recomputed
    # (pytorch-optimizer SOAP: its eigenbasis QR, every precondition_frequency steps).
    # Zeroth-order rows: forward_ms (one closure), overhead_ms (step − 2q·forward), pass_ms (one
    # perturbation pass over all trainable tensors), peak_over_inference_mib (CUDA: the allocator; CPU: torch.profiler's allocation events).
    # val_loss / final_loss: the mean over the seeds at the best lr (_std: their sample standard
    # deviation); lr_edge: low/high when the best lr stayed at an edge of the (extended) sweep.
    "train": ["optimizer", "lr", "lr_edge", "seeds", "val_loss", "val_loss_std", "vs_adamw_loss", "tokens_per_s",
              "vs_adamw_speed", "peak_mib", "state_mib", "vs_adamw_state"],
    "zo": ["method", "lr", "lr_edge", "seeds", "initial_loss", "final_loss", "final_loss_std", "steps",
           "forward_passes", "steps_to_mezo_final",
           "fraction_of_mezo_steps", "seconds", "peak_mib", "peak_over_inference", "state_mib"],
    "plot": [],
    # memory --fsdp: rank 0's state (sharded like the weights, replicated), the bytes one rank sends
    # on a steady step, a refresh step and on average, FSDP2's gradient reduce-scatter, the ratio.
    "memory_fsdp": ["world", "optimizer", "status", "state_sharded_mib", "state_replicated_mib", "state_mib",
                    "vs_adamw_state", "steady_mib", "refresh_mib", "refresh_every", "amortized_mib",
                    "grad_reduce_scatter_mib", "vs_grad_traffic"],
    "memory": ["optimizer", "params_mib", "state_analytic_mib", "state_mib", "state_allocated_mib", "allocated_mib",
               "peak_step_mib", "vs_adamw_state", "vs_adamw_peak"],
    "step": ["optimizer", "backend", "dtype", "first_ms", "min_ms", "ms", "refresh_ms", "state_mib",
             "peak_extra_mib", "forward_ms", "overhead_ms", "pass_ms", "peak_over_inference_mib", "vs_adamw_time",
             "vs_adamw_state", "note"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=_default_device(), help="cuda or cpu (default: cuda when present)")
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="LLaMA-shaped parameter set (default: 350m on CUDA; on CPU 60m for step, tiny for kernels)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype")
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--iters", type=int, default=15, help="timed repetitions (the median is reported)")
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    kernels = sub.add_parser("kernels", help="each registered kernel: Triton vs reference time, GB/s, %% of floor")
    common(kernels)
    kernels.add_argument("--kernel", action="append", help="only this kernel (repeatable), e.g. lion.lion_update_")
    kernels.add_argument("--no-compile", dest="compile", action="store_false",
                         help="skip the torch.compile(reference) row")
    kernels.add_argument("--bandwidth-mib", type=int, default=None,
                         help="size of the copy that measures bandwidth (default 1024 on CUDA, 256 on CPU)")
    kernels.set_defaults(run=run_kernels)

    step = sub.add_parser("step", help="optimizer step time and state memory against torch AdamW")
    common(step)
    step.add_argument("--optimizer", action="append",
                      help="optimizer names (repeatable, comma-separated; default lion): " + ", ".join(list_optimizers()))
    step.add_argument("--backend", choices=BACKENDS, default="auto")
    step.add_argument("--profile", action="store_true",
                      help="print torch.profiler's top kernels for one steady step of each optimizer")
    step.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="extra keyword for our optimizers (repeatable), e.g. momentum_dtype=bf16")
    step.add_argument("--baseline", action="append", metavar="NAME",
                      help="also time another library's optimizer (repeatable, comma-separated): "
                           + ", ".join([*BASELINES, "mezo_official"]))
    step.set_defaults(run=run_step)

    def training(p: argparse.ArgumentParser, defaults: Sequence[str]) -> None:
        p.add_argument("--device", default=_default_device(), help="cuda or cpu (default: cuda when present)")
        p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=None,
                       help="model and schedule (default: 60m on CUDA, tiny on CPU)")
        p.add_argument("--optimizer", action="append",
                       help=f"create_optimizer name (repeatable, comma-separated; default {','.join(defaults)})")
        p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
        p.add_argument("--lr", action="append", metavar="NAME=LR", help="an optimizer's (centre) learning rate")
        p.add_argument("--lr-factors", default="0.3,1,3",
                       help="the sweep: multiples of each optimizer's centre lr (the best final loss is reported)")
        p.add_argument("--backend", choices=BACKENDS, default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--seeds", type=int, default=None,
                       help="runs at the best lr (seeds SEED, SEED+1, …; mean and spread reported; "
                            "default: the preset's, 2 for small)")
        p.add_argument("--max-lr-extensions", type=int, default=2,
                       help="while the best lr is at an edge of the sweep, try one more beyond it, at most this often")
        p.add_argument("--out", metavar="DIR",
                       help="keep every finished run in DIR/runs (a rerun of the same command skips them: an "
                            "interrupted sweep continues) and the table so far in DIR/report.json and DIR/table.md")
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
        p.add_argument("--plot", metavar="PNG", help="loss curves to this PNG (needs matplotlib)")
        p.add_argument("--json", metavar="PATH", help="also write the results (with every curve) as JSON")
        p.set_defaults(default_optimizers=list(defaults))

    train = sub.add_parser("train", help="train the byte-level decoder on the stdlib corpus: loss, tokens/s, memory")
    training(train, DEFAULT_TRAIN)
    train.set_defaults(run=run_train)

    zo = sub.add_parser("zo", help="zeroth-order fine-tuning of a cached AdamW-pretrained checkpoint")
    training(zo, DEFAULT_ZO)
    zo.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "memzoo-bench"),
                    help="where the pretrained checkpoint is kept")
    zo.add_argument("--pretrain-steps", type=int, default=None, help="AdamW steps of the checkpoint (default: the preset's)")
    zo.set_defaults(run=run_zo)

    plot = sub.add_parser("plot", help="the PNG of a train or zo JSON (e.g. measured where matplotlib is absent)")
    plot.add_argument("report", help="JSON written by memzoo-bench train/zo --json")
    plot.add_argument("png", help="output PNG")
    plot.set_defaults(run=run_plot)

    memory = sub.add_parser("memory", help="optimizer state (analytic and measured) and full-step peak vs AdamW")
    memory.add_argument("--device", default=_default_device())
    memory.add_argument("--preset", choices=sorted(SHAPE_PRESETS), default=None,
                        help="LLaMA shape (default: 350m on CUDA, tiny on CPU; 7b and 70b only with --fsdp)")
    memory.add_argument("--optimizer", action="append", help=f"default {','.join(DEFAULT_MEMORY)}")
    memory.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype")
    memory.add_argument("--batch", type=int, default=4)
    memory.add_argument("--seq-len", type=int, default=256)
    memory.add_argument("--backend", choices=BACKENDS, default="auto")
    memory.add_argument("--seed", type=int, default=0)
    memory.add_argument("--layerwise", action="store_true",
                        help="also measure each optimizer as a LayerwiseOptimizer (create_optimizer(..., layerwise=True))")
    memory.add_argument("--fsdp", metavar="N[,N...]",
                        help="instead of measuring: compute from formulas each optimizer's state per rank and the "
                             "bytes its step communicates on FSDP2 row shards over N ranks (memzoo.bench.fsdp_memory)")
    memory.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="with --fsdp: a setting of the projected groups (repeatable), e.g. rank=512")
    memory.add_argument("--json", metavar="PATH")
    memory.set_defaults(run=run_memory, default_optimizers=list(DEFAULT_MEMORY))
    return parser


def run_plot(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.report) as handle:
        report = json.load(handle)
    written = plot_report(report, args.png)
    if written is None:
        raise ValueError("matplotlib is not installed (pip install 'memzoo[bench]')")
    return {"command": "plot", "png": written, "rows": []}


def _parse_lrs(items: Sequence[str] | None) -> dict[str, float]:
    lrs = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            lrs[name.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"--lr takes NAME=LR, got {item!r}") from None
    return lrs


def _parse_worlds(text: str) -> list[int]:
    try:
        worlds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise ValueError(f"--fsdp takes world sizes >= 1 (comma-separated), got {text!r}")
    return worlds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    is_cuda = torch.device(getattr(args, "device", "cpu")).type == "cuda"
    if getattr(args, "preset", "") is None:
        computed = args.command == "memory" and args.fsdp is not None  # nothing allocated: any device
        if is_cuda or computed:
            args.preset = "60m" if args.command in ("train", "zo") else "350m"
        else:  # a CPU step at 60m times memory traffic, as a user's model would; tiny times Python overhead
            args.preset = "60m" if args.command == "step" else "tiny"
    if args.command == "kernels" and args.bandwidth_mib is None:
        args.bandwidth_mib = 1024 if is_cuda else 256
    if args.command == "step":
        args.optimizer = [n for item in (args.optimizer or ["lion"]) for n in item.split(",") if n]
        args.baseline = [n for item in (args.baseline or []) for n in item.split(",") if n]
    try:
        if args.command == "memory" and args.fsdp is not None:
            args.worlds = _parse_worlds(args.fsdp)
            args.settings = _parse_settings(args.set or [])
            args.default_optimizers = list(FSDP_METHODS)
        elif args.command == "memory" and (args.preset not in PRESETS or args.set):
            raise ValueError(f"--preset {args.preset} (shapes only) and --set need --fsdp N: they are computed, "
                             "not measured")
        if args.command in ("train", "zo", "memory"):
            args.optimizer = [n.lower() for item in (args.optimizer or args.default_optimizers)
                              for n in item.split(",") if n]
        if args.command in ("train", "zo"):
            args.lr = _parse_lrs(args.lr)
            args.lr_factors = [float(f) for f in args.lr_factors.split(",") if f]
            if not args.lr_factors or min(args.lr_factors) <= 0:
                raise ValueError(f"--lr-factors takes positive numbers, got {args.lr_factors}")
            if (args.seeds is not None and args.seeds < 1) or args.max_lr_extensions < 0 or \
                    (args.threads is not None and args.threads < 1):
                raise ValueError(f"--seeds and --threads must be >= 1 and --max-lr-extensions >= 0, got "
                                 f"{args.seeds}, {args.threads} and {args.max_lr_extensions}")
        report = args.run(args)
    except (ValueError, TypeError) as exc:  # bad names, settings or combinations
        print(f"memzoo-bench: {exc}", file=sys.stderr)
        return 2
    prose = ("timing", "note")  # sentences: a line each
    header = {k: v for k, v in report.items() if not isinstance(v, (list, dict)) and k not in prose}
    print(" ".join(f"{k}={_format(v)}" for k, v in header.items()))
    for key in prose:
        if report.get(key):
            print(f"{key}: {report[key]}")
    if report["rows"]:
        print(format_table(report["rows"], COLUMNS[report.get("table", report["command"])]))
    if getattr(args, "json", None):
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0
