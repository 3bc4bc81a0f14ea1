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
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar, Union

__all__ = [
    "FieldDoc",
    "check_field_types",
    "check_string_keys",
    "describe_config",
    "field_docs",
    "from_dict",
    "parse_value",
    "show",
    "to_dict",
]

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


def parse_value(tp: Any, value: Any, where: str = "") -> Any:
    """``value`` converted to annotation ``tp`` as a config field of that type is (nested
    dataclasses and tagged families built); ``ValueError`` naming ``where`` when it cannot."""
    return _convert(tp, value, where)


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


# -- documentation of a config's keys ---------------------------------------------------------

_ARG = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):\s*(.*)$")


@functools.cache
def _docstring_args(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Args:`` section of ``cls``'s docstring and its bases'."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's text wins
        lines = (klass.__dict__.get("__doc__") or "").splitlines()
        inside, indent, name = False, -1, ""
        for line in lines:
            if line.strip() in ("Args:", "Attributes:"):
                inside, indent, name = True, -1, ""
                continue
            if not inside:
                continue
            if not line.strip():
                inside = False
                continue
            match = _ARG.match(line)
            width = len(line) - len(line.lstrip())
            if match and (indent < 0 or width == indent):
                indent, name = width, match.group(2)
                out[name] = match.group(3).strip()
            elif name and width > indent:
                out[name] += " " + line.strip()
            else:
                inside = False
    return out


def _type_name(tp: Any) -> str:
    """A short name of annotation ``tp`` (``int``, ``list[str]``, ``{a|b}`` for an Enum)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "{" + "|".join(str(m.value) for m in tp) + "}"
    origin = typing.get_origin(tp)
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


@dataclass(frozen=True)
class FieldDoc:
    """One key of a config, for ``moracl validate --doc``.

    Args:
        key: the dotted key (``train.lr``).
        type: its type, in words (``float``, ``{stop|skip}``).
        default: the field's default, as YAML would hold it (``None`` also when required).
        value: the config's value, likewise.
        help: the field's help text (its ``help=`` metadata, else its docstring entry).
        section: the dotted section holding the key (``""`` at the top level).
    """

    key: str
    type: str
    default: Any
    value: Any
    help: str
    section: str


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None


def field_docs(config: Any, prefix: str = "") -> list[FieldDoc]:
    """Every key of config dataclass ``config`` (an instance), nested sections dotted and
    listed after the keys of their parent, with type, default, value and help."""
    cls: type = type(config)
    hints = _hints(cls)
    helps = _docstring_args(cls)
    own: list[FieldDoc] = []
    nested: list[FieldDoc] = []
    for f in dataclasses.fields(config):
        key = f"{prefix}{f.name}"
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested += field_docs(value, f"{key}.")
            continue
        text = f.metadata.get("help") or helps.get(f.name, "")
        tp = _type_name(hints.get(f.name, Any))
        own.append(FieldDoc(key, tp, _default(f), to_dict(value), text, prefix.rstrip(".")))
    return own + nested


def describe_config(config: Any) -> str:
    """The keys of ``config`` grouped by section, one per line with its value, type and
    default, and its help text under it (what ``moracl validate --doc`` prints)."""
    lines: list[str] = []
    section: str | None = None
    for doc in field_docs(config):
        if doc.section != section:
            section = doc.section
            lines += [""] if lines else []
            lines.append(f"[{section}]" if section else f"[{type(config).__name__}]")
        value = _flow(doc.value)
        default = _flow(doc.default)
        same = "" if doc.value == doc.default else f", default {default}"
        lines.append(f"  {doc.key} = {value}  ({doc.type}{same})")
        if doc.help:
            lines += textwrap.wrap(
                _plain(doc.help), 96, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    """``text`` without reStructuredText markup (``:class:`~a.B``` -> ``B``, double
    backquotes -> single)."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def _flow(value: Any) -> str:
    """``value`` as one line of YAML-like text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and ":" not in value else repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return repr(value)
