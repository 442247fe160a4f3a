"""Target matching: one syntax, one meaning.

A pattern is matched against a module's qualified name (``model.layers.0.self_attn.q_proj``):

* a glob (``*.layers.0.*.q_proj``) matches the whole name or any dotted suffix of it;
* a bare name (``q_proj``) is the special case of a glob without wildcards: it matches ``q_proj`` at the
  top level or ``*.q_proj`` anywhere; a dotted name (``self_attn.q_proj``) matches that suffix;
* an alias (``all-linear``, Megatron-style role names such as ``linear_qkv`` when registered) expands to
  the exact module names it stands for on this model.

Suffix semantics make every plain name Hugging Face PEFT accepts in a ``target_modules`` list mean the
same thing here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.walk import inside_adapter_layers, iter_modules
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError

#: alias → function returning the exact qualified names it stands for on a model.
ALIASES: dict[str, Callable[[nn.Module], list[str]]] = {}

#: Module names that are output heads: ``all-linear`` leaves them alone.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "output_projection"})

#: Containers whose numbered children are the transformer blocks (``layers.3``, GPT-2 ``h.3``, T5 ``block.3``).
DEFAULT_LAYER_CONTAINERS = ("layers", "layer", "h", "block", "blocks")


def register_alias(name: str, resolve: Callable[[nn.Module], list[str]]) -> None:
    """Make ``name`` usable in ``target_modules``; ``resolve(model)`` returns exact module names."""
    ALIASES[name] = resolve


def matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` (a glob or plain name) matches ``name`` or one of its dotted suffixes."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern of ``patterns`` that matches ``name``, or ``None``."""
    return next((p for p in patterns if matches(name, p)), None)


def layer_index(name: str, containers: Sequence[str] = DEFAULT_LAYER_CONTAINERS) -> int | None:
    """The transformer-block index in ``name`` (``model.layers.3.mlp`` → 3), or ``None``."""
    alternatives = "|".join(re.escape(c) for c in containers)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _head_names(model: nn.Module) -> set[str]:
    heads = {
        n for n, _ in model.named_modules() if n and (n.split(".")[0] in HEAD_NAMES or n.split(".")[-1] in HEAD_NAMES)
    }
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, NotImplementedError):
            out = None
        heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def _all_linear(model: nn.Module) -> list[str]:
    from peftkit.core.registry import linear_kind

    heads = _head_names(model)
    return [n for n, m in iter_modules(model) if n and n not in heads  # an adapter layer stands for its base
            and linear_kind(m.base_layer if isinstance(m, AdapterLayer) else m) is not None]


register_alias("all-linear", _all_linear)


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str],
    *,
    supported: Callable[[nn.Module], bool],
    supported_names: Sequence[str],
    exclude: Sequence[str] = (),
    layers: Sequence[int] | None = None,
    layer_containers: Sequence[str] = DEFAULT_LAYER_CONTAINERS,
) -> list[str]:
    """The qualified names of the modules ``targets`` select, in model order.

    Each pattern must select at least one module of a supported type; a pattern that matches only
    unsupported modules is an error naming their types, one that matches nothing an error naming the
    closest module names. Exclusions and layer indices filter the result afterwards.

    Raises:
        TargetNotFoundError: a pattern matches no module (or none survives ``exclude``/``layers``).
        UnsupportedLayerError: a pattern matches modules whose type the method cannot adapt.
    """
    modules = dict(iter_modules(model))
    names = [n for n in modules if n]
    selected: set[str] = set()
    for pattern in targets:
        if pattern in ALIASES:
            hits = ALIASES[pattern](model)
        else:
            hits = [n for n in names if matches(n, pattern)]
        if not hits:
            raise TargetNotFoundError(
                f"target pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"closest module names: {near_misses(pattern, names)}. Use a module's leaf name "
                f"(e.g. 'q_proj'), a glob on its qualified name (e.g. '*.layers.0.*.q_proj') or an alias "
                f"({', '.join(sorted(ALIASES))})." + _comma_hint(pattern)
            )
        good = [n for n in hits if supported(modules[n])]
        wrapped = sorted({type(modules[n]).__name__ for n in hits if isinstance(modules[n], AdapterLayer)})
        if not good and wrapped:
            raise UnsupportedLayerError(
                f"target pattern {pattern!r} matches layers already adapted by {', '.join(wrapped)}; a second adapter "
                "on the same layer must use the same method. Target other layers, or remove the first adapter "
                "with pk.delete_adapter."
            )
        if not good:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            raise UnsupportedLayerError(
                f"target pattern {pattern!r} matches only modules of type {', '.join(kinds)}, which this "
                f"method cannot adapt; supported layer types: {', '.join(supported_names)}."
                + (f" Target the layers inside them instead (e.g. '{hits[0]}.*')."
                   if any(True for _ in modules[hits[0]].children()) else "")
            )
        selected.update(good)
    result = [n for n in names if n in selected]
    inside = inside_adapter_layers(model)
    hidden = [n for n, (_, m) in inside.items() if any(_selects(p, n, m) for p in targets)]
    if exclude:
        result = [n for n in result if first_match(n, exclude) is None]
        hidden = [n for n in hidden if first_match(n, exclude) is None]
    if layers is not None:
        wanted = set(layers)
        result = [n for n in result if layer_index(n, layer_containers) in wanted]
        hidden = [n for n in hidden if layer_index(n, layer_containers) in wanted]
    if hidden:
        wrapper = model.get_submodule(inside[hidden[0]][0])
        raise UnsupportedLayerError(
            f"targets {list(targets)} select {', '.join(hidden)}, inside {inside[hidden[0]][0]}, which a "
            f"{type(wrapper).__name__} wraps: another method cannot adapt modules inside it. Leave them out "
            "(exclude_modules=[...] or layers=[...]), or delete that adapter first with pk.delete_adapter."
        )
    if not result:
        raise TargetNotFoundError(
            f"targets {list(targets)} select no module once exclude_modules={list(exclude)} and "
            f"layers={None if layers is None else list(layers)} are applied; loosen one of them."
        )
    return result


def _selects(pattern: str, name: str, module: nn.Module) -> bool:
    """Whether ``pattern`` selects ``module`` at ``name`` (for modules ``iter_modules`` does not reach; of the aliases,
    only ``all-linear`` is checked there)."""
    if pattern == "all-linear":
        from peftkit.core.registry import linear_kind

        return linear_kind(module) is not None
    return pattern not in ALIASES and matches(name, pattern)


def _comma_hint(pattern: str) -> str:
    """For a pattern with commas (``target_modules=q_proj,v_proj`` on the command line is one string): how to write
    the list of patterns it was meant to be."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if len(parts) < 2:
        return ""
    return (f" A pattern is one name, commas included: to target several, write a list, e.g. "
            f"peft.target_modules=[{','.join(parts)}] on the command line or target_modules={parts} in Python.")


def near_misses(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` module names (leaf names first) close to ``pattern``, for "did you mean" messages; container
    indices (``0``, ``1``, … of a ``ModuleList``) are never offered."""
    leaves = sorted({leaf for name in names if not (leaf := name.rsplit(".", 1)[-1]).isdigit()})
    leaf = pattern.rsplit(".", 1)[-1].replace("*", "")
    close = difflib.get_close_matches(leaf, leaves, n=n, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(pattern, names, n=n, cutoff=0.4)
    return close or leaves[:n]


def check_pattern_keys(model: nn.Module, field_name: str, pattern: Iterable[str]) -> None:
    """Refuse a key of a per-module pattern (``field_name``, such as ``n_frequency_pattern``) that matches no module
    of ``model``: a typo would silently keep the default.

    Raises:
        ConfigError: naming the key and the closest module names.
    """
    names = [n for n, _ in model.named_modules() if n]
    for key in pattern:
        if not any(matches(n, key) for n in names):
            raise ConfigError(f"{field_name} key {key!r} matches no module of {type(model).__name__}; closest "
                              f"module names: {near_misses(key, names)}")
