"""Uni-LoRA: every LoRA factor entry of the model read from one trained vector θ.

Paper: Li et al., "Uni-LoRA: One Vector Is All You Need" (https://arxiv.org/abs/2506.00799). Hugging Face PEFT
0.21.2's ``UNILORA`` is the reference for what follows.

One trained vector θ ∈ ℝ^d (d = ``theta_d_length``) serves the whole adapter. Every entry of every adapted layer's
rank-r factors A (r × in) and B (out × r) is a fixed entry of θ, times a fixed scale::

    A[i, j] = θ[I_A[i, j]] · s(I_A[i, j]),   B[i, j] = θ[I_B[i, j]] · s(I_B[i, j]),   s(k) = 1 / √(uses of k)
    x ↦ W₀x + B A dropout(x)

The index maps I (over all layers' A then B, in module order, flattened) take each θ entry ⌊D/d⌋ or ⌈D/d⌉ times for
D factor entries in all: ⌊D/d⌋ copies of 0 … d − 1, plus D mod d distinct extra entries, shuffled, all drawn from
``numpy.random.default_rng(proj_seed)`` as HF PEFT draws them, so a file holds only θ (``base_model.unilora_theta_d``)
unless ``save_indices`` adds the maps and scales per layer (``…<layer>.unilora_indices_A`` … ``unilora_scales_B``).
θ starts U(−β, β) (β = ``init_theta_d_bound``) or, with ``init_weights=False``, N(0, 1), from torch's global
generator; as in HF PEFT each adapted layer then draws (and discards) two ``randint`` tensors of its maps' shapes,
so the generator ends where HF PEFT's does. Over a half-precision base θ and the scales are rounded to its dtype and
kept in fp32, as in HF PEFT. ``nn.Linear`` and GPT-2's ``Conv1D`` (not quantized) layers; merging adds B·A to the
weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, linear_kind, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError, require
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, default_for
from peftkit.methods.vblora import _as_adapter
from peftkit.methods.vera import SharedProjection, _checked_bool, _checked_int

BIAS_MODES = ("none", "all", "unilora_only")
#: The per-layer buffers, under HF PEFT's names: the index maps and their scales.
BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")
THETA_KEY = "base_model.unilora_theta_d"


def balanced_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` indices into a vector of ``length``, each used ⌊count/length⌋ or ⌈count/length⌉ times, shuffled;
    bit for bit HF PEFT's draws from ``numpy.random.default_rng(seed)``."""
    np = cast(Any, require("numpy", "hf"))  # comes with transformers
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def _supported(module: nn.Module) -> bool:
    """Linear-like and not quantized: B·A is added to a float weight."""
    return linear_kind(module) is not None and DEQUANTIZERS.lookup(type(module)) is None


class UniLoRALayer(DeltaLayer):
    """Uni-LoRA on ``nn.Linear`` or GPT-2's ``Conv1D``: ``base(x) + B A dropout(x)``, A and B gathered from θ.

    Args:
        base_layer: the wrapped layer.
        theta: the model's shared vectors, adapter name → θ; the same module in every layer.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    def __init__(self, base_layer: nn.Module, theta: nn.ParameterDict) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"UniLoRA cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear "
                                        "and GPT-2's Conv1D (as HF PEFT 0.21.2)")
        super().__init__(base_layer)
        kind = self.kind
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.unilora_theta_d = theta  # HF PEFT's attribute name, so the parameter names match its own
        for attr in BUFFERS:  # persistent where the adapter saves them, as HF PEFT's buffers
            setattr(self, attr, SharedProjection(persistent=False))
        self.dropout: dict[str, float] = {}
        self.save_indices: dict[str, bool] = {}

    def _buffers_of(self, attr: str) -> SharedProjection:
        return cast(SharedProjection, getattr(self, attr))

    def buffer(self, attr: str, name: str) -> torch.Tensor:
        """Adapter ``name``'s buffer ``attr`` (one of ``BUFFERS``)."""
        return self._buffers_of(attr)[name]

    def add(self, name: str, rank: int, dropout: float, save_indices: bool, theta_length: int) -> None:
        """Add adapter ``name`` with placeholder maps (drawn as HF PEFT draws them) until :meth:`assign` sets them."""
        weight = self.kind.weight(self.base_layer)
        maps = (torch.randint(0, theta_length, (rank, self.in_features), dtype=torch.long),
                torch.randint(0, theta_length, (self.out_features, rank), dtype=torch.long))
        values = (*(m.to(weight.device) for m in maps), *(_as_adapter(torch.ones(m.shape), weight) for m in maps))
        for attr, value in zip(BUFFERS, values, strict=True):
            holder = self._buffers_of(attr)
            holder.persistent = save_indices
            holder.add(name, value)
        self.dropout[name] = dropout
        self.save_indices[name] = save_indices

    def assign(self, name: str, maps: tuple[torch.Tensor, torch.Tensor], inv_sqrt: torch.Tensor) -> None:
        """Set adapter ``name``'s index maps (A's, B's) and their scales ``inv_sqrt[map]``."""
        weight = self.kind.weight(self.base_layer)
        with torch.no_grad():
            for attr, scale_attr, index in zip(BUFFERS[:2], BUFFERS[2:], maps, strict=True):
                buffer = self.buffer(attr, name)
                buffer.copy_(index.view_as(buffer))  # scales rounded as HF PEFT rounds them
                self.buffer(scale_attr, name).copy_(_as_adapter(inv_sqrt[index], weight).view_as(buffer))

    # -- bookkeeping: the layer holds no parameter of its own, θ is the model's --------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.dropout)

    def has_adapter(self, name: str) -> bool:
        return name in self.dropout

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if self.has_adapter(name) and name in self.unilora_theta_d:
            yield self.unilora_theta_d[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The maps and scales where the adapter saves them (θ is saved once, at the model's key)."""
        if not self.save_indices.get(name):
            return {}
        return {attr: self.buffer(attr, name) for attr in BUFFERS}

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for attr in BUFFERS:
            self._buffers_of(attr).remove(name)
        if name in self.unilora_theta_d:  # shared: the other layers find it gone already
            self.unilora_theta_d.pop(name)
        self.dropout.pop(name, None)
        self.save_indices.pop(name, None)

    # -- the update ----------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r × in) and B (out × r), differentiable in θ."""
        theta = self.unilora_theta_d[name]
        a = theta[self.buffer("unilora_indices_A", name)] * self.buffer("unilora_scales_A", name)
        b = theta[self.buffer("unilora_indices_B", name)] * self.buffer("unilora_scales_B", name)
        return a, b

    def _delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return b @ a

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)``, in HF PEFT's order (the factors, not x ΔWᵀ)."""
        a, b = self.factors(name)
        h = x.to(self.unilora_theta_d[name].dtype)
        if self.dropout[name] > 0:
            h = F.dropout(h, self.dropout[name], self.training)
        return F.linear(F.linear(h, a), b)


#: ``adapter_config.json`` fields of HF PEFT's UniLoraConfig that select or compute something.
_HF_FIELDS = frozenset(
    "r proj_seed theta_d_length target_modules unilora_dropout fan_in_fan_out bias modules_to_save "
    "init_theta_d_bound init_weights save_indices layers_to_transform layers_pattern".split())


@register_method
@dataclass
class UniLoRA(AdaptedBiases, AdapterConfig):
    """Uni-LoRA: one trained vector θ, all LoRA factors gathered from it (HF PEFT's ``UniLoraConfig``).

    Attributes:
        rank: r, the rank of each layer's B·A (HF PEFT: ``r``).
        theta_d_length: d, the length of θ: the adapter's trained parameters, whatever the rank and targets.
        proj_seed: seed of the index maps (numpy's ``default_rng``); a file without maps is read back with it.
        dropout: dropout probability on the adapter's input, in [0, 1) (HF PEFT: ``unilora_dropout``).
        init_theta_d_bound: β > 0; θ starts U(−β, β) (not zero, which would give no gradient).
        init_weights: ``False`` starts θ from N(0, 1) instead, as in HF PEFT.
        save_indices: write each layer's index maps and scales into the adapter file (larger; independent of how
            the maps are generated).
        fan_in_fan_out: HF PEFT's field, written to ``adapter_config.json``; peftkit reads the weight's orientation
            from the layer type (``Conv1D`` stores it transposed), which is what HF PEFT ends up doing.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"unilora_only"`` (the biases
            of the adapted layers).

    Raises:
        ConfigError: a field out of range (named, with its value).
        UnsupportedLayerError: in ``pk.apply``, a target that is not ``nn.Linear`` or ``Conv1D``.
    """

    peft_type = "UNILORA"
    bias_layer = UniLoRALayer
    bias_only = "unilora_only"

    rank: int = 4
    theta_d_length: int = 256
    proj_seed: int = 42
    dropout: float = 0.0
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    #: The θ module ``resolve`` chose for the model being adapted: the one its Uni-LoRA layers share, or a new one.
    _theta: nn.ParameterDict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        _checked_int("theta_d_length", self.theta_d_length, 1)
        if isinstance(self.proj_seed, bool) or not isinstance(self.proj_seed, int) or self.proj_seed < 0:
            raise ConfigError(f"proj_seed={self.proj_seed!r} must be a non-negative integer (a seed, e.g. 42)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        bound = self.init_theta_d_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ConfigError(f"init_theta_d_bound={bound!r} must be a finite number > 0 (e.g. 0.02)")
        for key in ("init_weights", "save_indices", "fan_in_fan_out"):
            _checked_bool(key, getattr(self, key))
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def replace(self, **changes: Any) -> AdapterConfig:
        new = cast(UniLoRA, super().replace(**changes))
        new._theta = self._theta
        return new

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's per architecture (HF PEFT's mapping). Always a copy: θ chosen for
        ``model`` is kept on it, not on the user's config."""
        if self.target_modules:
            return self.replace()
        return self.replace(target_modules=list(default_for(LORA_TARGETS, model, "UniLoRA", "target_modules=[...]")))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second Uni-LoRA adapter only
            return isinstance(module, UniLoRALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return [n for n in LINEAR_KINDS.names() if n in ("Linear", "Conv1D")]

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        layer = next((m for m in model.modules() if isinstance(m, UniLoRALayer)), None)
        self._theta = layer.unilora_theta_d if layer is not None else nn.ParameterDict()
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if self._theta is None:
            raise ConfigError("UniLoRA.transform needs the θ module resolve(model) chooses; call resolve first")
        layer = module if isinstance(module, UniLoRALayer) else UniLoRALayer(module, self._theta)
        if adapter_name not in self._theta:  # drawn before any layer's maps, as in HF PEFT
            theta = torch.empty(self.theta_d_length)
            if self.init_weights:
                nn.init.uniform_(theta, -self.init_theta_d_bound, self.init_theta_d_bound)
            else:
                theta = torch.randn(self.theta_d_length)
            self._theta[adapter_name] = nn.Parameter(_as_adapter(theta, layer.kind.weight(layer.base_layer)))
        layer.add(adapter_name, self.rank, float(self.dropout), self.save_indices, self.theta_d_length)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        """Draw the index maps over all the adapter's layers at once, and set their scales."""
        layers = [m for m in model.modules() if isinstance(m, UniLoRALayer) and m.has_adapter(name)]
        shapes = [(m.buffer(BUFFERS[0], name).numel(), m.buffer(BUFFERS[1], name).numel()) for m in layers]
        indices = balanced_indices(sum(a + b for a, b in shapes), self.theta_d_length, self.proj_seed)
        counts = torch.bincount(indices, minlength=self.theta_d_length)
        inv_sqrt = torch.zeros(self.theta_d_length)
        inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
        start = 0
        for layer, (size_a, size_b) in zip(layers, shapes, strict=True):
            maps = indices[start:start + size_a], indices[start + size_a:start + size_a + size_b]
            layer.assign(name, maps, inv_sqrt)
            start += size_a + size_b
        super().after_apply(model, name)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """θ under HF PEFT's model-level key, and the trained biases."""
        out = super().extra_tensors(model, name)
        if self._theta is not None and name in self._theta:
            out[THETA_KEY] = self._theta[name]
        return out

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules",),
            r=self.rank,
            proj_seed=self.proj_seed,
            theta_d_length=self.theta_d_length,
            unilora_dropout=self.dropout,
            fan_in_fan_out=self.fan_in_fan_out,  # set by save_adapter when a target stores its weight transposed
            bias=self.bias,
            init_theta_d_bound=self.init_theta_d_bound,
            init_weights=self.init_weights,
            save_indices=self.save_indices,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> UniLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "UniLoRA")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 4),
            theta_d_length=data.get("theta_d_length", 256),
            proj_seed=data.get("proj_seed", 42),
            dropout=data.get("unilora_dropout", 0.0) or 0.0,
            init_theta_d_bound=data.get("init_theta_d_bound", 0.02),
            init_weights=bool(data.get("init_weights", True)),
            save_indices=bool(data.get("save_indices", False)),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
