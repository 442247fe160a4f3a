"""Type-keyed registries: which adapter layer wraps which base layer, and the known PEFT methods.

Base-layer kinds (``nn.Linear``, GPT-2's ``Conv1D``, quantized linears, ...) are looked up by type along
the MRO, never through an ``isinstance`` ladder, so a new kind is one ``register`` call in its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.core.config import AdapterConfig

V = TypeVar("V")


class TypeRegistry(Generic[V]):
    """A mapping from module types to values, resolved along the type's MRO.

    Types can also be registered by their qualified name (``"transformers.pytorch_utils.Conv1D"``), so
    that optional libraries need not be imported to register them.
    """

    def __init__(self) -> None:
        self._by_type: dict[type, V] = {}
        self._by_name: dict[str, V] = {}

    def register(self, key: type | str, value: V) -> None:
        if isinstance(key, str):
            self._by_name[key] = value
        else:
            self._by_type[key] = value

    def lookup(self, cls: type) -> V | None:
        for klass in cls.__mro__:
            if klass in self._by_type:
                return self._by_type[klass]
            name = f"{klass.__module__}.{klass.__qualname__}"
            if name in self._by_name:
                return self._by_name[name]
        return None

    def names(self) -> list[str]:
        """Human-readable names of the registered types, for error messages."""
        named = [t.__name__ for t in self._by_type] + [n.rsplit(".", 1)[-1] for n in self._by_name]
        return sorted(set(named))


@dataclass(frozen=True)
class LinearKind:
    """How to read and write the weight of a linear-like base layer.

    ``weight`` returns the dense weight in ``(out_features, in_features)`` orientation and the layer's
    compute dtype (dequantized for quantized layers); ``set_weight`` stores such a tensor back
    (re-quantizing where needed) and returns the absolute error it introduced, or ``None`` when exact.
    ``merge_weight``, where given, returns the same weight in fp32 without the rounding to the compute dtype:
    merging reads it, so that adding ΔW and re-quantizing rounds once (a zero ΔW changes nothing).
    """

    in_features: Callable[[nn.Module], int]
    out_features: Callable[[nn.Module], int]
    weight: Callable[[nn.Module], torch.Tensor]
    set_weight: Callable[[nn.Module, torch.Tensor], float | None]
    merge_weight: Callable[[nn.Module], torch.Tensor] | None = None


def _weight(m: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, m.weight)


def _linear_set(m: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        _weight(m).copy_(w)


def _conv1d_set(m: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        _weight(m).copy_(w.T)


#: Linear-like base layers: anything LoRA, DoRA and IA3 can wrap as a matrix multiply.
LINEAR_KINDS: TypeRegistry[LinearKind] = TypeRegistry()
LINEAR_KINDS.register(
    nn.Linear,
    LinearKind(
        in_features=lambda m: cast(nn.Linear, m).in_features,
        out_features=lambda m: cast(nn.Linear, m).out_features,
        weight=_weight,
        set_weight=lambda m, w: _linear_set(m, w),
    ),
)
# GPT-2's Conv1D stores its weight as (in_features, out_features): HF PEFT calls this fan_in_fan_out.
LINEAR_KINDS.register(
    "transformers.pytorch_utils.Conv1D",
    LinearKind(
        in_features=lambda m: _weight(m).shape[0],
        out_features=lambda m: _weight(m).shape[1],
        weight=lambda m: _weight(m).T,
        set_weight=lambda m, w: _conv1d_set(m, w),
    ),
)


def linear_kind(module: nn.Module) -> LinearKind | None:
    """The :class:`LinearKind` of ``module``, or ``None`` if it is not linear-like."""
    return LINEAR_KINDS.lookup(type(module))


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for layers that store their weight transposed (GPT-2 ``Conv1D``)."""
    return type(module).__name__ == "Conv1D"


#: Quantized layer type → a function returning an equivalent float layer (``unload(dequantize=True)``).
DEQUANTIZERS: TypeRegistry[Callable[[nn.Module], nn.Module]] = TypeRegistry()


def dequantized(module: nn.Module) -> nn.Module:
    """A float equivalent of a quantized ``module``, or ``module`` itself when it is not quantized."""
    convert = DEQUANTIZERS.lookup(type(module))
    return convert(module) if convert is not None else module


#: peft_type (as written in ``adapter_config.json``) → config class.
METHODS: dict[str, type[AdapterConfig]] = {}


def register_method(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a method config known by its ``peft_type``."""
    METHODS[cls.peft_type] = cls
    return cls
