"""Continual learning: metrics on the accuracy matrix and the results file of a run."""

from moracl.continual.metrics import (
    METRICS_FILE,
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StoppingRecord,
    StrategyResult,
)

__all__ = [
    "METRICS_FILE",
    "AccuracyMatrix",
    "Cost",
    "RoutingDiagnostics",
    "RunResults",
    "StoppingRecord",
    "StrategyResult",
]
