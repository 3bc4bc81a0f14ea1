"""Run checkpoints: after each experience, every strategy's trained tensors (safetensors) and
a JSON manifest with their SHA-256, written so that an interruption never leaves a broken
checkpoint behind.

Layout of ``RUN_DIR``: ``checkpoints/exp-<i>/`` holds ``<strategy>.safetensors`` and
``state.json``; ``checkpoints/latest.json`` names the newest complete folder and is replaced
atomically after that folder is complete, then older folders are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "moracl.continual.checkpoint/1"


class Checkpoint:
    """A loaded checkpoint: ``experience`` (the last finished), per-strategy ``tensors`` and
    ``state`` (JSON-able), and the run's ``meta`` (config, results so far)."""

    def __init__(
        self,
        experience: int,
        tensors: dict[str, dict[str, Tensor]],
        state: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        self.experience = experience
        self.tensors = tensors
        self.state = state
        self.meta = meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        files = {}
        for name, named in tensors.items():
            path = scratch / f"{name}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(path))
            files[name] = _sha256(path)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "experience": experience,
            "files": files,
            "state": dict(state),
            "meta": dict(meta),
        }
        (scratch / "state.json").write_text(json.dumps(manifest, indent=1))
        final = root / f"exp-{experience}"
        if final.exists():
            shutil.rmtree(final)
        scratch.rename(final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _write_json_atomic(root / "latest.json", {"format": CHECKPOINT_FORMAT, "folder": final.name})
    for old in root.glob("exp-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify the newest checkpoint of ``run_dir``.

    Raises:
        FileNotFoundError: the run has no checkpoint.
        ValueError: the checkpoint is corrupt (unreadable manifest, missing file, checksum
            mismatch); nothing is modified.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {root} (missing {pointer.name})")
    try:
        folder = root / json.loads(pointer.read_text())["folder"]
        manifest = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint in {root}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{folder / 'state.json'}: not a moracl run checkpoint (expected format "
            f"{CHECKPOINT_FORMAT!r})"
        )
    tensors: dict[str, dict[str, Tensor]] = {}
    for name, digest in manifest["files"].items():
        path = folder / f"{name}.safetensors"
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"corrupt checkpoint: {path} is missing or fails its checksum")
        tensors[name] = load_file(str(path))
    return Checkpoint(int(manifest["experience"]), tensors, manifest["state"], manifest["meta"])


def tensors_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether two named tensor maps hold the same keys and bit-identical values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
