"""MoRA ``rotation`` as one autograd node: the frozen matmul, then each rotated block's
square matrix added straight into the output's columns.

Shape legend: ``N`` tokens, ``i``/``o`` layer sizes, ``R = r̂``, ``u`` blocks computed,
``S = u·R``; ``M_t (u × R × R)`` the per-block matrices, made from ``M (R × R)`` and the
rotation tables inside the node (:func:`~moracl.adapters.mora.operators.rotated_blocks`), so
that the rotation adds no autograd nodes of its own.

Block ``t`` reads the inputs ``[tR, (t+1)R)`` (cyclically past ``i``) and writes
``y_t = x_t M_tᵀ`` to the outputs ``[tR, (t+1)R)``; the ``S`` outputs are truncated to ``o``,
or tiled over it when ``S < o``.  Against plain autograd over the operator's ``delta``:
when ``S ≥ o`` the blocks are batched matmuls that add in place into strided views of the
frozen output (forward) and of the frozen input gradient (backward, when ``S ≤ i``), with
no ``(N, S)`` intermediate, no transposed copy and no separate add; only ``x`` and the block
matrices are saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import moracl.adapters.fused as fused_nodes
from moracl.adapters.fused import compute_dtype, node_output
from moracl.adapters.mora.fused import fold, tile, tile_add_, tiled
from moracl.adapters.mora.operators import rotated_blocks, rotated_blocks_grad

__all__ = ["mora_rotation_linear"]


def _blocks(t: Tensor, width: int) -> Tensor:
    """``(N, u·width)`` (any row stride) as the view ``(u, N, width)``."""
    return t.unflatten(1, (-1, width)).transpose(0, 1)


def _read(x2: Tensor, span: int) -> Tensor:
    """The ``span`` inputs the blocks read: ``(N, span)``, a view unless cyclic padding."""
    return x2[:, :span] if span <= x2.shape[1] else tile(x2, span)


class _MoRARotationLinear(torch.autograd.Function):
    """``out = x Wᵀ + b + Δ(x)`` with frozen ``W``, ``b``; see the module docstring.  Inputs:
    ``x (..., i)``, ``W (o × i)``, ``b (o,)`` or None, ``M (R × R)``, ``cos, sin (u × R)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        m: Tensor,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        mt = rotated_blocks(m, cos, sin).to(x.dtype)  # (u, R, R)
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        u, r = mt.shape[0], mt.shape[1]
        o = weight.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xb = _blocks(_read(x2, u * r), r)  # (u, N, R)
            if u * r >= o:  # the first o outputs: f full blocks and rem columns of one more
                out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
                f, rem = divmod(o, r)
                if f:
                    _blocks(out[:, : f * r], r).baddbmm_(xb[:f], mt[:f].transpose(1, 2))
                if rem:
                    out[:, f * r :].addmm_(xb[f], mt[f, :rem].t())
            else:  # S < o: the S outputs tiled over o
                y = torch.bmm(xb, mt.transpose(1, 2)).transpose(0, 1).reshape(-1, u * r)
                if fused_nodes.update_first(x2):  # written, the frozen product in the epilogue
                    out = tiled(y, o, bias).addmm_(x2, weight.t())
                else:
                    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
                    tile_add_(out, y)
        ctx.save_for_backward(x, weight, mt, cos, sin)
        ctx.m_dtype = m.dtype
        return node_output(out, x.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mt, cos, sin = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        n, i = x2.shape
        u, r = mt.shape[0], mt.shape[1]
        o, span = weight.shape[0], mt.shape[0] * mt.shape[1]
        g2 = g.reshape(-1, o).to(x2.dtype)  # (N, o)
        need_x, need_w, need_bias, need_m = ctx.needs_input_grad[:4]
        if span >= o:  # ∂L/∂y: f full blocks viewed in g, and rem columns of block f
            f, rem = divmod(o, r)
            gy, part = _blocks(g2[:, : f * r], r), g2[:, f * r :]  # (f, N, R), (N, rem)
        else:  # the tiles of g summed
            f, rem = u, 0
            gy, part = _blocks(fold(g2, span), r), g2[:, :0]
        grad_x = grad_w = grad_bias = grad_m = None
        if need_m:
            xb = _blocks(_read(x2, span), r)  # (u, N, R)
            grad_m = torch.zeros_like(mt)  # (u, R, R)
            if f:
                torch.bmm(gy.transpose(1, 2), xb[:f], out=grad_m[:f])
            if rem:
                grad_m[f, :rem] = part.t() @ xb[f]
            grad_m = rotated_blocks_grad(grad_m.to(ctx.m_dtype), cos, sin)  # (R, R)
        if need_x:
            grad_x = g2 @ weight  # (N, i)
            if span <= i:  # in place, block by block
                gxb = _blocks(grad_x[:, :span], r)  # (u, N, R)
                if f:
                    gxb[:f].baddbmm_(gy, mt[:f])
                if rem:
                    gxb[f].addmm_(part, mt[f, :rem])
            else:  # cyclic padding: the blocks' gradient folded back onto the i inputs
                gxp = g2.new_zeros(u, n, r)
                if f:
                    torch.bmm(gy, mt[:f], out=gxp[:f])
                if rem:
                    gxp[f] = part @ mt[f, :rem]
                grad_x.add_(fold(gxp.transpose(0, 1).reshape(n, span), i))
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = g2.t() @ x2  # (o, i)
        if need_bias:
            grad_bias = g2.sum(0)  # (o,)
        return grad_x, grad_w, grad_bias, grad_m, None, None


def mora_rotation_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, m: Tensor, cos: Tensor, sin: Tensor
) -> Tensor:
    """The frozen layer plus MoRA-rotation's update as one node: ``(..., i) -> (..., o)``.

    Args:
        x: ``(..., i)``; weight: ``(o × i)``; bias: ``(o,)`` or None.
        m: MoRA's square matrix ``(R × R)``; its gradient is returned in its dtype.
        cos, sin: the rotation tables of the computed blocks ``(u × R)``.
    The caller checks that fused nodes may run (:func:`~moracl.adapters.fused.fused_enabled`
    on ``M``); the node's backward is not differentiable.
    """
    dt = compute_dtype(x)
    bias = None if bias is None else bias.to(dt)
    out: Tensor = _MoRARotationLinear.apply(x.to(dt), weight.to(dt), bias, m, cos, sin)
    return out
