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


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
