"""Episodes from learn2learn task datasets (or anything that samples whole N-way tasks).

learn2learn builds tasks with ``TaskDataset(MetaDataset(ds), [NWays(ds, N), KShots(ds, K + Q),
LoadData(ds), RemapLabels(ds)])``; ``taskset.sample()`` returns ``(x (N·(K+Q), ...), y
(N·(K+Q),))``, the examples of ``N`` classes in any order. :class:`TaskDatasetSampler` turns
such tasks into :class:`~moracl.meta.episodes.Episode` batches like
:class:`~moracl.meta.episodes.EpisodeSampler`, so ``MAML.meta_loss`` and the ``moracl meta``
evaluation take either. Nothing here imports learn2learn.

Shapes: ``N`` ways, ``K`` shots, ``Q`` queries per class, ``t`` tasks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from moracl.meta.episodes import Episode

__all__ = ["TaskDatasetSampler", "TaskSource", "episode_from_task", "split_task"]


class TaskSource(Protocol):
    """What is sampled: ``sample() -> (x, y)`` (a learn2learn ``TaskDataset`` is one)."""

    def sample(self) -> Sequence[Any]: ...


def episode_from_task(x: Tensor, y: Tensor, *, ways: int, shots: int, queries: int) -> Episode:
    """Split one task ``x (N·(K+Q), ...)``, ``y (N·(K+Q),)`` into support and query sets.

    Classes are numbered ``0..N-1`` in the order of their sorted labels; per class the first
    ``K`` examples (in task order) are the support set and the next ``Q`` the queries.

    Raises:
        ValueError: the task does not hold exactly ``N`` classes of ``K + Q`` examples each.
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected x (n, ...) and labels (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    labels, counts = torch.unique(y, return_counts=True)  # sorted
    need = shots + queries
    if labels.numel() != ways or bool((counts != need).any()):
        raise ValueError(
            f"a {ways}-way task with {shots} + {queries} examples per class was expected; got "
            f"classes {labels.tolist()} with {counts.tolist()} examples"
        )
    support, query = [], []
    for c in labels:
        idx = torch.nonzero(y == c).flatten()  # (K + Q,) in task order
        support.append(idx[:shots])
        query.append(idx[shots:])
    s_idx, q_idx = torch.cat(support), torch.cat(query)  # (N·K,), (N·Q,)
    ys = torch.arange(ways, device=y.device).repeat_interleave(shots)
    yq = torch.arange(ways, device=y.device).repeat_interleave(queries)
    return Episode(x[s_idx], ys, x[q_idx], yq)


def split_task(x: Tensor, y: Tensor, *, shots: int) -> Episode:
    """Split one sampled task ``x (n, ...)``, ``y (n,)`` (a learn2learn ``taskset.sample()``)
    into support and query sets as ``learn2learn.data.utils.partition_task(x, y, shots)``
    does: per class, in the order of the sorted labels, the first ``shots`` examples (in task
    order) are the support set and the rest the queries. Labels are renumbered ``0..N-1`` in
    sorted order (unchanged when the taskset ends with ``RemapLabels``).

    Raises:
        ValueError: ``shots < 1``, or classes with unequal counts or no query left.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    y = torch.as_tensor(y)
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected x (n, ...) and labels (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    labels, counts = torch.unique(y, return_counts=True)  # sorted
    if bool((counts != counts[0]).any()) or int(counts[0]) <= shots:
        raise ValueError(
            f"a task split with shots={shots} needs the same number of examples (more than "
            f"{shots}) in every class; got classes {labels.tolist()} with {counts.tolist()}"
        )
    queries = int(counts[0]) - shots
    return episode_from_task(x, y, ways=labels.numel(), shots=shots, queries=queries)


class TaskDatasetSampler:
    """Episodes from a task source such as a learn2learn ``TaskDataset``.

    Args:
        taskset: has ``sample() -> (x, y)`` returning ``N·(K+Q)`` examples of ``N`` classes.
        ways, shots, queries: ``N``, ``K``, ``Q`` (the taskset must have been built for them,
            e.g. with ``NWays(ds, N)`` and ``KShots(ds, K + Q)``).

    learn2learn samples with Python's ``random`` module. Given a ``generator``, each task is
    sampled under a ``random`` state seeded from it (the global state is restored after), so
    the same generator seed gives the same tasks.
    """

    def __init__(self, taskset: TaskSource, *, ways: int, shots: int, queries: int) -> None:
        if not callable(getattr(taskset, "sample", None)):
            raise TypeError(f"taskset needs a sample() method, got {type(taskset).__name__}")
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(
                f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways}, shots={shots}, "
                f"queries={queries}"
            )
        self.taskset = taskset
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, generator: torch.Generator | None = None) -> Episode:
        """One episode: ``xs (N·K, ...)``, ``ys (N·K,)``, ``xq (N·Q, ...)``, ``yq (N·Q,)``."""
        if generator is None:
            task = self.taskset.sample()
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            state = random.getstate()
            try:
                random.seed(seed)
                task = self.taskset.sample()
            finally:
                random.setstate(state)
        x, y = task[0], task[1]
        return episode_from_task(x, y, ways=self.ways, shots=self.shots, queries=self.queries)

    def sample_batch(self, tasks: int, generator: torch.Generator | None = None) -> Episode:
        """``tasks`` episodes stacked, each field with a leading ``t`` dimension."""
        if tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {tasks}")
        eps = [self.sample(generator) for _ in range(tasks)]
        return Episode(*(torch.stack(parts) for parts in zip(*eps)))
