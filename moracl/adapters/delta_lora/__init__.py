"""Delta-LoRA adapter kind (registered as ``"delta_lora"``) and its optimiser-step hook."""

from moracl.adapters.base import register_adapter
from moracl.adapters.delta_lora.config import DeltaLoRAConfig
from moracl.adapters.delta_lora.module import DeltaLoRA, DeltaLoRAUpdater, delta_lora_buffers

register_adapter("delta_lora", DeltaLoRAConfig)(DeltaLoRA)

__all__ = ["DeltaLoRA", "DeltaLoRAConfig", "DeltaLoRAUpdater", "delta_lora_buffers"]
