"""Routing per sample: one routing decision for all the tokens of a batch row.

Shape legend: ``b`` samples (batch rows), ``t`` tokens per sample, ``n = b·t`` tokens,
``d`` features, ``l`` logit columns, ``e`` experts.

A router configured with ``per="sample"`` routes the mean of a sample's token inputs, and
every token of the sample gets that routing.  Routers score inputs linearly (``x Wᵀ``), so
the router's logits of the mean input are the mean of its tokens' logits: a mixture that
computes per-token logits in its own matmul (the fused node) pools those instead
(:class:`SampleGating`), at no extra pass over the activations.

Padding.  Inputs padded to a common length carry positions that are not tokens; a model that
knows its padding declares it for the duration of a forward with :func:`token_mask`, and
per-sample routing then averages over the real tokens only (the rows' padded positions still
get their row's gates, which nothing reads); routers that route each token route padded
positions too but leave them out of their auxiliary losses (:func:`active_tokens`), as
transformers' Mixtral leaves them out of its balance loss.  Without a declared mask every
position counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor

from moracl.experts.gating import Gating, Routed, RouteGrads
from moracl.experts.routing import RoutingResult

__all__ = [
    "SampleGating",
    "active_tokens",
    "current_token_mask",
    "declared_token_mask",
    "expand_result",
    "pool_weights",
    "token_mask",
]

_TOKEN_MASK: ContextVar[tuple[Tensor, bool] | None] = ContextVar("moracl_token_mask", default=None)


@contextmanager
def token_mask(mask: Tensor, *, strict: bool = True) -> Iterator[None]:
    """Declare ``mask (b, t)`` (nonzero on real tokens, zero on padding) for the layers run
    inside the block: per-sample routers average over the real tokens of each row.

    ``strict=False`` applies the mask only to inputs of leading shape ``(b, t)`` and lets
    others route unmasked (what the model wrapper declares from an ``attention_mask``,
    which also covers a decoding step's single token or a pooled head); by default an input
    of another shape is an error."""
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"a token mask must be a tensor of shape (b, t), got {got}")
    if not isinstance(strict, bool):
        raise ValueError(f"token_mask's strict must be True or False, got {strict!r}")
    handle = _TOKEN_MASK.set((mask, strict))
    try:
        yield
    finally:
        _TOKEN_MASK.reset(handle)


def declared_token_mask() -> tuple[Tensor, bool] | None:
    """``(mask, strict)`` of the innermost :func:`token_mask` block, or ``None``."""
    return _TOKEN_MASK.get()


def current_token_mask() -> Tensor | None:
    """The mask declared by the innermost :func:`token_mask` block, or ``None``."""
    declared = _TOKEN_MASK.get()
    return None if declared is None else declared[0]


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
    mask = _fitting_mask(lead)
    if mask is None:
        return torch.full((b, t), 1.0 / max(t, 1), device=device, dtype=dtype)
    m = (mask != 0).to(device=device, dtype=dtype)  # (b, t)
    count = m.sum(1, keepdim=True)  # (b, 1)
    m = torch.where(count > 0, m, torch.ones_like(m))  # a row of padding only: all positions
    return m / m.sum(1, keepdim=True)


def _fitting_mask(lead: torch.Size) -> Tensor | None:
    """The declared mask when it fits an input of leading shape ``lead``; ``None`` without
    one, or for a non-strict mask that does not fit.

    Raises:
        ValueError: a strict mask whose shape is not ``lead``.
    """
    declared = _TOKEN_MASK.get()
    if declared is None:
        return None
    mask, strict = declared
    if len(lead) == 2 and tuple(mask.shape) == tuple(lead):
        return mask
    if not strict:
        return None
    raise ValueError(
        f"the declared token mask has shape {tuple(mask.shape)} but the routed input's "
        f"leading shape is {tuple(lead)}; expected a (b, t) input under a (b, t) mask"
    )


def active_tokens(lead: torch.Size, device: torch.device) -> Tensor | None:
    """``(n,)`` bool on ``device``, the real tokens of an input of leading shape ``lead = (b,
    t)`` under the declared :func:`token_mask` (the tokens a per-token router's auxiliary
    losses count); ``None`` without a mask (or a non-strict one that does not fit: every
    token counts).

    Raises:
        ValueError: a strict mask whose shape is not ``lead``.
    """
    mask = _fitting_mask(lead)
    return None if mask is None else (mask != 0).reshape(-1).to(device)


def expand_rows(x: Tensor, t: int) -> Tensor:
    """``(b, ...)`` -> ``(b·t, ...)``: each sample's row repeated for its ``t`` tokens (one
    broadcast copy; ``repeat_interleave`` would build an index and gather)."""
    if t == 1:
        return x
    return x.unsqueeze(1).expand(x.shape[0], t, *x.shape[1:]).reshape(-1, *x.shape[1:])


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


class SampleSaved(NamedTuple):
    """What :class:`SampleGating`'s backward reads."""

    dtype: torch.dtype  # the logits' dtype
    inner: Any  # the inner gating's record


class SampleGating(Gating):
    """Per-sample routing on per-token logits: pool ``logits (n, l)`` to ``(b, l)`` with
    ``weights (b, t)`` (in the routing dtype), route the samples with ``inner`` (built for
    ``b`` rows), and give every token its sample's routing.  Backward: the tokens' gradients
    summed per sample, through ``inner``, then spread back over the tokens by their
    weights."""

    def __init__(self, inner: Gating, weights: Tensor) -> None:
        self.inner = inner
        self.weights = weights  # (b, t)
        self.aux_names = inner.aux_names

    def inputs(self) -> tuple[Tensor, ...]:
        return self.inner.inputs()

    def route(self, logits: Tensor) -> tuple[Routed, SampleSaved]:
        b, t = self.weights.shape
        if logits.shape[0] != b * t:
            raise ValueError(
                f"per-sample routing of {b} samples of {t} tokens got logits for "
                f"{logits.shape[0]} tokens"
            )
        w = self.weights  # in the routing dtype (at least float32)
        pooled = torch.einsum("bt,btl->bl", w, logits.view(b, t, -1).to(w.dtype))  # (b, l)
        routed, saved = self.inner.route(pooled)  # (b, e) each
        indices = None if routed.indices is None else expand_rows(routed.indices, t)
        expanded = Routed(
            expand_rows(routed.gates, t),
            expand_rows(routed.probs, t),
            expand_rows(routed.chosen, t),
            indices,
            routed.aux,
        )
        return expanded, SampleSaved(logits.dtype, saved)

    def routes_gradient(self, saved: SampleSaved) -> bool:
        return self.inner.routes_gradient(saved.inner)

    def route_backward(
        self, saved: SampleSaved, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        b, t = self.weights.shape

        def per_sample(g: Tensor | None) -> Tensor | None:
            return None if g is None else g.view(b, t, -1).sum(1)  # (b, e)

        inner = RouteGrads(per_sample(grads.gates), per_sample(grads.probs), grads.aux)
        grad, input_grads = self.inner.route_backward(saved.inner, inner)
        w = self.weights.to(grad.dtype)
        spread = (w[:, :, None] * grad[:, None, :]).reshape(b * t, -1)  # (n, l)
        return spread.to(saved.dtype), input_grads
