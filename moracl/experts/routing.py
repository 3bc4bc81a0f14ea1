"""The typed result every router returns, and the masking convention routers share.

Shape legend: ``n`` tokens, ``e`` experts, ``k`` experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = [
    "RoutingResult",
    "RoutingStats",
    "concat_results",
    "gather_k",
    "mask_logits",
    "routing_dtype",
    "scatter_k",
    "select_topk",
]


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing math runs in: at least float32 (bf16/fp16 logits are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def mask_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """``logits (n, e)`` with the experts outside ``allowed (n|1, e)`` set to the lowest float.

    A finite lowest value rather than ``-inf`` acts the same in ``topk``/``softmax`` whenever a
    token has an allowed expert, and keeps a token with none free of NaNs (its softmax is
    uniform, and routers multiply probabilities by ``allowed``, so its gates are zero).
    """
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


_ITERATIVE_K = 4


def select_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` highest ``scores (n, e)`` per row, highest first: ``(top, indices)``, both
    ``(n, k)``; ties go to the lower index.

    For ``k ≤ 4`` this is ``k`` rounds of ``max`` (the chosen column set to ``-inf`` between
    rounds), which a compiler fuses with the rest of the routing; ``torch.topk`` is one
    separate sort per call.  Larger ``k`` uses ``torch.topk``.
    """
    if k > _ITERATIVE_K:
        top, indices = scores.topk(k, dim=-1)
        return top, indices
    columns = torch.arange(scores.shape[-1], device=scores.device)
    tops, picks = [], []
    rest = scores
    for j in range(k):
        top, index = rest.max(-1, keepdim=True)  # (n, 1)
        tops.append(top)
        picks.append(index)
        if j + 1 < k:
            rest = rest.masked_fill(columns == index, float("-inf"))
    return torch.cat(tops, -1), torch.cat(picks, -1)


def _one_hot(indices: Tensor, e: int) -> Tensor:
    """``(n, k, e)`` bool: row ``[t, j]`` marks column ``indices[t, j]``."""
    return indices[..., None] == torch.arange(e, device=indices.device)


def scatter_k(indices: Tensor, values: Tensor, e: int) -> Tensor:
    """``(n, e)`` zeros with ``values (n, k)`` at ``indices (n, k)`` (distinct per row); for
    bool ``values`` the marked columns.  Under ``torch.compile`` elementwise (one-hot
    products, which the compiler fuses with the rest of the routing), else one ``scatter``
    (fewer kernels when run eagerly); the two give the same values bit for bit."""
    if not torch.compiler.is_compiling():
        out = values.new_zeros((*indices.shape[:-1], e))
        return out.scatter(-1, indices, values)
    hot = _one_hot(indices, e)
    if values.dtype == torch.bool:
        return (hot & values[..., None]).any(-2)
    return torch.where(hot, values[..., None], values.new_zeros(())).sum(-2)


def gather_k(x: Tensor, indices: Tensor) -> Tensor:
    """``x (n|1, e)`` at ``indices (n, k)``: ``(n, k)``, as ``x.gather(-1, indices)``
    (elementwise under ``torch.compile``, as :func:`scatter_k`; the same values).  Leading
    dimensions broadcast: ``x (n|1, b, e)``, ``indices (n, b, k)``."""
    if not torch.compiler.is_compiling():
        return x.expand(*indices.shape[:-1], x.shape[-1]).gather(-1, indices)
    hot = _one_hot(indices, x.shape[-1])
    if x.dtype == torch.bool:
        return (hot & x[..., None, :]).any(-1)
    return torch.where(hot, x[..., None, :], x.new_zeros(())).sum(-1)


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of one forward, detached, as tensors (reading them needs no sync).

    Tokens routed to no expert (every expert masked), and padded positions under a declared
    token mask, are left out of the means.

    Attributes:
        usage: ``(e,)`` fraction of tokens routed to each expert (sums to
            ``experts_per_token``).
        entropy: ``()`` mean over tokens of the entropy, in nats, of the router's
            distribution ``probs``.
        experts_per_token: ``()`` mean number of experts a token is routed to.
    """

    usage: Tensor
    entropy: Tensor
    experts_per_token: Tensor

    @classmethod
    def compute(cls, probs: Tensor, chosen: Tensor, tokens: Tensor | None = None) -> RoutingStats:
        """Statistics from ``probs (n, e)`` and the boolean routing ``chosen (n, e)``, over the
        ``tokens (n,)`` bool (``None``: every token)."""
        with torch.no_grad():
            counted = chosen.any(-1) if tokens is None else chosen.any(-1) & tokens  # (n,)
            c = chosen.to(probs.dtype) * counted.to(probs.dtype)[:, None]  # (n, e)
            active = counted.to(probs.dtype)  # (n,)
            count = active.sum().clamp_min(1.0)
            entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (n,)
            return cls(
                usage=c.sum(0) / count,
                entropy=(entropy * active).sum() / count,
                experts_per_token=c.sum() / count,
            )


@dataclass(frozen=True)
class RoutingResult:
    """What a router decides for ``n`` tokens over ``e`` experts.

    Routing math runs in float32 (float64 stays float64) whatever the input dtype, so under
    bf16 autocast ``gates`` are float32: cast them to the activations' dtype where they are
    applied.

    Attributes:
        gates: ``(n, e)`` dense mixing weights, zero off the chosen experts; over a token's
            chosen experts they sum to 1 (0 for a token whose experts are all masked).
            The dense-masked mixture multiplies each expert's rank-space activations by it.
        probs: ``(n, e)`` the router's full distribution the choice was made from (softmax
            over the allowed experts, noise included while training; for a hierarchical
            router the product of the levels' distributions). Feeds the balance loss and
            the entropy statistic.
        chosen: ``(n, e)`` bool, the experts each token is routed to.
        indices: ``(n, k)`` the chosen experts in descending order of score, for routers
            that choose at most ``k`` per token (``topk``; ``dynamic`` with ``k`` its
            maximum, entries past a token's count carrying zero gate); ``None`` for routers
            without a fixed bound (``soft``, ``task``).
        aux_losses: unweighted scalar auxiliary losses by name (``balance``, ``z``; a
            hierarchical router prefixes ``group.`` and ``expert.``).
        aux_weights: the weight of each auxiliary loss, from the router's config.
        tokens: ``(n,)`` bool, the real tokens under a declared token mask (the statistics
            count these only), or ``None``: every token.

    :attr:`stats` (:class:`RoutingStats`) are computed from ``probs`` and ``chosen`` on first
    access, so a training step that never reads them launches no kernels for them.
    """

    gates: Tensor
    probs: Tensor
    chosen: Tensor
    indices: Tensor | None
    aux_losses: dict[str, Tensor]
    aux_weights: dict[str, float]
    tokens: Tensor | None = None

    def __post_init__(self) -> None:
        if set(self.aux_losses) != set(self.aux_weights):
            raise ValueError(
                f"aux_weights {sorted(self.aux_weights)} must name the same losses as "
                f"aux_losses {sorted(self.aux_losses)}"
            )

    @cached_property
    def stats(self) -> RoutingStats:
        """Usage, entropy and experts per token of this routing (detached)."""
        return RoutingStats.compute(self.probs, self.chosen, self.tokens)

    @property
    def num_experts(self) -> int:
        return self.gates.shape[-1]

    @property
    def aux_loss(self) -> Tensor:
        """``Σ weight · loss`` over :attr:`aux_losses`, a scalar (zero when there are none)."""
        total = self.gates.new_zeros(())
        for name, loss in self.aux_losses.items():
            total = total + self.aux_weights[name] * loss
        return total


def concat_results(first: RoutingResult, second: RoutingResult) -> RoutingResult:
    """One routing of the tokens of ``first`` then ``second`` (two calls of one router, e.g.
    on two groups of rows): ``gates``, ``probs``, ``chosen`` and ``indices`` concatenated
    along tokens, and each auxiliary loss the token-weighted mean of the two, so a batch
    routed in parts weighs every token once (each part by the tokens its losses counted,
    where a token mask left some out).

    ``indices`` is kept when both have it with the same ``k``, else ``None``.

    Raises:
        ValueError: the two route over different numbers of experts or name different losses.
    """
    if first.num_experts != second.num_experts or first.aux_weights != second.aux_weights:
        raise ValueError(
            f"cannot concatenate routings over {first.num_experts} and {second.num_experts} "
            f"experts with losses {first.aux_weights} and {second.aux_weights}"
        )
    n1, n2 = first.gates.shape[0], second.gates.shape[0]
    w1: float | Tensor = n1 / max(n1 + n2, 1)
    w2: float | Tensor = n2 / max(n1 + n2, 1)
    i1, i2 = first.indices, second.indices
    t1, t2 = first.tokens, second.tokens
    tokens = None
    if t1 is not None or t2 is not None:
        ones = first.chosen.new_ones
        tokens = torch.cat([ones(n1) if t1 is None else t1, ones(n2) if t2 is None else t2])
        c1, c2 = tokens[:n1].sum(), tokens[n1:].sum()  # the tokens each loss counted
        total = (c1 + c2).clamp_min(1)
        w1, w2 = c1 / total, c2 / total
    indices = None
    if i1 is not None and i2 is not None and i1.shape[1:] == i2.shape[1:]:
        indices = torch.cat([i1, i2])
    return RoutingResult(
        gates=torch.cat([first.gates, second.gates]),
        probs=torch.cat([first.probs, second.probs]),
        chosen=torch.cat([first.chosen, second.chosen]),
        indices=indices,
        aux_losses={
            name: w1 * loss + w2 * second.aux_losses[name]
            for name, loss in first.aux_losses.items()
        },
        aux_weights=dict(first.aux_weights),
        tokens=tokens,
    )
