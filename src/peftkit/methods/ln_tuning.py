"""LayerNorm tuning: train a copy of the model's normalisation layers, nothing else.

Paper: Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", ICLR 2024
(https://arxiv.org/abs/2312.11420).

Each targeted module f(x; θ₀) gets a trainable copy per adapter, starting at θ₀, and computes with the
active adapter's copy instead::

    x ↦ f(x; θ_adapter)          (disabled or no active adapter: f(x; θ₀))

As in Hugging Face PEFT, one adapter per layer computes at a time (several active ones on a layer are refused)
and merging writes the copy's parameters and buffers into the module (unmerging restores the originals); one
adapter per layer may be merged. The targets are LayerNorm/RMSNorm modules by default (HF PEFT's defaults per
architecture when ``target_modules`` is omitted), but, as in HF PEFT, any module with parameters can be
targeted. File keys follow HF PEFT: ``base_model.model.<path>.ln_tuning_layers.weight`` (``.bias``, buffers).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.errors import AdapterStateError, MergeError
from peftkit.io.hf_names import hf_modules_to_save, hf_resolve, hf_targets
from peftkit.methods.default_targets import default_for

_LLAMA = ("input_layernorm", "post_attention_layernorm", "norm")
_GEMMA2 = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "norm")
#: model_type → LN tuning's default target_modules (HF PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).
LN_TUNING_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA, "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "llava": ("multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"),
    "t5": ("layer_norm", "final_layer_norm"), "mt5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"), "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"), "gptj": ("ln_1", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"), "mistral": _LLAMA,
    "phi": ("input_layernorm", "final_layernorm"), "gemma": _LLAMA, "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "qwen2": ("post_attention_layernorm",), "qwen3": ("post_attention_layernorm",),
}


class LNTuningLayer(AdapterLayer):
    """A module computed with the active adapter's trained copy of it."""

    adapter_containers = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        #: The base module's own tensors while an adapter is merged into it (``unmerge`` writes them back).
        self.unmerged_state: dict[str, torch.Tensor] = {}

    def add(self, name: str) -> None:
        self.ln_tuning_layers[name] = copy.deepcopy(self.base_layer)  # same dtype and device, as in HF PEFT

    def check_active(self, names: Sequence[str], where: str = "") -> None:
        if len(names) > 1:
            raise AdapterStateError(
                f"LN tuning adapters {list(names)} both hold a copy of {where or 'this layer'}; one of them computes "
                "at a time (as in HF PEFT), so activate one"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        module = self.ln_tuning_layers[names[0]] if names else self.base_layer  # check_active: at most one
        return module(*args, **kwargs)

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        held = [n for n in (*self.merged_adapters, *names) if self.has_adapter(n)]
        if len(set(held)) > 1:
            raise MergeError(
                f"LN tuning adapters {sorted(set(held))} at {where or 'this layer'} would all replace its tensors; "
                "merge one (unmerge the other first), as HF PEFT does"
            )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        for name in todo:
            trained = self.ln_tuning_layers[name].state_dict()
            if safe:
                for value in trained.values():
                    if value.is_floating_point():
                        self.check_finite(value, where or type(self.base_layer).__name__, name)
            own = self.base_layer.state_dict(keep_vars=True)
            self.unmerged_state = {key: value.detach().clone() for key, value in own.items()}
            _write(own, trained)
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        if not self.merged_adapters or (names is not None and self.merged_adapters[0] not in names):
            return
        _write(self.base_layer.state_dict(keep_vars=True), self.unmerged_state)
        self.unmerged_state = {}
        self.merged_adapters = []


def _write(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(values[key])


@register_method
@dataclass
class LNTuning(AdapterConfig):
    """LayerNorm tuning: a trained copy of each targeted module (by default the architecture's norms)."""

    peft_type = "LN_TUNING"

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: the norms HF PEFT's LN tuning adapts on this architecture."""
        if self.target_modules:
            return self
        targets = default_for(LN_TUNING_TARGETS, model, "LNTuning", "target_modules=[...]", norms=True)
        return self.replace(target_modules=list(targets))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, LNTuningLayer):
            return True
        nested = any(isinstance(m, AdapterLayer) for m in module.modules())
        return not nested and next(module.parameters(), None) is not None

    def supported_layer_names(self) -> list[str]:
        return ["LayerNorm/RMSNorm (any module with parameters)"]

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, LNTuningLayer) else LNTuningLayer(module)
        layer.add(adapter_name)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "target_modules": hf_targets(targets, module_names),
            "exclude_modules": None,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            **self.extra,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> LNTuning:
        return cls(
            target_modules=hf_resolve(data.get("target_modules"), module_names),  # none: the architecture's
            exclude_modules=hf_resolve(data.get("exclude_modules"), module_names),
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            task_type=data.get("task_type"),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type target_modules exclude_modules modules_to_save inference_mode".split()
)
