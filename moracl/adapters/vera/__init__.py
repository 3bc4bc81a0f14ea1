"""VeRA adapter kind (registered as ``"vera"``)."""

from moracl.adapters.base import register_adapter
from moracl.adapters.vera.config import VeRAConfig
from moracl.adapters.vera.module import VeRA

register_adapter("vera", VeRAConfig)(VeRA)

__all__ = ["VeRA", "VeRAConfig"]
