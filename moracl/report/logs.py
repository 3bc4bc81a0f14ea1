"""Run logs: CSV files and TensorBoard scalars, appendable across a resumed run.

Layout under ``RUN_DIR``:

- ``logs/train.csv``: ``strategy, experience, epoch, step, loss, lr, seconds``;
- ``logs/eval.csv``: ``strategy, after_experience, eval_experience, accuracy, loss``;
- ``tensorboard/<strategy>/``: event files with ``train/loss``, ``train/lr`` (x: ``step``) and
  ``eval/accuracy/exp_<j>``, ``eval/loss/exp_<j>`` (x: ``after_experience``).

A new :class:`RunLogger` on an existing run appends: the CSV header is written only to a new
(or empty) file, and TensorBoard adds a new event file next to the old ones.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["EVAL_FIELDS", "TRAIN_FIELDS", "RunLogger"]

TRAIN_FIELDS = ("strategy", "experience", "epoch", "step", "loss", "lr", "seconds")
EVAL_FIELDS = ("strategy", "after_experience", "eval_experience", "accuracy", "loss")


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


def _number(x: float | None) -> str:
    """Exact text for a float (``repr``); empty for ``None``."""
    return "" if x is None else repr(float(x))


class RunLogger:
    """CSV and TensorBoard logs of a continual run (see the module docstring for the layout).

    Rows are flushed as they are written, so a crash loses nothing already logged. Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        self._train_fh, self._train = _open_csv(self.run_dir / "logs" / "train.csv", TRAIN_FIELDS)
        try:
            self._eval_fh, self._eval = _open_csv(self.run_dir / "logs" / "eval.csv", EVAL_FIELDS)
        except BaseException:
            self._train_fh.close()
            raise
        self._writers: dict[str, Any] = {}
        self._closed = False

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
        loss: float,
        lr: float,
        seconds: float,
    ) -> None:
        """One training row: ``step`` is the strategy's global optimiser step and ``seconds``
        the wall-clock time since the strategy started training."""
        self._check_open()
        self._train.writerow(
            [strategy, int(experience), int(epoch), int(step), _number(loss), _number(lr),
             _number(seconds)]
        )  # fmt: skip
        self._train_fh.flush()
        if self.tensorboard:
            w = self._writer(strategy)
            w.add_scalar("train/loss", float(loss), int(step))
            w.add_scalar("train/lr", float(lr), int(step))

    def log_eval(
        self,
        strategy: str,
        *,
        after_experience: int,
        eval_experience: int,
        accuracy: float,
        loss: float | None = None,
    ) -> None:
        """One evaluation: accuracy (in [0, 1]) on ``eval_experience`` after training through
        ``after_experience``, i.e. ``R[after_experience][eval_experience]``."""
        self._check_open()
        accuracy = float(accuracy)
        loss = None if loss is None else float(loss)
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy={accuracy!r}; expected a value in [0, 1]")
        self._eval.writerow(
            [strategy, int(after_experience), int(eval_experience), _number(accuracy),
             _number(loss)]
        )  # fmt: skip
        self._eval_fh.flush()
        if self.tensorboard:
            w = self._writer(strategy)
            step = int(after_experience)
            w.add_scalar(f"eval/accuracy/exp_{eval_experience}", float(accuracy), step)
            if loss is not None and not math.isnan(loss):
                w.add_scalar(f"eval/loss/exp_{eval_experience}", float(loss), step)

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
        self._train_fh.close()
        self._eval_fh.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
