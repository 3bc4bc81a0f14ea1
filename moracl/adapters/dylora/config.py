"""DyLoRA's configuration and its two update rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_choice, check_int, check_number


class DyLoRAUpdate(str, Enum):
    """Which part of the truncated factors a training step trains.

    - ``last``: only row ``b`` of ``A`` and column ``b`` of ``B`` receive a gradient; the
      first ``b - 1`` enter the forward as constants (the paper's "frozen" mode, which its
      official training script uses at every step).
    - ``all``: every row and column ``<= b`` receives a gradient.
    """

    LAST = "last"
    ALL = "all"


@dataclass(frozen=True)
class DyLoRAConfig(AdapterConfig):
    """Dynamic search-free LoRA (Valipour et al. 2023): nested ranks in one adapter.

    ``A (r × i)``, ``B (o × r)``; at truncation ``b`` the update is the paper's
    ``ΔW_b = (alpha / b) · B[:, :b] A[:b]`` (its Eq. 5, ``W_up↓b W_dw↓b`` scaled by ``α / b``),
    which is exactly a rank-``b`` LoRA made of the first ``b`` rows and columns (with
    ``rslora``, ``alpha / sqrt(b)``: the rank-``b`` rsLoRA; with ``fixed_scale``, every
    truncation keeps the full rank's factor, so dropping rows leaves the kept ones' updates as
    they are, as nested dropout does).  Each training
    forward draws ``b`` uniformly from ``[min_rank, rank]`` (a seeded counter-based draw, the
    same for every layer at the same step); evaluation uses the rank chosen with ``set_rank``
    (``rank`` until then).

    Args:
        alpha: the scaling numerator; ``s_b = alpha / b``.
        rslora: rank-stabilised scaling ``s_b = alpha / sqrt(b)`` (Kalajdzievski 2023): the
            truncations' scales differ by ``sqrt(r)`` instead of ``r`` (16 vs 5.7 instead of
            16 vs 2 for ``alpha = 16`` at ``b = 1`` and ``8``).
        fixed_scale: every truncation scaled as the full rank, ``s_b = s_r`` (``alpha / r``,
            or ``alpha / sqrt(r)`` with ``rslora``): truncated to ``b``, the update is the
            rank-``b`` LoRA of the leading rows with ``alpha · b / r`` (``alpha · sqrt(b /
            r)``).
        min_rank: the smallest rank drawn in training, ``1 <= min_rank <= rank``.
        full_rank_share: the share of training draws that take the full rank, in ``[0, 1)``;
            the others stay uniform on ``[min_rank, rank]`` (0: the paper's uniform draw).
            The full rank trains at every draw under ``update="all"`` but is the whole
            update only when drawn, so this trades the small ranks' steps for it.
        update: ``last`` (default, the paper's frozen mode) or ``all`` (see
            :class:`DyLoRAUpdate`).
        seed: seeds the draws of ``b``; adapters with the same seed draw the same sequence.
    """

    kind: str = "dylora"
    alpha: float = 8.0
    min_rank: int = 1
    full_rank_share: float = 0.0
    rslora: bool = False
    fixed_scale: bool = False
    update: DyLoRAUpdate = DyLoRAUpdate.LAST
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, gt=0)  # finite, > 0
        check_int("min_rank", self.min_rank, ge=1, le=self.rank)
        check_number("full_rank_share", self.full_rank_share, ge=0, lt=1)
        check_int("seed", self.seed, ge=0)
        for name in ("rslora", "fixed_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "update", check_choice("DyLoRA update", self.update, DyLoRAUpdate))

    def scaling(self, rank: int) -> float:
        """The factor ``s_b = alpha / b`` (``alpha / sqrt(b)`` with ``rslora``) of the update
        truncated to rank ``b`` (``b = rank`` at every ``b`` with ``fixed_scale``)."""
        b = self.rank if self.fixed_scale else rank
        return self.alpha / (math.sqrt(b) if self.rslora else b)
