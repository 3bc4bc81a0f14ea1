"""Auxiliary routing losses (unweighted; routers attach the weights from their config).

Shape legend: ``n`` tokens, ``e`` experts.  ``active (n,)`` optionally restricts a loss to the
tokens a router actually serves (a hierarchical router's inner router only counts the tokens
sent to its group); ``None`` means every token.

Batches of routings: the losses also take ``(n, b, e)`` inputs (``active (n, b)``), ``b``
routings of the same tokens over ``e`` experts each (a hierarchical router's groups, routed
at once), and return ``(b,)`` losses (``f (b, e)``, ``lse (n, b)``): each the loss of that
routing alone.

Each loss has one definition here, used by every routing path: the routers' autograd forward,
the closed-form forward of the fused node (which also needs the terms, ``f`` and ``lse``, for
its hand-written backward: :func:`balance_terms`, :func:`z_terms`), the reference of the Triton
kernel that computes them fused, and the data-parallel balance loss (:func:`switch_balance`
on the global assignment fractions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moracl.experts.routing import mask_logits

__all__ = [
    "assignment_fractions",
    "balance_terms",
    "load_balance_loss",
    "router_z_loss",
    "routing_entropy",
    "switch_balance",
    "z_terms",
    "z_weights",
]


def _token_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of ``values (n,)`` over the tokens ``weights (n,)`` counts (``None``: all).

    The plain mean needs no weights: reducing a broadcast scalar weight trips a Triton
    compiler bug under ``torch.compile`` on CUDA ("operand does not dominate this use").
    """
    if weights is None:
        return values.sum(0) / max(values.shape[0], 1)
    return (values * weights).sum(0) / weights.sum(0).clamp_min(1.0)


def assignment_fractions(
    chosen: Tensor, dtype: torch.dtype, active: Tensor | None = None
) -> Tensor:
    """``f (e,)``: the fraction of assignments (token, expert) that go to each expert, over the
    counted tokens of ``chosen (n, e)`` bool; sums to 1 (0 with no assignment)."""
    assigned = chosen.to(dtype)  # (n, e)
    if active is not None:
        assigned = assigned * active.to(dtype)[..., None]
    count = assigned.sum(0)  # (e,)
    return count / count.sum(-1, keepdim=True).clamp_min(1.0)


def switch_balance(f: Tensor, p: Tensor) -> Tensor:
    """The Switch balance loss ``E · Σ_e f_e · P_e`` from the assignment fractions ``f (e,)``
    (no gradient) and the mean router probabilities ``p (e,)``."""
    return f.shape[-1] * (f.detach() * p).sum(-1)


def balance_terms(
    probs: Tensor, chosen: Tensor, active: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(loss, f)``: :func:`load_balance_loss` and the assignment fractions ``f (e,)`` it
    uses (the closed-form backward reads ``f``)."""
    n = probs.shape[0]
    f = assignment_fractions(chosen, probs.dtype, active)  # (e,)
    if active is None:
        p = probs.sum(0) / max(n, 1)  # (e,)
    else:
        w = active.to(probs.dtype)[..., None]  # (n, 1)
        p = (probs * w).sum(0) / w.sum(0).clamp_min(1.0)  # (e,)
    return switch_balance(f, p), f


def load_balance_loss(probs: Tensor, chosen: Tensor, active: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021, eq. 4).

    ``f_e`` is the fraction of *assignments* that go to expert ``e``: with top-1 dispatch it is
    Switch's fraction of tokens; with top-k it is the tokens sent to ``e`` divided by ``n · k``
    (so ``f`` sums to 1 for any ``k``), and with a variable number per token (dynamic routing)
    the tokens sent to ``e`` over all assignments.  ``P_e`` is the mean router probability of
    ``e``.  ``f`` carries no gradient; the loss is 1 when both are uniform over all ``E``
    experts.

    Args:
        probs: ``(n, e)`` router probabilities (each counted row sums to 1).
        chosen: ``(n, e)`` bool, the experts each token is dispatched to.
        active: ``(n,)`` bool tokens to count, or ``None`` for all.
    """
    return balance_terms(probs, chosen, active)[0]


def z_terms(
    logits: Tensor, allowed: Tensor | None = None, active: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss, lse, counted)``: :func:`router_z_loss`, each token's masked log-sum-exp ``lse
    (n,)`` (0 for a token with no allowed expert) and which tokens the mean counts, ``(n,)``
    0/1, or ``None`` for every token (the closed-form backward reads both; see
    :func:`z_weights`)."""
    w = None if active is None else active.to(logits.dtype)  # (n,)
    if allowed is None:
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
    else:
        has_expert = allowed.any(-1)  # (n|1,)
        lse = torch.logsumexp(mask_logits(logits, allowed), dim=-1)  # (n,)
        lse = torch.where(has_expert, lse, torch.zeros_like(lse))  # before squaring: no inf
        if has_expert.shape[0] != 1:  # per-token masks: leave out the tokens with none
            has = has_expert.to(logits.dtype)
            w = has if w is None else w * has
        # one mask for all tokens: either every token counts or every lse is 0
    return _token_mean(lse.square(), w), lse, w


def z_weights(lse: Tensor, counted: Tensor | None) -> Tensor:
    """Each token's weight in the z loss's mean, from :func:`z_terms`' ``counted``: ``(n,)``,
    or ``(1,)`` when every one of the ``n`` tokens weighs ``1 / n``."""
    if counted is None:
        return lse.new_full((1,), 1.0 / max(lse.shape[0], 1))
    return counted / counted.sum(0).clamp_min(1.0)


def router_z_loss(
    logits: Tensor, allowed: Tensor | None = None, active: Tensor | None = None
) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022): mean over tokens of ``logsumexp(logits)²``.

    Args:
        logits: ``(n, e)`` router logits (noise-free).
        allowed: ``(n|1, e)`` bool, the experts each token may use; the log-sum-exp runs over
            those only, and a token with none is left out.  ``None``: every expert.
        active: ``(n,)`` bool tokens to count, or ``None`` for all.
    """
    return z_terms(logits, allowed, active)[0]


def routing_entropy(probs: Tensor, active: Tensor | None = None) -> Tensor:
    """Mean over tokens of the entropy (nats) of ``probs (n, e)``; ``0 · log 0 = 0``."""
    h = -torch.special.xlogy(probs, probs).sum(-1)  # (n,)
    return _token_mean(h, None if active is None else active.to(probs.dtype))
