"""Canonical LoRA: a separate adapter per logical part of a fused projection.

For a fused projection ``y = W_qkv x`` whose output rows split into parts q, k, v (contiguous with grouped-query
sizes, or interleaved per head as in GPT-NeoX and Falcon), canonical LoRA adds, per part p::

    y[rows_p] += s · B_p A_p dropout_p(x),        s = α/r  (α/√r with rsLoRA)

with A_p (r × in) and B_p (|rows_p| × r). On separate projections (Llama's q_proj, k_proj, v_proj) it is
ordinary LoRA on each. Performant LoRA (one A, one B over the whole fused output) equals canonical LoRA with
the A_p tied (seed 000, Megatron Bridge PEFT guide, "Performant LoRA Equivalence to Canonical LoRA with Tied
Weights"); :mod:`peftkit.methods.convert` converts between the two exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.matching import first_match, matches
from peftkit.core.registry import register_method
from peftkit.errors import ConfigError
from peftkit.methods.lora import LoRA
from peftkit.methods.lora_layers import LoRALayer, LoRALinear, adapter_dtype, init_factor, lora_layer_class
from peftkit.methods.roles import GROUP_ROLES, PART_OF_ROLE, fused_layout, role_modules


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _parts(container: nn.Module) -> nn.ModuleDict:
    """A canonical adapter's per-part modules (its ``lora_A``/``lora_B``/``lora_dropout`` entry)."""
    return cast(nn.ModuleDict, container)


class CanonicalLoRALinear(LoRALinear):
    """A fused linear layer with canonical adapters (one A, B per part) and possibly plain LoRA adapters.

    A canonical adapter's ``lora_A[name]`` and ``lora_B[name]`` are ``ModuleDict`` s keyed by part, so its
    tensors are named ``lora_A.q.weight``, ``lora_B.q.weight``, ... (peftkit's own layout; export with
    ``pk.save_adapter(..., layout="performant")`` for an HF PEFT adapter on the fused layer).

    Attributes:
        layout: part → its output rows of the fused projection, parts in order.
    """

    _perm: torch.Tensor | None
    mixes_rows: ClassVar[bool] = False  # its forward runs per part; pk.mixed_batch runs it without adapters

    def __init__(self, base_layer: nn.Module, layout: dict[str, torch.Tensor]) -> None:
        super().__init__(base_layer)
        self.layout = {part: rows.clone() for part, rows in layout.items()}
        order = torch.cat(list(self.layout.values()))
        identity = torch.equal(order, torch.arange(len(order)))
        # Concatenating the parts' outputs gives rows in ``order``; ``_perm`` puts them back in fused order.
        self.register_buffer("_perm", None if identity else torch.argsort(order), persistent=False)

    def is_canonical(self, name: str) -> bool:
        """True if adapter ``name`` has an A and B per part (not one over the whole fused output)."""
        return isinstance(self.lora_A[name], nn.ModuleDict)

    @staticmethod
    def is_canonical_adapter(tensors: dict[str, torch.Tensor]) -> bool:
        """True if an adapter's tensors (``adapter_tensors``) are per part (``lora_A.q.weight``)."""
        return "lora_A.weight" not in tensors

    def add_parts(self, name: str, parts: Sequence[str], rank: int, alpha: float, *, dropout: float = 0.0,
                  use_rslora: bool = False, init_A: str = "kaiming", init_B: str = "zero",
                  dropout_position: str = "pre") -> None:
        """Add canonical adapter ``name`` with an A and a B for each of ``parts`` (the others stay unadapted)."""
        unknown = [p for p in parts if p not in self.layout]
        if unknown:
            raise ConfigError(f"parts {unknown} are not parts of this fused layer; its parts are {list(self.layout)}")
        weight = self.kind.weight(self.base_layer)
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        A, B = nn.ModuleDict(), nn.ModuleDict()
        for part in self.layout:
            if part in parts:
                A[part] = nn.Linear(self.in_features, rank, bias=False, **factory)
                B[part] = nn.Linear(rank, len(self.layout[part]), bias=False, **factory)
                init_factor(_weight(A[part]), init_A, rank)
                init_factor(_weight(B[part]), init_B, rank)
        self.lora_A[name], self.lora_B[name] = A, B
        self._add_common(name, rank, alpha, 0.0, use_rslora, dropout_position)
        # One dropout per part, as separate adapters would have.
        self.lora_dropout[name] = nn.ModuleDict(
            {p: (nn.Dropout(dropout) if dropout > 0 else nn.Identity()) for p in A}
        )

    def _to_fused(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(pieces, dim=-1)
        return y if self._perm is None else y.index_select(-1, self._perm)

    def delta_weight(self, name: str) -> torch.Tensor:
        if not self.is_canonical(name):
            return super().delta_weight(name)
        A, B = _parts(self.lora_A[name]), _parts(self.lora_B[name])
        ref = _weight(next(iter(B.values())))
        pieces = [
            (_weight(B[p]) @ _weight(A[p])) if p in A else ref.new_zeros(len(rows), self.in_features)
            for p, rows in self.layout.items()
        ]
        return self._to_fused([t.T for t in pieces]).T * self.scaling[name]

    def _canonical_update(self, name: str, h: torch.Tensor) -> torch.Tensor:
        A, B, drops = _parts(self.lora_A[name]), _parts(self.lora_B[name]), _parts(self.lora_dropout[name])
        pre = self.dropout_position[name] == "pre"
        pieces = []
        for part, rows in self.layout.items():
            if part not in A:
                pieces.append(h.new_zeros(*h.shape[:-1], len(rows)))
            elif pre:
                pieces.append(B[part](A[part](drops[part](h))))
            else:
                pieces.append(drops[part](B[part](A[part](h))))
        return self._to_fused(pieces)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        for name in self._applied():
            if not self.is_canonical(name):
                result = result + self._module_update(name, x).to(result.dtype)
                continue
            A = self.lora_A[name]
            update = self._canonical_update(name, x.to(_weight(next(iter(_parts(A).values()))).dtype))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result


@register_method
@dataclass
class CanonicalLoRA(LoRA):
    """Canonical LoRA (Megatron Bridge ``CanonicalLoRA``): a separate A and B per logical part.

    Targets are those of :class:`~peftkit.methods.lora.LoRA`, usually the part roles ``linear_q``, ``linear_k``,
    ``linear_v``, ``linear_fc1_up``, ``linear_fc1_gate`` plus ``linear_proj`` and ``linear_fc2``. On a fused
    projection (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX/Falcon ``query_key_value``) a
    part role adapts that part; a group role (``linear_qkv``) or the module's own name adapts every part.

    Attributes:
        parts: pattern → the parts of a fused projection to adapt (``{"c_attn": ["q", "v"]}``); overrides the
            parts implied by role names. Filled in the saved config for fused layers adapted only in part.
    """

    peft_type = "CANONICAL_LORA"
    shares_A: ClassVar[bool] = False
    takes_weight_init: ClassVar[bool] = False  # a fused weight's parts would each need their own decomposition
    #: Part roles (``linear_q``) select parts of fused projections instead of being an error.
    adapts_parts: ClassVar[bool] = True

    parts: dict[str, list[str]] = field(default_factory=dict)

    takes_parameters = False
    takes_invocation_tokens = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_A:
            raise ConfigError("CanonicalLoRA has a separate A per part; shared_A must be empty (use pk.LoRA)")
        if self.lora_bias:
            raise ConfigError(
                "CanonicalLoRA does not support lora_bias=True (a trained bias on B); use pk.LoRA(lora_bias=True), "
                "which adapts a fused projection as a whole, or CanonicalLoRA with lora_bias=False"
            )
        self._plan: dict[str, tuple[dict[str, torch.Tensor], list[str]]] = {}

    def plan(self, model: nn.Module, targets: list[str]) -> dict[str, tuple[dict[str, torch.Tensor], list[str]]]:
        """Fused targets → (their part layout, the parts to adapt)."""
        modules = dict(model.named_modules())
        plan: dict[str, tuple[dict[str, torch.Tensor], list[str]]] = {}
        for name in targets:
            base = cast(nn.Module, getattr(modules[name], "base_layer", modules[name]))
            layout = fused_layout(model, name, getattr(base, "out_features", None) or _out_features(base))
            if layout is not None:
                plan[name] = (layout, self._parts_for(model, name, layout))
        return plan

    def _parts_for(self, model: nn.Module, name: str, layout: dict[str, torch.Tensor]) -> list[str]:
        key = first_match(name, self.parts)
        if key is not None:
            return [p for p in layout if p in self.parts[key]]
        wanted: set[str] = set()
        for pattern in self.target_modules:
            if pattern in PART_OF_ROLE:
                if name in role_modules(model, pattern):
                    wanted.add(PART_OF_ROLE[pattern])
            elif pattern in GROUP_ROLES or matches(name, pattern) or _alias_hits(model, pattern, name):
                wanted.update(layout)
        return [p for p in layout if p in wanted]

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        self._plan = self.plan(model, targets)
        return targets

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, LoRALayer):
            return isinstance(module, CanonicalLoRALinear) or type(module) is LoRALinear
        return lora_layer_class(module) is not None

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if qualname not in self._plan:
            return super().transform(module, qualname, adapter_name)
        layout, parts = self._plan[qualname]
        if isinstance(module, CanonicalLoRALinear):
            layer = module
        elif isinstance(module, LoRALayer):
            raise ConfigError(
                f"{qualname} already holds performant LoRA adapters; convert them first with pk.convert(model, "
                "to='canonical') or put the canonical adapter on a fresh model"
            )
        else:
            layer = CanonicalLoRALinear(module, layout)
        layer.add_parts(
            adapter_name, parts, self.rank_for(qualname), self.alpha_for(qualname), dropout=self.dropout,
            use_rslora=self.use_rslora, init_A=self.init_A, init_B=self.init_B,
            dropout_position=self.dropout_position,
        )
        return layer

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        data = super().to_hf_dict(targets, module_names)
        # Without fused targets this is plain LoRA on separate projections, which HF PEFT reads as is.
        data["peft_type"] = self.peft_type if self._plan else "LORA"
        return data

    def peftkit_fields(self) -> dict[str, Any]:
        fields = super().peftkit_fields()
        partial = {n: parts for n, (layout, parts) in self._plan.items() if len(parts) < len(layout)}
        if partial:
            fields["parts"] = partial
        return fields


def _out_features(module: nn.Module) -> int | None:
    from peftkit.core.registry import linear_kind

    kind = linear_kind(module)
    return kind.out_features(module) if kind is not None else None


def _alias_hits(model: nn.Module, pattern: str, name: str) -> bool:
    from peftkit.core.matching import ALIASES

    return pattern in ALIASES and name in ALIASES[pattern](model)
