"""Configuration: typed dataclass defaults, then a YAML file, then `--set key=value` overrides.

Every stage describes its options as (possibly nested) dataclasses. `build_config` fills one
from a YAML mapping and dotted overrides, checking each key against the dataclass fields and
each value against the field's type, so a typo is an error that names the valid keys instead of
a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tinylm.errors import TinyLMError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a clear error for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise TinyLMError(f"{path}: config file not found", "check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise TinyLMError(f"{path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise TinyLMError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TinyLMError(f"{path}: a config file must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`"model.n_layers=4"` -> `("model.n_layers", 4)`; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TinyLMError(f"--set {text!r}: expected KEY=VALUE, for example --set model.n_layers=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested mappings: {"a.b": 1} -> {"a": {"b": 1}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TinyLMError(f"config key {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check (and gently convert, int -> float) a value against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except TinyLMError as exc:
                errors.append(str(exc))
        raise TinyLMError(errors[0] if errors else f"{source}: {key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise TinyLMError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TinyLMError(f"{source}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TinyLMError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TinyLMError(f"{source}: {key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TinyLMError(f"{source}: {key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TinyLMError(f"{source}: {key} must be a string, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise TinyLMError(f"{source}: {key} is a section; give its keys, e.g. {key}.NAME=VALUE")
        return _build(annotation, value, f"{key}.", source)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        key = prefix + unknown[0]
        raise TinyLMError(f"{source}: unknown config key {key!r}; valid keys: {valid}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    # Nested sections given only partly keep their other defaults.
    for name in fields:
        if name in kwargs and dataclasses.is_dataclass(hints[name]) and not isinstance(
            kwargs[name], hints[name]
        ):
            kwargs[name] = _build(hints[name], kwargs[name], f"{prefix}{name}.", source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TinyLMError(f"{source}: {exc}") from None


def build_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """An instance of dataclass `cls` from defaults < `base` < YAML file < `--set` overrides.

    Validation errors (unknown key, wrong type, values the dataclass's `__post_init__` rejects)
    raise `TinyLMError` naming the source and the key.
    """
    data = dict(base or {})
    source = "config"
    if yaml_path is not None:
        data = _merge(data, read_yaml(yaml_path))
        source = str(yaml_path)
    if overrides:
        flat = dict(parse_override(o) for o in overrides)
        data = _merge(data, _nest(flat))
        source = "--set" if yaml_path is None else f"{yaml_path} + --set"
    return _build(cls, data, "", source)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (for config.json in a run)."""
    return dataclasses.asdict(config)
