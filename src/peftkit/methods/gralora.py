"""GraLoRA: granular low-rank adaptation, one small low-rank update per block of a k × k grid over the weight.

Paper: Jung et al., "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning"
(https://arxiv.org/abs/2505.20355). Hugging Face PEFT 0.21.2's ``GRALORA`` is the reference for everything below.

An adapted layer's input features are cut into k = ``gralora_k`` equal slices x_1 … x_k and its output features
likewise, so the weight W₀ (out × in) is a k × k grid of (out/k × in/k) blocks. Each block (j, n) gets its own
update of rank r/k, from slices of two trained tensors, A (k × in/k × r, ``gralora_A``) and B (k × r × out/k,
``gralora_B``); with A_n,j = A[n][:, j·r/k : (j+1)·r/k] and B_j,n = B[j][n·r/k : (n+1)·r/k]::

    ΔW_(j,n) = (A_n,j B_j,n)ᵀ                        (out/k × in/k, rank r/k)
    y_j = Σ_n B_j,nᵀ A_n,jᵀ x_n                      (each input slice reaches every output slice through its own pair)
    x ↦ W₀x + s·(ΔW d(x) + B_h A_h d'(x)),          s = α / (r + h)

So A and B hold as many numbers as a rank-r LoRA, and ΔW can reach rank k·r. The optional hybrid part is a plain
rank-h LoRA over the whole layer (h = ``hybrid_rank``; ``…<layer>.gralora_A_general.weight``, h × in, and
``gralora_B_general.weight``, out × h). d and d' are dropout, drawn separately for the two parts, as HF PEFT draws them.
Every A starts kaiming-uniform and every B at zero (the model unchanged), or kaiming-uniform too with
``init_weights=False``, drawn from torch's global generator in HF PEFT's order (block by block, then the hybrid part,
whose two ``nn.Linear`` draw once more when made), rounded to a half-precision base's dtype and kept in fp32.
``nn.Linear`` and GPT-2's ``Conv1D``, as in HF PEFT; merging adds s·ΔW (and the hybrid product) to the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, LinearKind, linear_kind, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.vera import _checked_bool, _checked_int

BIAS_MODES = ("none", "all", "gralora_only")


def granular(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x ΔWᵀ`` (unscaled) for the block-granular ΔW of ``A`` (k, in/k, r) and ``B`` (k, r, out/k); ``x`` (…, in)."""
    k, _, rank = A.shape
    h = torch.einsum("...ni,nir->...nr", x.reshape(*x.shape[:-1], k, -1), A)  # each input slice's r projections
    # Output slice j takes the j-th r/k of every input slice's projections, in input-slice order.
    h = h.reshape(*h.shape[:-1], k, rank // k).transpose(-3, -2).flatten(-2)
    return torch.einsum("...jr,jro->...jo", h, B).flatten(-2)


def granular_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) ΔW of ``granular``: block (j, n) is (A_n,j B_j,n)ᵀ."""
    k, sub_in, rank = A.shape
    sub_out = B.shape[2]
    blocks = torch.einsum("nijs,jnso->joni", A.view(k, sub_in, k, rank // k), B.view(k, k, rank // k, sub_out))
    return blocks.reshape(k * sub_out, k * sub_in)


def _kaiming(*shape: int) -> torch.Tensor:
    tensor = torch.empty(shape)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


def _supported(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D``, not quantized: HF PEFT 0.21.2's GraLoRA adds ΔW to a float weight."""
    return linear_kind(module) is not None and DEQUANTIZERS.lookup(type(module)) is None


class GraLoRALayer(DeltaLayer):
    """GraLoRA on ``nn.Linear`` or GPT-2's ``Conv1D``: ``base(x) + s·(x ΔWᵀ + x A_hᵀ B_hᵀ)``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    adapter_containers = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"GraLoRA cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear "
                                        "and GPT-2's Conv1D (as HF PEFT 0.21.2)")
        super().__init__(base_layer)
        kind = self.kind
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.gralora_A = nn.ParameterDict()
        self.gralora_B = nn.ParameterDict()
        self.gralora_A_general = nn.ModuleDict()  # the hybrid LoRA part, for adapters with hybrid_rank > 0
        self.gralora_B_general = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}

    def add(self, name: str, rank: int, hybrid_rank: int, k: int, *, alpha: float, dropout: float,
            init_weights: bool) -> None:
        """Add adapter ``name`` (``k`` divides both sizes and ``rank``: see ``GraLoRA.resolve``)."""
        sub_in, sub_out = self.in_features // k, self.out_features // k
        blocks = [(_kaiming(rank, sub_in), torch.zeros(sub_out, rank) if init_weights else _kaiming(sub_out, rank))
                  for _ in range(k)]  # drawn A, B, A, B, … as HF PEFT draws them
        weight = self.kind.weight(self.base_layer)
        base_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        # HF PEFT rounds the new tensors to the base dtype, then keeps fp32 over half precision.
        for container, stacked in ((self.gralora_A, torch.stack([a for a, _ in blocks])),
                                   (self.gralora_B, torch.stack([b for _, b in blocks]))):
            container[name] = nn.Parameter(stacked.transpose(1, 2).contiguous().to(base_dtype).to(**factory))
        if hybrid_rank > 0:
            # Made as HF PEFT makes them: both nn.Linear draw their weights when made, then A and B draw again.
            down = nn.Linear(self.in_features, hybrid_rank, bias=False)
            up = nn.Linear(hybrid_rank, self.out_features, bias=False)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(up.weight)
            else:
                nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))
            self.gralora_A_general[name] = down.to(base_dtype).to(**factory)
            self.gralora_B_general[name] = up.to(base_dtype).to(**factory)
        self.scaling[name] = alpha / (rank + hybrid_rank)
        self.dropout[name] = dropout

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)

    def _dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout[name]
        return F.dropout(x, p, self.training) if p > 0 else x

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·ΔW of adapter ``name`` with its hybrid part, (out, in), in fp32 over half-precision adapters."""
        with torch.no_grad():
            A, B = self.gralora_A[name], self.gralora_B[name]
            work = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
            delta = granular_delta(A.to(work), B.to(work))
            if name in self.gralora_A_general:
                down = cast(nn.Linear, self.gralora_A_general[name])
                up = cast(nn.Linear, self.gralora_B_general[name])
                delta = delta + up.weight.to(work) @ down.weight.to(work)
            return delta * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        dtype = result.dtype
        for name in names:
            A, B, scale = self.gralora_A[name], self.gralora_B[name], self.scaling[name]
            h = x.to(A.dtype)
            # Each part's update is rounded to the output's dtype before it is scaled, as HF PEFT orders it.
            result = result + scale * granular(self._dropped(h, name), A, B).to(dtype)
            if name in self.gralora_A_general:
                hybrid = self.gralora_B_general[name](self.gralora_A_general[name](self._dropped(h, name)))
                result = result + scale * hybrid.to(dtype)
        return result.to(x.dtype)


#: ``adapter_config.json`` fields of HF PEFT's GraloraConfig that select or compute something.
_HF_FIELDS = frozenset("r hybrid_r target_modules alpha gralora_dropout gralora_k fan_in_fan_out bias modules_to_save "
                       "init_weights layers_to_transform layers_pattern".split())


@register_method
@dataclass
class GraLoRA(AdaptedBiases, AdapterConfig):
    """GraLoRA: a rank-r/k update per block of a k × k grid over each adapted weight, plus an optional plain LoRA part
    (HF PEFT's ``GraloraConfig``; its field names in ``adapter_config.json`` are given below).

    Attributes:
        rank: r, the granular part's rank (HF PEFT: ``r``): as many parameters as a rank-r LoRA, each of the k × k
            blocks of rank r/k. A multiple of ``gralora_k``.
        hybrid_rank: h, the rank of the plain LoRA part over the whole layer (HF PEFT: ``hybrid_r``); 0: none.
        alpha: α; the update is scaled by α / (r + h).
        dropout: dropout probability on the adapter's input, in [0, 1) (HF PEFT: ``gralora_dropout``).
        gralora_k: k, the slices of the input and of the output (k × k blocks); it must divide ``rank`` and every
            target's input and output size. The paper suggests 2 for r ≤ 32 and 4 for r ≥ 64.
        init_weights: ``True``: B starts at zero, the model unchanged; ``False``: B random too (for tests).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"gralora_only"`` (the biases
            of the adapted layers).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a target whose input or output
            size ``gralora_k`` does not divide.
        UnsupportedLayerError: in ``pk.apply``, a target that is not ``nn.Linear`` or GPT-2's ``Conv1D``.
    """

    peft_type = "GRALORA"
    bias_layer = GraLoRALayer
    bias_only = "gralora_only"

    rank: int = 32
    hybrid_rank: int = 0
    alpha: float = 64
    dropout: float = 0.0
    gralora_k: int = 2
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        _checked_int("hybrid_rank", self.hybrid_rank, 0)
        _checked_int("gralora_k", self.gralora_k, 1)
        if self.rank % self.gralora_k:
            raise ConfigError(f"rank={self.rank} must be a multiple of gralora_k={self.gralora_k} (each of the k × k "
                              f"blocks has rank r/k); e.g. rank={self.gralora_k * max(1, self.rank // self.gralora_k)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha!r} must be a finite number (e.g. 2 × rank = {2 * self.rank})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        _checked_bool("init_weights", self.init_weights)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second GraLoRA adapter only
            return isinstance(module, GraLoRALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return [n for n in LINEAR_KINDS.names() if n in ("Linear", "Conv1D")]

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to split into k × k blocks before the model changes.

        Raises:
            ConfigError: ``gralora_k`` does not divide a target's input or output size (the message names the target,
                its sizes and the k that fit every target).
        """
        targets = super().resolve(model)
        sizes = {}
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, GraLoRALayer) else module
            kind = cast(LinearKind, linear_kind(base))
            sizes[name] = (kind.in_features(base), kind.out_features(base))
        for name, (fan_in, fan_out) in sizes.items():
            if fan_in % self.gralora_k or fan_out % self.gralora_k:
                common = math.gcd(*(d for pair in sizes.values() for d in pair))
                fits = [k for k in range(1, common + 1) if common % k == 0 and self.rank % k == 0]
                raise ConfigError(
                    f"gralora_k={self.gralora_k} must divide the input size {fan_in} and output size {fan_out} of "
                    f"{name}; choose a gralora_k that divides every target's sizes and rank={self.rank} (here: "
                    f"{fits}), or leave this layer out")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, GraLoRALayer) else GraLoRALayer(module)
        layer.add(adapter_name, self.rank, self.hybrid_rank, self.gralora_k, alpha=float(self.alpha),
                  dropout=float(self.dropout), init_weights=self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules",),
            r=self.rank,
            hybrid_r=self.hybrid_rank,
            alpha=self.alpha,
            gralora_dropout=self.dropout,
            gralora_k=self.gralora_k,
            fan_in_fan_out=False,  # set by save_adapter when a target stores its weight transposed
            bias=self.bias,
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> GraLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "GraLoRA")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 32),
            hybrid_rank=data.get("hybrid_r", 0),
            alpha=data.get("alpha", 64),
            dropout=float(data.get("gralora_dropout", 0.0) or 0.0),
            gralora_k=data.get("gralora_k", 2),
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
