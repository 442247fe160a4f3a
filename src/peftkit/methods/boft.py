"""BOFT: orthogonal finetuning with butterfly factorisation, plus a trained scale per output.

Paper: Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024
(https://arxiv.org/abs/2311.06243). Hugging Face PEFT 0.21.2's BOFT is the reference for everything below.

A layer's rotated dimension d (a linear layer's inputs, a Conv2d's flattened filter of channels × k × k) is split into
D blocks of size b = d / D. Each of the m butterfly factors (``boft_n_butterfly_factor``) trains D full b × b matrices
(``boft_R`` of shape (m, D, b, b)); their skew-symmetric parts Aᵢ = (Xᵢ − Xᵢᵀ)/2 become orthogonal blocks by the Cayley
transform (I − A)(I + A)⁻¹, a factor is its block-diagonal matrix Bⱼ conjugated by factor j's butterfly permutation
Pⱼ (P₀ = I), and a trained scale s per output (``boft_s``) multiplies the result::

    M = (P_{m−1} B_{m−1} P_{m−1}ᵀ) ⋯ (P₀ B₀ P₀ᵀ)        x ↦ s ⊙ (W₀ (x M)ᵀ) + bias

so the merged weight is diag(s) W₀ Mᵀ (the bias unscaled). With m = 1, BOFT is block-diagonal OFT (with the full
Cayley transform and the scale). X = 0 and s = 1 at first. Several active adapters apply their M to the input last
first (x M_last ⋯ M_first) and multiply their scales, as in HF PEFT. ``boft_dropout`` p replaces ⌊p·D⌋ random blocks
of one random factor by the identity in each training forward, drawn from torch's global generator in HF PEFT's
order. Merging and unmerging: :class:`peftkit.methods.rotation.RotationLayer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, TypeRegistry, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.oft import rotated_features
from peftkit.methods.rotation import RotationLayer

#: Base layers BOFT adapts (HF PEFT's two).
BOFT_KINDS: TypeRegistry[str] = TypeRegistry()
BOFT_KINDS.register(nn.Linear, "linear")
BOFT_KINDS.register(nn.Conv2d, "conv2d")
BIAS_MODES = ("none", "all", "boft_only")


def boft_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv2d"`` for a layer BOFT adapts, else ``None`` (quantized linear layers too)."""
    if DEQUANTIZERS.lookup(type(module)) is not None:
        return None
    return BOFT_KINDS.lookup(type(module))


def check_layer(module: nn.Module, where: str) -> None:
    """Refuse a Conv2d whose convolution HF PEFT computes otherwise: it reshapes the filter as (out, in·k₀·k₀) and
    convolves with ``padding[0]`` and ``stride[0]`` alone.

    Raises:
        UnsupportedLayerError: such a Conv2d, naming the layer and what is unsupported.
    """
    if not isinstance(module, nn.Conv2d):
        return
    padding = module.padding
    checks = ((module.groups != 1, f"groups={module.groups}"),
              (any(d != 1 for d in module.dilation), f"dilation={module.dilation}"),
              (module.kernel_size[0] != module.kernel_size[1], f"kernel_size={module.kernel_size}"),
              (module.stride[0] != module.stride[1], f"stride={module.stride}"),
              (isinstance(padding, str) or padding[0] != padding[1], f"padding={padding!r}"),
              (module.padding_mode != "zeros", f"padding_mode={module.padding_mode!r}"))
    problems = [text for bad, text in checks if bad]
    if problems:
        raise UnsupportedLayerError(
            f"BOFT cannot adapt {where} ({', '.join(problems)}): HF PEFT rotates only Conv2d layers with square "
            "kernels, groups=1 and no dilation, and convolves with zero padding and stride of the first dimension; "
            "leave it out of target_modules"
        )


def block_layout(dimension: int, block_size: int, block_num: int, factors: int, where: str) -> tuple[int, int]:
    """``(blocks, block_size)`` for a layer rotating ``dimension`` features, with HF PEFT's checks.

    Raises:
        ConfigError: the sizes do not fit ``dimension`` or the butterfly (the options and the layer named).
    """
    extra = factors - 1  # the butterfly factors beyond the first
    if block_num:
        if dimension % block_num:
            raise ConfigError(f"boft_block_num={block_num} does not divide the {dimension} features {where} rotates")
        if extra and (extra > int(math.log2(block_num)) or block_num % 2 ** extra):
            raise ConfigError(f"boft_n_butterfly_factor={factors} needs boft_block_num (here {block_num}) to be a "
                              f"multiple of {2 ** extra}")
        block_size = dimension // block_num
    else:
        if dimension % block_size:
            raise ConfigError(f"boft_block_size={block_size} does not divide the {dimension} features {where} rotates")
        if extra and dimension % (block_size * 2 ** extra):
            raise ConfigError(f"boft_n_butterfly_factor={factors} with boft_block_size={block_size} needs {where}'s "
                              f"{dimension} features to be a multiple of {block_size * 2 ** extra}")
        block_num = dimension // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ConfigError(f"boft_n_butterfly_factor={factors} needs an even number of blocks of even size; {where} "
                          f"gets {block_num} blocks of {block_size}")
    return block_num, block_size


def butterfly_permutation(dimension: int, blocks: int, half: int) -> torch.Tensor:
    """HF PEFT's ``block_butterfly_perm``: within each of ``blocks`` chunks, the runs of ``half`` indices at even
    positions first, then those at odd positions. ``M = P B Pᵀ`` is ``B[perm][:, perm]``."""
    size = dimension // blocks
    runs = [*range(0, size // half, 2), *range(1, size // half, 2)]
    order = torch.cat([torch.arange(run * half, run * half + half) for run in runs])
    return (torch.arange(dimension).view(blocks, size)[:, order]).reshape(-1)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The (D·b × D·b) block-diagonal matrix of D blocks of b × b (``torch.block_diag``, batched)."""
    count, size, _ = blocks.shape
    eye = torch.eye(count, device=blocks.device, dtype=blocks.dtype)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(count * size, count * size)


class BOFTLayer(RotationLayer):
    """BOFT adapters on an ``nn.Linear`` or ``nn.Conv2d``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type, or a Conv2d HF PEFT computes otherwise.
    """

    method = "BOFT"
    adapter_containers: ClassVar[tuple[str, ...]] = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        kind = boft_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(f"BOFT cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(BOFT_KINDS.names())}")
        check_layer(base_layer, type(base_layer).__name__)
        self.kind = kind
        self.features = rotated_features(base_layer)
        self.out_features = int(cast(torch.Tensor, base_layer.weight).shape[0])
        self.boft_R = nn.ParameterDict()
        #: The scale per output: (out, 1) on a linear layer, (1, out) on a Conv2d (HF PEFT's shapes).
        self.boft_s = nn.ParameterDict()
        self.dropout: dict[str, float] = {}
        #: Each adapter's butterfly permutations (one per factor).
        self.permutations: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, blocks: int, block_size: int, factors: int, *, dropout: float = 0.0,
            init_weights: bool = True) -> None:
        weight = cast(torch.Tensor, self.base_layer.weight)
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        rotation = torch.zeros(factors, blocks, block_size, block_size, **factory)
        scale = torch.ones((self.out_features, 1) if self.kind == "linear" else (1, self.out_features), **factory)
        if not init_weights:  # HF PEFT's random start (for tests), in its order
            with torch.no_grad():
                nn.init.normal_(rotation, mean=0.0, std=0.1)
                nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(rotation)
        self.boft_s[name] = nn.Parameter(scale)
        self.dropout[name] = dropout
        self.permutations[name] = [
            torch.arange(self.features) if factors == 1 else
            butterfly_permutation(self.features, blocks // 2 ** j, block_size // 2) for j in range(factors)]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.dropout.pop(name, None)
        self.permutations.pop(name, None)

    # -- the rotation --------------------------------------------------------------------------
    def _blocks(self, name: str, dropout: bool) -> torch.Tensor:
        """Adapter ``name``'s orthogonal blocks (m, D, b, b), with ``boft_dropout`` if ``dropout``."""
        factors, blocks, size, _ = self.boft_R[name].shape
        raw = self.boft_R[name].reshape(factors * blocks, size, size)
        skew = 0.5 * (raw - raw.transpose(1, 2))
        eye = torch.eye(size, device=raw.device).expand(factors * blocks, size, size)  # fp32, as HF PEFT solves
        orthogonal = cast(torch.Tensor, torch.linalg.solve(eye + skew, eye - skew, left=False)).to(raw.dtype)
        orthogonal = orthogonal.reshape(factors, blocks, size, size)
        p = self.dropout[name]
        if dropout and p > 0:  # HF PEFT's draws: one factor, then which of its blocks become the identity
            chosen = int(torch.randint(0, factors, (1,)).item())
            replace = int(p * blocks)
            mask = torch.cat([torch.ones(replace), torch.zeros(blocks - replace)])[torch.randperm(blocks)]
            full = torch.zeros(factors, blocks, 1, 1)
            full[chosen] = mask.view(blocks, 1, 1)
            full = full.to(raw.device)
            identity = torch.eye(size, device=raw.device).repeat(factors, blocks, 1, 1)
            orthogonal = (1 - full) * orthogonal + full * identity
        return orthogonal

    def matrix(self, name: str, dropout: bool = False) -> torch.Tensor:
        """Adapter ``name``'s M (d × d): each factor's block-diagonal matrix permuted, the first factor applied first
        (``dropout``: with ``boft_dropout``, as in a training forward; merging never drops)."""
        result: torch.Tensor | None = None
        for factor, perm in zip(self._blocks(name, dropout), self.permutations[name], strict=True):
            perm = perm.to(factor.device)
            permuted = block_diagonal(factor)[perm][:, perm]  # P B Pᵀ, exactly
            result = permuted if result is None else permuted @ result
        return cast(torch.Tensor, result)

    def _scale(self, name: str) -> torch.Tensor:
        """The scale per output as a column (out, 1)."""
        scale = cast(torch.Tensor, self.boft_s[name])
        return scale if self.kind == "linear" else scale.transpose(0, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._applied()
        if not names:
            return cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        rotation = torch.eye(self.features, device=x.device, dtype=x.dtype)
        scale = torch.ones(self.out_features, 1, device=x.device, dtype=x.dtype)
        for name in names:  # the later adapter's M acts on the input first, as in HF PEFT
            rotation = self.matrix(name, dropout=self.training).to(x) @ rotation
            scale = self._scale(name) * scale
        if self.kind == "conv2d":
            conv = cast(nn.Conv2d, self.base_layer)
            flat = conv.weight.reshape(self.out_features, -1)
            weight = ((rotation @ flat.T.to(rotation.dtype)).T * scale).reshape(conv.weight.shape)
            bias = None if conv.bias is None else conv.bias.to(weight.dtype)  # fp32 over a half-precision base
            return cast(torch.Tensor, conv._conv_forward(x.to(weight.dtype), weight, bias)).to(x.dtype)
        result = cast(torch.Tensor, self.base_layer((x @ rotation.to(x.dtype)), *args, **kwargs))
        bias = cast(torch.Tensor | None, getattr(self.base_layer, "bias", None))
        if bias is None:
            return (result * scale.squeeze(-1)).to(x.dtype)
        return ((result - bias) * scale.squeeze(-1) + bias).to(x.dtype)

    # -- merging: W ← diag(s) W Mᵀ -----------------------------------------------------------------
    def _rotated(self, weight: torch.Tensor, name: str, inverse: bool) -> torch.Tensor:
        matrix = self.matrix(name).to(weight.dtype)
        scale = self._scale(name).to(weight.dtype)
        flat = weight.reshape(self.out_features, -1)
        if inverse:
            flat = cast(torch.Tensor, torch.linalg.solve(matrix.T, flat / scale, left=False))
        else:
            flat = flat @ matrix.T * scale
        return flat.reshape(weight.shape)


_HF_FIELDS = frozenset(
    "boft_block_size boft_block_num boft_n_butterfly_factor target_modules exclude_modules boft_dropout "
    "fan_in_fan_out bias modules_to_save init_weights layers_to_transform layers_pattern".split())


@register_method
@dataclass
class BOFT(AdaptedBiases, AdapterConfig):
    """BOFT: ``s ⊙ W₀ (x M)ᵀ`` with M a product of permuted block-diagonal orthogonal matrices (HF PEFT's
    ``BOFTConfig``, its field names and defaults), on ``nn.Linear`` and ``nn.Conv2d``.

    Attributes:
        boft_block_size: the size b of each block (HF PEFT's default 4); 0 to give ``boft_block_num`` instead.
        boft_block_num: the number of blocks D per layer; 0 to give ``boft_block_size`` instead (exactly one of the
            two is non-zero, and it must divide every target's rotated size).
        boft_n_butterfly_factor: the butterfly factors m (1: block-diagonal OFT); each doubles the span of a block.
        boft_dropout: probability of replacing a block of one random factor by the identity in a training forward,
            in [0, 1).
        init_weights: ``True``: M = I and s = 1 (the model starts as the base); ``False``: X ~ N(0, 0.1²),
            s ~ N(1, 0.1²).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"boft_only"`` (the adapted
            layers' biases).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, block sizes that do not fit a
            target or the butterfly.
        UnsupportedLayerError: in ``pk.apply``, a target of another type, or a Conv2d HF PEFT computes otherwise.
    """

    peft_type = "BOFT"
    bias_layer = BOFTLayer
    bias_only = "boft_only"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, minimum in (("boft_block_size", 0), ("boft_block_num", 0), ("boft_n_butterfly_factor", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"give exactly one of boft_block_size and boft_block_num, the other 0; got boft_block_size="
                f"{self.boft_block_size}, boft_block_num={self.boft_block_num} (e.g. pk.BOFT(boft_block_size=4) or "
                "pk.BOFT(boft_block_size=0, boft_block_num=8))"
            )
        p = self.boft_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"boft_dropout={p!r} must be in [0, 1) (e.g. 0.1)")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    # -- wrapping --------------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second adapter of the same method only
            return type(module) is BOFTLayer
        return boft_kind(module) is not None

    def supported_layer_names(self) -> list[str]:
        return BOFT_KINDS.names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to be a layer BOFT can rotate with these sizes before anything changes."""
        targets = super().resolve(model)
        for target in targets:
            module = model.get_submodule(target)
            base = module.base_layer if isinstance(module, BOFTLayer) else module
            check_layer(base, target)
            self._layout(rotated_features(base), target)
        return targets

    def _layout(self, dimension: int, where: str) -> tuple[int, int]:
        return block_layout(dimension, self.boft_block_size, self.boft_block_num, self.boft_n_butterfly_factor, where)

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, BOFTLayer) else BOFTLayer(module)
        blocks, size = self._layout(layer.features, qualname)
        layer.add(adapter_name, blocks, size, self.boft_n_butterfly_factor, dropout=self.boft_dropout,
                  init_weights=self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            boft_block_size=self.boft_block_size,
            boft_block_num=self.boft_block_num,
            boft_n_butterfly_factor=self.boft_n_butterfly_factor,
            boft_dropout=self.boft_dropout,
            fan_in_fan_out=False,
            bias=self.bias,
            init_weights=self.init_weights,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> BOFT:
        hf_unknown_options(data, _HF_FIELDS, "BOFT", advice="load it with HF PEFT")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            boft_block_size=data.get("boft_block_size", 4) or 0,
            boft_block_num=data.get("boft_block_num", 0) or 0,
            boft_n_butterfly_factor=data.get("boft_n_butterfly_factor", 1),
            boft_dropout=data.get("boft_dropout", 0.0) or 0.0,
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            extra={k: data[k] for k in ("auto_mapping", "peft_version") if k in data},
        )
