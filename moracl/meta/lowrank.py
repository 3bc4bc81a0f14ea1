"""Factored inner-loop updates of full ``nn.Linear`` weights, for :meth:`MAML.meta_loss`.

An SGD step on a linear layer ``y = x Wᵀ + b`` moves its weight by ``−lr · δᵀ h``, where
``h (r, d_in)`` are the layer's inputs on the support set (``r`` rows: support examples times
any token dimensions) and ``δ = ∂L/∂y (r, d_out)``. After ``k`` steps

    W_k = W − lr · Σ_j δ_jᵀ h_j = W + Dᵀ H,
    H = cat_j h_j (k·r, d_in),   D = cat_j (−lr · δ_j) (k·r, d_out),

a matrix of rank ``≤ k·r``. The dense inner loop materialises ``W_k`` for every task (``t``
copies of ``d_out × d_in``, and as many in the backward pass); the factored one keeps the
shared ``W`` (one matmul over all tasks' examples) and adds ``(x Hᵀ) D`` per task, which costs
``k·r·(d_in + d_out)`` multiply-adds per example instead of ``d_in · d_out``. It is the same
function of the meta-parameters, so second-order meta-gradients are unchanged.

``δ`` is obtained by differentiating the support loss with respect to a zero *probe* added to
the layer's output (``∂L/∂probe = ∂L/∂y``), next to the other adapted parameters.

Shapes: ``r`` rows of a layer's input on one task's support set, ``k`` inner steps so far,
``d_in`` / ``d_out`` the layer's features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FactoredLinears", "LinearUpdate", "linear_candidates"]

Factors = dict[str, tuple[Tensor, Tensor]]
"""``weight name -> (H (k·r, d_in), D (k·r, d_out))``, the update ``ΔW = Dᵀ H``."""


class LinearUpdate(str, Enum):
    """How :meth:`MAML.meta_loss` updates an adapted ``nn.Linear`` weight in the inner loop."""

    DENSE = "dense"
    """``W − lr · G`` per task: a weight-sized copy for every task and step."""
    FACTORED = "factored"
    """The shared ``W`` plus the per-task factors ``Dᵀ H`` (module docstring); needs a scalar
    inner learning rate and a layer called once per forward."""
    AUTO = "auto"
    """On CPU, factored where it costs fewer multiply-adds: ``k·r·(d_in + d_out) <
    d_in · d_out`` with ``k·r`` the final rank (inner steps times support rows); on CUDA,
    dense (weight copies run at memory bandwidth there and measured faster)."""


def _plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def linear_candidates(
    model: nn.Module,
    inner_names: tuple[str, ...],
    step_sizes: dict[str, Tensor | float],
    strategy: LinearUpdate,
    max_rank: int,
) -> dict[str, nn.Linear]:
    """``weight name -> module`` for the adapted ``nn.Linear`` weights that may be factored.

    ``max_rank`` is a lower bound of the final rank ``k·r`` (inner steps times support
    examples); :attr:`LinearUpdate.AUTO` drops the layers for which even it is too high.
    """
    if strategy is LinearUpdate.DENSE or max_rank < 1:
        return {}
    inner = set(inner_names)
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        name = f"{path}.weight" if path else "weight"
        if (
            not _plain_linear(module)
            or name not in inner
            or not isinstance(step_sizes[name], float)
        ):
            continue
        assert isinstance(module, nn.Linear)
        d_out, d_in = module.weight.shape
        if strategy is LinearUpdate.AUTO and max_rank * (d_in + d_out) >= d_in * d_out:
            continue
        found[name] = module
    return found


class FactoredLinears:
    """Forward hooks that add ``(x Hᵀ) D`` (and, while probing, a zero probe) to the outputs
    of the chosen layers; the caller sets the per-forward state with :meth:`use`.

    Args:
        modules: ``weight name -> nn.Linear`` (see :func:`linear_candidates`).
        rows: ``weight name -> r``, the rows of the layer's input on one task's support set
            (the shape of its probe is ``(r, d_out)``).
    """

    def __init__(self, modules: dict[str, nn.Linear], rows: dict[str, int]) -> None:
        self.modules = modules
        self.rows = rows
        self._factors: Factors = {}
        self._probes: dict[str, Tensor] | None = None
        self._inputs: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}

    @contextmanager
    def hooked(self) -> Iterator[FactoredLinears]:
        """The hooks are registered for the duration of the block and removed on exit."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def use(
        self, factors: Factors, probes: dict[str, Tensor] | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """Run forwards with ``factors`` applied; with ``probes`` (``name -> (r, d_out)``
        zeros) also add them and collect each layer's input ``h (r, d_in)`` into the dict
        that is yielded."""
        inputs: dict[str, Tensor] = {}
        self._factors, self._probes, self._inputs = factors, probes, inputs
        try:
            yield inputs
        finally:
            self._factors, self._probes, self._inputs = {}, None, {}

    def input_rows(self, forward: Any, x: Tensor) -> dict[str, int]:
        """``name -> r``, the rows of each layer's input when ``forward(x)`` runs once,
        for the layers called exactly once (the others cannot be factored this way)."""
        self._calls = {}
        with self.use({}, {}) as inputs, torch.no_grad():  # no probes: record inputs only
            forward(x)
            rows = {n: h.shape[0] for n, h in inputs.items() if self._calls.get(n) == 1}
        self._calls = {}
        return rows

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            x = args[0]
            self._calls[name] = self._calls.get(name, 0) + 1
            if name in self._factors:
                h_all, d_all = self._factors[name]  # (k·r, d_in), (k·r, d_out)
                flat = x.reshape(-1, x.shape[-1])  # (n, d_in)
                out = out + ((flat @ h_all.mT) @ d_all).reshape(out.shape)  # (n, k·r) -> (n, d_out)
            if self._probes is not None:
                self._inputs[name] = x.reshape(-1, x.shape[-1])  # (r, d_in)
                if name in self._probes:
                    out = out + self._probes[name].reshape(out.shape)
            return out

        return hook
