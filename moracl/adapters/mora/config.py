"""MoRA's configuration and the size of its square matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_choice


class Compression(str, Enum):
    """How MoRA maps ``x (i)`` into the square matrix's space and back out to ``o``.

    - ``sharing``: cyclic-pad ``x`` to whole groups of ``r̂`` and sum the groups; tile the
      ``r̂`` outputs over ``o`` (the paper's choice for large ranks).
    - ``rotation``: cut ``x`` into ``g`` blocks of ``r̂``, rotate block ``t`` RoPE-style by
      angles ``t · θ``, apply ``M`` to every block, concatenate; truncate or tile to ``o``.
    - ``truncation``: keep the first ``r̂`` inputs, pad the outputs with zeros.
    """

    SHARING = "sharing"
    ROTATION = "rotation"
    TRUNCATION = "truncation"


def square_size(in_features: int, out_features: int, rank: int, compression: Compression) -> int:
    """``r̂ = floor(sqrt((i + o) · r))`` — a rank-r LoRA's parameter count; even for rotation."""
    r_hat = math.isqrt((in_features + out_features) * rank)
    if compression is Compression.ROTATION:
        r_hat = max(2, r_hat - r_hat % 2)
    return r_hat


@dataclass(frozen=True)
class MoRAConfig(AdapterConfig):
    """High-rank updating (Jiang et al. 2024): one trainable ``M (r̂ × r̂)`` between fixed,
    parameter-free compression and decompression maps.

    Args:
        compression: ``sharing``, ``rotation`` or ``truncation`` (see :class:`Compression`).
    """

    kind: str = "mora"
    compression: Compression = Compression.SHARING

    def __post_init__(self) -> None:
        super().__post_init__()
        compression = check_choice("MoRA compression", self.compression, Compression)
        object.__setattr__(self, "compression", compression)
