"""The ``token`` loop of :class:`~moracl.experts.act.AdaptiveComputation` at inference, on
fixed buffers, each step optionally replayed as a CUDA graph.

Shape legend: ``n`` tokens, ``d`` features, ``b`` the rows a step runs (the running tokens
padded to a bucket), ``k`` steps run.

Each step is one function of fixed shapes (:meth:`TokenLoop._step`): the block on the first
``b`` rows of the state buffer, the halting test, the output and per-token records added at
each row's token (``index_add_``), and the still-running rows moved to the front of the
buffers (a stable sort of the halted flags, so that the order is deterministic), their count
left on the device.  Rows past the count are padding: their weight is 0 and their output is
never added.  Between steps the host reads that one count (the only synchronisation) and
picks the next step's bucket, so with CUDA graphs a step costs one replay and one read of a
number, not the dozens of launches of the bookkeeping the gradient-tracking loop needs.

Without graphs (the CPU, or ``cuda_graphs=False``) the same steps run eagerly on buffers made
for the call, each declaring to the block the rows its routers count (the running real tokens:
neither a bucket's pads nor the padding the call declares) as a token mask, so that the
routing a model records (``last_routing``) and the routers' losses count those rows, as in
the training loop.  A graphed step declares nothing, and a replay runs no Python: a model
records no routing for the steps it replays.

With graphs the buffers live between calls (one set per input shape, dtype and autocast
setting), the step on all ``n`` tokens and each bucket get a graph the second time they are
needed (the first run is eager and warms the block up), and all graphs share
one memory pool (they replay one after another and keep nothing between them).  A graph
reads the module's parameters where they are: changing their values in place (an optimiser
step, ``load_state_dict``) is seen by the next replay, moving them (``.to()``, new experts)
makes the next call capture afresh, and changing what the block computes without moving a
parameter (its active adapters, a router's settings) needs :meth:`reset`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from moracl.experts.per_sample import active_tokens, token_mask

__all__ = ["LoopResult", "TokenLoop"]


class _Halting(Protocol):
    """What the loop reads of its :class:`~moracl.experts.act.AdaptiveComputation`."""

    @property
    def block(self) -> nn.Module: ...

    @property
    def act_halt(self) -> nn.Module: ...

    max_steps: int
    epsilon: float
    tau: float

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]: ...


class LoopResult(NamedTuple):
    """The fields of an :class:`~moracl.experts.act.ACTOutput`, in its order."""

    output: Tensor  # (..., d)
    ponder_cost: Tensor  # ()
    steps: Tensor  # (...)
    remainders: Tensor  # (...)
    weights: Tensor  # (k, ...)


@dataclass
class _Buffers:
    """One call's state (see the module docstring); ``x`` the graphed first step's input."""

    x: Tensor  # (n, d) in the input's dtype
    real: Tensor  # (n,) bool: the call's real tokens (its declared token mask; else all)
    index: Tensor  # (n,) int64: each row's token
    cum0: Tensor  # (n,) zeros in the input's dtype: Σ h before the first step
    count: Tensor  # () int64: the running rows
    step: Tensor  # () int64: the step to run next
    rows: Tensor  # (n,) int64: 0 .. n-1
    out: Tensor  # (n, d) in the input's dtype
    weights: Tensor  # (max_steps · n,) the halting weights, step by step
    steps: Tensor  # (n,)
    remainders: Tensor  # (n,)
    #: made by the first step, in the dtypes the block and the halting unit give:
    states: Tensor | None = None  # (n, d) the running rows first
    cum: Tensor | None = None  # (n,) each row's Σ h so far
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # by rows run
    seen: set[int] = field(default_factory=set)  # steps run once (eagerly) so far


class TokenLoop:
    """The inference ``token`` loop of one :class:`~moracl.experts.act.AdaptiveComputation`
    (see the module docstring); ``graphs``: replay each step as a CUDA graph on CUDA
    inputs."""

    def __init__(self, act: _Halting, graphs: bool) -> None:
        self._act = [act]  # not a submodule: the module holds this loop
        self.graphs = graphs
        self._cache: dict[tuple[Any, ...], _Buffers] = {}
        self._signature: tuple[Any, ...] = ()
        self._pool: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the setting, not the graphs (which cannot be copied)."""
        return {"_act": self._act, "graphs": self.graphs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_act"][0], state["graphs"])  # type: ignore[misc]

    def reset(self) -> None:
        """Drop every captured graph and its buffers (the next call captures afresh)."""
        self._cache.clear()
        self._pool = None

    def __call__(self, x: Tensor, unit: int) -> LoopResult:
        """The ``token`` loop's output for ``x (..., d)`` without gradients; ``unit``: the row
        multiple each step's running tokens are padded to (1: exact)."""
        act = self._act[0]
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)  # (n, d)
        n = x2.shape[0]
        graphed = self.graphs and x.is_cuda
        real = active_tokens(lead, x.device)  # (n,) the declared mask's real tokens, or None
        buf = self._buffers(x2) if graphed else self._fresh(x2, real)
        if graphed:
            _reset(buf, x2, real)
        self._run(buf, n, graphed, first=True)
        ran, rows = 1, n
        while ran < act.max_steps:
            live = int(buf.count)  # the one host synchronisation per step
            if live == 0:
                break
            rows = min(-(-live // unit) * unit, rows)
            self._run(buf, rows, graphed, first=False)
            ran += 1
        cost = act.tau * (buf.steps + buf.remainders).mean()
        weights = buf.weights[: ran * n].view(ran, *lead)  # (k, ...)
        result = LoopResult(
            buf.out.view(x.shape), cost, buf.steps.view(lead), buf.remainders.view(lead), weights
        )
        if graphed:  # the buffers are the next call's: hand out copies
            result = LoopResult(*(t.clone() for t in result))
        return result

    def _run(self, buf: _Buffers, rows: int, graphed: bool, first: bool) -> None:
        """One step on ``rows`` rows: replayed if captured; else eager, on the current stream
        the first time (which makes the state buffers and warms the block up), and the second
        time on a side stream, then captured for the next."""
        key = 0 if first else rows  # the first step reads buf.x, the others buf.states
        graph = buf.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        step = self._step_fn(buf, rows, first, declare=not graphed)
        if not graphed or key not in buf.seen:
            buf.seen.add(key)
            step()
            return
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side), _uncached_autocast(buf.x.device):
            step()  # this call's step
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with _uncached_autocast(buf.x.device), torch.cuda.graph(graph, pool=self._pool):
            step()  # recorded, not run
        buf.graphs[key] = graph

    def _step_fn(self, buf: _Buffers, rows: int, first: bool, declare: bool) -> Callable[[], None]:
        """The step on the first ``rows`` rows of ``buf.x`` (``first``) or ``buf.states``,
        as a function of the buffers alone (what a graph records); ``declare``: the rows
        the block's routers count (the running real tokens) declared to it as a token mask
        (not in graphed loops, whose replays record no routing)."""
        act = self._act[0]
        n = buf.out.shape[0]
        last_step = act.max_steps - 1
        threshold = 1 - act.epsilon

        def step() -> None:
            if first:
                s_in, cum = buf.x, buf.cum0  # (n, d), (n,)
            else:
                assert buf.states is not None and buf.cum is not None
                s_in, cum = buf.states[:rows], buf.cum[:rows]  # (b, d), (b,)
            index = buf.index[:rows]  # (b,)
            live = buf.rows[:rows] < buf.count  # (b,) false on the padding
            if declare:  # the rows the block's routers count: not the pads, not padding
                with token_mask(live & buf.real.index_select(0, index), strict=False):
                    s = act.block(s_in)  # (b, d)
            else:
                s = act.block(s_in)
            h = torch.sigmoid(act.act_halt(s)).squeeze(-1)  # (b,)
            h = torch.where(buf.step == last_step, torch.ones_like(h), h)  # all halt last
            total = cum + h  # (b,)
            halts = (total > threshold) & live
            p = torch.where(halts, 1 - cum, h) * live  # (b,) the remainder when halting
            add = torch.where(live[:, None], p[:, None] * s, 0).to(buf.out.dtype)  # (b, d)
            buf.out.index_add_(0, index, add)
            buf.weights.index_add_(0, index + buf.step * n, p.to(buf.weights.dtype))
            buf.steps.index_add_(0, index, live.to(buf.steps.dtype))
            buf.remainders.index_add_(0, index, (p * halts).to(buf.remainders.dtype))
            going = ~halts & live  # (b,)
            order = torch.argsort((~going).to(torch.uint8), stable=True)  # running rows first
            if buf.states is None or buf.cum is None:
                buf.states = s.new_empty(n, s.shape[-1])
                buf.cum = total.new_empty(n)
            buf.states[:rows].copy_(s.index_select(0, order))
            buf.index[:rows].copy_(index.index_select(0, order))
            buf.cum[:rows].copy_(total.index_select(0, order))
            buf.count.copy_(going.sum())
            buf.step.add_(1)

        return step

    def _fresh(self, x2: Tensor, real: Tensor | None = None) -> _Buffers:
        """Buffers for a call on ``x2 (n, d)`` (which becomes ``x``) whose real tokens are
        ``real (n,)`` (``None``: all)."""
        n = x2.shape[0]
        act = self._act[0]
        dev = x2.device
        return _Buffers(
            x=x2,
            real=torch.ones(n, dtype=torch.bool, device=dev) if real is None else real.clone(),
            index=torch.arange(n, device=dev),
            cum0=x2.new_zeros(n),
            count=torch.tensor(n, device=dev),
            step=torch.zeros((), dtype=torch.int64, device=dev),
            rows=torch.arange(n, device=dev),
            out=torch.zeros_like(x2),
            weights=x2.new_zeros(act.max_steps * n),
            steps=x2.new_zeros(n),
            remainders=x2.new_zeros(n),
        )

    def _buffers(self, x2: Tensor) -> _Buffers:
        """The lasting buffers (and graphs) for ``x2``'s shape, dtype and the autocast
        setting; all captured afresh when a parameter or buffer of the module has moved."""
        act = self._act[0]
        signature = tuple(
            (t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*act.parameters(), *act.buffers())
        )
        if signature != self._signature:
            self.reset()
            self._signature = signature
        dev = x2.device.type
        key = (
            tuple(x2.shape),
            x2.dtype,
            x2.device,
            torch.is_autocast_enabled(dev),
            torch.get_autocast_dtype(dev),
            act.max_steps,
            act.epsilon,
        )
        buf = self._cache.get(key)
        if buf is None:
            buf = self._fresh(x2.clone())
            self._cache[key] = buf
        return buf


def _reset(buf: _Buffers, x2: Tensor, real: Tensor | None) -> None:
    """Ready lasting buffers for a new call on ``x2`` whose real tokens are ``real (n,)``
    (``None``: all)."""
    buf.x.copy_(x2)
    if real is None:
        buf.real.fill_(True)
    else:
        buf.real.copy_(real)
    n = x2.shape[0]
    buf.index.copy_(buf.rows)
    for t in (buf.step, buf.out, buf.weights, buf.steps, buf.remainders):
        t.zero_()
    buf.count.fill_(n)


def _uncached_autocast(device: torch.device) -> torch.autocast:
    """The current autocast setting with its cast cache off: a captured graph must not read
    casts that the cache frees when the caller's autocast block ends."""
    dev = device.type
    return torch.autocast(
        dev,
        dtype=torch.get_autocast_dtype(dev),
        enabled=torch.is_autocast_enabled(dev),
        cache_enabled=False,
    )
