"""Routers, one module per kind, registered by name in :data:`ROUTERS`.

``topk`` noisy top-k, ``dynamic`` top-p, ``task`` by task id, ``hierarchical`` groups then
experts (routers composed), ``soft`` dense softmax.  Build one with :func:`build_router`.
"""

from moracl.experts.routers.base import (
    ROUTERS,
    LogitRouter,
    Router,
    build_router,
    check_task_ids,
    register_router,
)
from moracl.experts.routers.config import RouterConfig
from moracl.experts.routers.dynamic import DynamicRouter, top_p_gates
from moracl.experts.routers.hierarchical import HierarchicalRouter
from moracl.experts.routers.soft import SoftRouter
from moracl.experts.routers.task import TaskRouter
from moracl.experts.routers.topk import TopKRouter, topk_gates

register_router("topk")(TopKRouter)
register_router("dynamic")(DynamicRouter)
register_router("task")(TaskRouter)
register_router("hierarchical")(HierarchicalRouter)
register_router("soft")(SoftRouter)

__all__ = [
    "ROUTERS",
    "DynamicRouter",
    "HierarchicalRouter",
    "LogitRouter",
    "Router",
    "RouterConfig",
    "SoftRouter",
    "TaskRouter",
    "TopKRouter",
    "build_router",
    "check_task_ids",
    "register_router",
    "top_p_gates",
    "topk_gates",
]
