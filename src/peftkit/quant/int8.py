"""8-bit weights: per-row (per output channel) absmax quantization.

LLM.int8() (Dettmers et al., 2022, https://arxiv.org/abs/2208.07339), vector-wise quantization::

    s_r = max_j |W_rj|,    Q_rj = round(127 · W_rj / s_r) ∈ [-127, 127],    W_rj ≈ Q_rj · s_r / 127

Arithmetic follows ``bitsandbytes.functional.int8_vectorwise_quant`` / ``int8_vectorwise_dequant``
(without outlier decomposition): the int8 codes and row scales are identical; dequantization folds
the 1/127 into the row scale (one multiply per weight instead of bnb's two), which agrees with bnb to
within one fp32 rounding. Bytes: one int8 per
weight and one fp32 per row, i.e. 0.25 + 1/in_features of the fp32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftkit.quant.nf4 import check_float

# 1/127 as bitsandbytes writes it.
_INV_127 = 7.874015718698502e-3


@dataclass
class PackedInt8:
    """A weight quantized row-wise to int8.

    Attributes:
        data: int8 codes, same shape as the weight ``(out_features, in_features)``.
        row_absmax: float32 ``(out_features,)``, the largest magnitude of each row.
    """

    data: Tensor
    row_absmax: Tensor

    def nbytes(self) -> int:
        """Bytes taken by the codes and the row scales."""
        return self.data.numel() + self.row_absmax.numel() * self.row_absmax.element_size()


def quantize_int8(weight: Tensor) -> PackedInt8:
    """Quantize a 2-D float weight to int8 with one absmax per row.

    Args:
        weight: float32/float16/bfloat16 tensor ``(out_features, in_features)``.

    Returns:
        The :class:`PackedInt8` form. An all-zero row gets scale 0 and codes 0.

    Raises:
        ConfigError: a non-float or empty weight.
    """
    check_float(weight)
    w = weight.detach().reshape(weight.shape[0], -1)
    row_absmax = w.abs().amax(dim=1).float()
    # an all-zero row would divide by zero; its codes are 0 whatever the (finite) divisor
    safe = torch.where(row_absmax == 0, 1.0, row_absmax)
    data = torch.round(w * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return PackedInt8(data.view(weight.shape), row_absmax)


def dequantize_int8(p: PackedInt8, dtype: torch.dtype = torch.float32) -> Tensor:
    """Restore the dense weight: ``Q · s_r / 127``, computed in fp32 and rounded once into ``dtype``.

    Args:
        p: the packed weight.
        dtype: the output dtype.

    Returns:
        A new tensor of ``p.data``'s shape.
    """
    out = torch.empty(p.data.shape, dtype=dtype, device=p.data.device)
    scale = (p.row_absmax * _INV_127).view(-1, *([1] * (p.data.dim() - 1)))
    return torch.mul(p.data, scale, out=out)
