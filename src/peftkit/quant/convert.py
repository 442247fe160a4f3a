"""Quantizing a model in place, and preparing it for k-bit training (the QLoRA recipe).

::

    pk.quantize(model, bits=4, quant_type="nf4", double_quant=True)   # frozen 4-bit base
    pk.prepare_for_kbit_training(model)                                # fp32 norms, input grads
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=16))     # = QLoRA
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match, matches, near_misses
from peftkit.core.walk import set_module
from peftkit.errors import ConfigError
from peftkit.quant.layers import Linear4bit, Linear8bit, QuantLinear
from peftkit.quant.nf4 import check_block_size, check_float, check_quant_type

Backend = Literal["peftkit", "bitsandbytes"]


@dataclass(frozen=True)
class QuantSpec:
    """How :func:`quantize` stores each layer: its arguments of the same names."""

    bits: int
    quant_type: str
    double_quant: bool
    block_size: int
    compute_dtype: torch.dtype


def _candidates(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` not matched by ``skip``; layers used by ``nn.MultiheadAttention`` stay float
    (it reads ``out_proj.weight`` directly instead of calling the layer), and so do an adapter's own factors (a
    model adapted before it is quantized, as LoftQ's is, keeps its adapters in float and quantizes their bases)."""
    factors = {id(m) for layer in model.modules() if isinstance(layer, AdapterLayer)
               for attr in layer.adapter_containers for m in getattr(layer, attr).modules()}
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name not in inside_mha and id(m) not in factors
        and first_match(name, skip) is None
    ]


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(bits: int, quant_type: str, block_size: int, compute_dtype: torch.dtype, backend: str) -> None:
    if bits not in (4, 8):
        raise ConfigError(f"bits={bits!r} is not supported; use 4 (NF4/FP4) or 8 (int8)")
    if bits == 4:
        check_quant_type(quant_type)
        check_block_size(block_size)
    elif quant_type != "nf4" or block_size != 64:
        raise ConfigError(
            f"quant_type={quant_type!r} and block_size={block_size!r} apply to bits=4 only; with bits=8 (one int8 "
            "scale per row) leave them at their defaults"
        )
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ConfigError(
            f"compute_dtype={compute_dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16"
        )
    if backend not in ("peftkit", "bitsandbytes"):
        raise ConfigError(f"backend={backend!r} is not supported; use 'peftkit' or 'bitsandbytes'")


def _skip_patterns(model: nn.Module, skip: str | Sequence[str] | None) -> list[str]:
    """``skip`` as a list of patterns (a str is one pattern). The default, ``lm_head``, may match nothing; a pattern
    given explicitly must match some module, lest a misspelt name quantize the layer it meant to keep."""
    if skip is None:
        return ["lm_head"]
    patterns = [skip] if isinstance(skip, str) else list(skip)
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not isinstance(pattern, str) or not any(matches(n, pattern) for n in names):
            raise ConfigError(
                f"skip pattern {pattern!r} matches no module of this model (close: "
                f"{near_misses(str(pattern), names)}); fix or drop it"
            )
    return patterns


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: str | Sequence[str] | None = None,
    backend: Backend = "peftkit",
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers in place by frozen quantized ones.

    Blocks of ``block_size`` run over each flattened weight (as in bitsandbytes), so any
    ``in_features`` works: no padding, no refusal.

    Args:
        model: any module; it is modified in place.
        bits: 4 (NF4/FP4 block-wise, QLoRA) or 8 (per-row absmax int8).
        quant_type: ``"nf4"`` or ``"fp4"`` (4 bits only).
        double_quant: quantize the per-block constants too (4 bits only; ~0.37 bits/weight saved).
        block_size: weights per constant (4 bits only): 32, 64, ..., 4096.
        compute_dtype: dtype of the dequantized weight and of the matmul.
        skip: layers to leave in float: leaf names (``lm_head``) or globs on qualified names
            (``model.layers.0.*``), matched as ``target_modules`` are; a str is one pattern. Default
            (``None``): ``lm_head``, where the model has one. A pattern given here must match some module.
        backend: ``"peftkit"`` (pure PyTorch, any device) or ``"bitsandbytes"`` (its ``Linear4bit`` /
            ``Linear8bitLt``; needs bitsandbytes and a CUDA GPU).

    Returns:
        ``model``, with every matched linear layer replaced.

    Raises:
        ConfigError: bad ``bits``/``quant_type``/``block_size``/``compute_dtype``/``backend`` (``quant_type`` and
            ``block_size`` other than their defaults with ``bits=8``), a ``skip`` pattern that matches no module,
            a model already quantized, a layer with NaN or Inf weights, no linear
            layer left to quantize, or a layer whose weight is not float. (On a model that holds adapters only the base
            layers are quantized; the adapters' factors stay float and trainable.)
        MissingDependencyError: ``backend="bitsandbytes"`` without bitsandbytes installed.
    """
    _check_args(bits, quant_type, block_size, compute_dtype, backend)
    skip = _skip_patterns(model, skip)
    already = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) or _is_bnb(m)]
    if already:
        raise ConfigError(
            f"the model is already quantized ({len(already)} quantized layers, e.g. {already[0]!r}); "
            "quantize a float model once, or dequantize it first with pk.unload(model, dequantize=True)"
        )
    targets = _candidates(model, skip)
    if not targets:
        raise ConfigError(f"no nn.Linear layer to quantize (skip={list(skip)!r}); check the model and skip")
    for name, linear in targets:
        try:
            check_float(linear.weight)
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r}: {exc}") from None
        if linear.weight.device.type != "meta" and not bool(torch.isfinite(linear.weight).all()):
            bad = int((~torch.isfinite(linear.weight)).sum())
            # one NaN or Inf poisons its block's constant, and through double quantization's mean every constant
            raise ConfigError(
                f"layer {name!r} has {bad} non-finite weight(s) (NaN or Inf); quantizing would spread them over the "
                "layer. Fix or reload the weights, or leave the layer in float with skip="
            )
    spec = QuantSpec(bits, quant_type, double_quant, block_size, compute_dtype)
    for name, linear in targets:
        set_module(model, name, _convert(linear, spec, backend))
    return model


def _convert(linear: nn.Linear, spec: QuantSpec, backend: Backend) -> nn.Module:
    if backend == "bitsandbytes":
        from peftkit.quant.bnb import to_bitsandbytes

        return to_bitsandbytes(linear, spec)
    if spec.bits == 8:
        return Linear8bit.from_linear(linear, compute_dtype=spec.compute_dtype)
    return Linear4bit.from_linear(
        linear,
        quant_type=spec.quant_type,
        block_size=spec.block_size,
        double_quant=spec.double_quant,
        compute_dtype=spec.compute_dtype,
    )


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def _is_norm(module: nn.Module) -> bool:
    # transformers' norms (LlamaRMSNorm, T5LayerNorm, ...) share no base class; their names do
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast: Literal["all", "norms", "none"] = "all",
) -> nn.Module:
    """Get a quantized model ready for adapter training, as HF PEFT's ``prepare_model_for_kbit_training``.

    Freezes every parameter; casts float16/bfloat16 parameters to float32 (``upcast="all"``, HF
    PEFT's behaviour; ``"norms"`` casts only normalisation layers, for their numerical stability);
    with gradient checkpointing, makes the input embeddings' output require grad (so checkpointed
    blocks see an input that needs grad even though the embeddings are frozen) and turns
    checkpointing on through the model's ``gradient_checkpointing_enable`` where it has one.

    Args:
        model: a (usually quantized) model, modified in place.
        use_gradient_checkpointing: enable input grads and gradient checkpointing.
        gradient_checkpointing_kwargs: passed to ``gradient_checkpointing_enable``.
        upcast: which half-precision parameters become float32: ``"all"``, ``"norms"`` or ``"none"``.

    Returns:
        ``model``.

    Raises:
        ConfigError: an unknown ``upcast``.
    """
    if upcast not in ("all", "norms", "none"):
        raise ConfigError(f"upcast={upcast!r} is not supported; use 'all', 'norms' or 'none'")
    for param in model.parameters():
        param.requires_grad_(False)
    half = (torch.float16, torch.bfloat16)
    for module in model.modules():
        if upcast == "none" or (upcast == "norms" and not _is_norm(module)):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in half:
                param.data = param.data.float()
    if use_gradient_checkpointing:
        _enable_input_require_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if callable(enable):
            enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": True})
    return model


def _enable_input_require_grads(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embeddings is not None:
        embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
