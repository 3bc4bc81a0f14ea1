"""Config dataclasses from plain mappings (parsed JSON or YAML) and back.

:func:`from_dict` builds a config dataclass recursively (a field typed by a config family that
parses itself, such as :class:`~moracl.adapters.AdapterConfig`, goes through its own
``from_dict``); :func:`to_dict` is its inverse. :func:`check_field_types` checks a flat mapping
against a dataclass before it is built: every key a string, every value of its field's JSON
type.

This is the parsing half of validation: it turns what would otherwise surface as a
``TypeError``, ``KeyError`` or ``OverflowError`` deep inside a constructor into a
``ValueError`` naming the key, what was expected and the value.  Range checks (``rank > 0``,
``dropout`` in ``[0, 1)``, ...) stay in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar, Union

__all__ = ["check_field_types", "check_string_keys", "from_dict", "show", "to_dict"]

T = TypeVar("T")


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


# -- mapping -> config dataclass, recursively ---------------------------------------------


def _fail(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where or 'config'}: expected {expected}, got {value!r}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if isinstance(tp, type) and callable(getattr(tp, "from_dict", None)):
        # a config family that parses itself (adapter kinds, mixtures, routers: tagged)
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, f"a mapping for {tp.__name__}", value)
        try:
            return getattr(tp, "from_dict")(value)  # noqa: B009
        except (ValueError, TypeError) as e:  # a TypeError here is a malformed mapping
            raise ValueError(f"{where}: {e}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where=where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise _fail(where, f"one of {[m.value for m in tp]}", value) from None
    if origin in (list, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _fail(where, "a list", value)
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, "a mapping", value)
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise _fail(where, "a mapping with names (strings) as keys", value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, "an integer", value)
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # e.g. a quoted "1e-4"
            try:
                number = float(value)
            except ValueError:
                raise _fail(where, "a number", value) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, "a number", value)
        try:
            number = float(number)
        except OverflowError:  # an integer beyond float's range
            raise _fail(where, "a finite number", value) from None
        if not math.isfinite(number):
            raise _fail(where, "a finite number", value)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, "a string", value)
        return value
    return value


def from_dict(cls: type[T], data: Any, *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise ``ValueError``
    naming the valid ones, wrong types and values name the key, the value and what was
    expected. Floats must be finite."""
    if not isinstance(data, Mapping):
        raise _fail(where, f"a mapping for {cls.__name__}", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted((k for k in data if k not in fields), key=repr)
    if unknown:
        raise ValueError(
            f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        message = str(e)
        if where and message.startswith(f"{where}."):  # it names the key already
            raise ValueError(message) from None
        raise ValueError(f"{where or 'config'}: {message}") from None


def to_dict(obj: Any) -> Any:
    """A YAML/JSON-ready form of a config dataclass (``from_dict`` inverts it)."""
    if callable(getattr(obj, "to_dict", None)) and not isinstance(obj, type):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj
