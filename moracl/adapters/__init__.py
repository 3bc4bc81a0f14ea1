"""Adapter kinds, one folder each, registered by name in :data:`ADAPTERS`."""

from moracl.adapters import dora, lora, mora, vera  # noqa: F401  (registers the kinds)
from moracl.adapters.base import (
    ADAPTERS,
    Adapter,
    AdapterConfig,
    ParamRole,
    build_adapter,
    iter_param_roles,
    register_adapter,
)
from moracl.adapters.dora import DoRA, DoRAConfig
from moracl.adapters.lora import LoRA, LoRAConfig
from moracl.adapters.mora import Compression, MoRA, MoRAConfig, square_size
from moracl.adapters.vera import VeRA, VeRAConfig

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfig",
    "Compression",
    "DoRA",
    "DoRAConfig",
    "LoRA",
    "LoRAConfig",
    "MoRA",
    "MoRAConfig",
    "ParamRole",
    "VeRA",
    "VeRAConfig",
    "build_adapter",
    "iter_param_roles",
    "register_adapter",
    "square_size",
]
