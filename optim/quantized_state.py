"""8-bit optimizer moments through bitsandbytes' blockwise dynamic quantization.

A moment of n values is stored as n uint8 codes plus one fp32 absmax per block of 256 values
(≈1.016 bytes per value instead of 4), as bitsandbytes' 8-bit optimizers store theirs: the
signed dynamic map for first moments, the unsigned one for second moments. The update decodes
to fp32, runs the ordinary math, and encodes the result; the codes themselves are tensors, so
the state round-trips through ``state_dict`` like any other. On FSDP2 row shards each rank
quantizes its own rows in blocks of its own (:class:`memzoo.optim.lowrank.LowRankOptimizer`
keeps one padded row of block scales per rank), so :meth:`QuantizedMoment.decode` and
:meth:`QuantizedMoment.encode_` read and write the leading entries of a longer absmax and pass
empty shards.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK_SIZE", "MIN_8BIT_SIZE", "QuantizedMoment"]

BLOCK_SIZE = 256
# Moments smaller than this stay in floating point (bitsandbytes' and GaLore8bit's default).
MIN_8BIT_SIZE = 4096


@functools.cache
def _code(signed: bool, device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional  # heavy; only where 8-bit state is used

    return bnb_functional.create_dynamic_map(signed=signed).to(device)


class QuantizedMoment:
    """Encode/decode one moment kind (signed for Adam's m, unsigned for v)."""

    def __init__(self, signed: bool) -> None:
        self.signed = signed

    @staticmethod
    def absmax_shape(numel: int) -> torch.Size:
        return torch.Size((-(-numel // BLOCK_SIZE),))

    def zeros(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.empty(shape, dtype=torch.uint8, device=device)
        absmax = torch.empty(self.absmax_shape(codes.numel()), dtype=torch.float32, device=device)
        self.encode_(codes, absmax, torch.zeros(shape, dtype=torch.float32, device=device))
        return codes, absmax

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """fp32 values of ``codes``. ``absmax`` holds the scales of their blocks first (in any
        shape); entries after those are not read (the padding of a row-sharded moment's row)."""
        import bitsandbytes.functional as bnb_functional

        if codes.numel() == 0:  # an empty row shard
            return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
        scales = absmax.reshape(-1)[: self.absmax_shape(codes.numel())[0]]
        return bnb_functional.dequantize_blockwise(codes, absmax=scales, code=_code(self.signed, codes.device),
                                                   blocksize=BLOCK_SIZE).view(codes.shape)

    def encode_(self, codes: torch.Tensor, absmax: torch.Tensor, value: torch.Tensor) -> None:
        """Quantize ``value`` into ``codes`` and the first entries of ``absmax`` (as :meth:`decode` reads them)."""
        import bitsandbytes.functional as bnb_functional

        if value.numel() == 0:
            return
        _, quant_state = bnb_functional.quantize_blockwise(value.float().contiguous(), code=_code(self.signed, value.device),
                                                           blocksize=BLOCK_SIZE, out=codes)
        absmax.view(-1)[: quant_state.absmax.numel()].copy_(quant_state.absmax)
