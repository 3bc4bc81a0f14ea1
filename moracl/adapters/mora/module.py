"""MoRA: ``delta(x) = decompress(M · compress(x))`` with one trainable ``M (r̂ × r̂)``.

Shapes: ``x (..., i)`` -> ``(..., o)``.  ``M`` starts at zero, so the layer starts unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moracl.adapters.base import Adapter, AdapterConfig, ParamRole
from moracl.adapters.fused import fused_enabled
from moracl.adapters.mora.config import Compression, MoRAConfig, square_size
from moracl.adapters.mora.fused import mora_sharing_linear
from moracl.adapters.mora.fused_rotation import mora_rotation_linear
from moracl.adapters.mora.operators import OPERATORS, Operator, Rotation


class MoRA(Adapter):
    """High-rank square-matrix adapter; its compression is a named strategy."""

    config: MoRAConfig

    @classmethod
    def check_fit(
        cls, in_features: int, out_features: int, config: AdapterConfig, where: str = "a layer"
    ) -> None:
        """MoRA of rank ``r`` has a rank-``r`` LoRA's parameter count, so LoRA's bound applies:
        ``rank <= max(d_in, d_out)``, i.e. ``r̂ <= isqrt((d_in + d_out) · max(d_in, d_out))``
        (``r̂`` may exceed ``d_in``: the compression pads cyclically)."""
        bound = max(in_features, out_features)
        if config.rank > bound:
            comp = getattr(config, "compression", Compression.SHARING)
            r_hat = square_size(in_features, out_features, config.rank, comp)
            top = square_size(in_features, out_features, bound, comp)
            raise ValueError(
                f"{where} ({in_features} -> {out_features}): mora rank {config.rank} "
                f"(r̂ = {r_hat}) is out of range; expected 1 <= rank <= {bound} = "
                f"max(d_in, d_out), i.e. r̂ <= {top} (lower adapter.rank or leave this layer "
                f"out of target_modules)"
            )

    def __init__(self, in_features: int, out_features: int, config: MoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        self.r_hat = square_size(in_features, out_features, config.rank, config.compression)
        self.M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat))  # (r̂, r̂)
        self.op: Operator = OPERATORS[config.compression](in_features, out_features, self.r_hat)

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The frozen matmul and the update in one node for ``sharing`` and ``rotation``
        (:mod:`moracl.adapters.mora.fused`, :mod:`moracl.adapters.mora.fused_rotation`);
        ``None`` (the layer adds :meth:`delta`) for ``truncation``, with dropout in training
        or a trainable base weight."""
        if (self.training and self.config.dropout > 0) or weight.requires_grad:
            return None
        if self.config.compression is Compression.SHARING:
            return mora_sharing_linear(x, weight, bias, self.M)
        if isinstance(self.op, Rotation) and fused_enabled(self.M):
            u = self.op.used  # the blocks whose outputs are kept
            return mora_rotation_linear(x, weight, bias, self.M, self.op.cos[:u], self.op.sin[:u])
        return None

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        return self.op.factors(self._input(x, self.M.dtype), self.M)

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        return self.op.delta(self._input(x, self.M.dtype), self.M)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        eye = torch.eye(self.in_features, dtype=self.M.dtype, device=self.M.device)
        return self.op.delta(eye, self.M).T  # the map applied to the basis: (o, i)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"M": ParamRole.SQUARE}

    def extra_repr(self) -> str:
        comp = self.config.compression.value
        return f"{super().extra_repr()}, r_hat={self.r_hat}, compression={comp}"
