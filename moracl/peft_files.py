"""PEFT adapter folders, both ways: read what ``peft.PeftModel.save_pretrained`` writes, write
what ``peft.PeftModel.from_pretrained`` loads.  PEFT itself is never imported: the files are
read and written here, safetensors only (a pickled ``adapter_model.bin`` is refused).

PEFT's folder is ``adapter_config.json`` (``peft_type``, ``r``, ``target_modules``, ...) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<layer path>.<tensor>`` (the
adapter name dropped).  What maps to what:

=============================================  ===============================================
PEFT                                           moracl
=============================================  ===============================================
``LORA`` ``r``, ``lora_alpha``                 ``LoRAConfig(rank, alpha)``
``use_rslora``                                 ``rslora=True``
``use_dora``                                   ``DoRAConfig`` (same fields)
``lora_dropout`` / ``vera_dropout``            ``dropout``
``VERA`` ``r``, ``d_initial``                  ``VeRAConfig(rank, d_initial)``
``lora_A.weight`` ``(r, i)``                   ``lora_A``
``lora_B.weight`` ``(o, r)``                   ``lora_B``
``lora_magnitude_vector`` ``(o,)``             DoRA's ``magnitude``
``vera_lambda_d`` ``(r,)``, ``vera_lambda_b``  VeRA's ``lambda_d``, ``lambda_b``
``base_model.vera_A`` / ``vera_B`` (shared)    each layer's ``vera_A``/``vera_B``: the slices
                                               ``A[:, :i]``, ``B[:o]`` PEFT uses
``modules_to_save``                            ``modules_to_save`` (trained copies)
``fan_in_fan_out`` (GPT-2 ``Conv1D``)          found from the layer itself
=============================================  ===============================================

PEFT's VeRA shares one ``A (r × max i)`` and ``B (max o × r)`` over every target layer and
slices them; moracl's VeRA draws one projection per layer shape from ``projection_seed``.
Loading a PEFT VeRA adapter therefore sets each layer's projections to PEFT's slices (read
from the file when ``save_projection`` put them there, else regenerated from
``projection_prng_key`` exactly as PEFT draws them); such an adapter is written back in
PEFT's format (moracl's own cannot carry the projections).  Writing a moracl VeRA adapter in
PEFT's format needs its projections to be slices of one shared pair (target layers of one
input size; the up projections always are).

Refused, each with a ``ValueError`` naming the value: other ``peft_type``s, ``bias`` other
than ``"none"``, ``rank_pattern``/``alpha_pattern`` giving layers different ranks or scales
(one moracl adapter has one config), layer selection by ``layers_to_transform``, LoRA on
embeddings or convolutions, initialisations that rewrite the base weights (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA: convert them in PEFT first), and any other PEFT option set to a
non-default value.  Writing refuses MoRA adapters and mixtures, except one task's update of
a task-routed mixture (``task_id``; :mod:`moracl.experts.export`).

Shape legend: ``r`` rank, ``i``/``o`` layer input/output sizes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moracl.adapter_files import (
    SavedAdapter,
    SavedLayout,
    check_header,
    expected_state,
    parse_layout,
)
from moracl.adapters.base import AdapterConfig
from moracl.adapters.dora import DoRAConfig
from moracl.adapters.lora import LoRAConfig
from moracl.adapters.vera import VeRA, VeRAConfig
from moracl.adapters.vera.module import shared_projection
from moracl.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    WEIGHTS_NAME,
    TensorInfo,
    open_adapter,
    open_folder,
    safetensors_bytes,
    strict_json,
    write_files,
)
from moracl.experts.mixture import Mixture, MixtureConfig
from moracl.files import read_regular
from moracl.guard import assert_finite, finite_json
from moracl.layer import MoRALayer, is_linear_like, linear_features
from moracl.parse_fields import show
from moracl.targets import TargetSpec

__all__ = [
    "PEFT_CONFIG_NAME",
    "SUPPORTED_PEFT_TYPES",
    "AdaptedModel",
    "FolderFormat",
    "PeftAdapter",
    "folder_format",
    "load_adapter_folder",
    "peft_vera_projections",
    "read_peft",
    "save_peft",
    "write_lora_folder",
]

PEFT_CONFIG_NAME = LEGACY_CONFIG_NAME  # "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
VERA_SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
SUPPORTED_PEFT_TYPES = ("LORA", "VERA")
#: PEFT tensor suffix -> moracl adapter tensor name, per PEFT type
SUFFIXES = {
    "LORA": {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        "lora_magnitude_vector": "magnitude",
    },
    "VERA": {"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"},
}
#: config keys read below
READ = {
    "LORA": (
        "r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "rank_pattern",
        "alpha_pattern", "init_lora_weights", "eva_config",
    ),
    "VERA": (
        "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
        "init_weights",
    ),
}  # fmt: skip
#: config keys of either type: read below, or metadata that does not change the adapter
COMMON = (
    "peft_type", "target_modules", "exclude_modules", "modules_to_save", "bias",
    "fan_in_fan_out", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying",
)  # fmt: skip
#: ``init_lora_weights`` values that rewrite the base model's weights at initialisation
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


class FolderFormat(str, Enum):
    """An adapter folder's layout: moracl's own (``moracl_config.json``) or PEFT's."""

    MORACL = "moracl"
    PEFT = "peft"


class AdaptedModel(Protocol):
    """What these functions use of a :class:`moracl.model.MoRAModel`."""

    model: nn.Module
    adapter_configs: dict[str, AdapterConfig | MixtureConfig]
    adapter_targets: dict[str, list[str]]
    saved_modules: list[str]

    def add_adapter(
        self, name: str, config: AdapterConfig | MixtureConfig, *, target_modules: TargetSpec
    ) -> list[str]: ...

    def adapted_layers(self) -> Iterator[tuple[str, MoRALayer]]: ...

    def mixtures(self) -> Iterator[tuple[str, Mixture]]: ...

    def task_factors(self, task_id: int) -> dict[str, tuple[Tensor, Tensor]]: ...

    def adapter_state_dict(self, names: Sequence[str] | None = None) -> dict[str, Tensor]: ...

    @property
    def active_adapters(self) -> Any: ...


@dataclass(frozen=True)
class PeftAdapter:
    """A checked PEFT folder in moracl's terms: ``layout`` (one adapter, its targets,
    ``modules_to_save``), ``tensors`` by moracl's names, and for VeRA each target layer's
    projections ``(A (r × i), B (o × r))``."""

    layout: SavedLayout
    tensors: dict[str, Tensor]
    projections: dict[str, tuple[Tensor, Tensor]]


def exact_pattern(paths: Sequence[str]) -> str:
    """A regular expression that fully matches exactly ``paths``."""
    return "|".join(re.escape(p) for p in paths)


def folder_format(directory: str | os.PathLike[str]) -> FolderFormat:
    """Whether ``directory`` is a moracl folder or a PEFT one (an ``adapter_config.json`` with
    ``peft_type``); a missing or unreadable config reads as moracl's, whose loader names
    the problem."""
    src = Path(directory)
    if os.path.lexists(src / CONFIG_NAME) or not os.path.lexists(src / PEFT_CONFIG_NAME):
        return FolderFormat.MORACL
    try:
        config = strict_json(read_regular(src / PEFT_CONFIG_NAME), str(src / PEFT_CONFIG_NAME))
    except (OSError, ValueError):
        return FolderFormat.MORACL
    if isinstance(config, dict) and "peft_type" in config and "format" not in config:
        return FolderFormat.PEFT
    return FolderFormat.MORACL


# -- reading ----------------------------------------------------------------------------------


def _plain_modules(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of ``root`` as PEFT sees the original model: adapted layers as
    their base, the adapters' own modules left out."""
    layers = [n for n, m in root.named_modules() if isinstance(m, MoRALayer)]
    out: dict[str, nn.Module] = {}
    for name, m in root.named_modules():
        if not name or any(name.startswith(f"{p}.") for p in layers):
            continue
        out[name] = m.base_layer if isinstance(m, MoRALayer) else m
    return out


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a regular expression: {e}") from None


def _peft_matches(spec: str | Sequence[str], names: Sequence[str], where: str = "") -> list[str]:
    """PEFT's ``target_modules`` matching: a string fully matches, a list entry equals the
    path or ends it after a dot."""
    if isinstance(spec, str):
        pattern = _regex(spec, where)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if n in spec or any(n.endswith(f".{t}") for t in spec)]


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _number(config: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {show(value)}")
    return value


def _integer(config: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {show(value)}")
    return value


def _flag(config: Mapping[str, Any], key: str, where: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {show(value)}")
    return value


def _names(value: Any, key: str, where: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"{where}: {key} must be a string or a list of names, got {show(value)}")


def _patterns(config: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise ValueError(f"{where}: {key} must be an object of name -> number, got {show(value)}")
    return dict(value)


def _pattern_value(patterns: Mapping[str, float], path: str, default: float, where: str) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of
    ``path`` after a dot."""
    for key, value in patterns.items():
        if _regex(rf"(.*\.)?({key})$", where).match(path):
            return value
    return default


def _check_options(config: Mapping[str, Any], peft_type: str, where: str) -> None:
    """Refuse every PEFT option moracl cannot honour, naming it."""
    known = set(COMMON) | set(READ[peft_type])
    for key, value in config.items():
        if key not in known and not _empty(value):
            raise ValueError(
                f"{where}: {key}={show(value)} has no moracl equivalent (moracl reads PEFT "
                f"{peft_type} adapters with that option unset)"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{where}: bias={show(bias)}: moracl adapters train no biases; only bias='none' "
            f"adapters can be read"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} rewrote the base model's weights when the "
            f"adapter was created, so it does not apply to the original model; convert it in "
            f"PEFT first (save_pretrained(path_initial_model_for_weight_conversion=...))"
        )


def _base_config(config: Mapping[str, Any], peft_type: str, where: str) -> AdapterConfig:
    """The adapter config every layer shares before ``rank_pattern``/``alpha_pattern``."""
    if peft_type == "VERA":
        fields: dict[str, Any] = {
            "kind": "vera",
            "rank": _integer(config, "r", 256, where),
            "dropout": _number(config, "vera_dropout", 0.0, where),
            "d_initial": _number(config, "d_initial", 0.1, where),
            # the projections themselves are PEFT's, set after the adapter is built
            "projection_seed": max(_integer(config, "projection_prng_key", 0, where), 0),
        }
    else:
        fields = {
            "kind": "dora" if _flag(config, "use_dora", where) else "lora",
            "rank": _integer(config, "r", 8, where),
            "alpha": float(_number(config, "lora_alpha", 8, where)),
            "rslora": _flag(config, "use_rslora", where),
            "dropout": _number(config, "lora_dropout", 0.0, where),
        }
    try:
        return AdapterConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _layer_config(
    base: AdapterConfig, config: Mapping[str, Any], targets: Sequence[str], where: str
) -> AdapterConfig:
    """``base`` with the rank and alpha ``rank_pattern``/``alpha_pattern`` give every target,
    refused unless they give all of them the same."""
    if not isinstance(base, LoRAConfig):
        return base
    ranks = _patterns(config, "rank_pattern", where)
    alphas = _patterns(config, "alpha_pattern", where)
    chosen = {
        t: (
            _pattern_value(ranks, t, base.rank, f"{where}: rank_pattern"),
            _pattern_value(alphas, t, base.alpha, f"{where}: alpha_pattern"),
        )
        for t in targets
    }
    distinct = sorted(set(chosen.values()))
    if len(distinct) > 1:
        example = {t: chosen[t] for t in list(chosen)[:4]}
        raise ValueError(
            f"{where}: rank_pattern={show(ranks)} / alpha_pattern={show(alphas)} give the layers "
            f"different (rank, alpha): {example} ...; one moracl adapter has one rank and alpha "
            f"on every layer (save the adapter in PEFT with one r and lora_alpha)"
        )
    rank, alpha = distinct[0]
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"{where}: rank_pattern gives rank {rank!r}; expected an integer")
    try:
        return base.replace(rank=rank, alpha=float(alpha))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _saved_modules(names: Sequence[str], spec: Any, where: str) -> tuple[str, ...]:
    """The module paths PEFT's ``modules_to_save`` wraps (a path ending with a name;
    outermost only)."""
    if spec is None:
        return ()
    if not isinstance(spec, list) or not all(isinstance(v, str) and v for v in spec):
        raise ValueError(f"{where}: modules_to_save must be a list of names, got {show(spec)}")
    hits = [p for p in names if any(p.endswith(m) for m in spec)]
    return tuple(h for h in hits if not any(h.startswith(f"{o}.") for o in hits))


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
    chosen = _peft_matches(spec, names, f"{where}: target_modules")
    if exclude:
        dropped = set(_peft_matches(exclude, names, f"{where}: exclude_modules"))
        chosen = [c for c in chosen if c not in dropped]
    if saved_spec:  # PEFT never adapts a layer inside a module it saves whole
        inside = [_regex(rf"(^|.*\.){m}($|\..*)", f"{where}: modules_to_save") for m in saved_spec]
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
            f"{list(SUPPORTED_PEFT_TYPES)} (LoRA with use_rslora / use_dora, and VeRA)"
        )
    _check_options(config, peft_type, where)
    base = _base_config(config, peft_type, where)
    modules = _plain_modules(model)
    names = list(modules)
    saved_spec = config.get("modules_to_save")
    saved = _saved_modules(names, saved_spec, where)
    weights = str(folder.weights_path)
    renamed, targets = _split_header(
        folder.header, peft_type, modules, saved, adapter_name, weights
    )
    if not targets:
        raise ValueError(f"{weights}: holds no {peft_type} tensor of any layer")
    targets = [n for n in names if n in targets] + [t for t in targets if t not in modules]
    spec = _names(config.get("target_modules"), "target_modules", where)
    exclude = _names(config.get("exclude_modules"), "exclude_modules", where)
    _check_targets(spec, exclude, saved_spec, names, modules, targets, where)
    adapter_config = _layer_config(base, config, targets, where)
    layout = SavedLayout(
        (SavedAdapter(adapter_name, adapter_config, tuple(targets)),), (adapter_name,), saved
    )
    header = {ours: folder.header[theirs] for ours, theirs in renamed.items()}
    check_header(expected_state(model, layout), header, weights)
    sizes = {t: linear_features(modules[t]) for t in targets}
    d_in = max(i for i, _ in sizes.values())
    d_out = max(o for _, o in sizes.values())
    shared = None
    if peft_type == "VERA":
        shared = _vera_shared(folder.header, adapter_config.rank, d_in, d_out, weights)
    loaded = folder.load_tensors()
    tensors = {ours: loaded[theirs] for ours, theirs in renamed.items()}
    projections: dict[str, tuple[Tensor, Tensor]] = {}
    if peft_type == "VERA":
        if shared is None:
            key = _integer(config, "projection_prng_key", 0, where)
            a, b = peft_vera_projections(adapter_config.rank, d_in, d_out, key)
        else:
            a, b = loaded["base_model.vera_A"].float(), loaded["base_model.vera_B"].float()
        projections = {t: (a[:, :i].clone(), b[:o].clone()) for t, (i, o) in sizes.items()}
    return PeftAdapter(layout, tensors, projections)


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


# -- writing ----------------------------------------------------------------------------------


def _write_peft(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write a PEFT folder (with moracl's ``checksums.json`` beside it, which PEFT ignores);
    non-finite values are refused before anything is written."""
    assert_finite(tensors, f"PEFT adapter for {directory}")
    text = finite_json(config, str(directory / PEFT_CONFIG_NAME), indent=2, sort_keys=True)
    files = {
        WEIGHTS_NAME: safetensors_bytes(tensors, {"format": "pt"}),
        PEFT_CONFIG_NAME: (text + "\n").encode(),
    }
    return write_files(directory, files, stale=[CONFIG_NAME])


def _common(
    targets: str | list[str], modules: Sequence[str], fan_in_fan_out: bool
) -> dict[str, Any]:
    return {
        "target_modules": targets,
        "modules_to_save": list(modules) or None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def write_lora_folder(
    directory: str | os.PathLike[str],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    fan_in_fan_out: bool = False,
    target_modules: str | list[str] | None = None,
    modules: Mapping[str, Tensor] | None = None,
) -> Path:
    """Save ``{layer path: (A (r × i), B (o × r))}`` as a PEFT LoRA adapter with scaling 1
    (``lora_alpha = r``; layers of another rank through ``rank_pattern``/``alpha_pattern``).

    ``target_modules`` defaults to the sorted paths; ``modules`` are ``modules_to_save``
    tensors by ``<module path>.<name>``, with ``modules_to_save`` their paths."""
    ranks = {path: int(a.shape[0]) for path, (a, _) in factors.items()}
    r0 = max(ranks.values())
    modules = dict(modules or {})
    saved = sorted({k.rsplit(".", 1)[0] for k in modules})
    config = {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": {p: r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {p: r for p, r in ranks.items() if r != r0},
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        **_common(
            sorted(factors) if target_modules is None else target_modules, saved, fan_in_fan_out
        ),
    }
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().float()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().float()
    tensors.update({f"{PREFIX}{k}": v.detach() for k, v in modules.items()})
    return _write_peft(Path(directory), config, tensors)


def _peft_targets(
    targets: Sequence[str], names: Sequence[str], saved: Sequence[str]
) -> str | list[str]:
    """``target_modules`` selecting exactly ``targets`` under PEFT's matching: the list of
    paths when it does, else an exact regular expression.  A target inside a module of
    ``modules_to_save`` is refused (PEFT never adapts those)."""
    for t in targets:
        for m in saved:
            if re.match(rf"(^|.*\.){m}($|\..*)", t):
                raise ValueError(
                    f"layer {t!r} is adapted and inside modules_to_save entry {m!r}; PEFT never "
                    f"adapts a module it saves whole"
                )
    listed = sorted(targets)
    if set(_peft_matches(listed, names)) == set(targets):
        return listed
    return exact_pattern(listed)


def _module_tensors(model: AdaptedModel, names: Sequence[str]) -> dict[str, Tensor]:
    """``modules_to_save`` tensors by ``<path>.<name>``, refusing what PEFT cannot match."""
    out: dict[str, Tensor] = {}
    layers = dict(model.adapted_layers())
    for path in model.saved_modules:
        if path in layers:
            raise ValueError(
                f"module {path!r} is both adapted and in modules_to_save; PEFT cannot save both"
            )
        for k, v in model.model.get_submodule(path).state_dict().items():
            out[f"{path}.{k}"] = v
    hits = _saved_modules(names, list(model.saved_modules) or None, "modules_to_save")
    if set(hits) != set(model.saved_modules):
        raise ValueError(
            f"PEFT matches modules_to_save by suffix: {model.saved_modules} would also select "
            f"{sorted(set(hits) - set(model.saved_modules))[:5]}"
        )
    return out


def _fan_in_fan_out(layers: Mapping[str, MoRALayer], targets: Sequence[str], name: str) -> bool:
    kinds = {layers[t].transposed for t in targets}
    if len(kinds) > 1:
        raise ValueError(
            f"adapter {name!r} adapts both nn.Linear and Conv1D layers; PEFT's fan_in_fan_out "
            f"is one setting per adapter: target one kind of layer"
        )
    return kinds.pop()


def _vera_tensors(
    layers: Mapping[str, MoRALayer], targets: Sequence[str], name: str
) -> dict[str, Tensor]:
    """VeRA's tensors in PEFT's layout: the shared projections (each layer's must be their
    slices) and every layer's scaling vectors."""
    adapters: dict[str, VeRA] = {}
    for t in targets:
        adapter = layers[t].adapter(name)
        assert isinstance(adapter, VeRA)  # the adapter config is a VeRAConfig
        adapters[t] = adapter
    widest = max(targets, key=lambda t: layers[t].in_features)
    tallest = max(targets, key=lambda t: layers[t].out_features)
    a, b = adapters[widest].vera_A, adapters[tallest].vera_B  # (r, max i), (max o, r)
    for t, adapter in adapters.items():
        i, o = layers[t].in_features, layers[t].out_features
        if not torch.equal(adapter.vera_A, a[:, :i]) or not torch.equal(adapter.vera_B, b[:o]):
            raise ValueError(
                f"VeRA adapter {name!r}: PEFT shares one projection pair over all layers and "
                f"slices it, but layer {t!r} ({i} -> {o}) has projections of its own (moracl "
                f"draws one per layer shape): write VeRA in PEFT's format for target layers of "
                f"one input size (or an adapter that was loaded from PEFT)"
            )
    tensors = {"base_model.vera_A": a.float(), "base_model.vera_B": b.float()}
    for t, adapter in adapters.items():
        tensors[f"{PREFIX}{t}.vera_lambda_d"] = adapter.lambda_d.detach()
        tensors[f"{PREFIX}{t}.vera_lambda_b"] = adapter.lambda_b.detach()
    return tensors


def _peft_adapter(
    model: AdaptedModel, name: str, names: Sequence[str], modules: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Adapter ``name``'s PEFT config and tensors, or ``ValueError`` naming what PEFT cannot
    represent."""
    config = model.adapter_configs[name]
    targets = model.adapter_targets[name]
    layers = dict(model.adapted_layers())
    common = _common(
        _peft_targets(targets, names, model.saved_modules),
        model.saved_modules,
        _fan_in_fan_out(layers, targets, name),
    )
    tensors = {f"{PREFIX}{k}": v.detach() for k, v in modules.items()}
    if isinstance(config, LoRAConfig):  # DoRA too
        peft: dict[str, Any] = {
            "peft_type": "LORA",
            "r": config.rank,
            "lora_alpha": config.alpha,
            "use_rslora": config.rslora,
            "use_dora": isinstance(config, DoRAConfig),
            "lora_dropout": config.dropout,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        for t in targets:
            state = layers[t].adapter(name).state_dict()
            tensors[f"{PREFIX}{t}.lora_A.weight"] = state["lora_A"]
            tensors[f"{PREFIX}{t}.lora_B.weight"] = state["lora_B"]
            if "magnitude" in state:
                tensors[f"{PREFIX}{t}.lora_magnitude_vector"] = state["magnitude"]
    elif isinstance(config, VeRAConfig):
        peft = {
            "peft_type": "VERA",
            "r": config.rank,
            "projection_prng_key": config.projection_seed,
            "save_projection": True,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
        }
        tensors.update(_vera_tensors(layers, targets, name))
    else:
        kind = "mixture of experts" if isinstance(config, MixtureConfig) else config.kind
        raise ValueError(
            f"adapter {name!r} is a {kind} adapter, which PEFT cannot represent; PEFT's format "
            f"holds lora (rslora), dora and vera adapters, and one task of a task-routed mixture "
            f"(task_id=...)"
        )
    return {**peft, **common}, tensors


def save_peft(
    model: AdaptedModel,
    directory: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    task_id: int | None = None,
) -> Path:
    """Write ``model``'s adapters ``names`` (default: all) in PEFT's layout into
    ``directory``; returns it.

    One adapter goes into ``directory`` itself; of several, the one named ``"default"`` does
    and each other into ``directory/<name>`` (PEFT's layout for several adapters).  With
    ``task_id``, task ``task_id``'s update of the active task-routed mixtures is written as
    one LoRA.  ``modules_to_save`` go with every adapter.  What PEFT cannot represent is
    refused, naming the adapter, before anything is written."""
    layers = dict(model.adapted_layers())
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("save_pretrained on a merged model: unmerge() first")
    plain = list(_plain_modules(model.model))
    modules = _module_tensors(model, plain)
    out = Path(directory)
    if task_id is not None:
        if names is not None:
            raise ValueError(
                "task_id writes the active task-routed mixtures' update for one task; "
                f"names={list(names)!r} cannot be combined with it"
            )
        other = [
            n for n in model.active_adapters
            if not isinstance(model.adapter_configs[n], MixtureConfig)
        ]  # fmt: skip
        if other:
            raise ValueError(
                f"task_id writes only the mixtures' update, but adapters {other} are active too"
            )
        factors = model.task_factors(task_id)
        fan = _fan_in_fan_out(layers, list(factors), "of the mixtures")
        targets = _peft_targets(list(factors), plain, model.saved_modules)
        return write_lora_folder(
            out, factors, fan_in_fan_out=fan, target_modules=targets, modules=modules
        )
    chosen = list(model.adapter_configs) if names is None else list(names)
    if not chosen:
        raise ValueError("names is empty; name at least one adapter to save")
    for n in chosen:
        if n not in model.adapter_configs:
            raise ValueError(f"unknown adapter {n!r}; have {list(model.adapter_configs)}")
    folders = {
        n: out if len(chosen) == 1 or n == "default" else out / n for n in chosen
    }  # fmt: skip
    written = {n: _peft_adapter(model, n, plain, modules) for n in chosen}  # checks all first
    for n, (config, tensors) in written.items():
        _write_peft(folders[n], config, tensors)
    return out


def check_moracl_representable(model: AdaptedModel, names: Sequence[str]) -> None:
    """Refuse to save in moracl's format a VeRA adapter whose projections came from PEFT:
    moracl's format regenerates them from ``projection_seed``, which cannot give PEFT's."""
    for path, layer in model.adapted_layers():
        for n in names:
            adapter = layer.adapters[n] if n in layer.adapters else None  # noqa: SIM401
            if isinstance(adapter, VeRA) and not _seeded(adapter):
                raise ValueError(
                    f"adapter {n!r} (layer {path!r}) has VeRA projections read from a PEFT "
                    f"folder, which moracl's format cannot carry (it regenerates them from "
                    f"projection_seed); save it with format='peft'"
                )


def _seeded(adapter: VeRA) -> bool:
    """Whether ``adapter``'s projections are the ones its ``projection_seed`` gives."""
    r, seed = adapter.config.rank, adapter.config.projection_seed
    a = shared_projection(r, adapter.in_features, seed, 0)
    b = shared_projection(adapter.out_features, r, seed, 1)
    return torch.equal(adapter.vera_A.cpu().float(), a) and torch.equal(
        adapter.vera_B.cpu().float(), b
    )
