"""Timing on CUDA (events) and CPU (perf_counter), and the device's copy bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Contender", "copy_bandwidth", "optimizer_state_bytes", "peak_extra_bytes", "time_call", "time_interleaved"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Seconds of the first call and of each of ``iters`` timed calls after ``warmup`` more."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    return first, [_timed(fn, device) for _ in range(iters)]


@dataclass
class Contender:
    """One row of an interleaved timing: ``step`` is timed; ``finish(first, times)`` measures
    what is measured alone (refresh step, memory), builds the row and frees the contender."""

    label: str
    step: Callable[[], object]
    finish: Callable[[float, list[float]], dict[str, Any]]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_interleaved(contenders: Sequence[Contender], device: torch.device, *, warmup: int,
                     iters: int) -> list[dict[str, Any]]:
    """Each contender's first step, then ``warmup`` untimed rounds, then ``iters`` timed rounds,
    every round stepping each contender once in turn: a load that comes and goes (other
    processes on a shared CPU) lands on all of them alike instead of on whichever ran then."""
    firsts = []
    for contender in contenders:
        _sync(device)
        firsts.append(_timed(contender.step, device))
    for _ in range(warmup):
        for contender in contenders:
            contender.step()
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(iters):
        for contender, record in zip(contenders, times):
            _sync(device)
            record.append(_timed(contender.step, device))
    return [contender.finish(first, record) for contender, first, record in zip(contenders, firsts, times)]


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most memory ``fn`` holds at once beyond what was allocated when it started (its
    temporaries, and what it keeps). CUDA: the allocator's peak. CPU, which keeps no allocator
    statistics: the running sum of torch.profiler's allocation and free events, in time order
    (every tensor allocation on the CPU is reported, compiled kernels' buffers included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:  # + an allocation, − a free
        running += nbytes
        peak = max(peak, running)
    return peak


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    _, times = time_call(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * src.nbytes / min(times)


def _state_tensors(state: dict) -> list[torch.Tensor]:
    """The tensors of one parameter's state, including those held by objects in it (galore-torch
    keeps its projection matrix on a projector object)."""
    found = []
    for value in state.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found.extend(v for v in vars(value).values() if isinstance(v, torch.Tensor))
    return found


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: memzoo's ``state_bytes()``, else the state tensors' sizes."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(t.nbytes for state in optimizer.state.values() for t in _state_tensors(state))
