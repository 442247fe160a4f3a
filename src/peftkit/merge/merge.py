"""``merge``, ``unmerge`` and ``unload``: fold adapters into the base weights and back.

Merging adds each adapter's ΔW to its base weight, so the merged model computes the adapted output
with no extra cost; unmerging subtracts it again (exact up to floating-point rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.registry import dequantized
from peftkit.core.state import _check_names, adapter_layers, get_state
from peftkit.core.walk import set_module
from peftkit.errors import AdapterNotFoundError, MergeError
from peftkit.methods import lora_replication as replication


def merge(model: nn.Module, names: str | Sequence[str] | None = None, safe: bool = False) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights.

    Args:
        names: adapters to merge; ``None`` merges the active adapters.
        safe: refuse (naming the module) an adapter with a NaN/Inf parameter before anything merges, and check
            every merged weight for NaN/Inf before writing it.

    Raises:
        AdapterNotFoundError: an unknown name. ConfigError: a name given twice. MergeError: a non-finite delta
            with ``safe``, a method that cannot be merged, a LoRA adapter with ``lora_bias`` on a base layer without
            a bias, active adapters beside which a DoRA adapter would compute from a changed weight, or a LoRA update
            to a weight other modules use too, such as tied embeddings, or two adapters that train their own copy of one
            ``modules_to_save`` module (then nothing is merged).
    """
    state = get_state(model)
    if not state.configs:
        raise AdapterNotFoundError("the model has no adapters to merge; add one with pk.apply first")
    wanted = state.active if names is None else ([names] if isinstance(names, str) else list(names))
    layers = _checked_merge(model, wanted)
    if safe:
        _check_finite_parameters(layers)
    for qualname, layer, held in layers:
        layer.merge(held, safe=safe, where=qualname)  # each merged weight is checked too (an overflowing update)
    return model


def _check_finite_parameters(layers: Sequence[tuple[str, AdapterLayer, list[str]]]) -> None:
    """Refuse, before any layer merges, an adapter with a NaN or Inf parameter: its update would be non-finite, and
    finding that layer by layer would leave the layers before it merged."""
    for qualname, layer, held in layers:
        for name in held:
            if not layer.parameters_finite(name):
                raise MergeError(
                    f"adapter {name!r} at {qualname} has NaN or Inf in its parameters; nothing was merged. Inspect or "
                    "retrain the adapter, or delete it with pk.delete_adapter."
                )


def _checked_merge(model: nn.Module, names: Sequence[str], *, untie: bool = False
                   ) -> list[tuple[str, AdapterLayer, list[str]]]:
    """``(qualname, layer, the names it holds)`` for the layers holding any of ``names``, once every layer has
    accepted them (``check_merge``): a refusal leaves every weight as it was. Layers in blocks repeated by LoRA's
    ``layer_replication`` share their base weights and are refused, unless ``untie`` (``unload``) first gives each
    block its own, once everything else has been checked."""
    _check_names(model, names)
    for name in names:
        check = getattr(get_state(model).configs[name], "check_merge", None)
        if check is not None:
            check(model, name)
    layers = [(q, layer, [n for n in names if layer.has_adapter(n)]) for q, layer in adapter_layers(model)]
    layers = [(q, layer, held) for q, layer, held in layers if held]
    for qualname, layer, held in layers:
        layer.check_merge(held, where=qualname)
    _check_unshared(model, layers)
    if untie:
        replication.untie(model)
    replication.check_merge(model, [(q, held) for q, _, held in layers])
    return layers


def _check_unshared(model: nn.Module, layers: Sequence[tuple[str, AdapterLayer, list[str]]]) -> None:
    """Refuse folding an update (a layer that ``folds_into_weight``: every method whose merge rewrites the weight)
    into a base weight that modules outside its layer use too (an output head tied to the input embeddings): their
    outputs would change with it, where the unmerged adapter changes only its own layer. Blocks repeated by
    ``layer_replication`` are left to :func:`replication.check_merge`."""
    holders: dict[int, list[str]] = {}
    for qualname, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(qualname)
    stack = replication.replication_of(model)
    for qualname, layer, held in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if not layer.folds_into_weight or not isinstance(weight, torch.Tensor):
            continue
        others = [h for h in holders.get(id(weight), []) if not h.startswith(qualname + ".")]
        if stack is not None:
            others = [h for h in others if not h.startswith(stack.path + ".")]
        if others:
            raise MergeError(
                f"adapters {held} at {qualname} would be folded into a weight that {others[:3]} use too (tied "
                "embeddings), whose outputs would change with it; nothing was merged. Keep the adapter unmerged, or "
                "untie the weights first (load the model with tie_word_embeddings=False)"
            )


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of the base weights again."""
    for _, layer in adapter_layers(model):
        if layer.merged_adapters:
            layer.unmerge()
    return model


merge_adapters = merge  # ``unload`` takes a ``merge`` flag, which shadows the function there


def unload(
    model: nn.Module, merge: bool = True, names: Sequence[str] | None = None, dequantize: bool = False
) -> nn.Module:
    """Return ``model`` as a plain model: adapter layers replaced by their base layers.

    Args:
        merge: fold the active adapters (or ``names``) into the weights first; otherwise drop them.
        names: the adapters to merge (default: the active ones).
        dequantize: replace quantized base layers by float copies first, so adapters merge into
            full-precision weights instead of being re-quantized.

    Returns:
        ``model`` itself, without adapters. A ``modules_to_save`` copy of a merged adapter (active or named in
        ``names``) replaces its original module; a module no merged adapter trains keeps its original. With
        ``merge``, blocks repeated by LoRA's ``layer_replication`` first get their own copies of the weights they
        share, so that each takes its own update: a plain model of the new depth.

    Raises:
        MergeError: with ``merge``, as for :func:`merge` (a ``lora_bias`` adapter on a base layer without a bias,
            or two adapters training their own copy of one module, is refused before the model changes, dequantizing
            included).
    """
    state = get_state(model)
    merged = list(state.active if names is None else names) if merge and state.configs else []
    if merged:  # refusals come before any change; blocks repeated by layer_replication are untied
        _checked_merge(model, merged, untie=True)
    if dequantize:
        for _, layer in adapter_layers(model):
            layer.base_layer = dequantized(layer.base_layer)
        for qualname, module in list(model.named_modules()):
            plain = dequantized(module)
            if plain is not module and qualname:
                set_module(model, qualname, plain)
    if merged:
        merge_adapters(model, merged)
    for qualname, layer in reversed(list(adapter_layers(model))):  # inner layers first: wrappers may nest
        if isinstance(layer, ModulesToSave):  # the merged adapter's copy (at most one: checked), else the original
            copy = next((layer.copies[n] for n in merged if n in layer.copies), layer.base_layer)
            set_module(model, qualname, copy)
        else:
            set_module(model, qualname, layer.base_layer)
    for name, config in list(state.configs.items()):
        remove = getattr(config, "remove", None)
        if remove is not None:
            remove(model, name)
    state.configs.clear()
    state.targets.clear()
    state.saved.clear()
    state.active.clear()
    return model
