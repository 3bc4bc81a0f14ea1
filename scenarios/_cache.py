"""The on-disk cache of ``scenarios``: small arrays and pretrained weights as safetensors.

Everything lives under ``$MORACL_CACHE`` (default ``~/.cache/moracl``), one sub-folder per
kind of content. Files are written atomically (a temporary file or folder in the same
directory, then a rename), so a reader sees a complete entry or none; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save

from moracl.files import write_atomic

__all__ = [
    "array_digest",
    "cache_home",
    "cache_root",
    "cached_arrays",
    "json_digest",
    "publish_folder",
    "read_header",
]


def cache_home() -> Path:
    """The one cache root: ``$MORACL_CACHE``, else ``~/.cache/moracl``."""
    return Path(os.environ.get("MORACL_CACHE") or "~/.cache/moracl").expanduser()


def cache_root(kind: str, cache_dir: str | Path | None = None) -> Path:
    """The folder for ``kind`` (e.g. ``"backbones"``): ``cache_dir`` if given, else
    ``$MORACL_CACHE/<kind>``, else ``~/.cache/moracl/<kind>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_home() / kind


def json_digest(obj: object, length: int = 16) -> str:
    """A short sha256 hex digest of ``obj``'s canonical JSON (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 hex digest of the dtypes, shapes and bytes of ``arrays`` (in order)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_arrays(
    path: Path, build: Callable[[], Mapping[str, np.ndarray]], meta: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """The arrays saved at ``path`` (a ``.safetensors`` file), building and saving them first
    if the file is missing.

    Args:
        path: where the arrays live; its name should carry a key of everything they depend on.
        build: computes the arrays (numpy, any dtype safetensors holds) on a cache miss.
        meta: string metadata written into the file's header (source, versions, ...).

    Returns:
        ``name -> array`` as built (read back from the file on later calls).
    """
    if not path.is_file():
        arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        write_atomic(path, save(tensors, metadata=dict(meta)))
        return arrays
    return {k: v.numpy() for k, v in load_file(path).items()}


def read_header(path: Path) -> dict[str, str]:
    """The string metadata in the header of the safetensors file at ``path``."""
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def publish_folder(target: Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Create the folder ``target`` atomically: ``write`` fills a scratch folder beside it,
    which is then renamed to ``target``.

    Args:
        target: the folder to create.
        write: called with the scratch folder; writes the entry's files into it.
        replace: replace an existing ``target`` (its old files are removed after the swap).

    Returns:
        ``target``. If another process publishes it first (and ``replace`` is false), that
        entry is kept and this one discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old: Path | None = None
    try:
        write(scratch)
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            scratch.rename(target)
        except OSError:
            if not target.exists():  # not a lost race with a concurrent writer
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
