"""DyLoRA adapter kind (registered as ``"dylora"``) and :func:`set_rank` over a model."""

from moracl.adapters.base import register_adapter
from moracl.adapters.dylora.config import DyLoRAConfig, DyLoRAUpdate
from moracl.adapters.dylora.module import DyLoRA, draw_rank, set_rank

register_adapter("dylora", DyLoRAConfig)(DyLoRA)

__all__ = ["DyLoRA", "DyLoRAConfig", "DyLoRAUpdate", "draw_rank", "set_rank"]
