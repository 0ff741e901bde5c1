"""Typed, frozen configs with dotted command-line overrides.

Every config in mmjax is a frozen dataclass. Unlike a free-form dict, a dataclass rejects keys it
does not declare, so a typo in `--config.optim.lr=1e-3` is an error naming the key instead of a
silently ignored setting.

    cfg = apply_overrides(cfg, ["optim.peak_lr=1e-3", "mesh.shape=(2,2,2)"])
    d = to_dict(cfg); cfg2 = from_dict(type(cfg), d)   # JSON round trip, also strict
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the declared schema."""


def config(cls: type[T]) -> type[T]:
    """Decorator: a frozen, keyword-only dataclass (the only kind of config in mmjax)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Turns `value` (a Python object or a command-line string) into type `tp`, or raises."""
    tp, optional = _strip_optional(tp)
    if tp is typing.Any:
        return _freeze(value)
    if value is None or (optional and isinstance(value, str) and value in ("None", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"config key '{path}' may not be None")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, _prefix=path + ".")
        raise ConfigError(f"config key '{path}' needs a {tp.__name__} section, got {value!r}")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key '{path}' needs a bool, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key '{path}' needs a {tp.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' needs a {tp.__name__}, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"config key '{path}' needs an int, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' needs a str, got {value!r}")
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{path}' must be one of {allowed}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise ConfigError(f"config key '{path}' needs {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' needs a dict, got {value!r}")
        return dict(value)
    return value


def _freeze(x: Any) -> Any:
    """JSON lists back to the tuples configs hold (configs are frozen and hashable)."""
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def from_dict(cls: type[T], d: dict, *, _prefix: str = "") -> T:
    """Builds config `cls` from a (JSON) dict; unknown keys raise a ConfigError naming them."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(_prefix + k for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], _prefix + k) for k, v in d.items()})


def to_dict(cfg) -> dict:
    """A JSON-friendly dict of a config (tuples become lists)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def set_path(cfg: T, dotted: str, value: Any) -> T:
    """Returns a copy of `cfg` with the field at `dotted` set to `value` (strings are parsed)."""
    head, _, rest = dotted.partition(".")
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"config key '{dotted}': {type(cfg).__name__} has no sub-keys")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(
            f"unknown config key '{head}' in {type(cfg).__name__}; known: {', '.join(sorted(names))}")
    hints = _field_types(type(cfg))
    if rest:
        child = getattr(cfg, head)
        if child is None:
            child_tp, _ = _strip_optional(hints[head])
            if not dataclasses.is_dataclass(child_tp):
                raise ConfigError(f"config key '{head}' has no sub-key '{rest}'")
            child = child_tp()
        return dataclasses.replace(cfg, **{head: set_path(child, rest, value)})
    return dataclasses.replace(cfg, **{head: _coerce(value, hints[head], head)})


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """Applies `key=value` strings (or a {dotted_key: value} dict) to `cfg`."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for o in overrides:
            key, sep, val = o.partition("=")
            if not sep:
                raise ConfigError(f"override '{o}' is not of the form key=value")
            parsed.append((key.strip(), val))
        items = parsed
    for key, val in items:
        try:
            cfg = set_path(cfg, key, val)
        except ConfigError as e:
            if f"'{key}'" in str(e):
                raise
            raise ConfigError(f"in override '{key}': {e}") from None
    return cfg


def replace_in(cfg: T, cls: type, **changes) -> T:
    """A copy of the config tree `cfg` with `changes` applied to every `cls` inside it (cfg itself
    included): e.g. replace_in(clip_cfg, TransformerConfig, dtype="bfloat16") for both towers."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    children = {f.name: replace_in(getattr(cfg, f.name), cls, **changes) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, cls):
        children.update(changes)
    return dataclasses.replace(cfg, **children)


def diff(a, b, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two config dicts (for workdir checks)."""
    out = []
    for k in sorted(set(a) | set(b)):
        p = prefix + k
        if k not in a or k not in b:
            out.append(p)
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out.extend(diff(a[k], b[k], p + "."))
        elif a[k] != b[k]:
            out.append(p)
    return out
