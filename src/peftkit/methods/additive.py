"""Merging for adapters whose update is a weight delta, ``W ← W ± ΔW`` (VeRA, FourierFT, C3A, VB-LoRA, LoHa, LoKr).

The layer provides ``delta_weight(name)`` in the base weight's orientation and ``kind`` (the base layer's
:class:`~peftkit.core.registry.LinearKind`, which reads and writes the weight, dequantizing where it must), or its
own ``fold(name, sign, safe, where)``. Adapters merge in the order given and unmerge last merged first.
:class:`DeltaLayer` is the layer of methods that add a ΔW to a linear-like base: FourierFT and SHiRA build it
densely in every forward (``_delta``), VB-LoRA applies its two factors instead (``_update``), C3A computes its own
forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

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
    """A linear-like layer whose adapters each add a dense ΔW built from their own tensors in every forward:
    ``base(x) + Σ x ΔWᵀ`` over the applied adapters, and ``W ← W ± ΔW`` to merge.

    Subclasses define ``_delta(name)``: adapter ``name``'s ΔW, (out, in), in its tensors' dtype, differentiable.
    """

    folds_into_weight = True

    @property
    def kind(self) -> LinearKind:
        return cast(LinearKind, linear_kind(self.base_layer))  # looked up, not stored: kinds hold lambdas

    def _delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self._delta(name)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s addition to the output for input ``x``: ``x ΔWᵀ`` (VB-LoRA applies its factors)."""
        delta = self._delta(name)
        return F.linear(x.to(delta.dtype), delta)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        dtype = result.dtype
        for name in names:
            result = result + self._update(name, x)
        return result.to(dtype)

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names)
