"""DoRA on ``nn.Conv1d/2d/3d`` with ``groups=1`` (the formula and paper: :mod:`peftkit.methods.dora`).

On a convolution (weight out × in × kernel) the norm and magnitude are per output channel, the norm taken over
all the other dims, and the layer output is ``(g − 1)·conv(x, W) + g·s·B(A(x)) + conv(x, W) + b``; HF PEFT
stores that magnitude with singleton dims, ``(1, out, 1, …)``, and so does peftkit.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.methods import lora_mixed
from peftkit.methods.dora_norms import _DoRAMixin
from peftkit.methods.lora_layers import LoRAConv


class DoRAConv(_DoRAMixin, LoRAConv):
    """DoRA on ``nn.Conv1d/2d/3d`` with ``groups=1``: magnitude and norm per output channel.

    With W (out, in, *kernel) flattened to rows (out, in·∏kernel), the norm is ``row_norms`` of
    ``W + s·B A`` (A the base-kernel convolution, B the 1×1 one) and ``y = g ⊙ (conv(x, W) + s·B(A(drop(x)))) + b``
    with ``g = m / ‖·‖`` per output channel (HF PEFT's ``_DoraConvNdLayer``; dropout as in :mod:`peftkit.methods.dora`).
    The magnitude is stored as HF PEFT stores it, shape ``(1, out, 1, …)`` with ``W.dim()`` dims.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def _oriented(self) -> torch.Tensor:
        return self._base_weight().flatten(1)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.factor_weights(name)
        return A.flatten(1), B.flatten(1)

    def _per_channel(self, t: torch.Tensor, over: str) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the ``"weight"`` (out, in, *k) or an ``"output"``
        (N, out, *S) or unbatched (out, *S)."""
        ones = self._base_weight().dim() - (1 if over == "weight" else 2)
        return t.reshape(-1, *([1] * ones))

    def _magnitude_shape(self) -> tuple[int, ...]:
        weight = self._base_weight()
        return (1, weight.shape[0], *([1] * (weight.dim() - 2)))

    def add_magnitude(self, name: str) -> None:
        """Add adapter ``name``'s magnitude ‖W + s·BA‖ in HF PEFT's shape ``(1, out, 1, …)`` (outputs unchanged)."""
        super().add_magnitude(name)
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name]).detach()
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude.reshape(self._magnitude_shape()))

    def base_norms(self) -> torch.Tensor:
        """‖W₀‖ per output channel, shaped like the magnitude (see ``_DoRAMixin.base_norms``)."""
        return super().base_norms().reshape(self._magnitude_shape())

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
        return (magnitude.reshape(-1) / norm).detach()  # (out,): m / ‖·‖ per output channel

    def _channel_norms(self, weight: torch.Tensor) -> torch.Tensor:
        norms: torch.Tensor = weight.flatten(1).norm(dim=1)
        return norms

    def _per_row(self, factor: torch.Tensor) -> torch.Tensor:
        return self._per_channel(factor, "weight")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._mixed is not None:  # rows through different (plain LoRA) adapters (pk.mixed_batch)
            return lora_mixed.forward(self, self._mixed, x, args, kwargs)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        # conv(x, W), without the bias: the base term never sees dropout
        base_out = result if bias is None else result - self._per_channel(bias, "output")
        return self._add_updates(x, result, base_out)

    def _gain(self, name: str) -> torch.Tensor:
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
        return self._per_channel(magnitude.reshape(-1) / self.weight_norm(name), "output")
