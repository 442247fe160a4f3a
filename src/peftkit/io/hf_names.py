"""How HF PEFT's ``adapter_config.json`` names modules: its target, layer and pattern conventions, both ways.

HF PEFT reads ``target_modules`` as a full-match regex when it is a string and as names or dotted suffixes when it
is a list, ``rank_pattern``/``alpha_pattern`` keys as ``(.*\\.)?(KEY)$`` regexes, and ``layers_to_transform``
with its own layer-index rules. These functions resolve those to exact qualified names on reading, and write names
HF PEFT matches exactly; every method's config uses them.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from peftkit.errors import ConfigError

__all__ = [
    "HF_BOOKKEEPING", "hf_layer_config", "hf_layer_fields", "hf_layer_targets", "hf_modules_to_save", "hf_parameters",
    "hf_pattern", "hf_resolve", "hf_saved_modules", "hf_suffix_keys", "hf_suffix_pattern", "hf_targets",
    "hf_unknown_options",
]

#: Keys of ``adapter_config.json`` that HF PEFT writes for every method and that select nothing to compute.
HF_BOOKKEEPING = frozenset(
    "peft_type task_type inference_mode base_model_name_or_path revision auto_mapping peft_version".split())


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _as_layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    return [value] if isinstance(value, int) else list(value)


def hf_targets(targets: list[str], module_names: list[str]) -> list[str] | str:
    """``target_modules`` for HF PEFT that selects exactly ``targets`` among ``module_names``.

    The sorted leaf names when HF PEFT's suffix matching of them selects exactly ``targets`` (readable,
    and what serving engines expect), otherwise a full-match regex of the exact names.
    """
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    selected = {n for n in module_names if n.rsplit(".", 1)[-1] in leaves}
    if selected == set(targets):
        return leaves
    return "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"


def hf_resolve(spec: Any, module_names: list[str]) -> list[str]:
    """HF PEFT's ``target_modules``: a list matches names or dotted suffixes; a string is a full-match regex.

    List entries naming no module are left out, as HF PEFT needs only one entry to match (lists written for several
    architectures, such as ``["q_proj", "query_key_value"]``); when none matches, the list is returned whole, so that
    peftkit's error names the patterns.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec in ("all-linear",):
            return [spec]
        regex = re.compile(spec)
        return [n for n in module_names if regex.fullmatch(n)] or [spec]
    present = [t for t in spec if any(n == t or n.endswith("." + t) for n in module_names)]
    return present or list(spec)


def hf_layer_targets(data: dict[str, Any], module_names: list[str]) -> list[str]:
    """The modules HF PEFT adapts for ``target_modules`` with ``layers_to_transform`` (exclusions apart).

    As HF PEFT: a module named exactly like an entry is taken whatever its layer; one matched by a dotted suffix
    only when the first index after ``layers_pattern`` (any ``name.N.`` without a pattern) is a listed layer.
    Without layer indices, or with a regex string (which HF PEFT takes with no layer indices), ``hf_resolve``.
    """
    spec, layers = data.get("target_modules"), _as_layers(data.get("layers_to_transform"))
    if not layers or spec is None or isinstance(spec, str):
        return hf_resolve(spec, module_names)
    patterns = _as_list(data.get("layers_pattern"))
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]

    def layer_of(name: str) -> int | None:
        found = next((m for m in (re.match(r, name) for r in regexes) if m), None)
        return int(found.group("idx")) if found else None

    return [n for n in module_names if n in spec
            or (any(n.endswith("." + t) for t in spec) and layer_of(n) in layers)]


def hf_layer_config(config: Any, targets: list[str], module_names: list[str], *, lacks: Collection[str] = (),
                    **fields: Any) -> dict[str, Any]:
    """``adapter_config.json`` of a method that adapts layers by name: the entries HF PEFT writes for all of them
    around the method's own ``fields``, then what the config kept from a file it was read from (``config.extra``).

    The targets are written as names HF PEFT matches exactly (:func:`hf_targets`), so there is nothing to exclude
    and no layer selection. ``lacks``: the entries of these that the method's HF PEFT config does not have (VeRA's has
    no ``exclude_modules``), left out.
    """
    written = {
        "peft_type": config.peft_type,
        "task_type": config.task_type,
        **fields,
        "target_modules": hf_targets(targets, module_names),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **config.extra,
    }
    for key in lacks:
        del written[key]
    return written


def hf_layer_fields(data: dict[str, Any], module_names: list[str]) -> dict[str, Any]:
    """The config fields every method that adapts layers by name reads alike from ``adapter_config.json``: its
    targets (``layers_to_transform`` resolved as HF PEFT does), exclusions, ``modules_to_save`` and task type."""
    return {
        "target_modules": hf_layer_targets(data, module_names),
        "exclude_modules": hf_resolve(data.get("exclude_modules"), module_names),
        "modules_to_save": hf_modules_to_save(data.get("modules_to_save"), module_names),
        "task_type": data.get("task_type"),
    }


def hf_modules_to_save(spec: Any, module_names: list[str]) -> list[str]:
    """HF PEFT's ``modules_to_save`` as entries peftkit reads as selecting the same modules, minus entries matching
    nothing (it adds ``classifier`` and ``score`` for every SEQ_CLS model and skips the one that is absent).

    HF PEFT selects every module whose qualified name ends with an entry as a plain string, so ``"norm"`` also
    selects ``input_layernorm``. An entry that selects the same modules as a peftkit name or dotted suffix is kept;
    any other becomes the qualified names of the modules HF PEFT selects.
    """
    out: list[str] = []
    for entry in _as_list(spec):
        theirs = [n for n in module_names if n.endswith(entry)]
        ours = [n for n in module_names if n == entry or n.endswith("." + entry)]
        if theirs:
            out += [m for m in ([entry] if theirs == ours else theirs) if m not in out]
    return out


def hf_saved_modules(saved: list[str], module_names: list[str]) -> list[str] | None:
    """``modules_to_save`` for HF PEFT that selects exactly the modules ``saved`` (qualified names), inside which
    it takes nothing apart: their sorted leaf names when HF PEFT's plain-suffix reading of them selects no other
    module, otherwise the qualified names (``None`` when nothing is saved)."""
    if not saved:
        return None
    leaves = sorted({s.rsplit(".", 1)[-1] for s in saved})
    outer = [n for n in module_names if not any(n.startswith(s + ".") for s in saved)]
    if {n for n in outer if any(n.endswith(leaf) for leaf in leaves)} == set(saved):
        return leaves
    return list(saved)


def hf_pattern(pattern: dict[str, Any], module_names: list[str], parameters: bool = False) -> dict[str, Any]:
    """HF PEFT's rank/alpha patterns (``(.*\\.)?(KEY)$`` regexes, the first key that matches wins) resolved to
    exact module names. With ``parameters`` (an adapter with ``target_parameters``), keys that match no module are
    kept as they are: they name parameters, which peftkit matches by key or dotted suffix as HF PEFT does."""
    out: dict[str, Any] = {}
    used = set()
    for name in module_names:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                out.setdefault(name, value)
                used.add(key)
                break
    if parameters:
        out.update({key: value for key, value in pattern.items() if key not in used})
    return out


def hf_suffix_pattern(pattern: dict[str, Any], module_names: list[str]) -> dict[str, int]:
    """A per-module pattern whose keys HF PEFT matches as the regex ``.*\\.KEY$`` (FourierFT's
    ``n_frequency_pattern``, C3A's ``block_size_pattern``; the first matching key wins), resolved to exact module
    names."""
    out: dict[str, int] = {}
    for name in module_names:
        key = next((k for k in pattern if re.match(rf".*\.{k}$", name)), None)
        if key is not None:
            out[name] = int(pattern[key])
    return out


def hf_suffix_keys(values: dict[str, int]) -> dict[str, int]:
    """Per-module values (qualified name → value) as such a pattern: each name escaped and without its first
    component, which ``.*\\.`` cannot match (so a top-level module cannot be named)."""
    return {re.escape(name.partition(".")[2] or name): value for name, value in values.items()}


def hf_parameters(keys: list[str], module_names: list[str]) -> list[str]:
    """``target_parameters`` for HF PEFT selecting exactly ``keys``: ``<module leaf>.<parameter>`` when every
    module with that leaf name holds a selected key (``experts.gate_up_proj``), else the full keys."""
    out: list[str] = []
    for key in keys:
        path, _, parameter = key.rpartition(".")
        short = f"{path.rpartition('.')[2]}.{parameter}"
        owners = {n for n in module_names if n.rpartition(".")[2] == short.partition(".")[0]}
        chosen = short if all(f"{n}.{parameter}" in keys for n in owners) else key
        if chosen not in out:
            out.append(chosen)
    return out


def hf_unknown_options(data: dict[str, Any], fields: Collection[str], method: str,
                       advice: str = "load this adapter with HF PEFT") -> dict[str, Any]:
    """The entries of ``data`` that are neither one of the method's ``fields`` nor bookkeeping, all unset.

    Raises:
        ConfigError: one of them is set (not None, False or empty): an option of a newer HF PEFT that would load
            here and compute something else. The message names it, the method, the fields read, and ``advice``.
    """
    unknown = {k: v for k, v in data.items() if k not in fields and k not in HF_BOOKKEEPING}
    set_fields = {k: v for k, v in unknown.items() if v not in (None, False, [], {}, "")}
    if set_fields:
        key, value = next(iter(set_fields.items()))
        raise ConfigError(f"adapter_config.json sets {key}={value!r}, an option of HF PEFT's {method} that peftkit "
                          f"does not implement (it reads {', '.join(sorted(fields))}); {advice}")
    return unknown
