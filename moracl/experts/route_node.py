"""A router's routing as one autograd node, for mixtures whose experts are not plain LoRA
factors (MoRA and AdaLoRA banks, or several banks in one mixture): the logits ``x Rᵀ`` come
from a plain matmul, the node routes them with the router's :class:`~moracl.experts.gating.
Gating` (a closed form, compiled on CUDA, where the router kind has one) and its backward is
the gating's ``route_backward``, so the routing adds two calls to the graph instead of every
operation of the router's ``route``.

Shapes: ``logits (n, l)``; ``gates``, ``probs (n, e)``, ``chosen (n, e)`` bool, ``indices
(n, k)`` or ``None``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moracl.experts.gating import Gating, Routed, RouteGrads
from moracl.experts.saved import load_record, save_record

__all__ = ["route_node"]


class _Route(torch.autograd.Function):
    """See the module docstring.  Inputs after ``gating``: its
    :meth:`~moracl.experts.gating.Gating.inputs`.  Outputs: ``gates``, ``probs``, ``chosen``,
    ``indices`` and the gating's auxiliary losses; the gating's record is kept by
    :func:`~moracl.experts.saved.save_record`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, gating: Gating, *route_inputs: Tensor
    ) -> tuple[Any, ...]:
        ctx.set_materialize_grads(False)
        routed, saved = gating.route(logits)
        save_record(ctx, (), saved)  # no cycle through the outputs
        ctx.gating, ctx.dtype = gating, logits.dtype
        ctx.mark_non_differentiable(routed.chosen)
        return (routed.gates, routed.probs, routed.chosen, routed.indices, *routed.aux)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        gating: Gating = ctx.gating
        _, saved = load_record(ctx)
        grad_gates, grad_probs, _chosen, _indices, *grad_aux = grads
        route_grads = RouteGrads(grad_gates, grad_probs, tuple(grad_aux))
        grad, input_grads = gating.route_backward(saved, route_grads)
        return grad.to(ctx.dtype), None, *input_grads


def route_node(logits: Tensor, gating: Gating) -> Routed:
    """``logits (n, l)`` routed by ``gating`` in one autograd node (see the module
    docstring): gates, probabilities and auxiliary losses carry gradients back to the logits
    and to the gating's :meth:`~moracl.experts.gating.Gating.inputs`."""
    gates, probs, chosen, indices, *aux = _Route.apply(logits, gating, *gating.inputs())
    return Routed(gates, probs, chosen, indices, tuple(aux))
