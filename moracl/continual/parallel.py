"""Data-parallel training for the Avalanche strategies of ``moracl run`` (Avalanche's own loop
has none): a plugin that gives each process its rows of every global mini-batch and sums the
gradients across processes before the optimiser steps (see :mod:`moracl.distributed`).

Every process iterates the same global mini-batches in the same order as a one-process run
(the in-memory loaders are seeded; loaders that draw from the global random state get rank
0's state at every epoch), so the global batch, its order and the step equal the
one-process run's.

Reads ``strategy.model``, ``strategy.dataloader``, ``strategy.train_mb_size``,
``strategy.experience``; writes ``strategy.mbatch`` (this process's rows) and the ``.grad`` of
the model's trainable parameters (summed over the processes after ``backward``).
"""

from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin

from moracl.continual.batches import TensorBatches
from moracl.distributed import (
    DataParallel,
    broadcast_rng_state,
    check_batches,
    shard_batch,
    world_size,
)

__all__ = ["DataParallelPlugin"]


class DataParallelPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[misc,call-arg]
    """Split every training mini-batch across the processes and synchronise the gradients.

    Avalanche's multi-dataset loaders (replay) switch to a ``DistributedSampler`` when a
    process group exists, which gives each process other samples and other batches than a
    one-process run; the plugin turns that off (after the replay plugin made its loader), so
    every process walks the global batches and takes its rows of each.

    Args:
        bucket_mb: size of the gradient all-reduce buckets (MiB).
    """

    def __init__(self, *, bucket_mb: float = 25.0) -> None:
        super().__init__()
        self.bucket_mb = bucket_mb
        self.share = 1.0
        self.parallel: DataParallel | None = None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.parallel = DataParallel(strategy.model, bucket_mb=self.bucket_mb)
        loader = strategy.dataloader
        if getattr(loader, "distributed_sampling", False):
            _global_sampling(loader)
        if isinstance(loader, TensorBatches):
            check_batches(
                len(loader.tensors[0]),
                loader.batch_size,
                world_size(),
                f"experience {strategy.experience.current_experience}",
            )

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        broadcast_rng_state()

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        strategy.mbatch, self.share = shard_batch(strategy.mbatch)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        assert self.parallel is not None
        self.parallel.sync_gradients(self.share)


def _global_sampling(loader: Any) -> None:
    """Make an Avalanche ``MultiDatasetDataLoader`` sample the whole data on every process
    (as in one process): no ``DistributedSampler``, and the one-process number of
    iterations (that of its terminating dataset)."""
    loader.distributed_sampling = False
    if loader.never_ending:
        return
    t = loader.termination_dataset
    rows, size = len(loader.datasets[t]), loader.batch_sizes[t]
    drop = bool(loader.loader_kwargs.get("drop_last", False))
    loader.n_iterations = rows // size if drop else -(-rows // size)
