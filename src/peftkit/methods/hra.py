"""HRA: Householder reflection adaptation.

Paper: Yuan, Zhou, Wang and Xu, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024 (https://arxiv.org/abs/2405.17484).

The frozen weight W₀ (out × n; a convolution's kernel flattened into n = in·k·k) is multiplied on its input side by
a chain of r Householder reflections, one per column u_i of the trained matrix U (n × r)::

    W = W₀ H₁ H₂ … H_r        H_i = I − 2 u_i u_iᵀ / ‖u_i‖²        x ↦ W x + b

R = H₁ … H_r is orthogonal, so the update keeps the angles between W₀'s rows. With ``apply_GS`` the columns are
first made orthonormal by Gram–Schmidt (q_i), and the chain collapses to one reflection of their span:
R = I − 2 Q Qᵀ. Several active adapters compose in their active order, W = W₀ R_a R_b, as in Hugging Face PEFT;
merging multiplies the weight by R and unmerging by Rᵀ = R⁻¹ (the reflections in reverse order).

Tensor name (``hra_u``), shape, initialisation and ``adapter_config.json`` follow Hugging Face PEFT 0.21.2: with
``init_weights`` each column is drawn once (Kaiming-uniform) and repeated, u₁ = u₂, u₃ = u₄, …, so every pair of
reflections cancels and W = W₀ at the start. That needs an even r, and no Gram–Schmidt: orthogonalising a repeated
column leaves rounding noise, which HF PEFT normalises into an arbitrary direction (its output changes at the
start, from numbers no seed fixes). Both cases are refused here; ``init_weights=False`` draws every column, which is
what HF PEFT does for them. Layers: ``nn.Linear`` and ``nn.Conv2d`` with a square kernel and no groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, TypeRegistry, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.ordered import merge_in_order, reordering, unmerge_in_order

#: Base layers HRA adapts (those HF PEFT adapts) → their number of spatial dimensions.
HRA_KINDS: TypeRegistry[int] = TypeRegistry()
HRA_KINDS.register(nn.Linear, 0)
HRA_KINDS.register(nn.Conv2d, 2)
BIAS_MODES = ("none", "all", "hra_only")


def unsupported_reason(module: nn.Module) -> str | None:
    """Why HRA cannot adapt ``module`` (``None``: it can)."""
    kind = type(module).__name__
    if DEQUANTIZERS.lookup(type(module)) is not None or HRA_KINDS.lookup(type(module)) is None:
        return f"HRA cannot adapt a {kind}; supported layer types: {', '.join(HRA_KINDS.names())}"
    if isinstance(module, nn.Conv2d):
        # HF PEFT sizes U for in·k₀·k₀ rows and refuses groups: its files exist for no other convolution.
        if module.groups > 1:
            return f"HRA cannot adapt a Conv2d with groups={module.groups} (HF PEFT 0.21.2 refuses it too)"
        if module.kernel_size[0] != module.kernel_size[1]:
            return (f"HRA cannot adapt a Conv2d with the non-square kernel {tuple(module.kernel_size)}: HF PEFT "
                    "0.21.2 sizes hra_u for a square one, so no file of it would load there")
    return None


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """The columns of ``u`` (n × r) made orthonormal in order (q₁ ∝ u₁, q₂ ∝ u₂ − (q₁ᵀu₂) q₁, …).

    The operations are HF PEFT's, one after another, so the two libraries round alike.
    """
    q = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
    for i in range(1, u.shape[1]):
        ui = u[:, i].view(-1, 1)
        for qj in q:
            ui = ui - (qj.t() @ ui) * qj
        q.append((ui / ui.norm()).view(-1, 1))
    return torch.cat(q, dim=1)


def reflect(m: torch.Tensor, u: torch.Tensor, apply_gs: bool, inverse: bool = False) -> torch.Tensor:
    """``m R`` (``inverse``: ``m Rᵀ = m R⁻¹``) for the reflections of the columns of ``u``; ``m``: (…, n).

    Each reflection is applied as m − 2 (m u) uᵀ, never building the n × n matrix R.
    """
    if apply_gs:  # R = I − 2 Q Qᵀ is symmetric: its own inverse
        q = gram_schmidt(u)
        return m - 2 * (m @ q) @ q.t()
    u = u / u.norm(dim=0)
    columns = range(u.shape[1] - 1, -1, -1) if inverse else range(u.shape[1])
    for i in columns:
        ui = u[:, i : i + 1]
        m = m - 2 * (m @ ui) @ ui.t()
    return m


class HRALayer(AdapterLayer):
    """HRA adapters on an ``nn.Linear`` or a square, ungrouped ``nn.Conv2d``: ``x ↦ (W₀ R) x + b``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type, grouped, or has a non-square kernel.
    """

    folds_into_weight = True
    adapter_containers = ("hra_u",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        reason = unsupported_reason(base_layer)
        if reason is not None:
            raise UnsupportedLayerError(reason)
        weight = cast(torch.Tensor, base_layer.weight)
        #: The dimension the reflections act on: in_features, or in_channels·k·k.
        self.rows = math.prod(weight.shape[1:])
        self.hra_u = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.apply_GS: dict[str, bool] = {}

    def add(self, name: str, rank: int, *, apply_GS: bool = False, init_weights: bool = True) -> None:
        """Add adapter ``name``: U of ``self.rows`` × ``rank``, drawn from the global generator as HF PEFT draws it
        (on the CPU, then moved; over a half-precision base rounded to its dtype, kept in fp32)."""
        if init_weights:  # one column per pair, repeated: the pairs of reflections cancel
            half = torch.zeros(self.rows, rank // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            u = torch.empty(self.rows, rank)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        weight = cast(torch.Tensor, self.base_layer.weight)
        self.hra_u[name] = nn.Parameter(u.to(weight.dtype).to(weight.device, adapter_dtype(weight)))
        self.rank[name] = rank
        self.apply_GS[name] = apply_GS

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.rank.pop(name, None)
        self.apply_GS.pop(name, None)

    def rotated(self, weight: torch.Tensor, names: Sequence[str], inverse: bool = False) -> torch.Tensor:
        """``weight`` (the base layer's shape) times R of each adapter in ``names`` in turn (``inverse``: times
        Rᵀ), in the adapters' dtype."""
        m = weight.reshape(weight.shape[0], -1)
        for name in names:
            u = self.hra_u[name]
            m = reflect(m.to(u.dtype), u, self.apply_GS[name], inverse)
        return m.reshape(weight.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._applied()
        if not names:
            return cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        weight = self.rotated(cast(torch.Tensor, self.base_layer.weight), names)
        bias = self.bias.to(weight.dtype) if self.bias is not None else None
        h = x.to(weight.dtype)  # computed in the adapters' dtype (fp32 over a half-precision base), as in HF PEFT
        if isinstance(self.base_layer, nn.Conv2d):  # its own stride, padding (any mode) and dilation
            out = cast(torch.Tensor, self.base_layer._conv_forward(h, weight, bias))
        else:
            out = F.linear(h, weight, bias)
        return out.to(x.dtype)

    # -- merging: W₀ ← W₀ R, and back with Rᵀ ----------------------------------------------------------
    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        """Refuse a merge that would reorder the active adapters: the merged ones act first (they are in the weight),
        and reflections do not commute."""
        order = reordering(self, names)
        if order is not None:
            before, after = order
            raise MergeError(
                f"merging {list(names)} at {where or type(self.base_layer).__name__} would apply the active HRA "
                f"adapters in the order {after} instead of {before} (reflections do not commute); merge them in "
                "their active order (pk.merge(model) merges every active adapter)"
            )

    @torch.no_grad()
    def _fold(self, name: str, inverse: bool, safe: bool = False, where: str = "") -> None:
        weight = cast(torch.Tensor, self.base_layer.weight)
        folded = self.rotated(weight, [name], inverse)
        if safe:
            self.check_finite(folded, where or type(self.base_layer).__name__, name)
        weight.copy_(folded.to(weight.dtype))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_in_order(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take merged adapters out of the weight: the weight is W₀ R₁ R₂ …, so those merged after the first one
        asked for come out too (last first) and go back in afterwards."""
        unmerge_in_order(self, names)


def _checked_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} must be True or False")


#: ``adapter_config.json`` fields of every PEFT config that do not change what an adapter computes.
_HF_FIELDS = frozenset(
    "r apply_GS target_modules exclude_modules init_weights layers_to_transform layers_pattern bias "
    "modules_to_save".split())


@register_method
@dataclass
class HRA(AdaptedBiases, AdapterConfig):
    """HRA: ``x ↦ (W₀ H₁ … H_r) x + b`` with Householder reflections H_i = I − 2 u_i u_iᵀ/‖u_i‖² (HF PEFT's
    ``HRAConfig``).

    Attributes:
        rank: the number r of reflections, the columns of ``hra_u`` (HF PEFT: ``r``); even with ``init_weights``.
        apply_GS: orthonormalise the columns by Gram–Schmidt first, so that R = I − 2 Q Qᵀ. R is then never the
            identity (the output changes from the start), and ``init_weights=False`` is needed.
        init_weights: ``True``: repeated pairs of columns, so R = I at first; ``False``: every column random.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"hra_only"`` (the biases of
            the adapted layers).

    Raises:
        ConfigError: a field out of range (named with its value), an odd rank or ``apply_GS`` with
            ``init_weights=True``; in ``pk.apply``, ``apply_GS`` with more reflections than a target has rows.
        UnsupportedLayerError: in ``pk.apply``, a target HRA cannot adapt (see :func:`unsupported_reason`).
    """

    peft_type = "HRA"
    bias_layer = HRALayer
    bias_only = "hra_only"

    rank: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank={self.rank!r} must be a positive integer (e.g. 8)")
        _checked_bool("apply_GS", self.apply_GS)
        _checked_bool("init_weights", self.init_weights)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        if self.init_weights and self.rank % 2:
            raise ConfigError(
                f"rank={self.rank} is odd: init_weights=True starts from pairs of equal reflections (R = I), which "
                "needs an even rank; use an even rank, or init_weights=False for random reflections (what HF PEFT "
                "does for an odd r, with a warning)"
            )
        if self.init_weights and self.apply_GS:
            raise ConfigError(
                "apply_GS=True needs init_weights=False: Gram-Schmidt of init_weights' repeated columns normalises "
                "rounding noise (HF PEFT starts from the arbitrary reflections that gives), and with apply_GS R is "
                "never the identity anyway"
            )

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second HRA adapter only
            return isinstance(module, HRALayer)
        return DEQUANTIZERS.lookup(type(module)) is None and HRA_KINDS.lookup(type(module)) is not None

    def supported_layer_names(self) -> list[str]:
        return HRA_KINDS.names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked before the model changes (a grouped or non-square Conv2d is refused)."""
        targets = super().resolve(model)
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, HRALayer) else module
            reason = unsupported_reason(base)
            if reason is not None:
                raise UnsupportedLayerError(f"{name}: {reason}")
            rows = math.prod(cast(torch.Tensor, base.weight).shape[1:])
            if self.apply_GS and self.rank > rows:
                raise ConfigError(f"rank={self.rank} with apply_GS: {name} has only {rows} dimensions to make "
                                  "orthonormal; use a rank of at most that")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, HRALayer) else HRALayer(module)
        layer.add(adapter_name, self.rank, apply_GS=self.apply_GS, init_weights=self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            apply_GS=self.apply_GS,
            init_weights=self.init_weights,
            bias=self.bias,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> HRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "HRA")
        rank, apply_gs = data.get("r", 8), bool(data.get("apply_GS", False))
        # Where HF PEFT cannot start from R = I (an odd r, Gram-Schmidt) it or peftkit draws every column; the
        # file's values replace them either way.
        init = bool(data.get("init_weights", True)) and not apply_gs and not (isinstance(rank, int) and rank % 2)
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=rank,
            apply_GS=apply_gs,
            init_weights=init,
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
