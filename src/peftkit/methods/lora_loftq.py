"""LoftQ: LoRA factors that absorb the error of quantizing the base weight (``pk.LoRA(init="loftq")``).

Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"
(https://arxiv.org/abs/2310.08659), algorithm 1. For a base weight W, a rank r and T iterations::

    R₀ = 0;   for t = 1..T:   Q_t = dequant(quant(W − R_{t−1})),   R_t = best rank-r approximation of W − Q_t

so that ``Q_T + R_T ≈ W`` much better than ``quant(W)`` alone. The base weight becomes ``Q_T`` (already on the
quantization grid, so quantizing the model afterwards keeps it) and the adapter starts at ``s·BA = R_T``.

This follows Hugging Face PEFT's ``loftq_init`` (``peft/utils/loftq_utils.py``) operation for operation: NF4
through bitsandbytes' ``Params4bit`` (blocks of 64, no double quantization) or its row-wise int8 after a cast
to fp16 (``Int8Params``), both reproduced bit for bit by :mod:`peftkit.quant`; the SVD in fp32; the factors
``L = U·√S_r``, ``R = √S_r·Vhᵀ``. One difference: HF PEFT writes ``A = R, B = L`` whatever the adapter's scale s,
so its ``Q + s·BA`` approximates W only when ``s = 1`` (``alpha = rank``; huggingface/peft#1982). peftkit divides
both factors by ``√s``, so ``s·BA = L·R`` for every scale: the factors equal HF PEFT's when ``s = 1``, and the
new base weight (which does not depend on s) always does.
"""

from __future__ import annotations

import torch

from peftkit.quant.int8 import quantize_int8
from peftkit.quant.nf4 import dequantize_4bit, quantize_4bit

#: The quantizations LoftQ runs, by ``loftq_bits``: 4 is NF4, 8 is row-wise int8 (HF PEFT's two).
LOFTQ_BITS = (4, 8)
# 1/127 as bitsandbytes' ``int8_vectorwise_dequant`` writes it.
_INV_127 = 7.874015718698502e-3


def round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(weight))`` in fp32, as HF PEFT's ``loftq_init`` computes it with bitsandbytes.

    4 bits: NF4 in blocks of 64 over the flattened weight, no double quantization (``compress_statistics=False``).
    8 bits: bitsandbytes' ``Int8Params`` casts to fp16, quantizes each row by its absmax, and dequantizes as
    ``codes · absmax · (1/127)`` (two fp32 roundings, in that order).
    """
    if bits == 4:
        return dequantize_4bit(quantize_4bit(weight, "nf4", block_size=64, double_quant=False))
    packed = quantize_int8(weight.to(torch.float16))
    return packed.data * packed.row_absmax.view(-1, 1) * _INV_127


def low_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L·R`` the best rank-r approximation of ``weight``: ``L = U·√S_r`` and ``R = √S_r·Vh``,
    written as HF PEFT's ``_low_rank_decomposition`` writes them (so that the roundings are its own)."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    return U @ torch.sqrt(torch.diag(S)[:, :rank]), torch.sqrt(torch.diag(S)[:rank, :]) @ Vh


@torch.no_grad()
def loftq(weight: torch.Tensor, rank: int, scale: float, bits: int, iters: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's ``(A, B, Q)`` for ``weight`` (out × in): ``Q`` the new base weight in ``weight``'s dtype and
    device, ``A`` (r × in) and ``B`` (out × r) in fp32 with ``Q + scale·BA ≈ weight``.

    Args:
        weight: the float base weight.
        rank: the adapter's rank r (at most ``min(in, out)``).
        scale: the adapter's scale s (α/r, or α/√r with rsLoRA).
        bits: 4 (NF4) or 8 (int8), see :func:`round_trip`.
        iters: the alternating steps T (at least 1).
    """
    work = weight.detach().to(torch.float32)
    residual = work
    for step in range(iters):
        quantized = round_trip(residual, bits)
        L, R = low_rank(work - quantized, rank)
        if step + 1 < iters:
            residual = work - L @ R
    root = scale**0.5
    return R / root, L / root, quantized.to(weight.dtype)
