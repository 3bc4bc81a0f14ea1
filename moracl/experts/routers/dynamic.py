"""Dynamic (top-p) routing: the number of experts per token follows the router's confidence
(Huang et al. 2024, "Harder Tasks Need More Experts").

Shape legend: ``n`` tokens, ``e`` experts, ``m`` the most experts a token gets.

A token's gates are its router probabilities over the kept experts, renormalised: the
softmax of the kept experts' scores, as top-k's normalised gates are over its ``k``.  So the
fused node's closed-form backward is top-k's (:func:`~moracl.experts.routers.topk.
topk_route_backward`) on the ``m`` experts ranked first, whose gates past a token's count are
zero (:class:`DynamicGating`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from moracl.experts.backend import RoutingBackend, for_backend
from moracl.experts.gating import GatedSaved, Gating, Routed, RouteGrads, apply_gates
from moracl.experts.losses import balance_terms, z_terms
from moracl.experts.routers.base import LogitRouter, TaskIds, noisy_scores
from moracl.experts.routers.config import (
    LogitRouterConfig,
    RouterType,
    check_bool,
    check_int,
    check_weight,
)
from moracl.experts.routers.registry import register_router
from moracl.experts.routers.topk import TopKSaved, topk_gate_backward, topk_route_backward
from moracl.experts.routing import RoutingResult, gather_k, mask_logits

__all__ = [
    "DynamicGating",
    "DynamicRouter",
    "DynamicRouterConfig",
    "dynamic_gate_forward",
    "dynamic_route",
    "dynamic_route_forward",
    "top_p_gates",
]


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


def dynamic_route_forward(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    top_p: float,
    min_experts: int,
    max_experts: int,
    active: Tensor | None = None,
) -> tuple[Routed, TopKSaved]:
    """The whole top-p routing of ``n`` tokens as one function of tensors and static
    settings: the routing (auxiliary losses ``balance``, ``z``, unweighted) and what
    :func:`~moracl.experts.routers.topk.topk_route_backward` (``normalize=True``) reads to
    take its gradient back to ``logits``.

    Args:
        logits: ``(n, e)`` or ``(n, 2e)`` router logits (clean, then noise-scale columns).
        allowed: ``(n|1, e)`` bool.
        noise: ``(n, e)`` standard normal draws, or ``None`` for no noise.
        top_p, min_experts, max_experts: as :class:`DynamicRouterConfig` (``max_experts``
            resolved to a number, ``m``).
        active: ``(n,)`` bool tokens the losses count, or ``None`` for all.
    """
    clean, scores = noisy_scores(logits, allowed.shape[-1], noise)  # (n, e) each
    gates, probs, chosen, indices = top_p_gates(scores, allowed, top_p, min_experts, max_experts)
    balance, f = balance_terms(probs, chosen, active)
    z, lse, zw = z_terms(clean, allowed, active)
    top = gather_k(gates, indices)  # (n, m): zero past each token's count
    routed = Routed(gates, probs, chosen, indices, (balance, z))
    return routed, TopKSaved(logits, allowed, noise, probs, indices, top, f, lse, zw, active)


def dynamic_route(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    active: Tensor | None,
    top_p: float,
    min_experts: int,
    max_experts: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`dynamic_route_forward` as ``gates, probs, chosen, indices, balance, z``."""
    routed, _ = dynamic_route_forward(
        logits, allowed, noise, top_p, min_experts, max_experts, active
    )
    return (routed.gates, routed.probs, routed.chosen, routed.indices, *routed.aux)  # type: ignore[return-value]


def dynamic_gate_forward(
    zl: Tensor,
    er: int,
    allowed: Tensor,
    noise: Tensor | None,
    top_p: float,
    min_experts: int,
    max_experts: int,
    active: Tensor | None = None,
) -> tuple[Tensor, Routed, GatedSaved]:
    """:func:`dynamic_route_forward` on the logit columns of ``zl (n, e·r + l)`` and the
    gated activations ``zg (n, e·r)``: one function, so the compiler fuses the gating in;
    its backward is :func:`~moracl.experts.routers.topk.topk_gate_backward`."""
    za = zl[:, :er]
    routed, saved = dynamic_route_forward(
        zl[:, er:], allowed, noise, top_p, min_experts, max_experts, active
    )
    return apply_gates(za, routed.gates), routed, GatedSaved(za, routed.gates, saved)


@dataclass(frozen=True)
class DynamicGating(Gating):
    """Top-p routing in a fused node, backward in closed form (top-k's, see the module
    docstring); ``compiled`` functions on CUDA under the ``compiled`` and ``triton``
    backends.

    Args:
        allowed: ``(n|1, e)`` bool, the experts each token may use.
        noise: draws the noise for ``(n, l)`` logits: ``(n, e)`` or ``None`` (no noise now).
        top_p, min_experts, max_experts: as :func:`dynamic_route_forward`.
        backend: a concrete backend.
        active: ``(n,)`` bool, the tokens the auxiliary losses count (``None``: all).
    """

    allowed: Tensor
    noise: Callable[[Tensor], Tensor | None]
    top_p: float
    min_experts: int
    max_experts: int
    backend: RoutingBackend
    aux_names: tuple[str, ...] = ("balance", "z")
    active: Tensor | None = None

    def _settings(self) -> tuple[float, int, int, Tensor | None]:
        return self.top_p, self.min_experts, self.max_experts, self.active

    def route(self, logits: Tensor) -> tuple[Routed, TopKSaved]:
        fwd = for_backend(dynamic_route_forward, self.backend, logits.device)
        routed: Routed
        routed, saved = fwd(logits, self.allowed, self.noise(logits), *self._settings())
        return routed, saved

    def route_backward(
        self, saved: TopKSaved, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        bwd = for_backend(topk_route_backward, self.backend, saved.logits.device)
        grad: Tensor = bwd(saved, grads, True)
        return grad, ()

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        noise = self.noise(zl[:, er:])  # (n, e) or None
        fwd = for_backend(dynamic_gate_forward, self.backend, zl.device)
        zg, routed, saved = fwd(zl, er, self.allowed, noise, *self._settings())
        return zg, routed, saved

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        if grad_zg is None:
            grad_zg = torch.zeros_like(saved.za)
        bwd = for_backend(topk_gate_backward, self.backend, saved.za.device)
        grad_zl, zg = bwd(saved, grad_zg, grads, True)
        return grad_zl, zg, ()


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

    def gating(
        self, task_ids: TaskIds | None, backend: RoutingBackend, active: Tensor | None = None
    ) -> Gating:
        """Top-p routing with its backward in closed form (:class:`DynamicGating`)."""
        cfg = self.config
        allowed = self.allowed_experts(task_ids)
        return DynamicGating(
            allowed,
            self.noise,
            cfg.top_p,
            cfg.min_experts,
            self.max_experts,
            backend,
            active=active,
        )

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
