"""Continual learning: moracl's Avalanche strategy and its classifier, metrics on the accuracy
matrix and the results file of a run.

In an Avalanche script::

    from moracl.continual import ContinualClassifier, GrowthConfig, MoRAStrategy

The strategy and the classifier import Avalanche, so they load on first use: importing the
metrics alone (``moracl.continual.metrics``, for reports) does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moracl.continual.metrics import (
    METRICS_FILE,
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StoppingRecord,
    StrategyResult,
)
from moracl.extras import require

if TYPE_CHECKING:
    from moracl.continual.derpp import DERPlusPlusPlugin
    from moracl.continual.inflora import InfLoRAPlugin, InfLoRAStrategy
    from moracl.continual.model import ContinualClassifier
    from moracl.continual.olora import OLoRAStrategy
    from moracl.continual.strategy import FastTemplate, GrowthConfig, MoRAStrategy

__all__ = [
    "METRICS_FILE",
    "AccuracyMatrix",
    "ContinualClassifier",
    "Cost",
    "DERPlusPlusPlugin",
    "FastTemplate",
    "GrowthConfig",
    "InfLoRAPlugin",
    "InfLoRAStrategy",
    "MoRAStrategy",
    "OLoRAStrategy",
    "RoutingDiagnostics",
    "RunResults",
    "StoppingRecord",
    "StrategyResult",
]

#: the names that import Avalanche, and the module each lives in
_LAZY = {
    "ContinualClassifier": "moracl.continual.model",
    "DERPlusPlusPlugin": "moracl.continual.derpp",
    "InfLoRAPlugin": "moracl.continual.inflora",
    "InfLoRAStrategy": "moracl.continual.inflora",
    "OLoRAStrategy": "moracl.continual.olora",
    "FastTemplate": "moracl.continual.strategy",
    "GrowthConfig": "moracl.continual.strategy",
    "MoRAStrategy": "moracl.continual.strategy",
}


def __getattr__(name: str) -> Any:
    """The Avalanche-backed names, imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(require(module, f"moracl.continual.{name}"), name)
    globals()[name] = value
    return value
