"""OSF: orthogonal subspace fine-tuning — train the weakest singular directions, away from the strongest ones.

Paper: Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning", 2025
(https://arxiv.org/abs/2504.07097).

Each adapted layer's weight W₀ (out × in) is split by its SVD at the time the adapter is added::

    W₀ = U_h S_h V_hᵀ + U_l S_l V_lᵀ          (the top k = ``effective_rank`` directions, then the rest)

The high part stays frozen; the low part's factors U, s, V (initialised to U_l, diag S_l, V_lᵀ) train, and the layer
computes ``x ↦ W₀x + (U diag(s) V − U_l S_l V_lᵀ) x``, which is ``U_h S_h V_hᵀ x + U diag(s) V x``. The gradients of U
and V are projected orthogonally to the frozen subspace before they reach the parameters: ∇U ← (I − U_h U_hᵀ) ∇U and
∇V ← ∇V (I − V_hᵀ V_h), so training never moves the directions the base model relies on most. Where the SVD factor is
square the projector equals U_l U_lᵀ (V_lᵀ V_l), and only the low part is kept, as Hugging Face PEFT 0.21.2 (``OSF``)
does; the rank r = min(out, in) − k is what trains.

Files hold the trained factors only (``…<layer>.osf_svd_params.U_low``, ``S_low``, ``V_low``); the frozen parts are
derived again from the base weight, in both libraries. ``nn.Linear`` layers (HF PEFT's only kind); merging adds the
difference above to the weight, and unmerging subtracts it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.default_targets import model_type
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.vera import SharedProjection

#: model_type → OSF's default target_modules (HF PEFT's mapping); other models: every linear layer but the head.
OSF_TARGETS: dict[str, tuple[str, ...]] = {
    **{kind: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj") for kind in
       ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi")},
    **{kind: ("c_attn", "c_proj") for kind in ("gpt2", "gpt_bigcode")},
    **{kind: ("query_key_value", "dense_4h_to_h") for kind in ("bloom", "gpt_neox", "falcon")},
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
}
#: Frozen per-adapter tensors (never saved), under HF PEFT's attribute names.
_FROZEN = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high")

Rank = int | float | None


def resolve_rank(value: Rank, min_dim: int) -> int:
    """The preserved rank k for a weight whose smaller side is ``min_dim``: half of it for ``None``, a fraction of it
    for a float in (0, 1], else the integer itself, at most ``min_dim`` (HF PEFT's rule)."""
    if value is None:
        return min_dim // 2
    k = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, k), 0)


def _shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = cast(torch.Tensor, module.weight).shape
    return out_features, in_features


def _supported(module: nn.Module) -> bool:
    """An ``nn.Linear`` with a float weight: the SVD is of the weight itself."""
    return isinstance(module, nn.Linear) and DEQUANTIZERS.lookup(type(module)) is None


class _Projected(torch.autograd.Function):
    """The identity forward; backward hands on ``project(grad)`` (the gradient with the frozen directions removed)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.project = project
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.project(grad), None


class OSFLayer(DeltaLayer):
    """OSF on an ``nn.Linear``: ``base(x) + x (U diag(s) V − U_l S_l V_lᵀ)ᵀ``, ∇U and ∇V projected off the frozen
    singular directions.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not an ``nn.Linear`` (or is a quantized one).
    """

    adapter_containers = ("osf_svd_params",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"OSF cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear layers "
                                        "(HF PEFT's OSF adapts no other kind)")
        super().__init__(base_layer)
        self.out_features, self.in_features = _shape(base_layer)
        self.osf_svd_params = nn.ModuleDict()
        # Buffers that follow the layer across devices. Out of adapter files (derived from the base weight again), but
        # in the model's state dict: loading one onto a model whose base weights differ restores the split they had.
        for attr in _FROZEN:
            setattr(self, attr, SharedProjection(persistent=True))
        self.effective_rank: dict[str, int] = {}

    def frozen(self, attr: str) -> SharedProjection:
        store: SharedProjection = getattr(self, attr)
        return store

    def add(self, name: str, effective_rank: int, init_weights: bool, where: str) -> None:
        """Add adapter ``name``, freezing the top ``effective_rank`` singular directions of the current weight.

        Raises:
            ConfigError: ``effective_rank`` is below 1 (``where`` names the layer).
        """
        if effective_rank <= 0:
            raise ConfigError(f"OSF's effective_rank resolves to {effective_rank} at {where} ({self.out_features} × "
                              f"{self.in_features} weight); give it a rank of at least 1 (an integer, or a larger "
                              "fraction of the smaller side)")
        weight = cast(torch.Tensor, self.base_layer.weight).detach()
        u, s, vt = torch.linalg.svd(weight.float(), full_matrices=False)
        k = min(effective_rank, s.shape[0])
        # Rounded to the base dtype, then kept in fp32 over a half-precision base, as HF PEFT casts them.
        def kept(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous().to(weight.dtype).to(adapter_dtype(weight))

        low = [kept(t) for t in (u[:, k:], s[k:], vt[k:])]
        for attr, tensor in zip(_FROZEN[:3], low, strict=True):
            self.frozen(attr).add(name, tensor.clone())
        # The projector off a square factor's top part is its bottom part's; only a non-square one needs U_h / V_h.
        if self.out_features > self.in_features:
            self.frozen("_osf_U_high").add(name, kept(u[:, :k]))
        if self.out_features < self.in_features:
            self.frozen("_osf_V_high").add(name, kept(vt[:k]))
        if not init_weights:  # drawn from the global generator in HF PEFT's order, the frozen part unchanged
            low = [torch.randn_like(t.to(weight.dtype)).to(t.dtype) for t in low]
        self.osf_svd_params[name] = nn.ParameterDict({key: nn.Parameter(t) for key, t in
                                                      zip(("U_low", "S_low", "V_low"), low, strict=True)})
        self.effective_rank[name] = effective_rank

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for attr in _FROZEN:
            self.frozen(attr).remove(name)
        self.effective_rank.pop(name, None)

    def _project_u(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """∇U ↦ (I − U_h U_hᵀ) ∇U."""
        if name in self.frozen("_osf_U_high"):
            high = self.frozen("_osf_U_high")[name]
            return lambda grad: grad - high @ (high.T @ grad)
        low = self.frozen("_osf_U_low_init")[name]
        return lambda grad: low @ (low.T @ grad)

    def _project_v(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """∇V ↦ ∇V (I − V_hᵀ V_h)."""
        if name in self.frozen("_osf_V_high"):
            high = self.frozen("_osf_V_high")[name]
            return lambda grad: grad - (grad @ high.T) @ high
        low = self.frozen("_osf_V_low_init")[name]
        return lambda grad: (grad @ low.T) @ low

    def _params(self, name: str) -> nn.ParameterDict:
        return cast(nn.ParameterDict, self.osf_svd_params[name])

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), ΔW = A B: A = [U diag(s), −U_l S_l] (out × 2r), B = [V; V_lᵀ] (2r × in), gradients projected."""
        params = self._params(name)
        u: torch.Tensor = _Projected.apply(params["U_low"], self._project_u(name))  # type: ignore[no-untyped-call]
        v: torch.Tensor = _Projected.apply(params["V_low"], self._project_v(name))  # type: ignore[no-untyped-call]
        u0, s0, v0 = (self.frozen(attr)[name] for attr in _FROZEN[:3])
        return torch.cat([u * params["S_low"].unsqueeze(0), -(u0 * s0.unsqueeze(0))], dim=1), torch.cat([v, v0])

    def _delta(self, name: str) -> torch.Tensor:
        params = self._params(name)
        u0, s0, v0 = (self.frozen(attr)[name] for attr in _FROZEN[:3])
        current: torch.Tensor = (params["U_low"] * params["S_low"].unsqueeze(0)) @ params["V_low"]
        return current - (u0 * s0.unsqueeze(0)) @ v0

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` as (x Bᵀ) Aᵀ: rank 2r, ΔW never built."""
        a, b = self._factors(name)
        return F.linear(F.linear(x.to(a.dtype), b), a).to(x.dtype)


@register_method
@dataclass
class OSF(AdapterConfig):
    """OSF: the weakest singular directions of each layer train, orthogonally to the frozen strongest ones (HF PEFT's
    ``OSFConfig``, its field names and defaults).

    Attributes:
        effective_rank: k, the singular directions kept frozen per layer (min(out, in) − k train): an integer, a
            fraction in (0, 1] of the weight's smaller side, or ``None`` for half of it.
        rank_pattern: per-module k (integer or fraction), keyed by patterns in the ``target_modules`` syntax.
        init_weights: ``True``: the trained factors start as the weight's own (the model unchanged); ``False``: they
            are drawn from N(0, 1) (the frozen part still the weight's).
        target_svd_config: HF PEFT's field, kept and written back; neither library reads it.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a rank that resolves below 1 at
            some target.
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear``.
    """

    peft_type = "OSF"

    effective_rank: Rank = None
    rank_pattern: dict[str, int | float] = field(default_factory=dict)
    init_weights: bool = True
    target_svd_config: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = {"effective_rank": self.effective_rank, **{f"rank_pattern[{k!r}]": v for k, v in
                                                          self.rank_pattern.items()}}
        for key, value in ranks.items():
            if value is None and key == "effective_rank":
                continue
            whole = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not whole and not (isinstance(value, float) and 0 < value <= 1):
                raise ConfigError(f"{key}={value!r} must be a positive integer (the frozen rank, e.g. 16) or a "
                                  "fraction in (0, 1] of each weight's smaller side (e.g. 0.5)")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")
        if self.target_svd_config is not None and not isinstance(self.target_svd_config, dict):
            raise ConfigError(f"target_svd_config={self.target_svd_config!r} must be a dict or None")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: HF PEFT's defaults for the architecture, else every linear layer."""
        if self.target_modules:
            return self
        return self.replace(target_modules=list(OSF_TARGETS.get(model_type(model) or "", ("all-linear",))))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second OSF adapter only
            return isinstance(module, OSFLayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return ["Linear"]

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        check_pattern_keys(model, "rank_pattern", self.rank_pattern)
        for name in targets:  # every rank checked before the model changes
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, OSFLayer) else module
            if _supported(base):
                self._rank_at(name, min(_shape(base)))
        return targets

    def rank_for(self, qualname: str) -> Rank:
        """The configured k (integer, fraction or ``None``) at ``qualname``."""
        key = first_match(qualname, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.effective_rank

    def _rank_at(self, qualname: str, min_dim: int) -> int:
        k = resolve_rank(self.rank_for(qualname), min_dim)
        if k <= 0:
            raise ConfigError(f"effective_rank={self.rank_for(qualname)!r} resolves to {k} frozen directions at "
                              f"{qualname}, whose weight's smaller side is {min_dim}; use a rank of at least 1 there "
                              "(rank_pattern overrides it per module)")
        return k

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, OSFLayer) else OSFLayer(module)
        k = self._rank_at(qualname, min(layer.out_features, layer.in_features))
        layer.add(adapter_name, k, self.init_weights, qualname)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        # HF PEFT takes the first key whose regex it finds in the name: anchored names select exactly one module.
        pattern = {f"^{re.escape(n)}$": r for n in targets if (r := self.rank_for(n)) != self.effective_rank}
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules", "layers_to_transform", "layers_pattern"),
            effective_rank=self.effective_rank,
            rank_pattern=pattern or None,
            init_weights=self.init_weights,
            target_svd_config=self.target_svd_config,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> OSF:
        spec: dict[str, int | float] = data.get("rank_pattern") or {}
        pattern = {}
        for name in module_names:
            key = next((k for k in spec if re.search(k, name)), None)
            if key is not None:
                pattern[name] = spec[key]
        return cls(
            **hf_layer_fields(data, module_names),
            effective_rank=data.get("effective_rank"),
            rank_pattern=pattern,
            init_weights=bool(data.get("init_weights", True)),
            target_svd_config=data.get("target_svd_config"),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type effective_rank target_modules rank_pattern init_weights modules_to_save target_svd_config "
    "inference_mode base_model_name_or_path revision auto_mapping".split()
)
