"""LoRA's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moracl.adapters.base import AdapterConfig


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation (Hu et al. 2021): ``ΔW = s · B A`` with ``A (r × i)``, ``B (o × r)``.

    Args:
        alpha: the scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        rslora: rank-stabilised scaling (Kalajdzievski 2023).
        freeze_a: LoRA-FA, keep ``A`` at its random initialisation and train ``B`` only.
    """

    kind: str = "lora"
    alpha: float = 8.0
    rslora: bool = False
    freeze_a: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")

    @property
    def scaling(self) -> float:
        """The factor ``s`` in ``ΔW = s · B A``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
