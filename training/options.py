"""Option dataclasses built from plain values (TOML, JSON, node widgets), with typed errors.

`from_plain(cls, values, table)` checks every value against the field's annotation
before the dataclass is built, so a wrong type never reaches the engine: `lr = "1e-4"`,
`steps = 2.5` or `rank = "four"` is an error naming the table, the key, the type it
needs and the value seen; floats must be finite (NaN and infinity are refused
everywhere); nested option tables ([train.loss]) are checked the same way. TOML has
no int / float distinction the user can see, so an integer is accepted where a number
is asked for, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class OptionError(ValueError):
    """A config value of the wrong type or out of range; the message names the table and key."""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _expected(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "text"
    if hint is Path:
        return "a path"
    if hint is type(None):
        return "nothing (leave it out)"
    if origin is list:
        return f"a list of {_expected(args[0])}" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is dict:
        return f"a table of {_expected(args[1])}" if args else "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if dataclasses.is_dataclass(hint):
        return "a table"
    return str(hint)


class _Mismatch(Exception):
    pass


# Annotations whose values pass unchanged when they are of these kinds (bool is never an int here).
_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, (str, Path)),
    type(None): lambda v: v is None,
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotation `hint` wants it, or _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint in _SCALARS:
        if _SCALARS[hint](value):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise OptionError(f"{where} must be a finite number, got {value!r}")
            return float(value)
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce_item(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce_item(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        if not args:
            return dict(value)
        return {k: _coerce_item(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_plain(hint, value, where.strip("[]").replace("] ", "."))
        raise _Mismatch
    return value


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _coerce_item(value: Any, hint: Any, where: str) -> Any:
    try:
        return _coerce(value, hint, where)
    except _Mismatch:
        quoted = "; write the number without quotes" if _looks_numeric(value) and hint in (int, float) else ""
        raise OptionError(f"{where} must be {_expected(hint)}, got {value!r} ({_kind(value)}){quoted}") from None


def checked_values(cls: type, values: dict, table: str) -> dict:
    """`values` with each checked and converted to its field's type (see the module docstring)."""
    if not isinstance(values, dict):
        raise OptionError(f"[{table}] must be a table of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown {table} option(s) {unknown}; known options: {sorted(known)}")
    return {name: _coerce_item(value, hints[name], f"[{table}] {name}") for name, value in values.items()}


def from_plain(cls: type[T], values: dict, table: str) -> T:
    """`cls(**values)` after `checked_values`; the dataclass's own range checks run after that."""
    checked = checked_values(cls, values, table)
    try:
        return cls(**checked)
    except OptionError:
        raise
    except (ValueError, TypeError) as error:
        raise OptionError(f"[{table}] {error}") from None
