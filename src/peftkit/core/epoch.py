"""A counter that moves whenever an adapter layer's structure may have changed, so forwards can cache plans.

Every forward of an adapter layer used to re-derive what to run (which adapter is active and unmerged, which
tensors, which dropout) from a dozen dictionaries; decoding one token is nearly all such overhead. A layer
now caches that plan and re-derives it only when :data:`EPOCH` has moved. It moves on:

- any module, parameter or buffer registration on an adapter layer or a module below it (global ``torch.nn``
  registration hooks, filtered by :func:`own`: adding an adapter, replacing a factor or the base layer,
  ``load_state_dict(assign=True)``);
- assignment to, or in-place change of, a layer's adapter state (``active_adapters``, ``merged_adapters``,
  ``disabled``, ``scaling``, ``dropout_position``: lists and dicts are wrapped to report their mutations);
- ``Module._apply`` on an adapter layer (``.to()``, ``.half()``, ``.cuda()``, which may swap parameters).

What may change without any of these — ``requires_grad``, dtypes, a dropout module's ``p`` and ``training``,
autocast — is checked on every call. Moving the counter too often costs a re-derivation; never too rarely.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, SupportsIndex

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["EPOCH", "STEPS", "TouchDict", "TouchList", "own", "touch", "watched"]


class _Epoch:
    value = 0


EPOCH = _Epoch()


class _Steps:
    value = 0


#: Optimizer steps taken in this process (any ``torch.optim.Optimizer``). Values derived from parameters (DoRA's
#: ‖W + sBA‖) are cached under the tensors' version counters, which in-place updates move, and this count:
#: fused optimizers (``AdamW(fused=True)``, the default of ``transformers.Trainer``) write the parameters
#: without moving their version counters.
STEPS = _Steps()


def _count_step(*_: Any) -> None:
    STEPS.value += 1


register_optimizer_step_post_hook(_count_step)


def touch(*_: Any) -> None:
    """Move the counter (signature fits the ``torch.nn`` registration hooks, whose return value is ignored)."""
    EPOCH.value += 1


class TouchList(list[Any]):
    """A list that moves :data:`EPOCH` on every mutation."""

    def append(self, item: Any) -> None:
        touch()
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        touch()
        super().extend(items)

    def insert(self, index: SupportsIndex, item: Any) -> None:
        touch()
        super().insert(index, item)

    def remove(self, item: Any) -> None:
        touch()
        super().remove(item)

    def pop(self, index: SupportsIndex = -1) -> Any:
        touch()
        return super().pop(index)

    def clear(self) -> None:
        touch()
        super().clear()

    def __setitem__(self, index: Any, item: Any) -> None:
        touch()
        super().__setitem__(index, item)

    def __delitem__(self, index: Any) -> None:
        touch()
        super().__delitem__(index)

    def __iadd__(self, items: Iterable[Any]) -> TouchList:  # type: ignore[misc]
        touch()
        super().__iadd__(items)
        return self

    def sort(self, *args: Any, **kwargs: Any) -> None:
        touch()
        super().sort(*args, **kwargs)

    def reverse(self) -> None:
        touch()
        super().reverse()


class TouchDict(dict[Any, Any]):
    """A dict that moves :data:`EPOCH` on every mutation."""

    def __setitem__(self, key: Any, value: Any) -> None:
        touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        touch()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        touch()
        return super().pop(*args)

    def popitem(self) -> tuple[Any, Any]:
        touch()
        return super().popitem()

    def clear(self) -> None:
        touch()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        touch()
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        touch()
        return super().setdefault(key, default)


def watched(value: Any) -> Any:
    """``value`` wrapped to report mutations (plain lists and dicts), else as is; moves :data:`EPOCH`."""
    touch()
    if type(value) is list:
        return TouchList(value)
    if type(value) is dict:
        return TouchDict(value)
    return value


_OWNED = "_peftkit_owned"


def own(module: torch.nn.Module) -> None:
    """Mark ``module`` as part of an adapter layer: registrations on it, and on what it registers, move the
    counter. (Registrations elsewhere do not: model code builds modules during forward — transformers slices
    its ``ModuleList`` of layers on every call — which would otherwise defeat the cache.)"""
    module.__dict__[_OWNED] = True


def _on_module(parent: torch.nn.Module, name: str, module: torch.nn.Module | None) -> None:
    if parent.__dict__.get(_OWNED):
        if module is not None:
            own(module)
        touch()


def _on_tensor(parent: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    if parent.__dict__.get(_OWNED):
        touch()


torch.nn.modules.module.register_module_module_registration_hook(_on_module)
torch.nn.modules.module.register_module_parameter_registration_hook(_on_tensor)
torch.nn.modules.module.register_module_buffer_registration_hook(_on_tensor)
