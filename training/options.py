"""Option dataclasses built from plain values (TOML, JSON, node widgets)."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def from_plain(cls: type[T], values: dict, what: str) -> T:
    """`cls(**values)`, where an unknown key is an error that names it and lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known options: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as err:  # e.g. an unknown key inside a nested table
        raise ValueError(f"{what} options: {err}") from err
