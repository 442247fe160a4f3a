"""Quantized base models: 4-bit NF4/FP4 and 8-bit weights under trainable adapters (QLoRA).

``quantize`` replaces linear layers in place, ``prepare_for_kbit_training`` readies the model,
``memory_report`` / ``estimate_training_memory`` say what it all costs. Importing this package
registers the quantized layers as base-layer kinds, so ``pk.apply`` can wrap them.
"""

from __future__ import annotations

from peftkit.quant import bnb as _bnb  # noqa: F401  (registers bitsandbytes' layers, imports nothing heavy)
from peftkit.quant import kinds as _kinds  # noqa: F401  (registers Linear4bit / Linear8bit)
from peftkit.quant.convert import prepare_for_kbit_training, quantize
from peftkit.quant.layers import Linear4bit, Linear8bit, QuantLinear
from peftkit.quant.memory import MemoryReport, estimate_training_memory, memory_report

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "MemoryReport",
    "QuantLinear",
    "estimate_training_memory",
    "memory_report",
    "prepare_for_kbit_training",
    "quantize",
]
