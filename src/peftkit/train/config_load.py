"""Reading run configs: YAML files and ``key.sub=value`` overrides into a validated :class:`RunConfig`.

Every value is checked against its field's type annotation (``Literal`` choices, numbers, lists), so an
error always names the field, the value and what is allowed; ranges are checked by the dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from peftkit.errors import ConfigError
from peftkit.io.atomic import write_text_atomic
from peftkit.train.config import PeftSection, RunConfig, _require

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
            raise ConfigError(f"unknown field {section}.{key}; allowed: {', '.join(hints)}")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


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
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to nested config data, in place.

    Raises:
        ConfigError: an override without ``=`` or without a section.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} is invalid; write section.field=value, e.g. train.max_steps=100")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


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
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
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
