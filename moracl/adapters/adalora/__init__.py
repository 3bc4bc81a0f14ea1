"""AdaLoRA adapter kind (registered as ``"adalora"``, and as a mixture's expert bank): an
SVD-form update and the rank budget that allocates its singular triplets across layers (and
experts) while training."""

from moracl.adapters.adalora.bank import AdaLoRABank
from moracl.adapters.adalora.budget import RankAllocator
from moracl.adapters.adalora.config import AdaLoRAConfig
from moracl.adapters.adalora.module import (
    AdaLoRA,
    adalora_buffers,
    adalora_modules,
    orth_loss,
    rank_budget_modules,
)
from moracl.adapters.adalora.training import RankBudgetHooks
from moracl.adapters.base import register_adapter

register_adapter("adalora", AdaLoRAConfig)(AdaLoRA)

__all__ = [
    "AdaLoRA",
    "AdaLoRABank",
    "AdaLoRAConfig",
    "RankAllocator",
    "RankBudgetHooks",
    "adalora_buffers",
    "adalora_modules",
    "orth_loss",
    "rank_budget_modules",
]
