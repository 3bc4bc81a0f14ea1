"""Fused training paths for the adapted layer: the frozen matmul and the adapter update in
one autograd node, so the update costs as few passes over the activations as possible.

Shapes: ``x (N, i)`` (leading dims flattened), ``W (o × i)``, ``g = ∂L/∂out (N, o)``.

What the fused nodes save against plain autograd:
- the update and the frozen product are summed in a matmul's epilogue (``addmm_``,
  ``beta = 1``; on CUDA the large matmul adds into the thin one's output, see
  :func:`frozen_plus_update`), and the input gradients the same way, so there is no
  separate accumulation pass over ``(N, o)`` or ``(N, i)``;
- scalars (LoRA's ``s``) are applied to rank-space tensors, never to ``(N, o)`` tensors;
- only ``x`` (shared with the caller) and rank-space tensors are saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "accumulate_input_grad",
    "compute_dtype",
    "frozen_plus_update",
    "fused_enabled",
    "lora_linear",
    "plain_autograd",
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


def frozen_plus_update(
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


def accumulate_input_grad(g: Tensor, weight: Tensor, gz: Tensor, a: Tensor) -> Tensor:
    """``g W + gz a`` ``(N, i)`` for ``g (N, o)``, ``W (o × i)``, ``gz (N, r)``, ``a (r × i)``:
    the input gradient of the frozen layer and its update, in the order
    :func:`frozen_plus_update` uses for the device."""
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
        out = frozen_plus_update(z, b_c, s, bias, x2, weight)  # (N, o)
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
            grad_x = accumulate_input_grad(g2, weight, gz, a).view(ctx.x_shape)  # (N, i)
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
