"""C3A: a block-circulant weight update, applied as circular convolutions computed with FFTs.

Paper: Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution" (https://arxiv.org/abs/2407.19342).

Each adapted ``nn.Linear`` with weight W₀ (out × in) and block size b (dividing both) trains one kernel
K ∈ ℝ^(out/b × in/b × b). ΔW is made of b × b circulant blocks, one per kernel vector K[i, j], scaled by 1/in::

    x ↦ W₀x + ΔW x,        ΔW[i·b + s, j·b + t] = K[i, j, (t − s) mod b] / in

so each output block is a sum of circular cross-correlations, computed without building ΔW:
(ΔW x)ᵢ = Σⱼ IDFT(conj(DFT(K[i, j])) ⊙ DFT(xⱼ)) / in, in fp32 whatever the model's dtype (as Hugging Face PEFT
0.21.2, ``C3A``, computes it: half-precision FFTs are rare). A layer trains (out·in)/b numbers. The kernel starts
as HF PEFT draws it from torch's global generator (``init_weights``: ``"xavier_uniform"``, the default, and
``False`` draw U(−a, a) with a = √3·√(2/(in + out)); ``"kaiming_uniform"`` a = √(1/in); ``"gaussian"`` N(0, 1);
``True`` zero, the unchanged model), rounded to a half-precision base's dtype and kept in fp32. Files hold
``…<layer>.c3a_kernel``. Merging adds ΔW to the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import check_pattern_keys, first_match
from peftkit.core.registry import DEQUANTIZERS, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_suffix_keys, hf_suffix_pattern, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype

#: model_type → C3A's default target_modules: LoRA's, but the MLP output on GPT-2 (HF PEFT's mapping; GPT-2's is a
#: ``Conv1D``, which C3A refuses there as in HF PEFT).
C3A_TARGETS: dict[str, tuple[str, ...]] = {**LORA_TARGETS, "gpt2": ("mlp.c_proj",), "gpt_bigcode": ("mlp.c_proj",)}
BIAS_MODES = ("none", "all", "c3a_only")
#: ``init_weights`` besides True and False.
INIT_WEIGHTS = ("xavier_uniform", "kaiming_uniform", "gaussian")


def _supported(module: nn.Module) -> bool:
    """A float ``nn.Linear`` (HF PEFT 0.21.2's C3A adapts no other layer type)."""
    return isinstance(module, nn.Linear) and DEQUANTIZERS.lookup(type(module)) is None


def initial_kernel(out_features: int, in_features: int, block_size: int, init_weights: bool | str) -> torch.Tensor:
    """A new fp32 kernel (out/b, in/b, b), drawn from the global generator with HF PEFT's bounds (computed in its
    order of operations: a bound one ulp off would draw other numbers)."""
    kernel = torch.zeros(out_features // block_size, in_features // block_size, block_size)
    if init_weights == "gaussian":
        kernel.normal_()
    elif init_weights == "kaiming_uniform":
        bound = 1.0 * math.sqrt(1.0 / float(in_features))
        kernel.uniform_(-bound, bound)
    elif init_weights is not True:  # "xavier_uniform" or False
        bound = math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(in_features + out_features)))
        kernel.uniform_(-bound, bound)
    return kernel


def block_circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x @ C(kernel)ᵀ`` for the block-circulant C(kernel) (without the 1/in), by real FFTs over each block."""
    rows, cols, size = kernel.shape
    spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], cols, size))
    mixed = torch.einsum("...jf,ijf->...if", spectrum, torch.fft.rfft(kernel).conj())
    product: torch.Tensor = torch.fft.irfft(mixed, n=size)
    return product.flatten(-2)


def block_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) matrix C(kernel): block (i, j) has K[i, j, (t − s) mod b] at row s, column t."""
    rows, cols, size = kernel.shape
    steps = torch.arange(size, device=kernel.device)
    blocks = kernel[:, :, (steps - steps[:, None]) % size]  # (rows, cols, s, t)
    return blocks.permute(0, 2, 1, 3).reshape(rows * size, cols * size)


class C3ALayer(DeltaLayer):
    """C3A on an ``nn.Linear``: ``base(x) + x ΔWᵀ`` with ΔW block-circulant.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    adapter_containers = ("c3a_kernel",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"C3A cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear only "
                                        "(as HF PEFT 0.21.2)")
        super().__init__(base_layer)
        linear = cast(nn.Linear, base_layer)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.c3a_kernel = nn.ParameterDict()

    def add(self, name: str, block_size: int, init_weights: bool | str) -> None:
        """Add adapter ``name`` with blocks of ``block_size`` (which divides both sizes: see ``C3A.resolve``)."""
        kernel = initial_kernel(self.out_features, self.in_features, block_size, init_weights)
        weight = cast(torch.Tensor, self.base_layer.weight)
        # HF PEFT casts the new kernel to the base dtype, then keeps fp32 over half precision.
        self.c3a_kernel[name] = nn.Parameter(kernel.to(weight.dtype).to(weight.device, adapter_dtype(weight)))

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``, (out, in), in fp32."""
        with torch.no_grad():
            return block_circulant(self.c3a_kernel[name].float()) / self.in_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        # Each active adapter reads the layer's input (HF PEFT 0.21.2 feeds the second adapter the first one's
        # output instead: see the README).
        x32 = x.float()
        for name in names:
            update = block_circular(x32, self.c3a_kernel[name].float()) / self.in_features
            result = result + update.to(result.dtype)
        return result.to(x.dtype)


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer dividing the adapted layers' input and "
                          "output sizes (e.g. their greatest common divisor)")


#: ``adapter_config.json`` fields of HF PEFT's C3AConfig that select or compute something.
_HF_FIELDS = frozenset(
    "block_size block_size_pattern init_weights target_modules bias modules_to_save layers_to_transform "
    "layers_pattern".split())


@register_method
@dataclass
class C3A(AdaptedBiases, AdapterConfig):
    """C3A: one block-circulant kernel per layer (HF PEFT's ``C3AConfig``).

    Attributes:
        block_size: b, the side of ΔW's circulant blocks; it must divide the input and output size of every adapted
            layer (the greatest common divisor of those sizes trains the fewest numbers). A layer trains
            out·in/b numbers. HF PEFT's default, 256, suits large models.
        block_size_pattern: per-module b, keyed by patterns in the ``target_modules`` syntax.
        init_weights: how the kernel starts: ``"xavier_uniform"`` (the default) or ``False`` (the same),
            ``"kaiming_uniform"``, ``"gaussian"`` (N(0, 1)), or ``True``: zero, the unchanged model. All but
            ``True`` change the model's output from the start, as in HF PEFT.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"c3a_only"`` (the biases of
            the adapted layers).

    Raises:
        ConfigError: a field is out of its range (named, with the value and what it accepts).
    """

    peft_type = "C3A"
    bias_layer = C3ALayer
    bias_only = "c3a_only"

    block_size: int = 256
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("block_size", self.block_size)
        for key, value in self.block_size_pattern.items():
            _positive(f"block_size_pattern[{key!r}]", value)
        if not isinstance(self.init_weights, bool) and self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"init_weights={self.init_weights!r} must be True (a zero kernel: the unchanged model), "
                              f"False or one of {INIT_WEIGHTS}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's C3A adapts on this architecture."""
        return with_default_targets(self, model, C3A_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second C3A adapter only
            return isinstance(module, C3ALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return ["Linear"]

    def block_size_for(self, qualname: str) -> int:
        key = first_match(qualname, self.block_size_pattern)
        return self.block_size_pattern[key] if key is not None else self.block_size

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to be divisible into its blocks before the model changes.

        Raises:
            ConfigError: a ``block_size_pattern`` key matches no module, or a target's sizes are not multiples of
                its block size (the message gives a block size every target takes).
        """
        targets = super().resolve(model)
        check_pattern_keys(model, "block_size_pattern", self.block_size_pattern)
        sizes = {}
        for name in targets:
            module = model.get_submodule(name)
            linear = cast(nn.Linear, module.base_layer if isinstance(module, C3ALayer) else module)
            sizes[name] = (linear.in_features, linear.out_features)
        for name, (fan_in, fan_out) in sizes.items():
            size = self.block_size_for(name)
            if fan_in % size or fan_out % size:
                common = math.gcd(*(d for pair in sizes.values() for d in pair))
                raise ConfigError(
                    f"block_size {size} at {name} must divide its input size {fan_in} and output size {fan_out}; "
                    f"every adapted layer takes block_size={common} (their greatest common divisor) or a divisor "
                    "of it, or set block_size_pattern for this layer")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, C3ALayer) else C3ALayer(module)
        layer.add(adapter_name, self.block_size_for(qualname), self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        sizes = {n: b for n in targets if (b := self.block_size_for(n)) != self.block_size}
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules",),
            block_size=self.block_size,
            bias=self.bias,
            block_size_pattern=hf_suffix_keys(sizes),  # each changed module by name, as HF PEFT matches keys
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> C3A:
        unknown = hf_unknown_options(data, _HF_FIELDS, "C3A")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            block_size=data.get("block_size", 256),
            block_size_pattern=hf_suffix_pattern(data.get("block_size_pattern") or {}, module_names),
            init_weights=data.get("init_weights", "xavier_uniform"),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
