"""AdaLoRA in a training loop one does not write: optimiser hooks that add the
orthogonality regulariser's gradients and step the rank budget after every optimiser step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moracl.adapters.adalora.budget import RankAllocator
from moracl.adapters.adalora.module import orth_loss, rank_budget_modules
from moracl.optim.scheduler import MoRAScheduler, Schedule

__all__ = ["RankBudgetHooks"]


class RankBudgetHooks:
    """Drive AdaLoRA's budget from ``optimizer``'s own steps.

    After every completed ``optimizer.step()`` (a post hook, so before the loop clears the
    gradients), a constant-lr :class:`~moracl.optim.MoRAScheduler` with a
    :class:`RankAllocator` steps: the learning rates stay as they are, the budget follows the
    schedule.  A step the optimiser does not finish (a skipped, non-finite step) is not counted.
    :meth:`regularize` adds the orthogonality loss's gradients; call it once per backward pass
    (e.g. where the loop computes the model's outputs).

    Args:
        model: holds the AdaLoRA adapters.
        optimizer: updates them.
        total_steps: the optimiser steps of the whole run.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int
    ) -> None:
        self.model = model
        self.allocator = RankAllocator(model, total_steps=total_steps)
        self.scheduler = MoRAScheduler(
            optimizer,
            total_steps=total_steps,
            schedule=Schedule.CONSTANT,
            rank_allocator=self.allocator,
        )
        self._handles: list[RemovableHandle] = [optimizer.register_step_post_hook(self._after_step)]

    @classmethod
    def attach(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int
    ) -> RankBudgetHooks | None:
        """The hooks when ``model`` has trained AdaLoRA adapters or expert banks, else ``None``."""
        if not rank_budget_modules(model):
            return None
        return cls(model, optimizer, total_steps=total_steps)

    def regularize(self) -> None:
        """Backpropagate :func:`orth_loss` (its gradients add to the task loss's)."""
        orth_loss(self.model).backward()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.scheduler.step()

    def remove(self) -> None:
        """Take the hook off the optimiser (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
