"""Merging for adapters whose updates do not commute (HRA's reflections, MiSS's bat updates).

Each folds adapter ``name`` into the base weight with ``layer._fold(name, undo, safe, where)`` (``undo``: take it out
again). The weight then holds W₀ changed by the merged adapters in merge order, so merging keeps the order the active
adapters act in, and unmerging one adapter takes the ones merged after it out too (last first) and folds them in
again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["merge_in_order", "reordering", "unmerge_in_order"]


def _order(layer: Any, merged: Sequence[str]) -> list[str]:
    """The order ``layer``'s active adapters act in when ``merged`` are folded into the weight (they act first)."""
    active = layer.active_adapters
    return [n for n in merged if n in active] + [n for n in active if n not in merged]


def reordering(layer: Any, names: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """``(order now, order after merging names)`` when merging ``names`` would change the order ``layer``'s active
    adapters act in, else ``None``."""
    merged = [*layer.merged_adapters,
              *(n for n in names if n not in layer.merged_adapters and layer.has_adapter(n))]
    before, after = _order(layer, layer.merged_adapters), _order(layer, merged)
    return None if before == after else (before, after)


def merge_in_order(layer: Any, names: Sequence[str], safe: bool = False, where: str = "") -> None:
    """Fold ``layer``'s adapters ``names`` (those not merged yet) into its weight, in the order given."""
    for name in names:
        if name in layer.merged_adapters or not layer.has_adapter(name):
            continue
        layer._fold(name, False, safe, where)
        layer.merged_adapters.append(name)


def unmerge_in_order(layer: Any, names: Sequence[str] | None = None) -> None:
    """Take ``layer``'s merged adapters ``names`` (default: all) out of its weight; those merged after the first one
    asked for come out too (last first) and go back in afterwards."""
    wanted = [n for n in layer.merged_adapters if names is None or n in names]
    if not wanted:
        return
    peeled = layer.merged_adapters[layer.merged_adapters.index(wanted[0]):]
    for name in reversed(peeled):
        layer._fold(name, True)
        layer.merged_adapters.remove(name)
    merge_in_order(layer, [n for n in peeled if n not in wanted])
