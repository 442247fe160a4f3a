"""Quantized linears as base-layer kinds: what lets LoRA/DoRA wrap them (QLoRA) and merge into them.

Reading the weight dequantizes it into the layer's compute dtype (into fp32 for a merge, so that the
merged weight is rounded once, when re-quantized); writing it re-quantizes and returns the max absolute
error the re-quantization introduced. ``unload(..., dequantize=True)`` swaps each
quantized base for a float ``nn.Linear`` in the dtype the weight had before quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, LinearKind
from peftkit.quant.layers import Linear4bit, Linear8bit, QuantLinear


def _q(module: nn.Module) -> QuantLinear:
    assert isinstance(module, QuantLinear)  # the registry only hands us the types registered below
    return module


def _to_linear(module: nn.Module) -> nn.Module:
    return _q(module).to_linear()


_KIND = LinearKind(
    in_features=lambda m: _q(m).in_features,
    out_features=lambda m: _q(m).out_features,
    weight=lambda m: _q(m).dequantize(),
    set_weight=lambda m, w: _q(m).requantize(w),
    merge_weight=lambda m: _q(m).dequantize(torch.float32),
)
for _cls in (Linear4bit, Linear8bit):
    LINEAR_KINDS.register(_cls, _KIND)
    DEQUANTIZERS.register(_cls, _to_linear)
