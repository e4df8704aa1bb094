"""Configuration: typed dataclass defaults, then a YAML file, then `--set key=value` overrides.

Every stage describes its options as (possibly nested) dataclasses. `build_config` fills one
from a YAML mapping and dotted overrides, checking each key against the dataclass fields and
each value against the field's type, so a typo is an error that names the valid keys instead of
a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tinylm.errors import TinyLMError
from tinylm.nesting import TooDeep, loads_yaml
from tinylm.textio import read_text

T = TypeVar("T")

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Names of the presets shipped in tinylm/configs (`tiny`, `small`, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _shipped(name: str | Path) -> Path | None:
    """The shipped preset called `name`, if there is one."""
    shipped = PRESET_DIR / f"{name}.yaml"
    return shipped if "/" not in str(name) and shipped.is_file() else None


def find_preset(target: str | Path) -> Path:
    """A YAML path as given, or the shipped preset of that name; a clear error otherwise."""
    path = Path(target)
    if path.is_file():
        return path
    if shipped := _shipped(target):
        return shipped
    raise TinyLMError(
        f"{target}: no such run directory, config file or preset",
        f"presets: {', '.join(preset_names())}",
    )


def _shown(value: Any) -> str:
    """A short repr of a config value for an error message (a YAML alias can make a value of
    millions of items)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring = 2, 4, 4, 60
    return short.repr(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a clear error for a missing file or bad YAML."""
    path = Path(path)
    if not path.exists():
        if not (shipped := _shipped(path)):
            raise TinyLMError(f"{path}: config file not found",
                              f"check the path given to --config, or name a preset: "
                              f"{', '.join(preset_names())}")
        path = shipped
    text = read_text(path)
    try:
        data = loads_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise TinyLMError(f"{path}{where}: not valid YAML ({problem})") from None
    except TooDeep as exc:
        raise TinyLMError(f"{path}: {exc}; not a config file?") from None
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
        invalid = f"{source}: {key}: invalid value {_shown(value)}"
        raise TinyLMError(errors[0] if errors else invalid)
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise TinyLMError(f"{source}: {key} must be one of {choices}, got {_shown(value)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TinyLMError(f"{source}: {key} must be a list, got {_shown(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TinyLMError(f"{source}: {key} must be true or false, got {_shown(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TinyLMError(f"{source}: {key} must be an integer, got {_shown(value)}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        what = "a number" if number is None else "a finite number"
        raise TinyLMError(f"{source}: {key} must be {what}, got {_shown(value)}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TinyLMError(f"{source}: {key} must be a string, got {_shown(value)}")
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
    except TinyLMError as exc:  # the dataclass's own checks name the key; add the source
        raise TinyLMError(f"{source}: {exc.args[0]}", exc.hint) from None
    except (TypeError, ValueError) as exc:
        raise TinyLMError(f"{source}: {exc}") from None


def build_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    *,
    values: dict[str, Any] | None = None,
    source: str = "config",
    prefix: str = "",
) -> T:
    """An instance of dataclass `cls` from defaults < `base` < YAML file < `--set` overrides
    < `values` (dotted keys to values already typed, e.g. a command's flags; None entries are
    left out).

    Validation errors (unknown key, wrong type, values the dataclass's `__post_init__` rejects)
    raise `TinyLMError` naming the source (`source` for `base`) and the key (after `prefix`,
    the section `cls` is, e.g. "model.").
    """
    data = dict(base or {})
    if yaml_path is not None:
        data = _merge(data, read_yaml(yaml_path))
        source = str(yaml_path)
    if overrides:
        flat = dict(parse_override(o) for o in overrides)
        data = _merge(data, _nest(flat))
        source = "--set" if yaml_path is None else f"{yaml_path} + --set"
    given = {k: v for k, v in (values or {}).items() if v is not None}
    if given:
        data = _merge(data, _nest(given))
        source = "options" if source == "config" else f"{source} + options"
    return _build(cls, data, prefix, source)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (for config.json in a run)."""
    return dataclasses.asdict(config)
