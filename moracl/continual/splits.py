"""Validation splits carved from a stream's training experiences.

Every hyperparameter of a continual run is chosen on validation data, and the test split is
read once at the end. The validation data come from the training experiences themselves:
:func:`split_stream` takes, from each training experience ``i``, a share of every class's
rows (drawn by a generator seeded by ``(seed, i)``, so the split is a function of the run's
seed alone) and rebuilds the training stream from the rest. The strategies and every plugin
(replay buffers, EWC importances, LwF, head rebalancing, task-inference statistics) see only
the rebuilt experiences; the validation rows are kept as tensors, evaluated as the test
experiences are.

The rebuilt experiences are Avalanche ``DatasetExperience`` objects over subsets of the
original datasets (:meth:`AvalancheDataset.subset`), in a stream made the way Avalanche's
benchmark generators make theirs (``make_stream``, ``with_classes_timeline``,
``with_task_labels``): ``current_experience``, ``task_label(s)`` and
``classes_in_this_experience`` are those of the original experience (every class keeps at
least one training row), which :func:`split_stream` checks.

Shape legend: ``n`` rows of an experience.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moracl.continual.batches import derive_seed, materialize

__all__ = [
    "Split",
    "ValidationSplit",
    "class_counts",
    "split_seed",
    "split_stream",
    "stratified_split",
]

#: one experience's rows as ``(x, y, t)`` tensors
Split = tuple[Tensor, Tensor, Tensor]


def split_seed(seed: int, experience: int) -> int:
    """The seed of experience ``experience``'s validation draw in a run seeded by ``seed``."""
    return derive_seed(seed, "validation", experience)


def _check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise ValueError(f"scenario.val_share={share!r}; expected a number in [0, 1)")
    if not (0.0 <= share < 1.0):
        raise ValueError(f"scenario.val_share={share!r}; expected a number in [0, 1)")
    return float(share)


def class_counts(targets: Tensor, share: float) -> dict[int, int]:
    """How many rows of each class of ``targets (n,)`` go to validation: ``share`` of the
    class's rows, rounded half up, at most all but one (every class keeps a training row).
    With ``share > 0``, should that round every class to none, the largest class with two
    rows or more (the lowest class id among equals) gives one row, so that the experience
    has a validation split."""
    share = _check_share(share)
    classes, counts = torch.unique(targets, return_counts=True)
    sizes = {int(c): int(n) for c, n in zip(classes.tolist(), counts.tolist())}
    out = {c: min(n - 1, math.floor(share * n + 0.5)) for c, n in sizes.items()}
    if share > 0 and not any(out.values()):
        largest = max(sizes, key=lambda c: (sizes[c], -c), default=None)
        if largest is not None and sizes[largest] >= 2:
            out[largest] = 1
    return out


def stratified_split(targets: Tensor, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split the rows of one experience by class: ``(train, validation)`` row indices, each
    sorted (int64), together every row once.

    Args:
        targets: ``(n,)`` the class of each row.
        share: the share of each class's rows that goes to validation (see
            :func:`class_counts`), in ``[0, 1)``.
        seed: seeds the draw (``torch.Generator``); the same seed gives the same split.
    """
    if targets.ndim != 1:
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected (n,)")
    counts = class_counts(targets, share)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=generator)  # (n,) a random row order
    shuffled = targets[order]  # (n,)
    picked = []
    for c, k in counts.items():
        if k:
            picked.append(order[shuffled == c][:k])  # the class's first k rows in that order
    validation = torch.cat(picked) if picked else targets.new_zeros(0, dtype=torch.long)
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[validation] = False
    return keep.nonzero().flatten(), validation.sort().values.long()


def _targets(dataset: Any, where: str) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{where}: its dataset has no targets; a validation split needs them")
    return torch.as_tensor(list(targets), dtype=torch.long)


@dataclass
class ValidationSplit:
    """A stream's training experiences with their validation rows taken out.

    Attributes:
        train: the rebuilt training experiences (the original ones when ``share`` is 0).
        validation: per experience, its validation rows ``(x, y, t)`` (empty when ``share``
            is 0).
        indices: per experience, ``(train, validation)`` row indices into its original
            dataset (empty when ``share`` is 0).
        share: the share of each class's rows taken for validation.
    """

    train: list[Any]
    validation: list[Split]
    indices: list[tuple[Tensor, Tensor]]
    share: float


def split_stream(experiences: Sequence[Any], share: float, seed: int) -> ValidationSplit:
    """Carve a validation split from each training experience (see the module docstring).

    Args:
        experiences: the stream's training experiences (Avalanche ``DatasetExperience``
            objects, ``current_experience`` 0, 1, ... in order).
        share: ``scenario.val_share``, in ``[0, 1)``; 0 leaves the experiences as they are.
        seed: ``train.seed``; experience ``i`` draws with :func:`split_seed` ``(seed, i)``.

    Raises:
        ValueError: a share outside ``[0, 1)``; an experience with one row per class (none
            can be held out); a dataset without targets; a rebuilt experience whose index,
            task labels or classes differ from the original's.
    """
    share = _check_share(share)
    originals = list(experiences)
    if share == 0.0:
        return ValidationSplit(originals, [], [], 0.0)
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.scenarios.generic_scenario import make_stream
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    subsets, validation, indices = [], [], []
    for i, exp in enumerate(originals):
        where = f"training experience {i}"
        targets = _targets(exp.dataset, where)  # (n,)
        train_rows, val_rows = stratified_split(targets, share, split_seed(seed, i))
        if len(val_rows) == 0:
            raise ValueError(
                f"{where} has one row per class ({len(targets)} rows): no row can be held out "
                f"for validation while every class keeps a training row; give the experience "
                f"more rows, or set scenario.val_share=0 (no validation split)"
            )
        subsets.append(DatasetExperience(dataset=exp.dataset.subset(train_rows.tolist())))
        validation.append(materialize(exp.dataset.subset(val_rows.tolist())))
        indices.append((train_rows, val_rows))
    rebuilt = list(with_task_labels(with_classes_timeline(make_stream("train", subsets))))
    for i, (new, old) in enumerate(zip(rebuilt, originals)):
        for key in ("current_experience", "task_labels", "classes_in_this_experience"):
            a, b = getattr(new, key, None), getattr(old, key, None)
            if b is not None and _plain(a) != _plain(b):
                raise ValueError(
                    f"training experience {i} without its validation rows has {key}={a!r}, "
                    f"but the original has {b!r}"
                )
    return ValidationSplit(rebuilt, validation, indices, share)


def _plain(value: Any) -> Any:
    """A comparable form of an experience attribute (sets and lists of ints sorted)."""
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted(int(v) for v in value)
    return value
