"""Expert banks: experts of one adapter kind stored as stacked parameters, combined by their
gates; the interface and the registry (each adapter kind with a stacked form registers its
bank from its own folder, e.g. :mod:`moracl.adapters.lora.bank`).

Shape legend: ``n`` tokens, ``i``/``o`` layer sizes, ``e`` experts in the bank.  Every bank
computes ``Σ_e gates[:, e] · delta_e(x)`` without a loop over experts or any token dispatch.
``expert_delta`` is the plain per-expert update, for references and tests only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from moracl.adapters.base import AdapterConfig, ParamRole
from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import Gating, Routed
from moracl.registry import Registry

__all__ = ["BANKS", "ExpertBank", "build_bank", "register_bank"]


class ExpertBank(nn.Module, ABC):
    """``e`` experts of one adapter kind on an ``i -> o`` layer.

    A bank with a routed node (the frozen layer, the routing and the gated experts in one
    autograd node, e.g. :mod:`moracl.experts.routed_lora`) says so in :meth:`fuses` and runs
    it in :meth:`routed_linear`: a mixture of that one bank then calls it instead of adding
    :meth:`delta` to the frozen output.
    """

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, experts: int):
        super().__init__()
        if not isinstance(experts, int) or isinstance(experts, bool) or experts <= 0:
            raise ValueError(f"a bank needs a positive number of experts, got {experts!r}")
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.num_experts = experts
        self.frozen = False

    @abstractmethod
    def delta(self, x: Tensor, gates: Tensor) -> Tensor:
        """``x (n, i)``, ``gates (n, e)`` -> ``Σ_e gates[:, e] · delta_e(x)``: ``(n, o)``."""

    def fuses(self, x: Tensor) -> bool:
        """Whether :meth:`routed_linear` takes input ``x`` (none by default)."""
        return False

    def routed_linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        r: Sequence[Tensor],
        gating: Gating,
        backend: RoutingBackend,
    ) -> tuple[Tensor, Routed]:
        """``x (..., i)`` through the frozen ``weight (o × i)``, ``bias`` and the experts
        gated by ``gating`` on the logits ``x Rᵀ`` (``R (l × i)``, given as the router's
        row blocks ``r``, :meth:`~moracl.experts.routers.base.Router.logit_parts`) in one
        node, as the
        concrete ``backend`` runs it: ``out (..., o)`` and the routing; only where
        :meth:`fuses` says so."""
        raise TypeError(f"{type(self).__name__} has no routed node; check fuses(x) first")

    @abstractmethod
    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        """One expert's update ``(n, i) -> (n, o)`` (the naive reference)."""

    @abstractmethod
    def expert_weight(self, expert: int) -> Tensor:
        """One expert's dense update ``(o × i)``."""

    @abstractmethod
    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(down (R × i), up (o × R))`` with ``up @ down`` the expert's dense update (for
        exporting a task's experts as one LoRA)."""

    @abstractmethod
    def param_roles(self) -> dict[str, ParamRole]: ...


BANKS: Registry[type[ExpertBank]] = Registry("expert bank")


def register_bank(kind: str) -> Callable[[type[ExpertBank]], type[ExpertBank]]:
    """Class decorator registering the stacked bank of adapter kind ``kind``."""
    return BANKS.register(kind)


def build_bank(
    in_features: int, out_features: int, config: AdapterConfig, experts: int
) -> ExpertBank:
    """The bank for ``config.kind``; kinds without a stacked form raise ``ValueError``."""
    if config.kind not in BANKS:
        raise ValueError(
            f"adapter kind {config.kind!r} cannot be a mixture expert; expected one of "
            f"{BANKS.names()}"
        )
    return BANKS.get(config.kind)(in_features, out_features, config, experts)
