"""Modules trained in full alongside an adapter (``modules_to_save``), such as a classification head.

Each adapter gets its own trainable copy of the module; the original stays frozen and is used whenever
no active adapter has a copy. On disk the copy is saved under the module's own path
(``base_model.model.classifier.weight``), as Hugging Face PEFT does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterStateError, MergeError


class ModulesToSave(AdapterLayer):
    """``base_layer`` plus one trainable copy of it per adapter."""

    adapter_containers = ("copies",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()

    def add(self, name: str) -> None:
        duplicate = copy.deepcopy(self.base_layer)
        duplicate.requires_grad_(True)
        self.copies[name] = duplicate

    def check_active(self, names: Sequence[str], where: str = "") -> None:
        # One copy computes the module's output: a second adapter's copy would be silently ignored (HF PEFT refuses
        # the same combination).
        if len(names) > 1:
            raise AdapterStateError(
                f"adapters {list(names)} each train their own copy of {where or type(self.base_layer).__name__} "
                "(modules_to_save), and only one copy can compute its output; activate one of them with "
                "pk.set_adapter"
            )

    def current(self) -> nn.Module:
        """The module ``forward`` uses: the first active adapter's copy, else the original."""
        for name in self._applied():
            return self.copies[name]
        return self.base_layer

    @property
    def weight(self) -> Any:
        return self.current().weight

    @property
    def bias(self) -> Any:
        return getattr(self.current(), "bias", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def adapter_tensors(self, name: str) -> dict[str, Any]:
        # HF PEFT strips ``modules_to_save.<name>.``: the copy is saved under the module's own keys.
        if name not in self.copies:
            return {}
        return dict(self.copies[name].state_dict(keep_vars=True))

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        # Merged adapters compute together, as active ones do: one copy would be silently ignored.
        if len(names) > 1:
            raise MergeError(
                f"adapters {list(names)} each train their own copy of {where or type(self.base_layer).__name__} "
                "(modules_to_save), and only one copy can compute its output; nothing was merged. Merge one of them"
            )

    def merge(self, names: Any, safe: bool = False, where: str = "") -> None:
        # Merging keeps the copy in use; ``unload`` later swaps it in for the original.
        return None

    def unmerge(self, names: Any = None) -> None:
        return None
