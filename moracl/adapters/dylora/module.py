"""DyLoRA: one LoRA whose leading ``b`` rows and columns are a rank-``b`` LoRA for every ``b``.

Shapes: ``x (..., i)``, ``A (r × i)``, ``B (o × r)``; truncated to ``b``: ``A[:b] (b × i)``,
``B[:, :b] (o × b)``, ``ΔW_b = (α / b) · B[:, :b] A[:b] (o × i)``.

Training draws ``b`` at every forward; the draw is a pure function of ``(seed, draws)`` where
``draws`` is a buffer counting the draws so far, so it is reproducible, saved with the
adapter and resumes exactly, and never reads a number back from the device: the truncation
is a mask over the ``r`` rank channels (``(idx < b) · α / b``), not a slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moracl.adapters.base import Adapter, ParamRole, linear
from moracl.adapters.dylora.config import DyLoRAConfig, DyLoRAUpdate
from moracl.adapters.fused import in_backward, lora_linear
from moracl.experts.backend import compiled, triton_installed

__all__ = ["DyLoRA", "draw_rank", "rank_channels", "set_rank"]

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it stays below 2**59, no int64 overflow


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash, elementwise on int64 values in ``[0, 2**32)``."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def draw_rank(seed: int, draw: Tensor, low: int, high: int, full_share: float = 0.0) -> Tensor:
    """Draw number ``draw`` (an int64 tensor, any shape) of a rank for ``seed``: ``high`` with
    probability ``full_share``, else uniform on ``[low, high]``; the same numbers on every
    device, computed where ``draw`` lives (``full_share = 0``: exactly the uniform draws)."""
    key = (seed * 0x9E3779B1) & _MASK32
    x = _mix32((_mix32(draw & _MASK32) + key) & _MASK32)
    rank = low + x % (high - low + 1)
    if full_share <= 0:
        return rank
    coin = _mix32((x + 0x632BE5AB) & _MASK32)  # a second, independent 32-bit draw
    return torch.where(coin < int(full_share * 2**32), torch.full_like(rank, high), rank)


def rank_channels(
    draw: Tensor,
    dtype: torch.dtype,
    seed: int,
    low: int,
    high: int,
    full_share: float,
    alpha: float,
    rslora: bool,
    fixed: float | None,
) -> tuple[Tensor, Tensor]:
    """Draw number ``draw`` (``()`` int64) of the rank ``b`` (:func:`draw_rank`) and what the
    rank-``b`` update needs over the ``high`` channels: ``scale (high,)`` in ``dtype``, ``s_b =
    alpha / b`` (``alpha / sqrt(b)`` with ``rslora``; ``fixed`` at every ``b`` when given) on
    the channels ``< b`` and 0 from ``b`` on, and ``last (high,)`` bool, channel ``b - 1``."""
    b = draw_rank(seed, draw, low, high, full_share)
    idx = torch.arange(high, device=draw.device)  # (r,)
    on = (idx < b).to(dtype)
    if fixed is not None:
        scale = on * fixed
    else:
        denom = b.to(dtype).sqrt() if rslora else b.to(dtype)  # ()
        scale = on * (alpha / denom)
    return scale, idx == b - 1


def _channels_for(device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`rank_channels` as one compiled kernel on CUDA (35 integer and mask
    operations a layer otherwise, each a launch), itself elsewhere."""
    if device.type == "cuda" and triton_installed():
        return compiled(rank_channels, dynamic=False)
    return rank_channels


class DyLoRA(Adapter):
    """Nested-rank LoRA: ``B`` starts at zero (the adapted layer starts unchanged).

    In training (``module.training`` with gradients enabled) every call draws ``b`` from
    ``[min_rank, rank]`` and uses the first ``b`` rows of ``A`` and columns of ``B`` scaled by
    ``s_b`` (:meth:`DyLoRAConfig.scaling`); with ``update="last"`` only row/column ``b``
    receives a gradient.  Otherwise the adapter is the rank-:attr:`eval_rank` LoRA (``rank``
    until :meth:`set_rank`), and so are :meth:`delta_weight` and merging.
    """

    config: DyLoRAConfig
    draws: Tensor

    def __init__(self, in_features: int, out_features: int, config: DyLoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, i)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # (o, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's initialisation
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))  # the sampler's state
        #: the rank used outside training (and by ``delta_weight`` and merging)
        self.eval_rank: int = r

    # -- ranks ----------------------------------------------------------------------------
    def set_rank(self, rank: int) -> None:
        """Evaluate (and merge) at rank ``rank`` in ``[1, config.rank]`` from now on."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.config.rank:
            raise ValueError(
                f"DyLoRA rank must be an integer in [1, {self.config.rank}], got {rank!r}"
            )
        self.eval_rank = rank

    def sampling(self) -> bool:
        """Whether a call now draws its rank: in training mode with gradients enabled."""
        return self.training and torch.is_grad_enabled()

    def next_rank(self) -> int:
        """The rank the next training call will draw (reads it back; does not draw)."""
        return int(self._draw(self.draws))

    def _draw(self, draw: Tensor) -> Tensor:
        cfg = self.config
        return draw_rank(cfg.seed, draw, cfg.min_rank, cfg.rank, cfg.full_rank_share)

    def truncated(self) -> tuple[Tensor, Tensor]:
        """``(A[:b] (b × i), B[:, :b] (o × b))`` at :attr:`eval_rank` ``b``."""
        b = self.eval_rank
        if b == self.config.rank:
            return self.lora_A, self.lora_B
        return self.lora_A[:b], self.lora_B[:, :b]

    # -- the update -----------------------------------------------------------------------
    def _sampled(self) -> tuple[Tensor, Tensor]:
        """Draw ``b``, advance the sampler; the factors ``(A' (r × i), B' (o × r))`` of the
        rank-``b`` LoRA over all ``r`` channels: ``A'`` is ``A`` with its rows ``>= b`` zeroed
        and ``s_b`` applied (rank space, so that no ``(N, ·)`` tensor is scaled), and under
        the ``last`` rule only row/column ``b - 1`` carries a gradient."""
        if in_backward():  # activation checkpointing recomputes the layer
            raise RuntimeError(
                "DyLoRA draws a new rank at every training call, and this call runs inside a "
                "backward pass: activation checkpointing (torch.utils.checkpoint, transformers' "
                "activation_checkpointing_enable()) recomputing the layer, which would take its "
                "gradients at another rank than its forward. Train DyLoRA layers outside "
                "checkpointed blocks, or without activation checkpointing"
            )
        cfg = self.config
        a: Tensor = self.lora_A
        up: Tensor = self.lora_B
        fixed = cfg.scaling(cfg.rank) if cfg.fixed_scale else None
        scale, last = _channels_for(a.device)(
            self.draws, a.dtype, cfg.seed, cfg.min_rank, cfg.rank, cfg.full_rank_share,
            cfg.alpha, cfg.rslora, fixed,
        )  # fmt: skip  # (r,) each, from the draw before this call's
        self.draws.add_(1)
        if cfg.update is DyLoRAUpdate.LAST:  # rows/columns < b: constants
            a = torch.where(last[:, None], a, a.detach())  # (r, i)
            up = torch.where(last[None, :], up, up.detach())  # (o, r)
        return a * scale[:, None], up

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._input(x, self.lora_A.dtype)
        if self.sampling():
            a, up = self._sampled()
            return linear(x, a.to(x.dtype)), up  # (..., r), (o, r)
        a, up = self.truncated()
        return linear(x, a) * self.config.scaling(self.eval_rank), up  # (..., b), (o, b)

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The frozen matmul and the update in one node (:func:`~moracl.adapters.fused.
        lora_linear`): at the drawn rank in training, else at :attr:`eval_rank`; ``None``
        (the layer adds :meth:`delta`) with dropout in training."""
        if self.training and self.config.dropout > 0:
            return None
        if self.sampling():
            a, up = self._sampled()
            params = (self.lora_A, self.lora_B)
            return lora_linear(x, weight, bias, a, up, 1.0, params=params)
        a, up = self.truncated()
        return lora_linear(x, weight, bias, a, up, self.config.scaling(self.eval_rank))

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        z, up = self.factors(x)
        return linear(z, up.to(z.dtype))  # (..., r) -> (..., o)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        a, up = self.truncated()
        return (up @ a) * self.config.scaling(self.eval_rank)  # (o, i)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_B": ParamRole.B}

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, ranks=[{c.min_rank}, {c.rank}], eval_rank={self.eval_rank}"


def set_rank(model: nn.Module, rank: int) -> int:
    """Evaluate every DyLoRA adapter under ``model`` at rank ``rank``; returns how many.

    Raises ``ValueError`` when ``model`` has no DyLoRA adapter or ``rank`` is out of
    ``[1, r]`` for one of them (nothing changes then), ``RuntimeError`` when a layer holding
    one is merged (``unmerge()`` first)."""
    for path, m in model.named_modules():
        adapters = getattr(m, "adapters", None)
        if not isinstance(adapters, nn.ModuleDict) or not getattr(m, "merged", ()):
            continue
        if any(isinstance(a, DyLoRA) for a in adapters.values()):
            raise RuntimeError(f"layer {path!r} is merged: unmerge() before set_rank")
    found = [m for m in model.modules() if isinstance(m, DyLoRA)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no DyLoRA adapter to set the rank of")
    bound = min(a.config.rank for a in found)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= bound:
        raise ValueError(f"DyLoRA rank must be an integer in [1, {bound}], got {rank!r}")
    for a in found:
        a.set_rank(rank)
    return len(found)
