"""Adapter kinds, one folder each, registered by name in :data:`ADAPTERS`."""

from moracl.adapters import dora, lora, mora, vera  # noqa: F401  (registers the kinds)
from moracl.adapters.adalora import AdaLoRA, AdaLoRAConfig, RankAllocator, orth_loss
from moracl.adapters.base import (
    ADAPTERS,
    Adapter,
    AdapterConfig,
    ParamRole,
    build_adapter,
    iter_param_roles,
    register_adapter,
)
from moracl.adapters.delta_lora import DeltaLoRA, DeltaLoRAConfig, DeltaLoRAUpdater
from moracl.adapters.dora import DoRA, DoRAConfig
from moracl.adapters.dylora import DyLoRA, DyLoRAConfig, DyLoRAUpdate
from moracl.adapters.lora import LoRA, LoRAConfig
from moracl.adapters.mora import Compression, MoRA, MoRAConfig, square_size
from moracl.adapters.vera import VeRA, VeRAConfig

__all__ = [
    "ADAPTERS",
    "AdaLoRA",
    "AdaLoRAConfig",
    "Adapter",
    "AdapterConfig",
    "Compression",
    "DeltaLoRA",
    "DeltaLoRAConfig",
    "DeltaLoRAUpdater",
    "DoRA",
    "DoRAConfig",
    "DyLoRA",
    "DyLoRAConfig",
    "DyLoRAUpdate",
    "LoRA",
    "LoRAConfig",
    "MoRA",
    "MoRAConfig",
    "ParamRole",
    "RankAllocator",
    "VeRA",
    "VeRAConfig",
    "build_adapter",
    "iter_param_roles",
    "orth_loss",
    "register_adapter",
    "square_size",
]
