"""Stacking an Avalanche experience into tensors: the rows in order, no global draw."""

from __future__ import annotations

import torch
from moracl_scenarios.streams import tensor_benchmark

from moracl.continual.batches import materialize


def test_materialize_stacks_the_rows_in_order_and_draws_nothing_from_the_global_generator() -> None:
    x = torch.randn(10, 3)
    y = torch.arange(10) % 2
    bench = tensor_benchmark([(x, y)], [(x, y)], task_labels=[4])
    dataset = bench.train_stream[0].dataset.train()
    torch.manual_seed(0)
    expected = torch.rand(5)  # the draws that follow a seed with nothing in between
    torch.manual_seed(0)
    xs, ys, ts = materialize(dataset, batch_size=4)  # three loader batches
    assert torch.equal(torch.rand(5), expected)
    assert torch.equal(xs, x) and torch.equal(ys, y) and torch.equal(ts, torch.full((10,), 4))
    assert ys.dtype == ts.dtype == torch.int64
