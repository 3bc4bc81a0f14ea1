"""DoRA's training step as one autograd node: the frozen matmul, the low-rank update and the
gain in one pass of each over the activations.

Shapes: ``x (N, i)`` (leading dims flattened), ``W (o × i)``, ``A (r × i)``, ``B (o × r)``,
``gain (o,)``, ``g = ∂L/∂out (N, o)``.

``out = gain ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias``.  Against plain autograd over the layer's
``base_out`` the node writes the pre-gain product once (the update added in the matmul's
epilogue, :func:`~moracl.adapters.fused.frozen_plus_update`) instead of the frozen output and
then the sum, and adds the update's input gradient in the frozen one's epilogue
(:func:`~moracl.adapters.fused.accumulate_input_grad`).  The backward folds the gain into
``W`` and ``B`` (``g ⊙ gain`` against ``W`` is ``g`` against ``diag(gain) W``) when there are
at least as many tokens as inputs, a pass over ``(o × i)`` instead of ``(N × o)``.  It saves
``x``, rank-space tensors and the pre-gain product ``(N, o)``, which the gain's gradient
``Σ_N g ⊙ pre`` reads, as autograd does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moracl.adapters.fused import (
    compute_dtype,
    frozen_plus_update,
    lora_backward,
    node_output,
    scaled_down,
)

__all__ = ["dora_linear"]


class _DoRALinear(torch.autograd.Function):
    """See the module docstring; ``A``, ``B`` and ``gain`` are cast to the compute dtype
    inside the node and their gradients returned in their own dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        s: float,
        gain: Tensor,
    ) -> Tensor:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        zs = scaled_down(x2, a.to(dt), s)  # s · x Aᵀ: (N, r)
        pre = frozen_plus_update(zs, b.to(dt), 1.0, None, x2, weight)  # x Wᵀ + zs Bᵀ: (N, o)
        g = gain.to(dt)
        out = torch.addcmul(bias, pre, g) if bias is not None else pre * g  # (N, o)
        ctx.save_for_backward(x, weight, a, b, gain, zs, pre)
        ctx.s = s
        return node_output(out, x.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, a_p, b_p, gain, zs, pre = ctx.saved_tensors
        s = ctx.s
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        a, b = a_p.to(x.dtype), b_p.to(x.dtype)
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (N, o)
        need_x, need_w, need_bias, need_a, need_b, _, need_gain = ctx.needs_input_grad
        needs = (need_x, need_w, need_a, need_b)
        gc = gain.to(x2.dtype)
        if x2.shape[0] >= x2.shape[1]:  # N >= i: scale W (o × i) and B, not g (N × o)
            col = gc[:, None]  # (o, 1)
            w_g = weight * col if need_x else weight  # diag(gain) W: (o, i)
            grad_x, grad_w, grad_a, grad_b = lora_backward(g2, x2, w_g, a, b * col, zs, s, needs)
            grad_w = None if grad_w is None else grad_w * col
            grad_b = None if grad_b is None else grad_b * col
        else:  # ∂L/∂pre = g ⊙ gain: (N, o)
            grad_x, grad_w, grad_a, grad_b = lora_backward(g2 * gc, x2, weight, a, b, zs, s, needs)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        grad_a = None if grad_a is None else grad_a.to(a_p.dtype)
        grad_b = None if grad_b is None else grad_b.to(b_p.dtype)
        grad_bias = g2.sum(0) if need_bias else None  # (o,)
        grad_gain = (g2 * pre).sum(0).to(gain.dtype) if need_gain else None  # (o,)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_gain


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    s: float,
    gain: Tensor,
) -> Tensor:
    """``gain ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias`` as one autograd node, in the layer's compute
    dtype; the caller checks that fused nodes may run (:func:`~moracl.adapters.fused.
    fused_enabled` on the adapter's parameters).

    Args:
        x: ``(..., i)``; weight: ``(o × i)``; bias: ``(o,)`` or None; a: ``(r × i)``;
        b: ``(o × r)``; s: LoRA's scaling; gain: ``(o,)``, DoRA's ``m / ‖W + s·BA‖``.
    Returns: ``(..., o)``.
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    out: Tensor = _DoRALinear.apply(x.to(dt), weight.to(dt), bias, a, b, s, gain)
    return out
