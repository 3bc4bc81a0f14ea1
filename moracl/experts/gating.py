"""Routing inside a fused node: a :class:`Gating` routes the logit columns of the node's
matmul and gates the experts' columns, and gives the backward of both.

Shape legend: ``n`` tokens, ``e`` experts, ``r`` rank per expert, ``l`` logit columns,
``zl (n, e·r + l)`` the node's down projection: the experts' rank-space activations ``za``,
then the router's logits.

A gating is built per forward with the static settings and inputs of that routing (the
allowed experts, the noise draws); it holds nothing computed: :meth:`Gating.forward` returns a
record of what its backward reads, which the node keeps on its autograd ``ctx`` and hands to
:meth:`Gating.backward`.  Router kinds give theirs (``Router.gating``): a closed form
(:mod:`moracl.experts.routers.topk`), Triton kernels, or :class:`ReplayGating`, the router's
own ``route`` recorded under autograd and replayed in the backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from moracl.experts.routing import RoutingResult

__all__ = [
    "GatedSaved",
    "Gating",
    "ReplayGating",
    "ReplaySaved",
    "RouteGrads",
    "Routed",
    "apply_gates",
    "gated_grads",
]


class Routed(NamedTuple):
    """One forward's routing of ``n`` tokens (detached: the node's outputs).

    ``gates, probs (n, e)``, ``chosen (n, e)`` bool, ``indices (n, k)`` or ``None`` and the
    unweighted auxiliary losses in the gating's ``aux_names`` order."""

    gates: Tensor
    probs: Tensor
    chosen: Tensor
    indices: Tensor | None
    aux: tuple[Tensor, ...]


class RouteGrads(NamedTuple):
    """The gradients of a routing's outputs (``None``: the output was not used)."""

    gates: Tensor | None
    probs: Tensor | None
    aux: tuple[Tensor | None, ...]


class GatedSaved(NamedTuple):
    """What :meth:`Gating.backward` reads of the default gated forward."""

    za: Tensor  # (n, e·r)
    gates: Tensor  # (n, e)
    route: Any  # the record of :meth:`Gating.route`


def apply_gates(za: Tensor, gates: Tensor) -> Tensor:
    """``zg (n, e·r)``: each expert's ``r`` columns of ``za`` times its gate (in ``za``'s
    dtype) for ``gates (n, e)``."""
    g = gates.to(za.dtype)
    return (za.unflatten(1, (g.shape[1], -1)) * g[:, :, None]).flatten(1)


def gated_grads(
    za: Tensor, gates: Tensor, grad_zg: Tensor, grad_gates: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`apply_gates` for ``za (n, e·r)``, ``gates (n, e)`` and ``grad_zg
    (n, e·r)``: ``∂L/∂za``, ``zg`` recomputed, and ``∂L/∂gates (n, e)`` (in ``gates``' dtype:
    the experts' part plus ``grad_gates``, the gradient of the gates as an output, if any)."""
    e = gates.shape[1]
    g_c = gates.to(za.dtype)[:, :, None]  # (n, e, 1)
    gz3, za3 = grad_zg.unflatten(1, (e, -1)), za.unflatten(1, (e, -1))  # (n, e, r)
    from_experts = (gz3 * za3).sum(-1).to(gates.dtype)  # (n, e)
    gg = from_experts if grad_gates is None else grad_gates + from_experts
    return (gz3 * g_c).flatten(1), (za3 * g_c).flatten(1), gg


class Gating(ABC):
    """One forward's routing and gating inside a fused node (see the module docstring)."""

    #: names of the auxiliary losses, in the order :class:`Routed` holds them
    aux_names: tuple[str, ...] = ()

    def inputs(self) -> tuple[Tensor, ...]:
        """Tensors besides the logits that the routing reads and that may need gradients
        (a task router's learned task logits): the node takes them as inputs, and
        :meth:`backward` returns their gradients."""
        return ()

    @abstractmethod
    def route(self, logits: Tensor) -> tuple[Routed, Any]:
        """Route ``logits (n, l)`` (no autograd): the routing and the record its backward
        reads."""

    @abstractmethod
    def route_backward(
        self, saved: Any, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """``∂L/∂logits (n, l)`` and the gradients of :meth:`inputs`, from the routing
        outputs' gradients."""

    def routes_gradient(self, saved: Any) -> bool:
        """Whether gradients flow back through the routing (``False`` for fixed gates: the
        backward then skips the gates' gradient)."""
        return True

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        """Route the logit columns of ``zl (n, e·r + l)`` and gate its first ``e·r``: ``zg
        (n, e·r)`` in ``zl``'s dtype, the routing and the record :meth:`backward` reads."""
        za = zl[:, :er]
        routed, saved = self.route(zl[:, er:])
        return apply_gates(za, routed.gates), routed, GatedSaved(za, routed.gates, saved)

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        """The backward of :meth:`forward`: ``∂L/∂zl (n, e·r + l)``, ``zg`` recomputed
        (``None`` when ``grad_zg`` is) and the gradients of :meth:`inputs`."""
        za, gates, route_saved = saved
        g_c = gates.to(za.dtype)
        e = g_c.shape[1]
        zg = None
        grad_gates = grads.gates
        if grad_zg is None:
            grad_za = torch.zeros_like(za)
        else:
            gz3, za3 = grad_zg.unflatten(1, (e, -1)), za.unflatten(1, (e, -1))  # (n, e, r)
            grad_za = (gz3 * g_c[:, :, None]).flatten(1)
            if self.routes_gradient(route_saved):
                from_experts = (gz3 * za3).sum(-1).to(gates.dtype)  # (n, e)
                grad_gates = from_experts if grad_gates is None else grad_gates + from_experts
            zg = (za3 * g_c[:, :, None]).flatten(1)
        grad_logits, input_grads = self.route_backward(
            route_saved, grads._replace(gates=grad_gates)
        )
        if grad_logits.shape[1] == 0:  # no logit columns (routing by task)
            return grad_za, zg, input_grads
        return torch.cat([grad_za, grad_logits.to(za.dtype)], dim=1), zg, input_grads


class ReplaySaved(NamedTuple):
    """:class:`ReplayGating`'s record: the detached logits leaf and the routing recorded on
    it (with its autograd graph)."""

    leaf: Tensor
    result: RoutingResult


class ReplayGating(Gating):
    """Any router: ``route(logits)`` (its routing of precomputed logits) recorded under
    autograd on a detached leaf of the logits (as reentrant checkpointing does), the graph
    replayed once in the backward.  ``params`` (the router's trainable parameters) are
    :meth:`inputs`, so the gradients of those the routing reads reach them through the node.

    Args:
        route: the router's routing of ``(n, l)`` logits.
        aux_names: the names of the losses ``route`` returns.
        params: the router's parameters that require gradients.
    """

    def __init__(
        self,
        route: Callable[[Tensor], RoutingResult],
        aux_names: tuple[str, ...],
        params: tuple[Tensor, ...],
    ) -> None:
        self._route = route
        self.aux_names = aux_names
        self._params = params
        self._record = torch.is_grad_enabled()  # at the node's call (its forward runs without)

    def inputs(self) -> tuple[Tensor, ...]:
        return self._params

    def route(self, logits: Tensor) -> tuple[Routed, ReplaySaved]:
        leaf = logits.detach().requires_grad_(self._record)
        with torch.set_grad_enabled(self._record):
            result = self._route(leaf)
        if set(result.aux_losses) != set(self.aux_names):
            raise ValueError(
                f"a router's route() must return the auxiliary losses its config declares "
                f"(loss_weights): expected {sorted(self.aux_names)}, got "
                f"{sorted(result.aux_losses)}"
            )
        aux = tuple(result.aux_losses[name].detach() for name in self.aux_names)
        routed = Routed(
            result.gates.detach(), result.probs.detach(), result.chosen, result.indices, aux
        )
        return routed, ReplaySaved(leaf, result)

    def routes_gradient(self, saved: ReplaySaved) -> bool:
        r = saved.result
        return any(t.requires_grad for t in (r.gates, r.probs, *r.aux_losses.values()))

    def route_backward(
        self, saved: ReplaySaved, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        leaf, result = saved
        pairs = [(result.gates, grads.gates), (result.probs, grads.probs)]
        pairs += [(result.aux_losses[n], g) for n, g in zip(self.aux_names, grads.aux)]
        used = [(out, g) for out, g in pairs if g is not None and out.requires_grad]
        got: tuple[Tensor | None, ...] = (None,) * (1 + len(self._params))
        if used:
            with torch.enable_grad():
                got = torch.autograd.grad(
                    [o for o, _ in used],
                    [leaf, *self._params],
                    [g for _, g in used],
                    allow_unused=True,
                    retain_graph=True,  # the node's backward may run again (retain_graph)
                )
        grad = got[0] if got[0] is not None else torch.zeros_like(leaf)
        return grad, got[1:]
