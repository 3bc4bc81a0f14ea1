"""Adaptive computation time (Graves 2016) around a block applied repeatedly.

``s_1 = block(x)``, ``s_{k+1} = block(s_k)``; after each step a halting unit gives every token
``h_k = σ(w · s_k + b)``.  A token halts at the first step ``N`` where ``Σ_{k≤N} h_k ≥ 1 − ε``
(at the latest at ``max_steps``); its output is ``Σ_k p_k s_k`` with ``p_k = h_k`` before ``N``
and the remainder ``p_N = R = 1 − Σ_{k<N} h_k``; the ponder cost is ``τ · (N + R)``.

Three loops compute this same function (:class:`ACTLoop`):

- ``masked``: ``max_steps`` block calls on every token, a halted token's later steps weighted
  0 (static shapes: runs under ``vmap``, ``torch.compile`` and CUDA graphs); the default in
  training;
- ``batch``: the same on the whole batch, stopping once every token has halted (one slow token
  makes the batch pay for all its steps);
- ``token``: after each step the block runs on the still-running tokens only (gathered, and
  their results scattered back), so the cost follows the mean number of steps, not the
  maximum; the default at inference.  It needs a *row-independent* block — one whose output
  for a token depends on that token's input alone (an MLP, a mixture layer routing per token,
  a norm over features) — and its data-dependent shapes synchronise with the host once per
  step.  A block that mixes tokens (attention, routing per sample, batch norm) needs
  ``masked`` or ``batch``.  Without gradients (inference) it runs on fixed buffers
  (:mod:`moracl.experts.act_static`), each step optionally one CUDA graph
  (``cuda_graphs=True``).

Gradients agree too: in the masked form a halted token's later steps carry weight 0, which is
what leaving them out computes.  Shape legend: ``n`` tokens (leading dims), ``m`` the tokens
still running, ``k`` steps run, ``d`` features.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from moracl.experts.act_static import TokenLoop
from moracl.experts.mixture import Mixture
from moracl.experts.per_sample import active_tokens, token_mask

__all__ = ["ACTLoop", "ACTOutput", "AdaptiveComputation"]


class ACTLoop(str, Enum):
    """How :class:`AdaptiveComputation` runs its steps (see the module docstring); str-valued,
    so ``"token"`` works wherever a member does."""

    MASKED = "masked"
    BATCH = "batch"
    TOKEN = "token"

    @classmethod
    def parse(cls, value: Any, name: str = "loop") -> ACTLoop:
        """``value`` (a member or its string) as a member; else ``ValueError`` naming it."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{name} must be one of {[m.value for m in cls]}, got {value!r}"
            ) from None


@dataclass(frozen=True)
class ACTOutput:
    """Attributes:
    output: ``(..., d)`` the halting-weighted sum of the step outputs.
    ponder_cost: ``()`` ``τ · mean(N + R)``, to add to the loss.
    steps: ``(...)`` ``N`` per token (float).
    remainders: ``(...)`` ``R`` per token.
    weights: ``(k, ...)`` the halting weights ``p`` of the steps run (sum to 1 per token;
        0 after a token halted).
    """

    output: Tensor
    ponder_cost: Tensor
    steps: Tensor
    remainders: Tensor
    weights: Tensor

    @property
    def mean_steps(self) -> Tensor:
        return self.steps.mean()


class AdaptiveComputation(nn.Module):
    """Repeat ``block`` (``(..., d) -> (..., d)``) under a halting unit.

    The wrapper's state dict has the block's own keys (plus ``act_halt.weight`` and
    ``act_halt.bias``), so a block's checkpoint loads into its wrapped form and back.

    >>> act = AdaptiveComputation(nn.Linear(8, 8), features=8, max_steps=4).eval()
    >>> act(torch.randn(5, 8)).output.shape  # the ``token`` loop at inference
    torch.Size([5, 8])

    Args:
        block: the module to repeat (a mixture layer, a stack of them, ...).
        features: ``d``.
        max_steps: the most steps a token can take (>= 1).
        epsilon: halt once the cumulative halting probability reaches ``1 − epsilon``.
        tau: weight of the ponder cost.
        halt_bias: initial bias of the halting unit (positive: few steps at the start).
        training_loop: the :class:`ACTLoop` in training mode (default ``masked``).
        inference_loop: the :class:`ACTLoop` in eval mode (default ``token``: valid for
            row-independent blocks only; ``batch`` for a block that mixes tokens).
        shape_buckets: the ``token`` loop pads the running tokens to a multiple of
            ``ceil(n / shape_buckets)`` rows (repeating a running token's state with zero
            weight; outputs, weights, steps and gradients are unchanged, and the pad rows
            are declared masked to the block's layers, so that routers' auxiliary losses
            count the running tokens only, as under a token mask), so that the block
            sees at most ``shape_buckets`` distinct shapes: on a GPU each new shape costs
            cuBLAS host time (0.5-2.6 ms a matmul, H100) and a CUDA graph or compiled
            kernel of its own.  ``None`` (default): 32 on CUDA, exact sizes elsewhere;
            ``0``: exact sizes.
        cuda_graphs: at inference without gradients on CUDA, replay each step of the
            ``token`` loop as a CUDA graph (one per bucket of running tokens, captured the
            second time it is needed; see :mod:`moracl.experts.act_static`): a step then
            costs one replay and one read of the running count instead of the launches of
            the block and the bookkeeping.  After changing what the block computes without
            moving a parameter (its active adapters, a router's settings) call
            :meth:`reset_graphs`.

    Raises:
        ValueError: a bad ``max_steps``, ``epsilon``, ``tau``, ``cuda_graphs`` or loop name, or
            the ``token`` loop around a mixture that routes whole samples (it mixes tokens).
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        features: int,
        max_steps: int,
        epsilon: float = 0.01,
        tau: float = 0.01,
        halt_bias: float = 1.0,
        training_loop: ACTLoop | str = ACTLoop.MASKED,
        inference_loop: ACTLoop | str = ACTLoop.TOKEN,
        shape_buckets: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau!r}")
        self.block = block
        self.act_halt = nn.Linear(features, 1)
        nn.init.zeros_(self.act_halt.weight)
        nn.init.constant_(self.act_halt.bias, halt_bias)
        self.max_steps, self.epsilon, self.tau = max_steps, epsilon, tau
        if shape_buckets is not None and (
            isinstance(shape_buckets, bool)
            or not isinstance(shape_buckets, int)
            or shape_buckets < 0
        ):
            raise ValueError(
                f"shape_buckets must be None or an integer >= 0, got {shape_buckets!r}"
            )
        self.shape_buckets = shape_buckets
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        self._inference = TokenLoop(self, graphs=cuda_graphs)
        self.training_loop = self._checked(training_loop, "training_loop")
        self.inference_loop = self._checked(inference_loop, "inference_loop")
        self._register_state_dict_hook(_strip_block_prefix)
        self._register_load_state_dict_pre_hook(_add_block_prefix)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the ``token`` loop replays its steps as CUDA graphs at inference."""
        return self._inference.graphs

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (the next call at inference captures afresh)."""
        self._inference.reset()

    def _checked(self, loop: ACTLoop | str, name: str) -> ACTLoop:
        """``loop`` parsed; the ``token`` loop refused around a block known to mix tokens."""
        loop = ACTLoop.parse(loop, name)
        if loop is ACTLoop.TOKEN:
            for path, module in self.block.named_modules():
                if isinstance(module, Mixture) and module.per_sample:
                    raise ValueError(
                        f"{name}='token' runs the block on a subset of the tokens, but the "
                        f"mixture at {path or 'the block'!r} routes whole samples (it mixes "
                        "tokens); expected 'masked' or 'batch' for this block"
                    )
        return loop

    def forward(self, x: Tensor, *, loop: ACTLoop | str | None = None) -> ACTOutput:
        """The ACT output for ``x (..., d)``.

        Args:
            loop: this call's :class:`ACTLoop` (default: ``training_loop`` in training mode,
                ``inference_loop`` in eval mode).
        """
        if loop is None:
            chosen = self.training_loop if self.training else self.inference_loop
        else:
            chosen = self._checked(loop, "loop")
        if chosen is ACTLoop.TOKEN:
            if not torch.is_grad_enabled():  # fixed buffers, optionally CUDA graphs
                return ACTOutput(*self._inference(x, self._bucket(x.shape[:-1].numel(), x.device)))
            return self._token_loop(x)
        return self._whole_batch(x, stop_early=chosen is ACTLoop.BATCH)

    def _whole_batch(self, x: Tensor, *, stop_early: bool) -> ACTOutput:
        """The masked form: every token through every step (until all halted if
        ``stop_early``)."""
        lead = x.shape[:-1]
        cum = x.new_zeros(lead)  # Σ h of the steps taken so far
        remainders = x.new_zeros(lead)
        steps = x.new_zeros(lead)
        running = x.new_ones(lead)  # 1 while a token has not halted
        out = torch.zeros_like(x)
        weights = []
        s = x
        for k in range(self.max_steps):
            s = self.block(s)  # (..., d)
            h = torch.sigmoid(self.act_halt(s)).squeeze(-1)  # (...)
            if k == self.max_steps - 1:
                h = torch.ones_like(h)  # everyone halts at the last step
            halts = (cum + h * running > 1 - self.epsilon).to(x.dtype) * running
            going = running - halts
            r = halts * (1 - cum)  # the remainder of the tokens halting now
            p = h * going + r  # (...)
            out = out + p[..., None] * s
            weights.append(p)
            cum = cum + h * going
            remainders = remainders + r
            steps = steps + running
            running = going
            if stop_early and not torch.compiler.is_compiling() and not running.any():
                break
        cost = self.tau * (steps + remainders).mean()
        return ACTOutput(out, cost, steps, remainders, torch.stack(weights))

    def _bucket(self, n: int, device: torch.device) -> int:
        """The row multiple the ``token`` loop pads the running tokens to (1: exact)."""
        buckets = self.shape_buckets
        if buckets is None:
            buckets = 32 if device.type == "cuda" else 0
        return -(-n // buckets) if buckets > 0 else 1

    def _token_loop(self, x: Tensor) -> ACTOutput:
        """Each step on the still-running tokens only: gather, run the block, add the
        halting-weighted states into the output.  Between steps only what the next step
        needs is computed (the halting test, the output update and the gather: one host
        sync, to size the next step); the per-token weights, steps and remainders are
        scattered once, after the last step.  The gathered rows are padded to a multiple
        of :meth:`_bucket` with copies of a running token (``live`` false: zero weight,
        never halting, not counted)."""
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)  # (n, d)
        n = x2.shape[0]
        unit = self._bucket(n, x.device)
        out = torch.zeros_like(x2)  # (n, d)
        idx = torch.arange(n, device=x.device)  # (m,) the running tokens (and pads)
        cum = x2.new_zeros(n)  # (m,) their Σ h so far
        s = x2  # (m, d) their states
        live: Tensor | None = None  # (m,) bool, false on pad rows; None: no pads
        real = active_tokens(lead, x.device)  # (n,) the declared mask's real tokens, or None
        slots, probs, halted, counted = [], [], [], []  # per step, (m,) each
        for k in range(self.max_steps):
            with _rows_mask(real, idx, live):
                s = self.block(s)  # (m, d)
            h = torch.sigmoid(self.act_halt(s)).squeeze(-1)  # (m,)
            last = k == self.max_steps - 1
            if last:
                h = torch.ones_like(h)
            total = cum + h  # (m,)
            halts = total > 1 - self.epsilon  # (m,) bool
            p = torch.where(halts, 1 - cum, h)  # (m,) the remainder for the tokens halting now
            if live is not None:
                p, halts = p * live, halts & live
            out.index_add_(0, idx, (p[:, None] * s).to(out.dtype))  # (n, d)
            slots.append(idx + k * n)
            probs.append(p)
            halted.append(halts)
            counted.append(torch.ones_like(p) if live is None else live.to(p.dtype))
            if last:
                break
            going = ~halts if live is None else ~halts & live
            keep = torch.nonzero(going).squeeze(1)  # (m',): one host sync per step
            kept = keep.numel()
            if kept == 0:
                break
            rows = min(-(-kept // unit) * unit, idx.numel())  # a bucket size (or this step's)
            live = None
            if rows > kept:
                keep = torch.cat([keep, keep[:1].expand(rows - kept)])
                live = torch.arange(rows, device=x.device) < kept
            idx, s, cum = idx[keep], s[keep], total[keep]  # (m',) (m', d) (m',)
        steps_run = len(probs)
        slot, prob = torch.cat(slots), torch.cat(probs)  # (Σm,)
        token = slot % n  # (Σm,)
        weights = x2.new_zeros(steps_run * n).index_add_(0, slot, prob)  # (k·n,)
        steps = x2.new_zeros(n).index_add_(0, token, torch.cat(counted))  # (n,)
        remainders = x2.new_zeros(n).index_add_(0, token, prob * torch.cat(halted))  # (n,)
        cost = self.tau * (steps + remainders).mean()
        stacked = weights.view(steps_run, *lead)  # (k, ...)
        return ACTOutput(out.view(x.shape), cost, steps.view(lead), remainders.view(lead), stacked)


def _rows_mask(
    real: Tensor | None, idx: Tensor, live: Tensor | None
) -> AbstractContextManager[None]:
    """The rows a step of the ``token`` loop runs, ``idx (m,)`` (pad rows repeat a running
    token), declared to the block's layers as a token mask: the real tokens among them
    (``real (n,)``, the caller's mask) and not the pads (``live (m,)`` false).  Routers'
    auxiliary losses then count the running tokens, whatever the bucket size; nothing is
    declared when every row counts."""
    rows = None if real is None else real[idx]
    if live is not None:
        rows = live if rows is None else rows & live
    return nullcontext() if rows is None else token_mask(rows, strict=False)


def _strip_block_prefix(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "block.")]:
        state[prefix + key[len(prefix) + len("block.") :]] = state.pop(key)


def _add_block_prefix(state: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in list(state):
        if key.startswith(prefix) and not key.startswith(prefix + "act_halt."):
            rest = key[len(prefix) :]
            if not rest.startswith("block."):
                state[prefix + "block." + rest] = state.pop(key)
