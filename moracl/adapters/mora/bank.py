"""MoRA-sharing experts stacked in one bank (registered for mixtures as ``"mora"``).

Shape legend: ``n`` tokens, ``i``/``o`` layer sizes, ``e`` experts, ``r̂`` the square size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moracl.adapters.base import ParamRole
from moracl.adapters.fused import fused_enabled
from moracl.adapters.mora.config import Compression, MoRAConfig, square_size
from moracl.adapters.mora.operators import Sharing
from moracl.experts.backend import RoutingBackend, for_backend
from moracl.experts.banks import ExpertBank, register_bank
from moracl.experts.gating import Gating, Routed
from moracl.experts.routed_mora import Helpers, gate_grads, gated, routed_mora_linear

__all__ = ["FUSED_DEVICES", "MoRABank"]

#: device types on which a mixture of one MoRA bank runs the routed node (see MoRABank)
FUSED_DEVICES: tuple[str, ...] = ("cuda",)


@register_bank("mora")
class MoRABank(ExpertBank):
    """MoRA-sharing experts: one shared compression ``(n, i) -> (n, r̂)`` computed once, the
    experts' square matrices ``M (e, r̂, r̂)`` mixed in the compressed space, one tiling out.

    The compression and tiling run as matmuls with the :class:`Sharing` operator's 0/1
    matrices: inside a mixture step on a GPU they cost less than the structured passes of
    :mod:`moracl.adapters.mora.fused` (H200, ``moracl bench experts --size h100 --graphs``,
    ``mora-top2-of-8``: 115.6 ms against 127.5 ms), which the single adapter's fused node
    uses.  On CUDA a mixture of this one bank runs the frozen layer, the routing and the
    experts as one node (:mod:`moracl.experts.routed_mora`; H100, the same benchmark: 92.7 ms
    against 116.2 ms for this bank's :meth:`delta` added to the frozen output).  On the CPU
    it keeps that unfused sum, whose rounding a mixture keeps when it grows a second bank, so
    that old tasks' outputs stay bit-identical.
    """

    config: MoRAConfig
    #: the routed node's gating helpers under ``torch.compile`` for the ``compiled`` and
    #: ``triton`` backends (fewer GPU passes; each compiled call adds host time to an eager
    #: step); ``False``: plain operations under every backend
    compile_helpers: bool = True
    #: their ``torch.compile(dynamic=...)``: ``False`` (default) compiles a kernel per layer
    #: shape (a model has few: the attention's and the MLP's ``r̂``), ``None`` lets torch turn
    #: to shape-generic kernels from a second shape on
    helpers_dynamic: bool | None = False

    def __init__(self, in_features: int, out_features: int, config: MoRAConfig, experts: int):
        super().__init__(in_features, out_features, config, experts)
        if config.compression is not Compression.SHARING:
            raise ValueError(
                f"MoRA experts in a mixture use compression 'sharing', got "
                f"{config.compression.value!r}"
            )
        self.r_hat = square_size(in_features, out_features, config.rank, config.compression)
        self.M = nn.Parameter(torch.zeros(experts, self.r_hat, self.r_hat))  # (e, r̂, r̂)
        self.op = Sharing(in_features, out_features, self.r_hat)

    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        c = F.linear(x, self.op.compress.to(x.dtype))  # shared by all experts: (n, r̂)
        m = rearrange(self.M, "e s r -> (e s) r")
        z = F.linear(c, m.to(c.dtype)).unflatten(1, (self.num_experts, -1))  # (n, e, r̂)
        z = (z * gates[..., None].to(z.dtype)).sum(1)  # (n, r̂)
        return F.linear(z, self.op.decompress.to(z.dtype))  # (n, o)

    def fuses(self, x: Tensor) -> bool:
        return x.device.type in FUSED_DEVICES and fused_enabled(self.M)

    def routed_linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        r: Sequence[Tensor],
        gating: Gating,
        backend: RoutingBackend,
    ) -> tuple[Tensor, Routed]:
        chosen = backend if self.compile_helpers else RoutingBackend.EAGER
        dynamic = self.helpers_dynamic
        helpers = Helpers(
            for_backend(gated, chosen, x.device, dynamic),
            for_backend(gate_grads, chosen, x.device, dynamic),
        )
        op = self.op
        return routed_mora_linear(
            x, weight, bias, self.M, op.compress, op.decompress, r, gating, helpers
        )

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        z, up = self.op.factors(x, self.M[expert])
        return F.linear(z, up.to(z.dtype))

    def expert_weight(self, expert: int) -> Tensor:
        eye = torch.eye(self.in_features, dtype=self.M.dtype, device=self.M.device)
        return self.expert_delta(eye, expert).T

    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        down = self.M[expert] @ self.op.compress.to(self.M.dtype)  # (r̂, i)
        return down, self.op.decompress.to(self.M.dtype)  # (o, r̂)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"M": ParamRole.SQUARE}
