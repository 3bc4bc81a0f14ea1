"""Reading a PEFT adapter folder: :func:`read_peft` checks it against a model before any
tensor is created and gives it in moracl's terms; :func:`load_adapter_folder` adds such a
folder (or a moracl folder of one adapter) to a model as one more adapter.

Shape legend: ``r`` rank, ``i``/``o`` layer input/output sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moracl.adapter_files import (
    SavedAdapter,
    SavedLayout,
    check_header,
    expected_state,
    parse_layout,
)
from moracl.adapters.vera import VeRA
from moracl.checkpoint import WEIGHTS_NAME, TensorInfo, open_adapter, open_folder
from moracl.layer import MoRALayer, is_linear_like, linear_features
from moracl.parse_fields import show
from moracl.peft_config import base_config, check_options, integer, layer_config, target_names
from moracl.peft_layout import (
    PEFT_CONFIG_NAME,
    PICKLE_NAME,
    PREFIX,
    RANKNUM,
    SUFFIXES,
    SUPPORTED_PEFT_TYPES,
    VERA_SHARED,
    AdaptedModel,
    FolderFormat,
    exact_pattern,
    folder_format,
    peft_matches,
    peft_saved_modules,
    plain_modules,
    regex,
)

__all__ = [
    "PeftAdapter",
    "load_adapter_folder",
    "peft_vera_projections",
    "read_peft",
    "set_vera_projections",
]


@dataclass(frozen=True)
class PeftAdapter:
    """A checked PEFT folder in moracl's terms: ``layout`` (one adapter, its targets,
    ``modules_to_save``), ``tensors`` by moracl's names (for AdaLoRA each layer's
    ``rank_mask`` too: every triplet PEFT saved is one the budget kept), and for VeRA each
    target layer's projections ``(A (r × i), B (o × r))``."""

    layout: SavedLayout
    tensors: dict[str, Tensor]
    projections: dict[str, tuple[Tensor, Tensor]]


def _split_header(
    header: Mapping[str, TensorInfo],
    peft_type: str,
    modules: Mapping[str, nn.Module],
    saved: Sequence[str],
    name: str,
    where: str,
) -> tuple[dict[str, str], list[str]]:
    """``({moracl name: PEFT name}, target layer paths in file order)``; a key that is no
    adapter tensor of this type nor a tensor of ``modules_to_save`` raises naming it."""
    module_keys = {f"{m}.{k}" for m in saved for k in modules[m].state_dict()}
    renamed: dict[str, str] = {}
    targets: list[str] = []
    for key in header:
        if key in VERA_SHARED and peft_type == "VERA":
            continue
        if peft_type == "ADALORA" and key.endswith(f".{RANKNUM}"):
            continue  # checked by _check_ranknum
        if not key.startswith(PREFIX):
            raise ValueError(
                f"{where}: tensor {key!r} does not start with {PREFIX!r} (PEFT's key prefix)"
            )
        rest = key[len(PREFIX) :]
        if rest in module_keys:
            renamed[rest] = key
            continue
        for suffix, local in SUFFIXES[peft_type].items():
            if rest.endswith(f".{suffix}"):
                path = rest[: -len(suffix) - 1]
                renamed[f"{path}.adapters.{name}.{local}"] = key
                if path not in targets:
                    targets.append(path)
                break
        else:
            raise ValueError(
                f"{where}: tensor {key!r} is neither a {peft_type} tensor of a linear layer "
                f"({', '.join(SUFFIXES[peft_type])}) nor one of modules_to_save {list(saved)}"
            )
    return renamed, targets


def _check_targets(
    spec: str | list[str] | None,
    exclude: str | list[str] | None,
    saved_spec: list[str] | None,
    names: Sequence[str],
    modules: Mapping[str, nn.Module],
    targets: Sequence[str],
    where: str,
) -> None:
    """The layers the weights adapt exist, are linear and are the ones the config selects."""
    for path in targets:
        if path not in modules:
            raise ValueError(
                f"{where}: the weights adapt layer {path!r}, which the model does not have "
                f"(a different base model?)"
            )
        if not is_linear_like(modules[path]):
            raise ValueError(
                f"{where}: the weights adapt layer {path!r}, a {type(modules[path]).__name__}; "
                f"moracl adapts nn.Linear/Conv1D layers only"
            )
    if spec is None or spec == "all-linear":
        return  # PEFT resolved the names when it created the adapter: the weights say which
    chosen = peft_matches(spec, names, f"{where}: target_modules")
    if exclude:
        dropped = set(peft_matches(exclude, names, f"{where}: exclude_modules"))
        chosen = [c for c in chosen if c not in dropped]
    if saved_spec:  # PEFT never adapts a layer inside a module it saves whole
        inside = [regex(rf"(^|.*\.){m}($|\..*)", f"{where}: modules_to_save") for m in saved_spec]
        chosen = [c for c in chosen if not any(r.match(c) for r in inside)]
    if set(chosen) != set(targets):
        extra = sorted(set(chosen) - set(targets))[:5]
        missing = sorted(set(targets) - set(chosen))[:5]
        raise ValueError(
            f"{where}: target_modules={show(spec)} selects layers {extra} without weights in "
            f"the file and misses layers {missing} that have weights (the model differs from "
            f"the one the adapter was saved from, or the config was edited)"
        )


def peft_vera_projections(rank: int, d_in: int, d_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """PEFT's shared VeRA projections ``(A (r × d_in), B (d_out × r))`` drawn from
    ``projection_prng_key`` ``seed`` as PEFT draws them (Kaiming uniform, ``A`` first)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape: tuple[int, int]) -> Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)

    a = kaiming((rank, d_in))
    return a, kaiming((d_out, rank))


def _vera_shared(
    header: Mapping[str, TensorInfo], rank: int, d_in: int, d_out: int, where: str
) -> tuple[int, int] | None:
    """The shapes of the saved shared projections, checked to cover every layer (``None``
    when the file has none: they are regenerated)."""
    present = [k for k in VERA_SHARED if k in header]
    if not present:
        return None
    if len(present) == 1:
        raise ValueError(f"{where}: holds {present[0]!r} without its pair")
    a, b = header["base_model.vera_A"], header["base_model.vera_B"]
    if not (a.is_floating_point and b.is_floating_point):
        raise ValueError(f"{where}: the VeRA projections must be floating-point")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
            f"{where}: VeRA projections of shapes {a.shape}, {b.shape} do not have rank {rank}"
        )
    if a.shape[1] < d_in or b.shape[0] < d_out:
        raise ValueError(
            f"{where}: VeRA projections {a.shape}, {b.shape} are smaller than the largest "
            f"target layer ({d_in} -> {d_out})"
        )
    return a.shape[1], b.shape[0]


def _check_ranknum(
    header: Mapping[str, TensorInfo],
    loaded: Mapping[str, Tensor],
    targets: Sequence[str],
    rank: int,
    where: str,
) -> None:
    """The ``ranknum`` tensors older PEFT versions saved with AdaLoRA: each of a target layer,
    ``(1,)``, equal to ``init_r`` (the scaling's ``alpha / (ranknum + 1e-5)`` is moracl's only
    then)."""
    for key in header:
        if not key.endswith(f".{RANKNUM}"):
            continue
        path = key[len(PREFIX) : -len(RANKNUM) - 1] if key.startswith(PREFIX) else None
        if path not in targets:
            raise ValueError(f"{where}: tensor {key!r} is the ranknum of no adapted layer")
        value = loaded[key]
        if value.numel() != 1 or float(value.reshape(())) != float(rank):
            raise ValueError(
                f"{where}: tensor {key!r} is {value.tolist()}; PEFT's AdaLoRA scales by "
                f"alpha / (ranknum + 1e-5) with ranknum = init_r = {rank}, which moracl keeps"
            )


def read_peft(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = "default"
) -> PeftAdapter:
    """Check the PEFT folder ``directory`` against ``model`` (plain or adapted) and read it.

    Everything is checked before any tensor is created: the folder (no links; checksums when
    moracl wrote it), the config's options (refused as the module docstring lists), the
    tensor names against the config's ``target_modules`` and ``modules_to_save``, each name,
    shape and dtype against the model; then the tensors, which must be finite."""
    src = Path(directory)
    if not src.is_dir() or not os.path.lexists(src / PEFT_CONFIG_NAME):
        raise FileNotFoundError(
            f"no {PEFT_CONFIG_NAME} in {src} (expected a folder written by PEFT's save_pretrained)"
        )
    if not os.path.lexists(src / WEIGHTS_NAME) and os.path.lexists(src / PICKLE_NAME):
        raise ValueError(
            f"{src} holds {PICKLE_NAME}, a pickle: moracl reads safetensors only and never "
            f"unpickles; save the adapter again with PEFT's save_pretrained("
            f"safe_serialization=True), its default"
        )
    folder = open_folder(src, PEFT_CONFIG_NAME, unverified_ok=True)
    config, where = folder.config, str(folder.config_path)
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"{where}: peft_type={show(peft_type)} is not supported; moracl reads "
            f"{list(SUPPORTED_PEFT_TYPES)} (LoRA with use_rslora / use_dora, VeRA and AdaLoRA)"
        )
    check_options(config, peft_type, where)
    base = base_config(config, peft_type, where)
    modules = plain_modules(model)
    names = list(modules)
    saved_spec = config.get("modules_to_save")
    saved = peft_saved_modules(names, saved_spec, where)
    weights = str(folder.weights_path)
    renamed, targets = _split_header(
        folder.header, peft_type, modules, saved, adapter_name, weights
    )
    if not targets:
        raise ValueError(f"{weights}: holds no {peft_type} tensor of any layer")
    targets = [n for n in names if n in targets] + [t for t in targets if t not in modules]
    spec = target_names(config.get("target_modules"), "target_modules", where)
    exclude = target_names(config.get("exclude_modules"), "exclude_modules", where)
    _check_targets(spec, exclude, saved_spec, names, modules, targets, where)
    adapter_config = layer_config(base, config, targets, where)
    layout = SavedLayout(
        (SavedAdapter(adapter_name, adapter_config, tuple(targets)),), (adapter_name,), saved
    )
    header = {ours: folder.header[theirs] for ours, theirs in renamed.items()}
    expected = expected_state(model, layout)
    masks = {k: v for k, v in expected.items() if peft_type == "ADALORA" and _is_mask(k)}
    check_header({k: v for k, v in expected.items() if k not in masks}, header, weights)
    sizes = {t: linear_features(modules[t]) for t in targets}
    d_in = max(i for i, _ in sizes.values())
    d_out = max(o for _, o in sizes.values())
    shared = None
    if peft_type == "VERA":
        shared = _vera_shared(folder.header, adapter_config.rank, d_in, d_out, weights)
    loaded = folder.load_tensors()
    tensors = {ours: loaded[theirs] for ours, theirs in renamed.items()}
    if peft_type == "ADALORA":
        _check_ranknum(folder.header, loaded, targets, base.rank, weights)
        tensors.update({k: torch.ones(spec.shape, dtype=torch.bool) for k, spec in masks.items()})
    projections: dict[str, tuple[Tensor, Tensor]] = {}
    if peft_type == "VERA":
        if shared is None:
            key = integer(config, "projection_prng_key", 0, where)
            a, b = peft_vera_projections(adapter_config.rank, d_in, d_out, key)
        else:
            a, b = loaded["base_model.vera_A"].float(), loaded["base_model.vera_B"].float()
        projections = {t: (a[:, :i].clone(), b[:o].clone()) for t, (i, o) in sizes.items()}
    return PeftAdapter(layout, tensors, projections)


def _is_mask(key: str) -> bool:
    return key.endswith(".rank_mask")


@torch.no_grad()
def set_vera_projections(
    root: nn.Module, name: str, projections: Mapping[str, tuple[Tensor, Tensor]]
) -> None:
    """Give adapter ``name``'s VeRA layers of ``root`` the projections ``{path: (A, B)}``."""
    for path, (a, b) in projections.items():
        layer = root.get_submodule(path)
        adapter = layer.adapter(name) if isinstance(layer, MoRALayer) else None
        if not isinstance(adapter, VeRA):
            raise ValueError(f"layer {path!r} has no VeRA adapter {name!r}")
        adapter.vera_A.copy_(a)
        adapter.vera_B.copy_(b)


def _read_moracl_one(model: nn.Module, directory: str | os.PathLike[str], name: str) -> PeftAdapter:
    """A moracl folder of one adapter, checked against ``model`` and read with the adapter
    renamed ``name``."""
    folder = open_adapter(directory)
    layout = parse_layout(folder.config, str(folder.config_path))
    if len(layout.adapters) != 1:
        raise ValueError(
            f"{folder.config_path} holds adapters {[a.name for a in layout.adapters]}; a folder "
            f"loaded as one more adapter must hold exactly one"
        )
    only = layout.adapters[0]
    ours = SavedLayout(
        (SavedAdapter(name, only.config, only.targets),), (name,), layout.modules_to_save
    )
    old, new = f".adapters.{only.name}.", f".adapters.{name}."
    header = {k.replace(old, new, 1): v for k, v in folder.header.items()}
    check_header(expected_state(model, ours), header, str(folder.weights_path))
    tensors = {k.replace(old, new, 1): v for k, v in folder.load_tensors().items()}
    return PeftAdapter(ours, tensors, {})


@torch.no_grad()
def load_adapter_folder(
    model: AdaptedModel, directory: str | os.PathLike[str], adapter_name: str
) -> None:
    """Add adapter ``adapter_name`` to ``model`` from ``directory``: a PEFT folder, or a
    moracl folder holding one adapter (under whatever name it was saved).  The adapter is
    added, not activated (``set_adapter`` chooses).  Everything is checked first; nothing
    changes on error.  A folder with ``modules_to_save`` is refused: moracl keeps one trained
    copy of each such module, shared by the adapters."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter names are non-empty strings without dots, got {adapter_name!r}")
    if adapter_name in model.adapter_configs:
        raise ValueError(
            f"adapter {adapter_name!r} already exists; have {list(model.adapter_configs)}"
        )
    if folder_format(directory) is FolderFormat.PEFT:
        read = read_peft(model.model, directory, adapter_name)
    else:
        read = _read_moracl_one(model.model, directory, adapter_name)
    if read.layout.modules_to_save:
        raise ValueError(
            f"{directory} saves modules {list(read.layout.modules_to_save)} too; an adapter "
            f"added to a model cannot bring its own copies of modules_to_save (load the folder "
            f"with MoRAModel.from_pretrained instead)"
        )
    adapter = read.layout.adapters[0]
    model.add_adapter(adapter_name, adapter.config, target_modules=exact_pattern(adapter.targets))
    state = model.adapter_state_dict([adapter_name])
    for key, t in read.tensors.items():
        state[key].copy_(t)
    set_vera_projections(model.model, adapter_name, read.projections)
