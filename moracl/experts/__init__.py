"""Experts: routers returning a typed :class:`RoutingResult`, and the auxiliary losses.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``k`` chosen, ``t`` tasks,
``g`` groups.
"""

from moracl.experts.losses import load_balance_loss, router_z_loss, routing_entropy
from moracl.experts.routers import (
    ROUTERS,
    DynamicRouter,
    HierarchicalRouter,
    LogitRouter,
    Router,
    RouterConfig,
    SoftRouter,
    TaskRouter,
    TopKRouter,
    build_router,
    register_router,
)
from moracl.experts.routing import RoutingResult, RoutingStats

__all__ = [
    "ROUTERS",
    "DynamicRouter",
    "HierarchicalRouter",
    "LogitRouter",
    "Router",
    "RouterConfig",
    "RoutingResult",
    "RoutingStats",
    "SoftRouter",
    "TaskRouter",
    "TopKRouter",
    "build_router",
    "load_balance_loss",
    "register_router",
    "router_z_loss",
    "routing_entropy",
]
