"""BitFit: train only the bias terms (optionally the normalisation layers' gain and shift too).

Paper: Ben Zaken, Goldberg and Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022 (https://arxiv.org/abs/2106.10199).

For a frozen layer f(x; W₀, b₀) and adapters i with trained biases bᵢ (initialised to b₀)::

    x ↦ f(x; W₀, b₀ + Σᵢ (bᵢ − b₀))          (one adapter: exactly f(x; W₀, b₁))

Each adapter keeps its own copy of the biases it trains, so several BitFit adapters live side by side
and ``disable_adapters`` gives the base output exactly. Merging writes the trained biases into the base
layer (the original values are kept for ``unmerge``). The adapter file holds only these tensors, under
the module's own keys (``base_model.model.<path>.bias``), with ``peft_type: "BITFIT"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match
from peftkit.core.registry import register_method
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.io.hf_names import hf_resolve, hf_targets
from peftkit.methods.lora_layers import adapter_dtype

#: Adapter container → the base parameter it stands for.
_PARAMS = {"bitfit_bias": "bias", "bitfit_weight": "weight"}


def is_norm(module: nn.Module) -> bool:
    """LayerNorm-like modules: ``nn.LayerNorm``/``GroupNorm`` and models' own (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


def _own_param(module: nn.Module, key: str) -> nn.Parameter | None:
    value = module._parameters.get(key)
    return value if isinstance(value, nn.Parameter) else None


class BitFitLayer(AdapterLayer):
    """A module whose bias (and, for norms, weight) is replaced by per-adapter trained copies."""

    adapter_containers = tuple(_PARAMS)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.bitfit_weight = nn.ParameterDict()

    @property
    def original(self) -> dict[str, torch.Tensor]:
        """The base values before any merge (deltas are measured from these), as non-persistent buffers."""
        return {key: buf for key in _PARAMS.values() if (buf := self._buffers.get(f"original_{key}")) is not None}

    def add(self, name: str, with_weight: bool) -> None:
        for attr, key in _PARAMS.items():
            base = _own_param(self.base_layer, key)
            if base is None or (key == "weight" and not with_weight):
                continue
            if key not in self.original:
                self.register_buffer(f"original_{key}", base.detach().clone(), persistent=False)
            getattr(self, attr)[name] = nn.Parameter(base.detach().clone().to(adapter_dtype(base)))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # Saved under the module's own parameter names: ``<path>.bias``, ``<path>.weight``.
        return {key: getattr(self, attr)[name] for attr, key in _PARAMS.items() if name in getattr(self, attr)}

    def _combined(self, names: Sequence[str], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``start`` plus each adapter's change from the original values."""
        out: dict[str, torch.Tensor] = {}
        for attr, key in _PARAMS.items():
            table = getattr(self, attr)
            own = [table[n] for n in names if n in table]
            if not own:
                continue
            base = start[key]
            if len(own) == 1 and base is self.original.get(key):
                out[key] = own[0].to(base.dtype)  # exactly the trained tensor
            else:
                out[key] = (base + sum(p - self.original[key] for p in own)).to(base.dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        if not names:
            return self.base_layer(*args, **kwargs)
        current = {k: getattr(self.base_layer, k) for k in self.original}
        if not self.merged_adapters:
            current = dict(self.original)
        return functional_call(self.base_layer, self._combined(names, current), args, kwargs, strict=False)

    def _write_base(self, merged: Sequence[str]) -> None:
        values = self._combined(merged, self.original) if merged else {}
        with torch.no_grad():
            for key, original in self.original.items():
                getattr(self.base_layer, key).copy_(values.get(key, original))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        for name in todo:
            if safe:
                for tensor in self.adapter_tensors(name).values():
                    self.check_finite(tensor.detach(), where or type(self.base_layer).__name__, name)
        self.merged_adapters.extend(todo)
        self._write_base(self.merged_adapters)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        self.merged_adapters = [n for n in self.merged_adapters if names is not None and n not in names]
        self._write_base(self.merged_adapters)


def found_saved(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules ``modules_to_save`` selects."""
    return [n for n, _ in iter_modules(model) if n and first_match(n, list(patterns)) is not None] if patterns else []


@register_method
@dataclass
class BitFit(AdapterConfig):
    """Train only biases: ``target_modules="all"`` (every module with a bias) or patterns.

    Attributes:
        train_norms: also train the weight (gain) and bias of LayerNorm-like modules among the targets
            (with ``"all"``: every norm of the model, including bias-free RMSNorms).
    """

    peft_type = "BITFIT"

    target_modules: str | Sequence[str] = field(default="all", kw_only=True)
    train_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.train_norms, bool):
            raise ConfigError(f"train_norms={self.train_norms!r} must be True or False")

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, BitFitLayer):
            return True
        if isinstance(module, AdapterLayer):
            return False
        return _own_param(module, "bias") is not None or (self.train_norms and is_norm(module))

    def supported_layer_names(self) -> list[str]:
        return ["any module with its own bias parameter"] + (["LayerNorm/RMSNorm"] if self.train_norms else [])

    def resolve(self, model: nn.Module) -> list[str]:
        if list(self.target_modules) != ["all"]:
            return super().resolve(model)
        # Modules trained in full (``modules_to_save``, e.g. a classifier) are not BitFit's to wrap.
        found = [n for n, m in iter_modules(model) if n and self.supports(m)
                 and first_match(n, list(self.modules_to_save)) is None
                 and not any(n.startswith(f"{s}.") for s in found_saved(model, self.modules_to_save))]
        if self.layers is not None or self.exclude_modules:
            found = self.replace(target_modules=found).resolve(model) if found else []
        if not found:
            raise TargetNotFoundError(
                f"{type(model).__name__} has no bias parameters{' or norms' if self.train_norms else ''} "
                f"to train (after exclude_modules/layers); BitFit trains biases only. Use train_norms=True to "
                "train the normalisation layers, or a method that adds parameters (LoRA, IA3)."
            )
        return found

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, BitFitLayer) else BitFitLayer(module)
        layer.add(adapter_name, with_weight=self.train_norms and is_norm(layer.base_layer))
        if not layer.has_adapter(adapter_name):
            raise ConfigError(f"{qualname} has no bias to train; remove it from target_modules")
        return layer

    # -- adapter_config.json (our own peft_type, HF PEFT's field names) ----------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "target_modules": hf_targets(targets, module_names),
            "train_norms": self.train_norms,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> BitFit:
        return cls(
            target_modules=hf_resolve(data.get("target_modules"), module_names) or "all",
            train_norms=bool(data.get("train_norms", False)),
            modules_to_save=data.get("modules_to_save") or (),
            task_type=data.get("task_type"),
        )

