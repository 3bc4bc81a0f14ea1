"""Experts: routers returning a typed :class:`RoutingResult`, expert banks, the mixture,
the routing backends and the auxiliary losses.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``k`` chosen, ``t`` tasks,
``g`` groups.
"""

from moracl.experts.act import ACTLoop, ACTOutput, AdaptiveComputation
from moracl.experts.backend import RoutingBackend, current_routing_backend, routing_backend
from moracl.experts.banks import BANKS, ExpertBank, build_bank, register_bank
from moracl.experts.context import RoutingContext
from moracl.experts.losses import load_balance_loss, router_z_loss, routing_entropy
from moracl.experts.mixture import ExpertGroup, Mixture, MixtureConfig
from moracl.experts.per_sample import token_mask
from moracl.experts.routers import (
    ROUTERS,
    DynamicRouter,
    DynamicRouterConfig,
    HierarchicalRouter,
    HierarchicalRouterConfig,
    LogitRouter,
    LogitRouterConfig,
    RoutePer,
    Router,
    RouterConfig,
    RouterType,
    SoftRouter,
    SoftRouterConfig,
    TaskIds,
    TaskRouter,
    TaskRouterConfig,
    TopKRouter,
    TopKRouterConfig,
    build_router,
    register_router,
)
from moracl.experts.routing import RoutingResult, RoutingStats

__all__ = [
    "BANKS",
    "ROUTERS",
    "ACTLoop",
    "ACTOutput",
    "AdaptiveComputation",
    "DynamicRouter",
    "DynamicRouterConfig",
    "ExpertBank",
    "ExpertGroup",
    "HierarchicalRouter",
    "HierarchicalRouterConfig",
    "LogitRouter",
    "LogitRouterConfig",
    "Mixture",
    "MixtureConfig",
    "RoutePer",
    "Router",
    "RouterConfig",
    "RouterType",
    "RoutingBackend",
    "RoutingContext",
    "RoutingResult",
    "RoutingStats",
    "SoftRouter",
    "SoftRouterConfig",
    "TaskIds",
    "TaskRouter",
    "TaskRouterConfig",
    "TopKRouter",
    "TopKRouterConfig",
    "build_bank",
    "build_router",
    "current_routing_backend",
    "load_balance_loss",
    "register_bank",
    "register_router",
    "router_z_loss",
    "routing_backend",
    "routing_entropy",
    "token_mask",
]
