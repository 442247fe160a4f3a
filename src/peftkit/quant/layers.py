"""Frozen quantized linear layers: ``y = x Wᵀ + b`` with ``W`` stored in 4 or 8 bits.

The packed weight and its constants are buffers (never parameters, so never trained or handed to an
optimizer); only the bias stays a parameter, as in ``nn.Linear``. Float constants are stored as int32
*views* of their fp32 bits, so ``model.half()`` / ``model.to(torch.bfloat16)`` move them without
rounding them (and ``.to(device)`` still moves them).

The forward pass dequantizes into ``compute_dtype`` and calls ``F.linear``. Through a custom autograd
function the dense weight lives only during the matmul: backward dequantizes again for ``∂L/∂x``
instead of keeping a dense copy per layer alive between forward and backward (QLoRA's memory saving).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.quant.int8 import PackedInt8, dequantize_int8, quantize_int8
from peftkit.quant.nf4 import Packed4bit, check_block_size, check_quant_type, dequantize_4bit, quantize_4bit


def _as_bits(t: Tensor | None) -> Tensor | None:
    """An fp32 tensor's bits as int32 (other dtypes unchanged), so dtype casts of the module skip it."""
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _as_float(t: Tensor | None) -> Tensor | None:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t


class _DequantLinear(torch.autograd.Function):
    """``F.linear(x, layer.dequantize(), bias)`` that saves no dense weight for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None


class QuantLinear(nn.Module):
    """What the 4-bit and 8-bit linears share: features, bias, compute dtype, forward.

    Attributes:
        in_features: input size.
        out_features: output size.
        compute_dtype: the dtype the weight is dequantized to and the matmul runs in; inputs are cast
            to it and outputs cast back to the input's dtype.
        bias: the float bias or ``None`` (a parameter, like ``nn.Linear``'s).
    """

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        #: the float dtype the weight had before quantization (``to_linear`` restores it)
        self.weight_dtype = torch.float32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out: Tensor = _DequantLinear.apply(x.to(self.compute_dtype), bias, self)  # type: ignore[no-untyped-call]
        return out.to(dtype)

    def frozen_numel(self) -> int:
        """The weight's element count: its packed buffers are not parameters, yet parameter counts include it."""
        return self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default ``compute_dtype``)."""
        raise NotImplementedError

    def requantize(self, weight: Tensor) -> float:
        """Replace the stored weight by the quantized ``weight``; return the max abs error introduced.

        Used to merge an adapter into a quantized base: ``requantize(dequantize() + ΔW)``.

        Args:
            weight: a float ``(out_features, in_features)`` tensor.

        Returns:
            ``max |dequantize() − weight|`` after requantizing.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            from peftkit.errors import ShapeMismatchError

            raise ShapeMismatchError(
                f"cannot requantize a weight of shape {tuple(weight.shape)} into a layer of shape "
                f"{(self.out_features, self.in_features)}"
            )
        self._store(weight.detach().to(self._device()))
        return float((self.dequantize(torch.float32) - weight.detach().float()).abs().max())

    def _store(self, weight: Tensor) -> None:
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight, in ``dtype`` (default: the original dtype)."""
        dtype = dtype or self.weight_dtype
        weight = self.dequantize(torch.float32).to(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=self.bias.requires_grad)
        return linear

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )


class Linear4bit(QuantLinear):
    """A linear layer with NF4/FP4 block-quantized weights (see :mod:`peftkit.quant.nf4`)."""

    qweight: Tensor
    absmax: Tensor
    absmax_scale: Tensor | None
    absmax_offset: Tensor | None

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        """Quantize ``weight`` (``(out_features, in_features)``, float) into a new layer.

        Raises:
            ConfigError: bad ``quant_type`` or ``block_size``, or a non-float ``weight``.
        """
        check_quant_type(quant_type)
        check_block_size(block_size)
        super().__init__(weight.shape[1], weight.shape[0], bias, compute_dtype)
        self.quant_type = quant_type
        self.block_size = block_size
        self.double_quant = double_quant
        self.weight_dtype = weight.dtype
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Linear4bit:
        """Quantize an ``nn.Linear``; keyword arguments as for the constructor."""
        return cls(linear.weight, linear.bias, **kwargs)

    def _store(self, weight: Tensor) -> None:
        p = quantize_4bit(weight, self.quant_type, self.block_size, self.double_quant)
        self.register_buffer("qweight", p.data)
        self.register_buffer("absmax", _as_bits(p.absmax))
        self.register_buffer("absmax_scale", _as_bits(p.absmax_scale))
        self.register_buffer("absmax_offset", _as_bits(p.absmax_offset))

    def packed(self) -> Packed4bit:
        """The stored weight as a :class:`Packed4bit` (views of the buffers, no copy)."""
        return Packed4bit(
            self.qweight,
            _as_float(self.absmax),  # type: ignore[arg-type]
            torch.Size((self.out_features, self.in_features)),
            self.quant_type,
            self.block_size,
            _as_float(self.absmax_scale),
            _as_float(self.absmax_offset),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_4bit(self.packed(), dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"{super().extra_repr()}, quant_type={self.quant_type}, block_size={self.block_size}{dq}"


class Linear8bit(QuantLinear):
    """A linear layer with per-row absmax int8 weights (see :mod:`peftkit.quant.int8`)."""

    qweight: Tensor
    row_absmax: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, compute_dtype: torch.dtype = torch.bfloat16):
        """Quantize ``weight`` (``(out_features, in_features)``, float) into a new layer.

        Raises:
            ConfigError: a non-float ``weight``.
        """
        super().__init__(weight.shape[1], weight.shape[0], bias, compute_dtype)
        self.weight_dtype = weight.dtype
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Linear8bit:
        """Quantize an ``nn.Linear``; keyword arguments as for the constructor."""
        return cls(linear.weight, linear.bias, **kwargs)

    def _store(self, weight: Tensor) -> None:
        p = quantize_int8(weight)
        self.register_buffer("qweight", p.data)
        self.register_buffer("row_absmax", _as_bits(p.row_absmax))

    def packed(self) -> PackedInt8:
        """The stored weight as a :class:`PackedInt8` (views of the buffers, no copy)."""
        return PackedInt8(self.qweight, _as_float(self.row_absmax))  # type: ignore[arg-type]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8(self.packed(), dtype or self.compute_dtype)


def quantized_nbytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's packed weight and constants (0 for other modules)."""
    if isinstance(module, (Linear4bit, Linear8bit)):
        return module.packed().nbytes()
    return 0
