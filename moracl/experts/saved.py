"""Keeping a routing's record on an autograd node without a reference cycle.

A gating's record (:meth:`~moracl.experts.gating.Gating.forward`) holds tensors the node
returns (the gates, the probabilities).  A node that kept the record as an attribute of its
``ctx`` would own its own outputs, whose ``grad_fn`` is the node: a cycle through C++ that
Python's collector often cannot break, so a forward whose backward never ran (an evaluation
under grad mode, a loss never backpropagated) could leak its whole graph.  :func:`save_record`
hands the record's tensors to ``ctx.save_for_backward`` instead, which keeps outputs without
owning their node (and checks them for in-place changes), and keeps only the record's shape
and its other values on ``ctx``; :func:`load_record` puts it back together in the backward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["load_record", "save_record"]


class _Slot(NamedTuple):
    """Where the ``at``-th saved tensor goes back into the record."""

    at: int


class _Kept(NamedTuple):
    """What :func:`save_record` keeps on ``ctx``: how many tensors came before the record's,
    and the record with each tensor replaced by its :class:`_Slot`."""

    leading: int
    skeleton: Any


def _strip(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with each tensor (in tuples and named tuples, recursively) appended to
    ``tensors`` and replaced by its :class:`_Slot`."""
    if isinstance(value, Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if type(value) is tuple:
        return tuple(_strip(v, tensors) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_strip(v, tensors) for v in value))
    return value


def _fill(skeleton: Any, tensors: tuple[Tensor, ...]) -> Any:
    """The inverse of :func:`_strip`."""
    if type(skeleton) is _Slot:
        return tensors[skeleton.at]
    if type(skeleton) is tuple:
        return tuple(_fill(v, tensors) for v in skeleton)
    if isinstance(skeleton, tuple) and hasattr(skeleton, "_fields"):
        return type(skeleton)(*(_fill(v, tensors) for v in skeleton))
    return skeleton


def save_record(ctx: Any, tensors: tuple[Tensor | None, ...], record: Any) -> None:
    """``ctx.save_for_backward(*tensors)`` together with every tensor of ``record`` (a
    gating's record: tensors, other values, and tuples or named tuples of them); call once,
    in the node's forward, instead of ``save_for_backward``."""
    found: list[Tensor] = []
    skeleton = _strip(record, found)
    ctx.save_for_backward(*tensors, *found)
    ctx.kept_record = _Kept(len(tensors), skeleton)


def load_record(ctx: Any) -> tuple[tuple[Any, ...], Any]:
    """In the backward: the ``tensors`` (each a tensor or ``None``, as given) and the
    ``record`` given to :func:`save_record`."""
    kept: _Kept = ctx.kept_record
    saved = ctx.saved_tensors
    return saved[: kept.leading], _fill(kept.skeleton, saved[kept.leading :])
