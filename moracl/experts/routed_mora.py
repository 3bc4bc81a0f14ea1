"""The frozen layer, a router and its gated MoRA-sharing experts as one autograd node.

Shapes: ``x (n, i)`` (leading dims flattened), ``W (o × i)``, ``M (e, r̂, r̂)`` the experts'
square matrices, ``C (r̂ × i)`` sharing's compression, ``D (o × r̂)`` its decompression,
``R (l × i)`` the router's logit rows; ``p`` is ``r̂`` rounded up to a multiple of 8.

``out = x Wᵀ + b + (Σ_e g_e · c M_eᵀ) Dᵀ`` with ``c = x Cᵀ``, computed as

- ``[c, logits] = x [C; R]ᵀ``: the router's rows ride along with the compression in one
  matmul, and the gating routes the logit columns into gates ``g (n, e)``;
- ``u = g ⊗ c (n, e·p)``: each expert's block of the compressed input times its gate;
- ``out = u Mₛ Dᵀ + x Wᵀ + b`` with ``Mₛ (e·p × p)`` the stacked ``M_eᵀ``: one matmul mixes
  the experts, and the decompression adds into the frozen product in a matmul's epilogue.

The mixture's unfused form computes every expert's ``c M_eᵀ`` as an ``(n, e, r̂)`` tensor,
gates and sums it, decompresses into a separate ``(n, o)`` tensor and adds that to the frozen
output: the node writes one ``(n, e·p)`` tensor instead and no ``(n, o)`` one besides the
output.  ``r̂`` is padded to ``p`` with zero rows and columns (of ``C``, ``D`` and ``M``) so
that every matmul's rows are 16-byte aligned in half precision: with ``r̂ = 350`` cuBLAS
otherwise falls back to slower kernels; ``[C; R]`` gets zero rows up to a multiple of 8 for
the same reason.  The backward recomputes ``u`` from ``c`` and the
gates rather than keeping it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moracl.adapters.fused import (
    aligned_size,
    compute_dtype,
    frozen_layer_grads,
    frozen_plus_update,
    node_output,
    row_block_grads,
    stacked_rows,
)
from moracl.experts.gating import Gating, Routed, RouteGrads
from moracl.experts.saved import load_record, save_record

__all__ = ["Helpers", "gate_grads", "gated", "routed_mora_linear"]


def gated(c: Tensor, gates: Tensor) -> Tensor:
    """``u (n, e·p)``: ``c (n, p)`` repeated per expert, each block times its gate ``gates
    (n, e)``, in ``c``'s dtype."""
    return (gates.to(c.dtype)[:, :, None] * c[:, None, :]).flatten(1)


def gate_grads(gu: Tensor, c: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of :func:`gated` for ``∂L/∂u = gu (n, e·p)``: ``∂L/∂gates (n, e)`` in
    ``gates``' dtype (each block's dot product with ``c``, summed in at least float32) and ``∂L/∂c
    (n, p)`` in ``gu``'s dtype (the blocks weighted by their gates)."""
    gu3 = gu.unflatten(1, (gates.shape[1], -1))  # (n, e, p)
    acc = torch.promote_types(gu.dtype, torch.float32)
    grad_gates = (gu3.to(acc) * c[:, None, :].to(acc)).sum(-1).to(gates.dtype)
    grad_c = (gu3 * gates.to(gu.dtype)[:, :, None]).sum(1)
    return grad_gates, grad_c


class Helpers(NamedTuple):
    """:func:`gated` and :func:`gate_grads` as the node runs them (compiled, or not)."""

    gated: Callable[[Tensor, Tensor], Tensor] = gated
    gate_grads: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = gate_grads


PLAIN = Helpers()  # uncompiled


class _RoutedMoRALinear(torch.autograd.Function):
    """See the module docstring.  Inputs: ``x``, ``W``, ``b``, ``M (e, r̂, r̂)``, ``cp (p, i)``
    and ``d (o, p)`` the padded compression and decompression, the gating, the helpers, the
    number ``m`` of the router's row blocks, the ``m`` blocks of ``R (l, i)``, then the
    gating's :meth:`~moracl.experts.gating.Gating.inputs`.  Outputs: ``out (...,
    o)``, ``gates``, ``probs (n, e)``, ``chosen (n, e)``, ``indices (n, k)`` or ``None`` and
    the gating's auxiliary losses."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        m: Tensor,
        cp: Tensor,
        d: Tensor,
        gating: Gating,
        helpers: Helpers,
        blocks: int,
        *inputs: Tensor,
    ) -> tuple[Any, ...]:
        ctx.set_materialize_grads(False)
        dt = x.dtype
        parts = inputs[:blocks]  # the router's row blocks: (l_j, i) each
        nl = sum(q.shape[0] for q in parts)  # l
        e, r_hat, _ = m.shape
        p = d.shape[1]
        x2 = x.reshape(-1, x.shape[-1])  # (n, i)
        with torch.autocast(x.device.type, enabled=False):  # every operand is in dt already
            ms = m.new_zeros(e, p, p, dtype=dt)
            ms[:, :r_hat, :r_hat] = m.transpose(1, 2)  # ms[e, s, t] = M_e[t, s]
            ms = ms.view(e * p, p)  # (e·p, p)
            cr = stacked_rows((cp, *parts), dt)  # (w, i): p + l rows, then zero rows (aligned w)
            zl = x2 @ cr.t()  # (n, w): the compressed input, then the logits
            c = zl[:, :p]
            routed, saved = gating.route(zl[:, p : p + nl])
            u = helpers.gated(c, routed.gates)  # (n, e·p)
            out = frozen_plus_update(u @ ms, d, 1.0, bias, x2, weight)  # (n, o)
        save_record(ctx, (x2, weight, cr, d, ms, c, routed.gates), saved)
        ctx.x_shape, ctx.gating, ctx.helpers, ctx.m_shape = x.shape, gating, helpers, (e, r_hat)
        ctx.dtypes = (m.dtype, tuple(q.dtype for q in parts))
        ctx.rows = tuple(q.shape[0] for q in parts)
        ctx.mark_non_differentiable(routed.chosen)
        out = node_output(out, x.shape[:-1])
        return (out, routed.gates, routed.probs, routed.chosen, routed.indices, *routed.aux)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor | None, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x2, weight, cr, d, ms, c, gates), saved = load_record(ctx)
        gating: Gating = ctx.gating
        helpers: Helpers = ctx.helpers
        e, r_hat = ctx.m_shape
        p = d.shape[1]
        n = x2.shape[0]
        grad_gates, grad_probs, _chosen, _indices, *grad_aux = grads
        need_x, need_w, need_bias, need_m = ctx.needs_input_grad[:4]
        rows: tuple[int, ...] = ctx.rows
        need_parts = ctx.needs_input_grad[9 : 9 + len(rows)]
        g2 = None if g is None else g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (n, o)
        grad_m = None
        grad_parts: list[Tensor | None] = [None] * len(rows)
        grad_c = None  # (n, p)
        if g2 is not None:
            gz = g2 @ d  # decompressionᵀ: (n, p)
            gu = gz @ ms.t()  # ∂L/∂u: (n, e·p)
            from_experts, grad_c = helpers.gate_grads(gu, c, gates)  # (n, e), (n, p)
            if gating.routes_gradient(saved):
                grad_gates = from_experts if grad_gates is None else grad_gates + from_experts
            if need_m:
                grad_ms = helpers.gated(c, gates).t() @ gz  # (e·p, p): [e, s, t] = ∂L/∂M_e[t, s]
                grad_ms = grad_ms.view(e, p, p)[:, :r_hat, :r_hat].transpose(1, 2)
                grad_m = grad_ms.to(ctx.dtypes[0])
        route_grads = RouteGrads(grad_gates, grad_probs, tuple(grad_aux))
        grad_logits, input_grads = gating.route_backward(saved, route_grads)
        if grad_c is None:
            grad_c = x2.new_zeros(n, p)
        nl = grad_logits.shape[1]
        pad = grad_c.new_zeros(n, cr.shape[0] - p - nl)  # the zero rows' columns
        grad_zl = torch.cat([grad_c, grad_logits.to(grad_c.dtype), pad], dim=1)  # (n, w)
        if any(need_parts):
            grad_r = grad_zl[:, p : p + nl].t() @ x2  # (l, i)
            grad_parts = row_block_grads(grad_r, rows, need_parts, ctx.dtypes[1])
        grad_x, grad_w, grad_bias = frozen_layer_grads(
            g2, x2, weight, grad_zl, cr, (need_x, need_w, need_bias), ctx.x_shape
        )
        return (
            grad_x, grad_w, grad_bias, grad_m, None, None, None, None, None, *grad_parts,
            *input_grads,
        )  # fmt: skip


def routed_mora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    m: Tensor,
    compress: Tensor,
    decompress: Tensor,
    r: Sequence[Tensor],
    gating: Gating,
    helpers: Helpers = PLAIN,
) -> tuple[Tensor, Routed]:
    """The frozen layer, a router and its gated MoRA-sharing experts as one autograd node.

    Args:
        x: ``(..., i)``; weight ``(o × i)``; bias ``(o,)`` or None.
        m: ``(e, r̂, r̂)`` the experts' square matrices.
        compress: ``(r̂ × i)`` sharing's compression matrix; decompress: ``(o × r̂)``.
        r: the router's logit rows ``R (l × i)`` as blocks ``(l_j × i)``
            (:meth:`~moracl.experts.routers.base.Router.logit_parts`; ``l = 0`` for routing
            by task).
        gating: routes the ``(n, l)`` logits ``x rᵀ`` and gates the experts.
        helpers: the gating of the compressed input and its backward (compiled ones for
            the ``compiled`` and ``triton`` backends on CUDA).
    Returns:
        ``out (..., o)`` and the routing (gates, probabilities and auxiliary losses in the
        graph); gradients reach ``x``, ``m`` and ``r`` (and the gating's inputs).
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    r_hat, i = compress.shape
    p = aligned_size(r_hat)
    cp = compress.new_zeros(p, i, dtype=dt)  # (p, i)
    cp[:r_hat] = compress
    d = decompress.new_zeros(decompress.shape[0], p, dtype=dt)  # (o, p)
    d[:, :r_hat] = decompress
    out, gates, probs, chosen, indices, *aux = _RoutedMoRALinear.apply(
        x.to(dt), weight.to(dt), bias, m, cp, d, gating, helpers, len(r), *r, *gating.inputs()
    )
    return out, Routed(gates, probs, chosen, indices, tuple(aux))
