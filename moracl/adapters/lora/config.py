"""LoRA's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_number


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
        check_number("alpha", self.alpha, gt=0)  # finite, > 0
        for name in ("rslora", "freeze_a"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        """The factor ``s`` in ``ΔW = s · B A``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
