"""Dense softmax routing over every allowed expert (a baseline to compare sparse routing to).

Shape legend: ``n`` tokens, ``e`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from moracl.experts.losses import router_z_loss
from moracl.experts.routers.base import LogitRouter, TaskIds
from moracl.experts.routers.config import LogitRouterConfig, RouterType
from moracl.experts.routers.registry import register_router
from moracl.experts.routing import RoutingResult, mask_logits

__all__ = ["SoftRouter", "SoftRouterConfig"]


@dataclass(frozen=True)
class SoftRouterConfig(LogitRouterConfig):
    """Dense softmax routing: ``per`` and ``z_weight`` only."""

    router_type: ClassVar[RouterType] = RouterType.SOFT

    type: RouterType = RouterType.SOFT


@register_router(RouterType.SOFT, SoftRouterConfig)
class SoftRouter(LogitRouter):
    """``gates = softmax(x Wᵀ)`` over the allowed experts; no noise and no balance loss
    (every expert gets every token); the ``z`` loss."""

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        clean, _ = self.scores(logits)  # (n, e)
        probs = mask_logits(clean, allowed).softmax(-1) * allowed  # (n, e)
        chosen = probs > 0  # (n, e) the allowed experts (a gate that underflows to 0 aside)
        aux = {"z": router_z_loss(clean, allowed, active)}
        return self.result(probs, probs, chosen, None, aux)
