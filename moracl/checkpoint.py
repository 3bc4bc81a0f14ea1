"""Adapter folders: ``moracl_config.json`` + ``adapter_model.safetensors`` + a checksum
manifest ``checksums.json``, written atomically (temporary file, then rename; the manifest
last), never pickles.

The config is named ``moracl_config.json`` so that a moracl folder is never mistaken for a
PEFT one (PEFT's config is ``adapter_config.json``, see :mod:`moracl.peft_files`); folders
written by earlier moracl versions, with a moracl-layout ``adapter_config.json``, still load.

Reading checks everything before any tensor is created:

- the folder's entries are regular files, never symbolic links (the folder path itself may be
  a link: it is the caller's choice; what it holds is what the manifest vouches for);
- every file the manifest lists has its size and SHA-256; the files moracl reads must be
  listed; files the manifest does not list are ignored with a warning naming them.  A folder
  without a manifest (written by moracl before manifests existed) is read with a warning
  naming it: its files cannot be verified, but every check below still applies;
- the config is strict JSON (no NaN, no duplicate keys) of the moracl adapter format;
- the safetensors header is parsed here, not by the library: its length fits the file, every
  tensor has a known dtype, a shape whose byte size equals its data span, and the spans tile
  the data section exactly (no gap, no overlap, nothing past the end).

Each file is read once into memory and everything (hash, header, tensors) comes from those
bytes, so a file changed between the check and the load cannot slip through.  Tensors are
created only by :meth:`AdapterFolder.load_tensors`, which refuses non-finite values; callers
compare the header with the model first (see :mod:`moracl.adapter_files`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from moracl.files import UnsafeFileError, fsync_path, read_regular, sha256_bytes, write_atomic
from moracl.guard import assert_finite, finite_json

__all__ = [
    "CONFIG_NAME",
    "LEGACY_CONFIG_NAME",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "AdapterFolder",
    "TensorInfo",
    "config_name",
    "open_adapter",
    "open_folder",
    "parse_safetensors_header",
    "read_adapter",
    "safetensors_bytes",
    "strict_json",
    "verify_folder",
    "write_adapter",
    "write_files",
    "write_manifest",
]

CONFIG_NAME = "moracl_config.json"
#: the config name of moracl folders written before ``moracl_config.json`` (and PEFT's)
LEGACY_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "checksums.json"
FORMAT = "moracl.adapter"
VERSION = 1
MANIFEST_FORMAT = "moracl.checksums"
MANIFEST_VERSION = 1

#: safetensors dtype name -> (torch dtype, bytes per element): the ones moracl reads
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}
#: the largest safetensors header accepted (the safetensors library's own limit)
MAX_HEADER_BYTES = 100_000_000
#: the most dimensions a saved tensor may have
MAX_DIMS = 8


# -- writing ----------------------------------------------------------------------------------


def _manifest_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": sha256_bytes(data), "size": len(data)}


def write_manifest(directory: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Write ``checksums.json`` into ``directory``: the SHA-256 and size of each of ``files``
    (name -> the exact bytes written under that name).  Written atomically, and last."""
    out = Path(directory)
    body = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "algorithm": "sha256",
        "files": {name: _manifest_entry(data) for name, data in sorted(files.items())},
    }
    write_atomic(out / MANIFEST_NAME, (json.dumps(body, indent=2) + "\n").encode())
    with contextlib.suppress(OSError):  # where the platform cannot sync a folder
        fsync_path(out)  # makes the renames into it durable
    return out / MANIFEST_NAME


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: dict[str, str] | None) -> bytes:
    """The safetensors encoding of ``tensors`` (detached, contiguous, on the CPU)."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save_safetensors(plain, metadata=metadata)


def write_files(
    directory: str | os.PathLike[str], files: Mapping[str, bytes], *, stale: Iterable[str] = ()
) -> Path:
    """Write ``files`` (name -> bytes) atomically one by one, then their manifest.

    ``stale`` names files that describe the weights being replaced (another format's config):
    they are removed first, so the folder never pairs the new weights with an old config."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        if name not in files and os.path.lexists(out / name):
            (out / name).unlink()
    for name, data in files.items():
        write_atomic(out / name, data)
    write_manifest(out, files)
    return out


def write_adapter(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, Tensor]
) -> Path:
    """Save ``config`` (JSON-ready) and ``tensors`` into ``directory`` with their checksum
    manifest; returns the folder.  Non-finite tensors or numbers are refused before anything
    is written.

    A crash part-way leaves the previous manifest in place, so a half-written folder is
    refused when read, never loaded."""
    out = Path(directory)
    assert_finite(tensors, f"adapter for {out}")
    body = {"format": FORMAT, "version": VERSION, **config}
    text = finite_json(body, f"{out / CONFIG_NAME}", indent=2, sort_keys=True) + "\n"
    weights = safetensors_bytes(tensors, {"format": FORMAT})
    files = {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()}
    return write_files(out, files, stale=[LEGACY_CONFIG_NAME])


# -- reading ----------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(data: bytes | str, what: str) -> Any:
    """Parse JSON refusing NaN/Infinity, duplicate keys and absurd nesting, as ``ValueError``
    naming ``what``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a config") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, refusing symbolic links and anything but a regular file
    (:func:`moracl.files.read_regular`), with the adapter folder's messages."""
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnsafeFileError as e:
        if e.reason == "link":
            raise ValueError(
                f"{path} is a symbolic link; an adapter folder must hold its files itself "
                f"(copy the file in place of the link)"
            ) from None
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"{path} cannot be opened as a regular file: {e.strerror}") from None


def _check_manifest(manifest: Any, where: Path) -> dict[str, tuple[str, int]]:
    """``{name: (sha256, size)}`` from a parsed manifest, or ``ValueError`` naming the key."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where} is not a JSON object")
    expected = {"format", "version", "algorithm", "files"}
    if set(manifest) != expected:
        raise ValueError(
            f"{where} has keys {sorted(manifest)}; expected exactly {sorted(expected)}"
        )
    if manifest["format"] != MANIFEST_FORMAT or manifest["version"] != MANIFEST_VERSION:
        raise ValueError(
            f"{where}: format={manifest['format']!r} version={manifest['version']!r}; this "
            f"moracl reads format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}"
        )
    if manifest["algorithm"] != "sha256":
        raise ValueError(f"{where}: algorithm must be 'sha256', got {manifest['algorithm']!r}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ValueError(f"{where}: 'files' must be an object of file name -> checksum")
    out: dict[str, tuple[str, int]] = {}
    for name, entry in files.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"{where}: file name {name!r} is not a plain name inside the folder")
        if name == MANIFEST_NAME:
            raise ValueError(f"{where} lists itself")
        if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
            raise ValueError(f"{where}: files[{name!r}] must be {{'sha256': ..., 'size': ...}}")
        digest, size = entry["sha256"], entry["size"]
        if not (
            isinstance(digest, str)
            and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
        ):
            raise ValueError(f"{where}: files[{name!r}].sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{where}: files[{name!r}].size must be an integer >= 0")
        out[name] = (digest, size)
    return out


def verify_folder(
    directory: str | os.PathLike[str], required: Iterable[str] = (), *, unverified_ok: bool = False
) -> dict[str, bytes]:
    """Check ``directory`` against its ``checksums.json`` and return the verified bytes of
    every file it lists (and of each ``required`` file, which must be listed).

    Raises ``FileNotFoundError`` for a missing folder or required file, ``ValueError`` for a
    symbolic link, a listed file that is missing or differs (naming it and both checksums), or
    a malformed manifest.  Without a manifest, warns naming the folder (unless
    ``unverified_ok``: folders of tools that write no manifest, such as PEFT) and returns the
    required files unverified.  Files the manifest does not list are left unread, with a
    warning naming them.  Nothing is ever written.
    """
    src = Path(directory)
    required = list(required)
    if not src.is_dir():
        first = required[0] if required else MANIFEST_NAME
        raise FileNotFoundError(
            f"no {first} in {src} (expected a folder written by save_pretrained)"
        )
    entries = sorted(os.listdir(src))
    links = [n for n in entries if (src / n).is_symlink()]
    if links:
        raise ValueError(
            f"{src} holds symbolic link(s) {links}; an adapter folder must hold its files "
            f"itself (copy the files in place of the links)"
        )
    for name in required:
        if name not in entries:
            raise FileNotFoundError(
                f"no {name} in {src} (expected a folder written by save_pretrained)"
            )
    if MANIFEST_NAME not in entries:
        if unverified_ok:
            return {name: _read_regular(src / name) for name in required}
        warnings.warn(
            f"{src} has no {MANIFEST_NAME} (written by an older moracl?): its files cannot be "
            f"verified; save it again to add checksums",
            UserWarning,
            stacklevel=3,
        )
        return {name: _read_regular(src / name) for name in required}
    manifest_path = src / MANIFEST_NAME
    listed = _check_manifest(strict_json(_read_regular(manifest_path), str(manifest_path)), src)
    unlisted = [n for n in required if n not in listed]
    if unlisted:
        raise ValueError(f"{manifest_path} does not cover {unlisted}; the folder is not intact")
    out: dict[str, bytes] = {}
    for name, (digest, size) in listed.items():
        path = src / name
        if not os.path.lexists(path):
            raise ValueError(f"{path} is listed in {MANIFEST_NAME} but missing")
        data = _read_regular(path)
        if len(data) != size:
            raise ValueError(
                f"{path} has {len(data)} bytes but {MANIFEST_NAME} records {size}: the file was "
                f"changed, truncated or half-written; refusing to load it"
            )
        actual = sha256_bytes(data)
        if actual != digest:
            raise ValueError(
                f"{path} has SHA-256 {actual} but {MANIFEST_NAME} records {digest}: the file was "
                f"changed or corrupted; refusing to load it"
            )
        out[name] = data
    extra = [
        n for n in entries if n != MANIFEST_NAME and n not in listed and not _COMPANION.fullmatch(n)
    ]
    if extra:
        warnings.warn(
            f"{src} holds {extra}, which {MANIFEST_NAME} does not cover; they are ignored",
            UserWarning,
            stacklevel=3,
        )
    return out


#: files that ``transformers.Trainer`` and tokenizers write beside an adapter in a checkpoint
#: folder (``checkpoint-N``): expected there, so not warned about (they are still never read)
_COMPANION = re.compile(
    r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json|"
    r"training_args\.bin|tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.(txt|json)|"
    r"merges\.txt|added_tokens\.json|chat_template\.jinja|spiece\.model|README\.md"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype name (``F32``, ...), shape and byte span
    ``[start, end)`` in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def is_floating_point(self) -> bool:
        return self.torch_dtype.is_floating_point


def parse_safetensors_header(data: bytes, what: str) -> dict[str, TensorInfo]:
    """Parse and check the header of safetensors bytes ``data`` without creating a tensor.

    Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then the data
    section.  Checked: ``n`` fits the file; the JSON is an object of tensor name ->
    ``{dtype, shape, data_offsets}`` (plus an optional ``__metadata__`` of strings); each
    dtype is one of :data:`DTYPES`; each byte span equals ``prod(shape) · itemsize``; the spans
    tile the data section exactly.  Raises ``ValueError`` naming ``what`` and the tensor.
    """
    if len(data) < 8:
        raise ValueError(
            f"{what} is truncated: {len(data)} bytes, shorter than the 8-byte header length"
        )
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise ValueError(
            f"{what}: the header length says {n} bytes but the file has {len(data) - 8} after "
            f"it (truncated or not a safetensors file)"
        )
    header = strict_json(data[8 : 8 + n], f"{what}'s header")
    if not isinstance(header, dict):
        raise ValueError(f"{what}'s header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{what}: __metadata__ must be an object of strings")
    size = len(data) - 8 - n
    infos = {name: _tensor_info(name, entry, what) for name, entry in header.items()}
    cursor = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != cursor:
            raise ValueError(
                f"{what}: tensor {name!r} starts at byte {info.start} but the previous one ends "
                f"at {cursor} (the data spans overlap or leave a gap)"
            )
        cursor = info.end
    if cursor != size:
        raise ValueError(
            f"{what}: the tensors span {cursor} bytes but the data section has {size} "
            f"(truncated, padded or edited)"
        )
    return infos


def _tensor_info(name: str, entry: Any, what: str) -> TensorInfo:
    where = f"{what}: tensor {name!r}"
    if not name:
        raise ValueError(f"{what}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where} must be {{dtype, shape, data_offsets}}, got {entry!r:.80}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r:.40}; expected one of {list(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(
            f"{where} has shape {shape!r:.80}; expected at most {MAX_DIMS} integers >= 0"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{where} has data_offsets {offsets!r:.80}; expected [start, end]")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(
            f"{where}: {dtype} {tuple(shape)} takes {nbytes} bytes but its data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


@dataclass(frozen=True)
class AdapterFolder:
    """A checked adapter folder: its config, its weights' header, and the verified bytes the
    tensors will be made from (by :meth:`load_tensors`, nothing else)."""

    path: Path
    config: dict[str, Any]
    header: dict[str, TensorInfo]
    weights: bytes
    config_name: str = CONFIG_NAME

    @property
    def config_path(self) -> Path:
        """Where the config was read from (for messages)."""
        return self.path / self.config_name

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    def load_tensors(self) -> dict[str, Tensor]:
        """The saved tensors (at most the file's size in memory), refusing non-finite ones."""
        where = self.path / WEIGHTS_NAME
        try:
            tensors = load_safetensors(self.weights)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{where} is not a readable safetensors file: {e}") from e
        for name, t in tensors.items():
            info = self.header.get(name)
            if info is None or tuple(t.shape) != info.shape or t.dtype != info.torch_dtype:
                raise ValueError(f"{where}: tensor {name!r} does not match the checked header")
        assert_finite(tensors, str(where))
        return tensors


def config_name(directory: str | os.PathLike[str]) -> str:
    """The config file of the moracl folder ``directory``: ``moracl_config.json``, or
    ``adapter_config.json`` for a folder of an earlier moracl (or PEFT's); raises
    ``FileNotFoundError`` naming both when it has neither (or is not a folder)."""
    src = Path(directory)
    for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        if os.path.lexists(src / name):
            return name
    raise FileNotFoundError(
        f"no {CONFIG_NAME} or {LEGACY_CONFIG_NAME} in {src} (expected a folder written by "
        f"save_pretrained)"
    )


def open_folder(
    directory: str | os.PathLike[str], config_file: str, *, unverified_ok: bool = False
) -> AdapterFolder:
    """Check ``directory``'s ``config_file`` (strict JSON, an object) and weights (links,
    checksums, the safetensors header) and return them, without creating any tensor; the
    config's contents are the caller's to check."""
    src = Path(directory)
    files = verify_folder(src, (config_file, WEIGHTS_NAME), unverified_ok=unverified_ok)
    cfg_path = src / config_file
    config = strict_json(files[config_file], str(cfg_path))
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    weights = files[WEIGHTS_NAME]
    header = parse_safetensors_header(weights, str(src / WEIGHTS_NAME))
    return AdapterFolder(src, config, header, weights, config_file)


def open_adapter(directory: str | os.PathLike[str]) -> AdapterFolder:
    """Check the moracl adapter folder ``directory`` (links, checksums, config, safetensors
    header: see the module docstring) and return it, without creating any tensor."""
    folder = open_folder(directory, config_name(directory))
    config, cfg_path = folder.config, folder.config_path
    if "peft_type" in config and "format" not in config:
        raise ValueError(
            f"{cfg_path} is a PEFT adapter config (peft_type={config['peft_type']!r}), not a "
            f"moracl one: load it with MoRAModel.from_peft (or MoRAModel.from_pretrained)"
        )
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_path} is not a moracl adapter config (format={config.get('format')!r})"
        )
    if config.get("version") != VERSION:
        raise ValueError(
            f"{cfg_path} has version {config.get('version')!r}; this moracl reads {VERSION}"
        )
    return folder


def read_adapter(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Load what :func:`write_adapter` saved, every check of :func:`open_adapter` included;
    a missing folder raises ``FileNotFoundError``, anything malformed ``ValueError``.

    Use :func:`open_adapter` to compare the header with a model before creating tensors."""
    folder = open_adapter(directory)
    return folder.config, folder.load_tensors()
