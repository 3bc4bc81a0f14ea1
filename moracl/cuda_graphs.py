"""A whole training step — forward, backward, optimiser step — captured once as a CUDA graph
and replayed, so the host launches one graph instead of thousands of kernels.

Mixtures of experts run many small kernels per layer (routing, gating, auxiliary losses); in
eager mode the step is then bound by the host launching them, not by the GPU.  moracl's
forward makes no host synchronisation (static shapes, no ``.item()``; the task-id range check
is skipped while capturing), so the whole step can be captured::

    opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)

    def step(x, y, task_ids):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = loss_fn(model(x, task_ids=task_ids), y) + model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    graphed = GraphedStep(step, x, y, task_ids)   # warms up, then captures
    for x, y, t in batches:                       # same shapes every step
        loss = graphed(x, y, t)                   # copies the batch in, replays

Rules of capture (PyTorch's): inputs keep their shapes and dtypes, the optimiser is
``capturable``, gradients are zeroed in place (``set_to_none=False``) inside the step, and
autocast runs with ``cache_enabled=False``.  Random draws inside the step (router noise,
dropout) differ on every replay, as in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphedStep", "capturing"]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (host syncs are not allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class GraphedStep:
    """``step(*inputs)`` captured as a CUDA graph after ``warmup`` eager calls on a side
    stream (which also compiles anything ``torch.compile`` compiles lazily).

    Args:
        step: the training step; reads only ``inputs`` (and module state), returns what
            :meth:`__call__` returns (tensors, or a structure of them).
        inputs: example CUDA tensors; later calls copy new values into them.
        warmup: eager calls before capture (at least 1; they train like real steps).
    """

    def __init__(self, step: Callable[..., Any], *inputs: Tensor, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs warmed-up state), got {warmup}")
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise ValueError(
                    f"input {i} must be a CUDA tensor, got "
                    f"{type(t).__name__ if not isinstance(t, Tensor) else t.device}"
                )
        self.inputs = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        """Copy ``inputs`` into the captured ones and replay; returns the captured output
        (the same tensors every call, overwritten by each replay)."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} input tensors, got {len(inputs)}")
        for i, (dst, src) in enumerate(zip(self.inputs, inputs)):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(
                    f"input {i} must keep the captured shape {tuple(dst.shape)} and dtype "
                    f"{dst.dtype}, got {tuple(src.shape)} {src.dtype}"
                )
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.output
