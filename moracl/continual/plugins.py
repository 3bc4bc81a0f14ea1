"""Avalanche plugins and strategy variants moracl's runs need: replay whose buffer is a
function of a seed (so a resumed run rebuilds it exactly), and joint training on the lean
template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.supervised import JointTraining

from moracl.continual.strategy import FastTemplate, derive_seed

__all__ = ["FastJoint", "SeededReplayPlugin"]


class SeededReplayPlugin(ReplayPlugin):
    """Avalanche's experience-balanced replay; the buffer update after experience ``i``
    draws from its own generator seeded by ``(seed, i)``, so the buffer after any experience
    can be rebuilt from the stream alone (:meth:`rebuild`).

    Reads ``strategy.experience``; writes ``strategy.dataloader`` (Avalanche's replay loader).
    """

    def __init__(self, mem_size: int, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(mem_size=mem_size, **kwargs)
        self.seed = seed

    def _update(self, strategy: Any, experience: Any) -> None:
        policy: Any = self.storage_policy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "replay", experience.current_experience))
            policy.post_adapt(strategy, experience)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._update(strategy, strategy.experience)

    def rebuild(self, strategy: Any, experiences: Sequence[Any]) -> None:
        """The buffer as it was after training on ``experiences`` (in order)."""
        from avalanche.training.storage_policy import ExperienceBalancedBuffer

        self.storage_policy = ExperienceBalancedBuffer(max_size=self.mem_size, adaptive_size=True)
        for exp in experiences:
            self._update(strategy, exp)


class FastJoint(FastTemplate, JointTraining):  # type: ignore[misc]
    """Joint training (all experiences at once: the upper reference) on the lean template."""
