"""Early stopping of a continual strategy, experience by experience, on validation data.

:class:`EarlyStoppingPlugin` measures, after every training epoch, the loss and accuracy of
the strategy's model on the validation split of the experience being learned (Joint: on
every experience's validation split at once), feeds :class:`~moracl.early_stopping.EarlyStopping`
with the model's trained state (:func:`~moracl.early_stopping.snapshot_state`: the trainable
parameters with Delta-LoRA's frozen-weight updates and AdaLoRA's rank masks), asks the
strategy to stop (Avalanche's ``stop_training()``) once the rule says so, and puts the best
epoch's state back in ``after_training_exp``. Placed first among the strategy's plugins, it
restores them before every other plugin's ``after_training_exp`` runs (EWC's importances,
the replay buffer, the balanced head and router fine-tuning, the task-inference statistics),
so those see the weights that are kept.

The test split has no part in it. A checkpoint is written between experiences, so no
early-stopping state crosses one: a resumed run stops where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from moracl.continual.evaluation import evaluate
from moracl.continual.metrics import StoppingRecord
from moracl.continual.model import ContinualClassifier
from moracl.continual.splits import Split
from moracl.early_stopping import (
    EarlyStopping,
    EarlyStoppingConfig,
    snapshot_state,
    trainable_state,
)

__all__ = ["EarlyStoppingPlugin", "EpochValidation", "trainable_state", "validation_metrics"]

#: called after each epoch with ``(epoch, val_loss, val_acc)``
EpochValidation = Callable[[int, float, float], None]


def validation_metrics(
    model: ContinualClassifier,
    splits: Sequence[Split],
    batch_size: int,
    *,
    experience: int | None = None,
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on the rows of ``splits`` pooled: the mean
    cross-entropy and the share of rows right, over every row of every split.

    ``experience``: a model that infers each row's experience (gaussian task inference) has
    no statistics of the experience it is learning yet; its rows, labelled ``experience``,
    then run through that experience's experts, as they do in training.
    """
    rows = [len(y) for _, y, _ in splits]
    total = sum(rows)
    if total == 0:
        raise ValueError("early stopping needs validation rows; the splits given have none")
    given: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if experience is not None and model.task_inference is not None:
        splits = [(x, y, torch.full_like(t, experience)) for x, y, t in splits]
        given = model.given_tasks()
    with given:
        ev = evaluate(model, splits, batch_size)
    loss = math.fsum(v * n for v, n in zip(ev.losses, rows)) / total
    acc = math.fsum(a * n for a, n in zip(ev.accuracies, rows)) / total
    return loss, acc


class EarlyStoppingPlugin(SupervisedPlugin):
    """Early stopping of each experience's training on its validation split (see the module
    docstring).

    Before each ``strategy.train(...)`` the run calls :meth:`watch` with the validation
    splits to watch and the run's experience index. Reads ``strategy.model`` (a
    :class:`ContinualClassifier`) and ``strategy.clock.train_exp_epochs``; calls
    ``strategy.stop_training()``; writes the model's trainable parameters (the restore).

    Args:
        config: the rule (``train.early_stopping``).
        batch_size: rows per evaluation forward.

    Attributes:
        last: the :class:`StoppingRecord` of the last experience trained (``None`` before).
        epoch_listener: called with each epoch's ``(epoch, val_loss, val_acc)``.
    """

    def __init__(self, config: EarlyStoppingConfig, *, batch_size: int) -> None:
        super().__init__()
        if not isinstance(config, EarlyStoppingConfig):
            raise ValueError(f"config={config!r}; expected an EarlyStoppingConfig")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
        self.config = config
        self.batch_size = batch_size
        self.splits: list[Split] = []
        self.experience = -1
        self.stopper = EarlyStopping(config)
        self.last: StoppingRecord | None = None
        self.epoch_listener: EpochValidation | None = None

    def watch(self, splits: Sequence[Split], experience: int) -> None:
        """Watch ``splits`` while the strategy trains the run's experience ``experience``
        (Joint: every split, at the last experience)."""
        if not splits or sum(len(y) for _, y, _ in splits) == 0:
            raise ValueError(
                f"experience {experience}: early stopping needs validation rows; got none"
            )
        self.splits = list(splits)
        self.experience = experience

    def _model(self, strategy: Any) -> ContinualClassifier:
        model = strategy.model
        if not isinstance(model, ContinualClassifier):
            raise TypeError(f"expected a ContinualClassifier, got {type(model).__name__}")
        return model

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.splits:
            raise ValueError("EarlyStoppingPlugin: call watch(splits, experience) before training")
        self.stopper = EarlyStopping(self.config)
        self.last = None

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        model = self._model(strategy)
        epoch = int(strategy.clock.train_exp_epochs)  # the epoch just ended (0-based)
        current = self.experience if len(self.splits) == 1 else None
        loss, acc = validation_metrics(model, self.splits, self.batch_size, experience=current)
        if self.epoch_listener is not None:
            self.epoch_listener(epoch, loss, acc)
        if self.stopper.update(epoch, val_loss=loss, val_acc=acc, state=snapshot_state(model)):
            strategy.stop_training()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.stopper.restore(strategy.model)
        summary = self.stopper.summary()
        self.last = StoppingRecord(
            experience=self.experience,
            best_epoch=int(summary["best_epoch"]),
            epochs_run=int(summary["epochs_run"]),
            stopped_early=bool(summary["stopped_early"]),
            metric=self.config.metric.value,
            best_value=summary["best_value"],
        )
