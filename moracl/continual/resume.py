"""Resuming a run honestly: a resumed run keeps the config it was started with, and its
checkpoint must agree with itself and with that config before anything of it is used.

- :func:`moracl.jobs.continual.resume_config` gives the config to resume ``RUN_DIR`` with
  (``moracl run --resume``): the saved one (:func:`saved_config`); a config file or
  overrides passed along are accepted where they equal the saved values, applied where a
  change is safe (:data:`SAFE_ON_RESUME`), and refused otherwise, naming each key with the
  saved and the given value.
- :func:`check_resume` cross-checks a verified checkpoint against the run about to continue:
  the same config (up to safe keys and ``output_dir``), a saved config that round-trips
  through :class:`RunConfig`, the same strategies and experiences, accuracy matrices with
  exactly the rows up to the checkpoint's experience, per-strategy state that matches it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moracl.continual.checkpoint import Checkpoint, CheckpointError
from moracl.continual.config import RunConfig
from moracl.continual.metrics import RunResults
from moracl.parse_fields import from_dict, to_dict

__all__ = [
    "SAFE_ON_RESUME",
    "ConfigChange",
    "ResumeConfigError",
    "ResumePlan",
    "check_resume",
    "config_changes",
    "progress_of",
    "saved_config",
]

#: keys a resumed run may change: what the run does at a non-finite step, and how processes
#: exchange gradients (a checkpoint holds no trace of the number of processes). Every other
#: key is refused, among them ``scenario.val_share`` (it changes the training rows) and
#: ``train.early_stopping`` (it changes how each experience trains).
SAFE_ON_RESUME = frozenset({"train.on_nonfinite", "distributed.backend", "distributed.bucket_mb"})


@dataclass(frozen=True)
class ConfigChange:
    """A key whose given value differs from the saved one."""

    key: str
    saved: Any
    given: Any

    @property
    def safe(self) -> bool:
        """Whether a resumed run may take the given value."""
        return self.key in SAFE_ON_RESUME

    def __str__(self) -> str:
        return f"{self.key} (saved {_show(self.saved)}, given {_show(self.given)})"


class ResumeConfigError(ValueError):
    """A resumed run was given values that differ from its saved config."""

    def __init__(self, run_dir: Path, changes: Sequence[ConfigChange]) -> None:
        listed = "; ".join(str(c) for c in changes)
        super().__init__(
            f"{run_dir}: a resumed run keeps the config it was started with, but the given "
            f"config differs in {listed}; leave those values out (or give the saved ones), or "
            f"start a new run in another output_dir"
        )
        self.changes = list(changes)


@dataclass(frozen=True)
class ResumePlan:
    """What ``--resume`` will do: the ``config`` to run, the safe ``applied`` changes, and how
    far the run got (``done`` of ``total`` experiences)."""

    config: RunConfig
    applied: list[ConfigChange]
    done: int
    total: int

    @property
    def finished(self) -> bool:
        """Whether every experience is already trained."""
        return self.done >= self.total


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _plain(data: Any) -> Any:
    """``data`` as JSON sees it (tuples as lists, enums as values)."""
    return json.loads(json.dumps(to_dict(data)))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_changes(saved: RunConfig, given: RunConfig) -> list[ConfigChange]:
    """Every key (dotted) whose value differs between two run configs, ``output_dir`` left
    out (a resumed run is where its folder is)."""
    a, b = _flatten(_plain(saved)), _flatten(_plain(given))
    a.pop("output_dir", None)
    b.pop("output_dir", None)
    keys = list(a) + [k for k in b if k not in a]
    return [
        ConfigChange(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in keys
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def saved_config(ckpt: Checkpoint, run_dir: str | os.PathLike[str]) -> RunConfig:
    """The config a checkpoint's run was started with, its ``output_dir`` set to ``run_dir``.

    A config saved before runs held out validation splits has no ``scenario.val_share``:
    its run trained on every row, so it is read as ``scenario.val_share=0``.

    Raises:
        CheckpointError: the saved config is missing, invalid, or does not round-trip (a
            saved key that the typed config would read differently).
    """
    where = ckpt.folder / "state.json" if ckpt.folder is not None else Path(run_dir)
    results = ckpt.meta.get("results")
    data = results.get("config") if isinstance(results, dict) else None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: no saved run config under meta.results.config")
    scenario = data.get("scenario")
    if isinstance(scenario, dict) and "val_share" not in scenario:
        data = {**data, "scenario": {**scenario, "val_share": 0.0}}
    try:
        config = from_dict(RunConfig, data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved config is not a valid run config: {e}") from None
    back = _flatten(_plain(config))
    differ = [k for k, v in _flatten(_plain(data)).items() if back.get(k, _ABSENT) != v]
    if differ:
        raise CheckpointError(
            f"{where}: the saved config does not round-trip through the run config at "
            f"{differ}; refusing to resume from it"
        )
    return replace(config, output_dir=str(run_dir))


def progress_of(ckpt: Checkpoint) -> tuple[int, int]:
    """``(done, total)``: the experiences a checkpoint's run has trained, of its stream's."""
    results = ckpt.meta.get("results")
    experiences = results.get("experiences") if isinstance(results, dict) else None
    if not isinstance(experiences, list) or not experiences:
        where = ckpt.folder / "state.json" if ckpt.folder is not None else "checkpoint"
        raise CheckpointError(f"{where}: no list of experiences under meta.results")
    return ckpt.experience + 1, len(experiences)


def _fail(ckpt: Checkpoint, message: str) -> CheckpointError:
    where = ckpt.folder / "state.json" if ckpt.folder is not None else "checkpoint"
    return CheckpointError(f"{where}: {message}; refusing to resume from it")


def check_resume(
    ckpt: Checkpoint,
    config: RunConfig,
    strategies: Mapping[str, str],
    experiences: Sequence[str] | None = None,
) -> RunResults:
    """Cross-check a verified checkpoint against the run about to continue from it; returns
    its results so far.

    Args:
        ckpt: the checkpoint (from :func:`load_checkpoint`).
        config: the run's config; it must equal the saved one up to ``output_dir`` and the
            keys of :data:`SAFE_ON_RESUME`.
        strategies: the run's strategies, registry name (the key of the saved results) ->
            display label for messages (``{"naive": "Naive"}``).
        experiences: the stream's experience names, when the stream is built.

    Raises:
        ResumeConfigError: ``config`` differs from the saved config.
        CheckpointError: the checkpoint disagrees with itself or with the run.
    """
    saved = saved_config(ckpt, config.output_dir)
    refused = [c for c in config_changes(saved, config) if not c.safe]
    if refused:
        raise ResumeConfigError(Path(config.output_dir), refused)
    try:
        results = RunResults.from_dict(ckpt.meta["results"])
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(ckpt, f"the saved results are not readable ({e})") from None
    t = len(results.experiences)
    if experiences is not None and list(experiences) != results.experiences:
        raise _fail(
            ckpt, f"experiences {results.experiences} but the stream has {list(experiences)}"
        )
    if ckpt.experience >= t:
        raise _fail(ckpt, f"experience {ckpt.experience} but the stream has {t} experiences")
    names = set(strategies)
    for kind, found in (("tensors", set(ckpt.strategies)), ("state", set(ckpt.state))):
        if found != names:
            raise _fail(ckpt, f"{kind} of strategies {sorted(found)}; the run has {sorted(names)}")
    if set(results.strategies) != names:
        raise _fail(
            ckpt, f"results of strategies {sorted(results.strategies)}; expected {sorted(names)}"
        )
    last = ckpt.experience
    held_out = saved.scenario.val_share > 0
    for name, label in strategies.items():
        result = results.strategies[name]
        rows = list(range(last + 1))
        if name == "joint":  # trained once, on the whole stream, at the last experience
            rows = [t - 1] if last == t - 1 else []
        for what, matrix, expected in (
            ("", result.matrix, results.test_evaluated),
            ("validation ", result.validation, held_out),
        ):
            if (matrix is not None) != expected:
                has = "has" if matrix is not None else "lacks"
                kind = what or "test "
                raise _fail(ckpt, f"the results of {label!r} {has} a {kind}accuracy matrix")
            if matrix is None:
                continue
            measured = [i for i in range(t) if not all(math.isnan(x) for x in matrix.R[i])]
            if measured != rows or not all(math.isfinite(x) for i in rows for x in matrix.R[i]):
                raise _fail(
                    ckpt,
                    f"the {what}accuracy matrix of {label!r} has rows {measured}; a run "
                    f"checkpointed after experience {last} has the complete rows {rows}",
                )
            if not all(math.isfinite(x) for x in matrix.b):
                raise _fail(ckpt, f"the initial {what}accuracies of {label!r} are incomplete")
        stopped = [r.experience for r in result.early_stopping]
        if stopped != (rows if saved.train.early_stopping is not None else []):
            raise _fail(
                ckpt,
                f"the early-stopping records of {label!r} cover experiences {stopped}; a run "
                f"checkpointed after experience {last} has "
                f"{rows if saved.train.early_stopping is not None else []}",
            )
        state = ckpt.state[name]
        if not isinstance(state, dict):
            raise _fail(ckpt, f"state of {name!r} is not an object")
        epts = state.get("experts_per_token")
        if epts is not None and (
            isinstance(epts, bool) or not isinstance(epts, (int, float)) or not math.isfinite(epts)
        ):
            raise _fail(ckpt, f"{name}.experts_per_token={epts!r}; expected a number or null")
        _check_strategy_state(ckpt, name, state, last)
    return results


def _check_strategy_state(ckpt: Checkpoint, name: str, state: dict[str, Any], last: int) -> None:
    """The state a strategy must carry after experience ``last``: its step counts, its
    plugins' states (as objects), moracl's grown experiences and LwF's experience count."""
    for key in ("steps", "skipped_steps"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(ckpt, f"{name}.{key}={value!r}; expected an integer >= 0")
    plugins = state.get("plugins")
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise _fail(ckpt, f"{name}.plugins must map plugin names to their state (objects)")
    if name == "moracl":
        prepared = state.get("experiences_prepared")
        if prepared != last + 1 or isinstance(prepared, bool):
            raise _fail(
                ckpt,
                f"moracl.experiences_prepared={prepared!r}; a run checkpointed after experience "
                f"{last} has {last + 1}",
            )
    if name == "lwf":
        lwf = plugins.get("lwf")
        if lwf is None:
            raise _fail(ckpt, "the state of 'lwf' lacks its LwF plugin state (plugins.lwf)")
        count = lwf.get("expcount")
        if count != last + 1 or isinstance(count, bool):
            raise _fail(
                ckpt,
                f"lwf.expcount={count!r}; a run checkpointed after experience {last} has "
                f"{last + 1}",
            )
        classes = lwf.get("classes")
        if not isinstance(classes, dict) or not all(
            isinstance(v, list) and all(isinstance(c, int) for c in v) for v in classes.values()
        ):
            raise _fail(ckpt, "lwf.classes must map task ids to lists of class ids")
