"""How each job kind plugs into ``moracl sweep``: how to check and run a trial, how to score
it on validation, and how to summarise the final run (:class:`SweepJob`, registered by job
name in :data:`SWEEP_JOBS`).

The three jobs of the ``moracl`` command are registered here:

- ``finetune``: scored by ``FinetuneResult.validation_accuracy`` (adapters + head on the
  validation split);
- ``meta``: scored by ``MetaResult.best_validation_accuracy`` (the best meta-validation
  check, whose weights are kept);
- ``run``: scored by a metric of one strategy's validation matrix
  (``StrategyResult.validation``): ACC by default; with ``select_experiences=K`` the trials
  run experiences ``0..K-1`` only and the metric is taken over those ``K``.

A test or a user registers another kind for a while with
``SWEEP_JOBS.temporarily("toy", SweepJob(...))`` (and its config class in
:data:`moracl.config.JOBS`). Trials may run in worker processes, so the functions of an
entry must be picklable: module-level functions, not lambdas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moracl.config import FinetuneConfig, MetaConfig
from moracl.continual.config import RunConfig
from moracl.continual.metrics import AccuracyMatrix, RunResults
from moracl.continual.strategies import strategy_entry
from moracl.jobs import continual, finetune, meta
from moracl.parse_fields import from_dict, to_dict
from moracl.preflight import check_common
from moracl.registry import Registry

__all__ = [
    "RUN_METRICS",
    "SWEEP_JOBS",
    "ResultTable",
    "Selection",
    "SelectionError",
    "SelectionRequest",
    "SweepJob",
    "TrialOptions",
    "never_resumable",
]


class SelectionError(ValueError):
    """The ranking asked for cannot be computed from a trial's results whatever its
    hyperparameters (e.g. ``select_experiences`` beyond the stream's length): the sweep stops
    instead of recording every trial as failed."""


@dataclass(frozen=True)
class TrialOptions:
    """How a job runs one config of a sweep.

    Attributes:
        evaluate_test: read the test split (only the final run of the chosen config does).
        stop_after: stop after this experience (continual runs; ``None``: the whole stream).
        resume: continue the unfinished run in the config's ``output_dir``.
        progress: show the job's progress bars.
        device: where to run (continual runs; other jobs run on the CPU).
    """

    evaluate_test: bool
    stop_after: int | None = None
    resume: bool = False
    progress: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class SelectionRequest:
    """What the user asked to rank by (``None``: the job's default)."""

    metric: str | None = None
    strategy: str | None = None
    select_experiences: int | None = None


@dataclass(frozen=True)
class Selection:
    """How trials are ranked: the metric, its direction, and for continual runs the strategy
    and the number of leading experiences the trials run.

    Attributes:
        metric: the metric's name (``validation_accuracy``, ``acc``, ``bwt``...).
        label: the metric in words, for tables (``validation ACC of moracl``).
        higher_is_better: the direction of the ranking.
        kind: ``accuracy`` (a fraction, shown in %) or ``difference`` (a signed fraction,
            shown in points).
        strategy: the ranked strategy (continual runs).
        select_experiences: the trials run experiences ``0..K-1`` only and are ranked on
            those (continual runs; ``None``: the whole stream).
    """

    metric: str
    label: str
    higher_is_better: bool = True
    kind: str = "accuracy"
    strategy: str | None = None
    select_experiences: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("accuracy", "difference"):
            raise ValueError(f"kind={self.kind!r}; expected 'accuracy' or 'difference'")

    @property
    def stop_after(self) -> int | None:
        """The last experience a trial trains (``None``: the whole stream)."""
        k = self.select_experiences
        return None if k is None else k - 1

    def sort_key(self, score: float, number: int) -> tuple[float, int]:
        """Ascending order is best first; ties go to the earlier trial."""
        return (-score if self.higher_is_better else score, number)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResultTable:
    """The final run's numbers, as a table.

    Attributes:
        columns: ``(title, kind)`` per column; kind is ``text``, ``accuracy`` (a fraction,
            shown in %), ``difference`` (a signed fraction, shown in points) or ``count``.
        rows: one tuple per row (a float column may hold ``None``: not measured).
    """

    columns: tuple[tuple[str, str], ...]
    rows: tuple[tuple[str | float | None, ...], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": [list(c) for c in self.columns],
            "rows": [[_finite_or_none(v) for v in row] for row in self.rows],
        }


def _finite_or_none(value: str | float | None) -> str | float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def never_resumable(folder: Path) -> bool:
    """A job that cannot resume an unfinished run: its folder is cleared and it restarts."""
    return False


@dataclass(frozen=True)
class SweepJob:
    """How one job kind runs in a sweep.

    Attributes:
        command: the command that runs a config of this job (``moracl run``).
        check: raise ``ValueError`` for a config the job would refuse, reading no data (what
            ``moracl validate`` checks).
        select: the :class:`Selection` for a :class:`SelectionRequest` on the base config;
            ``ValueError`` for a request the job cannot honour.
        run: run a config with :class:`TrialOptions`; returns the job's result.
        score: the selection's metric from a result (a finite float, or ``ValueError``).
        summarize: the final run's test numbers (and validation beside) as a table.
        resumable: whether an unfinished run in a folder can be resumed (else the folder is
            cleared and the run restarts).
        devices: the job takes a ``device`` (else only ``cpu`` is accepted).
    """

    command: str
    check: Callable[[Any], None]
    select: Callable[[Any, SelectionRequest], Selection]
    run: Callable[[Any, TrialOptions], Any]
    score: Callable[[Any, Selection], float]
    summarize: Callable[[Any, Selection], ResultTable]
    resumable: Callable[[Path], bool] = never_resumable
    devices: bool = False


SWEEP_JOBS: Registry[SweepJob] = Registry("sweep job")


def _only_metric(name: str, label: str, job: str, request: SelectionRequest) -> Selection:
    """The selection of a job ranked by one validation number."""
    if request.strategy is not None or request.select_experiences is not None:
        given = "--strategy" if request.strategy is not None else "--select-experiences"
        raise ValueError(f"{given} applies to continual runs (job: run), not to a {job!r} config")
    if request.metric is not None and request.metric != name:
        raise ValueError(f"--metric {request.metric!r} is not a {job} metric; expected {name!r}")
    return Selection(metric=name, label=label)


def _refuse_no_validation(share: Any, key: str) -> None:
    if share is not None and share == 0:
        raise ValueError(
            f"{key}=0: a sweep ranks trials on a validation split; set {key} > 0 (e.g. 0.1)"
        )


# -- finetune -----------------------------------------------------------------------------


def _finetune_check(config: Any) -> None:
    from_dict(FinetuneConfig, to_dict(config))
    finetune.check(config)
    check_common(config)


def _finetune_select(config: Any, request: SelectionRequest) -> Selection:
    _refuse_no_validation(getattr(config.data, "val_share", None), "data.val_share")
    return _only_metric(
        "validation_accuracy", "validation accuracy (adapters + head)", "finetune", request
    )


def _finetune_run(config: Any, options: TrialOptions) -> Any:
    return finetune.run(config, progress=options.progress, evaluate_test=options.evaluate_test)


def _finetune_score(result: Any, selection: Selection) -> float:
    return float(result.validation_accuracy)


def _finetune_summary(result: Any, selection: Selection) -> ResultTable:
    return ResultTable(
        columns=(("model", "text"), ("test accuracy", "accuracy"), ("validation", "accuracy")),
        rows=(
            (
                "untrained head (chance level)",
                result.untrained_accuracy,
                result.untrained_validation_accuracy,
            ),
            (
                "linear probe on the frozen backbone",
                result.probe_accuracy,
                result.probe_validation_accuracy,
            ),
            ("adapters + head", result.adapted_accuracy, result.validation_accuracy),
        ),
    )


SWEEP_JOBS.register("finetune")(
    SweepJob(
        command="moracl finetune",
        check=_finetune_check,
        select=_finetune_select,
        run=_finetune_run,
        score=_finetune_score,
        summarize=_finetune_summary,
    )
)


# -- meta ---------------------------------------------------------------------------------


def _meta_check(config: Any) -> None:
    from_dict(MetaConfig, to_dict(config))
    meta.check(config)
    check_common(config)


def _meta_select(config: Any, request: SelectionRequest) -> Selection:
    if getattr(config.meta, "val_every", 1) == 0:
        raise ValueError(
            "meta.val_every=0 measures no meta-validation accuracy, so a sweep cannot rank "
            "its trials; set meta.val_every to a positive number of steps"
        )
    return _only_metric(
        "best_validation_accuracy", "best meta-validation accuracy", "meta", request
    )


def _meta_run(config: Any, options: TrialOptions) -> Any:
    return meta.run(config, progress=options.progress, evaluate_test=options.evaluate_test)


def _meta_score(result: Any, selection: Selection) -> float:
    return float(result.best_validation_accuracy)


def _meta_summary(result: Any, selection: Selection) -> ResultTable:
    rows: list[tuple[str | float | None, ...]] = []
    for name, s in (result.summaries or {}).items():
        rows.append((result.labels.get(name, name), s.mean, s.ci95, float(s.episodes)))
    return ResultTable(
        columns=(
            ("method", "text"),
            ("meta-test accuracy", "accuracy"),
            ("± 95 % CI", "accuracy"),
            ("episodes", "count"),
        ),
        rows=tuple(rows),
    )


SWEEP_JOBS.register("meta")(
    SweepJob(
        command="moracl meta",
        check=_meta_check,
        select=_meta_select,
        run=_meta_run,
        score=_meta_score,
        summarize=_meta_summary,
    )
)


# -- run (continual) ----------------------------------------------------------------------

#: the metrics of a validation matrix a continual sweep may rank by: (words, higher is
#: better, kind); see :class:`~moracl.continual.metrics.AccuracyMatrix`
RUN_METRICS: dict[str, tuple[str, bool, str]] = {
    "acc": ("ACC", True, "accuracy"),
    "average_incremental_accuracy": ("average incremental accuracy", True, "accuracy"),
    "bwt": ("BWT", True, "difference"),
    "fwt": ("FWT", True, "difference"),
    "forgetting": ("forgetting", False, "difference"),
    "forgetting_first_minus_last": ("forgetting (first - last)", False, "difference"),
}


def _run_check(config: Any) -> None:
    from_dict(RunConfig, to_dict(config))
    continual.check(config)
    check_common(config)


def _run_select(config: Any, request: SelectionRequest) -> Selection:
    _refuse_no_validation(getattr(config.scenario, "val_share", None), "scenario.val_share")
    metric = request.metric or "acc"
    if metric not in RUN_METRICS:
        raise ValueError(
            f"--metric {metric!r} is not a run metric; expected one of {sorted(RUN_METRICS)}"
        )
    strategy = request.strategy or config.strategies[0]
    if strategy == MEAN:  # settings every strategy shares (train.lr, epochs, ...)
        if not _averaged(config.strategies):
            raise ValueError(
                f"--strategy {MEAN} averages the strategies that train on every experience; "
                f"the config has none: {config.strategies}"
            )
    elif strategy not in config.strategies:
        raise ValueError(
            f"--strategy {strategy!r} is not among the config's strategies {config.strategies}"
        )
    k = request.select_experiences
    words, higher, kind = RUN_METRICS[metric]
    label = (
        f"mean validation {words} of the strategies (Joint aside)"
        if strategy == MEAN
        else f"validation {words} of {strategy}"
    )
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"--select-experiences must be a positive integer, got {k!r}")
        if strategy != MEAN and strategy_entry(strategy).trains_once:
            raise ValueError(
                f"--strategy {strategy!r} trains once, at the last experience: it cannot be "
                f"ranked on the first {k} experiences; rank another strategy"
            )
        if k == 1 and metric not in ("acc", "average_incremental_accuracy"):
            raise ValueError(
                f"--metric {metric!r} compares experiences: it needs --select-experiences >= 2, "
                f"got 1"
            )
        label += f" on experiences 0-{k - 1}" if k > 1 else " on experience 0"
    return Selection(
        metric=metric,
        label=label,
        higher_is_better=higher,
        kind=kind,
        strategy=strategy,
        select_experiences=k,
    )


def _run_resumable(folder: Path) -> bool:
    return (folder / "checkpoints" / "latest.json").is_file()


def _run_run(config: Any, options: TrialOptions) -> Any:
    folder = Path(config.output_dir)
    if options.resume and options.stop_after is not None and _run_resumable(folder):
        # a trial whose checkpoint already reaches its last experience: resuming would train
        # one more; its results are complete
        from moracl.continual.checkpoint import load_checkpoint
        from moracl.continual.resume import progress_of

        done, _ = progress_of(load_checkpoint(folder, tensors=False))
        if done > options.stop_after:
            return RunResults.load(folder)
    return continual.run(
        config,
        resume=options.resume,
        progress=options.progress,
        stop_after=options.stop_after,
        device=options.device,
        evaluate_test=options.evaluate_test,
    )


#: ``--strategy mean``: rank on the mean over the strategies that train on every experience
#: (Joint, which trains once, left out), for the settings they all share
MEAN = "mean"


def _averaged(strategies: list[str]) -> list[str]:
    """The strategies ``--strategy mean`` averages: those that train on every experience."""
    return [n for n in strategies if not strategy_entry(n).trains_once]


def _validation(result: RunResults, strategy: str) -> AccuracyMatrix:
    r = result.strategies[strategy]
    matrix: AccuracyMatrix | None = getattr(r, "validation", None)
    if matrix is None:
        raise ValueError(
            f"strategy {strategy!r} has no validation matrix (scenario.val_share is 0?)"
        )
    return matrix


def _run_score(result: Any, selection: Selection) -> float:
    if selection.strategy is None:
        raise ValueError("a continual selection needs a strategy")
    if selection.strategy == MEAN:
        names = _averaged(list(result.strategies))
        scores = [_run_score(result, replace(selection, strategy=n)) for n in names]
        return math.fsum(scores) / len(scores)
    matrix = _validation(result, selection.strategy)
    k = selection.select_experiences
    if k is not None:
        if k > matrix.num_experiences:
            raise SelectionError(
                f"--select-experiences {k} exceeds the stream's {matrix.num_experiences} "
                f"experiences ({', '.join(result.experiences)}); expected at most "
                f"{matrix.num_experiences}"
            )
        matrix = matrix.upto(k - 1)
    return float(matrix.summary()[selection.metric])


def _run_summary(result: Any, selection: Selection) -> ResultTable:
    rows: list[tuple[str | float | None, ...]] = []
    for r in result.strategies.values():
        test = r.matrix
        val: AccuracyMatrix | None = getattr(r, "validation", None)
        rows.append(
            (
                r.label,
                test.acc() if test is not None else None,
                test.bwt() if test is not None else None,
                val.acc() if val is not None else None,
                val.bwt() if val is not None else None,
            )
        )
    return ResultTable(
        columns=(
            ("strategy", "text"),
            ("test ACC", "accuracy"),
            ("test BWT", "difference"),
            ("val ACC", "accuracy"),
            ("val BWT", "difference"),
        ),
        rows=tuple(rows),
    )


SWEEP_JOBS.register("run")(
    SweepJob(
        command="moracl run",
        check=_run_check,
        select=_run_select,
        run=_run_run,
        score=_run_score,
        summarize=_run_summary,
        resumable=_run_resumable,
        devices=True,
    )
)
