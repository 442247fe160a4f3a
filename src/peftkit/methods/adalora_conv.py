"""AdaLoRA on ``nn.Conv2d`` (the formula and paper: :mod:`peftkit.methods.adalora`), as HF PEFT 0.21's ``SVDConv2d``.

The kernel W₀ (out × in × kH × kW) is treated as a matrix out × (in·kH·kW): Q is r × (in·kH·kW), λ is r × 1 and
P is out × r, so the triplets, their importance scores, masks and the orthogonality penalty are exactly those of
a linear layer, and the rank allocator handles both alike. The update ΔW = α/(r₀+ε) · P Λ Q, reshaped to the
kernel's shape, is applied as a second convolution with the base layer's stride, padding and dilation::

    y = conv(x, W₀) + b + conv(dropout(x), ΔW)
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from peftkit.errors import UnsupportedLayerError
from peftkit.methods.adalora import SVDLinear

__all__ = ["SVDConv2d"]


class SVDConv2d(SVDLinear):
    """AdaLoRA on an ``nn.Conv2d`` with ``groups=1``: ``base(x) + conv(dropout(x), α/(r₀+ε) · reshape(P Λ Q))``.

    Tensor names and shapes are HF PEFT's: ``lora_A`` (r, in·kH·kW), ``lora_E`` (r, 1), ``lora_B`` (out, r),
    ``ranknum`` (1,).
    """

    @staticmethod
    def _factor_features(base_layer: nn.Module) -> tuple[int, int]:
        """(in·kH·kW, out) of a ``groups=1`` ``nn.Conv2d``.

        Raises:
            UnsupportedLayerError: ``base_layer`` is not an ``nn.Conv2d``, or is a grouped one (ΔW would not have
                the kernel's shape; HF PEFT cannot adapt it either).
        """
        if not isinstance(base_layer, nn.Conv2d):
            raise UnsupportedLayerError(f"{type(base_layer).__name__} is not an nn.Conv2d; SVDConv2d wraps Conv2d only")
        if base_layer.groups != 1:
            raise UnsupportedLayerError(
                f"AdaLoRA adapts Conv2d with groups=1 only, not {base_layer} (groups={base_layer.groups}); leave it "
                "out of target_modules or with exclude_modules"
            )
        kh, kw = base_layer.kernel_size
        return base_layer.in_channels * kh * kw, base_layer.out_channels

    @property
    def conv(self) -> nn.Conv2d:
        """The wrapped convolution."""
        return cast(nn.Conv2d, self.base_layer)

    def delta_weight(self, name: str) -> torch.Tensor:
        """α/(r₀+ε) · P Λ Q, in the kernel's shape (out, in, kH, kW)."""
        return super().delta_weight(name).reshape(self.conv.weight.shape)

    def _base_weight(self) -> torch.Tensor:
        return self.conv.weight

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        with torch.no_grad():
            self.conv.weight.copy_(weight)
        return None  # a dense weight: exact up to its dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        for name in self._applied():
            A = self.lora_A[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            # _conv_forward honours the base's padding_mode; for the default "zeros" this is HF PEFT's conv2d call.
            delta = self.conv._conv_forward(h, self.delta_weight(name), None)
            result = (result + delta).to(result.dtype)  # rounded after the sum, as in SVDLinear
        return result
