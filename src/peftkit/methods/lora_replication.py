"""LoRA's ``layer_replication`` (HF PEFT's option): the model's stack of transformer blocks rebuilt from ranges of
its own blocks before the adapter is added, as mergekit's "passthrough" merges do.

``[[0, 4], [2, 5]]`` on a model with blocks 0…4 gives the stack 0 1 2 3 2 3 4 (half-open ranges over the original
blocks, concatenated). A repeated block shares every parameter and buffer of the original (no memory copy), so the
expanded model costs little more than the base, and each position gets its own LoRA adapter, so the repeats can
specialise in training. As in HF PEFT (``peft.tuners.tuners_utils.replicate_layers``):

* the stack is found where HF PEFT looks: ``layers`` (Llama, Mistral, …), ``encoder.layer`` (BERT) or ``h``
  (a bare Falcon/GPT-2 model), under any chain of ``.model`` attributes and an optional ``.bert``; adapter keys
  then name the new positions (``model.layers.6.self_attn.q_proj``) and the two libraries agree on them;
* every position is a new copy of its block, with every submodule's ``layer_idx`` (the KV-cache slot) set to the
  position, and the model config's ``num_hidden_layers`` set to the new count.

Two differences, neither visible in the outputs: HF PEFT copies buffers, peftkit shares them too (a quantized base
keeps its packed weights in buffers; a later ``.to()`` gives each block its own copy of them, parameters stay
shared); and peftkit also rewrites ``config.layer_types`` (per-block attention kinds, Qwen2, Gemma, …) to follow the
blocks, which HF PEFT 0.21 leaves at the old length (such models then fail in its forward).

The replication belongs to the model, not to one adapter (HF PEFT keeps it through ``delete_adapter`` and
``unload(merge=False)`` too): a later adapter, of any method, must ask for the same ranges or none (it is then
recorded with the model's, so it saves and loads like the first), and a different replication is refused.
Replicated blocks share their base weights, so ``pk.merge`` refuses adapters on them (HF PEFT refuses merging too);
``pk.unload(model, merge=True)`` first gives every position its own copy of the weights (:func:`untie`), which
makes a plain model of the new depth.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from peftkit.core.state import get_state
from peftkit.errors import ConfigError, MergeError

#: The model attribute holding its :class:`Replication`.
_ATTR = "_peftkit_layer_replication"
#: Where HF PEFT looks for the stack of blocks, below the innermost ``.model`` (and ``.bert``).
STACK_NAMES = ("layers", "encoder.layer", "h")

LayerMap = list[list[int]]


@dataclass(frozen=True)
class Replication:
    """A model's replicated stack: its qualified name and the ranges it was built from."""

    path: str
    layer_map: LayerMap


def checked_layer_map(value: Any) -> LayerMap | None:
    """``layer_replication`` as a list of ``[start, end]`` lists (tuples accepted), or ``None``.

    Raises:
        ConfigError: not a non-empty list of pairs of integers with ``0 ≤ start < end``.
    """
    if value is None:
        return None
    hint = "give half-open ranges of the original blocks, e.g. layer_replication=[[0, 4], [2, 5]]"
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"layer_replication={value!r} must be a non-empty list of [start, end] pairs "
                          f"(None for no replication); {hint}")
    out: LayerMap = []
    for pair in value:
        ints = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in pair)
        if not ints:
            raise ConfigError(f"layer_replication={value!r}: {pair!r} is not a [start, end] pair of integers; {hint}")
        start, end = pair
        if not 0 <= start < end:
            raise ConfigError(f"layer_replication={value!r}: range {list(pair)!r} is empty or negative (ranges are "
                              f"half-open, [start, end) with 0 ≤ start < end); {hint}")
        out.append([start, end])
    return out


def replication_of(model: nn.Module) -> Replication | None:
    """The replication ``model`` carries, or ``None``."""
    found: Replication | None = model.__dict__.get(_ATTR)
    return found


def _attr_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split(".") if path else []:
        obj = getattr(obj, part, None)
    return obj


def find_stack(model: nn.Module) -> tuple[str, nn.Module]:
    """``(qualified name, owner)`` of the model's stack of blocks, found as HF PEFT finds it; the owner is the module
    whose ``config`` describes the stack.

    Raises:
        ConfigError: no ``nn.ModuleList`` where HF PEFT looks.
    """
    owner = ""
    while hasattr(_attr_path(model, owner), "model"):
        owner = f"{owner}.model" if owner else "model"
    if hasattr(_attr_path(model, owner), "bert"):
        owner = f"{owner}.bert" if owner else "bert"
    for tail in STACK_NAMES:
        path = f"{owner}.{tail}" if owner else tail
        if isinstance(_attr_path(model, path), nn.ModuleList):
            return path, _attr_path(model, owner)
    where = ", ".join(f"{owner}.{t}" if owner else t for t in STACK_NAMES)
    raise ConfigError(
        f"layer_replication needs the model's stack of transformer blocks as an nn.ModuleList at {where} (where HF "
        f"PEFT looks for it: Llama-, BERT- and Falcon-style models), but {type(model).__name__} has none there; "
        "leave layer_replication out for this model"
    )


def _check_ranges(layer_map: LayerMap, path: str, count: int) -> None:
    for start, end in layer_map:
        if end > count:
            raise ConfigError(
                f"layer_replication={layer_map!r}: range {[start, end]!r} reaches past the model's {count} blocks "
                f"({path}.0 … {path}.{count - 1}); ranges are half-open over the original blocks, so end ≤ {count}"
            )


def _order(layer_map: LayerMap) -> list[int]:
    """The original block behind each new position."""
    return [i for start, end in layer_map for i in range(start, end)]


def _check_model(model: nn.Module, layer_map: LayerMap) -> tuple[str, nn.Module, nn.ModuleList]:
    """The stack to rebuild for ``layer_map`` on a model that carries no replication yet.

    Raises:
        ConfigError: the model has adapters already, no stack where HF PEFT looks, or ``layer_map`` leaves it.
    """
    adapters = list(get_state(model).configs)
    if adapters:
        raise ConfigError(
            f"layer_replication={layer_map!r} must come with the model's first adapter: it rebuilds the blocks that "
            f"the adapters {adapters} already sit on. Start from a model without adapters (or delete them first)"
        )
    path, owner = find_stack(model)
    blocks: nn.ModuleList = model.get_submodule(path)  # type: ignore[assignment]
    _check_ranges(layer_map, path, len(blocks))
    return path, owner, blocks


def _check_same(model: nn.Module, layer_map: LayerMap) -> bool:
    """Whether ``model`` carries ``layer_map`` already (``False``: it carries none).

    Raises:
        ConfigError: it carries another one.
    """
    current = replication_of(model)
    if current is None:
        return False
    if current.layer_map != layer_map:
        raise ConfigError(
            f"layer_replication={layer_map!r} differs from the replication this model already has "
            f"({current.layer_map!r} at {current.path}); an adapter on it must use the same ranges (or none). "
            "Use a fresh base model for another replication"
        )
    return True


def _share(block: nn.Module, config: Any) -> nn.Module:
    """A copy of ``block`` holding the very same parameters, buffers and model ``config`` (the memo keeps deepcopy
    from copying them): a copied config would keep the old layer count and miss later changes to the model's, such
    as ``model.set_attn_implementation("eager")``."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    if config is not None:
        memo[id(config)] = config
    return copy.deepcopy(block, memo)


def replicate(model: nn.Module, layer_map: LayerMap | None) -> Callable[[], None] | None:
    """Rebuild ``model``'s stack of blocks as ``layer_map`` says (module docstring); everything is checked first.

    Returns:
        A function that puts the original stack and config back, or ``None`` when nothing changed (no
        ``layer_map``, or the model carries this one already).

    Raises:
        ConfigError: see ``_check_model`` and ``_check_same``; the model is then unchanged.
    """
    if layer_map is None or _check_same(model, layer_map):
        return None
    path, owner, blocks = _check_model(model, layer_map)
    order = _order(layer_map)
    config: Any = getattr(owner, "config", None)
    new = nn.ModuleList(_share(blocks[i], config) for i in order)
    for position, block in enumerate(new):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # the KV-cache slot, as HF PEFT sets it
                cast(Any, module).layer_idx = position
    saved = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    parent, _, leaf = path.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, leaf, new)
    if "num_hidden_layers" in saved:
        config.num_hidden_layers = len(new)
    types = saved.get("layer_types")
    if isinstance(types, list) and len(types) == len(blocks):
        config.layer_types = [types[i] for i in order]
    model.__dict__[_ATTR] = Replication(path, layer_map)

    def undo() -> None:
        setattr(holder, leaf, blocks)
        for key, value in saved.items():
            setattr(config, key, value)
        model.__dict__.pop(_ATTR, None)

    return undo


def planned_names(model: nn.Module, value: Any, names: list[str]) -> list[str]:
    """``names`` (the model's module names) as they will be once the ``layer_replication`` of an adapter file
    (``value``; ``[]`` and ``None`` mean none, as in HF PEFT) is applied, computed without changing the model: what
    the file's targets and patterns are resolved against.

    Raises:
        ConfigError: an invalid ``value``, or as :func:`replicate` would.
    """
    layer_map = checked_layer_map(value or None)
    if layer_map is None or _check_same(model, layer_map):
        return names
    path, _, stack = _check_model(model, layer_map)
    inside = [n for n in names if n.startswith(path + ".")]
    depth = path.count(".") + 1  # the block index's place in a dotted name
    blocks = [[n for n in inside if n.split(".")[depth] == str(i)] for i in range(len(stack))]
    renamed = [f"{path}.{j}{n[len(path) + 1 + len(str(i)):]}" for j, i in enumerate(_order(layer_map))
               for n in blocks[i]]
    first = names.index(inside[0]) if inside else len(names)
    return names[:first] + renamed + [n for n in names[first:] if n not in inside]


def check_merge(model: nn.Module, layers: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Refuse merging into ``layers`` (``(qualified name, adapter names)``) that sit in the model's replicated stack,
    whose blocks share their base weights.

    Raises:
        MergeError: naming the adapters and the way to a plain model (:func:`untie`, which ``pk.unload`` runs).
    """
    current = replication_of(model)
    if current is None:
        return
    names = sorted({n for qualname, held in layers if qualname.startswith(current.path + ".") for n in held})
    if names:
        raise MergeError(
            f"adapters {names} sit on replicated blocks (layer_replication={current.layer_map!r}), which share their "
            "base weights: folding one position's update into them would change its copies too, so nothing was "
            "merged (HF PEFT refuses this as well). Keep them unmerged, or call pk.unload(model) for a plain model "
            "in which every position has its own weights"
        )


def untie(model: nn.Module) -> None:
    """Give every position of the model's replicated stack its own copy of each parameter and buffer it shares with
    an earlier position, and forget the replication: each block can then take its own merged update, and the model
    is a plain one of the new depth (``save_pretrained`` writes it, as mergekit's passthrough merge would). Nothing
    happens on a model without replication.
    """
    current = replication_of(model)
    if current is None:
        return
    seen: set[int] = set()
    for block in model.get_submodule(current.path).children():
        copies: dict[int, Any] = {}  # one copy per shared tensor, also where two modules of a block hold it
        for module in block.modules():
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(tensor) in seen:
                    if id(tensor) not in copies:
                        copies[id(tensor)] = copy.deepcopy(tensor)
                    setattr(module, key, copies[id(tensor)])
        seen.update(id(t) for t in itertools.chain(block.parameters(), block.buffers()))
    del model.__dict__[_ATTR]


def record(model: nn.Module, name: str) -> None:
    """Record the model's replication in adapter ``name``'s config when it gave none, so that it saves (and loads
    on a fresh base model) with the blocks it was trained on."""
    current = replication_of(model)
    state = get_state(model)
    if current is not None and getattr(state.configs[name], "layer_replication", None) is None:
        config = copy.copy(state.configs[name])  # not replace(): that would drop what resolve() planned (canonical)
        cast(Any, config).layer_replication = current.layer_map
        state.configs[name] = config
