"""A hierarchical router's routing inside a fused node, in closed form, when both levels are
top-k: a top-k over the ``g`` groups, then one batched top-k over each group's ``s``
experts (:func:`~moracl.experts.routers.topk.topk_route_forward` on ``(n, g, ·)``).

Shape legend: ``n`` tokens, ``g`` groups, ``s`` experts per group, ``e = g·s``, ``l_g`` the
group router's logit columns, ``l_s`` each group router's; the logits are ``(n, l_g + g·l_s)``
(the group router's columns, then each group's in order), as
:meth:`~moracl.experts.routers.hierarchical.HierarchicalRouter.logit_weights` lays them out.

With ``G, P (n, g)`` the group level's gates and probabilities and ``H, Q (n, g, s)`` the
expert level's, ``gates = G ⊗ H`` and ``probs = P ⊗ Q`` per group, so their gradients split
by the product rule: ``∂/∂G = Σ_s ∂/∂gates · H`` and ``∂/∂H = ∂/∂gates · G``; each level then
takes its own top-k backward (:func:`~moracl.experts.routers.topk.topk_route_backward`).  The
expert losses are the groups' losses (each over the tokens the group serves) weighted by the
share of tokens each group serves, a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from moracl.experts.backend import RoutingBackend, for_backend
from moracl.experts.gating import GatedSaved, Gating, Routed, RouteGrads, apply_gates, gated_grads
from moracl.experts.routers.topk import TopKSaved, topk_route_backward, topk_route_forward

__all__ = [
    "HierarchicalGating",
    "HierarchicalSaved",
    "LevelSettings",
    "global_indices",
    "hierarchical_gate_backward",
    "hierarchical_gate_forward",
    "hierarchical_route_backward",
    "hierarchical_route_forward",
]


class LevelSettings(NamedTuple):
    """One level's top-k settings: experts per token and whether the gates are normalised."""

    k: int
    normalize: bool


class HierarchicalSaved(NamedTuple):
    """What :func:`hierarchical_route_backward` reads of :func:`hierarchical_route_forward`."""

    groups: TopKSaved  # the group level's record, (n, l_g) logits
    experts: TopKSaved  # the expert level's record, (n, g, l_s) logits
    group_gates: Tensor  # (n, g)
    group_probs: Tensor  # (n, g)
    expert_gates: Tensor  # (n, g, s)
    expert_probs: Tensor  # (n, g, s)
    share: Tensor  # (g,) the share of tokens each group serves


def global_indices(groups: Tensor | None, per_group: Tensor | None, s: int) -> Tensor | None:
    """``(n, k_g · k_s)`` global indices of the chosen groups' chosen experts, from the chosen
    groups ``(n, k_g)`` and each group's chosen experts ``per_group (n, g, k_s)`` (``None``
    when either level reports none)."""
    if groups is None or per_group is None:
        return None
    k_s = per_group.shape[-1]
    picked = per_group.gather(1, groups[:, :, None].expand(-1, -1, k_s))  # (n, k_g, k_s)
    return rearrange(groups[:, :, None] * s + picked, "n a b -> n (a b)")


def hierarchical_route_forward(
    logits: Tensor,
    group_allowed: Tensor,
    expert_allowed: Tensor,
    group_noise: Tensor | None,
    expert_noise: Tensor | None,
    group_logits: int,
    groups: LevelSettings,
    experts: LevelSettings,
    active: Tensor | None = None,
) -> tuple[Routed, HierarchicalSaved]:
    """Both levels' routing of ``n`` tokens as one function of tensors and static settings.

    Args:
        logits: ``(n, l_g + g·l_s)``.
        group_allowed: ``(n|1, g)`` bool, the groups each token may use.
        expert_allowed: ``(n|1, g, s)`` bool, the experts each token may use in each group.
        group_noise, expert_noise: ``(n, g)`` and ``(n, g, s)`` standard normal draws, or
            ``None`` (no noise at that level).
        group_logits: ``l_g``.
        groups, experts: each level's top-k settings.
        active: ``(n,)`` bool, the tokens the losses count (``None``: all).

    Returns:
        The routing over ``e = g·s`` experts (losses ``group.balance``, ``group.z``,
        ``expert.balance``, ``expert.z``, unweighted) and its record.
    """
    g, s = expert_allowed.shape[-2:]
    group, group_saved = topk_route_forward(
        logits[:, :group_logits], group_allowed, group_noise, groups.k, groups.normalize, active
    )
    served = group.chosen if active is None else group.chosen & active[:, None]  # (n, g)
    expert_logits = logits[:, group_logits:].unflatten(1, (g, -1))  # (n, g, l_s)
    level, level_saved = topk_route_forward(
        expert_logits, expert_allowed, expert_noise, experts.k, experts.normalize, served
    )
    gates = (group.gates[:, :, None] * level.gates).flatten(1)  # (n, e)
    probs = (group.probs[:, :, None] * level.probs).flatten(1)  # (n, e)
    chosen = (group.chosen[:, :, None] & level.chosen).flatten(1)  # (n, e)
    share = served.to(gates.dtype).sum(0)  # (g,)
    share = share / share.sum().clamp_min(1.0)
    aux = (*group.aux, *((share * loss).sum() for loss in level.aux))
    indices = global_indices(group.indices, level.indices, s)
    saved = HierarchicalSaved(
        group_saved, level_saved, group.gates, group.probs, level.gates, level.probs, share
    )
    return Routed(gates, probs, chosen, indices, aux), saved


def hierarchical_route_backward(
    saved: HierarchicalSaved, grads: RouteGrads, groups: LevelSettings, experts: LevelSettings
) -> Tensor:
    """``∂L/∂logits (n, l_g + g·l_s)`` of :func:`hierarchical_route_forward`, in closed form
    (see the module docstring); ``grads.aux`` holds the four losses' gradients."""
    group_saved, level_saved, group_gates, group_probs, expert_gates, expert_probs, share = saved
    g, s = expert_gates.shape[1:]

    def split(grad: Tensor | None, outer: Tensor, inner: Tensor) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        grad3 = grad.to(inner.dtype).unflatten(1, (g, s))  # (n, g, s)
        return (grad3 * inner).sum(-1), grad3 * outer[:, :, None]

    group_dg, expert_dg = split(grads.gates, group_gates, expert_gates)
    group_dp, expert_dp = split(grads.probs, group_probs, expert_probs)
    group_balance, group_z, expert_balance, expert_z = grads.aux
    per_group = tuple(None if a is None else a * share for a in (expert_balance, expert_z))
    grad_groups = topk_route_backward(
        group_saved, RouteGrads(group_dg, group_dp, (group_balance, group_z)), groups.normalize
    )
    grad_experts = topk_route_backward(
        level_saved, RouteGrads(expert_dg, expert_dp, per_group), experts.normalize
    )
    return torch.cat([grad_groups, grad_experts.flatten(1)], dim=1)


def hierarchical_gate_forward(
    zl: Tensor,
    er: int,
    group_allowed: Tensor,
    expert_allowed: Tensor,
    group_noise: Tensor | None,
    expert_noise: Tensor | None,
    group_logits: int,
    groups: LevelSettings,
    experts: LevelSettings,
    active: Tensor | None = None,
) -> tuple[Tensor, Routed, GatedSaved]:
    """:func:`hierarchical_route_forward` on the logit columns of ``zl (n, e·r + l)`` and the
    gated activations ``zg (n, e·r)``: one function, so the compiler fuses the gating in."""
    za = zl[:, :er]
    routed, saved = hierarchical_route_forward(
        zl[:, er:],
        group_allowed,
        expert_allowed,
        group_noise,
        expert_noise,
        group_logits,
        groups,
        experts,
        active,
    )
    return apply_gates(za, routed.gates), routed, GatedSaved(za, routed.gates, saved)


def hierarchical_gate_backward(
    saved: GatedSaved,
    grad_zg: Tensor,
    grads: RouteGrads,
    groups: LevelSettings,
    experts: LevelSettings,
) -> tuple[Tensor, Tensor]:
    """The backward of :func:`hierarchical_gate_forward`: ``∂L/∂zl (n, e·r + l)`` and
    ``zg``."""
    za, gates, route = saved
    grad_za, zg, gg = gated_grads(za, gates, grad_zg, grads.gates)
    grad_logits = hierarchical_route_backward(route, grads._replace(gates=gg), groups, experts)
    return torch.cat([grad_za, grad_logits.to(za.dtype)], dim=1), zg


@dataclass(frozen=True)
class HierarchicalGating(Gating):
    """A two-level top-k routing in a fused node, backward in closed form; ``compiled``
    functions on CUDA under the ``compiled`` backend, Triton kernels under ``triton``
    (:mod:`moracl.experts.triton_hierarchical`, where it takes the shapes).

    Args:
        group_allowed: ``(n|1, g)`` bool.
        expert_allowed: ``(n|1, g, s)`` bool.
        group_noise: draws the group level's noise for its ``(n, l_g)`` logits, or ``None``.
        expert_noise: draws the expert level's noise for its ``(n, g·l_s)`` logits, ``(n, g,
            s)`` or ``None``.
        group_logits: ``l_g``.
        groups, experts: each level's top-k settings.
        backend: a concrete backend.
        active: ``(n,)`` bool, the tokens the auxiliary losses count (``None``: all).
    """

    group_allowed: Tensor
    expert_allowed: Tensor
    group_noise: Callable[[Tensor], Tensor | None]
    expert_noise: Callable[[Tensor], Tensor | None]
    group_logits: int
    groups: LevelSettings
    experts: LevelSettings
    backend: RoutingBackend
    aux_names: tuple[str, ...] = ("group.balance", "group.z", "expert.balance", "expert.z")
    active: Tensor | None = None

    def route(self, logits: Tensor) -> tuple[Routed, Any]:
        lg = self.group_logits
        group_noise = self.group_noise(logits[:, :lg])  # drawn first, as the router draws
        expert_noise = self.expert_noise(logits[:, lg:])
        kernels = self._kernels(logits, 0, group_noise, expert_noise)  # no experts' columns
        if kernels is not None:
            return kernels[1], kernels[2]
        fwd = for_backend(hierarchical_route_forward, self.backend, logits.device)
        routed: Routed
        routed, saved = fwd(
            logits,
            self.group_allowed,
            self.expert_allowed,
            group_noise,
            expert_noise,
            lg,
            self.groups,
            self.experts,
            self.active,
        )
        return routed, saved

    def route_backward(
        self, saved: Any, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        if not isinstance(saved, HierarchicalSaved):  # the kernels' record
            from moracl.experts import triton_hierarchical as th

            no_experts = saved.zl.new_empty(saved.zl.shape[0], 0)  # ∂L/∂zg: (n, 0)
            kernel_grad, _ = th.gate_backward(saved, no_experts, grads)
            return kernel_grad, ()
        device = saved.group_gates.device
        bwd = for_backend(hierarchical_route_backward, self.backend, device)
        grad: Tensor = bwd(saved, grads, self.groups, self.experts)
        return grad, ()

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        lg = self.group_logits
        group_noise = self.group_noise(zl[:, er : er + lg])  # drawn first, as the router draws
        expert_noise = self.expert_noise(zl[:, er + lg :])
        kernels = self._kernels(zl, er, group_noise, expert_noise)
        if kernels is not None:
            return kernels
        fwd = for_backend(hierarchical_gate_forward, self.backend, zl.device)
        return fwd(  # type: ignore[no-any-return]
            zl,
            er,
            self.group_allowed,
            self.expert_allowed,
            group_noise,
            expert_noise,
            lg,
            self.groups,
            self.experts,
            self.active,
        )

    def _kernels(
        self, zl: Tensor, er: int, group_noise: Tensor | None, expert_noise: Tensor | None
    ) -> tuple[Tensor, Routed, Any] | None:
        """``zg``, the routing and the record from the Triton kernels under the ``triton``
        backend where they take the shapes, else ``None``."""
        if self.backend is not RoutingBackend.TRITON:
            return None
        from moracl.experts import triton_hierarchical as th

        lg, k = self.group_logits, (self.groups.k, self.experts.k)
        if not th.supports(zl, er, self.group_allowed, self.expert_allowed, lg, k):
            return None
        out = th.gate_forward(
            zl, er, self.group_allowed, self.expert_allowed, group_noise, expert_noise, lg,
            (*self.groups, *self.experts), self.active,
        )  # fmt: skip
        routed = Routed(out.gates, out.probs, out.chosen, out.indices, out.aux)
        return out.zg, routed, out.record()

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        if not isinstance(saved, GatedSaved):  # the kernels' record
            from moracl.experts import triton_hierarchical as th

            n = saved.zl.shape[0]
            grad = saved.zl.new_zeros(n, saved.er) if grad_zg is None else grad_zg
            grad_zl, zg = th.gate_backward(saved, grad, grads)
            return grad_zl, zg, ()
        if grad_zg is None:
            grad_zg = torch.zeros_like(saved.za)
        bwd = for_backend(hierarchical_gate_backward, self.backend, saved.za.device)
        grad_zl, zg = bwd(saved, grad_zg, grads, self.groups, self.experts)
        return grad_zl, zg, ()
