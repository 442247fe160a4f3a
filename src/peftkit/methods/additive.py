"""Merging for adapters whose update is a weight delta, ``W ← W ± ΔW`` (VeRA, FourierFT, C3A, LoHa, LoKr).

The layer provides ``delta_weight(name)`` in the base weight's orientation and ``kind`` (the base layer's
:class:`~peftkit.core.registry.LinearKind`, which reads and writes the weight, dequantizing where it must), or its
own ``fold(name, sign, safe, where)``. Adapters merge in the order given and unmerge last merged first.
:class:`DeltaLayer` is such a layer over a linear-like base, less its ``delta_weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LinearKind, linear_kind

Fold = Callable[[str, float, bool, str], None]

__all__ = ["DeltaLayer", "merge_deltas", "unmerge_deltas"]


def _add_delta(layer: Any, name: str, sign: float, safe: bool = False, where: str = "") -> None:
    read = layer.kind.merge_weight or layer.kind.weight
    weight = read(layer.base_layer).detach()
    updated = weight + sign * layer.delta_weight(name).to(weight.dtype)
    if safe:
        layer.check_finite(updated, where or type(layer.base_layer).__name__, name)
    layer.kind.set_weight(layer.base_layer, updated)


def merge_deltas(layer: Any, names: Sequence[str], safe: bool = False, where: str = "",
                 fold: Fold | None = None) -> None:
    """Add each of ``layer``'s adapters ``names`` (not merged yet) to its base weight, with ``fold`` or through
    ``layer.kind``; ``safe``: refuse a non-finite result first."""
    for name in names:
        if name in layer.merged_adapters or not layer.has_adapter(name):
            continue
        if fold is None:
            _add_delta(layer, name, 1.0, safe, where)
        else:
            fold(name, 1.0, safe, where)
        layer.merged_adapters.append(name)


def unmerge_deltas(layer: Any, names: Sequence[str] | None = None, fold: Fold | None = None) -> None:
    """Subtract ``layer``'s merged adapters ``names`` (default: all) again, last merged first."""
    for name in [n for n in reversed(layer.merged_adapters) if names is None or n in names]:
        if fold is None:
            _add_delta(layer, name, -1.0)
        else:
            fold(name, -1.0, False, "")
        layer.merged_adapters.remove(name)


class DeltaLayer(AdapterLayer):
    """An adapter layer over a linear-like base layer that merges by adding its ``delta_weight`` to the weight."""

    @property
    def kind(self) -> LinearKind:
        return cast(LinearKind, linear_kind(self.base_layer))  # looked up, not stored: kinds hold lambdas

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names)
