"""HiRA: a high-rank weight update, the frozen weight modulated element-wise by a low-rank product.

Paper: Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models", ICLR 2025
(https://openreview.net/forum?id=TwJrTz9cRS).

Each adapted layer with weight W₀ trains factors A (r × in) and B (out × r); their product modulates W₀ entry by
entry, so ΔW can have full rank although it has only r·(in + out) parameters::

    x ↦ W₀x + ΔW dropout(x),      ΔW = W₀ ⊙ (B A)

(no scale factor: HiRA has no alpha). As in Hugging Face PEFT 0.21.2 (``HIRA``), on which every detail below is
modelled:

* ``nn.Linear``, GPT-2's ``Conv1D`` and quantized linears use the (out × in) weight (dequantized where needed).
* ``nn.Embedding`` (V × d) keeps ``hira_embedding_A`` (r × V) and ``hira_embedding_B`` (d × r); ΔW = W₀ ⊙ (B A)ᵀ is
  looked up without dropout.
* ``nn.Conv1d/2d/3d`` (groups = 1) keep A (r × in × kernel) and B (out × r × 1…); B A is the channel product per
  kernel position, and the update runs as the base convolution with weight ΔW and no bias.

Both factors are first drawn N(0, 1) from torch's global generator (A, then B); then, with ``init_weights=True``, A
is redrawn kaiming-uniform (``"gaussian"``: N(0, 1/r²) on linears) and B zeroed, the unchanged model; on embeddings
A is zeroed and B redrawn N(0, 1). Over a half-precision base they are rounded to its dtype and kept in fp32. Files
hold ``…<layer>.hira_A`` and ``hira_B`` (``hira_embedding_A``/``_B``). Merging adds W₀ ⊙ (B A) to the weight, W₀
being the weight before the first merge (kept, on the CPU, until the last unmerge restores it exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import check_pattern_keys, first_match
from peftkit.core.registry import LINEAR_KINDS, LinearKind, TypeRegistry, linear_kind, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_pattern, hf_unknown_options
from peftkit.methods.additive import merge_deltas, unmerge_deltas
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.delora import _checked_fraction
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.vera import _checked_int

INITS = (True, False, "gaussian")

#: Base layers HiRA adapts besides the linear-like ones (``LINEAR_KINDS``) → how it treats them.
HIRA_FORMS: TypeRegistry[str] = TypeRegistry()
HIRA_FORMS.register(nn.Embedding, "embedding")
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    HIRA_FORMS.register(_conv, "conv")


def layer_form(module: nn.Module) -> str | None:
    """``"linear"``, ``"embedding"`` or ``"conv"`` for a layer HiRA adapts, else ``None``."""
    if linear_kind(module) is not None:
        return "linear"
    return HIRA_FORMS.lookup(type(module))


def conv_groups(module: nn.Module) -> int:
    """The groups of a convolution HiRA might adapt (1 for any other layer): it refuses more than one."""
    return int(getattr(module, "groups", 1)) if layer_form(module) == "conv" else 1


def supported_names() -> list[str]:
    return sorted({*LINEAR_KINDS.names(), *HIRA_FORMS.names()})


class HiRALayer(AdapterLayer):
    """HiRA adapters on a linear-like layer, an embedding or a convolution: ``base(x) + update(x; W₀ ⊙ M)``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type, or a grouped convolution.
    """

    folds_into_weight = True
    adapter_containers = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        form = layer_form(base_layer)
        if form is None:
            raise UnsupportedLayerError(f"HiRA cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(supported_names())}")
        if conv_groups(base_layer) != 1:
            raise UnsupportedLayerError(f"HiRA cannot adapt a {type(base_layer).__name__} with groups="
                                        f"{conv_groups(base_layer)}: W₀ ⊙ (B A) needs an ungrouped kernel")
        super().__init__(base_layer)
        self.form = form
        self.hira_A = nn.ParameterDict()
        self.hira_B = nn.ParameterDict()
        self.hira_embedding_A = nn.ParameterDict()
        self.hira_embedding_B = nn.ParameterDict()
        self.dropout: dict[str, float] = {}
        #: W₀ while adapters are merged (HF PEFT keeps it likewise, on the CPU): the update and unmerging need it.
        self._original: torch.Tensor | None = None

    @property
    def kind(self) -> LinearKind:
        return cast(LinearKind, linear_kind(self.base_layer))  # looked up, not stored: kinds hold lambdas

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        if self.form == "linear":
            return (rank, self.kind.in_features(base)), (self.kind.out_features(base), rank)
        if self.form == "embedding":
            embedding = cast(nn.Embedding, base)
            return (rank, embedding.num_embeddings), (embedding.embedding_dim, rank)
        weight = cast(torch.Tensor, base.weight)  # (out, in, *kernel)
        return (rank, *weight.shape[1:]), (weight.shape[0], rank, *[1] * (weight.dim() - 2))

    def add(self, name: str, rank: int, dropout: float, init_weights: bool | str) -> None:
        """Add adapter ``name`` of rank ``rank``, drawn as HF PEFT draws it (see the module docstring)."""
        shape_a, shape_b = self._factor_shapes(rank)
        factor_a, factor_b = torch.randn(shape_a), torch.randn(shape_b)
        if init_weights is not False and self.form == "embedding":
            factor_a.zero_()
            nn.init.normal_(factor_b)
        elif init_weights is not False:
            if init_weights == "gaussian" and self.form == "linear":
                nn.init.normal_(factor_a, std=1 / rank)
            else:  # HF PEFT's convolutions take "gaussian" as True
                nn.init.kaiming_uniform_(factor_a, a=math.sqrt(5))
            factor_b.zero_()
        weight, stored = self._weight(), getattr(self.base_layer, "weight", None)
        for container, factor in ((self.hira_embedding_A, factor_a), (self.hira_embedding_B, factor_b)) \
                if self.form == "embedding" else ((self.hira_A, factor_a), (self.hira_B, factor_b)):
            if isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point:
                factor = factor.to(stored.dtype)  # HF PEFT rounds to the base dtype, then keeps fp32 over half
            container[name] = nn.Parameter(factor.to(weight.device, adapter_dtype(weight)))
        self.dropout[name] = dropout

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.dropout.pop(name, None)

    # -- the update ---------------------------------------------------------------------------------
    def _weight(self) -> torch.Tensor:
        """The base weight as it is now, in the orientation of M (linear: out × in, dequantized)."""
        if self.form == "linear":
            return self.kind.weight(self.base_layer)
        return cast(torch.Tensor, self.base_layer.weight)

    def _w0(self) -> torch.Tensor:
        """W₀: the weight before any merge."""
        weight = self._weight()
        if self._original is None:
            return weight
        return self._original.to(weight.device, weight.dtype)

    def modulation(self, name: str) -> torch.Tensor:
        """M = B A of adapter ``name`` in the weight's shape and orientation, in the factors' dtype
        (differentiable)."""
        if self.form == "embedding":
            product: torch.Tensor = self.hira_embedding_B[name] @ self.hira_embedding_A[name]
            return product.T
        factor_a: torch.Tensor = self.hira_A[name]
        factor_b: torch.Tensor = self.hira_B[name]
        if self.form == "linear":
            return factor_b @ factor_a
        return (factor_b.flatten(1) @ factor_a.flatten(1)).reshape(self._weight().shape)

    def delta_weight(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self._w0() * self.modulation(name)

    def _update(self, name: str, x: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:
        """The layer's own operation on ``x`` with weight ``effective`` = W₀ ⊙ M and no bias."""
        if self.form == "embedding":
            return F.embedding(x, effective)  # as HF PEFT: no padding_idx, max_norm or dropout here
        p = self.dropout[name]
        h = x.to(effective.dtype)
        h = F.dropout(h, p, self.training) if p > 0 else h
        if self.form == "linear":
            return F.linear(h, effective)
        # The base convolution's own forward: its stride, padding (any padding_mode) and dilation.
        conv = cast(nn.Conv1d | nn.Conv2d | nn.Conv3d, self.base_layer)
        return cast(torch.Tensor, conv._conv_forward(h, effective, None))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        dtype, w0 = result.dtype, self._w0()  # fp32 updates over a half-precision base, summed, then rounded
        for name in names:
            result = result + self._update(name, x, w0 * self.modulation(name))
        return result.to(dtype)

    # -- merging: W ← W ± W₀ ⊙ M ----------------------------------------------------------------------
    def _read(self) -> torch.Tensor:
        if self.form == "linear":
            return (self.kind.merge_weight or self.kind.weight)(self.base_layer).detach()
        weight = cast(torch.Tensor, self.base_layer.weight).detach()
        return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight  # one rounding

    def _write(self, value: torch.Tensor) -> None:
        if self.form == "linear":
            self.kind.set_weight(self.base_layer, value)
        else:
            weight = cast(torch.Tensor, self.base_layer.weight)
            weight.copy_(value.to(weight.device, weight.dtype))

    @torch.no_grad()
    def _fold(self, name: str, sign: float, safe: bool = False, where: str = "") -> None:
        if sign < 0 and self.merged_adapters == [name] and self._original is not None:
            self._write(self._original)  # the last one out: W₀ exactly, not W₀ up to rounding
            self._original = None
            return
        weight = self._read()
        original = weight if self._original is None else self._original.to(weight.device, weight.dtype)
        folded = weight + sign * original * self.modulation(name).to(weight.dtype)
        if safe:
            self.check_finite(folded, where or type(self.base_layer).__name__, name)
        if self._original is None:
            self._original = weight.clone().cpu()
        self._write(folded)

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where, fold=self._fold)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names, fold=self._fold)


#: ``adapter_config.json`` fields of HF PEFT's HiraConfig that select or compute something.
_HF_FIELDS = frozenset("r hira_dropout fan_in_fan_out init_weights target_modules exclude_modules modules_to_save "
                       "layers_to_transform layers_pattern rank_pattern".split())


@register_method
@dataclass
class HiRA(AdapterConfig):
    """HiRA: the frozen weight modulated by a low-rank product, ΔW = W₀ ⊙ (B A) (HF PEFT's ``HiraConfig``).

    Attributes:
        rank: r, the rank of A and B (HF PEFT: ``r``); ΔW itself is generally of full rank.
        dropout: dropout probability on the update's input in training, in [0, 1) (HF PEFT: ``hira_dropout``; not
            applied on embeddings, as in HF PEFT).
        fan_in_fan_out: HF PEFT's field, written to ``adapter_config.json``; peftkit reads the weight's orientation
            from the layer type (``Conv1D`` stores it transposed), which is what HF PEFT ends up doing.
        init_weights: ``True``: A kaiming-uniform and B = 0, the unchanged model at first; ``"gaussian"``: A drawn
            N(0, 1/r²) on linear layers instead; ``False``: A and B stay N(0, 1), so the model changes at once (for
            tests). On embeddings ``True`` and ``"gaussian"`` give A = 0 and B ~ N(0, 1).
        rank_pattern: per-module r, keyed by patterns in the ``target_modules`` syntax.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a pattern key matching no module.
        UnsupportedLayerError: in ``pk.apply``, a target HiRA cannot adapt (a grouped convolution included).
    """

    peft_type = "HIRA"

    rank: int = 32
    dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        for key, value in self.rank_pattern.items():
            _checked_int(f"rank_pattern[{key!r}]", value, 1)
        _checked_fraction("dropout", self.dropout)
        if not isinstance(self.fan_in_fan_out, bool):
            raise ConfigError(f"fan_in_fan_out={self.fan_in_fan_out!r} must be True or False")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in INITS):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True, False or 'gaussian'")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's HiRA adapts on this architecture (LoRA's)."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second HiRA adapter only
            return isinstance(module, HiRALayer)
        return layer_form(module) is not None

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, grouped convolutions refused by name before the model changes."""
        targets = super().resolve(model)
        for name in targets:
            module = model.get_submodule(name)
            groups = conv_groups(getattr(module, "base_layer", module))
            if groups != 1:
                raise UnsupportedLayerError(f"HiRA cannot adapt {name}, a convolution with groups={groups} (W₀ ⊙ "
                                            "(B A) needs an ungrouped kernel, as in HF PEFT); leave it out of "
                                            "target_modules")
        check_pattern_keys(model, "rank_pattern", self.rank_pattern)
        return targets

    def rank_for(self, qualname: str) -> int:
        key = first_match(qualname, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.rank

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, HiRALayer) else HiRALayer(module)
        layer.add(adapter_name, self.rank_for(qualname), float(self.dropout), self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        # Patterns name each changed module exactly, which HF PEFT's (.*\.)?(KEY)$ matching takes as that module.
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            hira_dropout=self.dropout,
            fan_in_fan_out=self.fan_in_fan_out,  # set by save_adapter when a target stores its weight transposed
            init_weights=self.init_weights,
            rank_pattern={n: r for n in targets if (r := self.rank_for(n)) != self.rank},
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> HiRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "HiRA")
        init = data.get("init_weights", True)  # HF PEFT's linears take None as False
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 32),
            dropout=data.get("hira_dropout", 0.0),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            init_weights=False if init is None else init,
            rank_pattern=hf_pattern(data.get("rank_pattern") or {}, module_names),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
