"""PEFT's adapter folder as both directions read it: its file and key names, which layout a
folder has, the model's modules as PEFT sees them and PEFT's rules for matching
``target_modules`` and ``modules_to_save`` (:mod:`moracl.peft_files` has the whole mapping)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from moracl.adapters.base import AdapterConfig
from moracl.checkpoint import CONFIG_NAME, LEGACY_CONFIG_NAME, strict_json
from moracl.experts.mixture import Mixture, MixtureConfig
from moracl.files import read_regular
from moracl.layer import MoRALayer
from moracl.parse_fields import show
from moracl.targets import TargetSpec

__all__ = [
    "PEFT_CONFIG_NAME",
    "PICKLE_NAME",
    "PREFIX",
    "RANKNUM",
    "SUFFIXES",
    "SUPPORTED_PEFT_TYPES",
    "VERA_SHARED",
    "AdaptedModel",
    "FolderFormat",
    "exact_pattern",
    "folder_format",
    "peft_matches",
    "peft_saved_modules",
    "plain_modules",
    "regex",
]

PEFT_CONFIG_NAME = LEGACY_CONFIG_NAME  # "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
VERA_SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
SUPPORTED_PEFT_TYPES = ("LORA", "VERA", "ADALORA")
#: an AdaLoRA tensor older PEFT versions saved: each layer's initial rank, as a float ``(1,)``
RANKNUM = "ranknum"
#: PEFT tensor suffix -> moracl adapter tensor name, per PEFT type
SUFFIXES = {
    "LORA": {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        "lora_magnitude_vector": "magnitude",
    },
    "VERA": {"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"},
    "ADALORA": {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"},
}


class FolderFormat(str, Enum):
    """An adapter folder's layout: moracl's own (``moracl_config.json``) or PEFT's."""

    MORACL = "moracl"
    PEFT = "peft"


class AdaptedModel(Protocol):
    """What reading and writing PEFT folders use of a :class:`moracl.model.MoRAModel`."""

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


def plain_modules(root: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of ``root`` as PEFT sees the original model: adapted layers as
    their base, the adapters' own modules left out."""
    layers = [n for n, m in root.named_modules() if isinstance(m, MoRALayer)]
    out: dict[str, nn.Module] = {}
    for name, m in root.named_modules():
        if not name or any(name.startswith(f"{p}.") for p in layers):
            continue
        out[name] = m.base_layer if isinstance(m, MoRALayer) else m
    return out


def regex(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` compiled; a ``ValueError`` naming ``where`` if it is no regular expression."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a regular expression: {e}") from None


def peft_matches(spec: str | Sequence[str], names: Sequence[str], where: str = "") -> list[str]:
    """PEFT's ``target_modules`` matching: a string fully matches, a list entry equals the
    path or ends it after a dot."""
    if isinstance(spec, str):
        pattern = regex(spec, where)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if n in spec or any(n.endswith(f".{t}") for t in spec)]


def peft_saved_modules(names: Sequence[str], spec: Any, where: str) -> tuple[str, ...]:
    """The module paths PEFT's ``modules_to_save`` wraps (a path ending with a name;
    outermost only)."""
    if spec is None:
        return ()
    if not isinstance(spec, list) or not all(isinstance(v, str) and v for v in spec):
        raise ValueError(f"{where}: modules_to_save must be a list of names, got {show(spec)}")
    hits = [p for p in names if any(p.endswith(m) for m in spec)]
    return tuple(h for h in hits if not any(h.startswith(f"{o}.") for o in hits))
