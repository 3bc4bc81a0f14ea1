"""In-memory data for the continual strategies: seeds derived from named parts, Avalanche
datasets stacked into tensors, and seeded mini-batches over them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["TensorBatches", "derive_seed", "materialize"]


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def materialize(dataset: Any, batch_size: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """All ``(x, y, t)`` of an Avalanche dataset as three stacked tensors, in order.

    Draws nothing from torch's global generator (a ``DataLoader`` seeds each pass from its
    generator, by default the global one): loading data leaves a run's later draws, such as
    dropout's, as they were.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=dataset.collate_fn,
        generator=torch.Generator(),
    )
    xs, ys, ts = [], [], []
    for x, y, t in loader:
        xs.append(x)
        ys.append(y)
        ts.append(t)
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()


class TensorBatches:
    """Mini-batches ``[x, y, t]`` of in-memory tensors, reshuffled each pass by a seeded
    generator: what a ``DataLoader`` over an Avalanche dataset yields, without the per-sample
    indexing cost."""

    def __init__(
        self,
        tensors: tuple[Tensor, Tensor, Tensor],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self) -> Iterator[list[Tensor]]:
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield [t[start : start + self.batch_size] for t in self.tensors]
            else:
                idx = order[start : start + self.batch_size]
                yield [t[idx] for t in self.tensors]
