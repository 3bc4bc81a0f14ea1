"""The checks every job makes before any work, whatever its data: its config's fields again,
its output folder and its device (:func:`check_common`), and a decorator that runs them
first (:func:`check_first`). What depends on the data (a scenario's name, options and
setting; a backbone against a scenario) is checked by the job modules,
:func:`moracl.jobs.check_config` dispatching to each.

Every failure is a ``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from moracl.parse_fields import from_dict, to_dict

__all__ = ["check_common", "check_device", "check_first", "check_output_dir"]

P = ParamSpec("P")
R = TypeVar("R")


def check_common(config: Any, *, device: str | torch.device | None = None) -> None:
    """Check what every job config has, reading no data and building no model:

    - every field again, as :func:`moracl.parse_fields.from_dict` would (types, finite
      floats, ranges, known choices), so a config built or changed in Python is held to the
      YAML rules;
    - the output folder: it can be created or written to (:func:`check_output_dir`);
    - the device, where one is given: it exists on this machine (:func:`check_device`).

    Raises:
        ValueError: the first problem found, naming the key, the value and what is allowed.
        TypeError: ``config`` is not a config dataclass with an ``output_dir``.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a job config (a dataclass), got {type(config).__name__}")
    if not hasattr(config, "output_dir"):
        raise TypeError(f"expected a job config with an output_dir, got {type(config).__name__}")
    from_dict(type(config), to_dict(config))  # every field again
    check_output_dir(config.output_dir)
    if device is not None:
        check_device(device)


def check_first(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a job function whose first argument is its config (``config``): the config
    is checked by :func:`check_common` before anything else runs (a lock or folder the job's
    other decorators take included), with the job's ``device`` keyword when it has one."""

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        config = args[0] if args else kwargs.get("config")
        check_common(config, device=kwargs.get("device"))  # type: ignore[arg-type]
        return fn(*args, **kwargs)

    return checked


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
