"""Parameter sets shaped like LLaMA models (the GaLore/APOLLO benchmark family)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "PRESETS", "SHAPE_PRESETS", "LlamaShape", "make_named_parameters"]

# The parameter dtypes the benchmarks take (--dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    # Output width of k_proj and v_proj: key/value heads × head size (grouped-query attention,
    # LLaMA-2 70B: 8 × 128); None: as wide as hidden (multi-head attention).
    kv_hidden: int | None = None

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter: untied embedding and head, per layer q/k/v/o,
        gate/up/down (nn.Linear layout: out × in) and two RMSNorm weights, a final norm."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_hidden or h
        out = [("embed_tokens", (self.vocab, h))]
        for layer in range(self.layers):
            prefix = f"layers.{layer}"
            out += [(f"{prefix}.self_attn.{n}_proj", (kv if n in "kv" else h, h)) for n in "qkvo"]
            out += [(f"{prefix}.mlp.gate_proj", (i, h)), (f"{prefix}.mlp.up_proj", (i, h)),
                    (f"{prefix}.mlp.down_proj", (h, i))]
            out += [(f"{prefix}.input_layernorm", (h,)), (f"{prefix}.post_attention_layernorm", (h,))]
        out += [("norm", (h,)), ("lm_head", (self.vocab, h))]
        return out

    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for _, shape in self.shapes())


PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, intermediate=172, layers=2, vocab=1000),
    "60m": LlamaShape(hidden=512, intermediate=1376, layers=8, vocab=32000),
    "130m": LlamaShape(hidden=768, intermediate=2048, layers=12, vocab=32000),
    "350m": LlamaShape(hidden=1024, intermediate=2736, layers=24, vocab=32000),
    "1b": LlamaShape(hidden=2048, intermediate=5461, layers=24, vocab=32000),
}

# Shapes that the benchmarks only compute with, never allocate (``memzoo-bench memory --fsdp``):
# every preset plus LLaMA-7B (Touvron et al. 2023) and LLaMA-2-70B (64 query heads, 8 key/value
# heads of 128).
SHAPE_PRESETS: dict[str, LlamaShape] = {
    **PRESETS,
    "7b": LlamaShape(hidden=4096, intermediate=11008, layers=32, vocab=32000),
    "70b": LlamaShape(hidden=8192, intermediate=28672, layers=80, vocab=32000, kv_hidden=1024),
}


def make_named_parameters(preset: str, dtype: torch.dtype, device: torch.device | str,
                          seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for the preset's shapes, random values, each with a random gradient."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device).mul_(std).to(dtype)

    params = []
    for name, shape in PRESETS[preset].shapes():
        param = torch.nn.Parameter(normal(shape, 0.02))
        param.grad = normal(shape, 1e-3)
        params.append((name, param))
    return params
