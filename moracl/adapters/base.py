"""The adapter-kind interface, its configuration base class and the kind registry.

Shape legend used across the adapter kinds:
    b  batch (any number of leading dims, flattened as ``...``)
    i  input features ``d_in``          o  output features ``d_out``
    r  adapter rank (or MoRA's square size ``r̂``)
    g  MoRA blocks (``ceil(d_in / r̂)``)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.guard import check_number
from moracl.parse_fields import check_field_types, check_string_keys, show
from moracl.registry import Registry

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfig",
    "ParamRole",
    "build_adapter",
    "check_adapter_fit",
    "iter_param_roles",
    "register_adapter",
]


class ParamRole(str, Enum):
    """What a trainable adapter parameter is, so optimisers can group parameters.

    ``A`` and ``B`` are LoRA's down and up projections (LoRA+ gives ``B`` a larger learning
    rate); ``MAGNITUDE`` is DoRA's magnitude vector; ``SCALE`` VeRA's scaling vectors;
    ``SQUARE`` MoRA's square matrix; ``ROUTER`` a router's weights.
    """

    A = "a"
    B = "b"
    MAGNITUDE = "magnitude"
    SCALE = "scale"
    SQUARE = "square"
    ROUTER = "router"
    HEAD = "head"


C = TypeVar("C", bound="AdapterConfig")


@dataclass(frozen=True)
class AdapterConfig:
    """Configuration of one adapter kind; ``AdapterConfig(kind=..., ...)`` builds the kind's class.

    ``AdapterConfig(kind="mora", rank=8, compression="sharing")`` returns a ``MoRAConfig``.
    Unknown keys raise ``ValueError`` naming the valid ones.

    Args:
        kind: registered adapter kind (``lora``, ``mora``, ``dora``, ``vera``, ...).
        rank: the rank ``r`` (> 0); MoRA derives its square size ``r̂`` from it.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
    """

    kind: str = "lora"
    rank: int = 8
    dropout: float = 0.0

    _kinds: ClassVar[dict[str, type[AdapterConfig]]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        if cls is AdapterConfig:
            if args:
                raise TypeError("AdapterConfig takes keyword arguments only")
            kind = kwargs.get("kind", "lora")
            sub = cls._kinds.get(kind) if isinstance(kind, str) else None
            if sub is None:
                raise ValueError(
                    f"unknown adapter kind {kind!r}; expected one of {sorted(cls._kinds)}"
                )
            sub.check_keys(kwargs)
            return super().__new__(sub)
        cls.check_keys(kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        expected = _kind_of(type(self))
        if expected is not None and self.kind != expected:
            raise ValueError(f"{type(self).__name__} has kind {expected!r}, got kind={self.kind!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        check_number("dropout", self.dropout, ge=0.0, lt=1.0)  # finite, in [0, 1)

    @classmethod
    def check_keys(cls, data: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for keys that are not fields of this kind's config."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            kind = _kind_of(cls) or "adapter"
            raise ValueError(
                f"unknown key(s) {unknown} for {kind} config; valid keys: {sorted(valid)}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build the config of ``data['kind']`` from a plain mapping (e.g. parsed JSON or YAML).

        Anything malformed — not a mapping, a key that is not a string or not a field of the
        kind, a value of the wrong JSON type — raises ``ValueError`` naming the key."""
        data = check_string_keys(data, "an adapter config")
        kind = data.get("kind", "lora")
        sub = cls._kinds.get(kind) if isinstance(kind, str) else None
        if sub is None:
            raise ValueError(
                f"unknown adapter kind {show(kind)}; expected one of {sorted(cls._kinds)}"
            )
        sub.check_keys(data)
        check_field_types(sub, data)
        return AdapterConfig(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping that ``from_dict`` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else v
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_layer(self, path: str) -> AdapterConfig:
        """The config the adapter on layer ``path`` is built from: this one, unless a kind
        gives layers their own shapes (a pruned rank budget)."""
        return self

    def saved(self, adapters: Mapping[str, Adapter]) -> AdapterConfig:
        """The config to save with ``adapters`` (layer path -> adapter): this one, unless a
        kind saves less than it trains with (a rank budget's surviving triplets)."""
        return self


def _kind_of(cls: type[AdapterConfig]) -> str | None:
    for name, sub in AdapterConfig._kinds.items():
        if sub is cls:
            return name
    return None


class Adapter(nn.Module, ABC):
    """One adapter on a linear layer ``W (o × i)``: it computes the update ``delta(x)``.

    Every kind gives ``delta(x)`` and the exact dense ``delta_weight()`` with
    ``delta(x) == x @ delta_weight().T``.  Low-rank kinds also expose ``factors(x)`` —
    ``z (..., r)`` and ``up (o × r)`` with ``delta(x) == z @ up.T`` — which the layer fuses
    into one ``addmm`` with the frozen base output.

    Kinds whose update depends on the frozen weight (DoRA) set ``needs_weight = True`` and
    receive ``weight`` (``o × i``) in every call.
    """

    needs_weight: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"an adapter needs positive layer sizes, got in={in_features}, out={out_features}"
            )
        type(self).check_fit(in_features, out_features, config)  # before any allocation
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.dropout: nn.Module = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )

    # -- the interface -------------------------------------------------------------------
    @classmethod
    def check_fit(
        cls, in_features: int, out_features: int, config: AdapterConfig, where: str = "a layer"
    ) -> None:
        """Raise ``ValueError`` naming ``where``, the value and the bound if ``config`` is out
        of range for an ``in_features -> out_features`` layer; allocates nothing.

        The default bound is LoRA's: ``rank <= max(d_in, d_out)``.  A rank above
        ``min(d_in, d_out)`` adds parameters but no rank to ``ΔW = B A``; it is accepted (as
        PEFT does) because ``all-linear`` targets often include a narrow output layer, but
        beyond ``max(d_in, d_out)`` even the wider factor outgrows a dense square of the layer's
        larger side, which only a mistake asks for (``rank=100000`` on a 384-wide encoder).
        Kinds with another meaning of rank override it."""
        bound = max(in_features, out_features)
        if config.rank > bound:
            raise ValueError(
                f"{where} ({in_features} -> {out_features}): {config.kind} rank {config.rank} is "
                f"out of range; expected 1 <= rank <= {bound} = max(d_in, d_out) (ranks above "
                f"min(d_in, d_out) = {min(in_features, out_features)} add no rank to the update; "
                f"lower adapter.rank or leave this layer out of target_modules)"
            )

    @abstractmethod
    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """The update for input ``x (..., i)``: a tensor ``(..., o)``."""

    @abstractmethod
    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """The exact dense update ``ΔW (o × i)``, in the adapter's dtype."""

    @abstractmethod
    def param_roles(self) -> dict[str, ParamRole]:
        """Local parameter name -> role, for every parameter of this adapter."""

    def initialize(self, weight: Tensor) -> None:
        """Called once with the frozen weight ``(o × i)`` when the adapter is first created.

        Kinds that start from the weight (DoRA's magnitude) override it; loading a saved
        adapter overwrites whatever this set.
        """

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The whole adapted output ``x Wᵀ + b + delta(x)`` in one fused node, or ``None`` when
        this kind (or its current mode, e.g. dropout in training) has no fused path."""
        return None

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(z (..., r), up (o × r))`` with ``delta(x) == z @ up.T``, or ``None``."""
        return None

    def forward(
        self, x: Tensor, base_out: Tensor, *, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """Add the update to the frozen layer's output ``base_out (..., o)`` (bias included).

        Low-rank kinds fuse the add into one ``addmm``; others add ``delta(x)``.
        """
        fac = self.factors(x)
        if fac is None:
            return base_out + self.delta(x, weight=weight).to(base_out.dtype)
        z, up = fac
        dt = base_out.dtype
        out = torch.addmm(
            base_out.reshape(-1, self.out_features),
            z.reshape(-1, z.shape[-1]).to(dt),
            up.t().to(dt),
        )
        return out.view(base_out.shape)

    # -- helpers shared by kinds -----------------------------------------------------------
    def saved_state(self) -> dict[str, Tensor]:
        """The tensors ``save_pretrained`` writes: the whole state, unless the kind saves less
        (see :meth:`AdapterConfig.saved`)."""
        return dict(self.state_dict())

    def is_trainable(self, name: str) -> bool:
        """Whether parameter ``name`` trains while this adapter is active."""
        return True

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters of this adapter."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Dropout, then cast ``x`` to the adapter's dtype unless autocast does it."""
        x = self.dropout(x)
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return x

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.config.rank}"


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` (``F.linear`` without bias), kept as one name for readability."""
    return F.linear(x, w)


ADAPTERS: Registry[type[Adapter]] = Registry("adapter kind")


def register_adapter(name: str, config_cls: type[AdapterConfig]):  # type: ignore[no-untyped-def]
    """Class decorator registering an adapter module and its config under ``name``."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        ADAPTERS.register(name)(cls)
        AdapterConfig._kinds[name] = config_cls
        return cls

    return deco


def check_adapter_fit(
    in_features: int, out_features: int, config: AdapterConfig, where: str = "a layer"
) -> None:
    """:meth:`Adapter.check_fit` of ``config.kind``: ``ValueError`` naming ``where``, the value
    and the bound when ``config`` does not fit an ``in_features -> out_features`` layer."""
    ADAPTERS.get(config.kind).check_fit(in_features, out_features, config, where)


def build_adapter(in_features: int, out_features: int, config: AdapterConfig) -> Adapter:
    """Instantiate the adapter of ``config.kind`` for a ``d_in -> d_out`` layer."""
    cls = ADAPTERS.get(config.kind)
    return cls(in_features, out_features, config)


def iter_param_roles(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, ParamRole]]:
    """Every parameter under ``module`` that some sub-module tags with a role.

    Yields ``(qualified name, parameter, role)``; parameters of modules without a
    ``param_roles()`` method are skipped.
    """
    for mod_name, mod in module.named_modules():
        roles = getattr(mod, "param_roles", None)
        if not callable(roles):
            continue
        for local, role in roles().items():
            p = mod.get_parameter(local)
            yield (f"{mod_name}.{local}" if mod_name else local), p, role
