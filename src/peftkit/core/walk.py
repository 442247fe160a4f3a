"""Walking a model's module tree and replacing modules by qualified name."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for every module, not descending into adapter layers.

    An adapter layer stands for the base layer it wraps, so its internals (``base_layer``, ``lora_A``,
    ...) are not candidates for matching.
    """
    from peftkit.core.layer import AdapterLayer

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        if isinstance(module, AdapterLayer):
            return
        for child_name, child in module.named_children():
            yield from visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from visit("", model)


def inside_adapter_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Modules inside the base layer of an adapter layer (an attention module that adaption prompts wrap), by the name
    they had before it was wrapped, each with that adapter layer's name and the module. ``iter_modules`` does not reach
    them.

    A ``modules_to_save`` wrapper is left out: a module trained in full has no adapters inside it by design.
    """
    from peftkit.core.layer import AdapterLayer
    from peftkit.core.modules_to_save import ModulesToSave

    found: dict[str, tuple[str, nn.Module]] = {}
    for qualname, module in iter_modules(model):
        if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSave):
            for sub, inner in module.base_layer.named_modules():
                if sub:
                    found[f"{qualname}.{sub}" if qualname else sub] = (qualname, inner)
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
