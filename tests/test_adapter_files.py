"""Adapter folders are checked before anything is allocated or trusted: checksums, the
safetensors header parsed by moracl, declared sizes against the target layers, finiteness,
no symbolic links, clear errors for malformed configs (fuzzed), and refused folders left
byte-identical."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from torch import nn

from moracl import AdapterConfig, MoRAModel
from moracl.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    parse_safetensors_header,
    read_adapter,
    verify_folder,
    write_manifest,
)
from moracl.experts.mixture import MAX_EXPERTS, ExpertGroup, Mixture, MixtureConfig
from moracl.experts.routers.config import MAX_DEPTH, RouterConfig
from moracl.guard import NonFiniteError
from moracl.layer import MoRALinear

from .conftest import mlp, randomize_adapters, tiny_bert

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- helpers ------------------------------------------------------------------------------------


def _save(folder: Path, config: Any = None, base: nn.Module | None = None) -> Path:
    base = mlp() if base is None else base
    model = MoRAModel(base, config or AdapterConfig(kind="lora", rank=2))
    randomize_adapters(model)
    model.save_pretrained(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry of ``folder``: its bytes, or where it links to."""
    out: dict[str, Any] = {}
    for entry in sorted(folder.iterdir()):
        out[entry.name] = ("link", os.readlink(entry)) if entry.is_symlink() else entry.read_bytes()
    return out


def _resign(folder: Path) -> None:
    """Recompute the manifest over the current files (what a forger could do), so that the
    checks behind the checksums are the ones exercised."""
    write_manifest(folder, {n: (folder / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)})


def _edit_header(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the safetensors header of ``folder``'s weights through ``edit``; data unchanged."""
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _refused(folder: Path, match: str, base: nn.Module | None = None, error: type = ValueError):
    """``from_pretrained`` raises ``error`` matching ``match`` and leaves ``folder`` as it was."""
    before = _snapshot(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match) as info:
            MoRAModel.from_pretrained(mlp() if base is None else base, folder)
    assert _snapshot(folder) == before
    return info


# -- the manifest --------------------------------------------------------------------------------


def test_the_manifest_covers_every_file_and_loading_is_exact(tmp_path: Path) -> None:
    base = mlp()
    folder = _save(tmp_path / "a", base=base)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME
    )
    import hashlib

    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    before = _snapshot(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact folder loads without a warning
        again = MoRAModel.from_pretrained(base, folder)
    assert _snapshot(folder) == before
    _, tensors = read_adapter(folder)
    for k, v in again.adapter_state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_flipped_bytes_in_the_tensor_data_are_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    raw = bytearray((folder / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40  # one bit of the last tensor's data
    (folder / WEIGHTS_NAME).write_bytes(bytes(raw))
    _refused(folder, rf"{WEIGHTS_NAME} has SHA-256 [0-9a-f]{{64}} but {MANIFEST_NAME} records")


def test_an_edited_config_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    _edit_config(folder, lambda c: c["adapters"]["default"]["config"].update(alpha=80.0))
    _refused(folder, rf"{CONFIG_NAME} has \d+ bytes but {MANIFEST_NAME} records")


def test_a_half_written_folder_is_refused(tmp_path: Path) -> None:
    """New weights over an old folder without the new manifest: what a crash between the
    writes leaves behind."""
    folder = _save(tmp_path / "a")
    other = _save(tmp_path / "b")
    shutil.copyfile(other / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    _refused(folder, "changed or corrupted")


def test_a_folder_without_manifest_loads_with_a_warning(tmp_path: Path) -> None:
    base = mlp()
    folder = _save(tmp_path / "a", base=base)
    model = MoRAModel.from_pretrained(base, folder)
    (folder / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match=rf"{folder}.* has no {MANIFEST_NAME}.*cannot be verified"):
        again = MoRAModel.from_pretrained(base, folder)
    x = torch.randn(3, 24)
    assert torch.equal(again(x), model(x))


def test_files_outside_the_manifest_are_named_and_ignored(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    (folder / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match=r"\['notes.txt'\].*does not cover"):
        MoRAModel.from_pretrained(mlp(), folder)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"../adapter_config.json": {"sha256": "0" * 64, "size": 1}}, "not a plain name"),
        ({"gone.bin": {"sha256": "0" * 64, "size": 1}}, "listed in checksums.json but missing"),
        ({CONFIG_NAME: {"sha256": "xyz", "size": 1}}, "64 lowercase hex"),
        ({CONFIG_NAME: {"sha256": "0" * 64}}, r"must be \{'sha256'"),
        ([], "'files' must be an object"),
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, files: Any, match: str) -> None:
    folder = _save(tmp_path / "a")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if isinstance(files, dict):
        manifest["files"].update(files)
    else:
        manifest["files"] = files
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    _refused(folder, match)


# -- symbolic links ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME])
def test_symlinked_files_are_refused(tmp_path: Path, name: str) -> None:
    folder = _save(tmp_path / "a")
    outside = tmp_path / f"outside-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    _refused(folder, rf"symbolic link.*{name}")


def test_a_symlinked_folder_loads(tmp_path: Path) -> None:
    """The folder path itself is the caller's choice (e.g. ``best -> epoch-3``)."""
    base = mlp()
    folder = _save(tmp_path / "a", base=base)
    (tmp_path / "best").symlink_to(folder, target_is_directory=True)
    again = MoRAModel.from_pretrained(base, tmp_path / "best")
    x = torch.randn(2, 24)
    assert torch.equal(again(x), MoRAModel.from_pretrained(base, folder)(x))


# -- the safetensors header (checked behind re-signed checksums) ---------------------------------


def test_a_dtype_edit_in_the_header_is_refused(tmp_path: Path) -> None:
    """F32 -> I32 keeps every size; only the dtype check can see it."""
    folder = _save(tmp_path / "a")
    _edit_header(folder, lambda h: h["0.adapters.default.lora_A"].update(dtype="I32"))
    _resign(folder)
    _refused(folder, r"layer '0': saved tensor '0.adapters.default.lora_A' has dtype I32.*floating")


def test_a_shape_edit_in_the_header_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    _edit_header(folder, lambda h: h["0.adapters.default.lora_A"].update(shape=[4, 12]))
    _resign(folder)
    _refused(folder, r"layer '0': saved tensor .*lora_A' has shape \(4, 12\).*\(2, 24\)")


def test_a_shape_that_does_not_match_its_bytes_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    _edit_header(folder, lambda h: h["0.adapters.default.lora_A"].update(shape=[1000000, 24]))
    _resign(folder)
    _refused(folder, r"F32 \(1000000, 24\) takes 96000000 bytes but its data_offsets span 192")


def test_overlapping_spans_are_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")

    def overlap(h: dict[str, Any]) -> None:
        spans = sorted((v["data_offsets"], k) for k, v in h.items() if k != "__metadata__")
        (a0, a1), first = spans[0]
        h[first]["data_offsets"] = [a0 + 4, a1 + 4]

    _edit_header(folder, overlap)
    _resign(folder)
    _refused(folder, "overlap or leave a gap")


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    raw = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(raw[:-4])
    _refused(folder, "bytes but checksums.json records")  # the manifest sees it first
    _resign(folder)
    _refused(folder, r"the tensors span \d+ bytes but the data section has \d+")
    (folder / WEIGHTS_NAME).write_bytes(raw[:5])
    _resign(folder)
    _refused(folder, "truncated: 5 bytes")


@pytest.mark.parametrize("delta", [1, 10**12, -1])
def test_a_header_length_that_lies_is_refused(tmp_path: Path, delta: int) -> None:
    folder = _save(tmp_path / "a")
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    size = len(raw) - 8 if delta == 1 else n + delta  # exactly the file, past it, one short
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", size) + raw[8:])
    _resign(folder)
    match = "header length says" if delta == 10**12 else "(not valid JSON|span)"
    _refused(folder, match)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}, "must be {dtype"),
        ({"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}, "dtype 'C64'"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "integers >= 0"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "integers >= 0"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"expected \[start, end\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}, r"expected \[start, end\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "takes 8 bytes"),
    ],
)
def test_header_entries_are_checked(entry: dict[str, Any], match: str) -> None:
    header = json.dumps({"t": entry}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(8)
    with pytest.raises(ValueError, match=match):
        parse_safetensors_header(data, "x.safetensors")


def test_a_well_formed_header_is_read_without_creating_tensors() -> None:
    data = save_safetensors({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)})
    infos = parse_safetensors_header(data, "x")
    assert {k: (v.dtype, v.shape) for k, v in infos.items()} == {
        "a": ("F32", (2, 3)),
        "b": ("I64", (4,)),
    }


# -- non-finite tensors ---------------------------------------------------------------------------


def test_nan_tensors_are_refused_on_load(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    tensors = read_adapter(folder)[1]
    tensors["0.adapters.default.lora_B"][3, 1] = float("nan")
    (folder / WEIGHTS_NAME).write_bytes(save_safetensors(tensors, {"format": "moracl.adapter"}))
    _resign(folder)
    info = _refused(folder, r"tensor '0.adapters.default.lora_B' holds nan", error=NonFiniteError)
    assert str(info.value).count("\n") == 0


def test_save_pretrained_refuses_non_finite_tensors_before_writing(tmp_path: Path) -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    model.save_pretrained(tmp_path / "good")
    before = _snapshot(tmp_path / "good")
    with torch.no_grad():
        model.model[0].adapters["default"].lora_A[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'0.adapters.default.lora_A' holds inf"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(NonFiniteError):
        model.save_pretrained(tmp_path / "good")
    assert _snapshot(tmp_path / "good") == before


def test_load_adapter_tensors_refuses_nan_and_integer_tensors() -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    bad = dict(state, **{"0.adapters.default.lora_A": torch.full((2, 24), float("nan"))})
    with pytest.raises(NonFiniteError, match="lora_A"):
        model.load_adapter_tensors(bad)
    ints = dict(state, **{"0.adapters.default.lora_A": torch.ones(2, 24, dtype=torch.int32)})
    with pytest.raises(ValueError, match="dtype torch.int32"):
        model.load_adapter_tensors(ints)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, state[k]), k  # nothing changed


# -- sizes against the layers ---------------------------------------------------------------------

KIND_BOUNDS = [
    ({"kind": "lora"}, max),
    ({"kind": "dora"}, max),
    ({"kind": "mora", "compression": "sharing"}, max),
    ({"kind": "mora", "compression": "rotation"}, max),
    ({"kind": "mora", "compression": "truncation"}, max),
    ({"kind": "vera"}, lambda i, o: i + o),
]


@pytest.mark.parametrize(("options", "bound"), KIND_BOUNDS, ids=lambda o: str(o))
@pytest.mark.parametrize("shape", [(6, 50), (50, 6)])
def test_rank_bounds_per_kind(options: dict, bound: Callable, shape: tuple[int, int]) -> None:
    top = bound(*shape)
    layer = MoRALinear(nn.Linear(*shape), AdapterConfig(rank=top, **options))
    x = torch.randn(2, shape[0])
    assert layer(x).shape == (2, shape[1])
    with pytest.raises(
        ValueError, match=rf"\({shape[0]} -> {shape[1]}\).* rank {top + 1}.*<= {top}"
    ):
        MoRALinear(nn.Linear(*shape), AdapterConfig(rank=top + 1, **options))


def test_injection_refuses_a_huge_rank_naming_the_layer() -> None:
    base = tiny_bert()
    with pytest.raises(
        ValueError,
        match=r"layer 'encoder.layer.0.attention.self.query' \(32 -> 32\): lora rank 100000 is "
        r"out of range; expected 1 <= rank <= 32",
    ):
        MoRAModel(base, AdapterConfig(kind="lora", rank=100000))


def test_a_refused_adapter_changes_no_layer() -> None:
    """Every target is checked before any is wrapped: 24 -> 80 fits rank 20, 12 -> 6 does not."""
    base = nn.Sequential(
        nn.Linear(24, 80), nn.GELU(), nn.Linear(80, 12), nn.GELU(), nn.Linear(12, 6)
    )
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["2"])
    with pytest.raises(ValueError, match=r"layer '4' \(12 -> 6\): lora rank 20 .*<= 12 = max"):
        model.add_adapter("big", AdapterConfig(kind="lora", rank=20), target_modules=["0", "4"])
    assert isinstance(model.model[0], nn.Linear) and isinstance(model.model[4], nn.Linear)
    assert "big" not in model.adapter_configs and "big" not in model.model[2].adapters


def test_mixture_bounds_experts_ranks_and_tasks() -> None:
    with pytest.raises(ValueError, match=rf"{MAX_EXPERTS + 1} experts is out of range"):
        Mixture.from_config(8, 8, MixtureConfig(kind="lora", rank=1, experts=MAX_EXPERTS + 1))
    with pytest.raises(ValueError, match=r"expert group 1 \(8 -> 8\): mora rank 9"):
        groups = (
            ExpertGroup(AdapterConfig(kind="lora", rank=2), 2),
            ExpertGroup(AdapterConfig(kind="mora", rank=9), 2),
        )
        Mixture.from_config(8, 8, MixtureConfig(groups=groups))
    with pytest.raises(ValueError, match=r"router.num_tasks=100000 is out of range"):
        Mixture.from_config(
            8, 8, MixtureConfig(experts=2, router=RouterConfig(type="topk", num_tasks=10**5))
        )
    mix = Mixture.from_config(8, 8, MixtureConfig(kind="lora", rank=1, experts=MAX_EXPERTS - 1))
    with pytest.raises(ValueError, match=rf"{MAX_EXPERTS + 1} experts"):
        mix.grow(AdapterConfig(kind="lora", rank=1), 2)
    assert mix.num_experts == MAX_EXPERTS - 1


def test_a_config_within_bounds_but_not_the_file_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    _edit_config(folder, lambda c: c["adapters"]["default"]["config"].update(rank=3))
    _resign(folder)
    _refused(
        folder,
        r"layer '0': saved tensor '0.adapters.default.lora_A' has shape \(2, 24\) "
        r"but the model's has shape \(3, 24\)",
    )


def test_targets_the_model_lacks_are_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "a")
    _edit_config(folder, lambda c: c["adapters"]["default"].update(targets=["0", "7"]))
    _resign(folder)
    _refused(folder, "names layer '7', which the model does not have")
    _edit_config(folder, lambda c: c["adapters"]["default"].update(targets=["1"]))
    _resign(folder)
    _refused(folder, "a GELU, not nn.Linear")


_ALLOCATION_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    from moracl import AdapterConfig, MoRAModel
    torch.set_num_threads(1)
    def base():
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 12))
    # warm up: a save and a load of each kind tested, so lazy imports happen before the limit
    import tempfile
    from moracl import MixtureConfig
    for config in (AdapterConfig(kind="lora", rank=2), AdapterConfig(kind="mora", rank=2),
                   MixtureConfig(kind="lora", rank=2, experts=2)):
        warm = tempfile.mkdtemp()
        MoRAModel(base(), config).save_pretrained(warm)
        MoRAModel.from_pretrained(base(), warm)(torch.randn(2, 64))
    page = resource.getpagesize()
    vm = int(open("/proc/self/statm").read().split()[0]) * page
    limit = vm + 300 * 2**20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY and hard < limit:  # (a runner under `ulimit -v`)
        print(json.dumps({"probe": "hard limit below the test's"}))
        sys.exit(0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {}
    try:
        torch.empty(100 * 2**20)  # 400 MB: must fail, or the limit proves nothing
        out["probe"] = "allocated"
    except RuntimeError:
        out["probe"] = "refused"
    def attempt(name, fn):
        try:
            fn()
            out[name] = "loaded"
        except ValueError as e:
            out[name] = "ValueError: " + str(e)
        except BaseException as e:
            out[name] = type(e).__name__ + ": " + str(e)[:200]
    for folder in sys.argv[1:]:
        attempt(folder, lambda: MoRAModel.from_pretrained(base(), folder))
    wide = nn.Sequential(nn.Linear(1024, 1024))  # rank 100000 would take 800 MB
    attempt("inject", lambda: MoRAModel(wide, AdapterConfig(kind="lora", rank=100000)))
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_huge_declared_sizes_are_refused_before_allocation(tmp_path: Path) -> None:
    """Run under an address-space limit 300 MB above the process's size: a folder of a few
    KB whose config declares rank 10^6 (1.3 GB of adapter on a 64 -> 256 layer), 10^8, a MoRA
    rank 10^6 (r̂ = 17888), a million experts, and injecting rank 100000 into a 1024-wide
    layer must each end in the bound's ValueError, not in a failed allocation."""
    base = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 12))
    edits: dict[str, tuple[Any, Callable[[dict[str, Any]], None]]] = {
        "rank1e6": (None, lambda c: c.update(rank=10**6)),
        "rank1e8": (None, lambda c: c.update(rank=10**8)),
        "mora1e6": (AdapterConfig(kind="mora", rank=2), lambda c: c.update(rank=10**6)),
        "experts1e6": (
            MixtureConfig(kind="lora", rank=2, experts=2),
            lambda c: c.update(experts=10**6),
        ),
    }
    folders = []
    for name, (config, edit) in edits.items():
        folder = _save(tmp_path / name, config, base)
        _edit_config(folder, lambda c, e=edit: e(c["adapters"]["default"]["config"]))
        _resign(folder)
        assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000
        folders.append(str(folder))
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _ALLOCATION_PROBE, *folders],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    probe = out.pop("probe")
    if probe != "refused":
        pytest.skip(f"this machine does not let the test limit the address space ({probe})")
    expected = {
        folders[
            0
        ]: r"layer '0' \(64 -> 256\): lora rank 1000000 is out of range; expected 1 <= rank <= 256",
        folders[1]: r"layer '0' \(64 -> 256\): lora rank 100000000 is out of range",
        folders[2]: r"layer '0' \(64 -> 256\): mora rank 1000000 \(r̂ = 17888\) is out of range",
        folders[
            3
        ]: rf"layer '0': 1000000 experts is out of range; expected 1 <= experts <= {MAX_EXPERTS}",
        "inject": r"layer '0' \(1024 -> 1024\): lora rank 100000 is out of range; .*<= 1024",
    }
    import re

    for key, pattern in expected.items():
        assert out[key].startswith("ValueError: "), (key, out[key])
        assert re.search(pattern, out[key]), (key, out[key])


# -- malformed configs ----------------------------------------------------------------------------

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
JSON = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_KINDS = st.sampled_from(["lora", "mora", "dora", "vera", "lorra", ""])


def _sometimes(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return valid | JSON


ADAPTER_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "kind": _sometimes(_KINDS),
        "rank": _sometimes(st.integers(-2, 40)),
        "dropout": _sometimes(st.floats(-0.5, 1.5)),
        "alpha": _sometimes(st.floats(-1, 64)),
        "rslora": _sometimes(st.booleans()),
        "freeze_a": _sometimes(st.booleans()),
        "compression": _sometimes(st.sampled_from(["sharing", "rotation", "truncation", "zip"])),
        "projection_seed": _sometimes(st.integers(-3, 3)),
        "d_initial": _sometimes(st.floats(-1, 1)),
    },
)


def _router_dicts(depth: int) -> st.SearchStrategy[Any]:
    nested = _router_dicts(depth - 1) if depth > 0 else st.none()
    return st.fixed_dictionaries(
        {},
        optional={
            "type": _sometimes(
                st.sampled_from(["topk", "dynamic", "task", "hierarchical", "soft", "x"])
            ),
            "k": _sometimes(st.integers(-1, 5)),
            "top_p": _sometimes(st.floats(-0.5, 1.5)),
            "max_experts": _sometimes(st.none() | st.integers(0, 4)),
            "num_tasks": _sometimes(st.integers(-1, 4)),
            "groups": _sometimes(st.integers(-1, 4)),
            "outer": nested | JSON,
            "inner": nested | JSON,
            "per": _sometimes(st.sampled_from(["token", "sample", "row"])),
            "noise": _sometimes(st.booleans()),
        },
    )


ROUTER_DICTS = _router_dicts(3)
MIXTURE_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "mixture": _sometimes(st.just(True)),
        "kind": _sometimes(_KINDS),
        "rank": _sometimes(st.integers(-1, 8)),
        "experts": _sometimes(st.integers(-1, 6)),
        "router": ROUTER_DICTS | JSON,
        "options": st.dictionaries(
            st.sampled_from(["alpha", "dropout", "rank", "kind", "x"]), JSON, max_size=2
        )
        | JSON,
        "groups": st.lists(
            st.fixed_dictionaries(
                {},
                optional={"adapter": ADAPTER_DICTS | JSON, "count": _sometimes(st.integers(-1, 3))},
            )
            | JSON,
            max_size=2,
        )
        | JSON,
    },
)


def _one_line_value_error(build: Callable[[], Any]) -> Any:
    """``build()``'s result, or None after a ``ValueError`` with a message; any other
    exception fails the test."""
    try:
        result = build()
    except ValueError as e:
        assert str(e) and "Traceback" not in str(e)
        event(f"refused: {type(e).__name__}")
        return None
    event("accepted")
    return result


@FUZZ
@given(data=ADAPTER_DICTS | st.dictionaries(st.text(max_size=6), JSON, max_size=3) | JSON)
def test_fuzzed_adapter_configs_are_valid_or_refused(data: Any) -> None:
    config = _one_line_value_error(lambda: AdapterConfig.from_dict(data))
    if config is not None:
        assert AdapterConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(data=ROUTER_DICTS | JSON)
def test_fuzzed_router_configs_are_valid_or_refused(data: Any) -> None:
    config = _one_line_value_error(lambda: RouterConfig.from_dict(data))
    if config is not None:
        assert RouterConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(data=MIXTURE_DICTS | JSON)
def test_fuzzed_mixture_configs_are_valid_or_refused(data: Any) -> None:
    config = _one_line_value_error(lambda: MixtureConfig.from_dict(data))
    if config is not None:
        assert MixtureConfig.from_dict(config.to_dict()) == config


def test_router_nesting_is_bounded() -> None:
    def nested(levels: int) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "topk", "k": 1}
        for _ in range(levels - 1):
            config = {"type": "hierarchical", "groups": 1, "k": 1, "inner": config}
        return config

    assert RouterConfig.from_dict(nested(MAX_DEPTH)).inner is not None
    with pytest.raises(ValueError, match=rf"(inner\.)+inner: routers nest at most {MAX_DEPTH}"):
        RouterConfig.from_dict(nested(MAX_DEPTH + 1))
    with pytest.raises(ValueError, match=rf"routers nest at most {MAX_DEPTH}"):
        RouterConfig.from_dict(nested(5000))  # no RecursionError
    with pytest.raises(ValueError, match=r"inner.inner.k must be an integer, got '2'"):
        RouterConfig.from_dict(
            {
                "type": "hierarchical",
                "groups": 1,
                "inner": {"type": "hierarchical", "groups": 1, "inner": {"type": "topk", "k": "2"}},
            }
        )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"kind": ["lora"]}, r"unknown adapter kind \['lora'\]"),
        ({"kind": "lora", 3: 4}, "keys must be strings, got 3"),
        ({"kind": "lora", "rank": "8"}, "rank must be an integer, got '8'"),
        ({"kind": "lora", "alpha": 10**400}, "alpha must be a number"),
        ({"kind": "lora", "dropout": [0.1]}, r"dropout must be a number, got \[0.1\]"),
        ({"kind": "mora", "compression": 3}, r"compression must be one of \['sharing'"),
        ("lora", "an adapter config must be a mapping"),
    ],
)
def test_malformed_adapter_configs_name_the_key(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdapterConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"groups": [{"adapter": {"kind": "lora"}}]}, r"groups\[0\] must have exactly the keys"),
        (
            {"groups": [{"adapter": {"kind": "lora", "rank": "2"}, "count": 1}]},
            r"groups\[0\].adapter: rank must",
        ),
        ({"groups": 3}, "groups must be a list"),
        ({"options": {"rank": 4}}, r"options must not repeat \['rank'\]"),
        ({"options": {"alpha": "x"}}, "options: alpha must be a number"),
        ({"options": [1]}, "options must be a mapping"),
        ({"router": {"type": "topk", "k": None}}, "router: k must be an integer"),
        ({"router": "topk"}, "router: a router config must be a mapping"),
        ({"experts": True}, "experts must be an integer, got True"),
        ({"mixture": "yes"}, "mixture must be true"),
    ],
)
def test_malformed_mixture_configs_name_the_key(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixtureConfig.from_dict(data)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.pop("adapters"), "holds no adapter"),
        (lambda c: c.update(adapters=[]), "holds no adapter"),
        (lambda c: c.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda c: c["adapters"]["default"].pop("targets"), "exactly 'config', 'targets'"),
        (lambda c: c["adapters"]["default"].update(targets=[]), "targets must name at least one"),
        (lambda c: c["adapters"]["default"].update(targets="0"), "targets must be a list"),
        (
            lambda c: c["adapters"]["default"].update(config=None),
            "adapter config must be a mapping",
        ),
        (lambda c: c["adapters"]["default"]["config"].update(rank=None), "rank must be an integer"),
        (lambda c: c.update(active=["nope"]), r"active names \['nope'\]"),
        (lambda c: c.update(modules_to_save={"a": 1}), "modules_to_save must be a list"),
        (lambda c: c.update(version=2), "has version 2"),
        (lambda c: c.update(format="peft"), "not a moracl adapter config"),
    ],
)
def test_malformed_saved_configs_name_the_key(tmp_path: Path, edit: Callable, match: str) -> None:
    folder = _save(tmp_path / "a")
    _edit_config(folder, edit)
    _resign(folder)
    _refused(folder, match)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"format": "moracl.adapter", "format": "x"}', "duplicate key 'format'"),
        ('{"format": "moracl.adapter", "version": NaN}', "NaN is not a JSON number"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("\xff", "not valid JSON"),
    ],
)
def test_config_json_is_strict(tmp_path: Path, text: str, match: str) -> None:
    folder = _save(tmp_path / "a")
    (folder / CONFIG_NAME).write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    _resign(folder)
    _refused(folder, match)


def _mutate(tree: Any, path: list[int], value: Any, delete: bool) -> Any:
    """``tree`` with the node that ``path`` leads to replaced by ``value`` (or deleted)."""
    if not path or not isinstance(tree, (dict, list)) or not tree:
        return value
    keys = list(tree) if isinstance(tree, dict) else list(range(len(tree)))
    key = keys[path[0] % len(keys)]
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    if delete and len(path) == 1:
        del copy[key]
    else:
        copy[key] = _mutate(tree[key], path[1:], value, delete)
    return copy


@pytest.fixture(scope="module")
def saved_mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "saved"
    groups = (
        ExpertGroup(AdapterConfig(kind="lora", rank=2), 2),
        ExpertGroup(AdapterConfig(kind="mora", rank=2), 2),
    )
    config = MixtureConfig(groups=groups, router=RouterConfig(type="hierarchical", groups=2, k=1))
    torch.manual_seed(0)
    model = MoRAModel(mlp(), config, target_modules=["0"])
    model.add_adapter("plain", AdapterConfig(kind="vera", rank=4), target_modules=["0", "2"])
    model.save_pretrained(folder)
    return folder


@FUZZ
@given(
    path=st.lists(st.integers(0, 50), min_size=1, max_size=7),
    value=JSON | st.integers(-(10**9), 10**9),
    delete=st.booleans(),
)
def test_fuzzed_saved_configs_load_or_are_refused_unchanged(
    saved_mixture: Path, path: list[int], value: Any, delete: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "a"
        shutil.copytree(saved_mixture, folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        (folder / CONFIG_NAME).write_text(json.dumps(_mutate(config, path, value, delete)))
        _resign(folder)
        before = _snapshot(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _one_line_value_error(lambda: MoRAModel.from_pretrained(mlp(), folder))
        assert _snapshot(folder) == before
        if model is not None:  # the edit kept a loadable config: it loads what is saved
            saved = read_adapter(folder)[1]
            for k, v in model.adapter_state_dict().items():
                assert torch.equal(v, saved[k].to(v.dtype)), k


# -- export ----------------------------------------------------------------------------------------


def test_exported_peft_folders_carry_a_manifest(tmp_path: Path) -> None:
    router = RouterConfig(type="task", num_tasks=2)
    model = MoRAModel(mlp(), MixtureConfig(kind="lora", rank=2, experts=2, router=router))
    randomize_adapters(model)
    folder = model.export_task_peft(tmp_path / "task1", 1)
    files = verify_folder(folder, (LEGACY_CONFIG_NAME, WEIGHTS_NAME))
    assert json.loads(files[LEGACY_CONFIG_NAME])["peft_type"] == "LORA"
    assert not (folder / CONFIG_NAME).exists()
    raw = bytearray((folder / WEIGHTS_NAME).read_bytes())
    raw[-1] ^= 1
    (folder / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="changed or corrupted"):
        verify_folder(folder)
    with torch.no_grad():
        model.model[0].adapters["default"].banks[0].lora_B.fill_(math.nan)
    with pytest.raises(NonFiniteError):
        model.export_task_peft(tmp_path / "task1b", 1)
    assert not (tmp_path / "task1b").exists()
