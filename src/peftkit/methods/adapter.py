"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placement.

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019
(https://arxiv.org/abs/1902.00751); Pfeiffer et al., "AdapterFusion", EACL 2021
(https://arxiv.org/abs/2005.00247); He et al., "Towards a Unified View of Parameter-Efficient Transfer
Learning", ICLR 2022 (https://arxiv.org/abs/2110.04366).

An adapter is a bottleneck MLP, d → m → d with m = d / reduction_factor::

    A(h) = W_up σ(W_down h + b_down) + b_up          W_up, b_up start at 0, so A ≡ 0 at first

    serial   (Houlsby: after the attention output and the FFN output; Pfeiffer: after the FFN only)
             h ↦ h + s·A(h)            applied to the sub-layer's output, before its residual add
    parallel (He et al.: beside the FFN block)
             x ↦ FFN(x) + s·A(x)

A serial adapter has a non-linearity between its projections, and a parallel one reads the block's
input, so neither can be folded into a weight: ``merge`` is an error saying so. The sites come from the
Megatron-style role tables (:mod:`peftkit.methods.roles`): serial adapters wrap ``linear_proj`` (attention
output) and ``linear_fc2`` (FFN output), parallel ones the FFN block (the parent of ``linear_fc2``). Any
architecture added with ``pk.register_architecture`` works; ``target_modules`` overrides the tables.
Tensors: ``<module>.adapter_down.weight`` etc., ``peft_type: "BOTTLENECK"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import resolve_targets
from peftkit.core.registry import linear_kind, register_method
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError, MergeError
from peftkit.io.hf_names import hf_resolve, hf_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.roles import ffn_blocks

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
                                           "swish": nn.SiLU}
#: Placement → the role names whose modules get a serial adapter (parallel ones go on the FFN blocks).
SERIAL_ROLES = {"houlsby": ("linear_proj", "linear_fc2"), "pfeiffer": ("linear_fc2",)}


def _out_features(module: nn.Module) -> int:
    """The width of ``module``'s output: its own, or that of its last linear-like descendant."""
    found = [(sub, kind) for sub in module.modules() if (kind := linear_kind(sub)) is not None]
    if not found:
        raise ConfigError(f"cannot tell the output width of {type(module).__name__}; target a linear layer or "
                          "a block that ends in one")
    last, kind = found[-1]
    return kind.out_features(last)


class BottleneckLayer(AdapterLayer):
    """Serial (``h + s·A(h)`` on the output) or parallel (``f(x) + s·A(x)``) bottleneck adapters on one module.

    Args:
        base_layer: the wrapped module.
        mode: ``"serial"`` or ``"parallel"``.
        input_arg: for a parallel adapter, the positional argument holding the FFN's input. 0: the module is
            the FFN, ``f(x) + s·A(x)``. k > 0: the module adds argument k (the FFN's input) back itself as the
            residual (BERT's ``BertOutput(h, input_tensor)``), so ``s·A(x)`` joins that argument.
    """

    adapter_containers = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, mode: str, input_arg: int = 0) -> None:
        super().__init__(base_layer)
        self.mode = mode
        self.input_arg = input_arg
        self.dim = _out_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, size: int, activation: str, scaling: float) -> None:
        ref = next(self.base_layer.parameters())
        factory: dict[str, Any] = {"device": ref.device, "dtype": adapter_dtype(ref)}
        down = nn.Linear(self.dim, size, **factory)
        up = nn.Linear(size, self.dim, **factory)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # A ≡ 0: the adapted model starts as the base model
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACTIVATIONS[activation]()
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        if name in self.adapter_act:
            del self.adapter_act[name]

    def bottleneck(self, h: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Σ s·A(h) over ``names``."""
        total: torch.Tensor | None = None
        for name in names:
            down, up = cast(nn.Linear, self.adapter_down[name]), self.adapter_up[name]
            out = up(self.adapter_act[name](down(h.to(down.weight.dtype)))) * self.scaling[name]
            total = out if total is None else total + out
        assert total is not None
        return total.to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        if not names:
            return self.base_layer(*args, **kwargs)
        if self.mode == "parallel" and self.input_arg > 0:  # BertOutput(h, input_tensor): A(x) joins the residual
            k, x = self.input_arg, args[self.input_arg]
            return self.base_layer(*args[:k], x + self.bottleneck(x, names), *args[k + 1:], **kwargs)
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.bottleneck(args[0] if self.mode == "parallel" else h, names)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        raise MergeError(
            f"the bottleneck adapters {list(names)} at {where or type(self.base_layer).__name__} cannot be merged: "
            f"a {self.mode} adapter applies a non-linearity ({self.mode} A(h) = W_up σ(W_down h)) that no weight "
            "matrix can absorb. Keep it unmerged (it is small) or use LoRA/IA3 for a mergeable adapter."
        )


@register_method
@dataclass
class Adapter(AdapterConfig):
    """Bottleneck adapters.

    Attributes:
        placement: ``"houlsby"`` (after attention and after the FFN), ``"pfeiffer"`` (after the FFN) or
            ``"parallel"`` (beside the FFN block).
        bottleneck_size: the bottleneck width m; default ``hidden // reduction_factor``.
        reduction_factor: d / m when ``bottleneck_size`` is not given.
        activation: ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"`` / ``"swish"``.
        scaling: s, the factor on the adapter's output (He et al. use 4 for parallel adapters).
        target_modules: optional; the modules to wrap instead of the role-table sites (serial: the
            sub-layer output projections; parallel: the FFN blocks). Without it the model's architecture
            must have a role table (built in for the Llama family, GPT-2, GPT-NeoX, Falcon, Phi-3, T5 and the
            BERT family; others via ``pk.register_architecture`` with ``linear_proj`` and ``linear_fc2``).
    """

    peft_type = "BOTTLENECK"

    placement: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: int = 16
    activation: str = "relu"
    scaling: float = 1.0
    #: Parallel sites whose FFN input is not the first argument → its position (from the role table or file).
    input_args: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement={self.placement!r} must be one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        for name in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling!r} must be a finite number")

    def size_for(self, dim: int) -> int:
        return self.bottleneck_size or max(1, dim // self.reduction_factor)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, BottleneckLayer) or not isinstance(module, AdapterLayer)

    def supported_layer_names(self) -> list[str]:
        return ["any module whose output is a hidden-state tensor"]

    @property
    def mode(self) -> str:
        return "parallel" if self.placement == "parallel" else "serial"

    def resolve(self, model: nn.Module) -> list[str]:
        """The explicit ``target_modules``, else the placement's sites from the model's role table.

        Raises:
            ConfigError: no role table for the architecture (the message names ``pk.register_architecture``).
            TargetNotFoundError: ``exclude_modules`` / ``layers`` leave no site.
        """
        if self.target_modules:
            targets = super().resolve(model)
            self.input_args = {t: k for t, k in self.input_args.items() if t in targets}
            return targets
        if self.placement == "parallel":
            # FFN blocks that hold a parallel adapter already hide their linear_fc2: they stand for themselves.
            blocks = {n: m.input_arg for n, m in iter_modules(model)
                      if isinstance(m, BottleneckLayer) and m.mode == "parallel"}
            blocks.update(ffn_blocks(model))
            patterns = sorted(blocks)  # exact qualified names (resolve_targets keeps the model order)
        else:
            blocks, patterns = {}, list(SERIAL_ROLES[self.placement])  # role aliases
        targets = resolve_targets(
            model, patterns, supported=self.supports, supported_names=self.supported_layer_names(),
            exclude=list(self.exclude_modules), layers=self.layers, layer_containers=list(self.layers_pattern),
        )
        self.input_args = {t: blocks[t] for t in targets if blocks.get(t)}
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        input_arg = self.input_args.get(qualname, 0)
        if isinstance(module, BottleneckLayer):
            if (module.mode, module.input_arg) != (self.mode, input_arg):
                raise ConfigError(f"{qualname} already holds a {module.mode} adapter; cannot add a {self.placement} "
                                  "one (use another placement for the second adapter, or another layer)")
            layer = module
        else:
            layer = BottleneckLayer(module, self.mode, input_arg)
        layer.add(adapter_name, self.size_for(layer.dim), self.activation, self.scaling)
        return layer

    # -- adapter_config.json (our own peft_type) ---------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "placement": self.placement,
            "bottleneck_size": self.bottleneck_size,
            "reduction_factor": self.reduction_factor,
            "activation": self.activation,
            "scaling": self.scaling,
            "target_modules": hf_targets(targets, module_names),
            "input_args": {t: self.input_args[t] for t in targets if t in self.input_args},
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> Adapter:
        targets = hf_resolve(data.get("target_modules"), module_names)
        config = cls(
            placement=data.get("placement", "houlsby"),
            bottleneck_size=data.get("bottleneck_size"),
            reduction_factor=int(data.get("reduction_factor", 16)),
            activation=data.get("activation", "relu"),
            scaling=float(data.get("scaling", 1.0)),
            target_modules=targets,
            modules_to_save=data.get("modules_to_save") or (),
            task_type=data.get("task_type"),
        )
        config.input_args = {str(t): int(k) for t, k in (data.get("input_args") or {}).items()}
        return config
