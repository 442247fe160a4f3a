"""Merging for adapters that multiply the base weight by a rotation (OFT, BOFT) instead of adding to it.

Merging folds the rotation into the weight; unmerging solves with it (a Neumann-series rotation is only nearly
orthogonal, so its transpose would not undo it exactly). Rotations do not commute, so the order several adapters
apply in is kept through merging and unmerging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, cast

import torch

from peftkit.core.layer import AdapterLayer
from peftkit.errors import MergeError


class RotationLayer(AdapterLayer):
    """Merging for adapters that multiply the base weight (OFT, BOFT): a subclass gives ``_rotated`` and says which
    end of the active adapters a merge takes (``merges_prefix``).

    Rotations do not commute, so the order is kept: the merged weight computes what the forward did, merging only
    some of a layer's active adapters is refused where it would reorder them, and unmerging one adapter takes out the
    adapters merged after it too and folds them in again.
    """

    folds_into_weight = True
    #: The method's name, for messages.
    method: ClassVar[str] = ""

    @property
    def merges_prefix(self) -> bool:
        """Whether the rotations a merged weight holds act before the unmerged ones (a merge takes the first active
        adapters, folded in their order), or after them (the last ones, folded last first)."""
        return True

    def _rotated(self, weight: torch.Tensor, name: str, inverse: bool) -> torch.Tensor:
        """``weight`` with adapter ``name`` folded in (``inverse``: taken out again)."""
        raise NotImplementedError

    @torch.no_grad()
    def _fold(self, name: str, inverse: bool, safe: bool = False, where: str = "") -> None:
        weight = cast(torch.Tensor, self.base_layer.weight)
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight  # one rounding, at the end
        folded = self._rotated(work, name, inverse)
        if safe:
            self.check_finite(folded, where or type(self.base_layer).__name__, name)
        weight.copy_(folded.to(weight.dtype))

    def _pending(self) -> list[str]:
        """Active adapters the forward applies, in order (those not merged)."""
        return [n for n in self.active_adapters if n not in self.merged_adapters and self.has_adapter(n)]

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        # Rotations do not commute: merging some of a layer's active adapters must keep the order they apply in.
        pending = self._pending()
        merging = [n for n in pending if n in names]
        if not merging or len(merging) == len(pending):
            return
        keep = pending[:len(merging)] if self.merges_prefix else pending[-len(merging):]
        if merging != keep:
            raise MergeError(
                f"merging {merging} at {where or type(self.base_layer).__name__} would change the order in which its "
                f"active {self.method} adapters {pending} rotate (rotations do not commute); nothing was merged. "
                f"Merge all of them, or only {keep}"
            )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        # Active ones so that the merged weight computes what the forward did, inactive ones after, as given.
        active = [n for n in self.active_adapters if n in todo]
        order = (active if self.merges_prefix else active[::-1]) + [n for n in todo if n not in active]
        for name in order:
            self._fold(name, inverse=False, safe=safe, where=where)
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take adapters ``names`` (default: all) out of the weight. Rotations do not commute: those merged after the
        first of them are taken out too, and the ones not asked for folded in again."""
        wanted = [n for n in self.merged_adapters if names is None or n in names]
        if not wanted:
            return
        start = self.merged_adapters.index(wanted[0])
        tail = self.merged_adapters[start:]
        for name in reversed(tail):
            self._fold(name, inverse=True)
        kept = [n for n in tail if n not in wanted]
        for name in kept:
            self._fold(name, inverse=False)
        self.merged_adapters = self.merged_adapters[:start] + kept
