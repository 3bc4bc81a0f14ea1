"""Checking a plain mapping (parsed JSON or YAML) against a config dataclass before the
dataclass is built: every key a string, every value of its field's JSON type.

This is the parsing half of validation: it turns what would otherwise surface as a
``TypeError``, ``KeyError`` or ``OverflowError`` deep inside a constructor into a
``ValueError`` naming the key, what was expected and the value.  Range checks (``rank > 0``,
``dropout`` in ``[0, 1)``, ...) stay in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any

__all__ = ["check_field_types", "check_string_keys", "show"]


def show(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (fuzzed or hostile values can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_string_keys(data: object, what: str) -> Mapping[str, Any]:
    """``data`` as a mapping whose keys are all strings, or ``ValueError`` naming ``what``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping of keys to values, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"{what}: keys must be strings, got {show(key)}")
    return data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _describe(tp: Any) -> str | None:
    """What a value of annotation ``tp`` must be, in words; ``None`` for types not checked here."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp)]
        return None if None in parts else " or ".join(p for p in parts if p)
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return f"one of {[m.value for m in tp]}"
    return None


def _fits(tp: Any, value: object) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            float(value)  # an integer too large for a float overflows
        except OverflowError:
            return False
        return True
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return isinstance(value, (tp, str))  # which member: the dataclass's own check
    return True


def check_field_types(
    cls: type, data: Mapping[str, Any], *, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Raise ``ValueError`` for a value of ``data`` that cannot be the field of dataclass
    ``cls`` it names (``prefix`` + key in the message); keys that are not fields, keys in
    ``skip`` and fields of types other than bool/int/float/str/Enum (or optional ones) are
    left to the caller."""
    hints = _hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None or key in skip:
            continue
        expected = _describe(tp)
        if expected is not None and not _fits(tp, value):
            raise ValueError(f"{prefix}{key} must be {expected}, got {show(value)}")
