"""The chunked 4-bit decoder equals a direct decode (nibbles → code book → × absmax) bit for bit.

Sizes span several decode chunks, end inside a chunk, in a short block and on an odd count; block sizes
up to 4096; every output dtype. No bitsandbytes needed.
"""

from __future__ import annotations

import pytest
import torch

from peftkit.quant import nf4
from peftkit.quant.nf4 import code_book, dequantize_4bit, quantize_4bit


def _direct(p: nf4.Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The textbook decode: two nibbles per byte, high first; value = code[nibble] · absmax of its block."""
    n = p.shape.numel()
    codes = torch.stack([p.data >> 4, p.data & 0xF], dim=1).reshape(-1)[:n].long()
    scale = nf4.dequantize_absmax(p).repeat_interleave(p.block_size)[:n]
    return (code_book(p.quant_type)[codes] * scale).to(dtype).view(p.shape)


CHUNK_WEIGHTS = 2 * nf4._DECODE_CHUNK


@pytest.mark.parametrize(
    ("numel", "block_size"),
    [
        (3 * CHUNK_WEIGHTS, 64),  # whole chunks
        (2 * CHUNK_WEIGHTS + 4096 + 64 * 5, 4096),  # last chunk partial, ending in a short block
        (CHUNK_WEIGHTS + 1001, 32),  # odd count: a padding nibble in the last byte
        (777, 64),  # less than one chunk
    ],
)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_decode_equals_direct_decode(numel: int, block_size: int, quant_type: str) -> None:
    torch.manual_seed(numel)
    w = torch.randn(numel) * 0.05
    w[: numel // 7] *= 30  # blocks of very different scales
    for double_quant in (False, True):
        p = quantize_4bit(w, quant_type, block_size, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = dequantize_4bit(p, dtype)
            assert got.dtype == dtype and got.shape == w.shape and got.is_contiguous()
            assert torch.equal(got, _direct(p, dtype))


def test_decode_keeps_the_2d_shape_and_allocates_a_fresh_tensor() -> None:
    w = torch.randn(300, 700)  # 210000 weights: 2 chunks, odd row length, short last block
    p = quantize_4bit(w, "nf4", 64, True)
    first, second = dequantize_4bit(p), dequantize_4bit(p)
    assert first.shape == (300, 700) and torch.equal(first, _direct(p, torch.float32))
    assert first.data_ptr() != second.data_ptr()
