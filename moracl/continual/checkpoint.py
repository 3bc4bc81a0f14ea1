"""Run checkpoints: after each experience, every strategy's trained tensors (safetensors) and
their state (JSON), every file covered by a checksum, written so that an interruption never
leaves a broken checkpoint behind and read so that nothing unverified is used.

Layout of ``RUN_DIR/checkpoints/``:

- ``exp-<i>/<strategy>.safetensors``: a strategy's tensors after experience ``i`` (its model's
  trained tensors, and each checkpointed plugin's under ``plugins.<state key>.``);
- ``exp-<i>/state.json``: the folder's manifest: ``experience`` (``i``), ``files`` (strategy
  name -> SHA-256 of its safetensors file), ``state`` (per strategy, JSON-able: step counts,
  ``plugins``, each checkpointed plugin's values by its state key)
  and ``meta`` (the run's results so far, with its config);
- ``latest.json``: ``folder`` (``exp-<i>``), ``experience`` and ``state_sha256``, the SHA-256
  of that folder's ``state.json``; replaced atomically once the folder is complete, after
  which older folders are removed.

So every byte a resume reads is checked: ``latest.json`` pins ``state.json``, which pins each
tensor file. Loading refuses, naming the file, anything that does not match: an edited or
missing file, an extra file, a symbolic link anywhere on the way (``checkpoints/``, the
folder, a file), a folder or file name that could lead outside ``checkpoints/``, a folder
whose manifest names another experience. Nothing is deserialised before every check has
passed, and a refused checkpoint is left exactly as it was. Writing refuses non-finite
tensors and numbers before anything touches the disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from moracl.files import (
    UnsafeFileError,
    fsync_path,
    read_regular,
    sha256_bytes,
    sha256_file,
    write_atomic,
)
from moracl.guard import assert_finite, finite_json

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_bytes",
    "sha256_file",
    "tensors_equal",
]

CHECKPOINT_FORMAT = "moracl.continual.checkpoint/4"
STATE_FILE = "state.json"
LATEST_FILE = "latest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a strategy name: no separator, no dot
_FOLDER = re.compile(r"exp-(0|[1-9][0-9]{0,8})")
_SHA = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: the message names the file and what is wrong."""


class Checkpoint:
    """A verified checkpoint: ``experience`` (the last finished), per-strategy ``tensors``
    and ``state`` (JSON-able), the run's ``meta`` (config, results so far), its ``folder``
    and its ``strategies`` (the names of its tensor files).

    ``tensors`` is empty until :meth:`load_tensors` deserialises the verified bytes (which
    :func:`load_checkpoint` does unless told not to), so that a caller can cross-check
    ``state`` and ``meta`` before any tensor is loaded.
    """

    def __init__(
        self,
        experience: int,
        tensors: dict[str, dict[str, Tensor]],
        state: dict[str, Any],
        meta: dict[str, Any],
        folder: Path | None = None,
        blobs: dict[str, bytes] | None = None,
    ) -> None:
        self.experience = experience
        self.tensors = tensors
        self.state = state
        self.meta = meta
        self.folder = folder
        self._blobs = dict(blobs or {})
        self.strategies = sorted(self._blobs or tensors)

    def load_tensors(self) -> dict[str, dict[str, Tensor]]:
        """Deserialise the verified tensor files (once); returns :attr:`tensors`.

        Raises:
            CheckpointError: a file that is not readable safetensors.
        """
        for strategy, blob in self._blobs.items():
            if strategy in self.tensors:
                continue
            try:
                loaded = load_safetensors(blob)
                self.tensors[strategy] = {k: loaded[k] for k in sorted(loaded)}  # a fixed order
            except Exception as e:  # safetensors raises its own error type
                where = self.folder / f"{strategy}.safetensors" if self.folder else strategy
                raise CheckpointError(f"{where} is not a readable safetensors file: {e}") from None
        return self.tensors


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"strategy name {name!r} cannot name a checkpoint file; expected letters, digits, "
            f"'_' or '-' (no path separator, no dot)"
        )
    return name


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    experience: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write the checkpoint after ``experience``; returns its folder.

    Args:
        run_dir: the run folder.
        experience: the experience just finished (0-based).
        tensors: per strategy, named tensors (contiguous copies are written).
        state: per strategy, JSON-able state (plugin counters, class sets, ...).
        meta: run-level JSON-able data (config, results so far).

    Raises:
        NonFiniteError: a tensor or number is NaN or infinite (nothing is written).
        CheckpointError: a strategy name that cannot name a file, or ``checkpoints/`` is a
            symbolic link (nothing is written).
    """
    if isinstance(experience, bool) or not isinstance(experience, int) or experience < 0:
        raise ValueError(f"experience must be an integer >= 0, got {experience!r}")
    for name, named in tensors.items():
        _check_name(name)
        assert_finite(named, f"checkpoint after experience {experience}, strategy {name!r}")
    head = {
        "format": CHECKPOINT_FORMAT,
        "experience": experience,
        "state": dict(state),
        "meta": dict(meta),
    }
    finite_json(head, f"checkpoint after experience {experience}")  # refuse before writing
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink():
        raise CheckpointError(f"{root} is a symbolic link; refusing to write a checkpoint there")
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        files = {}
        for name, named in tensors.items():
            path = scratch / f"{name}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(path))
            files[name] = sha256_file(path)
            fsync_path(path)
        manifest = {**head, "files": files}
        text = finite_json(manifest, f"checkpoint after experience {experience}", indent=1)
        (scratch / STATE_FILE).write_text(text, encoding="utf-8")
        fsync_path(scratch / STATE_FILE)
        state_sha = sha256_file(scratch / STATE_FILE)
        os.chmod(scratch, 0o755)
        fsync_path(scratch)
        final = root / f"exp-{experience}"
        if final.exists():  # left by an interruption between its rename and latest.json
            shutil.rmtree(final)
        scratch.rename(final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    pointer = {
        "format": CHECKPOINT_FORMAT,
        "folder": final.name,
        "experience": experience,
        "state_sha256": state_sha,
    }
    write_atomic(root / LATEST_FILE, finite_json(pointer, str(root / LATEST_FILE), indent=1))
    fsync_path(root)
    for old in root.iterdir():  # older checkpoints, and scratch folders of interrupted saves
        stale = old.name != final.name and old.name.startswith(("exp-", ".tmp-"))
        if stale and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ----------------------------------------------------------------------------------


def _read_regular(path: Path, what: str) -> bytes:
    """The bytes of ``path``, which must be a regular file reached without a symbolic link
    (:func:`moracl.files.read_regular`), or :class:`CheckpointError` naming ``what`` it is."""
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing ({what})") from None
    except UnsafeFileError as e:
        if e.reason == "link":
            raise CheckpointError(
                f"{path} is a symbolic link; a checkpoint's files must be regular files inside "
                f"the run folder"
            ) from None
        raise CheckpointError(f"{e} ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({what}): {e.strerror}") from None


def _real_folder(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a folder that is not a symbolic link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing ({what})") from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(
            f"{path} is a symbolic link; a checkpoint must lie inside the run folder ({what})"
        )
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is not a folder ({what})")


def _json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _format(data: dict[str, Any], path: Path) -> None:
    found = data.get("format")
    if found == CHECKPOINT_FORMAT:
        return
    if found == "moracl.continual.checkpoint/3":
        raise CheckpointError(
            f"{path} was written by an earlier moracl (format {found!r}) whose saved config "
            f"has flat routing keys (experts.router, experts.k, ...) and whose results are keyed "
            f"by display label; resume it with that version, or start a new run in another "
            f"output_dir"
        )
    if found == "moracl.continual.checkpoint/2":
        raise CheckpointError(
            f"{path} was written by an earlier moracl (format {found!r}) whose checkpoints hold "
            f"Avalanche plugin internals instead of each plugin's own state; resume it with "
            f"that version, or start a new run in another output_dir"
        )
    if found == "moracl.continual.checkpoint/1":
        raise CheckpointError(
            f"{path} was written by an earlier moracl (format {found!r}) that did not checksum "
            f"state.json, so it cannot be verified; start a new run in another output_dir"
        )
    raise CheckpointError(
        f"{path}: not a moracl run checkpoint (format {found!r}; expected {CHECKPOINT_FORMAT!r})"
    )


def _experience(value: object, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{path}: {key}={value!r}; expected an integer >= 0")
    return value


def load_checkpoint(run_dir: str | os.PathLike[str], *, tensors: bool = True) -> Checkpoint:
    """Read and verify the newest checkpoint of ``run_dir``.

    Every file is checked (see the module docstring) before anything is deserialised. With
    ``tensors=False`` the tensor files are verified and kept as bytes but not deserialised
    (``Checkpoint.tensors`` is empty until :meth:`Checkpoint.load_tensors`): enough to read
    and cross-check the saved config, results and state first.

    Raises:
        FileNotFoundError: the run has no checkpoint (no ``checkpoints/latest.json``).
        CheckpointError: the checkpoint cannot be trusted (the message names the file and
            what is wrong); nothing is modified.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST_FILE
    if not os.path.lexists(pointer):
        raise FileNotFoundError(f"no checkpoint in {root} (missing {LATEST_FILE})")
    _real_folder(root, "the run's checkpoints")
    latest = _json(_read_regular(pointer, "the pointer to the newest checkpoint"), pointer)
    _format(latest, pointer)
    name = latest.get("folder")
    found = _FOLDER.fullmatch(name) if isinstance(name, str) else None
    if found is None:
        raise CheckpointError(
            f"{pointer}: folder={name!r}; expected the name of a folder of {root} of the form "
            f"'exp-<n>' (no path separator, no '..')"
        )
    number = int(found.group(1))
    if _experience(latest.get("experience"), pointer, "experience") != number:
        raise CheckpointError(
            f"{pointer}: experience={latest.get('experience')!r} but folder={name!r}"
        )
    digest = latest.get("state_sha256")
    if not isinstance(digest, str) or not _SHA.fullmatch(digest):
        raise CheckpointError(f"{pointer}: state_sha256={digest!r}; expected 64 hex digits")
    folder = root / found.group(0)
    _real_folder(folder, f"the checkpoint {pointer.name} names")
    if folder.resolve().parent != root.resolve():
        raise CheckpointError(f"{folder} lies outside {root}")

    state_path = folder / STATE_FILE
    raw = _read_regular(state_path, "the checkpoint's manifest")
    if sha256_bytes(raw) != digest:
        raise CheckpointError(
            f"{state_path} fails its checksum (the SHA-256 recorded in {pointer}): it was "
            f"changed after the run wrote it; refusing to resume from it"
        )
    manifest = _json(raw, state_path)
    _format(manifest, state_path)
    experience = _experience(manifest.get("experience"), state_path, "experience")
    if experience != number:
        raise CheckpointError(f"{state_path}: experience={experience} but the folder is {name!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{state_path}: 'files' must map strategy names to checksums")
    for strategy, sha in files.items():
        try:
            _check_name(strategy)
        except CheckpointError as e:
            raise CheckpointError(f"{state_path}: 'files': {e}") from None
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            raise CheckpointError(
                f"{state_path}: files[{strategy!r}]={sha!r}; expected 64 hex digits"
            )
    for key, kind in (("state", dict), ("meta", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{state_path}: {key!r} must be a JSON object")

    expected = {STATE_FILE, *(f"{s}.safetensors" for s in files)}
    present = {p.name for p in folder.iterdir()}
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise CheckpointError(
            f"{folder} does not hold exactly the files its manifest lists"
            + (f"; unexpected: {extra}" if extra else "")
            + (f"; missing: {missing}" if missing else "")
        )
    blobs: dict[str, bytes] = {}
    for strategy, sha in files.items():
        path = folder / f"{strategy}.safetensors"
        blob = _read_regular(path, f"tensors of {strategy!r}")  # refuses a symbolic link
        if path.resolve().parent != folder.resolve():
            raise CheckpointError(f"{path} lies outside {folder}")
        if sha256_bytes(blob) != sha:
            raise CheckpointError(
                f"corrupt checkpoint: {path} fails its checksum (recorded in {state_path}); "
                f"refusing to resume from it"
            )
        blobs[strategy] = blob
    ckpt = Checkpoint(experience, {}, manifest["state"], manifest["meta"], folder, blobs)
    if tensors:
        ckpt.load_tensors()
    return ckpt


def tensors_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether two named tensor maps hold the same keys and bit-identical values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
