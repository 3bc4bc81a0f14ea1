"""Planning a sweep (``moracl sweep``): the base config, the grid, the search, the ranking
and every trial's config, checked before any work (:func:`plan_sweep`, giving a
:class:`SweepPlan`; :func:`moracl.jobs.sweep.run_sweep` runs it).
"""

from __future__ import annotations

import os
import shlex
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moracl.config import JOBS, ConfigNote, apply_overrides, from_dict, parse_yaml, to_dict
from moracl.jobs.sweep_kinds import SWEEP_JOBS, Selection, SelectionRequest, SweepJob
from moracl.jobs.sweep_space import (
    SearchSpace,
    check_key,
    format_override,
    overrides_text,
)
from moracl.jobs.sweep_state import SweepState, TrialRecord
from moracl.preflight import check_output_dir

__all__ = ["SweepPlan", "plan_sweep"]


@dataclass(frozen=True)
class SweepPlan:
    """A sweep, checked and ready to run (:func:`plan_sweep` builds it).

    Attributes:
        job_name: the config's job (``run``, ``finetune``, ``meta``, or a registered one).
        job: its :class:`~moracl.jobs.sweep_kinds.SweepJob`.
        config_file: the base config.
        base_data: the config file's mapping with the fixed overrides applied.
        base_config: that mapping built as the job's config.
        space: the swept keys and values.
        trials: ``None`` for a grid search, else the number of combinations drawn.
        seed: the seed of a random search.
        sets: the fixed ``key=value`` overrides of every trial.
        output_dir: the sweep folder.
        selection: how trials are ranked.
        device: where trials run (continual runs).
        combinations: each trial's overrides, in trial order.
    """

    job_name: str
    job: SweepJob
    config_file: Path
    base_data: dict[str, Any]
    base_config: Any
    space: SearchSpace
    trials: int | None
    seed: int
    sets: tuple[str, ...]
    output_dir: Path
    selection: Selection
    device: str
    combinations: tuple[dict[str, Any], ...]

    def config_for(self, overrides: Mapping[str, Any], folder: str | os.PathLike[str]) -> Any:
        """The config of a trial: the base with ``overrides`` applied, writing to ``folder``."""
        with warnings.catch_warnings():  # a swept kind drops the old kind's keys, as a
            warnings.simplefilter("ignore", ConfigNote)  # command-line override does
            data = apply_overrides(
                self.base_data, [format_override(k, v) for k, v in overrides.items()]
            )
        data["output_dir"] = str(folder)
        return from_dict(JOBS.get(self.job_name), data)

    def command(self) -> str:
        """The ``moracl sweep`` command line of this sweep."""
        parts = ["moracl", "sweep", str(self.config_file), "--grid"]
        parts += [
            f"{k}=" + ",".join(_value_text(v) for v in values)
            for k, values in self.space.grid.items()
        ]
        if self.trials is not None:
            parts += ["--trials", str(self.trials), "--seed", str(self.seed)]
        sel = self.selection
        parts += ["--metric", sel.metric]
        if sel.strategy is not None:
            parts += ["--strategy", sel.strategy]
        if sel.select_experiences is not None:
            parts += ["--select-experiences", str(sel.select_experiences)]
        if self.sets:
            parts += ["--set", *self.sets]
        if self.device != "cpu":
            parts += ["--device", self.device]
        parts += ["--output-dir", str(self.output_dir)]
        return shlex.join(parts)

    def new_state(self) -> SweepState:
        """The state of this sweep before any trial ran."""
        return SweepState(
            job=self.job_name,
            config_file=str(self.config_file),
            base_config=to_dict(self.base_config),
            sets=list(self.sets),
            grid=self.space.to_dict(),
            search={"trials": self.trials, "seed": self.seed if self.trials is not None else None},
            selection=self.selection.to_dict(),
            command=self.command(),
            sweep_dir=str(self.output_dir),
            trials=[TrialRecord(i, dict(c)) for i, c in enumerate(self.combinations)],
        )


def _value_text(value: Any) -> str:
    return format_override("k", value)[2:]


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def plan_sweep(
    config_file: str | os.PathLike[str],
    grid: Iterable[str] | Mapping[str, Sequence[Any]] | SearchSpace,
    *,
    trials: int | None = None,
    seed: int = 0,
    sets: Sequence[str] = (),
    output_dir: str | os.PathLike[str] | None = None,
    metric: str | None = None,
    strategy: str | None = None,
    select_experiences: int | None = None,
    device: str = "cpu",
) -> SweepPlan:
    """Check a sweep before any work: the config, the grid, the search, the ranking and the
    config of every trial (as ``moracl validate`` checks a config, reading no data).

    Args:
        config_file: a YAML config whose job is ``finetune``, ``meta`` or ``run`` (or one
            registered in :data:`~moracl.jobs.sweep_kinds.SWEEP_JOBS`).
        grid: ``key=v1,v2,...`` items (values parsed as YAML), a mapping of keys to values,
            or a :class:`~moracl.jobs.sweep_space.SearchSpace`.
        trials: ``None``: every combination (grid search); ``N``: ``N`` distinct
            combinations drawn with ``seed`` (random search).
        seed: the seed of a random search.
        sets: fixed ``key=value`` overrides applied to every trial.
        output_dir: the sweep folder (default: the config's ``output_dir`` + ``-sweep``).
        metric: what to rank by (default: the job's validation accuracy; for continual runs
            one of :data:`~moracl.jobs.sweep_kinds.RUN_METRICS`).
        strategy: the continual strategy ranked (default: the config's first).
        select_experiences: continual runs: trials run experiences ``0..K-1`` and are ranked
            on those ``K``.
        device: where continual runs train.

    Raises:
        FileNotFoundError: no such config file.
        ValueError: naming the bad value: a config the job refuses, a job a sweep cannot run,
            a malformed grid item, a key not in the config, an empty value list, more trials
            than combinations, a ranking the job cannot compute, a trial config the job
            would refuse.
    """
    path = Path(config_file)
    sets = tuple(sets)
    data = apply_overrides(_read_mapping(path), sets)
    job_name = data.get("job")
    if not isinstance(job_name, str) or job_name not in SWEEP_JOBS:
        raise ValueError(
            f"{path}: moracl sweep runs configs whose job is one of {SWEEP_JOBS.names()}, "
            f"got job={job_name!r}"
        )
    job = SWEEP_JOBS.get(job_name)
    base_config: Any = from_dict(JOBS.get(job_name), data)
    if isinstance(grid, SearchSpace):
        space = grid
    elif isinstance(grid, Mapping):
        space = SearchSpace({str(k): tuple(v) for k, v in grid.items()})
    else:
        space = SearchSpace.parse(grid)
    fixed = {item.partition("=")[0].strip() for item in sets}
    for key in space.keys:
        if key in fixed:
            raise ValueError(f"--grid key {key!r} is also fixed by --set; give it in one place")
        check_key(base_config, key)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    combos = space.draw(trials, seed)
    request = SelectionRequest(metric, strategy, select_experiences)
    selection = job.select(base_config, request)
    if not job.devices and device != "cpu":
        raise ValueError(f"--device {device!r}: {job.command} runs on the CPU; expected cpu")
    if output_dir is None:
        base_out = Path(base_config.output_dir)
        output_dir = base_out.with_name(base_out.name + "-sweep")
    out = check_output_dir(os.fspath(output_dir), "--output-dir")
    plan = SweepPlan(
        job_name=job_name,
        job=job,
        config_file=path,
        base_data=data,
        base_config=base_config,
        space=space,
        trials=trials,
        seed=seed,
        sets=sets,
        output_dir=out,
        selection=selection,
        device=device,
        combinations=tuple(combos),
    )
    for i, combo in enumerate(combos):
        record = TrialRecord(i, combo)
        try:
            job.check(plan.config_for(combo, out / record.folder))
        except ValueError as e:
            raise ValueError(f"trial {i:03d} ({overrides_text(combo)}): {e}") from None
    return plan
