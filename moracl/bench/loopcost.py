"""What moracl's training template costs next to a plain PyTorch loop doing the same work.

The template (:class:`~moracl.continual.strategy.MoRAStrategy`, Avalanche's callback loop
underneath) trains one experience with ``strategy.train(experience)``. The reference,
:func:`plain_train`, is the loop one would write by hand: a fresh optimiser from the same
factory, the same in-memory tensors in the same seeded mini-batch order, the same batch size
and epochs, cross-entropy plus the routers' auxiliary loss, ``backward``, ``step``. Both
stack the experience's data into those tensors inside their timed run (the template does at
every ``train`` call), and both draw dropout's masks from the same seeded global generator.
They start from the same trainable state and end with the same weights (checked, see
:class:`LoopCost.max_weight_diff`), so the time ratio is the template's overhead alone.

The template checks every step's loss and gradients before the update (the non-finite guard,
:class:`~moracl.guard.StepGuard`: one host sync a step), which a plain loop does not. A third
loop, the plain one with that same check (``checked=True``), splits the ratio into what the
guarantee costs and what the template costs besides; on CUDA the sync keeps the host from
queueing the next step's kernels while the GPU works.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.bench.common import sync_device
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import (
    FastTemplate,
    OptimizerFactory,
    TensorBatches,
    derive_seed,
    materialize,
)
from moracl.guard import OnNonFinite, StepGuard
from moracl.model import MoRAModel

__all__ = ["LoopCost", "measure_loop_cost", "plain_train", "trainable_snapshot"]


def plain_train(
    model: ContinualClassifier,
    tensors: tuple[Tensor, Tensor, Tensor],
    *,
    optimizer_factory: OptimizerFactory,
    batch_size: int,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
    checked: bool = False,
) -> int:
    """Train ``model`` on ``tensors = (x (n, ...), y (n,), t (n,))`` with a hand-written loop.

    The mini-batch order is that of :class:`TensorBatches` seeded by ``seed`` (the template
    seeds it by ``derive_seed(loader_seed, experience)``). The loss is the cross-entropy of the
    logits ``(b, c)`` plus, for a :class:`MoRAModel` encoder, its routers' auxiliary loss. Each
    mini-batch moves to ``device`` as the template moves it (the model is there already).
    With ``checked``, each step's loss and gradients pass the template's non-finite check
    before the update (:class:`~moracl.guard.StepGuard`, one host sync).

    Returns:
        The number of optimiser steps taken.
    """
    model.train()
    optimizer = optimizer_factory(model)
    batches = TensorBatches(tensors, batch_size, shuffle=True, seed=seed)
    encoder = model.encoder
    guard = StepGuard(OnNonFinite.STOP) if checked else None
    steps = 0
    for _ in range(epochs):
        for batch in batches:
            x, y, t = (v.to(device, non_blocking=True) for v in batch)
            optimizer.zero_grad()
            logits = model(x, t)  # (b, c)
            loss = F.cross_entropy(logits, y)
            if isinstance(encoder, MoRAModel):
                loss = loss + encoder.aux_loss()
            loss.backward()
            if guard is not None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                guard.check(loss, params, "the plain loop")
            optimizer.step()
            steps += 1
    return steps


def _clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, after the device's queued work has finished on CUDA."""
    if device.type != "cuda":
        return time.perf_counter

    def synced() -> float:
        sync_device(device)
        return time.perf_counter()

    return synced


def trainable_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the parameters that train now, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


@dataclass(frozen=True)
class LoopCost:
    """One experience trained by the template and by the plain loop.

    Attributes:
        name: what was measured (a scenario and its setting, or a model).
        examples: training examples of the experience.
        steps: optimiser steps of one training run (both loops take the same).
        template_seconds: best wall time of ``strategy.train(experience)``.
        plain_seconds: best wall time of :func:`plain_train`.
        max_weight_diff: the largest absolute difference between the trainable weights the
            two loops end with (0.0: the same arithmetic).
        checked_seconds: best wall time of :func:`plain_train` with the template's
            non-finite check (``None`` in records from before it was timed).
    """

    name: str
    examples: int
    steps: int
    template_seconds: float
    plain_seconds: float
    max_weight_diff: float
    checked_seconds: float | None = None

    @property
    def ratio(self) -> float:
        """Template time over plain-loop time."""
        return self.template_seconds / self.plain_seconds

    @property
    def checked_ratio(self) -> float | None:
        """Template time over the checked plain loop's (``None`` when not timed)."""
        if self.checked_seconds is None:
            return None
        return self.template_seconds / self.checked_seconds


def measure_loop_cost(
    name: str,
    strategy: FastTemplate,
    experience: Any,
    *,
    optimizer_factory: OptimizerFactory,
    repeats: int = 3,
    clock: Callable[[], float] | None = None,
) -> LoopCost:
    """Time ``strategy.train(experience)`` against :func:`plain_train` on the same model.

    Every run starts from the trainable state the model has now. One untimed run of each
    warms up (and lets the template adapt the model: grown experts, seen classes); then
    ``repeats`` interleaved rounds time the template, the plain loop and the checked plain
    loop, and the best of each is kept. The weights of the last round are compared.

    Args:
        name: the row's label.
        strategy: a template over a :class:`ContinualClassifier` (its ``train_mb_size``,
            ``train_epochs`` and ``loader_seed`` define the work).
        experience: an Avalanche training experience.
        optimizer_factory: the factory the strategy was built with.
        repeats: timed rounds.
        clock: the timer (seconds); by default ``time.perf_counter``, on CUDA after
            ``torch.cuda.synchronize`` (each loop's queued kernels count in its time).
    """
    model = strategy.model
    if not isinstance(model, ContinualClassifier):
        raise TypeError(f"expected a ContinualClassifier, got {type(model).__name__}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    dataset = experience.dataset.train()  # as the template's training adapts it
    tensors = materialize(dataset)
    seed = derive_seed(strategy.loader_seed, experience.current_experience)
    device = torch.device(strategy.device)
    clock = clock or _clock(device)
    kwargs = dict(
        optimizer_factory=optimizer_factory,
        batch_size=strategy.train_mb_size,
        epochs=strategy.train_epochs,
        seed=seed,
        device=device,
    )
    strategy.train(experience)  # warm-up; adapts the model to the experience
    start = trainable_snapshot(model)  # the state after adaptation: same names for both
    _restore(model, start)
    steps = plain_train(model, tensors, **kwargs)  # type: ignore[arg-type]
    template_times: list[float] = []
    plain_times: list[float] = []
    checked_times: list[float] = []
    ends: dict[str, dict[str, Tensor]] = {}
    for _ in range(repeats):
        _restore(model, start)
        torch.manual_seed(seed)  # the same dropout draws in both loops
        began = clock()
        strategy.train(experience)
        template_times.append(clock() - began)
        ends["template"] = trainable_snapshot(model)
        _restore(model, start)
        torch.manual_seed(seed)
        began = clock()
        tensors = materialize(dataset)  # the template stacks the experience's data too
        plain_train(model, tensors, **kwargs)  # type: ignore[arg-type]
        plain_times.append(clock() - began)
        ends["plain"] = trainable_snapshot(model)
        _restore(model, start)
        torch.manual_seed(seed)
        began = clock()
        tensors = materialize(dataset)
        plain_train(model, tensors, checked=True, **kwargs)  # type: ignore[arg-type]
        checked_times.append(clock() - began)
        ends["checked"] = trainable_snapshot(model)
    _restore(model, start)
    diff = max(
        float((ends["template"][k] - ends[loop][k]).abs().max())
        for loop in ("plain", "checked")
        for k in ends[loop]
    )
    return LoopCost(
        name=name,
        examples=len(tensors[0]),
        steps=steps,
        template_seconds=min(template_times),
        plain_seconds=min(plain_times),
        max_weight_diff=diff,
        checked_seconds=min(checked_times),
    )
