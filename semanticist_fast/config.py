"""Typed configs: YAML files loaded into dataclasses, with dotted `key=value` overrides.

Every dataclass field is typed; the loader checks each value against its type (Literal fields list their allowed
choices) and rejects unknown keys, so a typo fails at start-up with the key, the value and the fix. A section that
renamed a key lists it in `RENAMED = {old: new}`: the old key is an error naming the new one, and configs saved in
checkpoints are migrated (`migrate_saved`), so old runs still load.
"""
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    pass


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Convert a YAML value (or an override string already parsed by YAML) to the field type, or fail loudly."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        # YAML reads `ddim25` as a string but `250` as an int: compare as strings for string choices.
        if isinstance(value, (int, float)) and str(value) in choices:
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(repr(c) for c in choices)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a bool; use true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 2e-3 without a dot as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: {value!r} is not a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _unknown_key_error(cls, name: str, prefix: str) -> ConfigError:
    renamed = getattr(cls, "RENAMED", {})
    if name in renamed:
        return ConfigError(f"config key {prefix}{name} was renamed: use {prefix}{renamed[name]}")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {prefix}{close[0]!s}?" if close else ""
    return ConfigError(f"unknown config key {prefix}{name!s}.{hint} Allowed keys here: {', '.join(names)}")


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in (data or {}).items():
        if name not in fields:
            raise _unknown_key_error(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    try:
        for f in dataclasses.fields(cls):
            if f.name not in (data or {}) and dataclasses.is_dataclass(hints[f.name]):
                _validate_defaults(getattr(obj, f.name))  # a section left at its defaults must be valid too
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except ConfigError:
        raise
    except ValueError as e:  # a section's own check: a bad value in the config, so a config error
        raise ConfigError(str(e)) from None
    return obj


def _validate_defaults(obj) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_defaults(child)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()


def to_dict(obj) -> dict:
    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v

    return convert(obj)


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Set dotted keys (`optim.blr=1e-4`) in a raw config dict; values are parsed as YAML scalars."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.batch_size=64)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(node_cls)
            if part not in hints:
                raise _unknown_key_error(node_cls, part, ".".join(parts[:depth]) + ("." if depth else ""))
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(raw) if raw != "" else ""
            else:
                child_cls = hints[part]
                if not dataclasses.is_dataclass(child_cls):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is a value, not a section; cannot set {key}")
                node[part] = dict(node.get(part) or {})
                node, node_cls = node[part], child_cls
    return data


def load_config(cls, path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None):
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data)


def migrate_saved(cls, data: dict) -> dict:
    """A config dict saved by an older version, with renamed keys (RENAMED tables of cls's sections) renamed."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        key = getattr(cls, "RENAMED", {}).get(key, key)
        child = hints.get(key)
        out[key] = migrate_saved(child, value) if child is not None and dataclasses.is_dataclass(child) else value
    return out


def save_config(obj, path: Union[str, Path]) -> None:
    from .common.files import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False))
