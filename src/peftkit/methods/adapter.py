"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placement.

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019
(https://arxiv.org/abs/1902.00751); Pfeiffer et al., "AdapterFusion", EACL 2021
(https://arxiv.org/abs/2005.00247); He et al., "Towards a Unified View of Parameter-Efficient Transfer
Learning", ICLR 2022 (https://arxiv.org/abs/2110.04366).

An adapter is a bottleneck MLP, d → m → d with m = d / reduction_factor::

    A(h) = W_up σ(W_down h + b_down) + b_up          W_up, b_up start at 0, so A ≡ 0 at first

    serial   (Houlsby: after the attention output and the FFN output; Pfeiffer: after the FFN only)
             h ↦ h + A(h)              applied to the sub-layer's output, before its residual add
    parallel (He et al.: beside the FFN block)
             x ↦ FFN(x) + s·A(x)

A serial adapter has a non-linearity between its projections, and a parallel one reads the block's
input, so neither can be folded into a weight: ``merge`` is an error saying so. The blocks are found
through a small per-architecture table (Llama family, GPT-2, T5, BERT family) or given as
``target_modules``. Tensors: ``<module>.adapter_down.weight`` etc., ``peft_type: "BOTTLENECK"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match, layer_index
from peftkit.core.registry import linear_kind, register_method
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.lora import hf_resolve, hf_targets
from peftkit.methods.lora_layers import adapter_dtype

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
                                           "swish": nn.SiLU}

# Where the adapters go, as regexes searched in qualified names (used until the role tables land):
# attention output projection, FFN output projection, FFN block (parallel). BERT's FFN block is
# ``BertOutput(h, input_tensor)``: the parallel adapter reads ``input_tensor``, its second argument.
_LLAMA = {"attn": r"\.self_attn\.o_proj$", "ffn": r"\.mlp\.down_proj$", "block": r"\.layers\.\d+\.mlp$"}
_BERT = {"attn": r"\.attention\.output\.dense$", "ffn": r"\.layer\.\d+\.output\.dense$",
         "block": r"\.layer\.\d+\.output$"}
SITES: dict[str, dict[str, str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "gpt2": {"attn": r"\.attn\.c_proj$", "ffn": r"\.mlp\.c_proj$", "block": r"\.h\.\d+\.mlp$"},
    "t5": {"attn": r"\.(SelfAttention|EncDecAttention)\.o$", "ffn": r"\.DenseReluDense\.wo$",
           "block": r"\.DenseReluDense$"},
}
_RESIDUAL_INPUT_BLOCKS = {r"\.layer\.\d+\.output$"}  # blocks whose second argument is the FFN input


def _out_features(module: nn.Module) -> int:
    """The width of ``module``'s output: its own, or that of its last linear-like descendant."""
    last = None
    for sub in module.modules():
        if linear_kind(sub) is not None:
            last = sub
    kind = linear_kind(last) if last is not None else None
    if kind is None:
        raise ConfigError(f"cannot tell the output width of {type(module).__name__}; target a linear layer or "
                          "a block that ends in one")
    return kind.out_features(last)


class BottleneckLayer(AdapterLayer):
    """Serial (``h + A(h)`` on the output) or parallel (``f(x) + s·A(x)``) bottleneck adapters on one module."""

    adapter_containers = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, mode: str) -> None:
        super().__init__(base_layer)
        #: ``"serial"``, ``"parallel"`` or ``"parallel_residual"`` (input = the second argument).
        self.mode = mode
        self.dim = _out_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, size: int, activation: str, scaling: float) -> None:
        ref = next(self.base_layer.parameters())
        factory: dict[str, Any] = {"device": ref.device, "dtype": adapter_dtype(ref)}
        down = nn.Linear(self.dim, size, **factory)
        up = nn.Linear(size, self.dim, **factory)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # A ≡ 0: the adapted model starts as the base model
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACTIVATIONS[activation]()
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        if name in self.adapter_act:
            del self.adapter_act[name]

    def bottleneck(self, h: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Σ s·A(h) over ``names``."""
        total: torch.Tensor | None = None
        for name in names:
            down, up = self.adapter_down[name], self.adapter_up[name]
            out = up(self.adapter_act[name](down(h.to(down.weight.dtype)))) * self.scaling[name]
            total = out if total is None else total + out
        assert total is not None
        return total.to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        if not names:
            return self.base_layer(*args, **kwargs)
        if self.mode == "parallel_residual":  # BertOutput(h, input_tensor): add A(x) beside the residual
            x = args[1]
            return self.base_layer(args[0], x + self.bottleneck(x, names), *args[2:], **kwargs)
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.bottleneck(args[0] if self.mode == "parallel" else h, names)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        raise MergeError(
            f"the bottleneck adapters {list(names)} at {where or type(self.base_layer).__name__} cannot be merged: "
            f"a {self.mode} adapter applies a non-linearity ({self.mode} A(h) = W_up σ(W_down h)) that no weight "
            "matrix can absorb. Keep it unmerged (it is small) or use LoRA/IA3 for a mergeable adapter."
        )


@register_method
@dataclass
class Adapter(AdapterConfig):
    """Bottleneck adapters.

    Attributes:
        placement: ``"houlsby"`` (after attention and after the FFN), ``"pfeiffer"`` (after the FFN) or
            ``"parallel"`` (beside the FFN block).
        bottleneck_size: the bottleneck width m; default ``hidden // reduction_factor``.
        reduction_factor: d / m when ``bottleneck_size`` is not given.
        activation: ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"`` / ``"swish"``.
        scaling: s, the factor on the adapter's output (He et al. use 4 for parallel adapters).
        target_modules: optional; the modules to wrap instead of the architecture table (serial: the
            sub-layer output projections; parallel: the FFN blocks).
    """

    peft_type = "BOTTLENECK"

    placement: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: int = 16
    activation: str = "relu"
    scaling: float = 1.0
    modes: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement={self.placement!r} must be one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        for name in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling!r} must be a finite number")

    def size_for(self, dim: int) -> int:
        return self.bottleneck_size or max(1, dim // self.reduction_factor)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, BottleneckLayer) or not isinstance(module, AdapterLayer)

    def supported_layer_names(self) -> list[str]:
        return ["any module whose output is a hidden-state tensor"]

    def resolve(self, model: nn.Module) -> list[str]:
        default = "parallel" if self.placement == "parallel" else "serial"
        if self.target_modules:
            targets = super().resolve(model)
            self.modes = {t: self.modes.get(t, default) for t in targets}
            return targets
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        sites = SITES.get(str(model_type))
        if sites is None:
            raise ConfigError(
                f"no adapter placement table for model_type={model_type!r} (known: {sorted(SITES)}); pass "
                "target_modules naming the attention/FFN output projections (serial) or the FFN blocks (parallel)"
            )
        keys = {"houlsby": ["attn", "ffn"], "pfeiffer": ["ffn"], "parallel": ["block"]}[self.placement]
        modes: dict[str, str] = {}
        for name, _ in iter_modules(model):
            for key in keys:
                if re.search(sites[key], "." + name):
                    residual = key == "block" and sites[key] in _RESIDUAL_INPUT_BLOCKS
                    modes[name] = "parallel_residual" if residual else default
        if self.exclude_modules:
            modes = {n: m for n, m in modes.items() if first_match(n, list(self.exclude_modules)) is None}
        if self.layers is not None:
            modes = {n: m for n, m in modes.items() if layer_index(n, list(self.layers_pattern)) in set(self.layers)}
        if not modes:
            raise TargetNotFoundError(f"no {self.placement} adapter site found in {type(model).__name__}")
        self.modes = modes
        return list(modes)

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        mode = self.modes.get(qualname, "parallel" if self.placement == "parallel" else "serial")
        if isinstance(module, BottleneckLayer):
            if module.mode != mode:
                raise ConfigError(f"{qualname} already holds a {module.mode} adapter; cannot add a {mode} one")
            layer = module
        else:
            layer = BottleneckLayer(module, mode)
        layer.add(adapter_name, self.size_for(layer.dim), self.activation, self.scaling)
        return layer

    # -- adapter_config.json (our own peft_type) ---------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "placement": self.placement,
            "bottleneck_size": self.bottleneck_size,
            "reduction_factor": self.reduction_factor,
            "activation": self.activation,
            "scaling": self.scaling,
            "target_modules": hf_targets(targets, module_names),
            "residual_input_modules": sorted(t for t in targets if self.modes.get(t) == "parallel_residual"),
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> Adapter:
        targets = hf_resolve(data.get("target_modules"), module_names)
        config = cls(
            placement=data.get("placement", "houlsby"),
            bottleneck_size=data.get("bottleneck_size"),
            reduction_factor=int(data.get("reduction_factor", 16)),
            activation=data.get("activation", "relu"),
            scaling=float(data.get("scaling", 1.0)),
            target_modules=targets,
            modules_to_save=data.get("modules_to_save") or (),
            task_type=data.get("task_type"),
        )
        config.modes = {t: "parallel_residual" for t in data.get("residual_input_modules") or []}
        return config
