"""DeLoRA: low-rank adaptation with normalised factors and a learnable bound on the update's strength.

Paper: Bini, Girrbach and Akata, "Decoupling Angles and Strength in Low-rank Adaptation", ICLR 2025
(https://arxiv.org/abs/2503.18225).

Each adapted ``nn.Linear`` with weight W₀ (out × in) trains factors A (r × in), B (out × r) and one scalar λ. Every
rank-1 term bᵢaᵢᵀ is normalised to unit norm, so the factors give the update's direction only and λ its strength,
on the scale of W₀'s input-column norms w (‖W₀[:, j]‖, taken once when the adapter is created and kept with it)::

    x ↦ W₀x + ΔW dropout(x),      ΔW = (λ/r) · B Ξ A diag(w),      Ξ = diag(1 / (‖aᵢ‖ ‖bᵢ‖))

(norms clamped below at 1e-4), so each column obeys ‖ΔW[:, j]‖ ≤ |λ|·‖W₀[:, j]‖ whatever A and B. As in Hugging Face
PEFT 0.21.2 (``DELORA``): A starts kaiming-uniform and B at zero (the unchanged model; ``init_weights=False`` draws B
like A), from torch's global generator in HF PEFT's order, rounded to a half-precision base's dtype and kept in fp32;
λ starts at ``delora_lambda``; the forward runs in low rank, ((dropout(x) ⊙ w) Aᵀ ⊙ diag(Ξ)·λ/r) Bᵀ. Files hold
``…<layer>.delora_A``, ``delora_B``, ``delora_lambda`` and the frozen ``delora_w_norm``. ``module_dropout`` is, as
HF PEFT applies it, dropout on the adapter branch's input. Merging adds ΔW to the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import check_pattern_keys, first_match
from peftkit.core.registry import DEQUANTIZERS, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_pattern, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.vera import SharedProjection, _checked_bool, _checked_int

BIAS_MODES = ("none", "all", "delora_only")
#: The smallest factor norm divided by (HF PEFT's clamp): a zero row of A or column of B gives no update, not NaN.
MIN_NORM = 1e-4


def _supported(module: nn.Module) -> bool:
    """A float ``nn.Linear`` (HF PEFT 0.21.2's DeLoRA adapts no other layer type)."""
    return isinstance(module, nn.Linear) and DEQUANTIZERS.lookup(type(module)) is None


class DeLoRALayer(DeltaLayer):
    """DeLoRA on an ``nn.Linear``: ``base(x) + dropout(x) ΔWᵀ``, computed in low rank.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    adapter_containers = ("delora_A", "delora_B", "delora_lambda")

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"DeLoRA cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear only "
                                        "(as HF PEFT 0.21.2)")
        super().__init__(base_layer)
        linear = cast(nn.Linear, base_layer)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        # w per adapter: frozen, in the model's state dict and the adapter file, as in HF PEFT.
        self.delora_w_norm = SharedProjection(persistent=True)
        self.dropout: dict[str, float] = {}

    def add(self, name: str, rank: int, delora_lambda: float, dropout: float, init_weights: bool) -> None:
        """Add adapter ``name`` of rank ``rank``, λ = ``delora_lambda``, w from the weight as it is now."""
        weight = cast(torch.Tensor, self.base_layer.weight)
        factor_a, factor_b = torch.empty(rank, self.in_features), torch.zeros(self.out_features, rank)
        nn.init.kaiming_uniform_(factor_a, a=math.sqrt(5))  # A, then B: HF PEFT's draws, in its order
        if not init_weights:
            nn.init.kaiming_uniform_(factor_b, a=math.sqrt(5))
        dtype = adapter_dtype(weight)

        def own(tensor: torch.Tensor) -> nn.Parameter:  # HF PEFT rounds to the base dtype, then keeps fp32 over half
            return nn.Parameter(tensor.to(weight.dtype).to(weight.device, dtype))

        self.delora_A[name], self.delora_B[name] = own(factor_a), own(factor_b)
        self.delora_lambda[name] = own(torch.full((1,), float(delora_lambda)))
        with torch.no_grad():
            self.delora_w_norm.add(name, torch.norm(weight.detach(), dim=0).to(dtype))
        self.dropout[name] = dropout

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.delora_w_norm.remove(name)
        self.dropout.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The trained tensors and, under HF PEFT's key, w (loading copies a file's w in)."""
        tensors = super().adapter_tensors(name)
        if name in self.delora_w_norm:
            tensors["delora_w_norm"] = self.delora_w_norm[name]
        return tensors

    def _scale(self, name: str) -> torch.Tensor:
        """(λ/r) / (‖aᵢ‖ ‖bᵢ‖) per rank-1 term, (r,) (differentiable)."""
        factor_a, factor_b = self.delora_A[name], self.delora_B[name]
        norms = factor_a.norm(dim=1).clamp(min=MIN_NORM) * factor_b.norm(dim=0).clamp(min=MIN_NORM)
        scale: torch.Tensor = self.delora_lambda[name] / factor_a.shape[0] / norms
        return scale

    def _delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``, (out, in), in the adapter's dtype (differentiable)."""
        delta: torch.Tensor = (self.delora_B[name] * self._scale(name)) @ self.delora_A[name]
        return delta * self.delora_w_norm[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        # The updates are summed in the output's dtype, then added: HF PEFT's order (the same rounding over bf16).
        update = torch.zeros_like(result)
        for name in names:
            factor_a = self.delora_A[name]
            h = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] > 0 else x
            h = F.linear(h.to(factor_a.dtype) * self.delora_w_norm[name], factor_a) * self._scale(name)
            update = (update + F.linear(h, self.delora_B[name])).to(result.dtype)
        return result + update


def _checked_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{key}={value!r} must be in [0, 1) (e.g. 0.05)")


def _checked_lambda(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number (the initial bound λ, e.g. 15)")


#: ``adapter_config.json`` fields of HF PEFT's DeloraConfig that select or compute something.
_HF_FIELDS = frozenset(
    "r delora_lambda module_dropout target_modules exclude_modules bias init_weights layers_to_transform "
    "layers_pattern rank_pattern lambda_pattern modules_to_save".split())


@register_method
@dataclass
class DeLoRA(AdaptedBiases, AdapterConfig):
    """DeLoRA: normalised low-rank factors and a trained bound λ per layer (HF PEFT's ``DeloraConfig``).

    Attributes:
        rank: r, the rank of A and B (HF PEFT: ``r``).
        delora_lambda: λ's initial value, the bound on the update: ‖ΔW[:, j]‖ ≤ |λ|·‖W₀[:, j]‖ for every input j.
            λ trains with A and B.
        module_dropout: dropout probability on the adapter branch's input during training, in [0, 1) (HF PEFT
            applies its ``module_dropout`` so, not by dropping whole modules).
        init_weights: ``True``: B = 0, the unchanged model at first; ``False``: B kaiming-uniform like A, so the
            model changes at once (for tests).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"delora_only"`` (the biases
            of the adapted layers).
        rank_pattern, lambda_pattern: per-module r and λ, keyed by patterns in the ``target_modules`` syntax.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a pattern key matching no module.
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear``.
    """

    peft_type = "DELORA"
    bias_layer = DeLoRALayer
    bias_only = "delora_only"

    rank: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        for key, value in self.rank_pattern.items():
            _checked_int(f"rank_pattern[{key!r}]", value, 1)
        _checked_lambda("delora_lambda", self.delora_lambda)
        for key, bound in self.lambda_pattern.items():
            _checked_lambda(f"lambda_pattern[{key!r}]", bound)
        _checked_fraction("module_dropout", self.module_dropout)
        _checked_bool("init_weights", self.init_weights)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's DeLoRA adapts on this architecture (LoRA's)."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second DeLoRA adapter only
            return isinstance(module, DeLoRALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return ["Linear"]

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        check_pattern_keys(model, "rank_pattern", self.rank_pattern)
        check_pattern_keys(model, "lambda_pattern", self.lambda_pattern)
        return targets

    def rank_for(self, qualname: str) -> int:
        key = first_match(qualname, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.rank

    def lambda_for(self, qualname: str) -> float:
        key = first_match(qualname, self.lambda_pattern)
        return self.lambda_pattern[key] if key is not None else self.delora_lambda

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, DeLoRALayer) else DeLoRALayer(module)
        layer.add(adapter_name, self.rank_for(qualname), self.lambda_for(qualname), self.module_dropout,
                  self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        # Patterns name each changed module exactly, which HF PEFT's (.*\.)?(KEY)$ matching takes as that module.
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            delora_lambda=self.delora_lambda,
            module_dropout=self.module_dropout,
            bias=self.bias,
            init_weights=self.init_weights,
            rank_pattern={n: r for n in targets if (r := self.rank_for(n)) != self.rank},
            lambda_pattern={n: v for n in targets if (v := self.lambda_for(n)) != self.delora_lambda},
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> DeLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "DeLoRA")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 8),
            delora_lambda=data.get("delora_lambda", 15),
            module_dropout=data.get("module_dropout", 0.0),
            init_weights=data.get("init_weights", True),
            bias=data.get("bias", "none") or "none",
            rank_pattern=hf_pattern(data.get("rank_pattern") or {}, module_names),
            lambda_pattern=hf_pattern(data.get("lambda_pattern") or {}, module_names),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
