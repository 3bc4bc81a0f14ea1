"""moracl: continual and multi-task learning with mixtures of adapter experts on PyTorch."""

from moracl.adapters import (
    Adapter,
    AdapterConfig,
    Compression,
    DoRAConfig,
    LoRAConfig,
    MoRAConfig,
    ParamRole,
    VeRAConfig,
)
from moracl.layer import MoRALayer, MoRALinear
from moracl.model import MoRAModel

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Compression",
    "DoRAConfig",
    "LoRAConfig",
    "MoRAConfig",
    "MoRALayer",
    "MoRALinear",
    "MoRAModel",
    "ParamRole",
    "VeRAConfig",
    "__version__",
]
