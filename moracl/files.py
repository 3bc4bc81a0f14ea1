"""Writing files so that a reader (or a crash) never sees half of one, and reading them back
without following a symbolic link."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Literal

__all__ = [
    "UnsafeFileError",
    "fsync_path",
    "read_regular",
    "sha256_bytes",
    "sha256_file",
    "sha256_regular",
    "write_atomic",
]

_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

#: why :func:`read_regular` refuses a path, and the default message for each reason
_REFUSALS = {
    "link": "{path} is a symbolic link",
    "special": "{path} is not a regular file",
    "changed": "{path} changed while it was opened; refusing to read it",
}


class UnsafeFileError(ValueError):
    """A path that is not read: a symbolic link (``reason="link"``), not a regular file
    (``"special"``: a folder, a pipe, a device) or replaced while it was opened
    (``"changed"``). Callers that want their own wording map :attr:`reason` to it."""

    def __init__(self, path: str | os.PathLike[str], reason: Literal["link", "special", "changed"]):
        super().__init__(_REFUSALS[reason].format(path=path))
        self.path = path
        self.reason = reason


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a temporary file in the same
    folder, synced to disk, then renamed over ``path``: readers see the old file or the new one,
    never part of either. The folder is created if needed; the file is readable by all
    (mode 0o644)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush ``path`` (a file, or a folder to make the renames into it durable) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, which must be a regular file that is not a symbolic
    link. The type is checked before opening (a pipe is never opened: that could block) and
    again on the descriptor (a file swapped in meanwhile is refused).

    Raises:
        FileNotFoundError: nothing is at ``path``.
        UnsafeFileError: a symbolic link, not a regular file, or replaced meanwhile.
        OSError: ``path`` cannot be opened.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(path, "link")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(path, "special")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(path, "link") from None
        raise
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UnsafeFileError(path, "changed")
    return fd


def _sha256_fd(fd: int, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 (hex) and size of what ``fd`` reads (at most ``limit`` bytes when given)."""
    h, n = hashlib.sha256(), 0
    while limit is None or n < limit:
        chunk = os.read(fd, _CHUNK if limit is None else min(_CHUNK, limit - n))
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, refusing a symbolic link and anything but a regular file (the
    check and the read use one file descriptor). Raises as :func:`_open_regular` does."""
    with os.fdopen(_open_regular(path), "rb") as fh:
        return fh.read()


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    with open(path, "rb") as fh:
        return _sha256_fd(fh.fileno())[0]


def sha256_regular(path: str | os.PathLike[str], limit: int | None = None) -> tuple[str, int]:
    """SHA-256 (hex) and size of ``path`` (of its first ``limit`` bytes when given), refusing
    what :func:`read_regular` refuses, and raising as it does."""
    fd = _open_regular(path)
    try:
        return _sha256_fd(fd, limit)
    finally:
        os.close(fd)
