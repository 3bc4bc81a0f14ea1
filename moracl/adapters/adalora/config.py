"""AdaLoRA's configuration: the SVD-form adapter and its rank-budget schedule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from moracl.adapters.base import AdapterConfig
from moracl.guard import check_choice, check_int, check_number
from moracl.parse_fields import show

__all__ = ["AdaLoRAConfig", "AdaLoRAInit"]


class AdaLoRAInit(str, Enum):
    """How the triplets start; both make ``ΔW = 0``.

    - ``peft``: PEFT's ``SVDLinear``: ``E = 0``, ``A, B ~ N(0, 0.02²)``.  Nothing moves ``A``
      or ``B`` until ``E`` has grown, so a short run spends its first steps getting started.
    - ``lora``: ``A`` with orthonormal rows, ``E = 1``, ``B = 0``: a LoRA's start (``B = 0``,
      ``A`` random), so ``B`` learns from the first step; the singular vectors already satisfy
      half the orthogonality regulariser.
    """

    PEFT = "peft"
    LORA = "lora"


@dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    """Adaptive rank allocation (Zhang et al. 2023): ``ΔW = s · B (E ⊙ m) A`` with
    ``A (r × i)`` right and ``B (o × r)`` left singular vectors, singular values ``E (r × 1)``,
    the rank mask ``m`` and ``s = alpha / (r + 1e-5)`` (PEFT's ``AdaLoraConfig`` exactly).

    ``rank`` is the initial rank ``r`` of every layer (PEFT's ``init_r``); a
    :class:`~moracl.adapters.adalora.RankAllocator` lowers the total over all layers from
    ``rank × layers`` to ``target_rank × layers`` while training, keeping the most important
    singular triplets wherever they are.

    Args:
        target_rank: the average rank per layer at the end of the budget schedule
            (PEFT's ``target_r``), ``1 <= target_rank <= rank``.
        alpha: the scaling numerator (PEFT's ``lora_alpha``), > 0.
        orth_reg_weight: weight of the orthogonality regulariser
            (:func:`~moracl.adapters.adalora.orth_loss`), >= 0.
        beta1: EMA factor of the smoothed sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).
        tinit: steps of warmup before the budget starts to fall (PEFT's ``tinit``).
        tfinal: steps of final fine-tuning with the mask fixed (PEFT's ``tfinal``).
        delta_t: steps between two reallocations while the budget falls (PEFT's ``deltaT``).
        total_step: the optimiser steps of the run the budget is scheduled over (PEFT's
            ``total_step``), or ``None``; :class:`~moracl.adapters.adalora.RankAllocator`
            uses it when not given ``total_steps`` (the argument wins when given), ``moracl
            finetune`` sets it to its run's length, and a PEFT folder written from the adapter
            records it (else the least PEFT accepts, ``tinit + tfinal + 1``).
        init: how the triplets start (:class:`AdaLoRAInit`): ``peft`` (default, PEFT's) or
            ``lora`` (``B = 0``, ``E = 1``, orthonormal ``A``).
        rank_pattern: surviving rank of each adapted layer (layer path -> rank) of a saved,
            pruned adapter; written by ``save_pretrained``, ``None`` while training.
    """

    kind: str = "adalora"
    rank: int = 12
    target_rank: int = 8
    alpha: float = 8.0
    orth_reg_weight: float = 0.5
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_step: int | None = None
    init: AdaLoRAInit = AdaLoRAInit.PEFT
    rank_pattern: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("target_rank", self.target_rank, ge=1, le=self.rank)
        check_number("alpha", self.alpha, gt=0)
        check_number("orth_reg_weight", self.orth_reg_weight, ge=0)
        check_number("beta1", self.beta1, gt=0, lt=1)
        check_number("beta2", self.beta2, gt=0, lt=1)
        check_int("tinit", self.tinit, ge=0)
        check_int("tfinal", self.tfinal, ge=0)
        check_int("delta_t", self.delta_t, gt=0)
        if self.total_step is not None:
            check_int("total_step", self.total_step, gt=self.tinit + self.tfinal)
        object.__setattr__(self, "init", check_choice("adalora init", self.init, AdaLoRAInit))
        if self.rank_pattern is not None:
            object.__setattr__(self, "rank_pattern", _pattern(self.rank_pattern, self.rank))

    def __hash__(self) -> int:
        fields = {k: v for k, v in self.to_dict().items() if k != "rank_pattern"}
        pattern = tuple(sorted((self.rank_pattern or {}).items()))
        return hash((tuple(sorted(fields.items())), pattern))

    @property
    def scaling(self) -> float:
        """The factor ``s = alpha / (rank + 1e-5)``, fixed by the initial rank (PEFT's
        ``scaling / ranknum``): pruning triplets never rescales the surviving ones."""
        return self.alpha / (self.rank + 1e-5)

    def layer_rank(self, path: str) -> int:
        """The rank of the adapter on layer ``path``: its surviving rank in
        :attr:`rank_pattern`, else :attr:`rank`."""
        if self.rank_pattern is None:
            return self.rank
        if path not in self.rank_pattern:
            raise ValueError(
                f"layer {path!r} is not in this adalora config's rank_pattern; it names "
                f"{sorted(self.rank_pattern)[:5]}"
            )
        return self.rank_pattern[path]

    def for_layer(self, path: str) -> AdaLoRAConfig:
        """The config of the adapter on layer ``path``: itself while training; for a pruned
        adapter, a copy whose ``rank_pattern`` names only that layer (its built rank)."""
        if self.rank_pattern is None:
            return self
        return self.replace(rank_pattern={path: self.layer_rank(path)})

    def saved(self, adapters: Mapping[str, Any]) -> AdaLoRAConfig:
        """The config to save with the layers ``adapters`` (layer path -> :class:`AdaLoRA`):
        ``rank_pattern`` records how many triplets each layer's ``rank_mask`` keeps (what
        ``saved_state`` writes)."""
        return self.replace(
            rank_pattern={path: int(a.rank_mask.sum()) for path, a in adapters.items()}
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rank_pattern is not None:
            out["rank_pattern"] = dict(self.rank_pattern)
        return out


def _pattern(value: Any, rank: int) -> dict[str, int]:
    """``value`` as a fresh ``{layer path: rank}`` dict with ranks in ``[0, rank]``."""
    if not isinstance(value, Mapping):
        raise ValueError(f"rank_pattern must be a mapping of layer path -> rank, got {show(value)}")
    out: dict[str, int] = {}
    for path, r in value.items():
        if not isinstance(path, str) or not path:
            raise ValueError(f"rank_pattern keys must be layer paths, got {show(path)}")
        out[path] = check_int(f"rank_pattern[{path!r}]", r, ge=0, le=rank)
    return out
