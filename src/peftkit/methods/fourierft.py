"""FourierFT: a weight update learned as a few coefficients of its 2-D Fourier spectrum.

Paper: Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", ICML 2024
(https://arxiv.org/abs/2405.03003).

Each adapted layer with weight W₀ (out × in) trains n coefficients c ∈ ℝⁿ (``n_frequency``) placed at n fixed
random positions E of an otherwise zero out × in spectrum F, and adds the real part of its inverse 2-D DFT::

    x ↦ W₀x + ΔW x,        ΔW = s · Re(IDFT2(F)),   F[E] = c, zero elsewhere

with s = ``scaling``. E is the first n entries of ``torch.randperm(out·in)`` drawn from a generator seeded with
``random_loc_seed`` (row = index // in, column = index % in), exactly as Hugging Face PEFT 0.21.2 (``FOURIERFT``)
draws it, so files hold only c (``…<layer>.fourierft_spectrum``) and both libraries place it identically. c starts
standard normal, drawn from torch's global generator (HF PEFT's default, ``init_weights=False``), or zero
(``init_weights=True``, the unchanged model). ΔW is built in fp32 (the FFT has no half-precision kernels on most
devices) in every forward. ``nn.Linear`` and GPT-2's ``Conv1D`` layers; merging adds ΔW to the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import check_pattern_keys, first_match
from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, linear_kind, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_suffix_keys, hf_suffix_pattern
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype

#: model_type → FourierFT's default target_modules: LoRA's, but the MLP output on GPT-2 (HF PEFT's mapping).
FOURIERFT_TARGETS: dict[str, tuple[str, ...]] = {**LORA_TARGETS, "gpt2": ("mlp.c_proj",),
                                                 "gpt_bigcode": ("mlp.c_proj",)}
BIAS_MODES = ("none", "all", "fourier_only")


def spectral_indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The (2, n) rows and columns of the trained spectrum entries, bit for bit as HF PEFT draws them."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features])


def _supported(module: nn.Module) -> bool:
    """Linear-like and not quantized: ΔW is added to a float weight."""
    return linear_kind(module) is not None and DEQUANTIZERS.lookup(type(module)) is None


class FourierFTLayer(DeltaLayer):
    """FourierFT on ``nn.Linear`` or GPT-2's ``Conv1D``: ``base(x) + x ΔWᵀ`` with ΔW from the spectrum.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    adapter_containers = ("fourierft_spectrum",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"FourierFT cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear "
                                        "and GPT-2's Conv1D")
        super().__init__(base_layer)
        kind = self.kind
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.fourierft_spectrum = nn.ParameterDict()
        self.indices: dict[str, torch.Tensor] = {}  # derived from the seed, never saved (as in HF PEFT)
        self.scaling: dict[str, float] = {}

    def add(self, name: str, n_frequency: int, scaling: float, seed: int, init_weights: bool, where: str) -> None:
        """Add adapter ``name`` with ``n_frequency`` coefficients at the positions drawn from ``seed``.

        Raises:
            ConfigError: ``n_frequency`` exceeds the weight's out·in entries (``where`` names the layer).
        """
        if n_frequency > self.out_features * self.in_features:
            raise ConfigError(f"n_frequency={n_frequency} at {where} exceeds its weight's {self.out_features} × "
                              f"{self.in_features} = {self.out_features * self.in_features} entries")
        self.indices[name] = spectral_indices(self.out_features, self.in_features, n_frequency, seed)
        self.scaling[name] = scaling
        spectrum = torch.randn(n_frequency)  # drawn whatever init_weights, as HF PEFT does
        if init_weights:
            spectrum.zero_()
        weight = self.kind.weight(self.base_layer)
        if weight.dtype.is_floating_point:  # HF PEFT rounds it to the base dtype, then keeps fp32 over half precision
            spectrum = spectrum.to(weight.dtype)
        self.fourierft_spectrum[name] = nn.Parameter(spectrum.to(weight.device, adapter_dtype(weight)))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.indices.pop(name, None)
        self.scaling.pop(name, None)

    def _delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``, (out, in), in the spectrum's dtype (differentiable)."""
        spectrum = self.fourierft_spectrum[name]
        rows, cols = self.indices[name].to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device)
        dense[rows, cols] = spectrum.float()
        delta: torch.Tensor = torch.fft.ifft2(dense).real * self.scaling[name]
        return delta.to(spectrum.dtype)



@register_method
@dataclass
class FourierFT(AdaptedBiases, AdapterConfig):
    """FourierFT: n trained spectrum coefficients per layer.

    Attributes:
        n_frequency: n, the trained coefficients per layer (at most out·in; the paper uses 1000 on RoBERTa).
        scaling: s, the factor on ΔW (HF PEFT suggests 100–150 for RoBERTa, 300 for LLaMA and ViT).
        random_loc_seed: seed of the coefficients' positions (the same in every layer of the adapter).
        fan_in_fan_out: HF PEFT's field, written to ``adapter_config.json``; peftkit reads the weight's orientation
            from the layer type (``Conv1D`` stores it transposed), which is what HF PEFT ends up doing.
        init_weights: start from zero coefficients (the unchanged model); ``False`` (HF PEFT's default) draws them
            from N(0, 1).
        n_frequency_pattern: per-module n, keyed by patterns in the ``target_modules`` syntax.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"fourier_only"`` (the
            biases of the adapted layers).
    """

    peft_type = "FOURIERFT"
    bias_layer = FourierFTLayer
    bias_only = "fourier_only"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    init_weights: bool = False
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, value in {"n_frequency": self.n_frequency, **{f"n_frequency_pattern[{k!r}]": v for k, v in
                                                               self.n_frequency_pattern.items()}}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a positive integer (e.g. 1000)")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling!r} must be a finite number (e.g. 150.0)")
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            raise ConfigError(f"random_loc_seed={self.random_loc_seed!r} must be an integer (a seed, e.g. 777)")
        for name in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's FourierFT adapts on this architecture."""
        return with_default_targets(self, model, FOURIERFT_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second FourierFT adapter only
            return isinstance(module, FourierFTLayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return [n for n in LINEAR_KINDS.names() if n in ("Linear", "Conv1D")]

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        check_pattern_keys(model, "n_frequency_pattern", self.n_frequency_pattern)
        return targets

    def n_frequency_for(self, qualname: str) -> int:
        key = first_match(qualname, self.n_frequency_pattern)
        return self.n_frequency_pattern[key] if key is not None else self.n_frequency

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, FourierFTLayer) else FourierFTLayer(module)
        layer.add(adapter_name, self.n_frequency_for(qualname), float(self.scaling), self.random_loc_seed,
                  self.init_weights, qualname)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            n_frequency=self.n_frequency,
            scaling=self.scaling,
            random_loc_seed=self.random_loc_seed,
            fan_in_fan_out=self.fan_in_fan_out,  # set by save_adapter when a target stores its weight transposed
            bias=self.bias,
            # Each changed module by name, as HF PEFT matches the keys (see hf_suffix_keys).
            n_frequency_pattern=hf_suffix_keys({n: k for n in targets if (k := self.n_frequency_for(n))
                                                != self.n_frequency}),
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> FourierFT:
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            n_frequency=data.get("n_frequency", 1000),
            scaling=data.get("scaling", 150.0),
            random_loc_seed=data.get("random_loc_seed", 777),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            init_weights=bool(data.get("init_weights", False)),
            n_frequency_pattern=hf_suffix_pattern(data.get("n_frequency_pattern") or {}, module_names),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type n_frequency scaling random_loc_seed fan_in_fan_out target_modules exclude_modules bias "
    "modules_to_save layers_to_transform layers_pattern n_frequency_pattern init_weights inference_mode "
    "base_model_name_or_path revision auto_mapping".split()
)
