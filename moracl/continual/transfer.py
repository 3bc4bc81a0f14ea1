"""Backward transfer without forgetting: an old task may adopt a newer task's routing when
its own validation split says that the newer experts serve it better.

Under routing by task each task keeps the experts (and learned gate weights) it was trained
with, so its outputs never change: no forgetting, but no backward transfer either. Where tasks
barely interfere, one adapter trained throughout (Naive fine-tuning) can improve old tasks
as it keeps learning; moracl's newest experts, each started as a copy of the one before, are
that adapter's counterpart. After each experience, :func:`adopt_newer_routes` tries, for each
old task ``j``, the routing row of every later task ``c`` (its expert mask and gate logits)
with task ``j``'s own head, on task ``j``'s VALIDATION split only, and keeps the one with the
highest accuracy; ties (and gains of ``min_gain`` or less) keep the current row. The test
split has no part in the choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from moracl.continual.evaluation import evaluate
from moracl.continual.model import ContinualClassifier
from moracl.experts.routers.task import TaskRouter
from moracl.model import MoRAModel

__all__ = ["adopt_newer_routes", "task_routers"]

Split = tuple[Tensor, Tensor, Tensor]


def task_routers(model: ContinualClassifier) -> list[TaskRouter]:
    """The task routers of the model's mixtures (empty unless it routes by task)."""
    encoder = model.encoder
    if not model.route_by_task or not isinstance(encoder, MoRAModel):
        return []
    return [m.router for _, m in encoder.mixtures() if isinstance(m.router, TaskRouter)]


def _row(router: TaskRouter, task: int) -> tuple[Tensor, Tensor | None]:
    logits = router.task_logits
    return (
        router.expert_masks[task].clone(),
        None if logits is None else logits.detach()[task].clone(),
    )


@torch.no_grad()
def _set_row(router: TaskRouter, task: int, row: tuple[Tensor, Tensor | None]) -> None:
    mask, logits = row
    router.expert_masks[task] = mask
    if logits is not None and router.task_logits is not None:
        router.task_logits[task] = logits


@contextmanager
def _restored(routers: Sequence[TaskRouter], task: int) -> Iterator[None]:
    saved = [_row(r, task) for r in routers]
    try:
        yield
    finally:
        for r, row in zip(routers, saved):
            _set_row(r, task, row)


def adopt_newer_routes(
    model: ContinualClassifier,
    experience: int,
    validation: Sequence[Split],
    *,
    batch_size: int = 256,
    min_gain: float = 0.0,
) -> list[int]:
    """After training ``experience``, let each old task ``j < experience`` take the routing
    row of a later task ``c`` (``j < c <= experience``) when that scores higher on task
    ``j``'s validation split, with task ``j``'s head.

    Args:
        model: a classifier routing by task (else nothing happens).
        experience: the experience just trained.
        validation: per experience ``(x, y, t)`` of its validation split (at least
            ``experience + 1`` of them).
        batch_size: evaluation batch size.
        min_gain: the accuracy gain (fraction) a newer row must exceed to be adopted.

    Returns:
        For every task ``0 .. experience``, the task whose routing row it uses now (itself
        when it kept its own).
    """
    routers = task_routers(model)
    chosen = list(range(experience + 1))
    if not routers or experience == 0:
        return chosen
    if len(validation) <= experience:
        raise ValueError(
            f"adopt_newer_routes needs the validation splits of experiences 0..{experience}, "
            f"got {len(validation)}"
        )
    for j in range(experience):
        x, y, t = validation[j]
        if len(y) == 0:
            continue
        best = evaluate(model, [(x, y, t)], batch_size).accuracies[0]
        best_row: list[tuple[Tensor, Tensor | None]] | None = None
        for c in range(j + 1, experience + 1):
            rows = [_row(r, c) for r in routers]
            with _restored(routers, j):
                for r, row in zip(routers, rows):
                    _set_row(r, j, row)
                acc = evaluate(model, [(x, y, t)], batch_size).accuracies[0]
            if acc > best + min_gain:
                best, best_row, chosen[j] = acc, rows, c
        if best_row is not None:
            for r, row in zip(routers, best_row):
                _set_row(r, j, row)
    return chosen
