"""``memzoo-bench memory``: optimizer-state bytes (analytic next to measured) and the peak memory of
one full training step (forward, backward, optimizer step) of the LLaMA-shaped decoder, per
optimizer, against AdamW.

On CUDA the peak is the allocator's (``max_memory_allocated``) over a steady step, and
``state_allocated_mib`` is what the allocator holds after the first step beyond the parameters;
on the CPU there is no allocator peak, and ``allocated_mib`` counts the tensors alive after a step
(parameters and optimizer state; gradients are freed with ``zero_grad``).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from memzoo.bench.model import DecoderConfig
from memzoo.bench.presets import DTYPES, PRESETS, SHAPE_PRESETS
from memzoo.bench.timing import optimizer_state_bytes
from memzoo.bench.train import TRAIN_SETTINGS, build_model, build_optimizer
from memzoo.optim.registry import factory_names

__all__ = ["DEFAULT_MEMORY", "analytic_state_bytes", "run_fsdp_memory", "run_memory"]

MIB = 2**20
# From the registry's records (memzoo.optim.registry): the memzoo optimizers memory runs by default.
DEFAULT_MEMORY = tuple(name.name for name, info in factory_names() if info is not None and name.runs_by_default("memory"))


def analytic_state_bytes(name: str, optimizer: torch.optim.Optimizer) -> int:
    """The state bytes the algorithm needs (after every parameter has been stepped): the
    registry's formula for memzoo optimizers; for torch AdamW two moments of each parameter's
    dtype and a float32 step scalar."""
    from memzoo.optim.layerwise import LayerwiseOptimizer

    if isinstance(optimizer, LayerwiseOptimizer):
        return sum(analytic_state_bytes(name, inner) for inner in optimizer.inner_optimizers)
    if name == "adamw":
        return sum(2 * p.numel() * p.element_size() + 4
                   for group in optimizer.param_groups for p in group["params"] if p in optimizer.state)
    from memzoo.optim.factory import FACTORY_NAMES

    return FACTORY_NAMES[name].info.expected_state_bytes(optimizer)


def memory_config(preset: str, seq_len: int) -> DecoderConfig:
    shape = PRESETS[preset]
    return DecoderConfig(hidden=shape.hidden, intermediate=shape.intermediate, layers=shape.layers,
                         heads=max(1, shape.hidden // 64), seq_len=seq_len, vocab=shape.vocab)


def measure(name: str, config: DecoderConfig, args: argparse.Namespace, device: torch.device,
            layerwise: bool = False) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
    model = build_model(config, device, args.seed).to(DTYPES[args.dtype])
    params_bytes = sum(p.nbytes for p in model.parameters())
    before_optimizer = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    optimizer = build_optimizer(name, model, TRAIN_SETTINGS[name].lr, 1000, args.backend,
                                {"layerwise": True} if layerwise else None)
    tokens = torch.randint(0, config.vocab, (args.batch, config.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)

    def full_step() -> None:
        model.loss(tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    full_step()  # allocates the state
    row: dict[str, Any] = {"optimizer": f"{name} (layerwise)" if layerwise else name, "params_mib": params_bytes / MIB,
                           "state_analytic_mib": analytic_state_bytes(name, optimizer) / MIB,
                           "state_mib": optimizer_state_bytes(optimizer) / MIB}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["state_allocated_mib"] = (torch.cuda.memory_allocated(device) - before_optimizer) / MIB
        torch.cuda.reset_peak_memory_stats(device)
        full_step()
        torch.cuda.synchronize(device)
        row["peak_step_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    else:
        row["allocated_mib"] = (params_bytes + optimizer_state_bytes(optimizer)) / MIB
    return row


def run_fsdp_memory(args: argparse.Namespace) -> dict[str, Any]:
    """``memory --fsdp N``: the formulas of :mod:`memzoo.bench.fsdp_memory` for each world size."""
    from memzoo.bench.fsdp_memory import fsdp_report

    rows = []
    for world in args.worlds:
        rows += [{"world": world, **row}
                 for row in fsdp_report(args.optimizer, args.preset, world, dtype=DTYPES[args.dtype],
                                        settings=args.settings)]
    return {"command": "memory", "table": "memory_fsdp", "estimate": "computed-from-formulas", "preset": args.preset,
            "model_params": SHAPE_PRESETS[args.preset].numel(), "dtype": args.dtype,
            "note": "computed from the formulas of memzoo.bench.fsdp_memory, not measured: the state on rank 0 "
                    "(it holds the most rows) and the MiB one rank sends per step (ring all-reduce / all-gather) "
                    "beyond FSDP2's own all-gathers and gradient reduce-scatter; vs_grad_traffic = amortized / "
                    "that reduce-scatter; status planned = the optimizer refuses these sharded weights today, "
                    "the figures are the planned scheme's", "rows": rows}


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "fsdp", None) is not None:
        return run_fsdp_memory(args)
    device = torch.device(args.device)
    config = memory_config(args.preset, args.seq_len)
    rows = []
    for name in ["adamw", *[n for n in args.optimizer if n != "adamw"]]:
        rows.append(measure(name, config, args, device))
        if args.layerwise:  # stepped during backward, each gradient freed: the peak drops by ~a gradient copy
            rows.append(measure(name, config, args, device, layerwise=True))
    adamw = rows[0]
    for row in rows:
        row["vs_adamw_state"] = row["state_mib"] / adamw["state_mib"]
        if "peak_step_mib" in row:
            row["vs_adamw_peak"] = row["peak_step_mib"] / adamw["peak_step_mib"]
    return {"command": "memory", "preset": args.preset, "model_params": config.numel(), "dtype": args.dtype,
            "batch": args.batch, "seq_len": args.seq_len, "rows": rows}
