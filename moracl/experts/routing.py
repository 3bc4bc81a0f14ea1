"""The typed result every router returns, and the masking convention routers share.

Shape legend: ``n`` tokens, ``e`` experts, ``k`` experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["RoutingResult", "RoutingStats", "mask_logits", "routing_dtype"]


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


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of one forward, detached, as tensors (reading them needs no sync).

    Tokens routed to no expert (every expert masked) are left out of the means.

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
    def compute(cls, probs: Tensor, chosen: Tensor) -> RoutingStats:
        """Statistics from ``probs (n, e)`` and the boolean routing ``chosen (n, e)``."""
        with torch.no_grad():
            c = chosen.to(probs.dtype)  # (n, e)
            active = chosen.any(-1).to(probs.dtype)  # (n,)
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

    :attr:`stats` (:class:`RoutingStats`) are computed from ``probs`` and ``chosen`` on first
    access, so a training step that never reads them launches no kernels for them.
    """

    gates: Tensor
    probs: Tensor
    chosen: Tensor
    indices: Tensor | None
    aux_losses: dict[str, Tensor]
    aux_weights: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.aux_losses) != set(self.aux_weights):
            raise ValueError(
                f"aux_weights {sorted(self.aux_weights)} must name the same losses as "
                f"aux_losses {sorted(self.aux_losses)}"
            )

    @cached_property
    def stats(self) -> RoutingStats:
        """Usage, entropy and experts per token of this routing (detached)."""
        return RoutingStats.compute(self.probs, self.chosen)

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
