"""Run logs: CSV files and TensorBoard scalars, appendable across a resumed run.

Layout under ``RUN_DIR``:

- ``logs/train.csv``: ``strategy, experience, epoch, step, loss, lr, seconds``;
- ``logs/eval.csv``: ``strategy, after_experience, eval_experience, accuracy, loss`` on the
  test experiences (header only when the run does not evaluate the test split);
- ``logs/validation.csv``: the same on the validation splits;
- ``logs/validation_epochs.csv``: ``strategy, experience, epoch, loss, accuracy``, the
  validation metrics early stopping measures after each epoch;
- ``logs/early_stopping.csv``: ``strategy, experience, best_epoch, epochs_run,
  stopped_early, metric, best_value``, one row per experience trained with early stopping;
- ``tensorboard/<strategy>/``: event files with ``train/loss``, ``train/lr`` (x: ``step``),
  ``train/step_loss`` (each step's loss, x: its step), ``eval/accuracy/exp_<j>``,
  ``eval/loss/exp_<j>``, ``validation/accuracy/exp_<j>``, ``validation/loss/exp_<j>`` (x:
  ``after_experience``) and ``early_stopping/loss/exp_<i>``,
  ``early_stopping/accuracy/exp_<i>`` (x: epoch).

A new :class:`RunLogger` on an existing run appends: the CSV header is written only to a new
(or empty) file, and TensorBoard adds a new event file next to the old ones. A resumed run
passes ``resume_after`` (the experience of its checkpoint): rows logged after it, by an
experience that was interrupted before its checkpoint, are dropped first (the CSV files are
rewritten atomically), so the resumed run's rows equal an uninterrupted run's. TensorBoard
keeps the interrupted experience's events beside the new ones.

Every number written is finite: a NaN or an infinity raises
:class:`~moracl.guard.NonFiniteError` (naming the column) instead of reaching a file.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from moracl.continual.metrics import StoppingRecord
from moracl.files import write_atomic
from moracl.guard import NonFiniteError

__all__ = [
    "EVAL_FIELDS",
    "STOPPING_FIELDS",
    "TRAIN_FIELDS",
    "VALIDATION_EPOCH_FIELDS",
    "RunLogger",
]

TRAIN_FIELDS = ("strategy", "experience", "epoch", "step", "loss", "lr", "seconds")
EVAL_FIELDS = ("strategy", "after_experience", "eval_experience", "accuracy", "loss")
VALIDATION_EPOCH_FIELDS = ("strategy", "experience", "epoch", "loss", "accuracy")
STOPPING_FIELDS = (
    "strategy",
    "experience",
    "best_epoch",
    "epochs_run",
    "stopped_early",
    "metric",
    "best_value",
)

#: each log file, its columns and the column a resumed run drops later rows by
_LOGS = {
    "train": ("train.csv", TRAIN_FIELDS, "experience"),
    "eval": ("eval.csv", EVAL_FIELDS, "after_experience"),
    "validation": ("validation.csv", EVAL_FIELDS, "after_experience"),
    "validation_epochs": ("validation_epochs.csv", VALIDATION_EPOCH_FIELDS, "experience"),
    "early_stopping": ("early_stopping.csv", STOPPING_FIELDS, "experience"),
}


def _open_csv(path: Path, fields: tuple[str, ...]) -> tuple[IO[str], Any]:
    """Open ``path`` for appending; write the header to a new file, check it on an old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if tuple(header) != fields:
            raise ValueError(
                f"{path} has the header {header}; expected {list(fields)} "
                "(refusing to append to a different log)"
            )
        fh = path.open("a", newline="", encoding="utf-8")
        return fh, csv.writer(fh)
    fh = path.open("a", newline="", encoding="utf-8")
    writer = csv.writer(fh)
    writer.writerow(fields)
    fh.flush()
    return fh, writer


def _drop_rows_after(path: Path, fields: tuple[str, ...], column: str, last: int) -> None:
    """Rewrite the CSV log ``path`` (atomically) without the rows whose ``column`` is above
    ``last``; a torn final line (no newline: a write interrupted by a crash) goes too. A
    missing or empty file, or one with nothing to drop, is left as it is.

    Raises:
        ValueError: the header is not ``fields``, or a row is malformed.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    text = path.read_text(encoding="utf-8")
    torn = not text.endswith("\n")
    lines = text.splitlines(keepends=True)
    if torn:
        lines = lines[:-1]
    rows = list(csv.reader(lines))
    if not rows or tuple(rows[0]) != fields:
        header = rows[0] if rows else []
        raise ValueError(
            f"{path} has the header {header}; expected {list(fields)} "
            "(refusing to rewrite a different log)"
        )
    col = fields.index(column)
    kept = [rows[0]]
    for number, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(fields):
                raise ValueError
            value = int(row[col])
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: {row!r} is not a row of {list(fields)} with an "
                f"integer {column!r}"
            ) from None
        if value <= last:
            kept.append(row)
    if len(kept) == len(rows) and not torn:
        return
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(kept)
    write_atomic(path, buffer.getvalue())


def _number(x: float | None, column: str = "value") -> str:
    """Exact text for a float (``repr``); empty for ``None``.

    Raises:
        NonFiniteError: ``x`` is NaN or infinite (``column`` names it).
    """
    if x is None:
        return ""
    value = float(x)
    if not math.isfinite(value):
        raise NonFiniteError(f"{column}={value}; refusing to log a non-finite number")
    return repr(value)


class RunLogger:
    """CSV and TensorBoard logs of a continual run (see the module docstring for the layout).

    Rows are flushed as they are written, so a crash loses nothing already logged. Use as a
    context manager, or call :meth:`close`.

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard events.
        resume_after: drop the rows of experiences after this one first (training rows by
            ``experience``, evaluation rows by ``after_experience``): a resumed run passes its
            checkpoint's experience, a new run ``-1`` (no rows of an aborted attempt are
            kept); ``None`` keeps every row.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_after: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        logs = self.run_dir / "logs"
        if resume_after is not None:
            for name, fields, column in _LOGS.values():
                _drop_rows_after(logs / name, fields, column, resume_after)
        self._files: dict[str, tuple[IO[str], Any]] = {}
        try:
            for key, (name, fields, _) in _LOGS.items():
                self._files[key] = _open_csv(logs / name, fields)
        except BaseException:
            for fh, _ in self._files.values():
                fh.close()
            raise
        self._writers: dict[str, Any] = {}
        self._closed = False

    def _write(self, key: str, row: list[Any]) -> None:
        fh, writer = self._files[key]
        writer.writerow(row)
        fh.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the logger of {self.run_dir} is closed")

    def _writer(self, strategy: str) -> Any:
        """The TensorBoard ``SummaryWriter`` of ``strategy`` (created on first use)."""
        if strategy not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", strategy).strip(".") or "strategy"
            self._writers[strategy] = SummaryWriter(str(self.run_dir / "tensorboard" / folder))
        return self._writers[strategy]

    def log_train(
        self,
        strategy: str,
        *,
        experience: int,
        epoch: int,
        step: int,
        loss: float | None,
        lr: float,
        seconds: float,
    ) -> None:
        """One training row (an epoch's): ``step`` is the strategy's global step count,
        ``loss`` the epoch's mean loss (``None``: no step was taken, an empty cell) and
        ``seconds`` the strategy's training time so far (wall clock, evaluation excluded).

        Raises:
            NonFiniteError: a number is NaN or infinite (nothing is written).
        """
        self._check_open()
        row = [strategy, int(experience), int(epoch), int(step), _number(loss, "loss"),
               _number(lr, "lr"), _number(seconds, "seconds")]  # fmt: skip
        self._write("train", row)
        if self.tensorboard:
            w = self._writer(strategy)
            if loss is not None:
                w.add_scalar("train/loss", float(loss), int(step))
            w.add_scalar("train/lr", float(lr), int(step))

    def log_train_steps(self, strategy: str, steps: Iterable[tuple[int, float]]) -> None:
        """Each step's loss ``(global step, loss)`` as TensorBoard's ``train/step_loss`` (no
        CSV rows; nothing without TensorBoard).

        Raises:
            NonFiniteError: a loss is NaN or infinite.
        """
        self._check_open()
        if not self.tensorboard:
            return
        w = self._writer(strategy)
        for step, loss in steps:
            w.add_scalar("train/step_loss", float(_number(loss, "loss")), int(step))

    def log_eval(
        self,
        strategy: str,
        *,
        after_experience: int,
        eval_experience: int,
        accuracy: float,
        loss: float | None = None,
    ) -> None:
        """One evaluation on a test experience: accuracy (in [0, 1]) on ``eval_experience``
        after training through ``after_experience``, i.e.
        ``R[after_experience][eval_experience]``, and the mean cross-entropy there
        (``None``: not measured, an empty cell).

        Raises:
            NonFiniteError: the loss is NaN or infinite (nothing is written).
        """
        self._evaluation("eval", strategy, after_experience, eval_experience, accuracy, loss)

    def log_validation(
        self,
        strategy: str,
        *,
        after_experience: int,
        eval_experience: int,
        accuracy: float,
        loss: float | None = None,
    ) -> None:
        """One evaluation on a validation split (as :meth:`log_eval`, in
        ``logs/validation.csv``): ``R_val[after_experience][eval_experience]``.

        Raises:
            NonFiniteError: the loss is NaN or infinite (nothing is written).
        """
        self._evaluation("validation", strategy, after_experience, eval_experience, accuracy, loss)

    def _evaluation(
        self,
        key: str,
        strategy: str,
        after_experience: int,
        eval_experience: int,
        accuracy: float,
        loss: float | None,
    ) -> None:
        self._check_open()
        accuracy = float(accuracy)
        loss = None if loss is None else float(loss)
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy={accuracy!r}; expected a value in [0, 1]")
        row = [strategy, int(after_experience), int(eval_experience), _number(accuracy),
               _number(loss, "loss")]  # fmt: skip
        self._write(key, row)
        if self.tensorboard:
            w = self._writer(strategy)
            step = int(after_experience)
            w.add_scalar(f"{key}/accuracy/exp_{eval_experience}", float(accuracy), step)
            if loss is not None:
                w.add_scalar(f"{key}/loss/exp_{eval_experience}", float(loss), step)

    def log_validation_epoch(
        self, strategy: str, *, experience: int, epoch: int, loss: float, accuracy: float
    ) -> None:
        """The validation loss and accuracy early stopping measured after ``epoch`` of
        ``experience`` (Joint: the last experience; its validation data are every split).

        Raises:
            NonFiniteError: a number is NaN or infinite (nothing is written).
        """
        self._check_open()
        accuracy = float(accuracy)
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy={accuracy!r}; expected a value in [0, 1]")
        row = [strategy, int(experience), int(epoch), _number(loss, "loss"), _number(accuracy)]
        self._write("validation_epochs", row)
        if self.tensorboard:
            w = self._writer(strategy)
            w.add_scalar(f"early_stopping/loss/exp_{experience}", float(loss), int(epoch))
            w.add_scalar(f"early_stopping/accuracy/exp_{experience}", accuracy, int(epoch))

    def log_early_stopping(self, strategy: str, record: StoppingRecord) -> None:
        """What early stopping did on one experience (its best epoch, kept)."""
        self._check_open()
        row = [strategy, record.experience, record.best_epoch, record.epochs_run,
               str(record.stopped_early).lower(), record.metric,
               _number(record.best_value, "best_value")]  # fmt: skip
        self._write("early_stopping", row)

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (CSV rows are flushed as written)."""
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        """Close the files and TensorBoard writers; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        for fh, _ in self._files.values():
            fh.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
