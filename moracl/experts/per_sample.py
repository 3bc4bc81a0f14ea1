"""Routing per sample: one routing decision for all the tokens of a batch row.

Shape legend: ``b`` samples (batch rows), ``t`` tokens per sample, ``n = b·t`` tokens,
``d`` features, ``l`` logit columns, ``e`` experts.

A router configured with ``per="sample"`` routes the mean of a sample's token inputs, and
every token of the sample gets that routing.  Routers score inputs linearly (``x Wᵀ``), so
the router's logits of the mean input are the mean of its tokens' logits: a mixture that
computes per-token logits in its own matmul (the fused node) pools those instead
(:class:`SampleRouteOp`), at no extra pass over the activations.

Padding.  Inputs padded to a common length carry positions that are not tokens; a model that
knows its padding declares it for the duration of a forward with :func:`token_mask`, and
per-sample routing then averages over the real tokens only (the rows' padded positions still
get their row's gates, which nothing reads).  Without a declared mask every position counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from moracl.experts.route_ops import RouteOp
from moracl.experts.routing import RoutingResult

__all__ = [
    "SampleRouteOp",
    "current_token_mask",
    "expand_result",
    "pool_weights",
    "token_mask",
]

_TOKEN_MASK: ContextVar[Tensor | None] = ContextVar("moracl_token_mask", default=None)


@contextmanager
def token_mask(mask: Tensor) -> Iterator[None]:
    """Declare ``mask (b, t)`` (nonzero on real tokens, zero on padding) for the layers run
    inside the block: per-sample routers average over the real tokens of each row."""
    if mask.ndim != 2:
        raise ValueError(f"a token mask must have shape (b, t), got {tuple(mask.shape)}")
    handle = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(handle)


def current_token_mask() -> Tensor | None:
    """The mask declared by the innermost :func:`token_mask` block, or ``None``."""
    return _TOKEN_MASK.get()


def pool_weights(lead: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(b, t)`` each token's weight in its sample's mean, for an input with leading shape
    ``lead = (b, t1, t2, ...)`` (``t = t1·t2···``; ``(b,)``: one token per sample).

    The weights are the declared :func:`token_mask` normalised per row (a row with no real
    token weighs its positions equally), or ``1 / t`` without a mask.

    Raises:
        ValueError: a declared mask whose shape is not ``lead``.
    """
    b = lead[0] if len(lead) else 1
    t = lead[1:].numel()
    mask = current_token_mask()
    if mask is None:
        return torch.full((b, t), 1.0 / max(t, 1), device=device, dtype=dtype)
    if tuple(mask.shape) != (b, t) or len(lead) != 2:
        raise ValueError(
            f"the declared token mask has shape {tuple(mask.shape)} but the routed input's "
            f"leading shape is {tuple(lead)}; expected a (b, t) input under a (b, t) mask"
        )
    m = (mask != 0).to(device=device, dtype=dtype)  # (b, t)
    count = m.sum(1, keepdim=True)  # (b, 1)
    m = torch.where(count > 0, m, torch.ones_like(m))  # a row of padding only: all positions
    return m / m.sum(1, keepdim=True)


def expand_rows(x: Tensor, t: int) -> Tensor:
    """``(b, ...)`` -> ``(b·t, ...)``: each sample's row repeated for its ``t`` tokens."""
    return x.repeat_interleave(t, dim=0) if t != 1 else x


def expand_result(result: RoutingResult, t: int) -> RoutingResult:
    """A routing of ``b`` samples as the routing of their ``b·t`` tokens (auxiliary losses,
    computed over the samples, unchanged)."""
    return RoutingResult(
        gates=expand_rows(result.gates, t),
        probs=expand_rows(result.probs, t),
        chosen=expand_rows(result.chosen, t),
        indices=None if result.indices is None else expand_rows(result.indices, t),
        aux_losses=result.aux_losses,
        aux_weights=result.aux_weights,
    )


class SampleRouteOp(RouteOp):
    """Per-sample routing on per-token logits: pool ``logits (n, l)`` to ``(b, l)`` with
    ``weights (b, t)`` (in the routing dtype), route the samples with ``inner`` (built for
    ``b`` rows), and give every token its sample's gates and probabilities.  Backward: the
    tokens' gradients summed per sample, through ``inner``, then spread back over the tokens
    by their weights."""

    def __init__(self, inner: RouteOp, weights: Tensor) -> None:
        self.inner = inner
        self.weights = weights  # (b, t)
        self.aux_names = ()
        self._sample: tuple[Tensor, Tensor] | None = None  # gates, probs (b, e)
        self._dtype = weights.dtype  # the logits' dtype, set by forward

    @property
    def _shape(self) -> tuple[int, int]:
        b, t = self.weights.shape
        return b, t

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        b, t = self._shape
        if logits.shape[0] != b * t:
            raise ValueError(
                f"per-sample routing of {b} samples of {t} tokens got logits for "
                f"{logits.shape[0]} tokens"
            )
        self._dtype = logits.dtype
        w = self.weights  # in the routing dtype (at least float32)
        pooled = torch.einsum("bt,btl->bl", w, logits.view(b, t, -1).to(w.dtype))  # (b, l)
        gates, probs, aux = self.inner.forward(pooled)  # (b, e) each
        self.aux_names = self.inner.aux_names
        self._sample = (gates, probs)
        return expand_rows(gates, t), expand_rows(probs, t), aux

    def backward(
        self,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> Tensor:
        b, t = self._shape

        def per_sample(g: Tensor | None) -> Tensor | None:
            return None if g is None else g.view(b, t, -1).sum(1)  # (b, e)

        grad = self.inner.backward(per_sample(grad_gates), per_sample(grad_probs), grad_aux)
        w = self.weights.to(grad.dtype)
        return (w[:, :, None] * grad[:, None, :]).reshape(b * t, -1).to(self._dtype)  # (n, l)

    def routes_gradient(self) -> bool:
        return self.inner.routes_gradient()

    def inputs(self) -> tuple[Tensor, ...]:
        return self.inner.inputs()

    def input_grads(self) -> tuple[Tensor | None, ...]:
        return self.inner.input_grads()

    def result(self, gates: Tensor, probs: Tensor, aux: tuple[Tensor, ...]) -> RoutingResult:
        """The tokens' routing: the node's ``gates``, ``probs (n, e)`` (so gradients reach the
        routing through them), the samples' choices repeated per token."""
        assert self._sample is not None, "result before forward"
        t = self._shape[1]
        sample = self.inner.result(*self._sample, aux)
        return RoutingResult(
            gates=gates,
            probs=probs,
            chosen=expand_rows(sample.chosen, t),
            indices=None if sample.indices is None else expand_rows(sample.indices, t),
            aux_losses=sample.aux_losses,
            aux_weights=sample.aux_weights,
        )
