"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is split into a trainable magnitude m (one value per output row) and a direction::

    W' = m · (W + s·BA) / ‖W + s·BA‖          (row norms; s = α/r, or α/√r with rsLoRA)
    y  = W'x = (m/‖·‖ − 1) · W x  +  (m/‖·‖) · s·BAx  +  W x

The norm is detached from the graph and computed without the dense B@A (:mod:`peftkit.methods.dora_norms`).
Layers: :mod:`peftkit.methods.dora_layers` (linear-like, embedding) and :mod:`peftkit.methods.dora_conv`
(convolutions). On disk: HF PEFT's LoRA config with ``use_dora: true`` and the magnitude under
``lora_magnitude_vector``.

Dropout (``dropout > 0``, in training) acts on the adapter branch's input only::

    y = g ⊙ (W x + s·B A dropout(x)) + b,        g = m / ‖W + s·BA‖   (detached)

HF PEFT feeds the dropped-out input to the base term as well (``(g−1) ⊙ W dropout(x)``): a second full base
matmul per layer, and noise on the frozen weight's contribution. Here a layer costs one base matmul with or
without dropout, and dropout means what it means for LoRA (the adapter sees a dropped-out input), rescaled by g.
With dropout 0, and in evaluation, both are ``g ⊙ (W x + s·BAx) + b``: outputs and gradients equal HF PEFT's
exactly, and adapters move between the two libraries unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftkit.core.registry import LINEAR_KINDS, TypeRegistry, linear_kind
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.dora_conv import DoRAConv
from peftkit.methods.dora_layers import DoRAEmbedding, DoRALinear
from peftkit.methods.dora_norms import _DoRAMixin, row_norms
from peftkit.methods.lora import LORA_VARIANTS, LoRA
from peftkit.methods.lora_layers import LoRALayer

# The layers and helpers live in their own modules; importing them from here keeps working.
__all__ = ["DORA_LAYERS", "DORA_LAYER_TYPES", "DoRA", "DoRAConv", "DoRAEmbedding", "DoRALinear", "_DoRAMixin",
           "dora_layer_class", "row_norms"]

DORA_LAYERS = (DoRALinear, DoRAEmbedding, DoRAConv)

#: Base-layer type → DoRA layer class; linear-like kinds (``LINEAR_KINDS``) fall back to ``DoRALinear``.
DORA_LAYER_TYPES: TypeRegistry[type[LoRALayer]] = TypeRegistry()
DORA_LAYER_TYPES.register(nn.Embedding, DoRAEmbedding)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    DORA_LAYER_TYPES.register(_conv, DoRAConv)


def dora_layer_class(module: nn.Module) -> type[LoRALayer] | None:
    """The DoRA layer class for a base module, or ``None`` if DoRA cannot wrap it."""
    found = DORA_LAYER_TYPES.lookup(type(module))
    if found is not None:
        return found
    return DoRALinear if linear_kind(module) is not None else None


@dataclass
class DoRA(LoRA):
    """DoRA: LoRA's fields, plus a trainable magnitude per output row (HF PEFT: ``use_dora=True``).

    Wraps linear-like layers (``nn.Linear``, GPT-2 ``Conv1D``, quantized linears), ``nn.Embedding`` and
    ``nn.Conv1d/2d/3d`` with ``groups=1``.
    Dropout acts on the adapter branch's input only (``dropout_position="pre"``; see the module docstring).
    """

    #: EVA re-adds adapters at new ranks and CorDA rewrites W after the magnitudes were taken: they would not follow.
    takes_data_init: ClassVar[bool] = False
    shares_A: ClassVar[bool] = False  # each DoRA layer keeps its own A (its norm is taken over W + s·BA)

    takes_parameters = False
    takes_invocation_tokens = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout_position != "pre":
            raise ConfigError(f"DoRA supports dropout_position='pre' only, got {self.dropout_position!r}")
        if self.shared_A:
            raise ConfigError("DoRA adapters do not share A across projections; shared_A must be empty")
        if self.lora_bias:
            raise ConfigError(
                "DoRA does not support lora_bias=True (a trained bias on B; HF PEFT refuses it too): use "
                "pk.LoRA(lora_bias=True), or DoRA with lora_bias=False"
            )

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, LoRALayer):  # a DoRA layer, or a plain LoRA one (upgraded in place by transform)
            cls = dora_layer_class(module.base_layer)
            return isinstance(module, DORA_LAYERS) or (cls is not None and issubclass(cls, type(module)))
        return dora_layer_class(module) is not None

    def supported_layer_names(self) -> list[str]:
        return sorted(set(LINEAR_KINDS.names()) | set(DORA_LAYER_TYPES.names()))

    def resolve(self, model: nn.Module) -> list[str]:
        """LoRA's target resolution, refusing grouped convolutions before the model is touched.

        Raises:
            UnsupportedLayerError: a target is a convolution with ``groups > 1`` (named, with the fix).
        """
        targets = super().resolve(model)
        for qualname in targets:
            module = model.get_submodule(qualname)
            base = module.base_layer if isinstance(module, LoRALayer) else module
            groups = getattr(base, "groups", 1)
            if isinstance(base, nn.modules.conv._ConvNd) and groups != 1:
                raise UnsupportedLayerError(
                    f"DoRA cannot adapt {qualname!r}: a {type(base).__name__} with groups={groups}; DoRA supports "
                    f"Conv1d/2d/3d with groups=1 only. Leave it out with exclude_modules=[{qualname!r}]"
                )
        return targets

    def layer_class(self, module: nn.Module) -> type[LoRALayer]:
        cls = dora_layer_class(module)
        assert cls is not None  # guaranteed by supports() during target resolution
        return cls

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if isinstance(module, LoRALayer) and not isinstance(module, DORA_LAYERS):
            cls = dora_layer_class(module.base_layer)
            assert cls is not None and issubclass(cls, _DoRAMixin)  # guaranteed by supports()
            module = cls.upgrade(module)  # its LoRA adapters stay plain LoRA adapters
        layer = super().transform(module, qualname, adapter_name)
        layer.add_magnitude(adapter_name)  # type: ignore[operator]
        return layer

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {**super().to_hf_dict(targets, module_names), "use_dora": True}


LORA_VARIANTS["use_dora"] = DoRA
