"""How a :class:`~moracl.model.MoRAModel` presents the model it wraps: a ``forward`` that
declares the wrapped model's parameters, and attribute errors that name both objects.

``MoRAModel.__new__`` makes each instance an instance of a subclass (same name) made once per
wrapped class, whose ``forward`` is ``MoRAModel.forward`` with the declared signature
``(self, <the wrapped forward's parameters>, *, task_ids=None)``; tools that read
``inspect.signature(model.forward)`` (``transformers.Trainer``) see what the call accepts.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import types
from collections.abc import Iterable
from typing import TypeVar, cast

from torch import nn

__all__ = ["MissingAttribute", "close_name", "forward_signature", "signature_class"]

_M = TypeVar("_M", bound=nn.Module)

_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def forward_signature(wrapped: type) -> inspect.Signature | None:
    """``(self, <the wrapped forward's parameters>, *, task_ids=None)``; ``None`` where the
    wrapped ``forward`` has no readable signature."""
    try:
        inner = inspect.signature(getattr(wrapped, "forward"))  # noqa: B009
    except (AttributeError, TypeError, ValueError):
        return None
    params = list(inner.parameters.values())[1:]  # the wrapped model's own ``self``
    if not any(p.name == "task_ids" for p in params):
        at = next(
            (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
            len(params),
        )
        task_ids = inspect.Parameter(
            "task_ids", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tensor | None"
        )
        params.insert(at, task_ids)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        return inspect.Signature([this, *params])
    except ValueError:  # e.g. a wrapped parameter called ``self``
        return None


def signature_class(cls: type[_M], wrapped: type) -> type[_M]:
    """``cls``'s subclass (same name) whose ``forward`` is ``cls.forward`` declaring the
    parameters of ``wrapped.forward`` plus ``task_ids``; made once per pair, ``cls`` itself
    where the signature cannot be read.

    ``cls`` has a class attribute ``_signature_base``: the class a made subclass was made from
    (``None`` on an ordinary class); the subclass is always made from that one."""
    base: type[_M] = getattr(cls, "_signature_base", None) or cls
    made = _SIGNATURE_CLASSES.get((base, wrapped))
    if made is None:
        signature = forward_signature(wrapped)
        if signature is None:
            return base
        f = cast(types.FunctionType, base.forward)
        forward = types.FunctionType(
            f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__
        )
        forward.__kwdefaults__ = dict(f.__kwdefaults__ or {})
        forward.__dict__.update(f.__dict__)
        forward.__qualname__, forward.__doc__ = f.__qualname__, f.__doc__
        forward.__module__, forward.__annotations__ = f.__module__, dict(f.__annotations__)
        forward.__signature__ = signature  # type: ignore[attr-defined]
        namespace = {
            "forward": forward,
            "_signature_base": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        made = _SIGNATURE_CLASSES[(base, wrapped)] = type(base.__name__, (base,), namespace)
    return made


class MissingAttribute(AttributeError):
    """``'MoRAModel' object (wrapping X) has no attribute 'y'``, with a close name if there is
    one; the message is made only when read (``hasattr`` misses stay cheap)."""

    def __init__(self, owner: nn.Module, wrapped: nn.Module, name: str) -> None:
        super().__init__(name)
        self._owner, self._wrapped, self._name = owner, wrapped, name

    def __str__(self) -> str:
        msg = (
            f"{type(self._owner).__name__!r} object (wrapping {type(self._wrapped).__name__}) "
            f"has no attribute {self._name!r}"
        )
        close = close_name(self._name, itertools.chain(dir(self._owner), dir(self._wrapped)))
        return msg if close is None else f"{msg}; did you mean {close!r}?"


def close_name(name: str, names: Iterable[str]) -> str | None:
    """The name of ``names`` closest to ``name`` (private ones only for a private ``name``),
    or ``None`` when none is close."""
    public = {n for n in names if name.startswith("_") or not n.startswith("_")}
    hits = difflib.get_close_matches(name, sorted(public), n=1, cutoff=0.6)
    return hits[0] if hits else None
