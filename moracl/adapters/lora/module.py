"""LoRA: ``delta(x) = s · (x Aᵀ) Bᵀ`` computed in the rank space.

Shapes: ``x (..., i)``, ``A (r × i)``, ``B (o × r)``, ``z = s · x Aᵀ (..., r)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moracl.adapters.base import Adapter, ParamRole, linear
from moracl.adapters.fused import lora_linear
from moracl.adapters.lora.config import LoRAConfig


class LoRA(Adapter):
    """Low-rank update with a zero-initialised ``B`` (so the adapted layer starts unchanged)."""

    config: LoRAConfig

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features))  # (r, i)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))  # (o, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default
        self.lora_A.requires_grad_(not config.freeze_a)
        self.scaling = config.scaling

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.project(self._input(x, self.lora_A.dtype)), self.lora_B

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        if self.training and self.config.dropout > 0:
            return None
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling)

    def project(self, x: Tensor) -> Tensor:
        """``s · x Aᵀ``: ``(..., i) -> (..., r)``, on an input already through dropout."""
        return linear(x, self.lora_A) * self.scaling

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        z, up = self.factors(x)
        return linear(z, up)  # (..., r) -> (..., o)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (o, i)

    def is_trainable(self, name: str) -> bool:
        return not (name == "lora_A" and self.config.freeze_a)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_B": ParamRole.B}
