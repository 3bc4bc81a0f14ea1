"""MoRA adapter kind (registered as ``"mora"``)."""

from moracl.adapters.base import register_adapter
from moracl.adapters.mora.bank import MoRABank
from moracl.adapters.mora.config import Compression, MoRAConfig, square_size
from moracl.adapters.mora.module import MoRA

register_adapter("mora", MoRAConfig)(MoRA)

__all__ = ["Compression", "MoRA", "MoRABank", "MoRAConfig", "square_size"]
