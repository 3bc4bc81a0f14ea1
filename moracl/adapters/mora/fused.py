"""MoRA ``sharing`` as one autograd node with structured (matmul-free) compression.

Shape legend: ``N`` tokens, ``i``/``o`` layer sizes, ``r`` = ``r̂``.

compress   ``(N, i) -> (N, r)``: ``c[s] = Σ_{p < G·r, p ≡ s (mod r)} x[p mod i]`` (cyclic padding
           to ``G = ceil(i / r)`` groups, then a group sum);
decompress ``(N, r) -> (N, o)``: ``y[k] = z[k mod r]`` (tiling).
Their transposes are a fold (sum of tiles) and a tiled add.  Each is one pass over the
activations, where the matrix form costs a matmul with ``r`` in the hundreds.

Where the update goes first (CUDA, :func:`~moracl.adapters.fused.update_first`) the node
writes the tiled update (and the bias) into a fresh output and adds the frozen product into it
in the matmul's epilogue, and the input gradient likewise, rather than adding the tiles into
the frozen product in place: one write of ``(N, o)`` instead of a read and a write.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

import moracl.adapters.fused as fused_nodes
from moracl.adapters.fused import compute_dtype, fused_enabled, node_output

__all__ = [
    "compress",
    "fold",
    "mora_sharing_linear",
    "plain_mora_sharing_linear",
    "tile",
    "tile_add_",
    "tiled",
]


def fold(t: Tensor, period: int) -> Tensor:
    """``(N, L) -> (N, period)``: ``out[s] = Σ_{p ≡ s (mod period)} t[p]``."""
    n, length = t.shape
    k, rem = divmod(length, period)
    out = t[:, : k * period].unflatten(1, (k, period)).sum(1) if k else t.new_zeros(n, period)
    if rem:
        out[:, :rem] += t[:, k * period :]
    return out


def tile_add_(dst: Tensor, src: Tensor) -> Tensor:
    """In place ``dst (N, L) += src (N, P)`` tiled: ``dst[p] += src[p mod P]``."""
    period = src.shape[1]
    k, rem = divmod(dst.shape[1], period)
    if k:
        dst[:, : k * period].unflatten(1, (k, period)).add_(src[:, None, :])
    if rem:
        dst[:, k * period :].add_(src[:, :rem])
    return dst


def tile(z: Tensor, length: int) -> Tensor:
    """Sharing's decompression ``(N, r) -> (N, length)``: ``y[k] = z[k mod r]`` (a repeat,
    differentiable)."""
    reps = -(-length // z.shape[1])
    return z.repeat(1, reps)[:, :length] if reps > 1 else z[:, :length]


def tiled(z: Tensor, length: int, bias: Tensor | None = None) -> Tensor:
    """``(N, P) -> (N, length)`` contiguous, ``y[k] = z[k mod P] (+ bias[k])``: sharing's
    decompression (plus the bias ``(length,)``) written in one pass."""
    n, period = z.shape
    k, rem = divmod(length, period)
    out = z.new_empty(n, length)
    if k:
        body = out[:, : k * period].view(n, k, period)
        if bias is None:
            body.copy_(z[:, None, :])
        else:
            torch.add(z[:, None, :], bias[: k * period].view(k, period), out=body)
    if rem:
        tail = out[:, k * period :]
        if bias is None:
            tail.copy_(z[:, :rem])
        else:
            torch.add(z[:, :rem], bias[k * period :], out=tail)
    return out


def compress_t(gc: Tensor, i: int) -> Tensor:
    """``compressᵀ(gc (N, r))``: a fresh ``(N, i)``."""
    r = gc.shape[1]
    if i < r:
        return fold(gc, i)
    out = tiled(gc, i)
    rem = i % r
    if rem:
        out[:, : r - rem] += gc[:, rem:]
    return out


def compress(x: Tensor, r: int) -> Tensor:
    """Sharing's compression ``(N, i) -> (N, r)`` (cyclic padding, group sum)."""
    i = x.shape[1]
    if i < r:  # one group: x repeated cyclically
        return tile_add_(x.new_zeros(x.shape[0], r), x)
    c = fold(x, r)
    rem = i % r
    if rem:  # the padding wraps around to x[0 : r - rem] and lands in slots rem..r-1
        c[:, rem:] += x[:, : r - rem]
    return c


def compress_t_add_(grad_x: Tensor, gc: Tensor) -> Tensor:
    """In place ``grad_x (N, i) += compressᵀ(gc (N, r))``."""
    i, r = grad_x.shape[1], gc.shape[1]
    if i < r:
        return grad_x.add_(fold(gc, i))
    tile_add_(grad_x, gc)
    rem = i % r
    if rem:
        grad_x[:, : r - rem] += gc[:, rem:]
    return grad_x


class _MoRASharingLinear(torch.autograd.Function):
    """``out = x Wᵀ + b + decompress(compress(x) Mᵀ)`` with frozen ``W``, ``b``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, m: Tensor
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        with torch.autocast(x.device.type, enabled=False):  # sums would run in fp32 under autocast
            c = compress(x2, m.shape[0])  # (N, r)
            if fused_nodes.update_first(x2):  # the frozen product added in the epilogue
                out = tiled(c @ m.t(), weight.shape[0], bias).addmm_(x2, weight.t())
            else:
                out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
                tile_add_(out, c @ m.t())  # (N, r) tiled over o
        ctx.save_for_backward(weight, m, c)
        ctx.x_shape = x.shape
        return node_output(out, x.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, m, c = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(c.dtype)  # (N, o)
        need_x, need_w, need_bias, need_m = ctx.needs_input_grad
        gz = fold(g2, m.shape[0])  # decompressᵀ: (N, r)
        grad_x = grad_w = grad_bias = grad_m = None
        if need_m:
            grad_m = gz.t() @ c  # (r, r)
        if need_x:
            if fused_nodes.update_first(g2):
                grad_x = compress_t(gz @ m, weight.shape[1]).addmm_(g2, weight)
            else:
                grad_x = compress_t_add_(g2 @ weight, gz @ m)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            raise RuntimeError("the fused MoRA path expects a frozen base weight")
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_m


def plain_mora_sharing_linear(x: Tensor, weight: Tensor, bias: Tensor | None, m: Tensor) -> Tensor:
    """The frozen layer plus MoRA-sharing's update ``(..., i) -> (..., o)`` in plain autograd
    (differentiable to any order)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, i)
    out = F.linear(x2, weight, bias)  # (N, o)
    z = compress(x2, m.shape[0]) @ m.t()  # (N, r)
    out = out + tile(z, out.shape[1])  # (N, o)
    return out.view(*x.shape[:-1], out.shape[-1])


def mora_sharing_linear(x: Tensor, weight: Tensor, bias: Tensor | None, m: Tensor) -> Tensor:
    """The frozen layer plus MoRA-sharing's update as one node: ``(..., i) -> (..., o)``; in
    plain autograd (:func:`plain_mora_sharing_linear`) where ``m`` is a computed tensor (a
    learner's adapted weight in meta-learning, see
    :func:`~moracl.adapters.fused.fused_enabled`).

    The node's backward is not differentiable: a second-order gradient through a leaf ``m``
    (a gradient penalty) needs :func:`~moracl.adapters.fused.plain_autograd`."""
    dt = compute_dtype(x)
    bias = None if bias is None else bias.to(dt)
    if not fused_enabled(m):
        return plain_mora_sharing_linear(x.to(dt), weight.to(dt), bias, m.to(dt))
    out: Tensor = _MoRASharingLinear.apply(x.to(dt), weight.to(dt), bias, m.to(dt))
    return out
