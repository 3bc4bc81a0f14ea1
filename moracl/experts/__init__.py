"""Experts: routers returning a typed :class:`RoutingResult`, and the auxiliary losses.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``k`` chosen, ``t`` tasks,
``g`` groups.
"""

from moracl.experts.act import ACTOutput, AdaptiveComputation
from moracl.experts.banks import BANKS, ExpertBank, LoRABank, MoRABank, build_bank
from moracl.experts.losses import load_balance_loss, router_z_loss, routing_entropy
from moracl.experts.mixture import ExpertGroup, Mixture, MixtureConfig, RoutingContext
from moracl.experts.per_sample import token_mask
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
    "BANKS",
    "ROUTERS",
    "ACTOutput",
    "AdaptiveComputation",
    "DynamicRouter",
    "ExpertBank",
    "ExpertGroup",
    "HierarchicalRouter",
    "LoRABank",
    "LogitRouter",
    "Mixture",
    "MixtureConfig",
    "MoRABank",
    "Router",
    "RouterConfig",
    "RoutingContext",
    "RoutingResult",
    "RoutingStats",
    "SoftRouter",
    "TaskRouter",
    "TopKRouter",
    "build_bank",
    "build_router",
    "load_balance_loss",
    "register_router",
    "router_z_loss",
    "routing_entropy",
    "token_mask",
]
