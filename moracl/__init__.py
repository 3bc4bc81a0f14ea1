"""moracl: continual and multi-task learning with mixtures of adapter experts on PyTorch."""

import logging
import warnings

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
from moracl.experts.act import ACTLoop, ACTOutput, AdaptiveComputation
from moracl.experts.backend import RoutingBackend, routing_backend
from moracl.experts.mixture import ExpertGroup, Mixture, MixtureConfig
from moracl.experts.routers.config import RouterConfig
from moracl.layer import MoRALayer, MoRALinear
from moracl.model import MoRAModel
from moracl.optim import MoRAOptimizer, MoRAScheduler, SAMConfig

__version__ = "0.1.0"

# Avalanche imports qpsolvers (for GEM), which warns at import that no QP solver is installed;
# no moracl strategy solves a QP. Only that message of that module is ignored.
warnings.filterwarnings(
    "ignore", message="no QP solver found", category=UserWarning, module="qpsolvers"
)


class _DropEnumRegistration(logging.Filter):
    """Drops the note torch's pytree logs when torchao (imported by transformers whenever it is
    installed) registers its enums: a deprecation of ``register_constant`` on enums inside
    torchao, nothing a user can act on. Only that message of that logger is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_DropEnumRegistration())

__all__ = [
    "ACTLoop",
    "ACTOutput",
    "Adapter",
    "AdapterConfig",
    "AdaptiveComputation",
    "Compression",
    "DoRAConfig",
    "ExpertGroup",
    "LoRAConfig",
    "Mixture",
    "MixtureConfig",
    "MoRAConfig",
    "MoRALayer",
    "MoRALinear",
    "MoRAModel",
    "MoRAOptimizer",
    "MoRAScheduler",
    "ParamRole",
    "RouterConfig",
    "RoutingBackend",
    "SAMConfig",
    "VeRAConfig",
    "__version__",
    "routing_backend",
]
