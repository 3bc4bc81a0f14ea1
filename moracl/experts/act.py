"""Adaptive computation time (Graves 2016) around a block applied repeatedly.

``s_1 = block(x)``, ``s_{k+1} = block(s_k)``; after each step a halting unit gives every token
``h_k = σ(w · s_k + b)``.  A token halts at the first step ``N`` where ``Σ_{k≤N} h_k ≥ 1 − ε``
(at the latest at ``max_steps``); its output is ``Σ_k p_k s_k`` with ``p_k = h_k`` before ``N``
and the remainder ``p_N = R = 1 − Σ_{k<N} h_k``; the ponder cost is ``τ · (N + R)``.

Training uses the fixed-maximum masked form (``max_steps`` block calls, static shapes, so it
runs under ``vmap`` and ``torch.compile``); in eval mode the loop stops once every token has
halted, which gives the same result.  Shape legend: ``n`` tokens (leading dims), ``d`` features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ACTOutput", "AdaptiveComputation"]


@dataclass(frozen=True)
class ACTOutput:
    """Attributes:
    output: ``(..., d)`` the halting-weighted sum of the step outputs.
    ponder_cost: ``()`` ``τ · mean(N + R)``, to add to the loss.
    steps: ``(...)`` ``N`` per token (float).
    remainders: ``(...)`` ``R`` per token.
    weights: ``(k, ...)`` the halting weights ``p`` of the steps run (sum to 1 per token).
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

    Args:
        block: the module to repeat (a mixture layer, a stack of them, ...).
        features: ``d``.
        max_steps: the most steps a token can take (>= 1).
        epsilon: halt once the cumulative halting probability reaches ``1 − epsilon``.
        tau: weight of the ponder cost.
        halt_bias: initial bias of the halting unit (positive: few steps at the start).
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
        self._register_state_dict_hook(_strip_block_prefix)
        self._register_load_state_dict_pre_hook(_add_block_prefix)

    def forward(self, x: Tensor) -> ACTOutput:
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
            if not self.training and not torch.compiler.is_compiling() and not running.any():
                break
        cost = self.tau * (steps + remainders).mean()
        return ACTOutput(out, cost, steps, remainders, torch.stack(weights))


def _strip_block_prefix(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "block.")]:
        state[prefix + key[len(prefix) + len("block.") :]] = state.pop(key)


def _add_block_prefix(state: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in list(state):
        if key.startswith(prefix) and not key.startswith(prefix + "act_halt."):
            rest = key[len(prefix) :]
            if not rest.startswith("block."):
                state[prefix + "block." + rest] = state.pop(key)
