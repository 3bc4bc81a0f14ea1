"""Dynamic (top-p) routing: the number of experts per token follows the router's confidence
(Huang et al. 2024, "Harder Tasks Need More Experts").

Shape legend: ``n`` tokens, ``e`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moracl.experts.losses import load_balance_loss, router_z_loss
from moracl.experts.routers.base import LogitRouter, TaskIds, noisy_scores
from moracl.experts.routers.config import (
    LogitRouterConfig,
    RouterType,
    check_bool,
    check_int,
    check_weight,
)
from moracl.experts.routers.registry import register_router
from moracl.experts.routing import RoutingResult, mask_logits

__all__ = ["DynamicRouter", "DynamicRouterConfig", "dynamic_route", "top_p_gates"]


@dataclass(frozen=True)
class DynamicRouterConfig(LogitRouterConfig):
    """Top-p routing.

    Args:
        top_p: keep the smallest set of most probable experts whose probability reaches
            ``top_p``, in ``(0, 1]``.
        min_experts: at least this many experts per token.
        max_experts: at most this many (``None``: all).
        noise: learned input-dependent noise on the logits while training.
        balance_weight: weight of the Switch load-balance loss.
    """

    router_type: ClassVar[RouterType] = RouterType.DYNAMIC

    type: RouterType = RouterType.DYNAMIC
    top_p: float = 0.5
    min_experts: int = 1
    max_experts: int | None = None
    noise: bool = True
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.top_p, (int, float))
            or isinstance(self.top_p, bool)
            or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_int("min_experts", self.min_experts, 1)
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, 1)
            if self.max_experts < self.min_experts:
                raise ValueError(
                    f"max_experts={self.max_experts} must be >= min_experts={self.min_experts}"
                )
        check_bool("noise", self.noise)
        check_weight("balance_weight", self.balance_weight)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"balance": float(self.balance_weight), "z": float(self.z_weight)}


def top_p_gates(
    scores: Tensor, allowed: Tensor, top_p: float, min_experts: int, max_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep each token's smallest set of most probable experts whose probability reaches
    ``top_p``, clamped to ``[min_experts, max_experts]``, and renormalise over it.

    Uses a static-shape mask over the sorted probabilities (a cumulative sum), so a flat,
    unsure distribution keeps more experts than a peaked one.

    Returns:
        ``gates (n, e)``, ``probs (n, e)``, ``chosen (n, e)`` bool and ``indices
        (n, max_experts)``: the experts by descending probability (past a token's count
        their gates are zero).
    """
    e = scores.shape[-1]
    probs = mask_logits(scores, allowed).softmax(-1) * allowed  # (n, e)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # (n, e) each
    mass_before = ranked.cumsum(-1) - ranked  # (n, e) probability ranked above each
    rank = torch.arange(e, device=scores.device)  # (e,)
    keep = ((mass_before < top_p) | (rank < min_experts)) & (rank < max_experts)  # (n, e)
    chosen = torch.zeros_like(keep).scatter(-1, order, keep) & allowed  # back to expert order
    kept = probs * chosen  # (n, e)
    gates = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return gates, probs, chosen, order[:, :max_experts]


def dynamic_route(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    active: Tensor | None,
    top_p: float,
    min_experts: int,
    max_experts: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole top-p routing as one function of tensors and static settings: the
    outputs of :func:`top_p_gates` and the unweighted balance and z losses.  ``logits``,
    ``allowed``, ``noise`` and ``active`` as in :func:`~moracl.experts.routers.topk.topk_route`.
    """
    clean, scores = noisy_scores(logits, allowed.shape[-1], noise)  # (n, e) each
    gates, probs, chosen, indices = top_p_gates(scores, allowed, top_p, min_experts, max_experts)
    balance = load_balance_loss(probs, chosen, active)
    z = router_z_loss(clean, allowed, active)
    return gates, probs, chosen, indices, balance, z


@register_router(RouterType.DYNAMIC, DynamicRouterConfig)
class DynamicRouter(LogitRouter):
    """Top-p routing with ``min_experts``/``max_experts``; noisy while training with
    ``config.noise``; ``balance`` (over all assignments) and ``z`` losses.  The experts per
    token are in ``stats.experts_per_token``."""

    uses_noise = True
    config: DynamicRouterConfig

    def __init__(self, config: DynamicRouterConfig, in_features: int, num_experts: int) -> None:
        if isinstance(num_experts, int):
            for name in ("min_experts", "max_experts"):
                value = getattr(config, name)
                if value is not None and value > num_experts:
                    raise ValueError(
                        f"{name}={value} is larger than the number of experts "
                        f"({num_experts}); expected at most {num_experts}"
                    )
        super().__init__(config, in_features, num_experts)

    @property
    def max_experts(self) -> int:
        """The most experts a token can get (``config.max_experts`` or all)."""
        return self.config.max_experts or self.num_experts

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        cfg = self.config
        gates, probs, chosen, indices, balance, z = dynamic_route(
            logits,
            allowed,
            self.noise(logits),
            active,
            cfg.top_p,
            cfg.min_experts,
            self.max_experts,
        )
        return self.result(gates, probs, chosen, indices, {"balance": balance, "z": z})
