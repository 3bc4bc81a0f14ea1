"""Expert banks: experts of one kind stored as stacked parameters, combined by their gates.

Shape legend: ``n`` tokens, ``i``/``o`` layer sizes, ``e`` experts in the bank, ``r`` rank
(``r̂`` for MoRA).  Every bank computes ``Σ_e gates[:, e] · delta_e(x)`` without a loop over
experts or any token dispatch: one matmul of ``x`` into all experts' rank spaces, the gates
zeroing (and weighting) each expert's slice, one matmul back out.  ``expert_delta`` is the
plain per-expert update, for references and tests only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moracl.adapters.base import AdapterConfig, ParamRole
from moracl.adapters.lora.config import LoRAConfig
from moracl.adapters.mora.config import Compression, MoRAConfig, square_size
from moracl.adapters.mora.operators import Sharing

__all__ = ["BANKS", "ExpertBank", "LoRABank", "MoRABank", "build_bank"]


class ExpertBank(nn.Module, ABC):
    """``e`` experts of one adapter kind on an ``i -> o`` layer."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, experts: int):
        super().__init__()
        if not isinstance(experts, int) or experts <= 0:
            raise ValueError(f"a bank needs a positive number of experts, got {experts!r}")
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.num_experts = experts
        self.frozen = False

    @abstractmethod
    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        """``x (n, i)``, ``gates (n, e)`` -> ``Σ_e gates[:, e] · delta_e(x)``: ``(n, o)``."""

    @abstractmethod
    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        """One expert's update ``(n, i) -> (n, o)`` (the naive reference)."""

    @abstractmethod
    def expert_weight(self, expert: int) -> Tensor:
        """One expert's dense update ``(o × i)``."""

    @abstractmethod
    def param_roles(self) -> dict[str, ParamRole]: ...


class LoRABank(ExpertBank):
    """LoRA experts: ``A (e, r, i)``, ``B (o, e, r)``; ``B`` starts at zero."""

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

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        return F.linear(F.linear(x, self.lora_A[expert]), self.lora_B[:, expert]) * self.scaling

    def expert_weight(self, expert: int) -> Tensor:
        return self.scaling * self.lora_B[:, expert] @ self.lora_A[expert]

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_B": ParamRole.B}


class MoRABank(ExpertBank):
    """MoRA-sharing experts: one shared compression ``(n, i) -> (n, r̂)`` computed once, the
    experts' square matrices ``M (e, r̂, r̂)`` mixed in the compressed space, one tiling out."""

    config: MoRAConfig

    def __init__(self, in_features: int, out_features: int, config: MoRAConfig, experts: int):
        super().__init__(in_features, out_features, config, experts)
        if config.compression is not Compression.SHARING:
            raise ValueError(
                f"MoRA experts in a mixture use compression 'sharing', got "
                f"{config.compression.value!r}"
            )
        self.r_hat = square_size(in_features, out_features, config.rank, config.compression)
        self.M = nn.Parameter(torch.zeros(experts, self.r_hat, self.r_hat))  # (e, r̂, r̂)
        self.op = Sharing(in_features, out_features, self.r_hat)

    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        c = F.linear(x, self.op.compress.to(x.dtype))  # shared by all experts: (n, r̂)
        m = rearrange(self.M, "e s r -> (e s) r")
        z = F.linear(c, m.to(c.dtype)).unflatten(1, (self.num_experts, -1))  # (n, e, r̂)
        z = (z * gates[..., None].to(z.dtype)).sum(1)  # (n, r̂)
        return F.linear(z, self.op.decompress.to(z.dtype))  # (n, o)

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        z, up = self.op.factors(x, self.M[expert])
        return F.linear(z, up.to(z.dtype))

    def expert_weight(self, expert: int) -> Tensor:
        eye = torch.eye(self.in_features, dtype=self.M.dtype, device=self.M.device)
        return self.expert_delta(eye, expert).T

    def param_roles(self) -> dict[str, ParamRole]:
        return {"M": ParamRole.SQUARE}


BANKS: dict[str, type[ExpertBank]] = {"lora": LoRABank, "mora": MoRABank}


def build_bank(
    in_features: int, out_features: int, config: AdapterConfig, experts: int
) -> ExpertBank:
    """The bank for ``config.kind``; kinds without a stacked form raise ``ValueError``."""
    cls = BANKS.get(config.kind)
    if cls is None:
        raise ValueError(
            f"adapter kind {config.kind!r} cannot be a mixture expert; expected one of "
            f"{sorted(BANKS)}"
        )
    return cls(in_features, out_features, config, experts)  # type: ignore[arg-type]
