"""(IA)³: learned per-channel scaling of activations.

Paper: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022 (https://arxiv.org/abs/2205.05638).

For a frozen linear layer W₀ (out × in, bias b) and a learned vector l, initialised to ones::

    attention / output layers:   x ↦ l ⊙ (W₀x + b)      l ∈ ℝ^out   (keys, values)
    feed-forward layers:         x ↦ W₀(l ⊙ x) + b      l ∈ ℝ^in    (the FFN's second projection)

Convolutions (``nn.Conv2d``, ``nn.Conv3d``, as in Hugging Face PEFT) scale channels the same way: l
multiplies the output channels, or the input channels of a feed-forward target. Several active adapters
multiply. Merging folds l into the weight (output rows, or input columns; the bias too for output
scaling; a grouped convolution's output channels see only their group's inputs) and unmerging divides
it out again, so a vector with a zero entry cannot be merged reversibly and is refused. Tensor names and
shapes follow Hugging Face PEFT: ``ia3_l`` of shape (out, 1) or (1, in) on linear layers and
(1, channels, 1, …, 1) on convolutions. HF PEFT has no (IA)³ for ``nn.Embedding`` or ``nn.Conv1d``, so
neither does peftkit (``UnsupportedLayerError`` naming the supported types): a file could not cross-load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig, _as_list
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import ALIASES, first_match
from peftkit.core.registry import LINEAR_KINDS, LinearKind, TypeRegistry, linear_kind, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_targets, hf_modules_to_save, hf_resolve, hf_targets
from peftkit.methods.default_targets import IA3_TARGETS, default_for, model_type
from peftkit.methods.lora_layers import adapter_dtype

#: Convolutions (IA)³ scales per channel, as Hugging Face PEFT does → their number of spatial dimensions.
CONV_KINDS: TypeRegistry[int] = TypeRegistry()
CONV_KINDS.register(nn.Conv2d, 2)
CONV_KINDS.register(nn.Conv3d, 3)


def _set_conv_weight(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        cast(torch.Tensor, module.weight).copy_(weight)


#: A convolution's weight (out, in / groups, *kernel) seen through the linear-kind interface: channels count
#: as features, and the weight keeps its shape (out first, as a linear weight).
_CONV = LinearKind(
    in_features=lambda m: int(cast(nn.Conv2d, m).in_channels),
    out_features=lambda m: int(cast(nn.Conv2d, m).out_channels),
    weight=lambda m: cast(torch.Tensor, m.weight),
    set_weight=lambda m, w: _set_conv_weight(m, w),
)


def supported_kind(module: nn.Module) -> tuple[LinearKind, int] | None:
    """How to read ``module``'s weight and its number of spatial dimensions (0: linear), or ``None``."""
    kind = linear_kind(module)
    if kind is not None:
        return kind, 0
    spatial = CONV_KINDS.lookup(type(module))
    return (_CONV, spatial) if spatial is not None else None


class IA3Layer(AdapterLayer):
    """(IA)³ on a linear-like layer (``nn.Linear``, GPT-2 ``Conv1D``, ...) or a convolution (``nn.Conv2d/3d``).

    Raises:
        UnsupportedLayerError: ``base_layer`` is neither.
    """

    folds_into_weight = True
    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        found = supported_kind(base_layer)
        if found is None:
            raise UnsupportedLayerError(
                f"(IA)³ cannot scale a {type(base_layer).__name__}; supported layer types: {supported_names()}"
            )
        kind, self.spatial = found  # spatial dimensions: 0 for linear layers
        self.in_features = kind.in_features(base_layer)
        self.out_features = kind.out_features(base_layer)
        self.groups = int(getattr(base_layer, "groups", 1)) if self.spatial else 1
        #: Scale the input (feed-forward layers) rather than the output.
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    @property
    def kind(self) -> LinearKind:
        # Looked up, not stored: the layer stays picklable (kinds hold lambdas).
        found = supported_kind(self.base_layer)
        if found is None:
            raise UnsupportedLayerError(f"{type(self.base_layer).__name__} is no longer a layer (IA)³ can scale")
        return found[0]

    def add(self, name: str) -> None:
        weight = self.kind.weight(self.base_layer)
        features = self.in_features if self.is_feedforward else self.out_features
        if self.spatial:  # HF PEFT: (1, channels, 1, …) broadcasts over a batched convolution's input/output
            shape: tuple[int, ...] = (1, features, *[1] * self.spatial)
        else:
            shape = (1, features) if self.is_feedforward else (features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=weight.device, dtype=adapter_dtype(weight)))

    def scaling(self, names: Sequence[str]) -> torch.Tensor | None:
        """The product of the flattened vectors of ``names`` (``None`` when there are none)."""
        result: torch.Tensor | None = None
        for name in names:
            vec = self.ia3_l[name].flatten()
            result = vec if result is None else result * vec
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = self.scaling(self._applied())
        if scale is None:
            return cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        # Linear: channels are the last dimension; convolution: (C, 1, …) scales the channel dimension of
        # batched and unbatched inputs alike.
        scale = scale.view(-1, *[1] * self.spatial)
        if self.is_feedforward:
            return cast(torch.Tensor, self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs))
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        return (result * scale).to(result.dtype)

    # -- merging: W ← W·diag(l) (input) or diag(l)·W, b ← l⊙b (output) ----------------------------
    def _weight_factor(self, vec: torch.Tensor) -> torch.Tensor:
        """``vec`` shaped to multiply the weight (out, in / groups, *kernel) or (out, in)."""
        kernel = [1] * self.spatial
        if not self.is_feedforward:
            return vec.view(-1, 1, *kernel)
        if self.groups == 1:
            return vec.view(1, -1, *kernel)
        # A grouped convolution's output channel o reads only the inputs of its group o // (out / groups).
        g, out = self.groups, self.out_features
        return vec.view(g, 1, -1).expand(g, out // g, -1).reshape(out, -1, *kernel)

    def _fold(self, name: str, inverse: bool) -> None:
        vec = self.ia3_l[name].detach().flatten()
        if inverse:
            vec = 1.0 / vec
        read = self.kind.merge_weight or self.kind.weight  # a quantized base: in fp32, rounded once when re-quantized
        weight = read(self.base_layer).detach()
        factor = self._weight_factor(vec)
        self.kind.set_weight(self.base_layer, (weight * factor.to(weight.dtype)).to(weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if not self.is_feedforward and isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.mul_(vec.to(bias.dtype))

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            if bool((self.ia3_l[name].detach() == 0).any()):
                raise MergeError(
                    f"IA3 adapter {name!r} at {where or 'this layer'} has zero scaling entries; merging would "
                    "erase those weight rows/columns for good (unmerge divides by the vector). Keep it unmerged."
                )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            if safe:
                self.check_finite(self.ia3_l[name].detach(), where or type(self.base_layer).__name__, name)
            self._fold(name, inverse=False)
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        for name in [n for n in reversed(self.merged_adapters) if names is None or n in names]:
            self._fold(name, inverse=True)
            self.merged_adapters.remove(name)


@register_method
@dataclass
class IA3(AdapterConfig):
    """(IA)³: rescale the outputs of ``target_modules`` and the inputs of ``feedforward_modules``.

    Attributes:
        feedforward_modules: patterns (same syntax as ``target_modules``, aliases such as ``linear_fc2``
            included) selecting the targets whose *input* is scaled, typically the FFN's second projection
            (``down_proj``, ``wo``, GPT-2 ``mlp.c_proj``). Each must select at least one target. ``None`` (the
            default), as in HF PEFT: the architecture's feed-forward output projection where it is among the
            targets (none on an architecture without a default); ``[]``: no target scales its input.
    """

    peft_type = "IA3"

    feedforward_modules: str | Sequence[str] | None = None
    #: The module names the aliases among ``feedforward_modules`` stood for on the models this config was
    #: applied to (an alias needs the model to resolve; a module's name keeps its role across models).
    _alias_feedforward: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feedforward_modules is not None:
            self.feedforward_modules = _as_list(self.feedforward_modules)

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's IA3 adapts on this architecture. With
        ``feedforward_modules`` omitted (``None``): the architecture's, as HF PEFT takes them whether or not the
        targets were given (those among the targets; none on an architecture without defaults)."""
        if self.target_modules:
            if self.feedforward_modules is not None:
                return self
            kind = model_type(model)
            defaults = IA3_TARGETS[kind][1] if kind in IA3_TARGETS else ()
            targets = AdapterConfig.resolve(self, model)
            return self.replace(feedforward_modules=[
                p for p in defaults if any(first_match(t, [p]) is not None for t in targets)])
        targets, feedforward = default_for(
            IA3_TARGETS, model, "IA3",
            "target_modules=[...] and feedforward_modules=[...] (the MLP's output projection, one of the targets)")
        given = self.feedforward_modules
        return self.replace(target_modules=list(targets),
                            feedforward_modules=list(feedforward if given is None else given))

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, IA3Layer) or supported_kind(module) is not None

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def is_feedforward(self, qualname: str) -> bool:
        patterns = [p for p in self.feedforward_modules or () if p not in ALIASES]
        return qualname in self._alias_feedforward or first_match(qualname, patterns) is not None

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        for pattern in self.feedforward_modules or ():
            if pattern in ALIASES:
                hits = set(ALIASES[pattern](model)) & set(targets)
                self._alias_feedforward.update(hits)
            else:
                hits = {t for t in targets if first_match(t, [pattern]) is not None}
            if not hits:
                raise ConfigError(
                    f"feedforward_modules entry {pattern!r} selects none of the targets {targets[:6]}; "
                    "feedforward_modules must be a subset of target_modules"
                )
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if isinstance(module, IA3Layer):
            if module.is_feedforward != self.is_feedforward(qualname):
                raise ConfigError(
                    f"{qualname} already has an IA3 adapter with feedforward={module.is_feedforward}; a second "
                    "IA3 adapter on the same layer must scale the same side (check feedforward_modules)"
                )
            layer = module
        else:
            layer = IA3Layer(module, self.is_feedforward(qualname))
        layer.add(adapter_name)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        feedforward = [t for t in targets if self.is_feedforward(t)]
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "target_modules": hf_targets(targets, module_names),
            "feedforward_modules": _hf_feedforward(feedforward, targets),
            "exclude_modules": None,
            "fan_in_fan_out": False,  # set by save_adapter when a target stores its weight transposed
            "modules_to_save": list(self.modules_to_save) or None,
            "init_ia3_weights": True,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            **{k: v for k, v in self.extra.items() if k not in _HF_FIELDS},
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> IA3:
        targets = hf_layer_targets(data, module_names)
        spec = data.get("feedforward_modules")
        # HF PEFT tests only the targets: a full-match regex, or a plain ``str.endswith`` per key.
        adapted = [n for n in module_names if first_match(n, targets) is not None]
        if isinstance(spec, str):
            feedforward = [n for n in adapted if re.fullmatch(spec, n)]
        else:
            feedforward = [n for n in adapted if any(n.endswith(k) for k in spec or [])]
        return cls(
            target_modules=targets,
            feedforward_modules=feedforward,
            exclude_modules=hf_resolve(data.get("exclude_modules"), module_names) if data.get("exclude_modules")
            else (),
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            task_type=data.get("task_type"),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type target_modules feedforward_modules exclude_modules fan_in_fan_out modules_to_save "
    "init_ia3_weights inference_mode".split()
)


def supported_names() -> list[str]:
    """The layer types (IA)³ can scale, for error messages."""
    return sorted(set(LINEAR_KINDS.names()) | set(CONV_KINDS.names()))


def _hf_feedforward(feedforward: list[str], targets: list[str]) -> list[str] | str:
    """``feedforward_modules`` for HF PEFT, which tests each target with ``name.endswith(key)``."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in feedforward})
    if {t for t in targets if any(t.endswith(k) for k in leaves)} == set(feedforward):
        return leaves
    return "^(?:" + "|".join(re.escape(t) for t in feedforward) + ")$" if feedforward else []
