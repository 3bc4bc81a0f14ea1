"""VeRA: frozen shared random projections, trainable scaling vectors.

Shapes: ``x (..., i)``, ``A (r × i)``, ``B (o × r)``, ``λ_d (r)``, ``λ_b (o)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moracl.adapters.base import Adapter, AdapterConfig, ParamRole, linear
from moracl.adapters.vera.config import VeRAConfig


def shared_projection(rows: int, cols: int, seed: int, salt: int) -> Tensor:
    """A Kaiming-uniform ``(rows × cols)`` matrix that depends only on its shape and seed,
    so every layer of one shape gets the same projection (and a reload regenerates it)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    bound = math.sqrt(6.0 / cols) / math.sqrt(1 + 5)  # kaiming_uniform_(a=sqrt(5))
    return (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound


class VeRA(Adapter):
    """Only ``λ_d`` and ``λ_b`` train; ``ΔW`` starts at zero because ``λ_b = 0``."""

    config: VeRAConfig
    vera_A: Tensor
    vera_B: Tensor

    @classmethod
    def check_fit(
        cls, in_features: int, out_features: int, config: AdapterConfig, where: str = "a layer"
    ) -> None:
        """VeRA's rank sizes its frozen random projections and its trainable ``λ_d``; it is
        meant to exceed LoRA's (e.g. 1024 on 768-wide layers), so the bound is
        ``rank <= d_in + d_out``: the projections, ``rank · (d_in + d_out)`` numbers, then stay
        within ``(d_in + d_out)²`` (at most a few times the layer's own weight)."""
        bound = in_features + out_features
        if config.rank > bound:
            raise ValueError(
                f"{where} ({in_features} -> {out_features}): vera rank {config.rank} is out of "
                f"range; expected 1 <= rank <= {bound} = d_in + d_out (lower adapter.rank or "
                f"leave this layer out of target_modules)"
            )

    def __init__(self, in_features: int, out_features: int, config: VeRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        r, seed = config.rank, config.projection_seed
        self.register_buffer("vera_A", shared_projection(r, in_features, seed, 0), persistent=False)
        self.register_buffer(
            "vera_B", shared_projection(out_features, r, seed, 1), persistent=False
        )
        self.lambda_d = nn.Parameter(torch.full((r,), float(config.d_initial)))  # (r,)
        self.lambda_b = nn.Parameter(torch.zeros(out_features))  # (o,)

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._input(x, self.lambda_d.dtype)
        z = linear(x, self.vera_A.to(x.dtype)) * self.lambda_d  # (..., r)
        return z, self.lambda_b[:, None] * self.vera_B.to(self.lambda_b.dtype)  # (o, r)

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        z, up = self.factors(x)
        return linear(z, up.to(z.dtype))

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        a = self.vera_A.to(self.lambda_d.dtype)
        b = self.vera_B.to(self.lambda_d.dtype)
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)  # (o, i)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lambda_d": ParamRole.SCALE, "lambda_b": ParamRole.SCALE}
