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

Higher-order gradients. Meta-learning differentiates through gradients; the fused nodes step
aside by themselves where it does:
- adapter weights that are computed tensors rather than leaf parameters (learn2learn's
  ``MAML.clone()`` and ``adapt()``, a functional inner-loop update) take plain autograd
  (:func:`fused_enabled` given the weights);
- the LoRA node's backward, run with ``create_graph=True`` (a gradient penalty, a
  Hessian-vector product), recomputes its rank-space product in the graph and is itself
  differentiable; the fast path is unchanged when no graph of the gradient is built.
Whatever else needs them (``torch.func`` transforms, a MoRA node's second backward on leaf
weights) runs inside :func:`plain_autograd`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "ALIGN",
    "accumulate_input_grad",
    "aligned_size",
    "compute_dtype",
    "frozen_plus_update",
    "fused_enabled",
    "in_backward",
    "lora_backward",
    "lora_linear",
    "node_output",
    "plain_autograd",
    "plain_lora_linear",
    "product_in",
    "row_block_grads",
    "scaled_down",
    "stacked_rows",
    "update_first",
]

#: Rows of a matmul operand are padded to a multiple of this many elements (16 bytes in half
#: precision): cuBLAS otherwise falls back to slower kernels (e.g. sm80 ones on an H100).
ALIGN = 8

_FUSED: ContextVar[bool] = ContextVar("moracl_fused", default=True)


def aligned_size(size: int) -> int:
    """``size`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-size // ALIGN) * ALIGN


def stacked_rows(parts: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``(aligned_size(m), i)``: the row blocks ``parts`` (``(m_j, i)`` each, ``m = Σ m_j``)
    stacked in ``dtype``, then zero rows, so that a product ``x @ stackedᵀ`` has rows of
    :data:`ALIGN`-aligned length (a router's 20 logit rows beside 128 expert rows would
    otherwise leave every matmul of a fused node's forward and backward unaligned)."""
    blocks = [p for p in parts if p.shape[0]] or list(parts[:1])
    rows = sum(p.shape[0] for p in blocks)
    total = aligned_size(rows)
    if total == rows:  # aligned already: a concatenation, then one cast
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).to(dtype)
    pad = blocks[0].new_zeros((total - rows, blocks[0].shape[1]))
    return torch.cat([*blocks, pad]).to(dtype)  # three calls, however many blocks


def row_block_grads(
    grad: Tensor, rows: Sequence[int], needs: Sequence[bool], dtypes: Sequence[torch.dtype]
) -> list[Tensor | None]:
    """The gradients of the row blocks :func:`stacked_rows` stacked, from ``grad (m', i)``
    whose leading ``Σ rows`` rows are theirs in order: block ``j``'s ``(rows[j], i)`` rows in
    ``dtypes[j]`` where ``needs[j]``, else ``None``."""
    out: list[Tensor | None] = []
    start = 0
    for count, need, dtype in zip(rows, needs, dtypes):
        out.append(grad[start : start + count].to(dtype) if need else None)
        start += count
    return out


def fused_enabled(*weights: Tensor | None) -> bool:
    """Whether adapted layers may use their fused nodes (see :func:`plain_autograd`); never
    while ``torch.compile`` traces, where plain operations let the compiler fuse them, nor
    when one of the adapter ``weights`` given is a computed tensor (not a leaf): a learner's
    adapted weights in meta-learning, whose second-order gradients need plain autograd."""
    if any(w is not None and not w.is_leaf for w in weights):
        return False
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


def in_backward() -> bool:
    """Whether the autograd engine is running this code: a forward called inside a backward
    pass is activation checkpointing recomputing a block (``torch.utils.checkpoint``,
    transformers' ``activation_checkpointing_enable()``)."""
    return bool(torch._C._current_graph_task_id() != -1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def node_output(out: Tensor, lead: tuple[int, ...]) -> Tensor:
    """A fused node's result ``out (N, o)`` in the shape ``(*lead, o)``, as a tensor that
    autograd does not take for a view.

    A custom node's output that is a view of a tensor made inside it may not be modified in
    place (autograd's rule for views made in a custom forward), so ``nn.ReLU(inplace=True)``
    or ``y.mul_(2)`` after the layer would raise where they work after ``nn.Linear``. The
    alias is safe because no node saves or returns ``out`` itself (as ``torch.matmul``
    reshapes its own results)."""
    return out.view(*lead, out.shape[-1]).detach()


def update_first(t: Tensor) -> bool:
    """Whether a node computes the update first and adds the frozen product into it in the
    large matmul's epilogue (``out = update; out.addmm_(x, Wᵀ)``): on CUDA, where reading the
    update there hides under the matmul's compute and saves a pass over ``(N, o)``.  On the
    CPU the frozen product goes first, as the unfused path computes it (``base_out +
    delta``), so that both round alike.  Tests patch it to run either order anywhere."""
    return t.is_cuda


def scaled_down(x: Tensor, a: Tensor, s: float) -> Tensor:
    """``s · x Aᵀ (N, r)`` for ``x (N, i)``, ``A (r × i)``: ``s`` in the matmul's epilogue
    (``beta = 0``: the 0-d input is never read), not a separate pass."""
    if s == 1:
        return x @ a.t()
    return torch.addmm(x.new_empty(()), x, a.t(), beta=0, alpha=s)


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
    if update_first(x):
        if bias is not None:
            out = torch.addmm(bias, z, b.t(), alpha=s)
        elif s != 1:  # s in the matmul's epilogue (beta = 0: the 0-d input is never read)
            out = torch.addmm(z.new_empty(()), z, b.t(), beta=0, alpha=s)
        else:
            out = z @ b.t()
        return out.addmm_(x, weight.t())
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return out.addmm_(z, b.t(), alpha=s)


def accumulate_input_grad(g: Tensor, weight: Tensor, gz: Tensor, a: Tensor) -> Tensor:
    """``g W + gz a`` ``(N, i)`` for ``g (N, o)``, ``W (o × i)``, ``gz (N, r)``, ``a (r × i)``:
    the input gradient of the frozen layer and its update, in the order
    :func:`frozen_plus_update` uses for the device."""
    if update_first(g):
        return (gz @ a).addmm_(g, weight)
    return (g @ weight).addmm_(gz, a)


def frozen_layer_grads(
    g: Tensor | None,
    x: Tensor,
    weight: Tensor,
    gz: Tensor,
    a: Tensor,
    needs: tuple[bool, bool, bool],
    x_shape: torch.Size,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂W, ∂b)`` of ``x Wᵀ + b + up(x aᵀ)`` for the output's gradient ``g (N, o)`` (or
    ``None``: only the update's) and the down projection's ``gz (N, r)``, ``x (N, i)``, ``a
    (r × i)``; ``needs``: which of the three are wanted (``None`` for the others); ``∂x`` in
    ``x_shape``."""
    need_x, need_w, need_bias = needs
    grad_x = grad_w = grad_bias = None
    if need_x:
        if g is None:
            grad_x = (gz @ a).view(x_shape)
        else:
            grad_x = accumulate_input_grad(g, weight, gz, a).view(x_shape)
    if g is not None and need_w:
        grad_w = g.t() @ x
    if g is not None and need_bias:
        grad_bias = g.sum(0)
    return grad_x, grad_w, grad_bias


#: ``torch.mm(..., out_dtype=)`` exists (CUDA: half-precision operands, a float32 product)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def product_in(m1: Tensor, m2: Tensor, dtype: torch.dtype) -> Tensor:
    """``m1 @ m2`` in ``dtype`` (a parameter's, for its gradient).  On CUDA, half-precision
    operands and a float32 ``dtype`` give the float32 product straight from the matmul (its
    accumulator, not rounded to half precision, and no cast kernel); elsewhere the product
    is cast."""
    if (
        dtype == torch.float32
        and m1.dtype in (torch.float16, torch.bfloat16)
        and m1.is_cuda
        and _MM_OUT_DTYPE
    ):
        return torch.mm(m1, m2, out_dtype=dtype)
    out = m1 @ m2
    return out if out.dtype == dtype else out.to(dtype)


def plain_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float
) -> Tensor:
    """``x Wᵀ + b + (s · x Aᵀ) Bᵀ`` ``(..., o)`` in plain autograd (differentiable to any
    order), as the unfused LoRA layer computes it, in ``x``'s dtype."""
    dt = x.dtype
    z = F.linear(x, a.to(dt)) * s  # (..., r)
    return F.linear(x, weight, bias) + F.linear(z, b.to(dt))  # (..., o)


def lora_backward(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    zs: Tensor,
    s: float,
    needs: tuple[bool, bool, bool, bool],
    dtypes: tuple[torch.dtype, torch.dtype] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``x Wᵀ + zs Bᵀ`` (``zs = s · x Aᵀ``, the scaled down projection)
    given ``g = ∂L/∂out (N, o)``: ``(∂x (N, i), ∂W (o × i), ∂A (r × i), ∂B (o × r))``, each
    ``None`` where ``needs`` (the same four) says so; ``s`` is applied in rank space, the
    input gradients summed in a matmul's epilogue (:func:`accumulate_input_grad`).
    ``x (N, i)``, ``A``, ``B`` in ``x``'s dtype; ``∂A`` and ``∂B`` in ``dtypes`` (the
    parameters'; default ``x``'s), straight from their matmuls where the device can
    (:func:`product_in`)."""
    need_x, need_w, need_a, need_b = needs
    da, db = dtypes if dtypes is not None else (x.dtype, x.dtype)
    gz = torch.addmm(zs, g, b, beta=0, alpha=s)  # s · g B: (N, r), scaled in the epilogue
    grad_b = product_in(g.t(), zs, db) if need_b else None  # (o, r)
    grad_a = product_in(gz.t(), x, da) if need_a else None  # (r, i)
    grad_x = accumulate_input_grad(g, weight, gz, a) if need_x else None  # (N, i)
    grad_w = g.t() @ x if need_w else None  # (o, i)
    return grad_x, grad_w, grad_a, grad_b


class _LoRALinear(torch.autograd.Function):
    """``out = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with frozen ``W``, ``b``; ``A``, ``B`` are cast to the
    compute dtype inside the node and their gradients returned in the parameters' dtype.

    The inputs are saved as given (``x`` is shared with the caller, ``A`` and ``B`` are
    parameters), so that a backward with ``create_graph=True`` can differentiate through
    them (:meth:`_differentiable_backward`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float
    ) -> Tensor:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        a_c = a if a.dtype == dt else a.to(dt)
        b_c = b if b.dtype == dt else b.to(dt)
        zs = scaled_down(x2, a_c, s)  # s · x Aᵀ: (N, r)
        out = frozen_plus_update(zs, b_c, 1.0, bias, x2, weight)  # (N, o)
        ctx.save_for_backward(x, weight, bias, a, b, zs, a_c, b_c)  # casts kept: no recast
        ctx.s = s
        return node_output(out, x.shape[:-1])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself is differentiated
            return _LoRALinear._differentiable_backward(ctx, g)
        x, weight, _, a_p, b_p, zs, a, b = ctx.saved_tensors  # a, b: A, B in x's dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        g2 = g.reshape(-1, g.shape[-1])  # (N, o)
        if g2.dtype != x2.dtype:
            g2 = g2.to(x2.dtype)
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_x, grad_w, grad_a, grad_b = lora_backward(
            g2, x2, weight, a, b, zs, ctx.s, (need_x, need_w, need_a, need_b),
            (a_p.dtype, b_p.dtype),
        )  # fmt: skip
        return (
            None if grad_x is None else grad_x.view(x.shape),
            grad_w,
            g2.sum(0) if need_bias else None,
            grad_a,
            grad_b,
            None,
        )

    @staticmethod
    def _differentiable_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients as differentiable functions of ``g`` and the saved inputs: the
        rank-space product ``z`` is recomputed in the graph (the forward's copy has none)."""
        x, weight, _, a_p, b_p, *_ = ctx.saved_tensors
        s = ctx.s
        x2 = x.reshape(-1, x.shape[-1])  # (N, i)
        a, b = a_p.to(x.dtype), b_p.to(x.dtype)  # (r, i), (o, r)
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (N, o)
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gz = (g2 @ b) * s  # (N, r)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = (g2.t() @ (x2 @ a.t()) * s).to(b_p.dtype)  # (o, r)
        if need_a:
            grad_a = (gz.t() @ x2).to(a_p.dtype)  # (r, i)
        if need_x:
            grad_x = (g2 @ weight + gz @ a).view(x.shape)  # (N, i)
        if need_w:
            grad_w = g2.t() @ x2  # (o, i)
        if need_bias:
            grad_bias = g2.sum(0)  # (o,)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    s: float,
    *,
    params: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """``x Wᵀ + b + s · x Aᵀ Bᵀ`` as one autograd node, in the layer's compute dtype; in plain
    autograd (:func:`plain_lora_linear`) where the adapter's parameters are computed tensors
    (see :func:`fused_enabled`).

    Args:
        x: ``(..., i)``; weight: ``(o × i)``; bias: ``(o,)`` or None; a: ``(r × i)``;
        b: ``(o × r)``; s: LoRA's scaling.
        params: the parameters ``a`` and ``b`` are computed from (a rank mask, a scale per
            channel), ``(a, b)`` themselves when ``None``: autograd takes the node's
            gradients for ``a`` and ``b`` back to them.
    Returns: ``(..., o)``.
    """
    dt = compute_dtype(x)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    x = x if x.dtype == dt else x.to(dt)
    weight = weight if weight.dtype == dt else weight.to(dt)
    if not fused_enabled(*(params if params is not None else (a, b))):
        return plain_lora_linear(x, weight, bias, a, b, s)
    out: Tensor = _LoRALinear.apply(x, weight, bias, a, b, s)
    return out
