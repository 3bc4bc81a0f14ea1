"""The run folder's own checksum manifest: ``RUN_DIR/manifest.json`` lists every output a run
writes outside its checkpoints (``metrics.json``, ``report.md``, ``plots/``, ``logs/``,
``tensorboard/``) with its SHA-256 and size, so that a reader can tell whether a file changed
after the run wrote it. (The checkpoints carry their own checksums,
:mod:`moracl.continual.checkpoint`.)

The run rewrites the manifest after each checkpoint and at the end. Logs only grow (a run
interrupted after its last checkpoint, then resumed, appends to them), so a log file is
checked on the bytes the manifest saw, and new event files are allowed; every other file
must match exactly.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moracl.continual.metrics import METRICS_FILE
from moracl.files import UnsafeFileError, sha256_regular, write_atomic
from moracl.guard import finite_json

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "ManifestCheck",
    "RunManifestError",
    "verify_run_manifest",
    "write_run_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "moracl.run.manifest/1"
_OUTPUT_FILES = (METRICS_FILE, "report.md")
_OUTPUT_DIRS = ("plots", "logs", "tensorboard")
_APPEND_ONLY = ("logs", "tensorboard")  # written by appending: checked on a prefix
_DERIVED = ("report.md", "plots")  # rebuilt from metrics.json by ``moracl report``
_SHA = re.compile(r"[0-9a-f]{64}")


class RunManifestError(ValueError):
    """A run folder's output that changed (or vanished) after the run wrote it, or a manifest
    that cannot be read; the message names the files."""


@dataclass
class ManifestCheck:
    """The outcome of :func:`verify_run_manifest`: whether a manifest was there, and the
    derived files (``report.md``, ``plots/``) that differ from it (they are rebuilt from
    ``metrics.json``, so they are reported rather than refused)."""

    verified: bool
    derived_changed: list[str] = field(default_factory=list)


def _top(rel: str) -> str:
    return rel.split("/", 1)[0]


def _outputs(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of every output file of the run in ``root``; hidden
    files (temporary files of atomic writes) are left out; a symbolic link is refused."""
    for name in _OUTPUT_FILES:
        path = root / name
        if os.path.lexists(path):
            _no_link(path, root)
            yield name, path
    for top in _OUTPUT_DIRS:
        base = root / top
        if not os.path.lexists(base):
            continue
        _no_link(base, root)
        for folder, dirs, files in os.walk(base):
            here = Path(folder)
            for d in list(dirs):
                _no_link(here / d, root)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith("."):
                    continue
                path = here / f
                _no_link(path, root)
                yield path.relative_to(root).as_posix(), path


def _no_link(path: Path, root: Path) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise RunManifestError(
            f"{path} is a symbolic link; the outputs of the run in {root} must be its own files"
        )


def _digest(path: Path, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 and size of ``path`` (of its first ``limit`` bytes when given), read without
    following a symbolic link (:func:`moracl.files.sha256_regular`)."""
    try:
        return sha256_regular(path, limit)
    except UnsafeFileError as e:
        raise RunManifestError(str(e)) from None


def write_run_manifest(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/manifest.json`` (atomically) over the run's outputs as they are now;
    returns its path."""
    root = Path(run_dir)
    files = {}
    for rel, path in _outputs(root):
        sha, size = _digest(path)
        entry: dict[str, object] = {"sha256": sha, "bytes": size}
        if _top(rel) in _APPEND_ONLY:
            entry["append"] = True
        files[rel] = entry
    data = {"format": MANIFEST_FORMAT, "files": files}
    path = root / MANIFEST_FILE
    write_atomic(path, finite_json(data, str(path), indent=1) + "\n")
    return path


def _safe_rel(rel: object, manifest: Path) -> str:
    """A manifest entry's path: relative, inside one of the run's output places."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        raise RunManifestError(f"{manifest}: entry {rel!r} is not a relative path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RunManifestError(f"{manifest}: entry {rel!r} leads outside the run folder")
    if not (rel in _OUTPUT_FILES or (len(parts) > 1 and parts[0] in _OUTPUT_DIRS)):
        raise RunManifestError(
            f"{manifest}: entry {rel!r} is not an output of a run "
            f"({', '.join(_OUTPUT_FILES)}, or a file under {', '.join(_OUTPUT_DIRS)})"
        )
    return rel


def _read_manifest(root: Path) -> dict[str, dict[str, object]] | None:
    path = root / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    _no_link(path, root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunManifestError(f"{path} is not readable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise RunManifestError(f"{path}: not a run manifest (expected format {MANIFEST_FORMAT!r})")
    files = data.get("files")
    if not isinstance(files, dict):
        raise RunManifestError(f"{path}: 'files' must be an object")
    out = {}
    for rel, entry in files.items():
        rel = _safe_rel(rel, path)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA.fullmatch(str(entry.get("sha256")))
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise RunManifestError(f"{path}: entry {rel!r} must have 'sha256' and 'bytes'")
        out[rel] = entry
    return out


def _changed(root: Path, rel: str, entry: dict[str, object]) -> str | None:
    """Why ``rel`` does not match its entry (``None`` when it does)."""
    path = root / rel
    for parent in reversed(path.relative_to(root).parents):
        if str(parent) != "." and os.path.lexists(root / parent):
            _no_link(root / parent, root)
    if not os.path.lexists(path):
        return f"{rel} is missing"
    size = int(entry["bytes"])  # type: ignore[call-overload]
    append = entry.get("append") is True
    sha, n = _digest(path, size if append else None)
    if append and n < size:
        return f"{rel} is shorter than the run wrote it ({n} of {size} bytes)"
    if sha != entry["sha256"] or (not append and n != size):
        return f"{rel} changed after the run wrote it" + (
            " (its first bytes differ)" if append else ""
        )
    return None


def verify_run_manifest(
    run_dir: str | os.PathLike[str], *, append_only: bool = False
) -> ManifestCheck:
    """Check the run's outputs against ``run_dir/manifest.json``.

    Args:
        run_dir: the run folder.
        append_only: check only the logs (what a resumed run appends to).

    Returns:
        ``verified=False`` when the folder has no manifest (a run of an earlier moracl, or
        results saved by hand); else the derived files that differ (to be rebuilt).

    Raises:
        RunManifestError: ``metrics.json`` or a log changed, vanished or is a symbolic link,
            or the manifest is unreadable (naming each file); nothing is modified.
    """
    root = Path(run_dir)
    entries = _read_manifest(root)
    if entries is None:
        return ManifestCheck(verified=False)
    problems: list[str] = []
    derived: list[str] = []
    if not append_only and METRICS_FILE not in entries and os.path.lexists(root / METRICS_FILE):
        problems.append(f"{METRICS_FILE} is not listed")
    for rel, entry in entries.items():
        top = _top(rel)
        if append_only and top not in _APPEND_ONLY:
            continue
        why = _changed(root, rel, entry)
        if why is None:
            continue
        (derived if top in _DERIVED else problems).append(why)
    if problems:
        raise RunManifestError(
            f"{root}: {'; '.join(problems)} (checked against {MANIFEST_FILE}); refusing to "
            f"trust the run's results"
        )
    return ManifestCheck(verified=True, derived_changed=derived)
