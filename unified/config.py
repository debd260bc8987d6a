"""YAML files mapped onto dataclasses: unknown keys are errors that list the valid ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from unified.errors import UnifiedError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file and the line on any error."""
    path = Path(path)
    if not path.is_file():
        raise UnifiedError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UnifiedError(f"{path}: not a text file (expected YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UnifiedError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UnifiedError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; `where` names the place in errors (e.g. 'suite.yaml: scenarios.merge')."""
    if not isinstance(data, dict):
        raise UnifiedError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UnifiedError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UnifiedError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UnifiedError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint, converting where YAML is looser than Python (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except UnifiedError as e:
                errors.append(str(e))
        raise UnifiedError(errors[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise UnifiedError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UnifiedError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UnifiedError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UnifiedError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(key_t, k, where): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise UnifiedError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise UnifiedError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def parse_value(raw: str) -> Any:
    """A command-line value as YAML (numbers, lists, booleans, null), with 1e-4 read as a number too."""
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            return value
    return value


def set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    """tree['a']['b'] = value for dotted 'a.b', making sections on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UnifiedError(f"{where}: {dotted}: {k} is not a section")
    node[keys[-1]] = value


def check_dotted(cls: type, dotted: str, where: str, short_keys: dict[str, str] | None = None) -> None:
    """Refuse a dotted key that is not a field of dataclass `cls`, listing the valid keys where it failed."""
    for i, key in enumerate(dotted.split(".")):
        if not dataclasses.is_dataclass(cls):
            return  # inside a dict field (e.g. data.tasks.world): any key
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            prefix = ".".join(dotted.split(".")[:i])
            valid = ", ".join(fields) + (f"; short keys: {', '.join(short_keys)}" if i == 0 and short_keys else "")
            raise UnifiedError(f"{where}: unknown key {dotted!r} ({key!r} is not in {prefix or 'the recipe'}); "
                               f"valid keys: {valid}")
        cls = typing.get_type_hints(cls)[key]


def apply_overrides(cls: type, tree: dict, overrides: list[str], short_keys: dict[str, str] | None = None) -> dict:
    """Set each `key=value` of `overrides` in `tree` (a recipe as loaded), checking keys against `cls`."""
    short_keys = short_keys or {}
    for item in overrides:
        if "=" not in item:
            raise UnifiedError(f"override {item!r}: expected key=value, e.g. steps=200 or model.num_layers=4")
        key, raw = item.split("=", 1)
        key = short_keys.get(key, key)
        check_dotted(cls, key, "command line", short_keys)
        set_dotted(tree, key, parse_value(raw), "command line")
    return tree


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/YAML-ready data (tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
