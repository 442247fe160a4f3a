"""BEFT: bias-efficient fine-tuning, a trained bias vector added to each adapted layer's output.

Paper: "BEFT: Bias-Efficient Fine-Tuning of Language Models" (https://arxiv.org/abs/2509.15974). Hugging Face PEFT
0.21.2's ``BEFT`` is the reference for everything below.

Each adapted linear layer (out features) trains one vector b ∈ ℝ^(1 × out), HF PEFT's ``beft_bias``::

    x ↦ W₀x + b₀ + Σ_k b_k        over the active adapters k (summed first, then added, as in HF PEFT)

The paper finds the value projections' biases the ones worth training, so without ``target_modules`` the value
projections are adapted (HF PEFT's mapping). b starts at zero (``init_weights=True``, the unchanged model); it is
always drawn standard normal from torch's global generator first, as HF PEFT draws it, so ``init_weights=False`` and
the generator's later draws match HF PEFT's. Over a half-precision base b is rounded to its dtype and kept in fp32, as
HF PEFT does. Merging adds b to the base layer's own bias (b₀ ← b₀ + b) and needs one: a layer without a bias is
refused, as HF PEFT refuses it. ``nn.Linear`` and quantized linear layers (HF PEFT: ``nn.Linear`` and its
subclasses, bitsandbytes' linears among them; not GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LinearKind, linear_kind, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.additive import merge_deltas, unmerge_deltas
from peftkit.methods.default_targets import with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.miss import is_linear, supported_names

_V = ("v_proj",)
#: model_type → BEFT's default target_modules: the value projections (HF PEFT's BEFT mapping).
BEFT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("v",), "mt5": ("v",), "roberta": ("value",), "bert": ("value",), "deberta-v2": ("value_proj",),
    **{kind: _V for kind in ("opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma",
                             "gemma2", "gemma3_text", "qwen2", "qwen3")},
}


class BEFTLayer(AdapterLayer):
    """BEFT adapters on an ``nn.Linear`` or a quantized linear layer: ``base(x) + Σ b_k``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type (GPT-2's ``Conv1D`` included, as in HF PEFT).
    """

    adapter_containers = ("beft_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear(base_layer):
            raise UnsupportedLayerError(f"BEFT cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(supported_names())}")
        super().__init__(base_layer)
        self.out_features = cast(LinearKind, linear_kind(base_layer)).out_features(base_layer)
        self.beft_bias = nn.ParameterDict()

    def add(self, name: str, init_weights: bool = True) -> None:
        """Add adapter ``name``: b drawn from N(0, 1) on the CPU as HF PEFT draws it, then zeroed (``init_weights``)."""
        bias = torch.randn(1, self.out_features)  # drawn whatever init_weights, as HF PEFT does
        if init_weights:
            bias.zero_()
        weight = cast(LinearKind, linear_kind(self.base_layer)).weight(self.base_layer)
        stored = getattr(self.base_layer, "weight", None)
        if isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point:
            bias = bias.to(stored.dtype)
        self.beft_bias[name] = nn.Parameter(bias.to(weight.device, adapter_dtype(weight)))

    def added_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        """Σ b over adapters ``names``, flattened to (out,) (differentiable), or ``None`` for no adapter."""
        total: torch.Tensor | None = None
        for name in names:
            bias = self.beft_bias[name].flatten()
            total = bias if total is None else total + bias
        return total

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        added = self.added_bias(self._applied())
        return result if added is None else (result + added).to(result.dtype)

    # -- merging: b₀ ← b₀ ± b -------------------------------------------------------------------------
    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        if getattr(self.base_layer, "bias", None) is None:
            raise MergeError(
                f"BEFT adapters {list(names)} at {where or type(self.base_layer).__name__} cannot be merged: the layer "
                "has no bias to add them to (HF PEFT refuses this too). Keep them unmerged (pk.unload(model, "
                "merge=False) drops them), or target layers with a bias"
            )

    @torch.no_grad()
    def _fold(self, name: str, sign: float, safe: bool = False, where: str = "") -> None:
        base_bias = cast(torch.Tensor, self.base_layer.bias)
        updated = base_bias + sign * self.beft_bias[name].flatten()  # computed in fp32 over a half base, rounded once
        if safe:
            self.check_finite(updated, where or type(self.base_layer).__name__, name)
        base_bias.copy_(updated.to(base_bias.dtype))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)
        merge_deltas(self, names, safe, where, fold=self._fold)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names, fold=self._fold)


#: ``adapter_config.json`` fields of BEFT (besides HF PEFT's bookkeeping).
_HF_FIELDS = frozenset("init_weights target_modules modules_to_save".split())


@register_method
@dataclass
class BEFT(AdapterConfig):
    """BEFT: a trained bias vector added to each adapted layer's output (HF PEFT's ``BeftConfig``, its field names
    and defaults).

    Attributes:
        init_weights: ``True`` (HF PEFT's default): b = 0, the model unchanged at first; ``False``: b ~ N(0, 1),
            which HF PEFT discourages.

    Without ``target_modules`` the architecture's value projections are adapted, as in HF PEFT.

    Raises:
        ConfigError: a field of the wrong type (named with its value); in ``pk.apply``, an architecture without
            default targets when ``target_modules`` is omitted.
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear`` or a quantized linear layer.
    """

    peft_type = "BEFT"

    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False (True: start from b = 0)")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: the value projections HF PEFT's BEFT adapts on this architecture."""
        return with_default_targets(self, model, BEFT_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second BEFT adapter only
            return isinstance(module, BEFTLayer)
        return is_linear(module)

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, BEFTLayer) else BEFTLayer(module)
        layer.add(adapter_name, self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules", "layers_to_transform", "layers_pattern"),
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> BEFT:
        unknown = hf_unknown_options(data, _HF_FIELDS, "BEFT")
        return cls(
            **hf_layer_fields(data, module_names),
            init_weights=bool(data.get("init_weights", True)),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
