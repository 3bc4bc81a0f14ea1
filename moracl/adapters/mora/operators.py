"""MoRA's fixed compression / decompression operators, one small module per strategy.

Each operator holds its tables as non-persistent buffers derived from the layer shape, so
two MoRA adapters of different ``r̂`` on one layer never share or clash.

Shapes: ``x (..., i)``, ``M (r̂ × r̂)``; ``g = ceil(i / r̂)`` blocks for rotation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from moracl.adapters.base import linear
from moracl.adapters.mora.config import Compression


class Operator(nn.Module, ABC):
    """Applies ``x -> decompress(M · compress(x))``."""

    def __init__(self, in_features: int, out_features: int, r_hat: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r_hat = in_features, out_features, r_hat

    def factors(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(z (..., r̂), up (o × r̂))`` with ``delta == z @ up.T``, or ``None``."""
        return None

    @abstractmethod
    def delta(self, x: Tensor, m: Tensor) -> Tensor:
        """``(..., i) -> (..., o)``."""


class LowRankOperator(Operator):
    """An operator whose decompression is a fixed matrix ``D (o × r̂)``: ``delta = z Dᵀ``."""

    @abstractmethod
    def factors(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(z (..., r̂), D (o × r̂))``."""

    def delta(self, x: Tensor, m: Tensor) -> Tensor:
        z, up = self.factors(x, m)
        return linear(z, up.to(z.dtype))


class Sharing(LowRankOperator):
    """Group-sum in (``C (r̂ × i)``, entry = how often ``x_i`` lands in slot ``j``), tile out
    (``D (o × r̂)``, ``D[k, k mod r̂] = 1``)."""

    compress: Tensor
    decompress: Tensor

    def __init__(self, in_features: int, out_features: int, r_hat: int) -> None:
        super().__init__(in_features, out_features, r_hat)
        groups = -(-in_features // r_hat)
        pos = torch.arange(groups * r_hat)
        comp = torch.zeros(r_hat, in_features)
        comp.index_put_((pos % r_hat, pos % in_features), torch.ones(pos.numel()), accumulate=True)
        out = torch.arange(out_features)
        decomp = torch.zeros(out_features, r_hat)
        decomp[out, out % r_hat] = 1.0
        self.register_buffer("compress", comp, persistent=False)  # (r̂, i)
        self.register_buffer("decompress", decomp, persistent=False)  # (o, r̂)

    def factors(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        c = linear(x, self.compress.to(x.dtype))  # (..., i) -> (..., r̂), shared by all experts
        return linear(c, m), self.decompress  # (..., r̂), (o, r̂)


class Truncation(LowRankOperator):
    """Keep the first ``min(i, r̂)`` inputs; write the first ``min(o, r̂)`` outputs."""

    decompress: Tensor

    def __init__(self, in_features: int, out_features: int, r_hat: int) -> None:
        super().__init__(in_features, out_features, r_hat)
        self.keep = min(in_features, r_hat)
        k = min(out_features, r_hat)
        decomp = torch.zeros(out_features, r_hat)
        decomp[torch.arange(k), torch.arange(k)] = 1.0
        self.register_buffer("decompress", decomp, persistent=False)  # (o, r̂)

    def factors(self, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        return linear(x[..., : self.keep], m[:, : self.keep]), self.decompress


class Rotation(Operator):
    """Blocks of ``r̂`` (cyclic padding), block ``t`` rotated RoPE-style, ``M`` on each block;
    the ``g · r̂`` outputs are truncated or tiled to ``o``.

    Rotation is folded into per-block matrices ``M_t = M R_t (g × r̂ × r̂)`` so the activations
    see one batched matmul.  Output block ``t`` reads input block ``t`` only, so when the
    ``g · r̂`` outputs are truncated to ``o`` only the first ``ceil(o / r̂)`` blocks are
    computed (:attr:`used`): a down projection (``i > o``) skips the blocks it would discard.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, in_features: int, out_features: int, r_hat: int, base: float = 10000.0):
        super().__init__(in_features, out_features, r_hat)
        if r_hat % 2:
            raise ValueError(f"rotation needs an even r̂, got {r_hat}")
        self.groups = g = -(-in_features // r_hat)
        self.base = base
        cos, sin = self._tables(torch.float32, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (g, r̂)
        self.register_buffer("sin", sin, persistent=False)  # (g, r̂)
        span = g * r_hat
        self.tile_out = span < out_features
        #: the blocks whose outputs are kept (all when the outputs are tiled)
        self.used = g if self.tile_out else -(-out_features // r_hat)
        self.pad_in = self.used * r_hat > in_features  # cyclic padding needed

    def _tables(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE tables ``cos, sin (g, r̂)`` for block ``t`` at angles ``t · base^(-2k/r̂)``,
        computed in float64 and rounded once to ``dtype``."""
        r, cpu = self.r_hat, torch.device("cpu")  # explicit: also under torch.device("meta")
        inv_freq = 1.0 / self.base ** (torch.arange(0, r, 2, dtype=torch.float64, device=cpu) / r)
        ang = torch.outer(torch.arange(self.groups, dtype=torch.float64, device=cpu), inv_freq)
        ang = torch.cat([ang, ang], dim=-1)  # (g, r̂)
        return ang.cos().to(device, dtype), ang.sin().to(device, dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # a dtype change recomputes the tables from float64 instead of casting rounded values
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.dtype, self.cos.device)
        return self

    def block_matrices(self, m: Tensor, blocks: int | None = None) -> Tensor:
        """``M_t = M (diag(cos_t) + diag(sin_t) J)`` for the first ``blocks`` blocks (all
        ``g`` when ``None``): ``(blocks, r̂, r̂)``."""
        return rotated_blocks(m, self.cos[:blocks], self.sin[:blocks])

    def delta(self, x: Tensor, m: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (N, i)
        u = self.used
        span = u * self.r_hat  # the inputs the kept blocks read
        x = _tile(x, span) if self.pad_in else x[:, :span]  # cyclic padding: (N, u·r̂)
        xb = x.unflatten(1, (u, self.r_hat)).transpose(0, 1)  # (u, N, r̂), strided
        y = torch.bmm(xb, self.block_matrices(m, u).to(x.dtype).transpose(1, 2))  # (u, N, r̂)
        y = y.transpose(0, 1).reshape(-1, span)  # (N, u·r̂)
        y = _tile(y, self.out_features) if self.tile_out else y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)


def rotated_blocks(m: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``M_t = M diag(cos_t) + rot(M diag(sin_t))`` for ``M (R × R)`` and the tables
    ``cos, sin (u, R)``: ``(u, R, R)`` in ``m``'s dtype, where ``rot`` moves the second half of
    the columns first and negates the first (``cat(Y[:, h:], -Y[:, :h])``, ``h = R / 2``)."""
    h = m.shape[-1] // 2
    cos, sin = cos.to(m.dtype)[:, None, :], sin.to(m.dtype)[:, None, :]  # (u, 1, R)
    mc, ms = m[None] * cos, m[None] * sin  # (u, R, R)
    return mc + torch.cat([ms[..., h:], -ms[..., :h]], dim=-1)


def rotated_blocks_grad(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of :func:`rotated_blocks` for ``M`` given ``grad (u, R, R)`` of its
    result: ``Σ_t grad_t diag(cos_t) + rotᵀ(grad_t) diag(sin_t)`` ``(R, R)``, where
    ``rotᵀ(G) = cat(-G[:, h:], G[:, :h])``."""
    h = grad.shape[-1] // 2
    cos, sin = cos.to(grad.dtype)[:, None, :], sin.to(grad.dtype)[:, None, :]  # (u, 1, R)
    back = torch.cat([-grad[..., h:], grad[..., :h]], dim=-1)  # rotᵀ: (u, R, R)
    return (grad * cos + back * sin).sum(0)


def _tile(t: Tensor, length: int) -> Tensor:
    """``(N, L) -> (N, length)`` repeating the columns cyclically (a cat, so its backward is
    slice adds rather than an atomic scatter)."""
    reps = -(-length // t.shape[1])
    return torch.cat([t] * reps, dim=1)[:, :length] if reps > 1 else t[:, :length]


OPERATORS: dict[Compression, type[Operator]] = {
    Compression.SHARING: Sharing,
    Compression.ROTATION: Rotation,
    Compression.TRUNCATION: Truncation,
}
