"""One validation pass before any work: what ``moracl validate`` checks and what every job
(``run``, ``finetune``, ``meta``) checks first, so that ``validate`` accepts exactly what the
jobs accept and a bad config fails in a second, not after an hour of training.

    check_config(load_config("configs/split_fashion.yaml"), device="cpu")

:func:`check_config` checks, reading no data and building no model:

- every field again, as :func:`moracl.config.from_dict` would (types, finite floats, ranges,
  known choices), so a config built or changed in Python is held to the YAML rules;
- the scenario: its name, its options (names and values) and, for a continual run, the
  setting (one the scenario supports; its default when none is given), through the
  scenario registries' own checks (:func:`moracl_scenarios.streams.check_scenario`,
  :func:`moracl_scenarios.fewshot.check_fewshot`), which the builders run too;
- the rules that tie fields together and that the jobs enforce where they build their parts:
  moracl's routing against the run's setting (:func:`moracl.continual.config.check_routing`),
  the backbone against the scenario;
- the output folder: it can be created or written to (:func:`check_output_dir`);
- the device, where one is given: it exists on this machine (:func:`check_device`).

What only the data or the model can tell stays with the job: whether a scenario has enough
examples for the sizes asked for, whether ``target_modules`` name layers of the backbone and
whether an adapter's rank fits them.

Every failure is a ``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from moracl.config import FinetuneConfig, MetaConfig, from_dict, to_dict
from moracl.continual.config import RunConfig, check_routing

__all__ = [
    "FINETUNE_BACKBONES",
    "FINETUNE_SCENARIOS",
    "check_config",
    "check_device",
    "check_first",
    "check_output_dir",
]

P = ParamSpec("P")
R = TypeVar("R")

#: the scenarios and backbones ``moracl finetune`` knows (see :mod:`moracl.finetune`)
FINETUNE_SCENARIOS = ("wordnet-categories",)
FINETUNE_BACKBONES = ("minilm",)


def check_config(config: Any, *, device: str | torch.device | None = None) -> None:
    """Check ``config`` (a run, finetune or meta config) as its job does before any work.

    Args:
        config: a :class:`~moracl.continual.config.RunConfig`,
            :class:`~moracl.config.FinetuneConfig` or :class:`~moracl.config.MetaConfig`.
        device: the device the job will use (``cpu``, ``cuda``, ``cuda:N``); ``None``: not
            checked.

    Raises:
        ValueError: the first problem found, naming the key, the value and what is allowed.
        TypeError: ``config`` is not one of the job configs.
    """
    if not isinstance(config, (RunConfig, FinetuneConfig, MetaConfig)):
        raise TypeError(
            f"expected a RunConfig, FinetuneConfig or MetaConfig, got {type(config).__name__}"
        )
    # every field again: a config built or changed in Python meets the YAML rules
    from_dict(type(config), to_dict(config))
    if isinstance(config, RunConfig):
        _check_run(config)
    elif isinstance(config, FinetuneConfig):
        _check_finetune(config)
    else:
        _check_meta(config)
    check_output_dir(config.output_dir)
    if device is not None:
        check_device(device)


def check_first(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a job function whose first argument is its config (``config``): the config
    is checked by :func:`check_config` before anything else runs (a lock or folder the job's
    other decorators take included), with the job's ``device`` keyword when it has one."""

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        config = args[0] if args else kwargs.get("config")
        check_config(config, device=kwargs.get("device"))  # type: ignore[arg-type]
        return fn(*args, **kwargs)

    return checked


def _check_run(config: RunConfig) -> None:
    import moracl_scenarios  # noqa: F401  (registers the streams)
    from moracl_scenarios.streams import Setting, check_scenario

    sc = config.scenario
    try:
        setting = check_scenario(sc.name, sc.setting, sc.options)
    except ValueError as e:
        raise ValueError(f"scenario: {e}") from None
    if setting is not None:  # (a scenario without a spec: its builder decides)
        check_routing(config, task_aware=setting is Setting.TASK)


def _check_finetune(config: FinetuneConfig) -> None:
    d = config.data
    if d.scenario not in FINETUNE_SCENARIOS:
        raise ValueError(
            f"data.scenario={d.scenario!r} is not a finetune scenario; expected one of "
            f"{list(FINETUNE_SCENARIOS)}"
        )
    if config.backbone not in FINETUNE_BACKBONES:
        raise ValueError(
            f"backbone={config.backbone!r} is not a finetune backbone; expected one of "
            f"{list(FINETUNE_BACKBONES)}"
        )
    from moracl_scenarios.wordnet import LEXNAMES

    if len(set(d.categories)) < 2 or len(set(d.categories)) != len(d.categories):
        raise ValueError(
            f"data.categories must name at least 2 distinct classes, got {d.categories!r}"
        )
    unknown = [c for c in d.categories if c not in LEXNAMES]
    if unknown:
        raise ValueError(
            f"data.categories: unknown WordNet categories {unknown}; expected names among "
            f"{list(LEXNAMES)}"
        )


def _check_meta(config: MetaConfig) -> None:
    import moracl_scenarios  # noqa: F401  (registers the few-shot scenarios)
    from moracl_scenarios.fewshot import check_fewshot

    from moracl.meta.run import _BACKBONES  # the table meta_learn checks against

    d = config.data
    try:
        check_fewshot(d.scenario, d.options)
    except ValueError as e:
        raise ValueError(f"data: {e}") from None
    expected = _BACKBONES.get(d.scenario)
    if expected is not None and config.backbone != expected:
        raise ValueError(
            f"scenario {d.scenario!r} uses the backbone {expected!r}, "
            f"got backbone={config.backbone!r}"
        )


def check_output_dir(path: Any, what: str = "output_dir") -> Path:
    """``path`` as a ``Path``, if a job can write its outputs there: an existing folder it may
    write in, or a path whose nearest existing ancestor is such a folder (the job creates
    the rest). Checked by creating and removing a temporary file, so nothing is left behind
    and nothing is created.

    Raises:
        ValueError: ``path`` is empty, exists and is not a folder (a file, ``/dev/null``), lies
            under a file, is a broken link, or cannot be written to (read-only, no
            permission), naming ``what``, the path and why.
    """
    if isinstance(path, Path):
        text = str(path)
    elif isinstance(path, str):
        text = path
    else:
        raise ValueError(f"{what} must be a folder path, got {path!r}")
    if not text.strip():
        raise ValueError(f"{what} is empty; name the folder the job writes to (e.g. out/run)")
    if "\0" in text:
        raise ValueError(f"{what}={text!r} holds a null character; expected a folder path")
    p = Path(text)
    try:
        problem = _unwritable(p)
    except OSError as e:  # e.g. a name too long, a loop of links
        problem = f"is not usable: {e.strerror or e}"
    except ValueError as e:  # e.g. an embedded null byte
        problem = f"is not a usable path: {e}"
    if problem:
        raise ValueError(f"{what}={text!r} {problem}")
    return p


def _unwritable(path: Path) -> str | None:
    """Why a job cannot write into ``path`` (``None``: it can)."""
    if os.path.lexists(path) and not path.is_dir():
        kind = "a broken link" if path.is_symlink() and not path.exists() else "not a folder"
        return f"exists and is {kind}; expected a folder"
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {str(probe)!r} is not a folder"
    try:
        longest = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not every system tells
        longest = 255
    missing = path.relative_to(probe).parts if probe != path else ()
    too_long = [part for part in missing if len(os.fsencode(part)) > longest]
    if too_long:
        return f"cannot be created: a name is longer than {longest} bytes ({too_long[0][:40]}...)"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".moracl-write-check-")
    except OSError as e:
        return f"is not writable: cannot write in {str(probe)!r} ({e.strerror or e})"
    os.close(fd)
    os.unlink(tmp)
    return None


def check_device(device: Any, what: str = "--device") -> torch.device:
    """``device`` as a ``torch.device`` if moracl can train on it here: ``cpu``, or ``cuda`` /
    ``cuda:N`` when CUDA is available and has a device ``N``.

    Raises:
        ValueError: not a device name, a device type moracl does not train on, or a CUDA
            device this machine does not have, naming ``what`` and the value.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        if not isinstance(device, str) or not device.strip():
            raise ValueError(f"{what}={device!r} is not a device; expected cpu, cuda or cuda:N")
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(
                f"{what}={device!r} is not a device; expected cpu, cuda or cuda:N"
            ) from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ValueError(f"{what}={device!r}: expected cpu, cuda or cuda:N")
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{what}={device!r}: moracl trains on cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{what}={device!r}: CUDA is not available on this machine; use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{what}={device!r}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    return dev
