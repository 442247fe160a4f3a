"""GLoRA: a generalized prompt module that scales and shifts a linear layer's weight and bias.

Paper: Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning", 2023
(https://arxiv.org/abs/2306.07967).

Each adapted ``nn.Linear`` with weight W₀ (out × in) and bias b₀ trains five support tensors A, B, C, D, E::

    W = W₀ + W₀ ⊙ A + B,        b = b₀ + b₀ ⊙ D + E + W₀ C
    x ↦ W₀x + b₀ + (W₀ ⊙ A + B) x + (b₀ ⊙ D + E + W₀ C)

Each support has a form chosen per adapter: ``"lora"`` (X_d X_u, of rank r), ``"vector"`` (one value per row, a
column broadcast along the row), ``"constant"`` (one scalar) or ``"none"`` (zero). A and B share ``config_A_B``,
C (in × 1) takes ``config_C``, D and E (out) share ``config_D_E``. On a layer without a bias, C, D and E are zero.
Files hold HF PEFT 0.21.2's (``GLORA``) keys: ``…<layer>.glora_A.Xd``/``.Xu`` (low rank), ``.X`` (vector or
constant) and, as HF PEFT writes them, the zero tensors of the ``"none"`` supports (``.zeros``). Initialisation
draws from torch's global generator in HF PEFT's order, so the same seed gives the same tensors.

Merging writes W and b into the base layer. Several merged adapters each add their change computed from the
original W₀ and b₀ (HF PEFT's semantics); peftkit keeps the original weight and bias while any adapter is merged, so
unmerging restores them exactly instead of dividing by 1 + ΣA as HF PEFT does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype

FORMS_A_B = ("lora", "vector", "constant", "none")
FORMS_C = ("lora", "vector", "none")
FORMS_D_E = ("vector", "constant", "none")
BIAS_MODES = ("none", "all", "glora_only")


def _kaiming(tensor: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LowRank(nn.Module):
    """``Xd @ Xu``: (rows × r)(r × cols). Xu is drawn first, then Xd (zero when ``zero``), as HF PEFT draws them."""

    def __init__(self, rows: int, cols: int, r: int, zero: bool) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        _kaiming(self.Xu)
        if not zero:
            _kaiming(self.Xd)

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class Vector(nn.Module):
    """One value per output feature: a column (n × 1) for A, B and C, a row (n,) for D and E."""

    def __init__(self, n: int, column: bool, zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros((n, 1) if column else (n,)))
        if not zero:  # HF PEFT's fan-in: 1 for a column, n for a row
            _kaiming(self.X if column else self.X.data.unsqueeze(0))

    def forward(self) -> torch.Tensor:
        return self.X


class Constant(nn.Module):
    """One scalar; N(0, 0.02²) when not ``zero``."""

    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        if not zero:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class Zero(nn.Module):
    """A support switched off. Holds a zero buffer of its full shape because HF PEFT saves one (``….zeros``)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return cast(torch.Tensor, self.zeros)


def _support(form: str, rows: int, cols: int, r: int, zero: bool, column: bool = True) -> nn.Module:
    """The support of ``form`` for a (rows × cols) tensor (cols 0: a bias-shaped row)."""
    if form == "lora":
        return LowRank(rows, cols, r, zero)
    if form == "vector":
        return Vector(rows, column, zero)
    if form == "constant":
        return Constant(zero)
    return Zero(rows, cols) if cols else Zero(rows)


class GLoRALayer(DeltaLayer):
    """GLoRA on a plain ``nn.Linear``: ``base(x) + x ΔWᵀ + Δb`` with ΔW = W₀⊙A + B, Δb = b₀⊙D + E + W₀C.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not exactly ``nn.Linear`` (HF PEFT adapts nothing else).
    """

    adapter_containers = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        if type(base_layer) is not nn.Linear:
            raise UnsupportedLayerError(f"GLoRA cannot adapt a {type(base_layer).__name__}; it adapts plain "
                                        "nn.Linear layers only (as HF PEFT)")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ModuleDict())
        self.r: dict[str, int] = {}
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # W₀, b₀ while merged

    def add(self, name: str, config: GLoRA) -> None:
        """Add adapter ``name`` with ``config``'s forms, drawing A, B, C, D, E in HF PEFT's order."""
        out, inp, r, zero = self.out_features, self.in_features, config.rank, config.init_weights
        has_bias = self.base_layer.bias is not None
        supports = {
            "glora_A": _support(config.config_A_B, out, inp, r, zero),
            "glora_B": _support(config.config_A_B, out, inp, r, zero),
            "glora_C": _support(config.config_C if has_bias else "none", inp, 1, r, zero),
            "glora_D": _support(config.config_D_E if has_bias else "none", out, 0, r, zero, column=False),
            "glora_E": _support(config.config_D_E if has_bias else "none", out, 0, r, zero, column=False),
        }
        weight = self.weight
        for attr, module in supports.items():
            # Rounded to the base dtype, then the trained tensors kept in fp32 over half precision (as HF PEFT)
            module.to(weight.device, weight.dtype)
            for p in module.parameters():
                p.data = p.data.to(adapter_dtype(weight))
            cast(nn.ModuleDict, getattr(self, attr))[name] = module
        self.r[name] = r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.r.pop(name, None)

    def _part(self, attr: str, name: str) -> torch.Tensor:
        """Support ``attr`` of adapter ``name`` in the base weight's dtype (as HF PEFT computes)."""
        return cast(torch.Tensor, cast(nn.ModuleDict, getattr(self, attr))[name]()).to(self.weight.dtype)

    def _changes(self, name: str, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapter ``name``'s (ΔW, Δb) over the original ``weight`` and ``bias`` (differentiable)."""
        delta_w = weight * self._part("glora_A", name) + self._part("glora_B", name)
        if bias is None:
            return delta_w, None
        delta_b = (bias * self._part("glora_D", name) + self._part("glora_E", name)
                   + (weight @ self._part("glora_C", name)).squeeze(-1))
        return delta_w, delta_b

    def _delta(self, name: str) -> torch.Tensor:
        return self._changes(name, self.weight, self.bias)[0]

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        delta_w, delta_b = self._changes(name, self.weight, self.bias)
        return F.linear(x.to(delta_w.dtype), delta_w, delta_b)

    # -- merging: every merged adapter's change is computed from the original W₀ and b₀ ------------
    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        new = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        if new:
            self._fold(self.merged_adapters + new, safe, where)
            self.merged_adapters.extend(new)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        keep = [n for n in self.merged_adapters if names is not None and n not in names]
        self._fold(keep, False, "")
        self.merged_adapters = keep

    def _fold(self, names: list[str], safe: bool, where: str) -> None:
        """Set the base weight and bias to W₀ and b₀ plus the changes of adapters ``names``."""
        base = cast(nn.Linear, self.base_layer)
        if self._original is None:
            self._original = (base.weight.detach().clone(),
                              None if base.bias is None else base.bias.detach().clone())
        weight, bias = self._original
        new_w, new_b = weight.clone(), None if bias is None else bias.clone()
        with torch.no_grad():
            for name in names:
                delta_w, delta_b = self._changes(name, weight, bias)
                new_w += delta_w.to(new_w.dtype)
                if new_b is not None and delta_b is not None:
                    new_b += delta_b.to(new_b.dtype)
        if safe:
            self.check_finite(new_w if new_b is None else torch.cat([new_w.flatten(), new_b]),
                              where or "nn.Linear", ", ".join(names))
        base.weight.data = new_w
        if new_b is not None:
            cast(torch.Tensor, base.bias).data = new_b
        if not names:
            self._original = None


@register_method
@dataclass
class GLoRA(AdaptedBiases, AdapterConfig):
    """GLoRA: weight and bias scaled and shifted by five supports per layer.

    Attributes:
        rank: r, the rank of every ``"lora"`` support (HF PEFT's ``r``).
        config_A_B: form of A (scales W₀) and B (shifts W₀): ``"lora"``, ``"vector"``, ``"constant"`` or ``"none"``.
        config_C: form of C (in × 1; adds W₀C to the bias): ``"lora"``, ``"vector"`` or ``"none"``.
        config_D_E: form of D (scales b₀) and E (shifts b₀): ``"vector"``, ``"constant"`` or ``"none"``.
        init_weights: start as the unchanged model (Xd, vectors and constants zero; Xu drawn); ``False`` draws them
            all (Kaiming-uniform, constants N(0, 0.02²)).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"glora_only"`` (the biases of
            the adapted layers).
    """

    peft_type = "GLORA"
    bias_layer = GLoRALayer
    bias_only = "glora_only"

    rank: int = 8
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank={self.rank!r} must be a positive integer (e.g. 8)")
        for field_name, allowed in (("config_A_B", FORMS_A_B), ("config_C", FORMS_C), ("config_D_E", FORMS_D_E),
                                    ("bias", BIAS_MODES)):
            if getattr(self, field_name) not in allowed:
                raise ConfigError(f"{field_name}={getattr(self, field_name)!r} must be one of {allowed}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for this architecture (HF PEFT's mapping)."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second GLoRA adapter only
            return isinstance(module, GLoRALayer)
        return type(module) is nn.Linear

    def supported_layer_names(self) -> list[str]:
        return ["Linear"]

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, GLoRALayer) else GLoRALayer(module)
        layer.add(adapter_name, self)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules", "layers_to_transform", "layers_pattern"),
            r=self.rank,
            bias=self.bias,
            config_A_B=self.config_A_B,
            config_C=self.config_C,
            config_D_E=self.config_D_E,
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> GLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "GLoRA")
        return cls(
            **hf_layer_fields(data, module_names),
            rank=data.get("r", 8),
            config_A_B=data.get("config_A_B", "lora"),
            config_C=data.get("config_C", "lora"),
            config_D_E=data.get("config_D_E", "constant"),
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type r target_modules bias modules_to_save config_A_B config_C config_D_E init_weights "
    "inference_mode base_model_name_or_path revision auto_mapping peft_version".split()
)
