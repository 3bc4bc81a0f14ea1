"""DoRA's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from moracl.adapters.lora.config import LoRAConfig


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """Weight-decomposed LoRA (Liu et al. 2024): magnitude ``m (o)`` times the direction of
    ``W + s · B A``; the LoRA options (``alpha``, ``rslora``, ``freeze_a``) apply to the
    direction's update."""

    kind: str = "dora"
