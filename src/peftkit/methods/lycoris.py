"""What LoHa and LoKr (the LyCORIS family) share: a layer that materialises ΔW, and a config base.

Both methods parameterise a full-size update ΔW of the frozen weight W₀ (out × in/groups × kernel) by small
factors, and compute, as Hugging Face PEFT does::

    x ↦ base(x) + x ΔWᵀ           (a convolution: conv(x, ΔW) with the base's stride, padding, dilation, groups)

ΔW is built from the factors in every forward: these methods are for small models and convolutions, where
exactness and HF PEFT's file format matter more than speed. Merging adds ΔW to W₀, unmerging subtracts it.

Training mode has two regularisers, with HF PEFT's semantics (which come from the LyCORIS repository):

- ``module_dropout`` p: the whole update is skipped with probability p in each forward.
- ``rank_dropout`` p: despite its name, each *output row* of ΔW is zeroed with probability p. LoHa then divides
  the mask by its mean (so kept rows are scaled up); LoKr does so only with ``rank_dropout_scale``.

Random numbers are drawn from torch's global CPU generator in HF PEFT's order (one for the module dropout, then one
per output row), so a model seeded like an HF PEFT model drops the same rows. Unlike HF PEFT, nothing is drawn when
both probabilities are 0 (HF PEFT draws one number per adapter and forward in training mode anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match, matches, near_misses
from peftkit.core.registry import DEQUANTIZERS, TypeRegistry
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_pattern, hf_unknown_options
from peftkit.methods.additive import merge_deltas, unmerge_deltas
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype

#: Base layers LoHa and LoKr adapt (those HF PEFT adapts) → their number of spatial dimensions.
LYCORIS_KINDS: TypeRegistry[int] = TypeRegistry()
LYCORIS_KINDS.register(nn.Linear, 0)
LYCORIS_KINDS.register(nn.Conv1d, 1)
LYCORIS_KINDS.register(nn.Conv2d, 2)


def supported_names() -> list[str]:
    return LYCORIS_KINDS.names()


def spatial_dims(module: nn.Module) -> int | None:
    """The number of spatial dimensions of a layer LoHa and LoKr adapt (0: linear), or ``None`` for any other layer
    (a quantized subclass of ``nn.Linear`` too: its weight cannot take ΔW)."""
    if DEQUANTIZERS.lookup(type(module)) is not None:
        return None
    return LYCORIS_KINDS.lookup(type(module))


def kaiming(tensor: torch.Tensor) -> None:
    """HF PEFT's initialisation of LyCORIS factors (that of ``nn.Linear``'s weight)."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A convolution weight from its Tucker/CP form (FedPara's Proposition 3): core ``t`` (r, r, k₁, k₂), ``wa``
    (r, out) and ``wb`` (r, in) → (out, in, k₁, k₂)."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)


class LycorisLayer(AdapterLayer):
    """A LoHa or LoKr layer on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``; subclasses add the factors of an
    adapter (``add``) and build ΔW from them (``_product``).

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type.
    """

    folds_into_weight = True
    #: The method's name, for messages.
    method: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        spatial = spatial_dims(base_layer)
        if spatial is None:
            raise UnsupportedLayerError(
                f"{self.method} cannot adapt a {type(base_layer).__name__}; supported layer types: "
                f"{', '.join(supported_names())}"
            )
        weight = cast(torch.Tensor, base_layer.weight)
        #: Spatial dimensions of a convolution's kernel (0: a linear layer).
        self.spatial = spatial
        self.out_features = int(weight.shape[0])
        self.in_features = int(weight.shape[1])  # a grouped convolution's: per group
        self.kernel: tuple[int, ...] = tuple(int(k) for k in weight.shape[2:])
        self.rank: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        #: Whether rank dropout divides its mask by the mean (always for LoHa; LoKr's ``rank_dropout_scale``).
        self.rank_dropout_scale: dict[str, bool] = {}

    def _add_common(self, name: str, rank: int, alpha: float, rank_dropout: float, module_dropout: float,
                    rank_dropout_scale: bool) -> None:
        self.rank[name] = rank
        self.scaling[name] = alpha / rank  # as HF PEFT, also where LoKr's factors are full (rank unused)
        self.rank_dropout[name] = rank_dropout
        self.module_dropout[name] = module_dropout
        self.rank_dropout_scale[name] = rank_dropout_scale

    def _factory(self) -> dict[str, Any]:
        weight = cast(torch.Tensor, self.base_layer.weight)
        return {"device": weight.device, "dtype": adapter_dtype(weight)}

    def takes_cp(self, effective_conv: bool) -> bool:
        """Whether ``use_effective_conv2d`` applies here: a convolution whose kernel is not 1 (HF PEFT flattens
        1×1 kernels, which are matrix products)."""
        return effective_conv and self.spatial > 0 and any(k != 1 for k in self.kernel)

    @property
    def cp_kernel(self) -> tuple[int, ...]:
        """The kernel of a CP core: a Conv1d's (k,) is stored as (k, 1), as HF PEFT does."""
        return self.kernel if len(self.kernel) == 2 else (*self.kernel, 1)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for table in (self.rank, self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale):
            table.pop(name, None)

    # -- ΔW -----------------------------------------------------------------------------------------
    def _product(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s ΔW before scaling, in any shape with the base weight's number of elements."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = cast(torch.Tensor, self.base_layer.weight)
        return (self._product(name) * self.scaling[name]).reshape(weight.shape)

    def _dropped_rows(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` with each output row zeroed with probability ``rank_dropout`` (HF PEFT's "rank" dropout)."""
        keep = (torch.rand(delta.shape[0]) > self.rank_dropout[name]).to(delta.dtype)
        if self.rank_dropout_scale[name]:
            # HF PEFT divides by the mean unguarded (NaN when every row is dropped); that case keeps zeros here.
            keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
        return delta * keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)

    def _skipped(self, name: str) -> bool:
        """Whether module dropout skips adapter ``name`` in this (training) forward."""
        p, q = self.module_dropout[name], self.rank_dropout[name]
        if p == 0 and q == 0:
            return False
        return not bool(torch.rand(1) > p)  # drawn whenever rank dropout follows too: HF PEFT's random stream

    def _update(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.spatial == 0:
            return F.linear(x, delta)
        # The base convolution's own forward with ΔW: stride, padding (any padding_mode), dilation and groups.
        conv = cast(nn.Conv1d | nn.Conv2d, self.base_layer)
        return cast(torch.Tensor, conv._conv_forward(x, delta, None))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        dtype = result.dtype  # an fp32 update over a half-precision base is added before rounding, as in HF PEFT
        for name in self._applied():
            if self.training and self._skipped(name):
                continue
            delta = self.delta_weight(name)
            if self.training and self.rank_dropout[name] > 0:
                delta = self._dropped_rows(name, delta)
            result = result + self._update(x.to(delta.dtype), delta)
        return result.to(dtype)

    # -- merging: W₀ ← W₀ ± ΔW ---------------------------------------------------------------------
    @torch.no_grad()
    def _fold(self, name: str, sign: float, safe: bool = False, where: str = "") -> None:
        weight = cast(torch.Tensor, self.base_layer.weight)
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight  # one rounding, at the end
        folded = work + sign * self.delta_weight(name).to(work.dtype)
        if safe:
            self.check_finite(folded, where or type(self.base_layer).__name__, name)
        weight.copy_(folded.to(weight.dtype))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where, fold=self._fold)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names, fold=self._fold)


def _probability(field_name: str, value: Any, upper_open: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0 and (
        value < 1 if upper_open else value <= 1)
    if not ok:
        raise ConfigError(f"{field_name}={value!r} must be in [0, {'1)' if upper_open else '1]'} (e.g. 0.1)")


def _positive(field_name: str, value: Any, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field_name}={value!r} must be a positive {'integer' if integer else 'number'} (e.g. 8)")


#: ``adapter_config.json`` fields of every PEFT config that do not change what an adapter computes.


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share (HF PEFT's ``LycorisConfig`` and the fields of both its configs).

    Attributes:
        rank: the rank r of the factors (HF PEFT: ``r``).
        alpha: the scale numerator: ΔW is multiplied by ``alpha / rank`` (HF PEFT: ``alpha``).
        rank_dropout: probability of zeroing each output row of ΔW in training, in [0, 1).
        module_dropout: probability of skipping the whole update in a training forward, in [0, 1].
        use_effective_conv2d: factor convolutions with kernels larger than 1 in CP form (a core of shape
            (r, r, *kernel) and two (r, channels) factors; FedPara's Proposition 3) instead of flattening the kernel
            into the input dimension.
        init_weights: ``True``: ΔW starts at zero (one factor is zero); ``False``: every factor random.
        rank_pattern, alpha_pattern: per-module overrides, pattern → value (the target syntax; first match wins).
    """

    #: The layer class this method wraps its targets in.
    layer_class: ClassVar[type[LycorisLayer]] = LycorisLayer
    #: Values ``init_weights`` may take.
    init_choices: ClassVar[tuple[Any, ...]] = (True, False)
    #: The method's own ``adapter_config.json`` fields, besides those every LyCORIS config has.
    own_hf_fields: ClassVar[tuple[str, ...]] = ()

    rank: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("rank", self.rank, integer=True)
        _positive("alpha", self.alpha, integer=False)
        for key, rank in self.rank_pattern.items():
            _positive(f"rank_pattern[{key!r}]", rank, integer=True)
        for key, alpha in self.alpha_pattern.items():
            _positive(f"alpha_pattern[{key!r}]", alpha, integer=False)
        _probability("rank_dropout", self.rank_dropout, upper_open=True)
        _probability("module_dropout", self.module_dropout, upper_open=False)
        if not isinstance(self.use_effective_conv2d, bool):
            raise ConfigError(f"use_effective_conv2d={self.use_effective_conv2d!r} must be True or False")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in self.init_choices):
            raise ConfigError(f"init_weights={self.init_weights!r} must be one of "
                              f"{', '.join(repr(c) for c in self.init_choices)}")

    # -- per-module values -----------------------------------------------------------------------
    def rank_for(self, qualname: str) -> int:
        key = first_match(qualname, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_for(self, qualname: str) -> float:
        key = first_match(qualname, self.alpha_pattern)
        return self.alpha_pattern[key] if key is not None else self.alpha

    # -- wrapping --------------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second adapter of the same method only
            return type(module) is self.layer_class
        return spatial_dims(module) is not None

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        names: list[str] = []
        for field_name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:  # a typo would silently keep the default
                names = names or [n for n, _ in model.named_modules() if n]
                if not any(matches(n, key) for n in names):
                    raise ConfigError(
                        f"{field_name} key {key!r} matches no module of {type(model).__name__}; closest module names: "
                        f"{near_misses(key, names)}. Keys use the target_modules syntax (e.g. 'v_proj')"
                    )
        return targets

    def layer_options(self, qualname: str) -> dict[str, Any]:
        """The keyword arguments of the layer's ``add`` for the target ``qualname``."""
        return {"rank": self.rank_for(qualname), "alpha": self.alpha_for(qualname),
                "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "effective_conv": self.use_effective_conv2d, "init_weights": self.init_weights}

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, self.layer_class) else self.layer_class(module)
        cast(Any, layer).add(adapter_name, **self.layer_options(qualname))
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def hf_fields(self) -> dict[str, Any]:
        """The values of ``own_hf_fields`` to write."""
        return {}

    @classmethod
    def options_from_hf(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The config fields ``own_hf_fields`` give, read from an ``adapter_config.json`` dict."""
        return {}

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            alpha=self.alpha,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
            use_effective_conv2d=self.use_effective_conv2d,
            init_weights=self.init_weights,
            rank_pattern=exact_pattern(targets, self.rank_pattern, self.rank),
            alpha_pattern=exact_pattern(targets, self.alpha_pattern, self.alpha),
            **self.hf_fields(),
        )

    @classmethod
    def hf_field_names(cls) -> set[str]:
        common = ("r alpha rank_dropout module_dropout use_effective_conv2d init_weights target_modules "
                  "exclude_modules layers_to_transform layers_pattern rank_pattern alpha_pattern modules_to_save")
        return {*common.split(), *cls.own_hf_fields}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> LycorisConfig:
        unknown = hf_unknown_options(data, cls.hf_field_names(), cls.peft_type)
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 8),
            alpha=data.get("alpha", 8),
            rank_dropout=data.get("rank_dropout", 0.0) or 0.0,
            module_dropout=data.get("module_dropout", 0.0) or 0.0,
            use_effective_conv2d=bool(data.get("use_effective_conv2d", False)),
            init_weights=data.get("init_weights", True),
            rank_pattern=hf_pattern(data.get("rank_pattern") or {}, module_names),
            alpha_pattern=hf_pattern(data.get("alpha_pattern") or {}, module_names),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
            **cls.options_from_hf(data),
        )


def exact_pattern(targets: list[str], pattern: dict[str, Any], default: Any) -> dict[str, Any]:
    """``pattern`` written with the exact names of the targets it changes, which HF PEFT matches the same way."""
    out = {}
    for name in targets:
        key = first_match(name, pattern)
        if key is not None and pattern[key] != default:
            out[name] = pattern[key]
    return out
