"""AdaLoRA adapter kind (registered as ``"adalora"``): an SVD-form update and the rank budget
that allocates its singular triplets across layers while training."""

from moracl.adapters.adalora.budget import RankAllocator
from moracl.adapters.adalora.config import AdaLoRAConfig
from moracl.adapters.adalora.module import AdaLoRA, adalora_modules, orth_loss
from moracl.adapters.adalora.training import RankBudgetHooks
from moracl.adapters.base import register_adapter

register_adapter("adalora", AdaLoRAConfig)(AdaLoRA)

__all__ = [
    "AdaLoRA",
    "AdaLoRAConfig",
    "RankAllocator",
    "RankBudgetHooks",
    "adalora_modules",
    "orth_loss",
]
