"""Numeric features as model inputs, and the frozen encoder that adapters train on.

Rows of numeric columns become ``x`` ``(f,)`` float32, each column centred and scaled by the
mean and standard deviation of the **first experience's training rows** (what a learner has
seen when the stream starts; a column constant there is only centred). A column that holds a
list of numbers (a vector per row, all of one length) gives as many features.

There is no pretrained model for arbitrary tables, so the ``tabular`` encoder is a fixed
random-feature network, honest about what it is: ``fc1`` ``(f -> w)`` and ``fc2``
``(w -> w)``, each followed by a ReLU, with He-scaled Gaussian weights and a standard normal
bias on ``fc1``, drawn from a generator seeded by the stream's seed (``train.seed``: a resumed
run rebuilds the same weights), trained on nothing and frozen. A linear head on its ``w``
features is a random-features classifier; adapters on ``fc1`` and ``fc2`` (its default
targets) learn low-rank corrections of its two layers, so moracl's experts and the baselines'
adapters have somewhere to go.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["TabularEncoder", "numeric_matrix", "standardise"]


def numeric_matrix(columns: Sequence[tuple[str, Sequence[object]]], scenario: str) -> np.ndarray:
    """Stack numeric columns ``(name, n values)`` into ``(n, f)`` float32; a column of lists
    of numbers gives one feature per list item.

    Raises:
        ValueError: a value that is not a number (or a list of them), an empty or non-finite
            value, or lists of different lengths; names the column and the row.
    """
    parts: list[np.ndarray] = []
    for name, values in columns:
        try:
            block = np.asarray(list(values), dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"scenario {scenario!r}: column {name!r} must hold numbers (or lists of "
                f"numbers of one length) for numeric inputs"
            ) from None
        if block.ndim == 1:
            block = block[:, None]  # (n,) -> (n, 1)
        if block.ndim != 2:
            raise ValueError(f"scenario {scenario!r}: column {name!r} holds nested lists")
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            raise ValueError(
                f"scenario {scenario!r}: column {name!r} is empty or not finite on "
                f"{len(bad)} row(s) (first: row {int(bad[0])})"
            )
        parts.append(block)
    return np.concatenate(parts, axis=1).astype(np.float32)  # (n, f)


def standardise(x: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    """``x`` ``(n, f)`` centred and scaled by the columns' mean and standard deviation over
    ``reference`` ``(m, f)`` (a constant column is only centred); float32 ``(n, f)``."""
    mean = reference.mean(axis=0, dtype=np.float64)  # (f,)
    std = reference.std(axis=0, dtype=np.float64)  # (f,)
    std = np.where(std > 0, std, 1.0)
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


class TabularEncoder(nn.Module):
    """A frozen random-feature MLP: ``(b, f) -> fc1 -> ReLU -> fc2 -> ReLU -> (b, w)``.

    Args:
        in_features: ``f``.
        width: ``w``, the features' width.
        seed: seeds the weights (the same seed gives the same network).

    Attributes:
        feature_dim: ``w``.
        default_targets: ``("fc1", "fc2")``.
    """

    def __init__(self, in_features: int, width: int = 256, *, seed: int = 0) -> None:
        super().__init__()
        if in_features < 1 or width < 1:
            raise ValueError(f"in_features={in_features} and width={width} must be >= 1")
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, math.sqrt(2.0 / in_features), generator=generator)
            self.fc1.bias.normal_(0.0, 1.0, generator=generator)
            self.fc2.weight.normal_(0.0, math.sqrt(2.0 / width), generator=generator)
            self.fc2.bias.zero_()
        self.feature_dim: int = width
        self.default_targets: tuple[str, ...] = ("fc1", "fc2")
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(b, w)`` of ``x`` ``(b, f)``."""
        if x.ndim != 2 or x.shape[1] != self.fc1.in_features:
            raise ValueError(f"expected (b, {self.fc1.in_features}) inputs, got {tuple(x.shape)}")
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))  # (b, f) -> (b, w) -> (b, w)
