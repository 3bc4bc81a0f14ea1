"""The frozen layer, a router and its gated LoRA experts as one autograd node.

Shapes: ``x (n, i)`` (leading dims flattened), ``W (o × i)``, ``A (e, r, i)`` the experts'
down projections (``(e·r × i)`` stacked), ``B (o, e, r)`` their up projections (``(o × e·r)``),
``R (l × i)`` the router's logit rows (given as the router's blocks of them, see
:meth:`~moracl.experts.routers.base.Router.logit_parts`), ``zl (n, e·r + l)``.

``out = x Wᵀ + b + s · ((x Aᵀ) ⊙ G) Bᵀ``: the router's rows ride along with the experts' down
projections in one matmul ``x [A; R]ᵀ``, a :class:`~moracl.experts.gating.Gating` routes the
logit columns into gates ``(n, e)`` (broadcast over each expert's ``r`` columns as ``G``) and
gates the experts' columns, and the backward returns the logits' gradient through the same
matmuls (``[∂za, ∂logits]`` against ``[A; R]``), so routing adds no pass over the
activations.  Routing by task alone has ``l = 0``.  The parameters enter the node as they
are held (no flattening or concatenation outside it), so the autograd graph has no view or
concatenation nodes for them.  ``[A; R]`` gets zero rows up to a
multiple of 8 (:func:`~moracl.adapters.fused.stacked_rows`): a hierarchical router's
``l = 20`` beside ``e·r = 128`` otherwise leaves every matmul of the node unaligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from moracl.adapters.fused import (
    compute_dtype,
    frozen_layer_grads,
    frozen_plus_update,
    node_output,
    row_block_grads,
    stacked_rows,
)
from moracl.experts.gating import Gating, Routed, RouteGrads
from moracl.experts.saved import load_record, save_record

__all__ = ["routed_lora_linear"]


class _RoutedLoRALinear(torch.autograd.Function):
    """See the module docstring.  Inputs after ``gating``: the number ``m`` of the router's
    row blocks, the ``m`` blocks, then the gating's
    :meth:`~moracl.experts.gating.Gating.inputs`.  Outputs: ``out (..., o)``, ``gates``,
    ``probs (n, e)``, ``chosen (n, e)``, ``indices (n, k)`` or ``None`` and the gating's
    auxiliary losses; ``out``, ``gates``, ``probs`` and the losses may carry a gradient back.
    The gating's record is kept by :func:`~moracl.experts.saved.save_record`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        s: float,
        gating: Gating,
        blocks: int,
        *inputs: Tensor,
    ) -> tuple[Any, ...]:
        ctx.set_materialize_grads(False)
        dt = x.dtype
        parts = inputs[:blocks]  # the router's row blocks: (l_j, i) each
        x2 = x.reshape(-1, x.shape[-1])  # (n, i)
        er = a.shape[0] * a.shape[1]
        width = er + sum(p.shape[0] for p in parts)  # e·r + l
        ar = stacked_rows((a.flatten(0, 1), *parts), dt)  # (w, i): e·r + l rows, zero rows
        b_c = b.flatten(1, 2).to(dt)  # (o, e·r)
        zl = x2 @ ar.t()  # (n, w): the experts' rank-space activations, then the logits
        zg, routed, saved = gating.forward(zl[:, :width], er)  # zg: (n, e·r)
        out = frozen_plus_update(zg, b_c, s, bias, x2, weight)  # (n, o)
        save_record(ctx, (x2, weight, ar, b_c), saved)  # no cycle through the outputs
        ctx.s, ctx.x_shape, ctx.gating = s, x.shape, gating
        ctx.shapes = (a.shape, b.shape, tuple(p.shape[0] for p in parts))
        ctx.dtypes = (a.dtype, b.dtype, tuple(p.dtype for p in parts))
        ctx.mark_non_differentiable(routed.chosen)
        out = node_output(out, x.shape[:-1])
        return (out, routed.gates, routed.probs, routed.chosen, routed.indices, *routed.aux)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor | None, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x2, weight, ar, b), saved = load_record(ctx)
        s, gating = ctx.s, ctx.gating
        a_shape, b_shape, rows = ctx.shapes
        a_dtype, b_dtype, part_dtypes = ctx.dtypes
        er = b.shape[1]
        grad_gates, grad_probs, _chosen, _indices, *grad_aux = grads
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        need_parts = ctx.needs_input_grad[8 : 8 + len(rows)]
        g2 = None if g is None else g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (n, o)
        grad_zg = None  # (n, e·r): s · g B, scaled in the matmul's epilogue
        if g2 is not None:
            grad_zg = torch.addmm(g2.new_empty(()), g2, b, beta=0, alpha=s)  # input unread
        route_grads = RouteGrads(grad_gates, grad_probs, tuple(grad_aux))
        grad_zl, zg, input_grads = gating.backward(saved, grad_zg, route_grads)  # (n, e·r + l)
        width = grad_zl.shape[1]
        if ar.shape[0] != width:  # the zero rows' columns, for aligned matmuls
            grad_zl = F.pad(grad_zl, (0, ar.shape[0] - width))  # (n, w)
        grad_a = grad_b = None
        grad_parts: list[Tensor | None] = [None] * len(rows)
        if g2 is not None and zg is not None and need_b:
            grad_b = torch.addmm(b, g2.t(), zg, beta=0, alpha=s).to(b_dtype).view(b_shape)
        if need_a or any(need_parts):
            grad_ar = grad_zl.t() @ x2  # (w, i): the zero rows get a gradient nobody reads
            if all(d == a_dtype for d in part_dtypes):  # one cast for all (one kernel a block)
                grad_ar = grad_ar.to(a_dtype)
            if need_a:
                grad_a = grad_ar[:er].to(a_dtype).view(a_shape)
            grad_parts = row_block_grads(grad_ar[er:], rows, need_parts, part_dtypes)
        grad_x, grad_w, grad_bias = frozen_layer_grads(
            g2, x2, weight, grad_zl, ar, (need_x, need_w, need_bias), ctx.x_shape
        )
        return (
            grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, *grad_parts,
            *input_grads,
        )  # fmt: skip


def routed_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    r: Sequence[Tensor],
    s: float,
    gating: Gating,
) -> tuple[Tensor, Routed]:
    """The frozen layer, a router and its gated LoRA experts as one autograd node.

    Args:
        x: ``(..., i)``; weight ``(o × i)``; bias ``(o,)`` or None; a: ``(e, r, i)``;
        b: ``(o, e, r)``; r: the router's logit rows as blocks ``(l_j × i)`` (``l = Σ
        l_j``, :meth:`~moracl.experts.routers.base.Router.logit_parts`); s: the scaling;
        gating: routes the ``(n, l)`` logits ``x Rᵀ`` and gates the experts.
    Returns:
        ``out (..., o)`` and the routing (gates, probabilities and auxiliary losses in the
        graph).
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    out, gates, probs, chosen, indices, *aux = _RoutedLoRALinear.apply(
        x.to(dt), weight.to(dt), bias, a, b, s, gating, len(r), *r, *gating.inputs()
    )
    return out, Routed(gates, probs, chosen, indices, tuple(aux))
