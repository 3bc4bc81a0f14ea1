"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``, written
atomically (temporary file, then rename), never pickles."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "atomic_write_bytes", "read_adapter", "write_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "moracl.adapter"
VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, Tensor]
) -> Path:
    """Save ``config`` (JSON-ready) and ``tensors`` into ``directory``; returns the folder."""
    out = Path(directory)
    body = {"format": FORMAT, "version": VERSION, **config}
    _atomic_save_tensors(out / WEIGHTS_NAME, tensors, {"format": FORMAT})
    atomic_write_bytes(
        out / CONFIG_NAME, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    )
    return out


def read_adapter(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Load what :func:`write_adapter` saved; a missing or foreign folder raises clearly."""
    src = Path(directory)
    cfg_path, w_path = src / CONFIG_NAME, src / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"no {p.name} in {src} (expected a folder written by save_pretrained)"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_path} is not a moracl adapter config (format={config.get('format')!r})"
            if isinstance(config, dict)
            else f"{cfg_path} is not a JSON object"
        )
    if config.get("version") != VERSION:
        raise ValueError(
            f"{cfg_path} has version {config.get('version')!r}; this moracl reads {VERSION}"
        )
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from e
    return config, tensors
