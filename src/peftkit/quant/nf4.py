"""4-bit block-wise quantization: NormalFloat (NF4) and FP4, with double quantization of the constants.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314), section 3::

    W ≈ c_b · q[i]          for every weight i of block b (block_size consecutive weights)
    c_b = max_{i∈b} |W_i|   (absmax), i = argmin_k |W_i / c_b − q_k| over the 16-value code book q

NF4's code book holds the quantiles of N(0, 1) scaled to [-1, 1] (one exact zero, 7 negative and 8
positive values); FP4 is a 1-sign/2-exponent/1-mantissa float. Double quantization stores the fp32
constants ``c`` themselves in 8 bits: ``c ≈ d_g · dyn[j] + mean(c)`` in groups of 256 constants, with
bitsandbytes' signed dynamic 8-bit code ``dyn`` and one fp32 ``d_g`` per group.
Bits per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127, i.e. 0.129× the fp32 bytes.

Layout and arithmetic follow ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (version
0.50, CPU path) operation for operation, so that the dequantized weights are bit-identical:

* blocks run over the *flattened* row-major weight, so a block may span two rows and the last block
  may be short: any shape is accepted, no padding of ``in_features`` is needed;
* two 4-bit codes per byte, the first element in the high nibble (an odd count gets a zero nibble);
* the code of a value is the bucket of ``clamp(w · (1/c), -1, 1)`` between the midpoints of the sorted
  code book (a value on a midpoint takes the lower code);
* double quantization subtracts the mean of the constants and quantizes them in blocks of 256 to the
  nearest dynamic code (ties to the lower code) after ``x / absmax``, like bitsandbytes' CUDA and
  pure-PyTorch kernels (its CPU C kernel's approximate search picks a neighbour for ~0.2% of them);
* dequantization multiplies in fp32 and rounds once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from peftkit.errors import ConfigError

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: constants are double-quantized in groups of this many (bitsandbytes' fixed choice)
ABSMAX_BLOCK = 256

# NF4: bitsandbytes' ``create_normal_map(offset=0.9677083)``, hard-coded there and here.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 (e2m1, exponent bias 2) in bit-pattern order, normalised by its largest magnitude (12). Code 8
# (sign bit, zero) decodes to +0.0 as in bitsandbytes, so no -0.0 ever appears in a dequantized weight.
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


@cache
def code_book(quant_type: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 fp32 values a 4-bit code stands for, indexed by code.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.
        device: where the table lives.

    Returns:
        A float32 tensor of shape ``(16,)``.

    Raises:
        ConfigError: unknown ``quant_type``.
    """
    check_quant_type(quant_type)
    values = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return values.div_(values.abs().max()).to(device)


#: Bytes of packed codes decoded per step on CPU. The indices and the 2^15 fp32 values stay in L1/L2 between
#: the look-up and the multiply, and no op reaches ATen's parallel grain (2^15 elements): on the shared cores
#: this library trains on, a parallel region waits for its slowest thread, and hundreds of small regions per
#: weight cost more than the second core saves. A multiple of every block size / 2 (chunks start on blocks).
_DECODE_CHUNK = 1 << 14


@cache
def _pair_table(quant_type: str, device: torch.device) -> Tensor:
    """``(256,)`` int64: the two fp32 values of a byte's codes (high nibble first), bit-packed in one word.

    Gathering one 8-byte word per byte decodes both nibbles at once: no shifts, no second look-up, and a
    1-D ``index_select`` of a scalar dtype is far faster than one of ``(256, 2)`` rows.
    """
    code = code_book(quant_type, device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).view(256)


@cache
def _bounds(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Midpoints between the sorted code values, and the code of each sorted position."""
    code = code_book(quant_type, device)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)


@cache
def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed dynamic 8-bit code (``create_dynamic_map()``), used for double quantization.

    A sign bit, a run-length-coded decimal exponent (10^-6 … 10^0) and a linear fraction, from -0.993
    to 1.0 with an exact zero.

    Returns:
        A sorted float32 tensor of shape ``(256,)``.
    """
    data: list[float] = []
    max_exp, non_sign_bits = 7, 7
    for i in range(max_exp):
        fraction_items = 2 ** (i + non_sign_bits - max_exp) + 1
        edges = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def check_quant_type(quant_type: str) -> None:
    """Raise :class:`ConfigError` unless ``quant_type`` is ``"nf4"`` or ``"fp4"``."""
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not supported; use one of {list(QUANT_TYPES)}")


def check_block_size(block_size: int) -> None:
    """Raise :class:`ConfigError` unless ``block_size`` is one bitsandbytes supports."""
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size={block_size!r} is not supported; use one of {list(BLOCK_SIZES)}")


@dataclass
class Packed4bit:
    """A weight quantized to 4 bits, with what is needed to restore it.

    Attributes:
        data: uint8 ``(ceil(numel/2),)``, two codes per byte, high nibble first.
        absmax: one constant per block: float32, or uint8 codes when double-quantized.
        shape: the original weight's shape.
        quant_type: ``"nf4"`` or ``"fp4"``.
        block_size: weights per constant.
        absmax_scale: float32, one per 256 constants (double quantization only).
        absmax_offset: float32 scalar, the mean of the constants (double quantization only).
    """

    data: Tensor
    absmax: Tensor
    shape: torch.Size
    quant_type: str
    block_size: int
    absmax_scale: Tensor | None = None
    absmax_offset: Tensor | None = None

    def nbytes(self) -> int:
        """Bytes taken by the packed codes and all constants."""
        parts = [self.data, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _blockwise_absmax(flat: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per-block absmax and ``flat`` scaled into [-1, 1], exactly as bitsandbytes' default kernel."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # the short last block divides instead of multiplying by the reciprocal, as bnb does
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def quantize_4bit(
    weight: Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True
) -> Packed4bit:
    """Quantize a float tensor to 4-bit codes with one absmax constant per block.

    Args:
        weight: a float32, float16 or bfloat16 tensor of any shape.
        quant_type: ``"nf4"`` or ``"fp4"``.
        block_size: weights per constant, one of :data:`BLOCK_SIZES`.
        double_quant: also quantize the constants to 8 bits (QLoRA's double quantization).

    Returns:
        The :class:`Packed4bit` form, on ``weight``'s device.

    Raises:
        ConfigError: bad ``quant_type`` / ``block_size``, or a non-float / empty ``weight``.
    """
    check_quant_type(quant_type)
    check_block_size(block_size)
    check_float(weight)
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax(flat, block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = _bounds(quant_type, flat.device)
    codes = order[torch.bucketize(scaled, bounds, out_int32=True)]
    packed = (codes[0::2] << 4) | codes[1::2]
    out = Packed4bit(packed, absmax, weight.shape, quant_type, block_size)
    if double_quant:
        out.absmax_offset = absmax.mean()
        out.absmax, out.absmax_scale = quantize_dynamic_8bit(absmax - out.absmax_offset, ABSMAX_BLOCK)
    return out


def quantize_dynamic_8bit(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Block-wise 8-bit quantization with the dynamic code: nearest value, ties to the lower code.

    Args:
        x: a 1-D float32 tensor.
        block_size: values per fp32 scale.

    Returns:
        ``(codes uint8 like x, scales float32 (ceil(len/block_size),))``.
    """
    code = dynamic_code(x.device)
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, -n % block_size)).view(-1, block_size)
    scale = padded.abs().amax(dim=1)
    normed = (padded / torch.where(scale == 0, 1.0, scale).view(-1, 1)).reshape(-1)[:n]
    # left neighbour by binary search, then step right if strictly nearer (bitsandbytes' quantize_block)
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp_(0, 255)
    right = (idx + 1).clamp_(max=255)
    step = (normed - code[right]).abs() < (normed - code[idx]).abs()
    return (idx + step.long()).to(torch.uint8), scale


def dequantize_absmax(p: Packed4bit) -> Tensor:
    """The fp32 per-block constants of ``p`` (undoing double quantization where present)."""
    if p.absmax_scale is None or p.absmax_offset is None:
        return p.absmax
    n = p.absmax.numel()
    codes = p.absmax if n % ABSMAX_BLOCK == 0 else torch.nn.functional.pad(p.absmax, (0, -n % ABSMAX_BLOCK))
    vals = dynamic_code(p.absmax.device).index_select(0, codes.int()).view(-1, ABSMAX_BLOCK)
    # (code · scale) + offset: two roundings, in this order, as bitsandbytes (in place: no more temporaries)
    return vals.mul_(p.absmax_scale.view(-1, 1)).view(-1)[:n].add_(p.absmax_offset)


def dequantize_4bit(p: Packed4bit, dtype: torch.dtype = torch.float32) -> Tensor:
    """Restore a dense tensor of ``p.shape`` from its 4-bit form.

    One table look-up of both nibbles per byte and one fp32 multiply per weight, rounded once into
    ``dtype`` (bit-identical to ``bitsandbytes.functional.dequantize_4bit``).

    Args:
        p: the packed weight.
        dtype: the output dtype.

    Returns:
        A new contiguous tensor of shape ``p.shape``.
    """
    absmax = dequantize_absmax(p)
    n, bs, data = p.shape.numel(), p.block_size, p.data
    table = _pair_table(p.quant_type, data.device)
    nbytes, full = data.numel(), n - n % bs  # full: the weights in whole blocks
    # One chunk on accelerators (fewer launches); cache-sized chunks on CPU, with reused index and value
    # buffers, so that no full-size temporary is allocated (page faults) or streamed through memory twice.
    chunk = min(_DECODE_CHUNK, nbytes) if data.device.type == "cpu" else nbytes
    out = torch.empty(2 * nbytes, dtype=dtype, device=data.device)  # an odd count has one padding nibble
    index = torch.empty(chunk, dtype=torch.int32, device=data.device)
    in_place = dtype == torch.float32  # decode into out itself, then scale it in place
    scratch = out if in_place else torch.empty(2 * chunk, dtype=torch.float32, device=data.device)
    rows = 2 * chunk // bs  # blocks per chunk (chunks start on block boundaries)
    out_blocks = torch.split(out[:full].view(-1, bs), rows)
    scales = torch.split(absmax[: full // bs].view(-1, 1), rows)
    for i, codes in enumerate(torch.split(data, chunk)):
        idx = index[: codes.numel()]
        idx.copy_(codes)
        start = i * chunk if in_place else 0
        torch.index_select(table, 0, idx, out=scratch.view(torch.int64)[start : start + codes.numel()])
        if i < len(out_blocks):  # fp32 value × fp32 constant, rounded once into dtype
            values = out_blocks[i] if in_place else scratch[: out_blocks[i].numel()].view(-1, bs)
            torch.mul(values, scales[i], out=out_blocks[i])
    if full < n:  # the short last block, decoded by the last chunk
        offset = 0 if in_place else 2 * chunk * ((nbytes - 1) // chunk)
        torch.mul(scratch[full - offset : n - offset], absmax[-1], out=out[full:n])
    return out[:n].view(p.shape)


def check_float(weight: Tensor) -> None:
    """Raise :class:`ConfigError` unless ``weight`` is a non-empty float32/float16/bfloat16 tensor."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"cannot quantize a {weight.dtype} tensor: only float32, float16 and bfloat16 weights can be "
            "quantized (is this layer already quantized?)"
        )
    if weight.numel() == 0:
        raise ConfigError(f"cannot quantize an empty tensor of shape {tuple(weight.shape)}")
