"""``backend="bitsandbytes"``: bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` on a CUDA GPU.

Imported only when that backend is asked for; bitsandbytes is never needed otherwise. Its layers are
registered as base-layer kinds by qualified name, so LoRA wraps and merges into them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def _weight4(m: Any) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(m.weight.data, m.weight.quant_state).to(m.compute_dtype or torch.float32)


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
    return float((_weight4(m).float() - w.float()).abs().max())


def _to_linear4(m: Any) -> nn.Module:
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
    with torch.no_grad():
        linear.weight.copy_(_weight4(m).float())
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear.requires_grad_(False)


LINEAR_KINDS.register(
    "bitsandbytes.nn.modules.Linear4bit",
    LinearKind(
        in_features=lambda m: int(getattr(m, "in_features")),  # noqa: B009
        out_features=lambda m: int(getattr(m, "out_features")),  # noqa: B009
        weight=_weight4,
        set_weight=_set4,
    ),
)
DEQUANTIZERS.register("bitsandbytes.nn.modules.Linear4bit", _to_linear4)
