"""VeRA's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_int, check_number


@dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """Vector-based random matrix adaptation (Kopiczko et al. 2024):
    ``ΔW = diag(λ_b) B diag(λ_d) A`` with frozen random ``A (r × i)``, ``B (o × r)`` shared by
    every layer of the same shape (regenerated from ``projection_seed``, never trained or saved)
    and trainable scaling vectors ``λ_d (r)`` (starts at ``d_initial``) and ``λ_b (o)`` (starts
    at 0).  VeRA wants a much larger rank than LoRA for the same quality (e.g. 256).
    """

    kind: str = "vera"
    projection_seed: int = 0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("projection_seed", self.projection_seed, ge=0)
        check_number("d_initial", self.d_initial)  # finite
