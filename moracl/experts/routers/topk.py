"""Noisy top-k routing (Shazeer et al. 2017) with the Switch balance loss and the z-loss:
the config, the router, the routing as one function of tensors with its backward in closed
form, and the gating a fused node uses.

Shape legend: ``n`` tokens, ``e`` experts, ``k`` chosen per token, ``r`` rank per expert,
``zl (n, e·r + l)`` a fused node's down projection (the experts' columns, then the logits).

One forward, :func:`topk_route_forward`, made of differentiable operations: the router's
``route`` runs it under autograd, and the fused node runs it without, backed by
:func:`topk_route_backward` (the same derivative written out; tested against autograd in
float64).  On CUDA the gated forward and backward run as Triton kernels
(:mod:`moracl.experts.triton_route`, tested against :func:`topk_gate_forward` and
:func:`topk_gate_backward`) under the ``triton`` backend, and under ``torch.compile`` with the
``compiled`` one (see :class:`~moracl.experts.backend.RoutingBackend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from moracl.experts.backend import RoutingBackend, for_backend
from moracl.experts.gating import (
    GatedSaved,
    Gating,
    Routed,
    RouteGrads,
    apply_gates,
    gated_grads,
)
from moracl.experts.losses import balance_terms, z_terms, z_weights
from moracl.experts.routers.base import LogitRouter, TaskIds, noisy_scores
from moracl.experts.routers.config import (
    LogitRouterConfig,
    RouterType,
    check_bool,
    check_int,
    check_weight,
)
from moracl.experts.routers.registry import register_router
from moracl.experts.routing import RoutingResult, gather_k, mask_logits, scatter_k, select_topk

__all__ = [
    "TopKGating",
    "TopKRouter",
    "TopKRouterConfig",
    "TopKSaved",
    "topk_gate_backward",
    "topk_gate_forward",
    "topk_gates",
    "topk_route",
    "topk_route_backward",
    "topk_route_forward",
]


@dataclass(frozen=True)
class TopKRouterConfig(LogitRouterConfig):
    """Noisy top-k routing.

    Args:
        k: experts per token.
        normalize: the gates are the softmax over the chosen experts' scores (they sum to 1);
            ``False``: each chosen expert's gate is its router probability, as Switch routes
            top-1, so that with ``k = 1`` the task loss still trains the router.
        noise: learned input-dependent noise on the logits while training.
        balance_weight: weight of the Switch load-balance loss.
    """

    router_type: ClassVar[RouterType] = RouterType.TOPK

    type: RouterType = RouterType.TOPK
    k: int = 2
    normalize: bool = True
    noise: bool = True
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k, 1)
        check_bool("normalize", self.normalize)
        check_bool("noise", self.noise)
        check_weight("balance_weight", self.balance_weight)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"balance": float(self.balance_weight), "z": float(self.z_weight)}


def topk_gates(
    scores: Tensor, allowed: Tensor, k: int, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax over each token's ``k`` highest-scoring allowed experts (``normalize=False``:
    the chosen experts keep their probabilities over all allowed experts, as Switch).

    Static shapes throughout (no ``nonzero``, no ``.item()``), elementwise gathers and
    scatters (:func:`~moracl.experts.routing.gather_k`), so a compiler fuses it.

    Args:
        scores: ``(n, e)`` logits the choice is made from.
        allowed: ``(n|1, e)`` bool.
        k: experts per token.

    Returns:
        ``gates (n, e)``, ``probs (n, e)`` (softmax over the allowed experts), ``chosen
        (n, e)`` bool, ``indices (n, k)`` (highest score first) and ``top (n, k)`` the chosen
        experts' gates (zero where not allowed).
    """
    e = allowed.shape[-1]
    filled = mask_logits(scores, allowed)  # (n, e)
    probs = filled.softmax(-1) * allowed  # (n, e)
    best, indices = select_topk(filled, k)  # (n, k), (n, k)
    picked = gather_k(allowed, indices)  # (n, k) bool
    top = (best.softmax(-1) if normalize else gather_k(probs, indices)) * picked  # (n, k)
    gates = scatter_k(indices, top, e)  # (n, e)
    chosen = scatter_k(indices, picked, e)  # (n, e) bool
    return gates, probs, chosen, indices, top


class TopKSaved(NamedTuple):
    """What :func:`topk_route_backward` reads of :func:`topk_route_forward`."""

    logits: Tensor  # (n, e|2e)
    allowed: Tensor  # (n|1, e) bool
    noise: Tensor | None  # (n, e)
    probs: Tensor  # (n, e)
    indices: Tensor  # (n, k)
    top: Tensor  # (n, k) the chosen experts' gates
    f: Tensor  # (e,) the assignment fractions
    lse: Tensor  # (n,) masked log-sum-exp of the clean logits
    zw: Tensor | None  # (n,) the tokens the z loss counts, or None: all (see z_weights)
    active: Tensor | None  # (n,) bool, the tokens the balance loss counts, or None: all


def topk_route_forward(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    k: int,
    normalize: bool = True,
    active: Tensor | None = None,
) -> tuple[Routed, TopKSaved]:
    """The whole top-k routing of ``n`` tokens as one function of tensors and static
    settings (no module state), so ``torch.compile`` can fuse it into a few kernels.

    Args:
        logits: ``(n, e)`` or ``(n, 2e)`` router logits (clean, then noise-scale columns).
        allowed: ``(n|1, e)`` bool.
        noise: ``(n, e)`` standard normal draws, or ``None`` for no noise.
        k: experts per token.
        normalize: as in :func:`topk_gates`.
        active: ``(n,)`` bool tokens the losses count, or ``None`` for all.

    Batched: ``logits (n, b, e|2e)``, ``allowed (n|1, b, e)``, ``noise (n, b, e)``, ``active
    (n, b)`` route ``b`` groups of ``e`` experts at once, each alone (the losses are ``(b,)``,
    see :mod:`moracl.experts.losses`).

    Returns:
        The routing (auxiliary losses ``balance``, ``z``, unweighted) and what
        :func:`topk_route_backward` reads.
    """
    clean, scores = noisy_scores(logits, allowed.shape[-1], noise)  # (n, e) each
    gates, probs, chosen, indices, top = topk_gates(scores, allowed, k, normalize)
    balance, f = balance_terms(probs, chosen, active)
    z, lse, zw = z_terms(clean, allowed, active)
    routed = Routed(gates, probs, chosen, indices, (balance, z))
    return routed, TopKSaved(logits, allowed, noise, probs, indices, top, f, lse, zw, active)


def topk_route(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    active: Tensor | None,
    k: int,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`topk_route_forward` as ``gates, probs, chosen, indices, balance, z``."""
    routed, _ = topk_route_forward(logits, allowed, noise, k, normalize, active)
    return (routed.gates, routed.probs, routed.chosen, routed.indices, *routed.aux)  # type: ignore[return-value]


def topk_route_backward(saved: TopKSaved, grads: RouteGrads, normalize: bool = True) -> Tensor:
    """``∂L/∂logits (n, e|2e)`` of :func:`topk_route_forward`, in closed form;
    ``grads.aux`` holds the balance and z losses' gradients (batched: ``(n, b, e|2e)`` from
    the losses' ``(b,)`` gradients).

    With ``q`` the softmax of the masked scores and ``σ`` the softmax over the chosen ones:
    the probabilities pass ``q ⊙ (G − Σ q G)`` with ``G = ∂L/∂probs + ∂L/∂balance · e·f/n``
    (``f`` carries no gradient; with ``active``, ``e·f·a/Σa`` for the counted tokens ``a``);
    the gates pass ``σ ⊙ (g − Σ σ g)`` back to the chosen
    columns (``normalize=False``: the gates' gradient joins ``G`` at the chosen columns, the
    gates being probabilities there); the z loss adds ``∂L/∂z · 2·lse·w · softmax(masked
    clean)``; masked columns get nothing; the noise scale gets ``∂/∂scores · ε ·
    sigmoid(scale)``.
    """
    logits, allowed, noise, probs, indices, top, f, lse, zw, active = saved
    grad_gates, grad_probs = grads.gates, grads.probs
    grad_balance, grad_z = grads.aux
    e = allowed.shape[-1]
    lg = logits.to(probs.dtype)
    clean = lg[..., :e]
    n = probs.shape[0]
    gp = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(probs.dtype)
    if grad_balance is not None:
        if active is None:
            gp = gp + grad_balance[..., None] * (e / max(n, 1)) * f  # (n, e)
        else:
            w = active.to(probs.dtype)  # (n,) or (n, b)
            per_token = grad_balance[..., None] * e * f  # (e,) or (b, e)
            gp = gp + per_token * (w / w.sum(0).clamp_min(1.0))[..., None]
    gp = gp * allowed
    if grad_gates is not None and not normalize:  # the chosen gates are probabilities
        picked = gather_k(allowed, indices)  # (n, k) bool
        gs = gather_k(grad_gates.to(top.dtype), indices) * picked  # (n, k)
        gp = gp + scatter_k(indices, gs, e)
    grad = probs * (gp - (probs * gp).sum(-1, keepdim=True))  # (n, e) via the probabilities
    if grad_gates is not None and normalize:
        gs = gather_k(grad_gates.to(top.dtype), indices)  # (n, k); top is 0 where not allowed
        grad = grad + scatter_k(indices, top * (gs - (top * gs).sum(-1, keepdim=True)), e)
    grad = grad * allowed  # (n, e) ∂L/∂scores; the masked scores are constants
    grad_clean = grad
    if grad_z is not None:
        soft = torch.where(allowed, (clean - lse[..., None]).exp(), torch.zeros_like(clean))
        grad_clean = grad + grad_z[..., None] * 2.0 * (lse * z_weights(lse, zw))[..., None] * soft
    if noise is None:
        if lg.shape[-1] == e:
            return grad_clean.to(logits.dtype)
        grad_scale = torch.zeros_like(lg[..., e:])  # a noisy router evaluated (no draws)
    else:
        grad_scale = grad * noise * torch.sigmoid(lg[..., e:])  # through the scores, not z
    return torch.cat([grad_clean, grad_scale], dim=-1).to(logits.dtype)


def topk_gate_forward(
    zl: Tensor,
    er: int,
    allowed: Tensor,
    noise: Tensor | None,
    k: int,
    normalize: bool = True,
    active: Tensor | None = None,
) -> tuple[Tensor, Routed, GatedSaved]:
    """:func:`topk_route_forward` on the logit columns of ``zl (n, e·r + l)``, and the gated
    activations ``zg (n, e·r)`` first: one function, so the compiler fuses the gating in."""
    za = zl[:, :er]
    routed, saved = topk_route_forward(zl[:, er:], allowed, noise, k, normalize, active)
    return apply_gates(za, routed.gates), routed, GatedSaved(za, routed.gates, saved)


def topk_gate_backward(
    saved: GatedSaved, grad_zg: Tensor, grads: RouteGrads, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """The backward of :func:`topk_gate_forward`: ``∂L/∂zl (n, e·r + l)`` and ``zg``."""
    za, gates, route = saved
    grad_za, zg, gg = gated_grads(za, gates, grad_zg, grads.gates)
    grad_logits = topk_route_backward(route, grads._replace(gates=gg), normalize)
    return torch.cat([grad_za, grad_logits], dim=1), zg


@dataclass(frozen=True)
class TopKGating(Gating):
    """Top-k routing in a fused node, backward in closed form; under the ``triton`` backend
    the gated forward and backward are Triton kernels where they take the routing
    (``k <= 4``, see :func:`~moracl.experts.triton_route.supports`), ``compiled`` functions
    elsewhere.

    Args:
        allowed: ``(n|1, e)`` bool, the experts each token may use.
        noise: draws the noise for ``(n, l)`` logits: ``(n, e)`` or ``None`` (no noise now).
        k, normalize: as :class:`TopKRouterConfig`.
        backend: a concrete backend (``triton``, ``compiled`` or ``eager``).
        active: ``(n,)`` bool, the tokens the auxiliary losses count (``None``: all).
    """

    allowed: Tensor
    noise: Callable[[Tensor], Tensor | None]
    k: int
    normalize: bool
    backend: RoutingBackend
    aux_names: tuple[str, ...] = ("balance", "z")
    active: Tensor | None = None

    def route(self, logits: Tensor) -> tuple[Routed, Any]:
        noise = self.noise(logits)  # (n, e) or None
        if self.backend is RoutingBackend.TRITON:  # the gating kernels with no experts' columns
            from moracl.experts import triton_route

            if triton_route.supports(logits, 0, self.allowed.shape[-1], self.k):
                out = triton_route.gate_forward(
                    logits, 0, self.allowed, noise, self.k, self.normalize, self.active
                )
                return Routed(
                    out.gates, out.probs, out.chosen, out.indices, (out.balance, out.z)
                ), out.record()
        fwd = for_backend(topk_route_forward, self.backend, logits.device)
        routed: Routed
        routed, saved = fwd(logits, self.allowed, noise, self.k, self.normalize, self.active)
        return routed, saved

    def route_backward(
        self, saved: Any, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        if not isinstance(saved, TopKSaved):  # the Triton forward's record
            from moracl.experts import triton_route

            no_experts = saved.zl.new_empty(saved.zl.shape[0], 0)  # ∂L/∂zg: (n, 0)
            kernel_grad, _ = triton_route.gate_backward(saved, no_experts, grads)
            return kernel_grad, ()
        bwd = for_backend(topk_route_backward, self.backend, saved.logits.device)
        grad: Tensor = bwd(saved, grads, self.normalize)
        return grad, ()

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        noise = self.noise(zl[:, er:])  # (n, e) or None
        if self.backend is RoutingBackend.TRITON:
            from moracl.experts import triton_route

            if triton_route.supports(zl, er, self.allowed.shape[-1], self.k):
                out = triton_route.gate_forward(
                    zl, er, self.allowed, noise, self.k, self.normalize, self.active
                )
                routed = Routed(out.gates, out.probs, out.chosen, out.indices, (out.balance, out.z))
                return out.zg, routed, out.record()
        fwd = for_backend(topk_gate_forward, self.backend, zl.device)
        zg, routed, saved = fwd(zl, er, self.allowed, noise, self.k, self.normalize, self.active)
        return zg, routed, saved

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        if not isinstance(saved, GatedSaved):  # the Triton forward's record
            from moracl.experts import triton_route

            if grad_zg is None:
                grad_zg = saved.zl.new_zeros(saved.zl.shape[0], saved.er)
            grad_zl, zg = triton_route.gate_backward(saved, grad_zg, grads)
            return grad_zl, zg, ()
        if grad_zg is None:
            grad_zg = torch.zeros_like(saved.za)
        bwd = for_backend(topk_gate_backward, self.backend, saved.za.device)
        grad_zl, zg = bwd(saved, grad_zg, grads, self.normalize)
        return grad_zl, zg, ()


@register_router(RouterType.TOPK, TopKRouterConfig)
class TopKRouter(LogitRouter):
    """Noisy top-k gating: each token goes to its ``config.k`` best experts, with a softmax
    over them; ``balance`` (Switch, over the ``n·k`` assignments) and ``z`` losses."""

    uses_noise = True
    config: TopKRouterConfig

    def __init__(self, config: TopKRouterConfig, in_features: int, num_experts: int) -> None:
        if isinstance(num_experts, int) and config.k > num_experts:
            raise ValueError(
                f"k={config.k} is larger than the number of experts ({num_experts}); "
                f"expected 1 <= k <= {num_experts}"
            )
        super().__init__(config, in_features, num_experts)

    def gating(
        self, task_ids: TaskIds | None, backend: RoutingBackend, active: Tensor | None = None
    ) -> Gating:
        """Top-k routing with its backward in closed form (:class:`TopKGating`)."""
        allowed = self.allowed_experts(task_ids)
        cfg = self.config
        return TopKGating(allowed, self.noise, cfg.k, cfg.normalize, backend, active=active)

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        noise = self.noise(logits)  # (n, e) or None
        routed, _ = topk_route_forward(
            logits, allowed, noise, self.config.k, self.config.normalize, active
        )
        aux = dict(zip(("balance", "z"), routed.aux))
        return self.result(routed.gates, routed.probs, routed.chosen, routed.indices, aux)
