"""Routing as a forward and a hand-written backward, for a layer node that computes the
router's logits in its own matmul (see :func:`moracl.adapters.fused.routed_lora_linear`).

Shape legend: ``n`` tokens, ``e`` experts, ``l`` logit columns, ``k`` chosen per token.

A :class:`RouteOp` is built per forward by :meth:`Router.route_op` and lives in one autograd
node: :meth:`RouteOp.forward` routes detached logits, :meth:`RouteOp.backward` turns the
gradients of the routing's outputs (gates, probabilities, auxiliary losses) into the gradient
of the logits.  Folding the router into the experts' node this way costs no pass over the
activations of its own: the logits are extra columns of the experts' down projection and
their gradient extra columns of its backward.

- :class:`AutogradRouteOp` serves every router: it records the router's own ``route`` under
  autograd on a detached copy of the logits and replays that graph in ``backward``.
- :class:`TopKRouteOp` is the common case written out: top-k routing, its balance and z
  losses, and their backward in closed form, as two pure functions of tensors (tested
  against autograd in float64).  On CUDA the gated forward and backward run as Triton
  kernels (:mod:`moracl.experts.triton_route`: two launches forward, one backward, tested
  against these functions); where those do not apply (no Triton, ``k > 4``,
  ``MORACL_TRITON_ROUTING=0``), ``torch.compile`` fuses the functions into a few kernels.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moracl.experts.routing import (
    RoutingResult,
    gather_k,
    routing_dtype,
    scatter_k,
    select_topk,
)

if TYPE_CHECKING:
    from moracl.experts.routers.base import Router

__all__ = [
    "AutogradRouteOp",
    "RouteOp",
    "TaskRouteOp",
    "TopKRouteOp",
    "topk_route_backward",
    "topk_route_forward",
]


class RouteOp(ABC):
    """One forward's routing, split into a forward on detached logits and its backward."""

    #: names of the auxiliary losses :meth:`forward` returns, in order
    aux_names: tuple[str, ...]
    _gated: tuple[Tensor, ...] = ()

    @abstractmethod
    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Route ``logits (n, l)`` (no autograd): ``gates (n, e)``, ``probs (n, e)`` and the
        unweighted auxiliary losses (scalars, in :attr:`aux_names` order)."""

    @abstractmethod
    def backward(
        self,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> Tensor:
        """``∂L/∂logits (n, l)`` from the gradients of :meth:`forward`'s outputs (``None``:
        the output was not used)."""

    @abstractmethod
    def result(self, gates: Tensor, probs: Tensor, aux: tuple[Tensor, ...]) -> RoutingResult:
        """The :class:`RoutingResult` of this routing, built on the node's outputs."""

    def routes_gradient(self) -> bool:
        """Whether gradients flow back through the routing (``False``, e.g., for fixed
        uniform gates by task: the node then skips the gates' gradient)."""
        return True

    def inputs(self) -> tuple[Tensor, ...]:
        """Tensors besides the logits that the routing reads and that may need gradients
        (e.g. a task router's learned task logits): the node takes them as inputs, so
        autograd routes :meth:`input_grads` to them."""
        return ()

    def input_grads(self) -> tuple[Tensor | None, ...]:
        """The gradients of :meth:`inputs`, valid after :meth:`backward`."""
        return ()

    def forward_gated(
        self, zl: Tensor, er: int
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        """Route and gate: ``zl (n, e·r + l)`` holds the experts' rank-space activations
        ``za`` then the logits; returns ``zg (n, e·r)`` (each expert's ``r`` columns times
        its gate, in ``zl``'s dtype), ``gates``, ``probs`` and the auxiliary losses."""
        za = zl[:, :er]
        gates, probs, aux = self.forward(zl[:, er:])
        g_c = gates.to(za.dtype)
        self._gated = (za, g_c, gates)
        zg = (za.unflatten(1, (g_c.shape[1], -1)) * g_c[:, :, None]).flatten(1)
        return zg, gates, probs, aux

    def backward_gated(
        self,
        grad_zg: Tensor | None,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> tuple[Tensor, Tensor | None]:
        """The backward of :meth:`forward_gated`: from ``∂L/∂zg (n, e·r)`` (``None``: unused)
        and the routing outputs' gradients, ``∂L/∂zl (n, e·r + l)`` and ``zg`` recomputed
        (``None`` when ``grad_zg`` is)."""
        za, g_c, gates = self._gated
        e = g_c.shape[1]
        zg = None
        if grad_zg is None:
            grad_za = torch.zeros_like(za)
        else:
            gz3, za3 = grad_zg.unflatten(1, (e, -1)), za.unflatten(1, (e, -1))  # (n, e, r)
            grad_za = (gz3 * g_c[:, :, None]).flatten(1)
            if self.routes_gradient():
                from_experts = (gz3 * za3).sum(-1).to(gates.dtype)  # (n, e)
                grad_gates = from_experts if grad_gates is None else grad_gates + from_experts
            zg = (za3 * g_c[:, :, None]).flatten(1)
        grad_logits = self.backward(grad_gates, grad_probs, grad_aux)
        self._gated = ()
        if grad_logits.shape[1] == 0:  # no logit columns (routing by task)
            return grad_za, zg
        return torch.cat([grad_za, grad_logits.to(za.dtype)], dim=1), zg


class AutogradRouteOp(RouteOp):
    """Any router: its ``route`` recorded under autograd on a detached leaf of the logits
    (as reentrant checkpointing does), the graph replayed once in :meth:`backward`.  The
    router's trainable parameters are :meth:`inputs`, so the gradients of those that
    ``route`` reads (a task router's task logits) reach them through the node."""

    def __init__(self, router: Router, task_ids: Tensor | None) -> None:
        self.router = router
        self.task_ids = task_ids
        self.record = torch.is_grad_enabled()  # at the node's call (its forward runs without)
        self._params = tuple(p for p in router.parameters() if p.requires_grad)
        self._param_grads: tuple[Tensor | None, ...] = ()
        self._leaf: Tensor | None = None
        self._routed: RoutingResult | None = None

    def routes_gradient(self) -> bool:
        routed = self._routed
        assert routed is not None, "routes_gradient before forward"
        outs = (routed.gates, routed.probs, *routed.aux_losses.values())
        return any(t.requires_grad for t in outs)

    def inputs(self) -> tuple[Tensor, ...]:
        return self._params

    def input_grads(self) -> tuple[Tensor | None, ...]:
        return self._param_grads

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        leaf = logits.detach().requires_grad_(self.record)
        with torch.set_grad_enabled(self.record):
            routed = self.router.route_logits(leaf, task_ids=self.task_ids)
        self.task_ids = None  # the per-token ids live no longer than the forward needs them
        self._leaf, self._routed = leaf, routed
        self.aux_names = tuple(routed.aux_losses)
        aux = tuple(routed.aux_losses[name].detach() for name in self.aux_names)
        return routed.gates.detach(), routed.probs.detach(), aux

    def backward(
        self,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> Tensor:
        assert self._leaf is not None and self._routed is not None, "backward before forward"
        leaf, routed = self._leaf, self._routed
        pairs = [(routed.gates, grad_gates), (routed.probs, grad_probs)]
        pairs += [(routed.aux_losses[n], g) for n, g in zip(self.aux_names, grad_aux)]
        used = [(out, g) for out, g in pairs if g is not None and out.requires_grad]
        grads: tuple[Tensor | None, ...] = (None,) * (1 + len(self._params))
        if used:
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    [o for o, _ in used],
                    [leaf, *self._params],
                    [g for _, g in used],
                    allow_unused=True,
                )
        self._param_grads = grads[1:]
        self._leaf = self._routed = None  # the graph is freed with them
        return grads[0] if grads[0] is not None else torch.zeros_like(leaf)

    def result(self, gates: Tensor, probs: Tensor, aux: tuple[Tensor, ...]) -> RoutingResult:
        assert self._routed is not None
        routed = self._routed
        return RoutingResult(
            gates=gates,
            probs=probs,
            chosen=routed.chosen,
            indices=routed.indices,
            aux_losses=dict(zip(self.aux_names, aux)),
            aux_weights=routed.aux_weights,
        )


class TaskRouteOp(AutogradRouteOp):
    """Routing by task id with fixed gates (no task weights that train now): on CUDA one
    Triton kernel gathers each row's task mask and weights, takes their softmax and gates the
    rank-space activations, and one kernel is the backward
    (:func:`~moracl.experts.triton_route.task_gate_forward`); elsewhere, or with trainable task
    weights, :class:`AutogradRouteOp` serves."""

    def __init__(self, router: Router, task_ids: Tensor | None) -> None:
        super().__init__(router, task_ids)
        self._kernel_out: tuple[Tensor, Tensor, Tensor] | None = None  # za, gates, chosen

    def eligible(self) -> bool:
        """Whether the kernels may serve: task ids given (else the router's own errors) and
        no task weights that train now (their gradient needs autograd)."""
        return self.task_ids is not None and not (self.record and self._params)

    def _kernels(self, zl: Tensor, er: int) -> Any:
        kernels = _triton_module(zl) if self.eligible() else None
        if kernels is None or not kernels.supports_task(zl, er, self.router.num_experts):
            return None
        return kernels

    def routes_gradient(self) -> bool:
        return False if self._kernel_out is not None else super().routes_gradient()

    def forward_gated(
        self, zl: Tensor, er: int
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        kernels = self._kernels(zl, er)
        if kernels is None:
            return super().forward_gated(zl, er)
        from moracl.experts.routers.base import check_task_ids

        router: Any = self.router
        assert self.task_ids is not None
        check_task_ids(self.task_ids, router.num_tasks)
        zg, gates, chosen = kernels.task_gate_forward(
            zl, er, self.task_ids, router.expert_masks, router.task_logits
        )
        self.task_ids = None
        self.aux_names = ()
        self._kernel_out = (zl, gates, chosen)
        return zg, gates, gates.detach(), ()

    def backward_gated(
        self,
        grad_zg: Tensor | None,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> tuple[Tensor, Tensor | None]:
        if self._kernel_out is None:
            return super().backward_gated(grad_zg, grad_gates, grad_probs, grad_aux)
        za, gates, _ = self._kernel_out
        self._kernel_out = None
        if grad_zg is None:
            return torch.zeros_like(za), None
        from moracl.experts import triton_route

        grad_za, zg = triton_route.gate_apply_backward(grad_zg, za, gates)
        return grad_za, zg

    def result(self, gates: Tensor, probs: Tensor, aux: tuple[Tensor, ...]) -> RoutingResult:
        if self._kernel_out is None and self._routed is not None:
            return super().result(gates, probs, aux)
        assert self._kernel_out is not None, "result before forward"
        chosen = self._kernel_out[2]
        return RoutingResult(
            gates=gates, probs=probs, chosen=chosen, indices=None, aux_losses={}, aux_weights={}
        )


def topk_route_forward(
    logits: Tensor, allowed: Tensor, noise: Tensor | None, k: int, normalize: bool = True
) -> tuple[Tensor, ...]:
    """Top-k routing of ``logits (n, e|2e)`` under ``allowed (n|1, e)`` with ``noise (n, e)``
    (or ``None``), with the same values as :func:`~moracl.experts.routers.topk.topk_route`
    (``active=None``; ``normalize`` as there), plus what :func:`topk_route_backward` reads.

    Returns:
        ``gates, probs (n, e)``, ``chosen (n, e)`` bool, ``indices (n, k)``, ``top (n, k)``
        the chosen experts' gates (zero where not allowed), ``f (e,)`` the assignment fractions,
        ``lse (n,)`` the masked log-sum-exp of the clean logits (0 for a token with no
        expert), ``zw (n|1,)`` each token's weight in the z loss, and the ``balance`` and
        ``z`` losses.
    """
    e = allowed.shape[-1]
    lg = logits.to(routing_dtype(logits.dtype))
    clean = lg[:, :e]  # (n, e)
    scores = clean if noise is None else clean + noise * F.softplus(lg[:, e:])
    lowest = torch.finfo(scores.dtype).min
    filled = scores.masked_fill(~allowed, lowest)  # (n, e)
    probs = filled.softmax(-1) * allowed  # (n, e)
    top, indices = select_topk(filled, k)  # (n, k)
    picked = gather_k(allowed, indices)  # (n, k) bool
    sm = (top.softmax(-1) if normalize else gather_k(probs, indices)) * picked  # (n, k)
    gates = scatter_k(indices, sm, e)  # (n, e)
    chosen = scatter_k(indices, picked, e)  # (n, e) bool
    n = probs.shape[0]
    has = allowed.any(-1)  # (n|1,)
    lse = torch.logsumexp(clean.masked_fill(~allowed, lowest), dim=-1)  # (n,)
    lse = torch.where(has, lse, torch.zeros_like(lse))
    shared = has.shape[0] == 1  # one mask for every token: all count in the z loss
    w = has.to(lse.dtype).expand_as(lse)  # (n,)
    # every sum over the tokens in one reduction: counts, probabilities, z-loss terms
    columns = [chosen.to(probs.dtype), probs, (lse.square() * w)[:, None], w[:, None]]
    sums = torch.cat(columns, dim=1).sum(0)  # (2e + 2,)
    count, total_w = sums[:e], sums[2 * e + 1]
    f = count / count.sum().clamp_min(1.0)  # (e,)
    balance = e * (f * sums[e : 2 * e]).sum() / max(n, 1)
    if shared:
        zw = lse.new_full((1,), 1.0 / max(n, 1))
        z = sums[2 * e] / max(n, 1)
    else:
        zw = w / total_w.clamp_min(1.0)
        z = sums[2 * e] / total_w.clamp_min(1.0)
    return gates, probs, chosen, indices, sm, f, lse, zw, balance, z


def topk_route_backward(
    logits: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    probs: Tensor,
    indices: Tensor,
    sm: Tensor,
    f: Tensor,
    lse: Tensor,
    zw: Tensor,
    grad_gates: Tensor | None,
    grad_probs: Tensor | None,
    grad_balance: Tensor | None,
    grad_z: Tensor | None,
    normalize: bool = True,
) -> Tensor:
    """``∂L/∂logits (n, e|2e)`` of :func:`topk_route_forward`, in closed form.

    With ``q`` the softmax of the masked scores and ``σ`` the softmax over the chosen ones:
    the probabilities pass ``q ⊙ (G − Σ q G)`` with ``G = ∂L/∂probs + ∂L/∂balance · e·f/n``
    (``f`` carries no gradient); the gates pass ``σ ⊙ (g − Σ σ g)`` back to the chosen
    columns (``normalize=False``: the gates' gradient joins ``G`` at the chosen columns, the
    gates being probabilities there); the z loss adds ``∂L/∂z · 2·lse·w · softmax(masked
    clean)``; masked columns get nothing; the noise scale gets ``∂/∂scores · ε ·
    sigmoid(scale)``.
    """
    e = allowed.shape[-1]
    lg = logits.to(probs.dtype)
    clean = lg[:, :e]
    n = probs.shape[0]
    gp = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(probs.dtype)
    if grad_balance is not None:
        gp = gp + grad_balance * (e / max(n, 1)) * f  # (n, e)
    gp = gp * allowed
    if grad_gates is not None and not normalize:  # the chosen gates are probabilities
        picked = gather_k(allowed, indices)  # (n, k) bool
        gs = gather_k(grad_gates.to(sm.dtype), indices) * picked  # (n, k)
        gp = gp + scatter_k(indices, gs, e)
    grad = probs * (gp - (probs * gp).sum(-1, keepdim=True))  # (n, e) via the probabilities
    if grad_gates is not None and normalize:
        gs = gather_k(grad_gates.to(sm.dtype), indices)  # (n, k); sm is 0 where not allowed
        grad = grad + scatter_k(indices, sm * (gs - (sm * gs).sum(-1, keepdim=True)), e)
    grad = grad * allowed  # (n, e) ∂L/∂scores; the masked scores are constants
    grad_clean = grad
    if grad_z is not None:
        soft = torch.where(allowed, (clean - lse[:, None]).exp(), torch.zeros_like(clean))
        grad_clean = grad + grad_z * 2.0 * (lse * zw)[:, None] * soft
    if noise is None:
        return grad_clean.to(logits.dtype)
    grad_scale = grad * noise * torch.sigmoid(lg[:, e:])  # through the scores only, not z
    return torch.cat([grad_clean, grad_scale], dim=-1).to(logits.dtype)


def topk_gate_forward(
    zl: Tensor, er: int, allowed: Tensor, noise: Tensor | None, k: int, normalize: bool = True
) -> tuple[Tensor, ...]:
    """:func:`topk_route_forward` on the logit columns of ``zl (n, e·r + l)``, and the gated
    activations ``zg (n, e·r)`` first: one function, so the compiler fuses the gating in."""
    za = zl[:, :er]
    routed = topk_route_forward(zl[:, er:], allowed, noise, k, normalize)
    gates = routed[0]
    zg = (za.unflatten(1, (gates.shape[1], -1)) * gates.to(za.dtype)[:, :, None]).flatten(1)
    return (zg, *routed)


def topk_gate_backward(
    grad_zg: Tensor,
    zl: Tensor,
    er: int,
    gates: Tensor,
    allowed: Tensor,
    noise: Tensor | None,
    probs: Tensor,
    indices: Tensor,
    sm: Tensor,
    f: Tensor,
    lse: Tensor,
    zw: Tensor,
    grad_gates: Tensor | None,
    grad_probs: Tensor | None,
    grad_balance: Tensor | None,
    grad_z: Tensor | None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """The backward of :func:`topk_gate_forward`: ``∂L/∂zl (n, e·r + l)`` and ``zg``."""
    e = gates.shape[1]
    za = zl[:, :er]
    g_c = gates.to(za.dtype)[:, :, None]  # (n, e, 1)
    gz3, za3 = grad_zg.unflatten(1, (e, -1)), za.unflatten(1, (e, -1))  # (n, e, r)
    from_experts = (gz3 * za3).sum(-1).to(gates.dtype)  # (n, e)
    gg = from_experts if grad_gates is None else grad_gates + from_experts
    grad_logits = topk_route_backward(
        zl[:, er:], allowed, noise, probs, indices, sm, f, lse, zw,
        gg, grad_probs, grad_balance, grad_z, normalize,
    )  # fmt: skip
    grad_za = (gz3 * g_c).flatten(1)
    return torch.cat([grad_za, grad_logits], dim=1), (za3 * g_c).flatten(1)


_COMPILED: dict[str, Callable[..., Any]] = {}


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "fwd": topk_route_forward,
    "bwd": topk_route_backward,
    "gate_fwd": topk_gate_forward,
    "gate_bwd": topk_gate_backward,
}


def _triton_module(zl: Tensor) -> Any:
    """:mod:`moracl.experts.triton_route` for a CUDA ``zl`` when Triton is installed and
    ``MORACL_TRITON_ROUTING`` is not ``0``, else ``None``."""
    if not zl.is_cuda or os.environ.get("MORACL_TRITON_ROUTING", "1") == "0":
        return None
    try:
        from moracl.experts import triton_route
    except ImportError:  # no Triton: the compiled functions (or autograd) serve
        return None
    return triton_route


def _triton_gating(zl: Tensor, er: int, e: int, k: int) -> Any:
    """The Triton kernels' module when they take this top-k routing, else ``None``."""
    kernels = _triton_module(zl)
    return kernels if kernels is not None and kernels.supports(zl, er, e, k) else None


def _kernel(name: str, device: torch.device) -> Callable[..., Any]:
    """The function ``name`` of :data:`_FUNCTIONS` for ``device``: compiled with
    ``torch.compile`` on CUDA (a few fused kernels instead of dozens of small ones per layer;
    ``MORACL_COMPILE_ROUTING=0`` runs them eagerly), eager elsewhere."""
    if device.type != "cuda" or os.environ.get("MORACL_COMPILE_ROUTING", "1") == "0":
        return _FUNCTIONS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_FUNCTIONS[name], fullgraph=True)
    return _COMPILED[name]


class TopKRouteOp(RouteOp):
    """Noisy top-k routing with its ``balance`` and ``z`` losses, backward in closed form.

    Args:
        router: the :class:`~moracl.experts.routers.topk.TopKRouter` (for its noise draws
            and loss weights).
        allowed: ``(n|1, e)`` bool, the experts each token may use.
    """

    aux_names = ("balance", "z")

    def __init__(self, router: Any, allowed: Tensor) -> None:
        self.router = router
        self.allowed = allowed
        self._saved: tuple[Tensor, ...] = ()
        self._noise: Tensor | None = None
        self._logits: Tensor | None = None
        self._chosen: Tensor | None = None
        self._indices: Tensor | None = None
        self._zl: Tensor | None = None
        self._er = 0
        self._gates: Tensor | None = None
        self._triton: Any = None  # the Triton forward's outputs, when it ran

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        noise = self.router.noise(logits)  # (n, e) or None
        fwd = _kernel("fwd", logits.device)
        cfg = self.router.config
        gates, probs, chosen, indices, sm, f, lse, zw, balance, z = fwd(
            logits, self.allowed, noise, cfg.k, cfg.normalize
        )
        self._logits, self._noise = logits, noise
        self._saved = (probs, indices, sm, f, lse, zw)
        self._chosen, self._indices = chosen, indices
        return gates, probs, (balance, z)

    def backward(
        self,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> Tensor:
        assert self._logits is not None, "backward before forward"
        bwd = _kernel("bwd", self._logits.device)
        grad_balance, grad_z = grad_aux
        grad: Tensor = bwd(
            self._logits, self.allowed, self._noise, *self._saved,
            grad_gates, grad_probs, grad_balance, grad_z, self.router.config.normalize,
        )  # fmt: skip
        self._saved, self._logits, self._noise = (), None, None
        return grad

    def forward_gated(
        self, zl: Tensor, er: int
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        logits = zl[:, er:]
        noise = self.router.noise(logits)  # (n, e) or None
        cfg = self.router.config
        kernels = _triton_gating(zl, er, self.allowed.shape[-1], cfg.k)
        if kernels is not None:
            out = kernels.gate_forward(zl, er, self.allowed, noise, cfg.k, cfg.normalize)
            self._zl, self._er, self._noise, self._triton = zl, er, noise, out
            self._chosen, self._indices = out.chosen, out.indices
            return out.zg, out.gates, out.probs, (out.balance, out.z)
        fwd = _kernel("gate_fwd", zl.device)
        zg, gates, probs, chosen, indices, sm, f, lse, zw, balance, z = fwd(
            zl, er, self.allowed, noise, cfg.k, cfg.normalize
        )
        self._zl, self._er, self._noise, self._gates = zl, er, noise, gates
        self._saved = (probs, indices, sm, f, lse, zw)
        self._chosen, self._indices = chosen, indices
        return zg, gates, probs, (balance, z)

    def backward_gated(
        self,
        grad_zg: Tensor | None,
        grad_gates: Tensor | None,
        grad_probs: Tensor | None,
        grad_aux: tuple[Tensor | None, ...],
    ) -> tuple[Tensor, Tensor | None]:
        assert self._zl is not None, "backward before forward"
        zl = self._zl
        if grad_zg is None:
            grad_zg = torch.zeros_like(zl[:, : self._er])
        if self._triton is not None:
            from moracl.experts import triton_route

            grad_balance, grad_z = grad_aux
            grad_zl, zg = triton_route.gate_backward(
                grad_zg, zl, self._er, self.allowed, self._noise, self._triton,
                grad_gates, grad_probs, grad_balance, grad_z, self.router.config.normalize,
            )  # fmt: skip
            self._triton, self._zl, self._noise = None, None, None
            return grad_zl, zg
        bwd = _kernel("gate_bwd", zl.device)
        grad_zl, zg = bwd(
            grad_zg, zl, self._er, self._gates, self.allowed, self._noise, *self._saved,
            grad_gates, grad_probs, *grad_aux, self.router.config.normalize,
        )  # fmt: skip
        self._saved, self._zl, self._noise = (), None, None
        return grad_zl, zg

    def result(self, gates: Tensor, probs: Tensor, aux: tuple[Tensor, ...]) -> RoutingResult:
        assert self._chosen is not None
        return self.router._result(
            gates, probs, self._chosen, self._indices, dict(zip(self.aux_names, aux))
        )
