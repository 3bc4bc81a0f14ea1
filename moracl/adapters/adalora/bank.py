"""AdaLoRA experts stacked in one bank (registered for mixtures as ``"adalora"``): each expert
an SVD-form update ``P_e Λ_e Q_e`` whose singular triplets the rank budget switches off, so the
experts of a mixture may end at different ranks.

Shape legend: ``n`` tokens, ``i``/``o`` layer sizes, ``e`` experts, ``r`` the initial rank.
Right singular vectors ``A (e, r, i)``, singular values ``E (e, r, 1)``, left singular vectors
``B (o, e, r)``, the rank mask ``m (e, r)``.  Each expert is initialised as a single
:class:`~moracl.adapters.adalora.AdaLoRA` adapter is (:func:`init_triplets`; by default
PEFT's ``SVDLinear``: ``E = 0``, ``A, B ~ N(0, 0.02²)``), scaling ``s = alpha / (r + 1e-5)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moracl.adapters.adalora.config import AdaLoRAConfig, AdaLoRAInit
from moracl.adapters.base import ParamRole
from moracl.experts.banks import ExpertBank, register_bank

__all__ = ["AdaLoRABank", "init_triplets"]


@torch.no_grad()
def init_triplets(lora_A: Tensor, lora_E: Tensor, lora_B: Tensor, init: AdaLoRAInit) -> None:
    """Initialise triplets in place so that ``ΔW = 0``: right singular vectors
    ``lora_A (..., r, i)``, singular values ``lora_E (..., r, 1)``, left singular vectors
    ``lora_B (o, ..., r)`` (``...`` an expert axis or none).

    ``peft``: ``E = 0``, ``A`` then ``B`` drawn from ``N(0, 0.02²)`` (PEFT's order of draws).
    ``lora``: each ``A`` with orthonormal rows (``nn.init.orthogonal_``), ``E = 1``, ``B = 0``.
    """
    if init is AdaLoRAInit.PEFT:
        lora_E.zero_()
        nn.init.normal_(lora_A, mean=0.0, std=0.02)
        nn.init.normal_(lora_B, mean=0.0, std=0.02)
        return
    for a in lora_A.view(-1, *lora_A.shape[-2:]).unbind():  # (r, i) each
        nn.init.orthogonal_(a)
    lora_E.fill_(1.0)
    lora_B.zero_()


@register_bank("adalora")
class AdaLoRABank(ExpertBank):
    """AdaLoRA experts: ``ΔW_e = s · B_e (E_e ⊙ m_e) A_e``; every ``ΔW_e`` starts at zero.

    One matmul of ``x`` into all experts' rank spaces, the gates weighting each expert's
    slice, one matmul back out (as :class:`~moracl.adapters.lora.LoRABank`, with the singular
    values and the mask folded into ``A``).  A
    :class:`~moracl.adapters.adalora.RankAllocator` scores each expert's triplets in the same
    global budget as single AdaLoRA adapters (a triplet is one ``(layer, expert, k)``), zeroes
    the singular values of the least important ones while the budget falls and, at its final
    allocation, sets ``rank_mask (e, r)``: each expert keeps its own surviving rank.  A frozen
    bank (an earlier experience's experts) is outside every budget.

    No routed node: the routed LoRA node has no place for ``E ⊙ m``; a mixture of these experts
    runs the gated dense form under every router and backend.
    """

    config: AdaLoRAConfig
    rank_mask: Tensor

    def __init__(self, in_features: int, out_features: int, config: AdaLoRAConfig, experts: int):
        super().__init__(in_features, out_features, config, experts)
        if config.rank_pattern is not None:
            raise ValueError(
                "adalora experts are built at their initial rank; a rank_pattern (a saved, "
                f"pruned single adapter's surviving ranks) cannot configure them, got "
                f"{config.rank_pattern!r}"
            )
        r = config.rank
        self.lora_A = nn.Parameter(torch.empty(experts, r, in_features))  # (e, r, i)
        self.lora_E = nn.Parameter(torch.empty(experts, r, 1))  # (e, r, 1)
        self.lora_B = nn.Parameter(torch.empty(out_features, experts, r))  # (o, e, r)
        init_triplets(self.lora_A, self.lora_E, self.lora_B, config.init)
        self.register_buffer("rank_mask", torch.ones(experts, r, dtype=torch.bool))  # (e, r)
        self.scaling = config.scaling

    @property
    def rank(self) -> int:
        """The number of singular triplets each expert holds (its initial rank)."""
        return self.lora_E.shape[1]

    def singular_values(self) -> Tensor:
        """``E ⊙ m``: ``(e, r, 1)``, the singular values with the fixed masks applied."""
        return self.lora_E * self.rank_mask[..., None].to(self.lora_E.dtype)

    def expert_ranks(self) -> list[int]:
        """Each expert's rank after the final allocation: the triplets its mask keeps."""
        return [int(k) for k in self.rank_mask.sum(dim=1).tolist()]

    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        down = rearrange(self.lora_A * self.singular_values(), "e r i -> (e r) i")
        z = F.linear(x, down.to(x.dtype))  # (n, i) -> (n, e·r)
        z = z.unflatten(1, (self.num_experts, -1)) * gates[..., None].to(z.dtype)  # (n, e, r)
        up = rearrange(self.lora_B, "o e r -> o (e r)")
        return F.linear(z.flatten(1), up.to(z.dtype)) * self.scaling  # (n, e·r) -> (n, o)

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        down = self.lora_A[expert] * self.singular_values()[expert]  # (r, i)
        return F.linear(F.linear(x, down), self.lora_B[:, expert]) * self.scaling

    def expert_weight(self, expert: int) -> Tensor:
        down = self.lora_A[expert] * self.singular_values()[expert]  # (r, i)
        return self.lora_B[:, expert] @ down * self.scaling  # (o, i)

    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(down (k × i), up (o × k))`` over the ``k`` triplets the expert's mask keeps."""
        keep = self.rank_mask[expert]  # (r,)
        down = (self.lora_A[expert] * self.singular_values()[expert])[keep]  # (k, i)
        return down, self.lora_B[:, expert][:, keep] * self.scaling  # (o, k)

    def orth_penalty(self) -> tuple[Tensor, ...]:
        """Every expert's ``‖A_e A_eᵀ − I‖_F`` and ``‖B_eᵀ B_e − I‖_F`` (``2e`` scalars, each
        expert's pair in turn): the terms :func:`~moracl.adapters.adalora.orth_loss` averages,
        as for ``e`` single adapters."""
        a, b = self.lora_A, self.lora_B
        cov_a = torch.einsum("eri,esi->ers", a, a)  # (e, r, r)
        cov_b = torch.einsum("oer,oes->ers", b, b)  # (e, r, r)
        eye = torch.eye(self.rank, dtype=a.dtype, device=a.device)
        norm_a = torch.linalg.matrix_norm(cov_a - eye)  # (e,)
        norm_b = torch.linalg.matrix_norm(cov_b - eye)  # (e,)
        return tuple(torch.stack((norm_a, norm_b), dim=1).flatten().unbind())

    @torch.no_grad()
    def zero_triplets(self, keep: Tensor) -> None:
        """Zero the singular values of the triplets where ``keep (e, r)`` is false."""
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device)[..., None], 0.0)

    @torch.no_grad()
    def reset_ranks(self) -> None:
        """Put every triplet back in play (``rank_mask`` all true): a copy of pruned experts
        that starts a budget of its own.  The masked triplets' singular values are zeroed
        first, so the update is unchanged."""
        self.zero_triplets(self.rank_mask)
        self.rank_mask.fill_(True)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_E": ParamRole.SCALE, "lora_B": ParamRole.B}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"rank={self.rank}, kept={self.expert_ranks()}"
        )
