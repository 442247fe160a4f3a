"""Per-model adapter bookkeeping and the functions that choose which adapters are active."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterNotFoundError, ConfigError

_ATTR = "_peftkit_state"


@dataclass
class PeftState:
    """What peftkit knows about a model's adapters; stored on the model itself.

    Attributes:
        configs: adapter name → its config.
        targets: adapter name → qualified names of the modules it adapts.
        saved: adapter name → qualified names of its ``modules_to_save``.
        active: names of the active adapters.
    """

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    saved: dict[str, list[str]] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def get_state(model: nn.Module, create: bool = False) -> PeftState:
    """The model's :class:`PeftState` (created empty when ``create``)."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = PeftState()
        if create:
            model.__dict__[_ATTR] = state
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(qualified_name, layer)`` for every adapter layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = get_state(model).configs
    for i, name in enumerate(names):
        if name in names[:i]:  # a second mention would add the update twice in forward but fold it in once
            raise ConfigError(f"adapter {name!r} is named twice in {list(names)}; name each adapter once")
        if name not in known:
            raise AdapterNotFoundError(
                f"no adapter named {name!r} on this model; its adapters are {sorted(known) or 'none'}. "
                "Add one with pk.apply or pk.load_adapter."
            )


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(get_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters of ``model``."""
    return list(get_state(model).active)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (several are summed); only their parameters stay trainable.

    Raises:
        AdapterNotFoundError: a name is not an adapter of ``model``. ConfigError: a name given twice.
            AdapterStateError: adapters that cannot be active together (trainable tokens replacing the same row,
            two copies of one ``modules_to_save`` module). Nothing is changed.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    _check_names(model, wanted)
    named = list(adapter_layers(model))
    for qualname, layer in named:
        layer.check_active([n for n in wanted if layer.has_adapter(n)], qualname)
    layers = [layer for _, layer in named]
    state = get_state(model)
    state.active = wanted
    for layer in layers:
        layer.set_active(wanted)
    for name, config in state.configs.items():
        hook = getattr(config, "on_set_active", None)
        if hook is not None:
            hook(model, name, name in wanted)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes exactly its base output.

    Unmerged adapters are skipped; merged ones are unmerged on entry and merged again on exit.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    previous = {id(layer): layer.disabled for layer in layers}
    for layer in layers:
        if layer.merged_adapters:
            layer.unmerge()
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:  # merged again while disabled: in their old order, whatever is active
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])
            layer.disabled = previous[id(layer)]
