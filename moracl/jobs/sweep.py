"""The sweep job (``moracl sweep``): grid or random search over config keys, every trial
ranked on validation data, then the chosen config run once more with the test split.

    plan = plan_sweep("configs/split_fashion.yaml", ["adapter.rank=4,8", "train.lr=1e-3,3e-3"])
    result = run_sweep(plan)
    result.chosen.overrides        # {'adapter.rank': 8, 'train.lr': 0.003}

Protocol:

1. Every trial (a combination of the grid's values, or ``trials`` of them drawn with
   ``seed``) runs in its own folder ``SWEEP_DIR/trials/<NNN>/`` (its full config saved as
   ``config.yaml``) with ``evaluate_test=False``: no trial reads the test split. A continual
   run ranked with ``select_experiences=K`` trains experiences ``0..K-1`` only (the
   protocol of Chaudhry et al. 2019, "Efficient lifelong learning with A-GEM": choose
   hyperparameters on the first experiences).
2. Trials are ranked by the job's validation metric (:mod:`moracl.jobs.sweep_kinds`); ties
   go to the earlier trial. A trial that raises is recorded as failed, with its message,
   and the sweep goes on; when every trial fails the sweep fails, with no final run.
3. The chosen config runs once more in ``SWEEP_DIR/final/``, over the whole stream, with
   ``evaluate_test=True``: the only reading of the test split. Its validation metric is
   compared with the trial's (runs are deterministic): both are recorded, and a difference
   is warned about.

Outputs in ``SWEEP_DIR``: ``sweep.json`` (the state, rewritten atomically after each trial),
``sweep.md`` and ``sweep.png`` (:mod:`moracl.report.sweep`), ``chosen.yaml`` (the chosen
config, ready for ``moracl <job> chosen.yaml``), ``trials/`` and ``final/``.

Running the same sweep on the same folder again resumes it: done trials are skipped (failed
ones too, unless ``retry_failed``); an interrupted trial resumes from its checkpoint when its
job can (continual runs), else restarts in a cleared folder. A different config, grid,
search or ranking on an existing folder is refused, naming every difference. The folder is
locked while the sweep runs (:mod:`moracl.runlock`). With ``jobs=N > 1`` trials run in N
worker processes (spawned; torch threads per worker: cores // N, at least 1); trial numbers,
records and the choice do not depend on N.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moracl.config import dump_yaml, to_dict
from moracl.files import write_atomic
from moracl.jobs.sweep_kinds import Selection, SelectionError, SweepJob, TrialOptions
from moracl.jobs.sweep_plan import SweepPlan, plan_sweep
from moracl.jobs.sweep_space import SearchSpace, overrides_text
from moracl.jobs.sweep_state import STATE_FILE, FinalRecord, SweepState, TrialRecord, TrialStatus
from moracl.report.sweep import CHOSEN_FILE, format_score, write_sweep_report
from moracl.runlock import LOCK_FILE, lock_run_folder

__all__ = [
    "FINAL_DIR",
    "SweepPlan",
    "SweepResult",
    "TrialOutcome",
    "plan_sweep",
    "run_sweep",
    "run_trial",
    "sweep",
]

FINAL_DIR = "final"
_ERROR_CHARS = 600


@dataclass(frozen=True)
class TrialOutcome:
    """What one run of a config gave: its score, or the error that stopped it."""

    score: float | None
    seconds: float
    error: str | None = None


@dataclass
class SweepResult:
    """A finished sweep.

    Attributes:
        sweep_dir: the sweep folder.
        state: what ``sweep.json`` holds.
        chosen: the chosen trial.
        final: the job's result of the final run (``None`` when an earlier call ran it).
        warnings: what the sweep warned about (the final run's validation differing from
            the trial's).
    """

    sweep_dir: Path
    state: SweepState
    chosen: TrialRecord
    final: Any = None
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.sweep_dir / "sweep.md"

    @property
    def chosen_config(self) -> Path:
        return self.sweep_dir / CHOSEN_FILE


# -- one trial ------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = " ".join((str(error) or "").split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


def run_trial(
    job: SweepJob,
    config: Any,
    options: TrialOptions,
    selection: Selection,
    *,
    threads: int | None = None,
) -> TrialOutcome:
    """Run ``config`` with ``options`` and score it; an exception (but a
    :class:`~moracl.jobs.sweep_kinds.SelectionError`, and an interruption) becomes the
    outcome's error. ``threads``: torch's intra-op threads for this process (a worker's)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    began = time.perf_counter()
    try:
        result = job.run(config, options)
        score = job.score(result, selection)
        if not math.isfinite(score):
            raise ValueError(f"the {selection.label} is {score}, not a finite number")
    except SelectionError:
        raise
    except Exception as e:
        return TrialOutcome(None, time.perf_counter() - began, _one_line(e))
    return TrialOutcome(float(score), time.perf_counter() - began)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not every system tells
        return os.cpu_count() or 1


# -- the sweep ------------------------------------------------------------------------------


class _Sweep:
    """A sweep running in its locked folder."""

    def __init__(
        self,
        plan: SweepPlan,
        state: SweepState,
        *,
        progress: bool,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self.plan, self.state = plan, state
        self.out = plan.output_dir
        self.progress = progress
        self.on_event = on_event or (lambda message: None)

    def save(self) -> None:
        self.state.save(self.out)

    def prepare(self, trial: TrialRecord, *, in_process: bool) -> tuple[Any, TrialOptions]:
        """Mark ``trial`` running, set up its folder (cleared unless it resumes) and its
        ``config.yaml``; returns its config and options."""
        folder = self.out / trial.folder
        resume = trial.status is TrialStatus.RUNNING and self.plan.job.resumable(folder)
        if not resume and os.path.lexists(folder):
            shutil.rmtree(folder)
        config = self.plan.config_for(trial.overrides, folder)
        write_atomic(folder / "config.yaml", dump_yaml(to_dict(config)))
        trial.status, trial.score, trial.error = TrialStatus.RUNNING, None, None
        self.save()
        options = TrialOptions(
            evaluate_test=False,
            stop_after=self.plan.selection.stop_after,
            resume=resume,
            progress=self.progress and in_process,
            device=self.plan.device,
        )
        how = "resuming" if resume else "running"
        self.on_event(f"trial {trial.number:03d}: {how} {overrides_text(trial.overrides)}")
        return config, options

    def record(self, trial: TrialRecord, outcome: TrialOutcome) -> None:
        trial.seconds = outcome.seconds
        if outcome.error is None:
            trial.status, trial.score = TrialStatus.DONE, outcome.score
            what = f"{self.plan.selection.label} {format_score(outcome.score, self._kind)}"
        else:
            trial.status, trial.error = TrialStatus.FAILED, outcome.error
            what = f"failed: {outcome.error}"
        self.save()
        self.on_event(f"trial {trial.number:03d}: {what} ({outcome.seconds:.0f} s)")

    @property
    def _kind(self) -> str:
        return self.plan.selection.kind

    def run_in_process(self, todo: list[TrialRecord]) -> None:
        for trial in todo:
            config, options = self.prepare(trial, in_process=True)
            outcome = run_trial(self.plan.job, config, options, self.plan.selection)
            self.record(trial, outcome)

    def run_in_workers(self, todo: list[TrialRecord], jobs: int) -> None:
        workers = min(jobs, len(todo))
        threads = max(1, _cores() // jobs)
        queue = list(todo)
        while queue:
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                # before a worker imports the jobs: Avalanche warns at import that no QP
                # solver is installed, which no moracl strategy needs (as the command does)
                initializer=warnings.filterwarnings,
                initargs=("ignore", "no QP solver found", UserWarning),
            )
            try:
                self._drain(pool, queue, workers, threads)
            except BaseException:
                _stop(pool)
                raise
            pool.shutdown(wait=False)  # the workers exit meanwhile (a second or two each)

    def _drain(
        self, pool: ProcessPoolExecutor, queue: list[TrialRecord], workers: int, threads: int
    ) -> None:
        """Run the trials of ``queue`` on ``pool`` until it is empty or the pool breaks (a
        worker died: the trials it was running are recorded as failed)."""
        running: dict[Future[TrialOutcome], TrialRecord] = {}
        broken = False
        while (queue or running) and not broken:
            while queue and len(running) < workers:
                trial = queue.pop(0)
                config, options = self.prepare(trial, in_process=False)
                try:
                    future = pool.submit(
                        run_trial,
                        self.plan.job,
                        config,
                        options,
                        self.plan.selection,
                        threads=threads,
                    )
                except BrokenProcessPool:
                    queue.insert(0, trial)
                    broken = True
                    break
                running[future] = trial
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: running[f].number):
                trial = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool as e:
                    broken = True
                    outcome = TrialOutcome(
                        None, 0.0, f"the worker process running it died ({_one_line(e)})"
                    )
                self.record(trial, outcome)
        if broken:  # the trials still on the pool died with it
            for trial in running.values():
                self.record(trial, TrialOutcome(None, 0.0, "the worker process running it died"))

    def final_run(self, chosen: TrialRecord) -> tuple[Any, list[str]]:
        """Run the chosen config once over the whole stream with the test split; returns
        its result (``None`` when an earlier call ran it) and warnings."""
        plan, job = self.plan, self.plan.job
        folder = self.out / FINAL_DIR
        final = self.state.final
        same = final is not None and final.trial == chosen.number
        if same and final is not None and final.status is TrialStatus.DONE:
            return None, _mismatch(final, plan.selection)
        resume = (
            same and final is not None and final.status is TrialStatus.RUNNING
        ) and job.resumable(folder)
        if not resume and os.path.lexists(folder):
            shutil.rmtree(folder)
        config = plan.config_for(chosen.overrides, folder)
        write_atomic(folder / "config.yaml", dump_yaml(to_dict(config)))
        record = FinalRecord(trial=chosen.number, trial_score=chosen.score)
        self.state.final = record
        self.save()
        self.on_event(
            f"final run of trial {chosen.number:03d} ({overrides_text(chosen.overrides)}) "
            f"in {folder}: the whole stream, reading the test split"
        )
        options = TrialOptions(
            evaluate_test=True, resume=resume, progress=self.progress, device=plan.device
        )
        began = time.perf_counter()
        try:
            result = job.run(config, options)
            score = job.score(result, plan.selection)
            table = job.summarize(result, plan.selection)
        except Exception as e:
            record.status, record.error = TrialStatus.FAILED, _one_line(e)
            record.seconds = time.perf_counter() - began
            self.save()
            raise
        record.status, record.seconds = TrialStatus.DONE, time.perf_counter() - began
        record.validation_score = float(score)
        record.matches = float(score) == chosen.score
        record.table = table.to_dict()
        self.save()
        notes = _mismatch(record, plan.selection)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return result, notes

    def write_chosen(self, chosen: TrialRecord) -> Path:
        """``chosen.yaml``: the chosen config, writing to the base config's ``output_dir``."""
        plan = self.plan
        config = plan.config_for(chosen.overrides, plan.base_config.output_dir)
        score = format_score(chosen.score, self._kind)
        header = (
            f"# chosen by moracl sweep in {self.out}: trial {chosen.number:03d} "
            f"({overrides_text(chosen.overrides)}), {plan.selection.label} {score}\n"
            f"# run it: {plan.job.command} {self.out / CHOSEN_FILE}\n"
        )
        path = self.out / CHOSEN_FILE
        write_atomic(path, header + dump_yaml(to_dict(config)))
        return path


def _mismatch(final: FinalRecord, selection: Selection) -> list[str]:
    if final.matches is False:
        return [
            f"the final run's {selection.label} is "
            f"{format_score(final.validation_score, selection.kind)} "
            f"({final.validation_score!r}), the chosen trial's "
            f"{format_score(final.trial_score, selection.kind)} ({final.trial_score!r}): "
            f"the runs are not deterministic"
        ]
    return []


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` at once: cancel what has not started and end its worker processes."""
    processes = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        if process.is_alive():
            process.terminate()
    for process in processes.values():
        process.join(timeout=10)


def _open_state(plan: SweepPlan, resume: bool) -> SweepState:
    """The sweep's state: a new one, or the one in the folder if it is the same sweep."""
    out = plan.output_dir
    fresh = plan.new_state()
    if not os.path.lexists(out / STATE_FILE):
        if resume:
            raise FileNotFoundError(f"nothing to resume: {out} has no {STATE_FILE}")
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if others:
            raise ValueError(
                f"--output-dir {out} already holds files but no {STATE_FILE} "
                f"({', '.join(others[:5])}); choose another folder for the sweep"
            )
        return fresh
    saved = SweepState.load(out)
    diffs = fresh.differences(saved)
    if diffs:
        raise ValueError(
            f"{out} holds a different sweep ({out / STATE_FILE}): {'; '.join(diffs)}; choose "
            f"another --output-dir, or give the same config, grid and ranking to resume it"
        )
    if [t.overrides for t in saved.trials] != [t.overrides for t in fresh.trials]:
        raise ValueError(f"{out / STATE_FILE}: its trials do not match its grid; refusing it")
    return saved


def run_sweep(
    plan: SweepPlan,
    *,
    jobs: int = 1,
    resume: bool = False,
    retry_failed: bool = False,
    progress: bool = False,
    on_event: Callable[[str], None] | None = None,
    final: bool = True,
) -> SweepResult:
    """Run ``plan``'s trials, choose on validation, run the chosen config once with the test
    split, and write ``sweep.json``, ``sweep.md``, ``sweep.png`` and ``chosen.yaml``.

    Args:
        plan: the sweep (:func:`plan_sweep`).
        jobs: trials run at once, each in a worker process (1: in this process).
        resume: the folder must hold this sweep already (without it, a folder holding the
            same sweep is resumed too, and an empty or missing one starts it).
        retry_failed: run failed trials again (else a resumed sweep keeps their failure).
        progress: show the jobs' progress bars (trials run in this process, and the final
            run).
        on_event: called with a line for each trial started and finished.
        final: run the chosen config with the test split; ``False`` ranks only (no split
            but validation is read; the test numbers come from elsewhere, e.g. a benchmark
            over seeds).

    Raises:
        RunFolderBusyError: another job holds the sweep folder.
        FileNotFoundError: ``resume`` and the folder holds no sweep.
        ValueError: the folder holds another sweep (every difference named) or other files;
            every trial failed (each error named; no final run); ``jobs`` < 1.
        SelectionError: the ranking cannot be computed from the trials' results.
        Exception: what the final run raised (recorded in ``sweep.json`` first).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {jobs!r}")
    out = plan.output_dir
    with lock_run_folder(out, "moracl sweep"):
        state = _open_state(plan, resume)
        state.save(out)
        run = _Sweep(plan, state, progress=progress, on_event=on_event)
        rerun = {TrialStatus.PENDING, TrialStatus.RUNNING}
        if retry_failed:
            rerun.add(TrialStatus.FAILED)
        todo = [t for t in state.trials if t.status in rerun]
        try:
            if jobs == 1 or len(todo) <= 1:
                run.run_in_process(todo)
            else:
                run.run_in_workers(todo, jobs)
        finally:
            write_sweep_report(out, state.to_dict())
        done = [t for t in state.trials if t.status is TrialStatus.DONE]
        if not done:
            errors = "; ".join(f"trial {t.number:03d}: {t.error}" for t in state.trials[:5])
            more = f" (and {len(state.trials) - 5} more)" if len(state.trials) > 5 else ""
            raise ValueError(
                f"every trial of the sweep failed, so there is no final run: {errors}{more}; "
                f"see {out / STATE_FILE}"
            )
        sel = plan.selection
        chosen = min(done, key=lambda t: sel.sort_key(float(t.score or 0.0), t.number))
        result: Any = None
        notes: list[str] = []
        try:
            if final:
                result, notes = run.final_run(chosen)
            run.write_chosen(chosen)
        finally:
            write_sweep_report(out, state.to_dict())
    return SweepResult(out, state, chosen, result, notes)


def sweep(
    config_file: str | os.PathLike[str],
    grid: Iterable[str] | Mapping[str, Sequence[Any]] | SearchSpace,
    *,
    jobs: int = 1,
    resume: bool = False,
    retry_failed: bool = False,
    progress: bool = False,
    on_event: Callable[[str], None] | None = None,
    **options: Any,
) -> SweepResult:
    """:func:`plan_sweep` (``options`` are its keywords) then :func:`run_sweep`."""
    plan = plan_sweep(config_file, grid, **options)
    return run_sweep(
        plan,
        jobs=jobs,
        resume=resume,
        retry_failed=retry_failed,
        progress=progress,
        on_event=on_event,
    )
