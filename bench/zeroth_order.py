"""``memzoo-bench step`` rows for zeroth-order optimizers (MeZO, Sparse-MeZO, QZO).

A zeroth-order step is 2q forward passes plus the optimizer's passes over the parameters, so the
row splits the two: ``forward_ms`` (one closure call), ``overhead_ms`` (step − 2q·forward) and
``pass_ms`` (one perturbation pass over every trainable tensor, timed alone), and reports the
step's peak memory over that of a forward pass alone (``peak_over_inference_mib``, CUDA only).

The forward is a probe that reads every trainable tensor once, as an inference forward at batch
size one does (a matrix-vector product per matrix; for QZO, each 4-bit layer applied to one
vector), so the timing isolates the optimizer on the presets' parameter sets without a model.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import torch

from memzoo.bench.presets import DTYPES, make_named_parameters
from memzoo.bench.timing import Contender, median, peak_extra_bytes, time_call

__all__ = ["OfficialMeZO", "prepare_zeroth_order"]

MIB = 2**20
Named = list[tuple[str, torch.nn.Parameter]]


class OfficialMeZO:
    """The official MeZO step (princeton-nlp/MeZO ``large_models/trainer.py``: zo_step,
    zo_perturb_parameters, zo_update) transcribed for timing: the global RNG reseeded per pass,
    ``torch.normal`` per parameter in its dtype, four passes (+ε, −2ε, +ε, update)."""

    zeroth_order = True

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        self.params, self.lr, self.eps, self.weight_decay = params, lr, eps, weight_decay
        self.state: dict = {}
        self.seed = 0

    @torch.no_grad()
    def perturb(self, scale: float) -> None:
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.size(), device=param.device, dtype=param.dtype)
            param.data = param.data + scale * z * self.eps

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        self.seed = int(torch.randint(0, 10**9, ()))
        self.perturb(1)
        plus = closure()
        self.perturb(-2)
        minus = closure()
        projected = float((plus - minus) / (2 * self.eps))
        self.perturb(1)
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.size(), device=param.device, dtype=param.dtype)
            param.data = param.data - self.lr * (projected * z + self.weight_decay * param.data)
        return plus


def _probe_closure(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A forward that reads every tensor once: v_n·Wᵀ for each matrix (v_n one vector per input
    width), a sum for the others; returns a scalar."""
    probes: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
    for tensor in tensors:
        if tensor.dim() == 2:
            key = (tensor.shape[1], tensor.dtype, tensor.device)
            if key not in probes:
                probes[key] = torch.full((1, tensor.shape[1]), 1e-3, dtype=tensor.dtype, device=tensor.device)

    def closure() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        for tensor in tensors:
            if tensor.dim() == 2:
                total = total + (probes[(tensor.shape[1], tensor.dtype, tensor.device)] @ tensor.T).float().sum()
            else:
                total = total + tensor.float().sum()
        return total

    return closure


def _quantized_layers(named: Named, device: torch.device) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """The preset's projection matrices (attention and MLP; not the embedding or head) as
    bitsandbytes NF4 ``Linear4bit`` layers with float scales, and those scales."""
    import bitsandbytes as bnb

    from memzoo.optim.zeroth_order import collect_quantization_scales

    layers = []
    for name, param in named:
        if param.dim() != 2 or "embed" in name or "lm_head" in name:
            continue
        out_features, in_features = param.shape
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=param.dtype,
                                  compress_statistics=False, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(param.detach().to("cpu", torch.float32), requires_grad=False,
                                         compress_statistics=False, quant_type="nf4")
        layers.append(layer.to(device))
    return layers, collect_quantization_scales(torch.nn.Sequential(*layers))


def _quantized_closure(layers: list[torch.nn.Module], dtype: torch.dtype,
                       device: torch.device) -> Callable[[], torch.Tensor]:
    probes = {layer.in_features: torch.full((1, layer.in_features), 1e-3, dtype=dtype, device=device)
              for layer in layers}

    def closure() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for layer in layers:
            total = total + layer(probes[layer.in_features]).float().sum()
        return total

    return closure


def prepare_zeroth_order(label: str, make: Callable[[list[torch.Tensor]], tuple[Any, str]], quantized: bool,
                         args: argparse.Namespace, device: torch.device) -> Contender:
    """A contender whose ``make(tensors)`` returns (optimizer, backend) over the trainable tensors
    (the preset's parameters, or the scales of its 4-bit layers when ``quantized``); its row
    adds the forward and one-pass times, measured alone after the interleaved rounds."""
    dtype = DTYPES[args.dtype]
    named = make_named_parameters(args.preset, dtype, device)
    for _, param in named:
        param.grad = None  # zeroth-order: no gradients exist
    if quantized:
        layers, tensors = _quantized_layers(named, device)
        del named
        closure = _quantized_closure(layers, dtype, device)
    else:
        tensors = [param for _, param in named]
        closure = _probe_closure(tensors)
    optimizer, backend = make(tensors)

    def finish(first: float, times: list[float]) -> dict[str, Any]:
        nonlocal optimizer, tensors, closure
        samples = getattr(optimizer, "n_samples", 1)
        _, forward_times = time_call(closure, device, warmup=1, iters=args.iters)
        if isinstance(optimizer, OfficialMeZO):
            one_pass = lambda: optimizer.perturb(-2)  # noqa: E731
        else:
            one_pass = lambda: optimizer._move(0, 1, -1)  # noqa: E731
        _, pass_times = time_call(one_pass, device, warmup=1, iters=args.iters)
        inference = peak_extra_bytes(closure, device)
        peak = (peak_extra_bytes(lambda: optimizer.step(closure), device) - inference) / MIB
        step_ms, forward_ms = median(times) * 1e3, median(forward_times) * 1e3
        state = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else 0
        row = {"optimizer": label, "backend": backend, "dtype": args.dtype,
               "params": sum(t.numel() for t in tensors), "first_ms": first * 1e3, "ms": step_ms,
               "min_ms": min(times) * 1e3, "forward_ms": forward_ms, "overhead_ms": step_ms - 2 * samples * forward_ms,
               "pass_ms": median(pass_times) * 1e3, "state_mib": state / MIB, "peak_over_inference_mib": peak}
        optimizer = tensors = closure = one_pass = None  # freed before the next row is finished
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    return Contender(label, lambda: optimizer.step(closure), finish)
