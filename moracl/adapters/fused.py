"""Fused training paths for the adapted layer: the frozen matmul and the adapter update in
one autograd node, so the update costs as few passes over the activations as possible.

Shapes: ``x (N, i)`` (leading dims flattened), ``W (o × i)``, ``g = ∂L/∂out (N, o)``.

What the fused nodes save against plain autograd:
- the update and the frozen product are summed in a matmul's epilogue (``addmm_``,
  ``beta = 1``; on CUDA the large matmul adds into the thin one's output, see
  :func:`_frozen_plus_update`), and the input gradients the same way, so there is no
  separate accumulation pass over ``(N, o)`` or ``(N, i)``;
- scalars (LoRA's ``s``) are applied to rank-space tensors, never to ``(N, o)`` tensors;
- only ``x`` (shared with the caller) and rank-space tensors are saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from moracl.experts.route_ops import RouteOp

__all__ = [
    "compute_dtype",
    "fused_enabled",
    "lora_linear",
    "plain_autograd",
    "routed_lora_linear",
]

_FUSED: ContextVar[bool] = ContextVar("moracl_fused", default=True)


def fused_enabled() -> bool:
    """Whether adapted layers may use their fused nodes (see :func:`plain_autograd`); never
    while ``torch.compile`` traces, where plain operations let the compiler fuse them."""
    return _FUSED.get() and not torch.compiler.is_compiling()


@contextmanager
def plain_autograd() -> Iterator[None]:
    """Inside the block adapted layers use plain autograd instead of the fused nodes.

    The fused nodes' backward is not itself differentiable (a second ``backward`` through it
    raises) and ``torch.func`` transforms (``grad``, ``vmap``) cannot enter them; code that
    needs either — MAML's second-order meta-gradients, gradient penalties — runs in here.
    """
    token = _FUSED.set(False)
    try:
        yield
    finally:
        _FUSED.reset(token)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _frozen_plus_update(
    z: Tensor, b: Tensor, s: float, bias: Tensor | None, x: Tensor, weight: Tensor
) -> Tensor:
    """``x Wᵀ + bias + s · z bᵀ`` ``(N, o)`` for ``z (N, r)``, ``b (o × r)``, ``x (N, i)``,
    ``W (o × i)``, with one write of ``(N, o)`` per matmul and no separate add.

    On CUDA the thin matmul goes first and the frozen product is added into it in the large
    matmul's epilogue, where reading the update hides under its compute (1.5 % of a LoRA
    training step on an H200). On the CPU the frozen product goes first, as the unfused path
    computes it (``base_out + delta``), so that both round alike and a grown mixture gives old
    tasks bit-identical outputs.
    """
    if x.is_cuda:
        if bias is not None:
            out = torch.addmm(bias, z, b.t(), alpha=s)
        else:
            out = z @ (b * s).t() if s != 1 else z @ b.t()  # s on the small (o × r) factor
        return out.addmm_(x, weight.t())
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return out.addmm_(z, b.t(), alpha=s)


def _accumulate(g: Tensor, weight: Tensor, gz: Tensor, a: Tensor) -> Tensor:
    """``g W + gz a`` ``(N, i)`` for ``g (N, o)``, ``W (o × i)``, ``gz (N, r)``, ``a (r × i)``:
    the input gradient of the frozen layer and its update, in the order
    :func:`_frozen_plus_update` uses for the device."""
    if g.is_cuda:
        return (gz @ a).addmm_(g, weight)
    return (g @ weight).addmm_(gz, a)


class _LoRALinear(torch.autograd.Function):
    """``out = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with frozen ``W``, ``b``; ``A``, ``B`` are cast to the
    compute dtype inside the node and their gradients returned in the parameters' dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float
    ) -> Tensor:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        a_c, b_c = a.to(dt), b.to(dt)
        z = x2 @ a_c.t()  # (N, r)
        out = _frozen_plus_update(z, b_c, s, bias, x2, weight)  # (N, o)
        ctx.save_for_backward(x2, weight, a_c, b_c, z)
        ctx.s, ctx.x_shape, ctx.a_dtype, ctx.b_dtype = s, x.shape, a.dtype, b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x2, weight, a, b, z = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (N, o)
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gz = torch.addmm(z, g2, b, beta=0, alpha=s)  # s · g B: (N, r), scaled in the epilogue
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = torch.addmm(b, g2.t(), z, beta=0, alpha=s).to(ctx.b_dtype)  # (o, r)
        if need_a:
            grad_a = (gz.t() @ x2).to(ctx.a_dtype)  # (r, i)
        if need_x:
            grad_x = _accumulate(g2, weight, gz, a).view(ctx.x_shape)  # (N, i)
        if need_w:
            grad_w = g2.t() @ x2
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float
) -> Tensor:
    """``x Wᵀ + b + s · x Aᵀ Bᵀ`` as one autograd node, in the layer's compute dtype.

    Args:
        x: ``(..., i)``; weight: ``(o × i)``; bias: ``(o,)`` or None; a: ``(r × i)``;
        b: ``(o × r)``; s: LoRA's scaling.
    Returns: ``(..., o)``.
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    out: Tensor = _LoRALinear.apply(x.to(dt), weight.to(dt), bias, a, b, s)
    return out


class _RoutedLoRALinear(torch.autograd.Function):
    """``out = x Wᵀ + b + s · ((x Aᵀ) ⊙ G) Bᵀ`` for stacked LoRA experts ``A (e·r × i)``,
    ``B (o × e·r)``, with the router inside: its logit rows ``R (l × i)`` ride along with the
    experts' down projections in one matmul ``x [A; R]ᵀ``, ``op`` (a
    :class:`~moracl.experts.route_ops.RouteOp`) routes those columns into gates ``(n, e)``
    (broadcast over each expert's ``r`` columns as ``G``), and the backward returns the
    logits' gradient through the same matmuls (``[∂za, ∂logits]`` against ``[A; R]``), so
    routing adds no pass over the activations.  Routing by task alone has ``l = 0``.

    Inputs after ``op``: the op's :meth:`~moracl.experts.route_ops.RouteOp.inputs`.
    Outputs: ``out (..., o)``, ``gates (n, e)``, ``probs (n, e)`` and the op's auxiliary
    losses; every one may carry a gradient back.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        r: Tensor,
        s: float,
        op: RouteOp,
        *route_inputs: Tensor,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (n, i)
        ar = (torch.cat([a, r]) if r.shape[0] else a).to(dt)  # (e·r + l, i)
        b_c = b.to(dt)
        zl = x2 @ ar.t()  # (n, e·r + l): the experts' rank-space activations, then the logits
        zg, gates, probs, aux = op.forward_gated(zl, a.shape[0])  # zg: (n, e·r)
        out = _frozen_plus_update(zg, b_c, s, bias, x2, weight)  # (n, o)
        ctx.save_for_backward(x2, weight, ar, b_c)
        ctx.s, ctx.x_shape, ctx.op = s, x.shape, op
        ctx.dtypes = (a.dtype, b.dtype, r.dtype)
        return (out.view(*x.shape[:-1], out.shape[-1]), gates, probs, *aux)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor | None, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x2, weight, ar, b = ctx.saved_tensors
        s, op = ctx.s, ctx.op
        er = b.shape[1]
        grad_gates, grad_probs, *grad_aux = grads
        need_x, need_w, need_bias, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        g2 = None if g is None else g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (n, o)
        grad_zg = None  # (n, e·r): s · g B, scaled in the matmul's epilogue
        if g2 is not None:
            grad_zg = torch.addmm(g2.new_empty(()), g2, b, beta=0, alpha=s)  # input unread
        grad_zl, zg = op.backward_gated(grad_zg, grad_gates, grad_probs, tuple(grad_aux))
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_r = None
        if g2 is not None and zg is not None and need_b:
            grad_b = torch.addmm(b, g2.t(), zg, beta=0, alpha=s).to(ctx.dtypes[1])  # (o, e·r)
        if need_a or need_r:
            grad_ar = grad_zl.t() @ x2  # (e·r + l, i)
            grad_a, grad_r = grad_ar[:er].to(ctx.dtypes[0]), grad_ar[er:].to(ctx.dtypes[2])
        if need_x:
            if g2 is None:
                grad_x = (grad_zl @ ar).view(ctx.x_shape)
            else:
                grad_x = _accumulate(g2, weight, grad_zl, ar).view(ctx.x_shape)  # (n, i)
        if g2 is not None and need_w:
            grad_w = g2.t() @ x2
        if g2 is not None and need_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_r, None, None, *op.input_grads()


def routed_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    r: Tensor,
    s: float,
    op: RouteOp,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """The frozen layer, a router and its gated LoRA experts as one autograd node.

    Args:
        x: ``(..., i)``; weight ``(o × i)``; bias ``(o,)`` or None; a: ``(e·r × i)``;
        b: ``(o × e·r)``; r: ``(l × i)`` the router's logit rows; s: the scaling;
        op: routes the ``(n, l)`` logits ``x rᵀ``.
    Returns:
        ``out (..., o)``, ``gates (n, e)``, ``probs (n, e)`` and the auxiliary losses in
        ``op.aux_names`` order.
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    out, gates, probs, *aux = _RoutedLoRALinear.apply(
        x.to(dt), weight.to(dt), bias, a, b, r, s, op, *op.inputs()
    )
    return out, gates, probs, tuple(aux)
