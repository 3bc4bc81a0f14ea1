"""Routers, one module per kind (its typed config, router and fused-node gating),
registered by name in :data:`ROUTERS`.

``topk`` noisy top-k, ``dynamic`` top-p, ``task`` by task id, ``hierarchical`` groups then
experts (routers composed), ``soft`` dense softmax.  Build one with :func:`build_router`.
"""

from moracl.experts.routers.base import (
    LogitRouter,
    Router,
    TaskIds,
    check_task_ids,
)
from moracl.experts.routers.config import LogitRouterConfig, RoutePer, RouterConfig, RouterType
from moracl.experts.routers.dynamic import DynamicRouter, DynamicRouterConfig, top_p_gates
from moracl.experts.routers.hierarchical import HierarchicalRouter, HierarchicalRouterConfig
from moracl.experts.routers.registry import ROUTERS, build_router, register_router
from moracl.experts.routers.soft import SoftRouter, SoftRouterConfig
from moracl.experts.routers.task import TaskRouter, TaskRouterConfig
from moracl.experts.routers.topk import TopKRouter, TopKRouterConfig, topk_gates

__all__ = [
    "ROUTERS",
    "DynamicRouter",
    "DynamicRouterConfig",
    "HierarchicalRouter",
    "HierarchicalRouterConfig",
    "LogitRouter",
    "LogitRouterConfig",
    "RoutePer",
    "Router",
    "RouterConfig",
    "RouterType",
    "SoftRouter",
    "SoftRouterConfig",
    "TaskIds",
    "TaskRouter",
    "TaskRouterConfig",
    "TopKRouter",
    "TopKRouterConfig",
    "build_router",
    "check_task_ids",
    "register_router",
    "top_p_gates",
    "topk_gates",
]
