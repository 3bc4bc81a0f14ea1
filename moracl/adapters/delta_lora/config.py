"""Delta-LoRA's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_int, check_number


@dataclass(frozen=True)
class DeltaLoRAConfig(AdapterConfig):
    """Delta-LoRA (Zi et al. 2023): LoRA, ``ΔW = s · B A`` with ``s = alpha / r``, whose frozen
    weight also moves: after optimiser step ``t`` (counted from 1), for ``t > start_step``,
    ``W ← W + update_ratio · (s · B_t A_t − s · B_{t-1} A_{t-1})``, the change of the low-rank
    product over that step (the paper's ``W += λ · Δ(AB)``; the step hook is
    :class:`~moracl.adapters.delta_lora.DeltaLoRAUpdater`).

    As in the paper the low-rank branch has no dropout (so that ``∂L/∂(BA)`` is the gradient
    ``W`` would get): ``dropout`` must stay 0.

    Args:
        alpha: the scaling numerator; ``s = alpha / r``.
        update_ratio: ``λ >= 0``, the share of each step's change of ``s · B A`` added to ``W``
            (0 gives plain LoRA).
        start_step: ``K >= 0``; the first ``K`` optimiser steps leave ``W`` unchanged (the paper
            trains plain LoRA for ``K`` steps first).
    """

    kind: str = "delta_lora"
    alpha: float = 8.0
    update_ratio: float = 0.5
    start_step: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout != 0:
            raise ValueError(
                f"delta_lora trains without dropout (so that B A's gradient is the frozen "
                f"weight's, as the paper does), got dropout={self.dropout!r}; expected 0"
            )
        check_number("alpha", self.alpha, gt=0)  # finite, > 0
        check_number("update_ratio", self.update_ratio, ge=0)  # finite, >= 0
        check_int("start_step", self.start_step, ge=0)

    @property
    def scaling(self) -> float:
        """The factor ``s`` in ``ΔW = s · B A``."""
        return self.alpha / self.rank
