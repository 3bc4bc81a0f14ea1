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

Generation.  A sample's routing pools all its tokens, so no token's routing is causal: a
cached decoding step sees its new token only.  Inside :func:`first_call_routing` (what
``MoRAModel.generate`` declares for a decoder-only model) each routing per sample routes
every later call's samples as it routed them in its first call, the prompt's: the
continuation keeps the prompt's experts, with a cache or without one (then both give the
same tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from moracl.experts.backend import RoutingBackend, for_backend
from moracl.experts.gating import Gating, Routed, RouteGrads
from moracl.experts.routing import RoutingResult

__all__ = [
    "KeepingGating",
    "KeptGating",
    "SampleGatedSaved",
    "SampleGating",
    "SampleRouting",
    "active_tokens",
    "begin_forward",
    "current_token_mask",
    "declared_token_mask",
    "expand_result",
    "first_call_routing",
    "keep_routing",
    "keeping_routing",
    "kept_routing",
    "pool_weights",
    "pooled_logits",
    "sample_gate",
    "sample_gate_grads",
    "spread_logit_grads",
    "token_mask",
]

_TOKEN_MASK: ContextVar[tuple[Tensor, bool] | None] = ContextVar("moracl_token_mask", default=None)


@contextmanager
def token_mask(mask: Tensor, *, strict: bool = True) -> Iterator[None]:
    """Declare ``mask (b, t)`` (nonzero on real tokens, zero on padding) for the layers run
    inside the block: per-sample routers average over the real tokens of each row, and
    per-token routers' auxiliary losses count the real tokens only.  A mask ``(n,)`` covers
    inputs of ``n`` rows ``(n, d)`` (what adaptive computation's ``token`` loop declares for
    the rows it runs, its padding rows masked).

    ``strict=False`` applies the mask only to inputs of leading shape ``(b, t)`` and lets
    others route unmasked (what the model wrapper declares from an ``attention_mask``,
    which also covers a decoding step's single token or a pooled head); by default an input
    of another shape is an error."""
    if not isinstance(mask, Tensor) or mask.ndim not in (1, 2):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"a token mask must be a tensor of shape (b, t) or (n,), got {got}")
    if not isinstance(strict, bool):
        raise ValueError(f"token_mask's strict must be True or False, got {strict!r}")
    handle = _TOKEN_MASK.set((mask, strict))
    try:
        yield
    finally:
        _TOKEN_MASK.reset(handle)


class SampleRouting(NamedTuple):
    """A routing of ``b`` samples kept by :func:`first_call_routing`: the ``(b, ·)`` outputs
    and the names of its auxiliary losses, in ``routed.aux``' order."""

    routed: Routed
    names: tuple[str, ...]

    @classmethod
    def of(cls, routed: Routed, names: tuple[str, ...]) -> SampleRouting:
        """``routed`` detached from any graph, with its losses' ``names``."""
        gates, probs, chosen, indices, aux = routed
        kept = Routed(
            gates.detach(), probs.detach(), chosen, indices, tuple(a.detach() for a in aux)
        )
        return cls(kept, names)


@dataclass
class _KeptRoutes:
    """The routings kept by a :func:`first_call_routing` block: each mixture's from the
    block's first forward, unless it was called more than once in that forward (a block
    repeated in one forward, as adaptive computation repeats it: its calls differ)."""

    kept: dict[int, SampleRouting] = field(default_factory=dict)
    forwards: int = 0  # forwards begun in the block (0: none declared yet)
    repeated: set[int] = field(default_factory=set)

    @property
    def keeping(self) -> bool:
        """Whether this is the first forward (its routings are kept)."""
        return self.forwards <= 1


_FIRST_ROUTES: ContextVar[_KeptRoutes | None] = ContextVar("moracl_first_routes", default=None)


@contextmanager
def first_call_routing() -> Iterator[None]:
    """While the block runs, every mixture that routes per sample routes each forward's
    samples as it routed them in the block's first forward (see the module docstring): the
    routing a prompt's forward makes is kept for the decoding steps that continue it.
    :func:`begin_forward` marks where each forward begins (``MoRAModel`` and its
    ``generate`` do); without it the block is one forward.  A mixture called more than once
    in the first forward (a repeated block) routes every call by its own tokens.  A later
    call with another number of samples is an error; gradients do not flow through a kept
    routing (generation runs without them)."""
    handle = _FIRST_ROUTES.set(_KeptRoutes())
    try:
        yield
    finally:
        _FIRST_ROUTES.reset(handle)


def begin_forward() -> None:
    """Mark the start of a model's forward in the open :func:`first_call_routing` block
    (nothing without one)."""
    memo = _FIRST_ROUTES.get()
    if memo is not None:
        memo.forwards += 1


def kept_routing(key: object, samples: int) -> SampleRouting | None:
    """The routing ``key`` (a mixture) kept in the current :func:`first_call_routing` block,
    or ``None`` (no block, its first forward, or a mixture it keeps none for).

    Raises:
        ValueError: the kept routing is of another number of samples than ``samples``.
    """
    memo = _FIRST_ROUTES.get()
    if memo is None or memo.keeping:
        return None
    kept = memo.kept.get(id(key))
    if kept is not None and kept.routed.gates.shape[0] != samples:
        raise ValueError(
            f"a routing per sample kept from this generation's first call covers "
            f"{kept.routed.gates.shape[0]} samples, but a later call has {samples}; expected "
            f"every call of one generate() to carry the same rows"
        )
    return kept


def keeping_routing() -> bool:
    """Whether a :func:`first_call_routing` block is open and in its first forward."""
    memo = _FIRST_ROUTES.get()
    return memo is not None and memo.keeping


def keep_routing(key: object, routing: SampleRouting) -> None:
    """Keep ``routing`` for ``key`` in the open :func:`first_call_routing` block, in its
    first forward (a second call of ``key`` there keeps nothing for it)."""
    memo = _FIRST_ROUTES.get()
    if memo is None or not memo.keeping or id(key) in memo.repeated:
        return
    if id(key) in memo.kept:
        del memo.kept[id(key)]
        memo.repeated.add(id(key))
        return
    memo.kept[id(key)] = routing


class KeepingGating(Gating):
    """``inner``'s routing of the samples, kept for ``key`` (:func:`keep_routing`)."""

    def __init__(self, inner: Gating, key: object) -> None:
        self.inner = inner
        self.key = key
        self.aux_names = inner.aux_names

    def inputs(self) -> tuple[Tensor, ...]:
        return self.inner.inputs()

    def route(self, logits: Tensor) -> tuple[Routed, Any]:
        routed, saved = self.inner.route(logits)
        keep_routing(self.key, SampleRouting.of(routed, self.aux_names))
        return routed, saved

    def routes_gradient(self, saved: Any) -> bool:
        return self.inner.routes_gradient(saved)

    def route_backward(
        self, saved: Any, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        return self.inner.route_backward(saved, grads)


class KeptGating(Gating):
    """A kept routing of the samples in place of routing their logits (no gradient reaches
    the logits; ``inputs``: those of the gating it stands for, given none)."""

    def __init__(self, kept: SampleRouting, inner: Gating) -> None:
        if kept.names != inner.aux_names:
            raise ValueError(
                f"a kept routing has the losses {list(kept.names)}, the router now "
                f"{list(inner.aux_names)}"
            )
        self.kept = kept
        self.aux_names = inner.aux_names
        self._inputs = inner.inputs()

    def inputs(self) -> tuple[Tensor, ...]:
        return self._inputs

    def route(self, logits: Tensor) -> tuple[Routed, Any]:
        return self.kept.routed, logits

    def routes_gradient(self, saved: Any) -> bool:
        return False

    def route_backward(
        self, saved: Any, grads: RouteGrads
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        return torch.zeros_like(saved), (None,) * len(self._inputs)  # saved: the logits


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
    m = (mask != 0).reshape(b, t).to(device=device, dtype=dtype)  # (b, t)
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
    if len(lead) == mask.ndim and tuple(mask.shape) == tuple(lead):  # (b, t) or (n,)
        return mask
    if not strict:
        return None
    raise ValueError(
        f"the declared token mask has shape {tuple(mask.shape)} but the routed input's "
        f"leading shape is {tuple(lead)}; expected an input whose leading shape is the mask's"
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
    """What :class:`SampleGating`'s routing backward reads."""

    dtype: torch.dtype  # the logits' dtype
    inner: Any  # the inner gating's record


class SampleGatedSaved(NamedTuple):
    """What :class:`SampleGating`'s gated backward reads."""

    za: Tensor  # (n, e·r)
    gates: Tensor  # (b, e) the samples' gates
    route: SampleSaved


def pooled_logits(weights: Tensor, logits: Tensor) -> Tensor:
    """``(b, l)``: each sample's tokens' ``logits (b·t, l)`` averaged by ``weights (b, t)``,
    in ``weights``' dtype."""
    b, t = weights.shape
    return torch.einsum("bt,btl->bl", weights, logits.view(b, t, -1).to(weights.dtype))


def expand_routed(routed: Routed, t: int) -> Routed:
    """A routing of ``b`` samples as the routing of their ``b·t`` tokens (auxiliary losses,
    computed over the samples, unchanged)."""
    indices = None if routed.indices is None else expand_rows(routed.indices, t)
    gates, probs, chosen = (expand_rows(v, t) for v in routed[:3])
    return Routed(gates, probs, chosen, indices, routed.aux)


def sample_gate(za: Tensor, gates: Tensor) -> Tensor:
    """``zg (n, e·r)``: ``za (b·t, e·r)``, each token's expert blocks times its sample's gates
    ``gates (b, e)`` (in ``za``'s dtype), without expanding the gates to the tokens."""
    b, e = gates.shape
    z4 = za.unflatten(0, (b, -1)).unflatten(2, (e, -1))  # (b, t, e, r)
    return (z4 * gates.to(za.dtype)[:, None, :, None]).flatten(2).flatten(0, 1)


def sample_gate_grads(
    za: Tensor, gates: Tensor, grad_zg: Tensor, grad_gates: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`sample_gate`: ``∂L/∂za (n, e·r)``, ``zg`` recomputed and
    ``∂L/∂gates (b, e)`` in ``gates``' dtype (summed over each sample's tokens in at least
    float32, plus ``grad_gates (n, e)``, the gradient of the tokens' gates as an output, if
    any)."""
    b, e = gates.shape
    z4 = za.unflatten(0, (b, -1)).unflatten(2, (e, -1))  # (b, t, e, r)
    gz4 = grad_zg.unflatten(0, (b, -1)).unflatten(2, (e, -1))
    acc = torch.promote_types(za.dtype, torch.float32)
    per_sample = (gz4.to(acc) * z4.to(acc)).sum((1, 3))  # (b, e)
    if grad_gates is not None:
        per_sample = per_sample + grad_gates.view(b, -1, e).to(acc).sum(1)
    g = gates.to(za.dtype)[:, None, :, None]
    grad_za = (gz4 * g).flatten(2).flatten(0, 1)
    return grad_za, (z4 * g).flatten(2).flatten(0, 1), per_sample.to(gates.dtype)


def spread_logit_grads(grad_za: Tensor, weights: Tensor, grad: Tensor) -> Tensor:
    """``∂L/∂zl (n, e·r + l)``: ``grad_za (n, e·r)``, then the samples' logit gradients
    ``grad (b, l)`` spread over their tokens by ``weights (b, t)``, in ``grad_za``'s dtype."""
    b, t = weights.shape
    spread = weights.to(grad.dtype)[:, :, None] * grad[:, None, :]  # (b, t, l)
    return torch.cat([grad_za, spread.reshape(b * t, -1).to(grad_za.dtype)], dim=1)


class SampleGating(Gating):
    """Per-sample routing on per-token logits: pool ``logits (n, l)`` to ``(b, l)`` with
    ``weights (b, t)`` (in the routing dtype), route the samples with ``inner`` (built for
    ``b`` rows), and give every token its sample's routing.  Backward: the tokens' gradients
    summed per sample, through ``inner``, then spread back over the tokens by their
    weights.  Inside a fused node the experts are gated by their sample's gates directly
    (:func:`sample_gate`, :func:`sample_gate_grads`); these run compiled on CUDA under the
    ``compiled`` and ``triton`` backends."""

    def __init__(
        self, inner: Gating, weights: Tensor, backend: RoutingBackend = RoutingBackend.EAGER
    ) -> None:
        self.inner = inner
        self.weights = weights  # (b, t)
        self.aux_names = inner.aux_names
        self.backend = backend

    def inputs(self) -> tuple[Tensor, ...]:
        return self.inner.inputs()

    def _fn(self, fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
        return for_backend(fn, self.backend, device)

    def _route_samples(self, logits: Tensor) -> tuple[Routed, Any]:
        """The inner routing of the pooled ``logits (n, l)``: ``(b, ·)`` outputs."""
        b, t = self.weights.shape
        if logits.shape[0] != b * t:
            raise ValueError(
                f"per-sample routing of {b} samples of {t} tokens got logits for "
                f"{logits.shape[0]} tokens"
            )
        pooled = self._fn(pooled_logits, logits.device)(self.weights, logits)  # (b, l)
        return self.inner.route(pooled)

    def route(self, logits: Tensor) -> tuple[Routed, SampleSaved]:
        routed, saved = self._route_samples(logits)  # (b, e) each
        expanded = self._fn(expand_routed, logits.device)(routed, self.weights.shape[1])
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

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        za = zl[:, :er]
        routed, saved = self._route_samples(zl[:, er:])  # (b, e) each
        expanded = self._fn(expand_routed, zl.device)(routed, self.weights.shape[1])
        zg = self._fn(sample_gate, zl.device)(za, routed.gates)
        return zg, expanded, SampleGatedSaved(za, routed.gates, SampleSaved(zl.dtype, saved))

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        za, gates, route_saved = saved
        b, t = self.weights.shape
        if grad_zg is None:
            grad_zg = torch.zeros_like(za)
        grad_za, zg, grad_gates = self._fn(sample_gate_grads, za.device)(
            za, gates, grad_zg, grads.gates
        )
        grad_probs = None if grads.probs is None else grads.probs.view(b, t, -1).sum(1)
        inner = RouteGrads(grad_gates, grad_probs, grads.aux)
        grad, input_grads = self.inner.route_backward(route_saved.inner, inner)  # (b, l)
        if grad.shape[1] == 0:  # no logit columns
            return grad_za, zg, input_grads
        grad_zl = self._fn(spread_logit_grads, za.device)(grad_za, self.weights, grad)
        return grad_zl, zg, input_grads
