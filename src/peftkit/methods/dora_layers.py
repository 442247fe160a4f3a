"""DoRA on linear-like layers and embeddings (the formula and paper: :mod:`peftkit.methods.dora`).

Per active DoRA adapter, with ``g = m / ‖W + s·BA‖`` (detached, per output row) and dropout on the adapter
branch's input only::

    y = g ⊙ (W x + s·B A dropout(x)) + b

On ``nn.Embedding`` (weight E, vocab × dim) the norm and magnitude are per embedding dimension, the columns of E,
as in HF PEFT. A plain LoRA adapter on the same layer (no magnitude) adds its update as LoRA does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.methods import lora_groups, lora_mixed
from peftkit.methods.dora_norms import _DoRAMixin
from peftkit.methods.lora_layers import LoRAEmbedding, LoRALinear


class DoRALinear(_DoRAMixin, LoRALinear):
    """DoRA on a linear-like layer (``nn.Linear``, GPT-2 ``Conv1D``, quantized linears via ``kind.weight``)."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def _oriented(self) -> torch.Tensor:
        return self.kind.weight(self.base_layer)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor_weights(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._mixed is not None:  # rows through different (plain LoRA) adapters (pk.mixed_batch)
            return lora_mixed.forward(self, self._mixed, x, args, kwargs)
        # One DoRA adapter on a frozen nn.Linear: the whole formula in one autograd node (lora_kernels), shared
        # with the sibling projections that read the same input (lora_groups).
        fused = None if args or kwargs else lora_groups.fused_forward(self, x, dora=True)
        if fused is not None:
            return fused
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        base_out = result if bias is None else result - bias  # W x: the base term never sees dropout
        return self._add_updates(x, result, base_out)


class DoRAEmbedding(_DoRAMixin, LoRAEmbedding):
    """DoRA on ``nn.Embedding``: magnitude and norm per embedding dimension (the columns of the table E).

    ``E' = (E + s·(BA)ᵀ) · diag(m / ‖columns‖)``, so ``y = g ⊙ (E[x] + s·Aᵀ[x] Bᵀ)`` with ``g = m / ‖·‖``.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    base_layer: nn.Embedding  # LoRAEmbedding's, over the mixin's nn.Module

    def _oriented(self) -> torch.Tensor:
        return self.base_layer.weight.T  # (dim, vocab): rows are embedding dimensions, update s·B A

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors(name)

    def _channel_norms(self, weight: torch.Tensor) -> torch.Tensor:
        norms: torch.Tensor = weight.norm(dim=0)  # E is (vocab, dim): one norm per column
        return norms

    def _per_row(self, factor: torch.Tensor) -> torch.Tensor:
        return factor[None, :]

    def _dora_working_weight(self) -> torch.Tensor:
        return self._base_weight().detach()  # merged in the table's own dtype, not through fp32

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._mixed is not None:  # rows through different (plain LoRA) adapters (pk.mixed_batch)
            return lora_mixed.forward(self, self._mixed, x, args, kwargs)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        base = result
        for name in self._applied():
            A, B = self.factors(name)
            # A scaled embedding scales the update as it does the lookup; the norm is the table's own (as HF PEFT).
            lora = self.scaled((self.embed(x, A.T) @ B.T) * self.scaling[name])
            if name not in self.lora_magnitude_vector:
                result = result + lora
                continue
            g = self.lora_magnitude_vector[name] / self.weight_norm(name)
            result = result + ((g - 1) * base.to(lora.dtype) + g * lora)
        return result.to(base.dtype)  # rounded once, after the updates, as in LoRAEmbedding
