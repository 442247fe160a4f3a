"""``backend="bitsandbytes"``: bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` on a CUDA GPU.

Imported only when that backend is asked for; bitsandbytes is never needed otherwise. Its layers are
registered as base-layer kinds by qualified name, so LoRA wraps and merges into them too, whoever built them
(this backend, or ``transformers`` loading with a ``BitsAndBytesConfig``): adapters read their dequantized
weight, and merging re-quantizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, LinearKind
from peftkit.errors import ConfigError, require

if TYPE_CHECKING:
    from peftkit.quant.convert import QuantSpec


def _bnb() -> Any:
    bnb = require("bitsandbytes", "bnb")
    if not torch.cuda.is_available():
        raise ConfigError(
            "backend='bitsandbytes' needs a CUDA GPU and none is available; "
            "use backend='peftkit' (pure PyTorch, runs on CPU)"
        )
    return bnb


def to_bitsandbytes(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """A bitsandbytes quantized copy of ``linear``, stored as ``spec`` says, on the current CUDA device.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
        ConfigError: no CUDA GPU.
    """
    bnb = _bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if spec.bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=spec.compute_dtype,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
        )
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            blocksize=spec.block_size,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    cuda: nn.Module = layer.cuda()
    return cuda


def _dequantize4(m: Any) -> torch.Tensor:
    """``Linear4bit``'s weight in the dtype it had before quantization."""
    import bitsandbytes.functional as bf

    dense: torch.Tensor = bf.dequantize_4bit(m.weight.data, m.weight.quant_state)
    return dense


def _weight4(m: Any) -> torch.Tensor:
    return _dequantize4(m).to(m.compute_dtype or torch.float32)


def _set4(m: Any, w: torch.Tensor) -> float:
    bnb: Any = require("bitsandbytes", "bnb")
    old = m.weight
    m.weight = bnb.nn.Params4bit(
        w.detach().to("cpu", torch.float32),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
    ).to(old.device)
    return float((_dequantize4(m).float() - w.detach().float()).abs().max())


def _to_linear4(m: Any) -> nn.Module:
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
    with torch.no_grad():
        linear.weight.copy_(_weight4(m).float())
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear.requires_grad_(False)


def _weight8(m: Any) -> torch.Tensor:
    """``Linear8bitLt``'s weight in fp32: int8 codes × row scale / 127, as bitsandbytes and HF PEFT dequantize it.

    Its row scales sit on the weight until the first forward pass and on the layer's ``state`` after it. A layer
    that keeps fp16 weights for training (``has_fp16_weights``) holds no codes: its weight is returned as it is.
    """
    weight = m.weight
    if weight.dtype != torch.int8:
        return cast(torch.Tensor, weight)
    import bitsandbytes.functional as bf

    scb = weight.SCB if getattr(weight, "SCB", None) is not None else m.state.SCB
    dense: torch.Tensor = bf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return dense.float()


def _set8(m: Any, w: torch.Tensor) -> float | None:
    old = m.weight
    if old.dtype != torch.int8:
        with torch.no_grad():
            old.copy_(w)
        return None
    bnb: Any = require("bitsandbytes", "bnb")
    # Int8Params rounds the weight to fp16 before quantizing it, as when bitsandbytes loads it.
    m.weight = bnb.nn.Int8Params(
        w.detach().to("cpu", torch.float32), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    ).to(old.device)
    m.state.reset_grads()  # drops the codes and scales cached from the old weight by the last forward pass
    m.state.CB = m.state.SCB = None
    return float((_weight8(m) - w.detach().float()).abs().max())


def _to_linear8(m: Any) -> nn.Module:
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
    with torch.no_grad():
        linear.weight.copy_(_weight8(m))
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear.requires_grad_(False)


def packed_tensors(m: nn.Module) -> list[torch.Tensor] | None:
    """The tensors that store a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` weight (codes and constants, double
    quantization's included), or ``None`` for any other module (and for an 8-bit layer holding fp16 weights)."""
    kind = f"{type(m).__module__}.{type(m).__qualname__}"
    weight = getattr(m, "weight", None)
    if kind == "bitsandbytes.nn.modules.Linear4bit" and getattr(weight, "quant_state", None) is not None:
        state = cast(Any, weight).quant_state
        nested = [state.state2.absmax, state.offset] if getattr(state, "nested", False) else []
        return [t for t in (cast(torch.Tensor, weight), state.absmax, *nested) if isinstance(t, torch.Tensor)]
    if kind == "bitsandbytes.nn.modules.Linear8bitLt" and weight is not None and weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        scb = scb if scb is not None else cast(Any, m).state.SCB
        return [t for t in (cast(torch.Tensor, weight), scb) if isinstance(t, torch.Tensor)]
    return None


_FEATURES: dict[str, Any] = {
    "in_features": lambda m: int(getattr(m, "in_features")),  # noqa: B009
    "out_features": lambda m: int(getattr(m, "out_features")),  # noqa: B009
}
LINEAR_KINDS.register(
    "bitsandbytes.nn.modules.Linear4bit",
    LinearKind(**_FEATURES, weight=_weight4, set_weight=_set4, merge_weight=lambda m: _dequantize4(m).float()),
)
DEQUANTIZERS.register("bitsandbytes.nn.modules.Linear4bit", _to_linear4)
# Linear8bitLt subclasses nn.Linear, whose kind would read and write its int8 codes as if they were the weight.
LINEAR_KINDS.register(
    "bitsandbytes.nn.modules.Linear8bitLt", LinearKind(**_FEATURES, weight=_weight8, set_weight=_set8)
)
DEQUANTIZERS.register("bitsandbytes.nn.modules.Linear8bitLt", _to_linear8)
