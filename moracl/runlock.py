"""One writer per output folder: a lock that a second job cannot take, and that the operating
system releases when its holder dies (even by ``kill -9``), so it never goes stale.

A job locks its ``output_dir`` for as long as it writes there::

    with lock_run_folder(config.output_dir, "moracl run"):
        ...  # train, checkpoint, report

The lock is ``fcntl.flock`` on ``<folder>/.moracl.lock``, which also records the holder (pid,
host, job, command line, start time) so that a refused job can name it. Under ``torchrun``
only the process of rank 0 (the one that writes) takes it. :func:`exclusive_output_dir`
wraps a whole job function: it locks the config's ``output_dir`` and refuses a folder that
already holds an earlier job's results.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

__all__ = [
    "LOCK_FILE",
    "LockHolder",
    "RunFolderBusyError",
    "RunLock",
    "exclusive_output_dir",
    "lock_run_folder",
    "process_rank",
    "refuse_earlier_results",
]

LOCK_FILE = ".moracl.lock"
_ATTEMPTS = 20  # re-tries when a releasing holder removes the lock file under us
_COMMAND_CHARS = 300

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock (as the holder recorded it)."""

    pid: int | None
    host: str
    job: str
    command: str
    started: str

    def describe(self) -> str:
        """``moracl run (pid 123 on host, started 2024-05-01T10:00:00+00:00: moracl run a.yaml)``
        (job, pid, host, start time, command line)."""
        return f"{self.job} (pid {self.pid} on {self.host}, started {self.started}: {self.command})"

    @classmethod
    def parse(cls, text: bytes) -> LockHolder | None:
        """The holder recorded in a lock file's bytes; ``None`` when none is readable (the
        holder has not written it yet)."""
        try:
            data = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        pid = data.get("pid")
        return cls(
            pid=pid if isinstance(pid, int) else None,
            host=str(data.get("host", "?")),
            job=str(data.get("job", "?")),
            command=str(data.get("command", "?")),
            started=str(data.get("started", "?")),
        )


class RunFolderBusyError(ValueError):
    """Another job holds the lock of the folder; ``holder`` names it when it is recorded."""

    def __init__(self, folder: Path, holder: LockHolder | None) -> None:
        who = holder.describe() if holder is not None else "another process (not yet recorded)"
        super().__init__(
            f"{folder} is in use by another job: {who}; wait for it to finish or choose "
            f"another output_dir"
        )
        self.folder = folder
        self.holder = holder


def process_rank() -> int:
    """This process's rank: the process group's when one runs, else ``RANK`` under a
    multi-process launch (``torchrun`` sets it before the group exists), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return 0


def _holder_record(job: str) -> bytes:
    command = shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": job,
        "command": command,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return (json.dumps(record) + "\n").encode("utf-8")


class RunLock:
    """An exclusive, non-blocking lock on ``folder`` (created if missing) for ``job``.

    ``acquire`` either takes the lock at once or raises :class:`RunFolderBusyError` naming the
    holder; ``release`` (or leaving the ``with`` block) removes the lock file, and the folder
    too when this lock created it and nothing else was written there. With ``enabled=False``
    (the processes of rank > 0 under ``torchrun``) it does nothing.
    """

    def __init__(self, folder: str | os.PathLike[str], job: str, *, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.job = job
        self.enabled = enabled
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusyError` (another job holds it) or
        ``ValueError`` (``folder`` is not a folder, or the lock file is a symbolic link)."""
        if not self.enabled or self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output_dir {self.folder} exists and is not a folder")
        self._created = not self.folder.exists()
        for _ in range(_ATTEMPTS):
            self.folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:  # a releasing holder removed the folder: again
                continue
            except OSError as e:  # ELOOP: a symbolic link
                raise ValueError(
                    f"cannot lock {self.folder}: {self.path} is not a regular file ({e.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = LockHolder.parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise RunFolderBusyError(self.folder, holder) from None
            # a releasing holder unlinks the file before unlocking it: the file locked here
            # must still be the one at the path, else another job may lock a new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = _holder_record(self.job)
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise ValueError(f"could not lock {self.folder}: {self.path} keeps being replaced")

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False)):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._created:
            with contextlib.suppress(OSError):  # only when empty: a job refused before writing
                self.folder.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_run_folder(folder: str | os.PathLike[str], job: str) -> RunLock:
    """The lock of ``folder`` for ``job`` (a context manager), taken only by the process of
    rank 0: the one that writes under ``torchrun``."""
    return RunLock(folder, job, enabled=process_rank() == 0)


def refuse_earlier_results(
    folder: str | os.PathLike[str], results: Sequence[str], job: str
) -> None:
    """Raise ``ValueError`` when ``folder`` already holds one of ``results`` (file or folder
    names a job writes), so that a job never overwrites an earlier job's results."""
    root = Path(folder)
    found = [name for name in results if os.path.lexists(root / name)]
    if found:
        raise ValueError(
            f"{root} already holds the results of an earlier job ({', '.join(found)}); "
            f"{job} would overwrite them: choose another output_dir (or remove that folder)"
        )


def exclusive_output_dir(
    job: str, results: Sequence[str]
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a job function whose first argument is a config with an ``output_dir``: the
    folder is locked for the whole call (:func:`lock_run_folder`) and refused, before any
    work, when it already holds one of ``results`` (:func:`refuse_earlier_results`)."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            config: Any = args[0] if args else kwargs.get("config")
            folder = Path(config.output_dir)
            with lock_run_folder(folder, job):
                refuse_earlier_results(folder, results, job)
                return fn(*args, **kwargs)

        return locked

    return decorate
