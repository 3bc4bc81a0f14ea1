"""DoRA adapter kind (registered as ``"dora"``)."""

from moracl.adapters.base import register_adapter
from moracl.adapters.dora.config import DoRAConfig
from moracl.adapters.dora.module import DoRA

register_adapter("dora", DoRAConfig)(DoRA)

__all__ = ["DoRA", "DoRAConfig"]
