"""What ``moracl run`` shows and logs while it trains: one progress line per strategy and
experience (:func:`progress_text`), each epoch's loss in the progress bar and the logs, the
validation measured by early stopping, and a logger that writes nothing (processes other than
rank 0)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from moracl.continual.evaluation import Evaluation
from moracl.continual.metrics import StoppingRecord
from moracl.continual.run_state import RunState
from moracl.continual.strategy import EpochRecord

__all__ = ["EpochLog", "NoLogger", "ValidationLog", "progress_line", "progress_text"]


def progress_text(
    experience: int,
    experiences: int,
    label: str,
    losses: Sequence[float | None],
    seen: dict[str, float],
    seconds: float,
    stopped: StoppingRecord | None = None,
) -> str:
    """One progress line of a strategy's experience, e.g. ``[moracl] exp 2/5 EWC: loss
    0.912 0.533 0.412 (3 epochs), seen acc val 81.0% test 78.5%, 12.3 s``.

    Args:
        experience: the experience trained (0-based; the line counts from 1).
        experiences: the experiences of the stream.
        label: the strategy's display name.
        losses: the mean training loss of each epoch (``None``: every step skipped).
        seen: split name -> mean accuracy over the experiences seen so far, in ``[0, 1]``.
        seconds: the strategy's time on this experience (training and evaluation).
        stopped: early stopping's record, when it watched this experience.
    """
    text = " ".join("skipped" if x is None else f"{x:.3f}" for x in losses) or "none"
    epochs = f"{len(losses)} epoch" + ("" if len(losses) == 1 else "s")
    if stopped is not None:
        epochs += f", kept epoch {stopped.best_epoch + 1}"
    line = f"[moracl] exp {experience + 1}/{experiences} {label}: loss {text} ({epochs})"
    if seen:
        line += ", seen acc " + " ".join(f"{k} {100 * v:.1f}%" for k, v in seen.items())
    return f"{line}, {seconds:.1f} s"


def progress_line(
    bar: Any,
    state: RunState,
    i: int,
    label: str,
    losses: Sequence[float | None],
    stopped: StoppingRecord | None,
    ev_val: Evaluation | None,
    ev: Evaluation | None,
    began: float,
) -> None:
    """Write :func:`progress_text` above the progress bar (stderr) unless it is off."""
    if getattr(bar, "disable", True):  # --quiet, or not the main process
        return
    seen = {
        name: sum(e.accuracies[: i + 1]) / (i + 1)
        for name, e in (("val", ev_val), ("test", ev))
        if e is not None
    }
    line = progress_text(
        i, state.num_experiences, label, losses, seen, time.perf_counter() - began, stopped
    )
    bar.write(line, file=sys.stderr)


class NoLogger:
    """The run logger of the processes other than rank 0: writes nothing."""

    def log_train(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_train_steps(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_eval(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_validation(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_validation_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_early_stopping(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class ValidationLog:
    """Logs the validation loss and accuracy early stopping measures after each epoch
    (``logs/validation_epochs.csv``, TensorBoard)."""

    def __init__(self, logger: Any, label: str, experience: int) -> None:
        self.logger, self.label, self.experience = logger, label, experience

    def __call__(self, epoch: int, loss: float, accuracy: float) -> None:
        self.logger.log_validation_epoch(
            self.label, experience=self.experience, epoch=epoch, loss=loss, accuracy=accuracy
        )


class EpochLog:
    """Logs each epoch a strategy ends (``logs/train.csv``, TensorBoard) and shows its loss
    in the progress bar.

    Args:
        logger: the run's logger.
        bar: the run's progress bar.
        label: the strategy's display name.
        experience: the run's experience being trained (Joint trains at the last one).
        origin: ``time.perf_counter()`` at which the strategy's training time would have
            started had it trained without a break (its train seconds so far subtracted).
    """

    def __init__(self, logger: Any, bar: Any, label: str, experience: int, origin: float):
        self.logger, self.bar, self.label = logger, bar, label
        self.experience, self.origin = experience, origin
        self.losses: list[float | None] = []  # each epoch's mean loss, for the progress line

    def __call__(self, record: EpochRecord) -> None:
        self.logger.log_train(
            self.label,
            experience=self.experience,
            epoch=record.epoch,
            step=record.step,
            loss=record.loss,
            lr=record.lr,
            seconds=max(record.finished - self.origin, 0.0),
        )
        self.logger.log_train_steps(self.label, record.step_losses)
        self.losses.append(record.loss)
        loss = "all steps skipped" if record.loss is None else f"loss {record.loss:.4f}"
        skipped = f", {record.skipped} skipped" if record.skipped else ""
        self.bar.set_postfix_str(
            f"{self.label} on experience {self.experience}, epoch {record.epoch}: {loss}{skipped}"
        )
