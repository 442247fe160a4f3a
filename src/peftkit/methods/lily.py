"""Lily: low-rank interconnected adaptation across layers.

Paper: Zhong et al., "Low-Rank Interconnected Adaptation across Layers" (https://arxiv.org/abs/2407.09946).

Each adapted ``nn.Linear`` has a down-projection A (r × in), shared by ``stride_A`` consecutive layers of the same
target, and reads from num_B up-projections B₁…B_{num_B} (each r × out) shared by every layer of that target. A
per-layer router R (num_B × r) mixes the B's with weights averaged over every token of the call::

    h = A x,    p = mean over all tokens of softmax(R h),    x ↦ W₀x + s · h (Σₑ pₑ Bₑ)

with s = ``scaling``. The mixture depends on the whole input batch, so no single weight holds the update: Lily
cannot be merged (as in Hugging Face PEFT 0.21.2, ``LILY``). Layers are grouped as HF PEFT groups them: by the
target entry that matches the layer and its weight's shape, in module order; within a group, layer i uses the A of
layer ``(i // stride_A) * stride_A`` and every layer uses the first layer's B. Files hold every layer's tensors
(``…<layer>.lily_A.weight``, ``lily_B.weight`` (num_B·r × out), ``lily_router.weight``), shared ones repeated, as HF
PEFT writes them. Initialisation draws what HF PEFT draws, in its order: each layer's three ``nn.Linear`` s, then
kaiming-uniform A and R, then B zero (``init_weights``) or kaiming-uniform.
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
from peftkit.core.registry import DEQUANTIZERS, register_method
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_targets
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype


def _supported(module: nn.Module) -> bool:
    """A float ``nn.Linear``: HF PEFT's Lily adapts nothing else."""
    return isinstance(module, nn.Linear) and DEQUANTIZERS.lookup(type(module)) is None


class LilyLayer(AdapterLayer):
    """Lily on an ``nn.Linear``: ``base(x) + s · A x (Σₑ pₑ Bₑ)``, p the batch-averaged router weights.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not a (float) ``nn.Linear``.
    """

    adapter_containers = ("lily_A", "lily_B", "lily_router")

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"Lily cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear only "
                                        "(as HF PEFT)")
        super().__init__(base_layer)
        linear = cast(nn.Linear, base_layer)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lily_A = nn.ModuleDict()  # may be another layer's module (shared A)
        self.lily_B = nn.ModuleDict()  # may be another layer's module (shared B)
        self.lily_router = nn.ModuleDict()
        self.num_B: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def add(self, name: str, rank: int, num_b: int, scaling: float, init_weights: bool) -> None:
        """Add adapter ``name`` with its own A, B and router (sharing is set up by :func:`share_across_layers`)."""
        lily_a = nn.Linear(self.in_features, rank, bias=False)
        lily_b = nn.Linear(self.out_features, num_b * rank, bias=False)
        router = nn.Linear(rank, num_b, bias=False)
        nn.init.kaiming_uniform_(lily_a.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(lily_b.weight)
        else:
            nn.init.kaiming_uniform_(lily_b.weight, a=math.sqrt(5))
        weight = cast(torch.Tensor, self.base_layer.weight)
        for container, module in ((self.lily_A, lily_a), (self.lily_B, lily_b), (self.lily_router, router)):
            container[name] = module.to(weight.device, adapter_dtype(weight))
        self.num_B[name] = num_b
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.num_B.pop(name, None)
        self.scaling.pop(name, None)

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Adapter ``name``'s ``s · A x (Σₑ pₑ Bₑ)`` for ``x`` (…, in), in its tensors' dtype."""
        lily_a = cast(nn.Linear, self.lily_A[name])
        b_weight = cast(nn.Linear, self.lily_B[name]).weight
        num_b = self.num_B[name]
        hidden = lily_a(x.to(lily_a.weight.dtype))
        probabilities = F.softmax(self.lily_router[name](hidden), dim=-1).reshape(-1, num_b).mean(dim=0)
        combined = torch.einsum("e,eio->io", probabilities, b_weight.reshape(num_b, -1, b_weight.shape[1]))
        return torch.matmul(hidden, combined) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        for name in self._applied():
            result = result + self.update(x, name).to(result.dtype)
        return result

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        raise MergeError(
            f"the Lily adapters {list(names)} at {where or type(self.base_layer).__name__} cannot be merged: the "
            "router mixes the shared B's with weights averaged over each input batch, so no single weight holds the "
            "update (HF PEFT refuses it too). Keep them unmerged (pk.unload(model, merge=False) drops them)."
        )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)


def share_across_layers(model: nn.Module, name: str, hf_spec: str | None, stride_a: int) -> None:
    """Point adapter ``name``'s layers at their group's shared A and B (HF PEFT's ``_post_injection_hook``).

    HF PEFT groups layers by the ``target_modules`` entry they end with (all of them together for a regex string)
    and by weight shape, in module order. The groups are those of the ``target_modules`` peftkit writes to the file
    (the layers' leaf names, or a regex of their names: :func:`hf_targets`), or of ``hf_spec``, the regex string of
    the HF PEFT file the adapter was read from.
    """
    layers = [(q, m) for q, m in model.named_modules() if isinstance(m, LilyLayer) and name in m.lily_A]
    spec = hf_spec or hf_targets([q for q, _ in layers], [n for n, _ in iter_modules(model) if n])
    groups: dict[tuple[str, tuple[int, ...]], list[LilyLayer]] = {}
    for qualname, layer in layers:
        key = spec if isinstance(spec, str) else qualname.rsplit(".", 1)[-1]
        groups.setdefault((key, tuple(layer.weight.shape)), []).append(layer)
    for group in groups.values():
        for i, layer in enumerate(group):
            layer.lily_B[name] = group[0].lily_B[name]
            layer.lily_A[name] = group[i // stride_a * stride_a].lily_A[name]


def _checked_int(field_name: str, value: Any, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field_name}={value!r} must be an integer >= {minimum}{why}")


@register_method
@dataclass
class Lily(AdapterConfig):
    """Lily: per-target shared A's (every ``stride_A`` layers) and B's mixed by a per-layer router.

    Attributes:
        rank: r, the width of A's output and of each B (HF PEFT: ``r``); HF PEFT suggests 2–4× a LoRA rank.
        stride_A: how many consecutive layers of one target share an A (1: every layer has its own).
        num_B: how many B's every layer of one target shares and its router mixes (at least 2).
        scaling: s, the direct factor on the update (no α/r).
        init_weights: start with zero B's (the unchanged model); ``False`` draws them kaiming-uniform.

    Raises:
        ConfigError: a field out of range (named with its value).
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear``.
    """

    peft_type = "LILY"

    rank: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    init_weights: bool = True
    #: The regex ``target_modules`` of the HF PEFT file this config was read from: it groups the layers (above).
    _hf_spec: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1, " (e.g. 32)")
        _checked_int("stride_A", self.stride_A, 1, " (1: no sharing of A)")
        _checked_int("num_B", self.num_B, 2, ": the router needs at least 2 B's to mix")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling!r} must be a finite number (e.g. 1.0)")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    def replace(self, **changes: Any) -> AdapterConfig:
        new = cast(Lily, super().replace(**changes))
        new._hf_spec = self._hf_spec
        return new

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's Lily adapts on this architecture (LoRA's)."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second Lily adapter only
            return isinstance(module, LilyLayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return ["Linear"]

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, LilyLayer) else LilyLayer(module)
        layer.add(adapter_name, self.rank, self.num_B, float(self.scaling), self.init_weights)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        share_across_layers(model, name, self._hf_spec, self.stride_A)

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        data = hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            stride_A=self.stride_A,
            num_B=self.num_B,
            scaling=self.scaling,
            init_weights=self.init_weights,
            auto_mapping=None,
        )
        if self._hf_spec is not None:  # the regex read, which groups the layers as they are grouped here
            data["target_modules"] = self._hf_spec
        return data

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> Lily:
        config = cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=int(data.get("r", 32)),
            stride_A=int(data.get("stride_A", 1)),
            num_B=int(data.get("num_B", 2)),
            scaling=float(data.get("scaling", 1.0)),
            init_weights=bool(data.get("init_weights", True)),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )
        spec = data.get("target_modules")
        if isinstance(spec, str) and spec != "all-linear":
            config._hf_spec = spec
        return config


_HF_FIELDS = frozenset(
    "peft_type task_type r stride_A num_B scaling target_modules exclude_modules modules_to_save layers_to_transform "
    "layers_pattern init_weights inference_mode base_model_name_or_path revision auto_mapping".split()
)
