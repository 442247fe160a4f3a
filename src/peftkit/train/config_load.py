"""Reading run configs: YAML files and ``key.sub=value`` overrides into a validated :class:`RunConfig`.

Every value is checked against its field's type annotation (``Literal`` choices, numbers, lists), so an
error always names the field, the value and what is allowed; ranges are checked by the dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from peftkit.errors import ConfigError
from peftkit.io.atomic import write_text_atomic
from peftkit.train.config import PEFT_METHODS, PeftSection, RunConfig, _require

_SECTION_TYPES = typing.get_type_hints(RunConfig)


def _check_value(name: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if isinstance(value, bool) and "true" in allowed:  # YAML reads `true` as a bool
            value = str(value).lower()
        _require(value in allowed, name, value, ", ".join(map(str, allowed)))
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_value(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name}={value!r} is invalid; allowed: {_type_name(annotation)}")
    if annotation is type(None):
        _require(value is None, name, value, "null")
        return value
    if origin is list:
        _require(isinstance(value, list), name, value, _type_name(annotation))
        (inner,) = typing.get_args(annotation)
        return [_check_value(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), name, value, "a mapping")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
        return float(value)
    _require(
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)),
        name,
        value,
        _type_name(annotation),
    )
    return value


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return {"str": "a string", "int": "an integer", "bool": "true or false"}.get(text, text.replace("typing.", ""))


def _build_section(section: str, values: Any) -> Any:
    """Build one section dataclass from a mapping, rejecting unknown keys by name."""
    cls = _SECTION_TYPES[section]
    if values is None:
        values = {}
    _require(isinstance(values, dict), section, values, "a mapping of fields")
    if cls is PeftSection:
        values = dict(values)
        return PeftSection(method=_check_value("peft.method", values.pop("method", "lora"), str), options=values)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_field(section, key, hints)
        if value is None and not _accepts_none(hints[key]):
            default = _default(cls, key)
            raise ConfigError(f"{section}.{key}=None is invalid; allowed: {_type_name(hints[key])} (the field is not "
                              f"optional); to use its default, {default!r}, remove the field or override it with "
                              f"~{section}.{key}")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _unknown_field(section: str, key: str, allowed: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
    return ConfigError(f"unknown field {section}.{key}{hint}; allowed: {', '.join(allowed)}")


def _accepts_none(annotation: Any) -> bool:
    if annotation is Any or annotation is type(None):
        return True
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _default(cls: Any, name: str) -> Any:
    """The default value of the dataclass field ``name``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested plain data.

    Raises:
        ConfigError: an unknown section or field, a value of the wrong type or out of range,
            or a missing ``checkpoint.pretrained``.
    """
    _require(isinstance(data, dict), "config", data, "a mapping of sections")
    for key in data:
        if key not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section {key!r}; allowed: {', '.join(_SECTION_TYPES)}")
    if "checkpoint" not in data:
        raise ConfigError(
            "checkpoint.pretrained is required (a local model directory, a config.json "
            "path, or {'config': {...}}); add a 'checkpoint:' section"
        )
    sections = {name: _build_section(name, data.get(name)) for name in _SECTION_TYPES}
    return RunConfig(**sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply overrides to nested config data, in place and in order.

    ``section.field=value`` sets a field (the value is parsed as YAML: ``null`` sets an optional field to
    ``None``); deeper keys reach into mappings (``checkpoint.pretrained.config.num_hidden_layers=4``).
    ``~section.field`` removes a field, so that its default applies; ``~section`` removes a whole section.

    Raises:
        ConfigError: an override that is neither form; removing an unknown section or field, a key a mapping
            does not have, or ``checkpoint.pretrained`` (required, no default).
    """
    for item in overrides:
        if item.startswith("~"):
            _remove(data, item)
            continue
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} is invalid; write section.field=value, e.g. train.max_steps=100 "
                              "(or ~section.field to remove a field, so that its default applies)")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def _remove(data: dict[str, Any], item: str) -> None:
    """Apply a ``~section.field`` override: delete the key, or check that its name is right where it is not set."""
    parts = item[1:].split(".")
    if "=" in item or not all(parts):
        raise ConfigError(f"override {item!r} is invalid; write ~section.field, without a value, to remove a field "
                          "so that its default applies, e.g. ~train.max_steps")
    name = ".".join(parts)
    if name in ("checkpoint", "checkpoint.pretrained"):
        raise ConfigError(f"{item!r} would remove checkpoint.pretrained, which is required and has no default; "
                          "override it instead: checkpoint.pretrained=PATH")
    node: Any = data
    for depth, part in enumerate(parts[:-1], 1):
        node = node.get(part)
        if node is None:
            break
        if not isinstance(node, dict):
            raise ConfigError(f"cannot remove {name}: {'.'.join(parts[:depth])} is {node!r}, not a mapping")
    if isinstance(node, dict) and parts[-1] in node:  # set: removed, whatever it is (a stale field too)
        del node[parts[-1]]
        return
    # Not set, so its default applies already; but a misspelt name must not pass unnoticed.
    if parts[0] not in _SECTION_TYPES:
        raise ConfigError(f"unknown config section {parts[0]!r} in {item!r}; allowed: {', '.join(_SECTION_TYPES)}")
    if len(parts) >= 2 and parts[0] != "peft":
        hints = typing.get_type_hints(_SECTION_TYPES[parts[0]])
        if parts[1] not in hints:
            raise _unknown_field(parts[0], parts[1], hints)
    elif len(parts) >= 2 and parts[1] != "method":
        fields = _method_fields(data.get("peft"))
        if fields is not None and parts[1] not in fields:
            raise _unknown_field("peft", parts[1], ["method", *fields])
    if len(parts) > 2 and isinstance(node, dict):  # inside a field's own mapping: a key there has no default
        raise ConfigError(f"cannot remove {name}: {'.'.join(parts[:-1])} has no key {parts[-1]!r}; its keys: "
                          f"{', '.join(map(str, node)) or 'none'}")


def _method_fields(peft: Any) -> list[str] | None:
    """The fields of the config class of ``peft``'s method; ``None`` when that is not known (yet)."""
    method = peft.get("method", "lora") if isinstance(peft, dict) else "lora"
    cls_name = PEFT_METHODS.get(method) if isinstance(method, str) else None
    if cls_name is None:
        return None
    import peftkit as pk

    cls = getattr(pk, cls_name, None)
    return None if cls is None else [f.name for f in dataclasses.fields(cls)]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config, apply overrides and validate.

    Args:
        path: a YAML file (``None``: start from defaults, everything from overrides).
        overrides: ``key.sub=value`` strings.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing, not valid YAML or not a mapping, or any field is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a directory; pass the path of a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML file")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r} cannot be read ({exc.strerror or exc}); check its "
                              "permissions") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start}); save it as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}; fix the syntax") from None
        _require(isinstance(data, dict), f"config file {str(p)!r}", type(data).__name__, "a YAML mapping")
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML to ``path`` (atomically: the old file or the whole new one)."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with every relative local path that exists made absolute.

    The copy of the config a checkpoint keeps is read from wherever ``peftkit eval`` or ``merge`` runs,
    so its data files, pretrained directory, tokenizer and cache must not depend on the working
    directory of the run. Paths that do not exist (yet) are kept as written.
    """

    def absolute(path: Any) -> Any:
        if isinstance(path, str) and path and not Path(path).is_absolute() and Path(path).exists():
            return str(Path(path).resolve())
        return path

    d, m, c = config.data, config.model, config.checkpoint
    return dataclasses.replace(
        config,
        data=dataclasses.replace(d, train=absolute(d.train), eval=absolute(d.eval), cache_dir=absolute(d.cache_dir)),
        model=dataclasses.replace(m, tokenizer=absolute(m.tokenizer)),
        checkpoint=dataclasses.replace(c, pretrained=absolute(c.pretrained), save_dir=absolute(c.save_dir)),
    )
