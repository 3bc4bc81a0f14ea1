"""The state of a sweep, ``SWEEP_DIR/sweep.json``: what it searches (the job, the base config,
the grid, the search and the ranking) and every trial's overrides, status, score, time and
error; rewritten atomically after each trial, so an interrupted sweep resumes from it.

Format (``"format": "moracl.sweep"``, ``"version": 1``)::

    {"job": "run", "config_file": "...", "base_config": {...}, "sets": ["..."],
     "grid": {"adapter.rank": [4, 8]}, "search": {"trials": null, "seed": 0},
     "selection": {"metric": "acc", "label": "...", "higher_is_better": true, ...},
     "command": "moracl sweep ...", "sweep_dir": "...",
     "trials": [{"number": 0, "overrides": {"adapter.rank": 4}, "status": "done",
                 "score": 0.81, "seconds": 12.5, "error": null}, ...],
     "final": null | {"trial": 1, "status": "done", "trial_score": 0.83,
                      "validation_score": 0.83, "matches": true, "table": {...},
                      "seconds": 40.1, "error": null}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from moracl.files import read_regular, write_atomic
from moracl.guard import finite_json
from moracl.jobs.sweep_space import flatten, format_value

__all__ = [
    "FORMAT",
    "STATE_FILE",
    "VERSION",
    "FinalRecord",
    "SweepState",
    "TrialRecord",
    "TrialStatus",
]

STATE_FILE = "sweep.json"
FORMAT = "moracl.sweep"
VERSION = 1
#: the parts of a sweep that must match for a folder to be resumed
IDENTITY = ("job", "base_config", "grid", "search", "selection")


class TrialStatus(str, Enum):
    """Where a trial (or the final run) stands."""

    PENDING = "pending"
    RUNNING = "running"  # started, not finished: interrupted when the sweep is not running
    DONE = "done"
    FAILED = "failed"


@dataclass
class TrialRecord:
    """One trial: its overrides of the base config and what came of them.

    Attributes:
        number: the trial's number (its folder is ``trials/<number:03d>``), in search order.
        overrides: dotted key -> value, the grid's values for this trial.
        status: pending, running, done or failed.
        score: the selection's metric on validation (done trials).
        seconds: wall time of the trial's last attempt.
        error: the exception that failed it, on one line (failed trials).
    """

    number: int
    overrides: dict[str, Any]
    status: TrialStatus = TrialStatus.PENDING
    score: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def folder(self) -> str:
        """The trial's folder, relative to the sweep's."""
        return f"trials/{self.number:03d}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "folder": self.folder,
            "overrides": dict(self.overrides),
            "status": self.status.value,
            "score": self.score,
            "seconds": self.seconds,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TrialRecord:
        if not isinstance(data, dict):
            raise ValueError(f"a trial must be an object, got {data!r}")
        return cls(
            number=int(data["number"]),
            overrides=dict(data["overrides"]),
            status=TrialStatus(data["status"]),
            score=data.get("score"),
            seconds=data.get("seconds"),
            error=data.get("error"),
        )


@dataclass
class FinalRecord:
    """The chosen config's final run (whole stream, test split read once).

    Attributes:
        trial: the chosen trial's number.
        status: running, done or failed.
        trial_score: the chosen trial's score.
        validation_score: the same metric measured by the final run.
        matches: whether the two are equal (``None``: the final run has not finished).
        table: the final run's test numbers (:class:`~moracl.jobs.sweep_kinds.ResultTable`
            as a dict).
        seconds: wall time of the final run.
        error: the exception that failed it, on one line.
    """

    trial: int
    status: TrialStatus = TrialStatus.RUNNING
    trial_score: float | None = None
    validation_score: float | None = None
    matches: bool | None = None
    table: dict[str, Any] | None = None
    seconds: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "folder": "final",
            "status": self.status.value,
            "trial_score": self.trial_score,
            "validation_score": self.validation_score,
            "matches": self.matches,
            "table": self.table,
            "seconds": self.seconds,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> FinalRecord:
        if not isinstance(data, dict):
            raise ValueError(f"'final' must be an object, got {data!r}")
        return cls(
            trial=int(data["trial"]),
            status=TrialStatus(data["status"]),
            trial_score=data.get("trial_score"),
            validation_score=data.get("validation_score"),
            matches=data.get("matches"),
            table=data.get("table"),
            seconds=data.get("seconds"),
            error=data.get("error"),
        )


@dataclass
class SweepState:
    """Everything ``sweep.json`` holds (see the module docstring)."""

    job: str
    config_file: str
    base_config: dict[str, Any]
    sets: list[str]
    grid: dict[str, list[Any]]
    search: dict[str, Any]
    selection: dict[str, Any]
    command: str
    sweep_dir: str = ""
    trials: list[TrialRecord] = field(default_factory=list)
    final: FinalRecord | None = None

    def identity(self) -> dict[str, Any]:
        """What must match for a folder holding this sweep to be resumed (the base config
        without its ``output_dir``, which the sweep replaces)."""
        base = {k: v for k, v in self.base_config.items() if k != "output_dir"}
        return {
            "job": self.job,
            "base_config": base,
            "grid": self.grid,
            "search": self.search,
            "selection": self.selection,
        }

    def differences(self, saved: SweepState) -> list[str]:
        """How this sweep differs from ``saved`` (an empty list: the same sweep), each
        difference named with both values."""
        out: list[str] = []
        mine, theirs = self.identity(), saved.identity()
        for part in IDENTITY:
            if part == "base_config":
                a, b = flatten(mine[part]), flatten(theirs[part])
                for key in sorted(set(a) | set(b)):
                    if key not in b:
                        out.append(f"config key {key}: {format_value(a[key])} here, absent there")
                    elif key not in a:
                        out.append(f"config key {key}: absent here, {format_value(b[key])} there")
                    elif _canon(a[key]) != _canon(b[key]):
                        out.append(
                            f"config key {key}: {format_value(a[key])} here, "
                            f"{format_value(b[key])} there"
                        )
            elif part == "grid":
                a, b = mine[part], theirs[part]
                if list(a) != list(b):
                    out.append(f"grid keys: {list(a)} here, {list(b)} there")
                else:
                    for key in a:
                        if _canon(a[key]) != _canon(b[key]):
                            out.append(
                                f"grid {key}: {format_value(a[key])} here, "
                                f"{format_value(b[key])} there"
                            )
            elif _canon(mine[part]) != _canon(theirs[part]):
                out.append(f"{part}: {_canon(mine[part])} here, {_canon(theirs[part])} there")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "job": self.job,
            "config_file": self.config_file,
            "base_config": self.base_config,
            "sets": list(self.sets),
            "grid": self.grid,
            "search": self.search,
            "selection": self.selection,
            "command": self.command,
            "sweep_dir": self.sweep_dir,
            "trials": [t.to_dict() for t in self.trials],
            "final": self.final.to_dict() if self.final is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SweepState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"format {found!r}; expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"{FORMAT} version {data.get('version')!r}; expected {VERSION}")
        try:
            return cls(
                job=str(data["job"]),
                config_file=str(data["config_file"]),
                base_config=dict(data["base_config"]),
                sets=list(data["sets"]),
                grid={str(k): list(v) for k, v in data["grid"].items()},
                search=dict(data["search"]),
                selection=dict(data["selection"]),
                command=str(data.get("command", "")),
                sweep_dir=str(data.get("sweep_dir", "")),
                trials=[TrialRecord.from_dict(t) for t in data["trials"]],
                final=FinalRecord.from_dict(data["final"]) if data.get("final") else None,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a sweep state: {type(e).__name__} {e}") from None

    def save(self, sweep_dir: str | os.PathLike[str]) -> Path:
        """Write ``sweep_dir/sweep.json`` atomically; returns its path."""
        path = Path(sweep_dir) / STATE_FILE
        write_atomic(path, finite_json(self.to_dict(), f"moracl sweep: {path}", indent=2) + "\n")
        return path

    @classmethod
    def load(cls, sweep_dir: str | os.PathLike[str]) -> SweepState:
        """Read ``sweep_dir/sweep.json``.

        Raises:
            FileNotFoundError: there is none.
            ValueError: it is not a sweep state this version reads (naming the file).
        """
        path = Path(sweep_dir) / STATE_FILE
        try:
            data = json.loads(read_regular(path).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a JSON file: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
