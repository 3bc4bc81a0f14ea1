"""LoRA adapter kind (registered as ``"lora"``)."""

from moracl.adapters.base import register_adapter
from moracl.adapters.lora.bank import LoRABank
from moracl.adapters.lora.config import LoRAConfig
from moracl.adapters.lora.module import LoRA

register_adapter("lora", LoRAConfig)(LoRA)

__all__ = ["LoRA", "LoRABank", "LoRAConfig"]
