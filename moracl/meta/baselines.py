"""Meta-test evaluation on batches of episodes: per-episode accuracies of an adapted model and
of the two baselines, and their mean with a 95 % confidence interval.

- :func:`prototype_accuracy`: no adaptation, a nearest-centroid classifier (squared Euclidean
  distance to the class means of the support features, Snell et al. 2017) on the frozen
  backbone's features;
- :func:`adapted_accuracy`: a model adapted on each episode's support set by SGD steps (the
  MAML inner loop at test time, e.g. with :meth:`moracl.meta.MAML.inner_step`) or by Adam
  (:func:`adam_update`, used to fine-tune fresh adapters per episode), vmapped over episodes.

Shapes: ``t`` episodes, ``N`` ways, ``n_s`` / ``n_q`` support / query examples per episode
(``N·K`` / ``N·Q``), ``d`` features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

__all__ = [
    "Summary",
    "adam_update",
    "adapted_accuracy",
    "prototype_accuracy",
    "prototype_logits",
    "sgd_update",
    "summarize",
]

Params = dict[str, Tensor]
ForwardFn = Callable[[Params, Tensor], Tensor]
"""``forward(params, x (n, ...)) -> logits (n, N)``: the model run with ``params``."""
UpdateFn = Callable[[Params, Params, Params, int], tuple[Params, Params]]
"""``update(params, grads, state, step) -> (params, state)`` on the adapted names only."""


@dataclass(frozen=True)
class Summary:
    """Mean accuracy over ``episodes`` with its 95 % confidence interval
    ``1.96 · std / sqrt(episodes)`` (``std`` with Bessel's correction)."""

    mean: float
    ci95: float
    std: float
    episodes: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "episodes": self.episodes}


def summarize(accuracies: Tensor | Sequence[float]) -> Summary:
    """Mean and 95 % confidence interval of per-episode accuracies ``(t,)`` (``t >= 2``)."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    n = acc.numel()
    if n < 2:
        raise ValueError(f"need at least 2 episodes for a confidence interval, got {n}")
    std = float(acc.std(unbiased=True))
    return Summary(float(acc.mean()), 1.96 * std / math.sqrt(n), std, n)


def prototype_logits(fs: Tensor, ys: Tensor, fq: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distances of the queries to the class means.

    Args:
        fs: support features ``(t, n_s, d)``; ys: their labels ``(t, n_s)`` in ``0..N-1``.
        fq: query features ``(t, n_q, d)``.
        ways: ``N``; every class must have a support example.
    Returns: ``(t, n_q, N)``.
    """
    if fs.dim() != 3 or fq.dim() != 3 or ys.shape != fs.shape[:2]:
        raise ValueError(
            f"expected fs (t, n_s, d), ys (t, n_s), fq (t, n_q, d); got {tuple(fs.shape)}, "
            f"{tuple(ys.shape)}, {tuple(fq.shape)}"
        )
    onehot = F.one_hot(ys, ways).to(fs.dtype)  # (t, n_s, N)
    counts = onehot.sum(dim=1)  # (t, N)
    if bool((counts == 0).any()):
        raise ValueError("every class needs at least one support example")
    centroids = onehot.transpose(1, 2) @ fs / counts.unsqueeze(-1)  # (t, N, d)
    return -torch.cdist(fq, centroids).square()  # (t, n_q, N)


def prototype_accuracy(fs: Tensor, ys: Tensor, fq: Tensor, yq: Tensor, ways: int) -> Tensor:
    """Per-episode accuracy ``(t,)`` of the nearest-centroid classifier (see
    :func:`prototype_logits`); ``yq (t, n_q)``."""
    pred = prototype_logits(fs, ys, fq, ways).argmax(dim=-1)  # (t, n_q)
    return (pred == yq).to(torch.float64).mean(dim=1)


def sgd_update(step_sizes: dict[str, Tensor | float]) -> UpdateFn:
    """Plain SGD: ``p - lr_p · g`` with a step size per name (a float or a tensor like ``p``)."""

    def update(params: Params, grads: Params, state: Params, step: int) -> tuple[Params, Params]:
        return {n: p - step_sizes[n] * grads[n] for n, p in params.items()}, state

    return update


def adam_update(
    lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> UpdateFn:
    """Adam (Kingma & Ba 2015, without weight decay) as a pure function; ``state`` holds the
    moments ``m/<name>`` and ``v/<name>`` (zeros before the first step, ``step`` from 1)."""
    b1, b2 = betas

    def update(params: Params, grads: Params, state: Params, step: int) -> tuple[Params, Params]:
        new_p, new_s = {}, {}
        for n, p in params.items():
            g = grads[n]
            m = b1 * state.get(f"m/{n}", torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * state.get(f"v/{n}", torch.zeros_like(g)) + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
            new_p[n] = p - lr * m_hat / (v_hat.sqrt() + eps)
            new_s[f"m/{n}"], new_s[f"v/{n}"] = m, v
        return new_p, new_s

    return update


def adapted_accuracy(
    forward: ForwardFn,
    params: Params,
    names: Sequence[str],
    episodes: Sequence[Tensor],
    *,
    steps: int,
    update: UpdateFn,
    batch: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """Adapt ``params[names]`` on each episode's support set, then score its queries.

    Every episode starts from the same ``params`` (detached: nothing here is differentiated
    afterwards); episodes are vmapped ``batch`` at a time.

    Args:
        forward: ``forward(params, x) -> logits``.
        params: every parameter ``forward`` takes by name.
        names: the names adapted per episode (the others stay at ``params``).
        episodes: ``(xs (t, n_s, ...), ys (t, n_s), xq (t, n_q, ...), yq (t, n_q))``.
        steps: update steps on the support set (``>= 0``).
        update: e.g. :func:`sgd_update` or :func:`adam_update`.
        batch: episodes per vmapped chunk (``None``: all).
    Returns: per-episode query accuracy ``(t,)`` float64; NaN for an episode whose adapted
        model gives non-finite logits.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"names {missing} are not among the parameters {sorted(params)}")
    xs, ys, xq, yq = episodes
    base = {n: p.detach() for n, p in params.items()}
    fixed = {n: p for n, p in base.items() if n not in names}
    start = {n: base[n] for n in names}

    def one(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        adapted: Params = start
        state: Params = {}

        def support_loss(q: Params) -> Tensor:
            return loss_fn(forward({**fixed, **q}, xs), ys)

        for step in range(1, steps + 1):
            g = grad(support_loss)(adapted)
            adapted, state = update(adapted, g, state, step)
        logits = forward({**fixed, **adapted}, xq)  # (n_q, N)
        acc = (logits.argmax(dim=-1) == yq).to(torch.float64).mean()
        # a diverged adaptation (non-finite logits) scores NaN, not a chance-level accuracy
        return torch.where(torch.isfinite(logits).all(), acc, torch.full_like(acc, math.nan))

    with torch.no_grad():
        # randomness="different": a noisy router draws its own noise for every episode
        return vmap(one, chunk_size=batch, randomness="different")(xs, ys, xq, yq)  # (t,)
