"""``memzoo-bench train`` and ``memzoo-bench zo``: real training runs on the standard-library corpus.

train: every chosen optimizer and AdamW train the same LLaMA-style byte-level decoder from the
same initialization on the same batches for the same number of steps, each at its base lr ×
``--lr-factors``, extended past an edge of that grid while the best lr sits there (``bracket_lr``); the best lr is rerun at
``--seeds`` seeds and the mean final validation loss (with its spread) is reported with tokens/s,
peak memory and optimizer-state MiB; the loss curves go to JSON (and a PNG with matplotlib).
With ``--out DIR`` every finished run is kept on disk and a rerun skips it (``RunStore``).

zo: a checkpoint pretrained with AdamW on the "pretrain" files (cached), fine-tuned on the
"finetune" files with MeZO, Sparse-MeZO, QZO (after NF4 quantization with bitsandbytes) and a
first-order baseline, evaluated on the "heldout" files: loss against steps and forward passes,
peak memory against inference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memzoo.bench.corpus import Corpus, load_corpus, sample_windows
from memzoo.bench.model import Decoder, DecoderConfig
from memzoo.bench.timing import optimizer_state_bytes
from memzoo.optim.registry import Setting, ZOSetting, factory_names

__all__ = ["DEFAULT_TRAIN", "DEFAULT_ZO", "TRAIN_PRESETS", "TRAIN_SETTINGS", "ZO_SETTINGS", "RunStore", "Setting",
           "ZOSetting", "TrainPreset", "bracket_lr", "run_train", "run_zo"]

MIB = 2**20


@dataclass(frozen=True)
class TrainPreset:
    model: DecoderConfig
    batch: int
    steps: int
    eval_interval: int
    eval_batches: int
    pretrain_steps: int  # zo: AdamW steps of the cached checkpoint
    zo_steps: int  # zo: fine-tuning steps of each method
    # zo: the zeroth-order lrs (their records' ZOSetting, set on tiny) times this; a stable ZO step shrinks
    # as the model grows (the estimate's variance grows with the dimension).
    zo_lr_multiplier: float = 1.0
    # Projector refresh gap of the low-rank methods (None: steps/10 between 10 and 200).
    update_proj_gap: int | None = None
    seeds: int = 1  # runs at the best lr, each with its own initialization and batch order


TRAIN_PRESETS: dict[str, TrainPreset] = {
    # About 1.5 minutes on a 2-core CPU for AdamW and the 7 first-order optimizers at 3 lrs each.
    "tiny": TrainPreset(DecoderConfig(hidden=64, intermediate=172, layers=2, heads=4, seq_len=64),
                        batch=16, steps=64, eval_interval=16, eval_batches=4, pretrain_steps=400, zo_steps=400),
    # The tiny model trained long enough for the methods to separate on a 2-core CPU: 1200 steps
    # with the papers' refresh gap 200 (6 subspaces per run), about 1–2 minutes a run with one
    # thread; the whole table (8 optimizers, lr sweep bracketed, 2 seeds) in about an hour.
    "small": TrainPreset(DecoderConfig(hidden=64, intermediate=172, layers=2, heads=4, seq_len=64),
                         batch=16, steps=1200, eval_interval=100, eval_batches=8, pretrain_steps=1200,
                         zo_steps=1000, update_proj_gap=200, seeds=2),
    # GaLore's LLaMA-60M shape (byte-level vocabulary: the blocks are the same, the embeddings small).
    "60m": TrainPreset(DecoderConfig(hidden=512, intermediate=1376, layers=8, heads=8, seq_len=256),
                       batch=32, steps=600, eval_interval=50, eval_batches=8, pretrain_steps=1500, zo_steps=1000,
                       zo_lr_multiplier=0.1),
    "130m": TrainPreset(DecoderConfig(hidden=768, intermediate=2048, layers=12, heads=12, seq_len=256),
                        batch=32, steps=600, eval_interval=50, eval_batches=8, pretrain_steps=1500, zo_steps=1000,
                        zo_lr_multiplier=0.1),
}


# Each create_optimizer name's training setting and default membership, from its registry record
# (memzoo.optim.registry); AdamW, the baseline of every table, first.
TRAIN_SETTINGS: dict[str, Setting] = {name.name: name.train for name, _ in factory_names() if name.train is not None}
DEFAULT_TRAIN = tuple(name.name for name, info in factory_names() if info is not None and name.runs_by_default("train"))


def _device_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights), plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: DecoderConfig, device: torch.device, seed: int) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(config).to(device)


def build_optimizer(name: str, model: Decoder, lr: float, steps: int, backend: str,
                    extra: dict[str, Any] | None = None, update_proj_gap: int | None = None) -> torch.optim.Optimizer:
    """``name`` through ``memzoo.create_optimizer`` with its training setting (weight decay 0 for
    all, the paper's rank for the model's width where the setting asks, projector refresh every
    ``update_proj_gap`` steps; by default steps/10, between 10 and 200 as GaLore's 200 of 10k
    steps)."""
    from memzoo.optim import create_optimizer
    from memzoo.optim.factory import FACTORY_NAMES

    if name not in TRAIN_SETTINGS:
        raise ValueError(f"no training setting for {name!r}; valid: {', '.join(TRAIN_SETTINGS)}")
    setting = TRAIN_SETTINGS[name]
    kwargs: dict[str, Any] = {"weight_decay": 0.0, **setting.kwargs}
    if setting.rank_by_width:
        kwargs["rank"] = FACTORY_NAMES[name].info.rank_for_width(model.config.hidden)
    if setting.refreshes:
        kwargs["update_proj_gap"] = update_proj_gap or max(10, min(200, steps // 10))
    if name != "adamw":
        kwargs["backend"] = backend
    return create_optimizer(model, name, lr=lr, **{**kwargs, **(extra or {})})


def lr_lambda(steps: int) -> Callable[[int], float]:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(model: Decoder, windows: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean loss over the fixed validation windows."""
    total = 0.0
    chunks = windows.split(batch)
    with _autocast(device):
        for chunk in chunks:
            total += float(model.loss(chunk.to(device)))
    return total / len(chunks)


def _validation_windows(corpus: Corpus, preset: TrainPreset, seed: int) -> torch.Tensor:
    """The fixed held-out windows every run of a command is evaluated on."""
    return sample_windows(corpus.splits["heldout"], preset.eval_batches * preset.batch, preset.model.seq_len + 1,
                          torch.Generator().manual_seed(seed + 2))


def _train_step(model: Decoder, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One first-order step (clipped at norm 1, then the schedule); returns the loss, unsynced."""
    with _autocast(device):
        loss = model.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss


def _batches(tokens: torch.Tensor, preset: TrainPreset, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The training batches, the same sequence for every run with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield sample_windows(tokens, preset.batch, preset.model.seq_len + 1, generator)


def train_run(name: str, lr: float, preset: TrainPreset, corpus: Corpus, validation: torch.Tensor, *,
              steps: int, device: torch.device, backend: str, seed: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run; returns its curves and measurements."""
    model = build_model(preset.model, device, seed)
    optimizer = build_optimizer(name, model, lr, steps, backend, extra, preset.update_proj_gap)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps))
    _reset_peak(device)
    train_losses: list[float] = []
    curve = [(0, evaluate(model, validation, preset.batch, device))]
    # Timed: every step but the first (it allocates state and builds projectors), without the
    # evaluations, and without a host sync per step (losses are read at each evaluation).
    train_seconds, timed_tokens, start, pending = 0.0, 0, None, []
    for step, batch in enumerate(_batches(corpus.tokens("pretrain", "finetune"), preset, steps, seed + 1), 1):
        if step == 2:
            _sync(device)
            start = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        pending.append(_train_step(model, optimizer, schedule, batch, device).detach())
        if step > 1:
            timed_tokens += batch.shape[0] * (batch.shape[1] - 1)
        if step % preset.eval_interval == 0 or step == steps:
            _sync(device)
            if start is not None:
                train_seconds += time.perf_counter() - start
            values = torch.stack(pending).float().tolist()
            train_losses += values
            pending = []
            if not all(math.isfinite(value) for value in values):
                break  # diverged at this lr: the sweep moves on
            curve.append((step, evaluate(model, validation, preset.batch, device)))
            _sync(device)
            start = time.perf_counter() if step > 1 else None
    finished = len(train_losses) == steps and curve[-1][0] == steps
    final = curve[-1][1] if finished else math.inf
    return {
        "optimizer": name, "lr": lr, "val_loss": final, "steps": len(train_losses),
        "tokens_per_s": timed_tokens / train_seconds if train_seconds else None,
        "peak_mib": _device_peak(device), "state_mib": optimizer_state_bytes(optimizer) / MIB,
        "train_loss": train_losses, "val_curve": curve,
    }


def _environment_args(args: argparse.Namespace) -> tuple[TrainPreset, torch.device, Corpus]:
    preset = TRAIN_PRESETS[args.preset]
    corpus = load_corpus()
    print(f"corpus: {corpus.source} sha256={corpus.sha256} files={corpus.files} "
          f"bytes={ {k: v.numel() for k, v in corpus.splits.items()} }", flush=True)
    return preset, torch.device(args.device), corpus


class RunStore:
    """Finished runs on disk, one JSON file per run, so that an interrupted sweep continues where
    it stopped: ``run(key, measure)`` returns the stored result of ``key`` when there is one and
    otherwise measures it and writes it (atomically: a file is whole or absent). ``directory``
    None keeps nothing. ``context`` is everything the runs of a command share (preset, steps,
    corpus, …); it is part of every run's identity, so a changed command never reuses a run."""

    def __init__(self, directory: str | Path | None, context: dict[str, Any]) -> None:
        self.directory = None if directory is None else Path(directory)
        self.context = context
        self.measured = 0  # runs measured (not read back) by this store

    def path(self, key: dict[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        identity = json.dumps({**self.context, **key}, sort_keys=True, default=str)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        label = "-".join(f"{name}{value:.4g}" if isinstance(value, float) else f"{name}{value}"
                         for name, value in key.items())
        return self.directory / "runs" / f"{label}-{digest}.json"

    def run(self, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.path(key)
        if path is not None and path.exists():
            return json.loads(path.read_text())["result"]
        result = measure()
        self.measured += 1
        if path is not None:
            write_json_atomic(path, {"key": key, "context": self.context, "result": result,
                                     "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return result


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)


def _mean_curve(runs: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """The seeds' validation curves averaged point by point (over the steps all of them reached)."""
    length = min(len(run["val_curve"]) for run in runs)
    return [(runs[0]["val_curve"][i][0], statistics.fmean(run["val_curve"][i][1] for run in runs))
            for i in range(length)]


def bracket_lr(name: str, centre: float, factors: Sequence[float], run: Callable[[float, int], dict[str, Any]],
               loss_key: str, *, seed: int = 0, seeds: int = 1, max_extensions: int = 2) -> tuple[dict[str, Any],
                                                                                               list[dict[str, Any]]]:
    """The lr sweep of one optimizer; returns (its row, every run).

    ``run(lr, seed)`` at centre × each factor (seed ``seed``); while the lowest final loss sits
    at an edge of the lrs tried, one more lr beyond that edge (the grid's spacing there), at most
    ``max_extensions`` times; ``lr_edge`` is "low"/"high" when the best stayed at an edge (the
    optimum is not bracketed), else None. The best lr is then run at ``seeds`` seeds in all
    (``seed``, ``seed + 1``, …): the row's ``loss_key`` is their mean, with ``…_std`` (sample
    standard deviation), ``…_min``/``…_max``, the per-seed values and the mean curve.
    """
    if seeds < 1 or max_extensions < 0:
        raise ValueError(f"seeds must be >= 1 and max_extensions >= 0, got {seeds} and {max_extensions}")
    runs: list[dict[str, Any]] = []
    by_lr: dict[float, dict[str, Any]] = {}

    def measure(lr: float, run_seed: int) -> dict[str, Any]:
        result = run(lr, run_seed)
        print(f"  {name} lr={lr:.3g} seed={run_seed} {loss_key}={result[loss_key]:.4f}", flush=True)
        runs.append(result)
        return result

    for factor in sorted(set(factors)):
        by_lr[centre * factor] = measure(centre * factor, seed)
    edge = None
    for extension in range(max_extensions + 1):
        lrs = sorted(by_lr)
        if len(lrs) < 2:
            break  # a single lr: no bracket was asked for
        best_lr = min(lrs, key=lambda lr: (by_lr[lr][loss_key], lr))
        edge = "low" if best_lr == lrs[0] else "high" if best_lr == lrs[-1] else None
        if edge is None or extension == max_extensions:
            break
        new_lr = lrs[0] * lrs[0] / lrs[1] if edge == "low" else lrs[-1] * lrs[-1] / lrs[-2]
        by_lr[new_lr] = measure(new_lr, seed)
    best_lr = min(by_lr, key=lambda lr: (by_lr[lr][loss_key], lr))
    seed_runs = [by_lr[best_lr]] + [measure(best_lr, seed + k) for k in range(1, seeds)]
    losses = [result[loss_key] for result in seed_runs]
    finite = all(math.isfinite(loss) for loss in losses)
    row = {**by_lr[best_lr], loss_key: statistics.fmean(losses) if finite else math.inf,
           f"{loss_key}_std": statistics.stdev(losses) if finite and len(losses) > 1 else 0.0 if finite else None,
           f"{loss_key}_min": min(losses), f"{loss_key}_max": max(losses), "seed_losses": losses,
           "seeds": len(seed_runs), "lr_edge": edge,
           "lr_sweep": {f"{lr:.3g}": by_lr[lr][loss_key] for lr in sorted(by_lr)}}
    if all("val_curve" in result for result in seed_runs):
        row["val_curve"] = _mean_curve(seed_runs)
    speeds = [result.get("tokens_per_s") for result in seed_runs]
    if all(speed is not None for speed in speeds):
        row["tokens_per_s"] = statistics.fmean(speeds)
    return row, runs


@contextlib.contextmanager
def _threads(args: argparse.Namespace) -> Iterator[None]:
    """Within: torch's intra-op threads as ``--threads`` asks (restored after)."""
    saved = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _progress(args: argparse.Namespace, report: dict[str, Any], pending: Sequence[str]) -> None:
    """The table so far in ``--out`` (report.json and table.md), rewritten after each optimizer."""
    if not getattr(args, "out", None):
        return
    from memzoo.bench.cli import COLUMNS, format_table

    out = Path(args.out)
    partial = {**report, "partial": bool(pending), "pending": list(pending)}
    write_json_atomic(out / "report.json", partial)
    header = " ".join(f"{k}={v}" for k, v in partial.items() if not isinstance(v, (list, dict)))
    text = f"{header}\npending: {', '.join(pending) or 'none'}\n\n"
    text += format_table(report["rows"], COLUMNS[report["command"]]) + "\n" if report["rows"] else ""
    partial_table = out / "table.md.tmp"
    partial_table.write_text(text)
    os.replace(partial_table, out / "table.md")


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    with _threads(args):
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    preset, device, corpus = _environment_args(args)
    steps = args.steps or preset.steps
    seeds = args.seeds or preset.seeds
    names = ["adamw", *[n for n in args.optimizer if n != "adamw"]]
    for name in names:
        if name not in TRAIN_SETTINGS:
            raise ValueError(f"no training setting for {name!r}; valid: {', '.join(TRAIN_SETTINGS)}")
    validation = _validation_windows(corpus, preset, args.seed)
    store = RunStore(args.out, {"command": "train", "preset": repr(preset), "steps": steps, "corpus": corpus.sha256,
                                "validation_seed": args.seed, "device": device.type, "backend": args.backend})
    report = {"command": "train", "preset": args.preset, "model_params": preset.model.numel(), "steps": steps,
              "batch": preset.batch, "seq_len": preset.model.seq_len, "corpus_sha256": corpus.sha256,
              "update_proj_gap": preset.update_proj_gap or max(10, min(200, steps // 10)), "seeds": seeds,
              "lr_factors": list(args.lr_factors), "max_lr_extensions": args.max_lr_extensions,
              "torch_threads": torch.get_num_threads(), "rows": [], "runs": []}
    for index, name in enumerate(names):
        setting = TRAIN_SETTINGS[name]

        def run(lr: float, seed: int, name: str = name) -> dict[str, Any]:
            key = {"optimizer": name, "lr": lr, "seed": seed, "setting": repr(TRAIN_SETTINGS[name])}
            return store.run(key, lambda: {**train_run(name, lr, preset, corpus, validation, steps=steps,
                                                       device=device, backend=args.backend, seed=seed), "seed": seed})

        best, sweep = bracket_lr(name, args.lr.get(name, setting.lr), args.lr_factors, run, "val_loss",
                                 seed=args.seed, seeds=seeds, max_extensions=args.max_lr_extensions)
        report["runs"].extend(sweep)
        report["rows"].append({key: best.get(key) for key in (
            "optimizer", "lr", "val_loss", "val_loss_std", "val_loss_min", "val_loss_max", "seed_losses", "seeds",
            "lr_edge", "tokens_per_s", "peak_mib", "state_mib", "lr_sweep", "val_curve")})
        _compare_to_adamw(report["rows"])
        _progress(args, report, names[index + 1:])
    if args.plot:
        report["plot"] = plot_report(report, args.plot)
    return report


def _compare_to_adamw(rows: list[dict[str, Any]]) -> None:
    adamw = rows[0]
    for row in rows:
        row["vs_adamw_loss"] = row["val_loss"] / adamw["val_loss"]
        row["vs_adamw_state"] = row["state_mib"] / adamw["state_mib"] if adamw["state_mib"] else None
        if row["tokens_per_s"] and adamw["tokens_per_s"]:
            row["vs_adamw_speed"] = row["tokens_per_s"] / adamw["tokens_per_s"]


# ---- zo -------------------------------------------------------------------------------------------

# The zeroth-order methods of the registry's records, then the first-order baseline (AdamW).
_ZO_NAMES = sorted((name for name, _ in factory_names() if name.zo is not None), key=lambda name: name.name == "adamw")
ZO_SETTINGS: dict[str, ZOSetting] = {name.name: name.zo for name in _ZO_NAMES}
DEFAULT_ZO = tuple(name.name for name in _ZO_NAMES if name.runs_by_default("zo"))


def pretrained_checkpoint(preset_name: str, preset: TrainPreset, corpus: Corpus, device: torch.device,
                          cache_dir: Path, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` AdamW steps on the pretrain files, from the cache or trained
    now (and cached, keyed by preset, corpus hash, steps and seed)."""
    path = cache_dir / f"zo-{preset_name}-{corpus.sha256[:16]}-{steps}-{seed}.pt"
    if path.exists():
        print(f"pretrained checkpoint: {path} (cached)", flush=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    print(f"pretraining {preset_name} with AdamW for {steps} steps → {path}", flush=True)
    model = build_model(preset.model, device, seed)
    optimizer = build_optimizer("adamw", model, TRAIN_SETTINGS["adamw"].lr, steps, "auto")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps))
    for batch in _batches(corpus.splits["pretrain"], preset, steps, seed + 1):
        _train_step(model, optimizer, schedule, batch.to(device), device)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(weights, partial)
    partial.replace(path)  # atomic: an interrupted run leaves no half-written checkpoint
    return weights


def quantize_nf4(model: Decoder) -> Decoder:
    """Replace the attention and MLP Linear layers by bitsandbytes NF4 ``Linear4bit`` layers
    (fp32 absmax scales, no double quantization: QZO trains those scales)."""
    import bitsandbytes as bnb

    device = model.lm_head.weight.device
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute,
                                          compress_statistics=False, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.detach().to("cpu", torch.float32), requires_grad=False,
                                                 compress_statistics=False, quant_type="nf4")
                setattr(parent, child_name, layer.to(device))  # the move quantizes
    return model


def zo_run(name: str, weights: dict[str, torch.Tensor], preset: TrainPreset, corpus: Corpus,
           heldout: torch.Tensor, *, steps: int, lr: float, device: torch.device, backend: str,
           seed: int) -> dict[str, Any]:
    from memzoo.optim import create_optimizer

    model = build_model(preset.model, device, seed)
    model.load_state_dict(weights)
    setting = ZO_SETTINGS[name]
    if name == "qzo":
        quantize_nf4(model)
    zeroth_order = name != "adamw"
    if zeroth_order:
        optimizer = create_optimizer(model, name, lr=lr, **setting.kwargs, backend=backend, seed=seed)
    else:
        optimizer = create_optimizer(model, "adamw", lr=lr, weight_decay=0.0)
    batches = list(_batches(corpus.splits["finetune"], preset, steps, seed + 3))
    _reset_peak(device)
    with torch.no_grad(), _autocast(device):  # inference memory: one forward on a batch
        model.loss(batches[0].to(device))
    inference_peak = _device_peak(device)
    _reset_peak(device)
    curve = [(0, evaluate(model, heldout, preset.batch, device))]
    forwards_per_step = 2 * getattr(optimizer, "n_samples", 1) if zeroth_order else 1
    start = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        batch = batch.to(device)
        if zeroth_order:
            with _autocast(device):
                optimizer.step(lambda batch=batch: model.loss(batch))
        else:
            with _autocast(device):
                loss = model.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step % preset.eval_interval == 0 or step == steps:
            curve.append((step, evaluate(model, heldout, preset.batch, device)))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = _device_peak(device)
    return {
        "method": name, "lr": lr, "initial_loss": curve[0][1], "final_loss": curve[-1][1], "steps": steps,
        "forward_passes": steps * forwards_per_step, "forwards_per_step": forwards_per_step,
        "seconds": seconds, "inference_peak_mib": inference_peak, "peak_mib": peak,
        "peak_over_inference": peak / inference_peak if peak and inference_peak else None,
        "state_mib": optimizer_state_bytes(optimizer) / MIB,
        "val_curve": curve,
    }


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose loss is at most ``target`` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def run_zo(args: argparse.Namespace) -> dict[str, Any]:
    with _threads(args):
        return _run_zo(args)


def _run_zo(args: argparse.Namespace) -> dict[str, Any]:
    preset, device, corpus = _environment_args(args)
    for name in args.optimizer:
        if name not in ZO_SETTINGS:
            raise ValueError(f"zo fine-tunes with {', '.join(ZO_SETTINGS)}; got {name!r}")
    pretrain_steps = args.pretrain_steps or preset.pretrain_steps
    weights = pretrained_checkpoint(args.preset, preset, corpus, device, Path(args.cache_dir), args.seed,
                                    pretrain_steps)
    steps = args.steps or preset.zo_steps
    seeds = args.seeds or preset.seeds
    heldout = _validation_windows(corpus, preset, args.seed)
    store = RunStore(args.out, {"command": "zo", "preset": repr(preset), "steps": steps, "corpus": corpus.sha256,
                                "pretrain_steps": pretrain_steps, "checkpoint_seed": args.seed,
                                "device": device.type, "backend": args.backend})
    report = {"command": "zo", "preset": args.preset, "model_params": preset.model.numel(), "steps": steps,
              "pretrain_steps": pretrain_steps, "corpus_sha256": corpus.sha256, "seeds": seeds,
              "lr_factors": list(args.lr_factors), "max_lr_extensions": args.max_lr_extensions,
              "torch_threads": torch.get_num_threads(), "rows": [], "runs": []}
    for index, name in enumerate(args.optimizer):
        centre = args.lr.get(name, ZO_SETTINGS[name].lr * (preset.zo_lr_multiplier if name != "adamw" else 1.0))

        def run(lr: float, seed: int, name: str = name) -> dict[str, Any]:
            key = {"method": name, "lr": lr, "seed": seed, "setting": repr(ZO_SETTINGS[name])}
            return store.run(key, lambda: {**zo_run(name, weights, preset, corpus, heldout, steps=steps, lr=lr,
                                                    device=device, backend=args.backend, seed=seed), "seed": seed})

        best, sweep = bracket_lr(name, centre, args.lr_factors, run, "final_loss", seed=args.seed, seeds=seeds,
                                 max_extensions=args.max_lr_extensions)
        report["runs"].extend(sweep)
        report["rows"].append(best)
        _compare_to_mezo(report["rows"])
        _progress(args, report, args.optimizer[index + 1:])
    if args.plot:
        report["plot"] = plot_report(report, args.plot)
    return report


def _compare_to_mezo(rows: list[dict[str, Any]]) -> None:
    """Sparse-MeZO's claim: MeZO's final loss in at most half of MeZO's steps (seed-mean curves)."""
    mezo = next((row for row in rows if row["method"] == "mezo"), None)
    if mezo is None or not mezo["final_loss"] < mezo["initial_loss"]:
        return
    for row in rows:
        reached = steps_to_reach(row["val_curve"], mezo["final_loss"])
        row["steps_to_mezo_final"] = reached
        row["fraction_of_mezo_steps"] = reached / mezo["steps"] if reached is not None else None


def plot_report(report: dict[str, Any], path: str) -> str | None:
    """The PNG of a ``train`` or ``zo`` JSON report (e.g. one measured on a machine without
    matplotlib): the best-lr curve of each optimizer."""
    if report.get("command") == "train" and all("val_curve" in row for row in report["rows"]):
        curves = [(f"{row['optimizer']} (lr {row['lr']:.3g}, {row.get('seeds', 1)} seeds)",
                   [s for s, _ in row["val_curve"]], [v for _, v in row["val_curve"]]) for row in report["rows"]]
        return plot_curves(path, curves, xlabel="step",
                           title=f"memzoo-bench train --preset {report['preset']}: "
                                 "validation loss (best lr, seed mean)")
    if report.get("command") == "train":  # a report written before rows carried their curves
        best = {(row["optimizer"], row["lr"]) for row in report["rows"]}
        curves = [(f"{run['optimizer']} (lr {run['lr']:.3g})", [s for s, _ in run["val_curve"]],
                   [v for _, v in run["val_curve"]]) for run in report["runs"] if (run["optimizer"], run["lr"]) in best]
        return plot_curves(path, curves, xlabel="step",
                           title=f"memzoo-bench train --preset {report['preset']}: validation loss (best lr)")
    if report.get("command") == "zo":
        curves = [(f"{row['method']} (lr {row['lr']:.3g})", [s * row["forwards_per_step"] for s, _ in row["val_curve"]],
                   [v for _, v in row["val_curve"]]) for row in report["rows"]]
        return plot_curves(path, curves, xlabel="forward passes",
                           title=f"memzoo-bench zo --preset {report['preset']}: held-out loss (best lr)")
    raise ValueError(f"plot takes the JSON of memzoo-bench train or zo, got command {report.get('command')!r}")


def plot_curves(path: str, curves: list[tuple[str, list[float], list[float]]], *, xlabel: str,
                title: str) -> str | None:
    """Loss curves to a PNG; None (with a note) when matplotlib (the ``bench`` extra) is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'memzoo[bench]')", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, xs, ys in curves:
        axes.plot(xs, ys, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("loss (nats per byte)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
