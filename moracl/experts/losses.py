"""Auxiliary routing losses (unweighted; routers attach the weights from their config).

Shape legend: ``n`` tokens, ``e`` experts.  ``active (n,)`` optionally restricts a loss to the
tokens a router actually serves (a hierarchical router's inner router only counts the tokens
sent to its group); ``None`` means every token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moracl.experts.routing import mask_logits

__all__ = ["load_balance_loss", "router_z_loss", "routing_entropy"]


def _token_weights(n: int, ref: Tensor, active: Tensor | None) -> Tensor:
    """``(n,)`` 1.0 for counted tokens, 0.0 for the others, in ``ref``'s dtype."""
    if active is None:
        return ref.new_ones(n)
    return active.to(ref.dtype)


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
    n, e = probs.shape
    w = _token_weights(n, probs, active)[:, None]  # (n, 1)
    assigned = chosen.to(probs.dtype) * w  # (n, e)
    f = assigned.sum(0) / assigned.sum().clamp_min(1.0)  # (e,)
    p = (probs * w).sum(0) / w.sum().clamp_min(1.0)  # (e,)
    return e * (f * p).sum()


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
    n = logits.shape[0]
    w = _token_weights(n, logits, active)  # (n,)
    if allowed is not None:
        lse = torch.logsumexp(mask_logits(logits, allowed), dim=-1)  # (n,)
        has_expert = allowed.any(-1).expand(n)  # (n,)
        lse = torch.where(has_expert, lse, torch.zeros_like(lse))  # before squaring: no inf
        w = w * has_expert.to(w.dtype)
    else:
        lse = torch.logsumexp(logits, dim=-1)
    return (lse.square() * w).sum() / w.sum().clamp_min(1.0)


def routing_entropy(probs: Tensor, active: Tensor | None = None) -> Tensor:
    """Mean over tokens of the entropy (nats) of ``probs (n, e)``; ``0 · log 0 = 0``."""
    w = _token_weights(probs.shape[0], probs, active)
    h = -torch.special.xlogy(probs, probs).sum(-1)  # (n,)
    return (h * w).sum() / w.sum().clamp_min(1.0)
