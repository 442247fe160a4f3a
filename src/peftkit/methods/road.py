"""RoAd: 2-D rotation adaptation of each adapted layer's output.

Paper: Liao and Monz, "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability", NeurIPS 2024 (https://arxiv.org/abs/2409.00119). Hugging Face PEFT 0.21.2's ``ROAD`` is the
reference for everything below.

The output h = W₀x + b of a layer (out features) is cut into groups of g = ``group_size`` features; in each group,
feature i of the first half is paired with feature i of the second half, and every pair (h₁, h₂) is turned by a
scaled 2-D rotation::

    y₁ = c₁ h₁ − s₁ h₂        y₂ = c₂ h₂ + s₂ h₁        c = α cos θ,  s = α sin θ
    i.e.  y = c ⊙ h + s ⊙ rot(h),  rot(h) = (−h₂, h₁) in every group    (Eq. 4 of the paper)

The variants differ in how many (θ, α) a layer trains (``road_theta`` and ``road_alpha``, HF PEFT's keys):

* ``road_1``: out/2 of each, one angle and scale per pair (both features of a pair share them);
* ``road_2``: out of each, one per feature;
* ``road_4``: 2·out of each, laid out per group as [g for c, g for s]: c = α_c cos θ_c, s = α_s sin θ_s.

θ = 0 and α = 1 at first (R = I, the model unchanged); ``init_weights=False`` draws θ ~ N(0, 0.5²) and then
α ~ N(1, 0.5²) from torch's global generator, as HF PEFT does. Several active adapters turn the output one after the
other, in their order. Since R(W₀x + b) = (RW₀)x + Rb, merging turns the weight's rows and the bias (no dense R is
built), and unmerging applies the inverse 2 × 2 blocks, themselves a map of the same form. In ``pk.mixed_batch`` each
row of the output is turned by its own adapter (HF PEFT's ``adapter_names=``). ``nn.Linear`` and quantized linear
layers only (HF PEFT: ``nn.Linear`` and bitsandbytes' linears; not GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LinearKind, linear_kind, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods import lora_mixed
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.miss import is_linear, supported_names
from peftkit.methods.ordered import merge_in_order, reordering, unmerge_in_order

VARIANTS = ("road_1", "road_2", "road_4")
#: Trained angles (and scales) per output feature of each variant.
PARAMS_PER_FEATURE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def coefficients(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, s)``, one of each per output feature, from a variant's angles θ and scales α."""
    if variant == "road_1":  # one (θ, α) per pair: each half-group's values serve both halves
        theta = theta.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
        alpha = alpha.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
    elif variant == "road_4":  # per group: g values for c, then g for s
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return alpha[:, 0].flatten() * theta[:, 0].flatten().cos(), alpha[:, 1].flatten() * theta[:, 1].flatten().sin()
    return alpha * theta.cos(), alpha * theta.sin()


def rotate(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``c ⊙ h + s ⊙ rot(h)`` over the last dimension of ``h``, rot(h) = (−h₂, h₁) in every group of ``group_size``."""
    halves = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    turned = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).reshape(h.shape)
    return h * c + turned * s


def inverse(c: torch.Tensor, s: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(c', s')`` that undo ``rotate`` with ``(c, s)``: each pair's block [[c₁, −s₁], [s₂, c₂]] has the inverse
    [[c₂, s₁], [−s₂, c₁]] / (c₁c₂ + s₁s₂), which is again of that form."""
    pairs_c, pairs_s = c.reshape(-1, 2, group_size // 2), s.reshape(-1, 2, group_size // 2)
    det = (pairs_c[:, 0] * pairs_c[:, 1] + pairs_s[:, 0] * pairs_s[:, 1]).unsqueeze(1)
    return (pairs_c.flip(1) / det).flatten(), (-pairs_s / det).flatten()


class RoAdLayer(AdapterLayer):
    """RoAd adapters on an ``nn.Linear`` or a quantized linear layer: ``R_k ⋯ R_1 base(x)``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type (GPT-2's ``Conv1D`` included, as in HF PEFT).
    """

    folds_into_weight = True
    adapter_containers = ("road_theta", "road_alpha")
    #: Rows of one batch may go through different adapters here (``pk.mixed_batch``, HF PEFT's ``adapter_names=``).
    mixes_rows: ClassVar[bool] = True
    #: The block's routing while ``pk.mixed_batch`` runs (set on the instance, outside the module state).
    _mixed: ClassVar[Any] = None

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear(base_layer):
            raise UnsupportedLayerError(f"RoAd cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(supported_names())}")
        super().__init__(base_layer)
        self.out_features = self.kind.out_features(base_layer)
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}

    @property
    def kind(self) -> LinearKind:
        return cast(LinearKind, linear_kind(self.base_layer))  # looked up, not stored: kinds hold lambdas

    def add(self, name: str, variant: str, group_size: int, init_weights: bool = True) -> None:
        """Add adapter ``name``: θ = 0 and α = 1, or (``init_weights=False``) drawn on the CPU as HF PEFT draws them;
        over a half-precision base rounded to its dtype and kept in fp32, as HF PEFT does."""
        size = int(self.out_features * PARAMS_PER_FEATURE[variant])
        theta, alpha = torch.zeros(size), torch.ones(size)
        if not init_weights:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        weight, stored = self.kind.weight(self.base_layer), getattr(self.base_layer, "weight", None)
        if isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point:
            theta, alpha = theta.to(stored.dtype), alpha.to(stored.dtype)
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.road_theta[name] = nn.Parameter(theta.to(**factory))
        self.road_alpha[name] = nn.Parameter(alpha.to(**factory))
        self.variant[name], self.group_size[name] = variant, group_size

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.variant.pop(name, None)
        self.group_size.pop(name, None)

    def coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s ``(c, s)`` per output feature (differentiable)."""
        return coefficients(self.variant[name], self.group_size[name], self.road_theta[name], self.road_alpha[name])

    def turn(self, h: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``h`` (base outputs) turned by adapters ``names`` in turn, in the adapters' dtype (fp32 over a
        half-precision base, as in HF PEFT), returned in ``h``'s dtype."""
        out = h
        for name in names:
            out = rotate(out.to(self.road_theta[name].dtype), *self.coefficients(name), self.group_size[name])
        return out.to(h.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self._mixed
        if routing is not None:
            lora_mixed.check_layer(self, routing)
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        if routing is None:
            return self.turn(result, self._applied())
        out = result  # pk.mixed_batch: each adapter's rows turned by it, "__base__" rows left as they are
        for name, rows in routing.groups(self, x.shape[0], x.device):
            if self.has_adapter(name):
                out = out.index_copy(0, rows, self.turn(result.index_select(0, rows), [name]))
        return out

    # -- merging: W ← RW, b ← Rb (and back with R⁻¹) ---------------------------------------------------
    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        """Refuse a merge that would reorder the active adapters (the merged ones act first, and rotations of
        different variants or group sizes do not commute) or that could not be undone (a singular pair)."""
        where = where or type(self.base_layer).__name__
        order = reordering(self, names)
        if order is not None:
            raise MergeError(f"merging {list(names)} at {where} would apply the active RoAd adapters in the order "
                             f"{order[1]} instead of {order[0]}; merge them in their active order (pk.merge(model) "
                             "merges every active adapter)")
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            with torch.no_grad():
                c, s = inverse(*self.coefficients(name), self.group_size[name])
            if not bool(torch.isfinite(c).all() and torch.isfinite(s).all()):
                raise MergeError(f"RoAd adapter {name!r} at {where} maps some pair of outputs to zero (α = 0, or "
                                 "c₁c₂ + s₁s₂ = 0); merging could not be undone. Keep it unmerged")

    @torch.no_grad()
    def _fold(self, name: str, undo: bool, safe: bool = False, where: str = "") -> None:
        kind, group_size = self.kind, self.group_size[name]
        c, s = self.coefficients(name)
        work_dtype = torch.float64 if c.dtype == torch.float64 else torch.float32  # one rounding, at the end
        c, s = c.to(work_dtype), s.to(work_dtype)
        if undo:
            c, s = inverse(c, s, group_size)
        weight = (kind.merge_weight or kind.weight)(self.base_layer).detach()
        folded = rotate(weight.to(work_dtype).T, c, s, group_size).T  # the rows are the outputs
        if safe:
            self.check_finite(folded, where or type(self.base_layer).__name__, name)
        kind.set_weight(self.base_layer, folded.to(weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(rotate(bias.to(work_dtype), c, s, group_size).to(bias.dtype))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_in_order(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take merged adapters out of the weight: it holds R_k ⋯ R_1 W₀, so those merged after the first one asked
        for come out too (last first) and go back in afterwards."""
        unmerge_in_order(self, names)


#: ``adapter_config.json`` fields of RoAd (besides HF PEFT's bookkeeping).
_HF_FIELDS = frozenset("variant group_size init_weights target_modules modules_to_save".split())


@register_method
@dataclass
class RoAd(AdapterConfig):
    """RoAd: each adapted layer's output turned pairwise by trained scaled 2-D rotations (HF PEFT's ``RoadConfig``,
    its field names and defaults).

    Attributes:
        variant: ``"road_1"`` (out/2 angles and out/2 scales per layer), ``"road_2"`` (out of each) or ``"road_4"``
            (2·out of each); see the module docstring.
        group_size: g, the features grouped together: feature i of a group pairs with feature i + g/2. An even
            number dividing every target's output size (64, HF PEFT's default, suits kernels such as vLLM's; small
            models need a smaller one). It does not change what the method can learn.
        init_weights: ``True``: θ = 0 and α = 1, the model unchanged at first; ``False``: θ ~ N(0, 0.5²) and
            α ~ N(1, 0.5²).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a ``group_size`` that does not
            divide a target's output size (the target and its size named).
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear`` or a quantized linear layer.
    """

    peft_type = "ROAD"
    #: Its adapters can be mixed row by row in one batch (``pk.mixed_batch``), as in HF PEFT.
    mixes_rows: ClassVar[bool] = True

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0 \
                or self.group_size % 2:
            raise ConfigError(f"group_size={self.group_size!r} must be a positive even integer dividing every "
                              "target's output size (e.g. 64)")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second RoAd adapter only
            return isinstance(module, RoAdLayer)
        return is_linear(module)

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to have an output size ``group_size`` divides, before the model changes."""
        targets = super().resolve(model)
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, RoAdLayer) else module
            size = cast(LinearKind, linear_kind(base)).out_features(base)
            if size % self.group_size:
                fits = [g for g in range(2, size + 1, 2) if size % g == 0]
                raise ConfigError(f"group_size={self.group_size} does not divide the {size} outputs of {name}; "
                                  f"choose an even divisor of every target's output size (here: {fits})")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, RoAdLayer) else RoAdLayer(module)
        layer.add(adapter_name, self.variant, self.group_size, self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules", "layers_to_transform", "layers_pattern"),
            variant=self.variant,
            group_size=self.group_size,
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> RoAd:
        unknown = hf_unknown_options(data, _HF_FIELDS, "RoAd")
        return cls(
            **hf_layer_fields(data, module_names),
            variant=data.get("variant", "road_1"),
            group_size=data.get("group_size", 64),
            init_weights=bool(data.get("init_weights", True)),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
