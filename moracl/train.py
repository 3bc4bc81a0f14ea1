"""The guarded training step and epoch every training loop of moracl shares.

A loop hands over what differs (how a batch becomes a loss and gradients, the optimiser, the
parameters) and gets the same non-finite guard (:class:`~moracl.guard.StepGuard`) and the
same record of each epoch (:class:`EpochRecord`)::

    guard = StepGuard(on_nonfinite, setting="train.on_nonfinite")
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        batches = [order[i : i + size] for i in range(0, n, size)]
        record = guarded_epoch(
            lambda idx: backward(F.cross_entropy(model(x[idx]), y[idx])),
            batches, optimizer=opt, params=params, guard=guard,
            where=f"my job, epoch {epoch}", epoch=epoch, named=model.named_parameters,
        )

where ``backward(loss)`` calls ``loss.backward()`` and returns ``loss``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.distributed import (
    DataParallel,
    all_reduce_sum,
    check_batches,
    is_main,
    local_rows,
    world_size,
)
from moracl.guard import NamedParams, NonFiniteError, StepGuard, assert_finite
from moracl.optim.sam import SAM

__all__ = [
    "EpochRecord",
    "LossStep",
    "StepSkipped",
    "TrainLog",
    "fit_classifier",
    "guarded_epoch",
    "guarded_step",
]

B = TypeVar("B")

LossStep = Callable[[B], Tensor]
"""``step(batch) -> loss``: computes the step's loss for ``batch`` and leaves its gradients in
the parameters' ``.grad`` (``loss.backward()``, and any gradient sync across processes);
returns the loss the guard checks (under data parallelism: the global one)."""


@dataclass
class EpochRecord:
    """One training epoch of a guarded loop.

    Attributes:
        epoch: the epoch (0-based).
        step: the loop's step count at the end of the epoch (every step the guard checked
            since it was built, skipped ones included).
        loss: mean loss over the steps taken; ``None`` when every step was skipped.
        lr: learning rate of the optimiser's first parameter group.
        steps: steps in the epoch (taken or skipped).
        skipped: steps skipped for a non-finite loss or gradient.
        step_losses: ``(step count, loss)`` of each step taken.
        finished: ``time.perf_counter()`` at the end of the epoch.
    """

    epoch: int
    step: int
    loss: float | None
    lr: float
    steps: int
    skipped: int
    step_losses: list[tuple[int, float]] = field(default_factory=list)
    finished: float = 0.0


class StepSkipped(Exception):
    """Raised inside the optimiser's closure to drop a step (``on_nonfinite=skip``)."""


def guarded_step(
    step: Callable[[], Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    guard: StepGuard,
    where: str | Callable[[], str],
    named: NamedParams | None = None,
) -> float | None:
    """One optimiser step whose loss and gradients are checked before the update.

    The step runs as ``optimizer.step(closure)``: the closure zeroes the gradients, calls
    ``step()`` (forward and backward, returning the loss to check) and checks the loss and the
    gradients of ``params`` with ``guard``. An optimiser that evaluates the closure twice
    (SAM: at ``w`` and at ``w + ε``) has both passes checked; the second pass's message says
    so. A skipped or failed step changes no parameter: the gradients are dropped and a SAM
    optimiser that already moved to ``w + ε`` is moved back (``second_step`` without
    gradients).

    Args:
        step: computes the loss and its gradients (see :data:`LossStep`).
        optimizer: updates ``params``; any ``torch.optim.Optimizer`` (a
            :class:`~moracl.optim.MoRAOptimizer` with SAM included).
        params: the parameters the optimiser updates (their gradients are checked).
        guard: counts the step and decides what a non-finite value does.
        where: the step, for messages (a callable is called only on failure).
        named: ``(name, parameter)`` pairs, to name a non-finite gradient or parameter.

    Returns:
        The loss of the (first) pass, or ``None`` for a skipped step.

    Raises:
        NonFiniteError: a non-finite loss or gradient under ``stop``, or a parameter that is
            no longer finite.
    """
    passes: list[float] = []

    def place() -> str:
        text = where() if callable(where) else where
        if passes:
            text += " (SAM's second pass, at the perturbed weights)"
        return text

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = step()
        value = guard.check(loss, params, place, named=named)
        if value is None:
            raise StepSkipped
        passes.append(value)
        return loss

    try:
        optimizer.step(closure)  # type: ignore[arg-type]  # (torch types it as returning float)
    except (StepSkipped, NonFiniteError) as error:
        optimizer.zero_grad(set_to_none=True)
        sam = optimizer if isinstance(optimizer, SAM) else getattr(optimizer, "sam", None)
        if passes and isinstance(sam, SAM):  # SAM's second pass failed: back to w
            sam.second_step()  # no gradients, so no update
        if isinstance(error, NonFiniteError):
            raise
        return None
    return passes[0]


def guarded_epoch(
    step: Callable[[B], Tensor],
    batches: Iterable[B],
    *,
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    guard: StepGuard,
    where: str,
    epoch: int = 0,
    named: NamedParams | None = None,
    after_step: Callable[[float | None], None] | None = None,
) -> EpochRecord:
    """One epoch: :func:`guarded_step` over each of ``batches``, then its record.

    Args:
        step: ``step(batch) -> loss`` (see :data:`LossStep`).
        batches: the epoch's batches, in order (e.g. ``(b,)`` index tensors).
        optimizer, params, guard, named: as in :func:`guarded_step`.
        where: the epoch, for messages; each step adds ``", step i"``.
        epoch: the epoch's number, recorded.
        after_step: called with each step's loss (``None``: skipped), e.g. a progress bar.

    Returns:
        The epoch's :class:`EpochRecord`. Skipped steps are warned about once
        (:meth:`StepGuard.warn_skipped`).
    """
    skipped_before = guard.skipped
    losses: list[tuple[int, float]] = []
    count = 0
    for i, batch in enumerate(batches):

        def once(batch: B = batch) -> Tensor:
            return step(batch)

        value = guarded_step(
            once,
            optimizer=optimizer,
            params=params,
            guard=guard,
            where=f"{where}, step {i}",
            named=named,
        )
        count += 1
        if value is not None:
            losses.append((guard.steps, value))
        if after_step is not None:
            after_step(value)
    guard.warn_skipped(skipped_before, count, where)
    return EpochRecord(
        epoch=epoch,
        step=guard.steps,
        loss=math.fsum(v for _, v in losses) / len(losses) if losses else None,
        lr=float(optimizer.param_groups[0]["lr"]),
        steps=count,
        skipped=guard.skipped - skipped_before,
        step_losses=losses,
        finished=time.perf_counter(),
    )


@dataclass
class TrainLog:
    """What a guarded training loop did: steps (taken or skipped), skipped steps, and each
    epoch's record; ``began`` is ``time.perf_counter()`` at its start."""

    steps: int = 0
    skipped: int = 0
    epochs: list[EpochRecord] = field(default_factory=list)
    began: float = 0.0


def fit_classifier(
    model: nn.Module,
    logits: Callable[[Tensor], Tensor],
    labels: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    guard: StepGuard,
    epochs: int,
    batch_size: int,
    seed: int,
    where: str,
    data_parallel: bool = False,
    progress: bool = False,
    after_epoch: Callable[[EpochRecord], bool] | None = None,
) -> TrainLog:
    """Train ``model``'s trainable parameters with cross-entropy for ``epochs`` passes over
    ``labels (n,)`` in random batches of ``batch_size`` rows (the order seeded by ``seed``);
    ``logits(idx)`` gives the model's ``(b, c)`` outputs for the rows ``idx (b,)``.

    ``after_epoch(record)`` runs after each epoch (e.g. a validation pass feeding
    :class:`~moracl.early_stopping.EarlyStopping`); ``True`` ends training there, so
    ``epochs`` is then the maximum. The next epoch's batch order does not depend on it.

    Every step is checked before the update (:func:`guarded_epoch`, messages naming
    ``where``, the epoch and the step), and so are the parameters at the end.

    With ``data_parallel``, under ``torchrun`` each global batch is split across the
    processes (contiguous rows) and the gradients are summed weighted by each process's share
    (:class:`~moracl.distributed.DataParallel`), so every process ends with the weights one
    process would reach on the same batches.

    Raises:
        NonFiniteError: a non-finite loss or gradient (``stop``), or non-finite parameters.
        ValueError: a global batch too small to give every process a row.
    """
    rows = len(labels)
    world = world_size() if data_parallel else 1
    if data_parallel:
        check_batches(rows, batch_size, world, where)
    parallel = DataParallel(model) if data_parallel else None
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    per_epoch = -(-rows // batch_size)
    log = TrainLog(began=time.perf_counter())
    bar = tqdm(
        total=epochs * per_epoch,
        desc=where,
        disable=not progress or not is_main(),
        leave=False,
    )

    def step(idx: Tensor) -> Tensor:
        mine = idx[local_rows(len(idx))] if world > 1 else idx  # this process's rows
        loss = F.cross_entropy(logits(mine), labels[mine])
        loss.backward()
        if parallel is None:
            return loss
        share = len(mine) / len(idx)
        parallel.sync_gradients(share)
        # every process decides on the same numbers: the global loss, summed gradients
        return all_reduce_sum(loss.detach() * share) if world > 1 else loss

    def shown(value: float | None) -> None:
        bar.update()
        bar.set_postfix(loss="skipped" if value is None else f"{value:.3f}")

    for epoch in range(epochs):
        order = torch.randperm(rows, generator=gen)
        model.train()
        record = guarded_epoch(
            step,
            [order[i : i + batch_size] for i in range(0, rows, batch_size)],
            optimizer=optimizer,
            params=params,
            guard=guard,
            where=f"{where}, epoch {epoch}",
            epoch=epoch,
            named=model.named_parameters,
            after_step=shown,
        )
        log.epochs.append(record)
        if after_epoch is not None and after_epoch(record):
            break
    bar.close()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert_finite(trained, f"{where}: the parameters after training")
    log.steps, log.skipped = guard.steps, guard.skipped
    return log
