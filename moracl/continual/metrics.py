"""Continual-learning metrics on an accuracy matrix, and the results file of a run.

Definitions (the one set used everywhere, see DESIGN.md "Metric definitions"): ``R[i][j]`` is
the accuracy on experience ``j`` after training through experience ``i`` (0-based, ``T``
experiences) and ``b[j]`` the accuracy of the initial model on experience ``j``.

- ACC = mean_j R[T-1][j]
- average incremental accuracy = mean_i mean_{j<=i} R[i][j]
- BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])
- FWT = mean_{j>0} (R[j-1][j] - b[j])
- forgetting (max-based) = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])
- forgetting (first - last, Avalanche's ``StreamForgetting``) = mean_{j<T-1} (R[j][j] - R[T-1][j])

A run measures two such matrices per strategy: on the test experiences (``StrategyResult.matrix``)
and on the validation splits held out of the training experiences
(``StrategyResult.validation``). Model selection reads the validation matrix only; a run made
for selection may leave the test split alone (``RunResults.test_evaluated`` false, every
``matrix`` ``None``).

Missing measurements are NaN. A matrix row is either fully measured or entirely NaN (a run in
progress has NaN rows after the current experience; a joint-training baseline has only its
last row). Every metric is computed over the full ``T`` and is NaN when an entry its formula
needs is NaN, or when its mean is empty (BWT, FWT and both forgettings need ``T >= 2``). For
the metrics of a run in progress "as if the stream ended at experience k", take
``matrix.upto(k)`` (``k = matrix.last_completed``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moracl.files import write_atomic

__all__ = [
    "METRICS_FILE",
    "AccuracyMatrix",
    "Cost",
    "RoutingDiagnostics",
    "RunResults",
    "StoppingRecord",
    "StrategyResult",
]

METRICS_FILE = "metrics.json"
FORMAT = "moracl.continual.run"
#: version 3 added the validation matrix, early stopping and ``test_evaluated``; version 2
#: files still load (no validation, test evaluated)
VERSION = 3
READABLE_VERSIONS = (2, 3)


def _nan_mean(values: np.ndarray) -> float:
    """Mean that is NaN (without a warning) for an empty array and propagates NaN."""
    return float("nan") if values.size == 0 else float(np.mean(values))


def _check_unit_interval(name: str, values: np.ndarray) -> None:
    bad = ~np.isnan(values) & ((values < 0.0) | (values > 1.0))
    if np.isinf(values).any() or bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad | np.isinf(values))[0])
        where = "".join(f"[{i}]" for i in idx)
        raise ValueError(f"{name}{where} = {float(values[idx])!r}; expected an accuracy in [0, 1]")


class AccuracyMatrix:
    """The accuracy matrix ``R (T, T)`` and initial accuracies ``b (T,)`` of one strategy.

    Both are float64 and read-only; NaN marks "not measured". Each row of ``R`` is fully
    measured or entirely NaN, and so is ``b``. Entries ``R[i][j]`` with ``j > i`` are real
    measurements (FWT needs ``R[j-1][j]``). Build it whole, or start from
    :meth:`empty` and fill it with :meth:`set_initial` / :meth:`set_row` as a run goes.
    """

    def __init__(self, R: Any, b: Any) -> None:
        r = np.array(R, dtype=np.float64)
        v = np.array(b, dtype=np.float64)
        if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
            raise ValueError(f"R has shape {r.shape}; expected a non-empty square (T, T) matrix")
        t = r.shape[0]
        if v.shape != (t,):
            raise ValueError(f"b has shape {v.shape}; expected ({t},) to match R {r.shape}")
        _check_unit_interval("R", r)
        _check_unit_interval("b", v)
        for i, row in enumerate(r):
            missing = np.isnan(row)
            if missing.any() and not missing.all():
                raise ValueError(
                    f"row R[{i}] = {row.tolist()} is partly measured; expected every entry "
                    "of a row measured, or the whole row NaN (not measured yet)"
                )
        if np.isnan(v).any() and not np.isnan(v).all():
            raise ValueError(f"b = {v.tolist()} is partly measured; expected all or none")
        r.flags.writeable = False
        v.flags.writeable = False
        self._R = r
        self._b = v

    @classmethod
    def empty(cls, num_experiences: int) -> AccuracyMatrix:
        """A ``(T, T)`` matrix with nothing measured yet."""
        if num_experiences <= 0:
            raise ValueError(f"num_experiences={num_experiences}; expected a positive count")
        nan = np.full((num_experiences, num_experiences), np.nan)
        return cls(nan, np.full(num_experiences, np.nan))

    # -- data -------------------------------------------------------------------------------

    @property
    def R(self) -> np.ndarray:
        """``(T, T)`` float64, read-only: ``R[i][j]`` = accuracy on ``j`` after training ``i``."""
        return self._R

    @property
    def b(self) -> np.ndarray:
        """``(T,)`` float64, read-only: accuracy of the initial model on each experience."""
        return self._b

    @property
    def num_experiences(self) -> int:
        return int(self._R.shape[0])

    def set_row(self, i: int, accuracies: Sequence[float] | np.ndarray) -> AccuracyMatrix:
        """A new matrix with row ``i`` (evaluation after training through ``i``) set."""
        if not 0 <= i < self.num_experiences:
            raise ValueError(f"row {i}; expected 0 <= i < {self.num_experiences}")
        r = self._R.copy()
        r[i] = np.asarray(accuracies, dtype=np.float64)
        return AccuracyMatrix(r, self._b)

    def set_initial(self, accuracies: Sequence[float] | np.ndarray) -> AccuracyMatrix:
        """A new matrix with the initial-model accuracies ``b`` set."""
        return AccuracyMatrix(self._R, np.asarray(accuracies, dtype=np.float64))

    @property
    def measured_rows(self) -> list[int]:
        """Indices of the rows that are measured."""
        return [i for i in range(self.num_experiences) if not np.isnan(self._R[i, 0])]

    @property
    def last_completed(self) -> int:
        """Index of the last row of the leading run of measured rows; -1 when row 0 is not."""
        k = -1
        while k + 1 < self.num_experiences and not np.isnan(self._R[k + 1, 0]):
            k += 1
        return k

    @property
    def is_complete(self) -> bool:
        """Every entry of ``R`` and ``b`` is measured."""
        return not (np.isnan(self._R).any() or np.isnan(self._b).any())

    def upto(self, k: int) -> AccuracyMatrix:
        """The leading ``(k+1, k+1)`` block: the stream as if it ended at experience ``k``."""
        if not 0 <= k < self.num_experiences:
            raise ValueError(f"k={k}; expected 0 <= k < {self.num_experiences}")
        return AccuracyMatrix(self._R[: k + 1, : k + 1], self._b[: k + 1])

    # -- metrics (see the module docstring for the formulas) --------------------------------

    def acc(self) -> float:
        """ACC = mean_j R[T-1][j]."""
        return _nan_mean(self._R[-1])

    def average_incremental_accuracy(self) -> float:
        """mean_i mean_{j<=i} R[i][j]."""
        rows = [_nan_mean(self._R[i, : i + 1]) for i in range(self.num_experiences)]
        return _nan_mean(np.array(rows))

    def bwt(self) -> float:
        """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])."""
        t = self.num_experiences
        return _nan_mean(self._R[-1, : t - 1] - np.diag(self._R)[: t - 1])

    def fwt(self) -> float:
        """FWT = mean_{j>0} (R[j-1][j] - b[j])."""
        t = self.num_experiences
        before = np.array([self._R[j - 1, j] for j in range(1, t)])
        return _nan_mean(before - self._b[1:])

    def forgetting(self) -> float:
        """Max-based forgetting = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j]).

        As defined, the max runs over every earlier evaluation ``l < T-1``, including the
        rows ``l < j`` measured before experience ``j`` was trained.
        """
        t = self.num_experiences
        if t < 2:
            return float("nan")
        best = np.max(self._R[: t - 1, : t - 1], axis=0)  # (T-1,), NaN propagates
        return _nan_mean(best - self._R[-1, : t - 1])

    def forgetting_first_minus_last(self) -> float:
        """Avalanche's forgetting: mean_{j<T-1} (R[j][j] - R[T-1][j]) (first minus last)."""
        t = self.num_experiences
        return _nan_mean(np.diag(self._R)[: t - 1] - self._R[-1, : t - 1])

    def summary(self) -> dict[str, float]:
        """All metrics by name (fractions in [0, 1] scale, differences signed)."""
        return {
            "acc": self.acc(),
            "average_incremental_accuracy": self.average_incremental_accuracy(),
            "bwt": self.bwt(),
            "fwt": self.fwt(),
            "forgetting": self.forgetting(),
            "forgetting_first_minus_last": self.forgetting_first_minus_last(),
        }

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: floats exact, NaN as ``None``."""
        return {"R": [_floats_to_json(row) for row in self._R], "b": _floats_to_json(self._b)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        r = [_floats_from_json(row, "R") for row in _require(data, "R", list)]
        return cls(r, _floats_from_json(_require(data, "b", list), "b"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return bool(
            np.array_equal(self._R, other._R, equal_nan=True)
            and np.array_equal(self._b, other._b, equal_nan=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AccuracyMatrix(R={self._R.tolist()}, b={self._b.tolist()})"


def _floats_to_json(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in values.tolist()]


def _floats_from_json(values: Any, name: str) -> list[float]:
    if not isinstance(values, list):
        raise ValueError(f"{name} holds {values!r}; expected a list of numbers or null")
    out = []
    for x in values:
        if x is None:
            out.append(float("nan"))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))
        else:
            raise ValueError(f"{name} holds {x!r}; expected a number or null")
    return out


def _optional_float(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _require(data: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{data!r}; expected an object holding {key!r}")
    if key not in data:
        raise ValueError(f"missing key {key!r}; found {sorted(data)!r}")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{key!r} = {value!r}; expected {names}")
    return value


@dataclass
class Cost:
    """What a strategy cost: parameters, time and memory.

    ``active_parameters_per_token`` is a mean for input-dependent routing, hence a float.
    ``peak_memory_bytes`` is ``None`` where it was not measured (for example on CPU).
    """

    trainable_parameters: int
    backbone_parameters: int
    active_parameters_per_token: float
    wall_seconds: float
    train_seconds: float
    peak_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("trainable_parameters", "backbone_parameters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}; expected a non-negative int")
        for name in ("active_parameters_per_token", "wall_seconds", "train_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0.0 <= value < math.inf):
                raise ValueError(f"{name}={value!r}; expected a finite number >= 0")
            setattr(self, name, float(value))
        peak = self.peak_memory_bytes
        if peak is not None and (not isinstance(peak, int) or isinstance(peak, bool) or peak < 0):
            raise ValueError(f"peak_memory_bytes={peak!r}; expected None or an int >= 0")

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of the backbone's (NaN for an empty backbone)."""
        if self.backbone_parameters == 0:
            return float("nan")
        return self.trainable_parameters / self.backbone_parameters


@dataclass
class RoutingDiagnostics:
    """Routing statistics of a strategy with experts.

    ``expert_usage[t][e]`` is the fraction of task ``t``'s tokens routed to expert ``e`` (rows
    may differ in length when experts grow; a row sums to the experts per token: k with
    top-k routing, every allowed expert with task routing). :meth:`expert_shares` divides
    each row by its sum: each expert's share of the task's routings, what the report shows.
    ``task_inference_accuracy`` is the share of test samples whose task the router inferred
    correctly, or ``None`` when task ids are given.
    """

    expert_usage: list[list[float]] = field(default_factory=list)
    task_inference_accuracy: float | None = None

    def __post_init__(self) -> None:
        rows = []
        for t, row in enumerate(self.expert_usage):
            values = [float(x) for x in row]
            for e, x in enumerate(values):
                if not 0.0 <= x <= 1.0:
                    raise ValueError(
                        f"expert_usage[{t}][{e}] = {x!r}; expected a fraction in [0, 1]"
                    )
            rows.append(values)
        self.expert_usage = rows
        acc = self.task_inference_accuracy
        if acc is not None:
            if not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
                raise ValueError(f"task_inference_accuracy={acc!r}; expected None or [0, 1]")
            self.task_inference_accuracy = float(acc)

    def experts_per_token(self) -> list[float]:
        """Per task, the mean number of experts a token is routed to (its usage row's sum)."""
        return [math.fsum(row) for row in self.expert_usage]

    def expert_shares(self) -> list[list[float]]:
        """``shares[t][e]``: expert ``e``'s share of task ``t``'s routings, ``usage[t][e] /
        sum(usage[t])`` (a token routed to ``k`` experts counts ``1/k`` for each, so a row
        sums to 1; a row of zeros stays zeros). With uniform gates over the chosen experts,
        as task routing has, this is also the expert's share of the routing weight."""
        shares = []
        for row, total in zip(self.expert_usage, self.experts_per_token()):
            shares.append([x / total if total > 0 else 0.0 for x in row])
        return shares


@dataclass
class StoppingRecord:
    """Early stopping on one experience of a strategy (Joint: on the whole stream, recorded
    at the last experience).

    ``best_epoch`` is the epoch (0-based) whose weights were kept, ``epochs_run`` the epochs
    trained, ``stopped_early`` whether training stopped before ``train.epochs``, ``metric``
    the validation metric watched (``val_loss`` or ``val_acc``) and ``best_value`` its value
    at the best epoch.
    """

    experience: int
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    metric: str
    best_value: float | None = None

    def __post_init__(self) -> None:
        for key in ("experience", "best_epoch", "epochs_run"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"early_stopping.{key}={value!r}; expected an int >= 0")
        if self.best_epoch >= self.epochs_run:
            raise ValueError(
                f"early_stopping.best_epoch={self.best_epoch} but epochs_run={self.epochs_run}; "
                f"expected the best epoch among those run"
            )
        if not isinstance(self.stopped_early, bool):
            raise ValueError(
                f"early_stopping.stopped_early={self.stopped_early!r}; expected a bool"
            )
        if self.metric not in ("val_loss", "val_acc"):
            raise ValueError(f"early_stopping.metric={self.metric!r}; expected val_loss or val_acc")
        v = self.best_value
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"early_stopping.best_value={v!r}; expected a finite number")
            self.best_value = float(v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experience": self.experience,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "metric": self.metric,
            "best_value": self.best_value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoppingRecord:
        return cls(
            experience=_require(data, "experience", int),
            best_epoch=_require(data, "best_epoch", int),
            epochs_run=_require(data, "epochs_run", int),
            stopped_early=_require(data, "stopped_early", bool),
            metric=_require(data, "metric", str),
            best_value=data.get("best_value"),
        )


@dataclass
class StrategyResult:
    """Everything measured for one strategy of a run.

    ``name`` is the strategy's registry name (``"ewc"``, as the config's ``strategies:``
    lists it), the key of :attr:`RunResults.strategies`; ``label`` its display name in
    tables and plots (``"EWC"``, the registry entry's label; the name when empty).
    ``steps`` counts the training steps taken or skipped so far (every mini-batch, including
    those of plugins' own fine-tuning loops), ``skipped_steps`` those skipped for a
    non-finite loss or gradient (``train.on_nonfinite=skip``).

    ``matrix`` is the accuracy matrix on the test experiences (``None``: the run did not
    evaluate the test split), ``validation`` the one on the validation splits,
    ``R_val[i][j]`` = accuracy on experience ``j``'s validation split after training through
    ``i`` (``None``: the run held out no validation split). ``early_stopping`` has one
    :class:`StoppingRecord` per experience trained with early stopping (empty without it).
    """

    name: str
    matrix: AccuracyMatrix | None
    cost: Cost
    routing: RoutingDiagnostics | None = None
    steps: int = 0
    skipped_steps: int = 0
    label: str = ""
    validation: AccuracyMatrix | None = None
    early_stopping: list[StoppingRecord] = field(default_factory=list)

    @property
    def measured(self) -> AccuracyMatrix:
        """The test matrix, or the validation matrix of a run that did not evaluate the test
        split (what a run in progress has measured so far)."""
        m = self.matrix if self.matrix is not None else self.validation
        if m is None:
            raise ValueError(f"strategy {self.name!r} has neither a test nor a validation matrix")
        return m

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name={self.name!r}; expected a non-empty strategy name")
        if not isinstance(self.label, str):
            raise ValueError(f"label={self.label!r}; expected a display name (a string)")
        self.label = self.label or self.name
        for key in ("steps", "skipped_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}={value!r}; expected a non-negative int")
        if self.skipped_steps > self.steps:
            raise ValueError(
                f"skipped_steps={self.skipped_steps} exceeds steps={self.steps}; expected at "
                f"most as many skipped steps as steps"
            )
        if self.matrix is None and self.validation is None:
            raise ValueError(
                f"strategy {self.name!r}: matrix and validation are both None; expected a test "
                f"or a validation accuracy matrix"
            )
        for key in ("matrix", "validation"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, AccuracyMatrix):
                raise ValueError(f"{key}={value!r}; expected an AccuracyMatrix or None")
        if (
            self.matrix is not None
            and self.validation is not None
            and self.matrix.num_experiences != self.validation.num_experiences
        ):
            raise ValueError(
                f"strategy {self.name!r}: a {self.matrix.num_experiences}-experience test matrix "
                f"but a {self.validation.num_experiences}-experience validation matrix"
            )
        self.early_stopping = list(self.early_stopping)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: floats exact, NaN as ``None``."""
        cost = {
            "trainable_parameters": self.cost.trainable_parameters,
            "backbone_parameters": self.cost.backbone_parameters,
            "active_parameters_per_token": self.cost.active_parameters_per_token,
            "wall_seconds": self.cost.wall_seconds,
            "train_seconds": self.cost.train_seconds,
            "peak_memory_bytes": self.cost.peak_memory_bytes,
        }
        routing = None
        if self.routing is not None:
            routing = {
                "expert_usage": [list(row) for row in self.routing.expert_usage],
                "task_inference_accuracy": _optional_float(self.routing.task_inference_accuracy),
            }
        return {
            "name": self.name,
            "label": self.label,
            "matrix": None if self.matrix is None else self.matrix.to_dict(),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "cost": cost,
            "routing": routing,
            "training": {"steps": self.steps, "skipped_steps": self.skipped_steps},
            "early_stopping": [r.to_dict() for r in self.early_stopping],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategyResult:
        c = _require(data, "cost", dict)
        peak = c.get("peak_memory_bytes")
        cost = Cost(
            trainable_parameters=_require(c, "trainable_parameters", int),
            backbone_parameters=_require(c, "backbone_parameters", int),
            active_parameters_per_token=_require(c, "active_parameters_per_token", (int, float)),
            wall_seconds=_require(c, "wall_seconds", (int, float)),
            train_seconds=_require(c, "train_seconds", (int, float)),
            peak_memory_bytes=peak,
        )
        routing = None
        r = data.get("routing")
        if r is not None:
            if not isinstance(r, dict):
                raise ValueError(f"'routing' = {r!r}; expected an object or null")
            usage = _require(r, "expert_usage", list)
            routing = RoutingDiagnostics(
                expert_usage=[_floats_from_json(row, "expert_usage") for row in usage],
                task_inference_accuracy=r.get("task_inference_accuracy"),
            )
        training = data.get("training") or {}  # absent from files of older versions
        if not isinstance(training, dict):
            raise ValueError(f"'training' = {training!r}; expected an object or null")
        stopping = data.get("early_stopping") or []  # absent from version 2
        if not isinstance(stopping, list):
            raise ValueError(f"'early_stopping' = {stopping!r}; expected a list or null")
        return cls(
            name=_require(data, "name", str),
            label=_require(data, "label", str),
            matrix=_optional_matrix(data, "matrix"),
            cost=cost,
            routing=routing,
            steps=training.get("steps", 0),
            skipped_steps=training.get("skipped_steps", 0),
            validation=_optional_matrix(data, "validation"),
            early_stopping=[StoppingRecord.from_dict(_object(r)) for r in stopping],
        )


def _object(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r}; expected an object")
    return value


def _optional_matrix(data: Mapping[str, Any], key: str) -> AccuracyMatrix | None:
    """``data[key]`` as an accuracy matrix; ``None`` for null or (validation) absent."""
    if key == "matrix":
        _require(data, key, (dict, type(None)))  # present in every version
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} = {value!r}; expected an object or null")
    return AccuracyMatrix.from_dict(value)


@dataclass
class RunResults:
    """The results of one continual run: every strategy on the same stream.

    Saved as ``RUN_DIR/metrics.json`` (:meth:`save`, atomic) and read back with :meth:`load`;
    the report is rebuilt from that file alone. :attr:`strategies` is keyed by registry name
    (``results.strategies["moracl"]``), in the order the run reports them.
    ``test_evaluated`` is false for a run that never read its test split (every strategy's
    ``matrix`` is then ``None`` and its ``validation`` matrix holds what was measured).
    """

    scenario: str
    setting: str
    seed: int
    experiences: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    strategies: dict[str, StrategyResult] = field(default_factory=dict)
    test_evaluated: bool = True

    def __post_init__(self) -> None:
        if not self.experiences:
            raise ValueError("experiences=[]; expected the names of the stream's experiences")
        # str Enums (a setting, a scenario name) are stored as their value
        self.scenario = str(getattr(self.scenario, "value", self.scenario))
        self.setting = str(getattr(self.setting, "value", self.setting))
        self.experiences = [str(e) for e in self.experiences]
        if not isinstance(self.test_evaluated, bool):
            raise ValueError(f"test_evaluated={self.test_evaluated!r}; expected true or false")
        for key, result in self.strategies.items():
            self._check(key, result)

    def _check(self, key: str, result: StrategyResult) -> None:
        if key != result.name:
            raise ValueError(f"strategy stored under {key!r} is named {result.name!r}")
        t = result.measured.num_experiences
        if t != len(self.experiences):
            raise ValueError(
                f"strategy {key!r} has a {t}x{t} accuracy matrix; expected "
                f"{len(self.experiences)} experiences ({self.experiences})"
            )
        if self.test_evaluated and result.matrix is None:
            raise ValueError(
                f"strategy {key!r} has no test accuracy matrix, but test_evaluated is true"
            )
        if not self.test_evaluated and result.matrix is not None:
            raise ValueError(
                f"strategy {key!r} has a test accuracy matrix, but test_evaluated is false (the "
                f"run never read its test split)"
            )

    def add(self, result: StrategyResult) -> None:
        """Add or replace the result of ``result.name``."""
        self._check(result.name, result)
        self.strategies[result.name] = result

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "scenario": self.scenario,
            "setting": self.setting,
            "seed": self.seed,
            "experiences": list(self.experiences),
            "config": self.config,
            "test_evaluated": self.test_evaluated,
            "strategies": [s.to_dict() for s in self.strategies.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResults:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"format {found!r}; expected {FORMAT!r}")
        if data.get("version") == 1:
            raise ValueError(
                f"{FORMAT} version 1, written by an earlier moracl that keyed strategies by "
                f"their display label ('moracl (experts)'); this moracl reads version {VERSION} "
                f"(keyed by registry name, 'moracl'): run the stream again to rebuild it"
            )
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{FORMAT} version {data.get('version')!r}; this moracl reads versions "
                f"{list(READABLE_VERSIONS)}"
            )
        strategies = [StrategyResult.from_dict(s) for s in _require(data, "strategies", list)]
        names = [s.name for s in strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names {names} repeat; expected each once")
        return cls(
            scenario=_require(data, "scenario", str),
            setting=_require(data, "setting", str),
            seed=_require(data, "seed", int),
            experiences=_require(data, "experiences", list),
            config=_require(data, "config", dict),
            strategies={s.name: s for s in strategies},
            test_evaluated=data.get("test_evaluated", True),  # absent from version 2
        )

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write ``run_dir/metrics.json`` atomically and return its path.

        An existing file that is not a readable results file of this format (another tool's
        ``metrics.json``, or a corrupt one) is left untouched and ``ValueError`` is raised.
        """
        path = Path(run_dir) / METRICS_FILE
        if path.exists():
            RunResults.load(path)  # raises on a file we must not overwrite
        from moracl.guard import NonFiniteError, finite_json

        try:
            text = finite_json(self.to_dict(), f"results of {self.scenario!r}", indent=2)
        except NonFiniteError:
            raise
        except (TypeError, ValueError) as e:
            raise ValueError(f"results of {self.scenario!r} are not JSON-serialisable: {e}") from e
        write_atomic(path, text + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunResults:
        """Read a run's results from ``metrics.json`` or from the run folder holding it."""
        p = Path(path)
        if p.is_dir():
            p = p / METRICS_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no {METRICS_FILE} at {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p} is not a readable {FORMAT} results file: {e}") from e
