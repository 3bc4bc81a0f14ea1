"""N-way K-shot episodes with query sets, from any labelled dataset held as tensors.

Shapes: ``N`` ways (classes per episode), ``K`` shots (support examples per class), ``Q``
queries per class, ``t`` episodes in a batch, ``...`` an example's features.

    splits = split_classes(labels, (0.6, 0.2, 0.2), generator=torch.Generator().manual_seed(0))
    sampler = EpisodeSampler(features, labels, splits.train, ways=5, shots=1, queries=15)
    xs, ys, xq, yq = sampler.sample_batch(4, generator=g)   # (4, 5, ...), (4, 5), (4, 75, ...), ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ClassSplits", "Episode", "EpisodeSampler", "split_classes"]


class Episode(NamedTuple):
    """One episode (or ``t`` stacked ones, with a leading ``t`` dimension on every field).

    Labels are remapped to ``0..N-1`` in the order of :attr:`classes`.
    """

    xs: Tensor  # (N·K, ...) support features
    ys: Tensor  # (N·K,) support labels in 0..N-1
    xq: Tensor  # (N·Q, ...) query features
    yq: Tensor  # (N·Q,) query labels in 0..N-1


class ClassSplits(NamedTuple):
    """Disjoint, sorted tuples of original class labels for meta-train / -val / -test."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def split_classes(
    labels: Tensor,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    *,
    generator: torch.Generator | None = None,
) -> ClassSplits:
    """Shuffle the distinct classes of ``labels (n,)`` and cut them into three disjoint splits.

    Args:
        labels: integer class labels, ``(n,)``.
        fractions: ``(train, val, test)`` shares of the classes, non-negative, summing to 1;
            the test split takes what rounding leaves.
        generator: seeds the shuffle (same seed, same splits).
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be a 1-d integer tensor, got shape {tuple(labels.shape)} {labels.dtype}"
        )
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be 3 non-negative numbers, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    classes = torch.unique(labels)
    c = classes.numel()
    order = classes[torch.randperm(c, generator=generator)].tolist()
    n_train = round(fractions[0] * c)
    n_val = round(fractions[1] * c)
    if n_train + n_val > c:
        n_val = c - n_train
    cut = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return ClassSplits(*(tuple(sorted(int(k) for k in part)) for part in cut))


class EpisodeSampler:
    """Samples N-way K-shot episodes with ``Q`` queries per class from the classes ``classes``.

    Args:
        features: ``(n, ...)`` examples.
        labels: ``(n,)`` integer labels.
        classes: the original labels this sampler draws from (e.g. ``splits.train``).
        ways: ``N``; shots: ``K``; queries: ``Q`` (``>= 1`` each, except ``queries >= 0``).

    Raises ``ValueError`` if the split has fewer than ``N`` classes or a class of the split has
    fewer than ``K + Q`` examples.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        classes: Sequence[int],
        *,
        ways: int,
        shots: int,
        queries: int,
    ) -> None:
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"labels must be a 1-d integer tensor, got shape {tuple(labels.shape)} "
                f"{labels.dtype}"
            )
        if features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"features has {features.shape[0]} examples but labels has {labels.shape[0]}"
            )
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(
                f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways}, shots={shots}, "
                f"queries={queries}"
            )
        classes = tuple(int(k) for k in classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct, got {classes}")
        if ways > len(classes):
            raise ValueError(f"ways={ways} is larger than the {len(classes)} classes in this split")
        self.features = features
        self.labels = labels
        self.classes = classes
        self.ways, self.shots, self.queries = ways, shots, queries
        need = shots + queries
        self._indices: list[Tensor] = []
        for k in classes:
            idx = torch.nonzero(labels == k).flatten()
            if idx.numel() < need:
                raise ValueError(
                    f"class {k} has {idx.numel()} examples, fewer than shots + queries = "
                    f"{shots} + {queries} = {need}"
                )
            self._indices.append(idx)

    def sample(self, generator: torch.Generator | None = None) -> Episode:
        """One episode: ``xs (N·K, ...)``, ``ys (N·K,)``, ``xq (N·Q, ...)``, ``yq (N·Q,)``.

        Examples are grouped by class (class ``j`` of the episode is label ``j``).
        """
        n, k, q = self.ways, self.shots, self.queries
        picked = torch.randperm(len(self.classes), generator=generator)[:n].tolist()
        support, query = [], []
        for j in picked:
            idx = self._indices[j]
            take = idx[torch.randperm(idx.numel(), generator=generator)[: k + q]]
            support.append(take[:k])
            query.append(take[k:])
        s_idx, q_idx = torch.cat(support), torch.cat(query)  # (N·K,), (N·Q,)
        dev = self.labels.device
        ys = torch.arange(n, device=dev).repeat_interleave(k)  # (N·K,)
        yq = torch.arange(n, device=dev).repeat_interleave(q)  # (N·Q,)
        return Episode(self.features[s_idx], ys, self.features[q_idx], yq)

    def sample_batch(self, tasks: int, generator: torch.Generator | None = None) -> Episode:
        """``tasks`` episodes stacked: ``(t, N·K, ...)``, ``(t, N·K)``, ``(t, N·Q, ...)``,
        ``(t, N·Q)``."""
        if tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {tasks}")
        eps = [self.sample(generator) for _ in range(tasks)]
        return Episode(*(torch.stack(parts) for parts in zip(*eps)))
