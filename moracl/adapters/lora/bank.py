"""LoRA experts stacked in one bank (registered for mixtures as ``"lora"``).

Shape legend: ``n`` tokens, ``i``/``o`` layer sizes, ``e`` experts, ``r`` rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moracl.adapters.base import ParamRole
from moracl.adapters.fused import fused_enabled
from moracl.adapters.lora.config import LoRAConfig
from moracl.experts.backend import RoutingBackend
from moracl.experts.banks import ExpertBank, register_bank
from moracl.experts.gating import Gating, Routed
from moracl.experts.routed_lora import routed_lora_linear

__all__ = ["LoRABank"]


@register_bank("lora")
class LoRABank(ExpertBank):
    """LoRA experts: ``A (e, r, i)``, ``B (o, e, r)``; ``B`` starts at zero.  One matmul of
    ``x`` into all experts' rank spaces, the gates weighting each expert's slice, one matmul
    back out; in a mixture of this one bank, the frozen layer, the routing and the experts
    run as one node (:mod:`moracl.experts.routed_lora`)."""

    config: LoRAConfig

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, experts: int):
        super().__init__(in_features, out_features, config, experts)
        r = config.rank
        self.lora_A = nn.Parameter(torch.empty(experts, r, in_features))  # (e, r, i)
        self.lora_B = nn.Parameter(torch.zeros(out_features, experts, r))  # (o, e, r)
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = config.scaling

    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        a = rearrange(self.lora_A, "e r i -> (e r) i")
        z = F.linear(x, a.to(x.dtype)) * self.scaling  # (n, i) -> (n, e·r)
        z = z.unflatten(1, (self.num_experts, -1)) * gates[..., None].to(z.dtype)  # (n, e, r)
        b = rearrange(self.lora_B, "o e r -> o (e r)")
        return F.linear(z.flatten(1), b.to(z.dtype))  # (n, e·r) -> (n, o)

    def fuses(self, x: Tensor) -> bool:
        # a learn2learn clone holds computed tensors, not parameters: plain autograd for it
        return fused_enabled(self.lora_A, self.lora_B)

    def routed_linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        r: Sequence[Tensor],
        gating: Gating,
        backend: RoutingBackend,
    ) -> tuple[Tensor, Routed]:
        a, b = self.lora_A, self.lora_B  # (e, r, i), (o, e, r): the node flattens them
        return routed_lora_linear(x, weight, bias, a, b, r, self.scaling, gating)

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        return F.linear(F.linear(x, self.lora_A[expert]), self.lora_B[:, expert]) * self.scaling

    def expert_weight(self, expert: int) -> Tensor:
        return self.scaling * self.lora_B[:, expert] @ self.lora_A[expert]

    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        return self.lora_A[expert], self.lora_B[:, expert] * self.scaling  # (r, i), (o, r)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_B": ParamRole.B}
