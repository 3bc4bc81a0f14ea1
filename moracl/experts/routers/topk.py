"""Noisy top-k routing (Shazeer et al. 2017) with the Switch balance loss and the z-loss.

Shape legend: ``n`` tokens, ``e`` experts, ``k`` chosen per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moracl.experts.losses import load_balance_loss, router_z_loss
from moracl.experts.route_ops import RouteOp, TopKRouteOp
from moracl.experts.routers.base import LogitRouter, noisy_scores
from moracl.experts.routers.config import RouterConfig
from moracl.experts.routing import RoutingResult, mask_logits, select_topk

__all__ = ["TopKRouter", "topk_gates", "topk_route"]


def topk_gates(
    scores: Tensor, allowed: Tensor, k: int, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax over each token's ``k`` highest-scoring allowed experts (``normalize=False``:
    the chosen experts keep their probabilities over all allowed experts, as Switch).

    Static shapes throughout (no ``nonzero``, no ``.item()``).

    Args:
        scores: ``(n, e)`` logits the choice is made from.
        allowed: ``(n|1, e)`` bool.
        k: experts per token.

    Returns:
        ``gates (n, e)``, ``probs (n, e)`` (softmax over the allowed experts),
        ``chosen (n, e)`` bool and ``indices (n, k)`` (highest score first).
    """
    filled = mask_logits(scores, allowed)  # (n, e)
    probs = filled.softmax(-1) * allowed  # (n, e)
    top, indices = select_topk(filled, k)  # (n, k), (n, k)
    weights = top.softmax(-1) if normalize else probs.gather(-1, indices)  # (n, k)
    gates = torch.zeros_like(filled).scatter(-1, indices, weights) * allowed  # (n, e)
    picked = torch.ones_like(indices, dtype=torch.bool)
    chosen = torch.zeros_like(filled, dtype=torch.bool).scatter(-1, indices, picked) & allowed
    return gates, probs, chosen, indices


def topk_route(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    active: Tensor | None,
    k: int,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole top-k routing of ``n`` tokens as one function of tensors and static
    settings (no module state), so ``torch.compile`` can fuse it into a few kernels.

    Args:
        logits: ``(n, e)`` or ``(n, 2e)`` router logits (clean, then noise-scale columns).
        allowed: ``(n|1, e)`` bool.
        noise: ``(n, e)`` standard normal draws, or ``None`` for no noise.
        active: ``(n,)`` bool tokens the losses count, or ``None`` for all.
        k: experts per token.
        normalize: as in :func:`topk_gates`.

    Returns:
        ``gates, probs, chosen, indices`` as :func:`topk_gates`, and the unweighted balance
        and z losses.
    """
    clean, scores = noisy_scores(logits, allowed.shape[-1], noise)  # (n, e) each
    gates, probs, chosen, indices = topk_gates(scores, allowed, k, normalize)
    balance = load_balance_loss(probs, chosen, active)
    z = router_z_loss(clean, allowed, active)
    return gates, probs, chosen, indices, balance, z


class TopKRouter(LogitRouter):
    """Noisy top-k gating: each token goes to its ``config.k`` best experts, with a softmax
    over them; ``balance`` (Switch, over the ``n·k`` assignments) and ``z`` losses."""

    uses_noise = True

    def __init__(self, config: RouterConfig, in_features: int, num_experts: int) -> None:
        if isinstance(num_experts, int) and config.k > num_experts:
            raise ValueError(
                f"k={config.k} is larger than the number of experts ({num_experts}); "
                f"expected 1 <= k <= {num_experts}"
            )
        super().__init__(config, in_features, num_experts)

    def route_op(self, task_ids: Tensor | None = None) -> RouteOp:
        """Top-k routing with its backward in closed form (see
        :class:`~moracl.experts.route_ops.TopKRouteOp`)."""
        return TopKRouteOp(self, self.allowed_experts(task_ids))

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        noise = self.noise(logits)  # (n, e) or None
        gates, probs, chosen, indices, balance, z = topk_route(
            logits, allowed, noise, active, self.config.k, self.config.normalize
        )
        return self._result(gates, probs, chosen, indices, {"balance": balance, "z": z})
