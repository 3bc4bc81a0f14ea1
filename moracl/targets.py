"""Choosing which linear layers of a model get adapters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

from torch import nn

from moracl.layer import is_linear_like

__all__ = ["ALL_LINEAR", "TargetSpec", "select_targets"]

ALL_LINEAR = "all-linear"

TargetSpec = Union[str, Sequence[str], "re.Pattern[str]"]
"""A list of names (a module matches when its path equals a name or ends with ``.name``), a
regular expression string or pattern matched against the whole path, or ``"all-linear"``."""


def _output_layers(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {id(out)} if isinstance(out, nn.Module) else set()


def select_targets(model: nn.Module, spec: TargetSpec, *, exclude: Sequence[str] = ()) -> list[str]:
    """Module paths of ``model`` matched by ``spec`` (in module order).

    ``"all-linear"`` takes every ``nn.Linear``/``Conv1D`` except the output layer (the LM head).
    A spec that matches nothing, or matches a module that is not linear, raises ``ValueError``
    listing some module names.
    """
    linear = {name: m for name, m in model.named_modules() if name and is_linear_like(m)}
    if isinstance(spec, str) and spec == ALL_LINEAR:
        skip = _output_layers(model)
        chosen = [n for n, m in linear.items() if id(m) not in skip and not n.endswith("lm_head")]
    else:
        if isinstance(spec, str):
            spec = re.compile(spec)
        if isinstance(spec, re.Pattern):
            pattern = spec
            chosen = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
        else:
            names = list(spec)
            if not names or not all(isinstance(t, str) and t for t in names):
                raise ValueError(f"target_modules must be non-empty names, got {spec!r}")
            chosen = [
                n
                for n, _ in model.named_modules()
                if n and any(n == t or n.endswith("." + t) for t in names)
            ]
    chosen = [n for n in chosen if not any(n == e or n.endswith("." + e) for e in exclude)]
    if not chosen:
        some = list(linear)[:12] or [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"target_modules={_show(spec)} matched no module; linear modules include {some}"
        )
    bad = [n for n in chosen if n not in linear]
    if bad:
        kinds = {n: type(model.get_submodule(n)).__name__ for n in bad[:5]}
        raise ValueError(
            f"target_modules={_show(spec)} matched modules that are not nn.Linear/Conv1D: {kinds}"
        )
    return chosen


def _show(spec: object) -> str:
    return repr(spec.pattern) if isinstance(spec, re.Pattern) else repr(spec)
