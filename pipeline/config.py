"""Typed config trees: nested dataclasses, named presets, ``--set a.b=value`` overrides.

Each stage defines its own tree of dataclasses (one place for every default) and a dict of named
presets. The resolved tree serializes to plain JSON and travels inside stores and checkpoints, so
later stages rebuild it from there with :func:`from_dict`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Callable, TypeVar

from schemas.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key, value or preset that does not exist or does not parse."""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON value (or a string from the command line) to the field's type."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed for type {tp}")
    if isinstance(value, str) and typing.get_origin(tp) is typing.Literal and value in typing.get_args(tp):
        return value
    if isinstance(value, str) and tp is not str:
        low = value.strip().lower()
        if optional and low in ("none", "null"):
            return None
        if tp is bool:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if typing.get_origin(tp) in (tuple, list):
                value = [v for v in value.split(",") if v != ""]
            else:
                raise ConfigError(f"{key}: cannot parse {value!r} as {tp}") from None
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, key) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            value = str(value)
        return value
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "", strict: bool = True) -> T:
    """Build a dataclass tree from a dict; unknown keys are an error naming them (``strict``)."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(prefix + n for n in names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items() if k in names}
    return cls(**kwargs)


def all_keys(cfg_or_cls: Any, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config tree."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    hints = _field_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out += all_keys(tp, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Return a copy of ``cfg`` with ``key.path=value`` overrides applied (values parsed as JSON
    where they parse, else as strings). An unknown key is a :class:`ConfigError` listing the
    valid ones."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node: Any = data
        cls: Any = type(cfg)
        for i, part in enumerate(parts):
            hints = _field_types(cls)
            if not isinstance(node, dict) or part not in hints:
                raise ConfigError(
                    f"unknown config key {key!r}; valid keys: {', '.join(all_keys(type(cfg)))}"
                )
            tp, _ = _unwrap_optional(hints[part])
            if i == len(parts) - 1:
                if _is_dataclass_type(tp):
                    raise ConfigError(f"{key!r} is a section, not a value; set one of its keys")
                node[part] = _coerce(raw, hints[part], key)
            else:
                if not _is_dataclass_type(tp):
                    raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a value")
                if node[part] is None:
                    node[part] = to_dict(tp())
                node = node[part]
                cls = tp
    return from_dict(type(cfg), data)


def resolve_preset(presets: dict[str, Callable[[], T]], name: str, overrides: list[str] | tuple[str, ...] = (),
                   check: Callable[[T], None] | None = None) -> T:
    """A named preset with overrides applied, then ``check``-ed (it raises ConfigError naming the
    key); an unknown name lists the known ones."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}")
    cfg = apply_overrides(presets[name](), list(overrides))
    if check is not None:
        check(cfg)
    return cfg
