"""What a saved adapter folder declares, checked against a model before anything is allocated.

``MoRAModel.from_pretrained`` reads a folder in this order, so that nothing the folder says
can make it allocate more than the folder's own size before being refused:

1. :func:`moracl.checkpoint.open_adapter`: links, checksums, strict JSON, the safetensors
   header (no tensor yet);
2. :func:`parse_layout`: the config's structure, every malformed key a ``ValueError`` naming it;
3. :func:`expected_state`: for every target layer of the model, each config's bounds
   (:func:`moracl.layer.check_fit`: rank, MoRA's ``r̂``, expert count) and the exact tensor
   shapes, from the adapter modules built on ``torch.device("meta")`` (no storage);
4. :func:`check_header`: the header's names, shapes and dtypes against those;
5. only then the tensors (refused if non-finite) and the adapted model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from moracl.adapters.base import AdapterConfig
from moracl.checkpoint import TensorInfo
from moracl.experts.mixture import MixtureConfig
from moracl.layer import MoRALayer, build_layer_adapter, check_fit, is_linear_like, linear_features
from moracl.parse_fields import check_string_keys, show

__all__ = [
    "SavedAdapter",
    "SavedLayout",
    "TensorSpec",
    "check_header",
    "config_from_dict",
    "expected_state",
    "parse_layout",
]

#: the keys of a moracl ``moracl_config.json``
LAYOUT_KEYS = ("format", "version", "adapters", "active", "modules_to_save", "base_model")


class TensorSpec(NamedTuple):
    """The shape and dtype a tensor of the model has."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SavedAdapter:
    """One adapter of a saved folder: its name, config and the layer paths it adapts."""

    name: str
    config: AdapterConfig | MixtureConfig
    targets: tuple[str, ...]


@dataclass(frozen=True)
class SavedLayout:
    """What ``moracl_config.json`` declares (``adapters`` in saved order); a PEFT folder is
    read into the same form (:func:`moracl.peft_files.read_peft`)."""

    adapters: tuple[SavedAdapter, ...]
    active: tuple[str, ...]
    modules_to_save: tuple[str, ...]


def config_from_dict(data: Any) -> AdapterConfig | MixtureConfig:
    """An adapter or mixture config from its ``to_dict`` form (``"mixture": true`` marks a
    mixture); anything malformed raises ``ValueError`` naming the key."""
    data = check_string_keys(data, "an adapter config")
    if data.get("mixture") is True:
        return MixtureConfig.from_dict(data)
    return AdapterConfig.from_dict(data)


def _names(value: Any, key: str, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a list of non-empty strings, got {show(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{key} must name at least one layer")
    if len(set(value)) != len(value):
        raise ValueError(f"{key} lists a name twice: {show(value)}")
    return tuple(value)


def parse_layout(config: Mapping[str, Any], where: str) -> SavedLayout:
    """The structure of a moracl adapter config (format and version already checked);
    ``ValueError`` naming ``where``, the key and what was expected."""
    unknown = sorted(set(config) - set(LAYOUT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(LAYOUT_KEYS)}")
    adapters = config.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(
            f"{where}: the checkpoint holds no adapter ('adapters' must be a non-empty object "
            f"of adapter name -> {{config, targets}}, got {show(adapters)})"
        )
    saved = []
    for name, spec in adapters.items():
        key = f"adapters.{name}"
        if not name or "." in name:
            raise ValueError(f"{where}: adapter names are non-empty without dots, got {name!r}")
        if not isinstance(spec, dict) or set(spec) != {"config", "targets"}:
            raise ValueError(f"{where}: {key} must be an object with exactly 'config', 'targets'")
        try:
            cfg = config_from_dict(spec["config"])
            targets = _names(spec["targets"], "targets", allow_empty=False)
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
        saved.append(SavedAdapter(name, cfg, targets))
    try:
        active = _names(config.get("active", []), "active", allow_empty=True)
        modules = _names(config.get("modules_to_save", []), "modules_to_save", allow_empty=True)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    missing = [n for n in active if n not in adapters]
    if missing:
        raise ValueError(f"{where}: active names {missing}, not among {list(adapters)}")
    if not isinstance(config.get("base_model", ""), str):
        raise ValueError(f"{where}: base_model must be a string")
    return SavedLayout(tuple(saved), active or (saved[0].name,), modules)


def _module(model: nn.Module, path: str, key: str) -> nn.Module:
    """The module at ``path`` as in the plain model (an adapted layer's base)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{key} names layer {path!r}, which the model does not have") from None
    return module.base_layer if isinstance(module, MoRALayer) else module


@torch.no_grad()
def expected_state(model: nn.Module, layout: SavedLayout) -> dict[str, TensorSpec]:
    """The name, shape and dtype of every tensor ``MoRAModel.from_pretrained`` would load
    into ``model`` for ``layout`` (an adapted layer counts as its base layer); checks each
    config against its layers first and allocates nothing (the adapters are built on the meta
    device)."""
    out: dict[str, TensorSpec] = {}
    for adapter in layout.adapters:
        for path in adapter.targets:
            module = _module(model, path, f"adapters.{adapter.name}.targets")
            if not is_linear_like(module):
                raise ValueError(
                    f"adapters.{adapter.name}.targets names layer {path!r}, a "
                    f"{type(module).__name__}, not nn.Linear/Conv1D"
                )
            d_in, d_out = linear_features(module)
            config = adapter.config
            if isinstance(config, AdapterConfig):
                config = config.for_layer(path)  # a pruned rank budget: this layer's rank
            check_fit(d_in, d_out, config, f"layer {path!r}")
            with torch.device("meta"):
                built = build_layer_adapter(d_in, d_out, config)
            for k, v in built.state_dict().items():
                out[f"{path}.adapters.{adapter.name}.{k}"] = TensorSpec(tuple(v.shape), v.dtype)
    for path in layout.modules_to_save:
        module = _module(model, path, "modules_to_save")
        for k, v in module.state_dict().items():
            out[f"{path}.{k}"] = TensorSpec(tuple(v.shape), v.dtype)
    return out


def check_header(
    expected: Mapping[str, TensorSpec], header: Mapping[str, TensorInfo], where: str
) -> None:
    """Raise ``ValueError`` naming the tensor (and its layer) unless ``header`` declares
    exactly the tensors of ``expected``, each with its shape and a dtype it can hold: a
    floating-point parameter takes any floating-point dtype (cast on load), any other tensor
    exactly its own."""
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: checkpoint does not fit the model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}"
        )
    for key, spec in expected.items():
        info = header[key]
        layer = key.split(".adapters.")[0]
        if info.shape != spec.shape:
            raise ValueError(
                f"layer {layer!r}: saved tensor {key!r} has shape {info.shape} but the model's "
                f"has shape {spec.shape} (a different base model, or an edited file)"
            )
        fits = (
            info.is_floating_point
            if spec.dtype.is_floating_point
            else info.torch_dtype == spec.dtype
        )
        if not fits:
            want = "a floating-point dtype" if spec.dtype.is_floating_point else str(spec.dtype)
            raise ValueError(
                f"layer {layer!r}: saved tensor {key!r} has dtype {info.dtype} but the model's "
                f"needs {want} (an edited file)"
            )
