"""A mixture of adapter experts on one linear layer, and its configuration.

Shape legend: ``n`` tokens (leading dims flattened), ``i``/``o`` layer sizes, ``e`` experts.

``y = x Wᵀ + b + Σ_e g_e(x) · delta_e(x)`` with ``g`` the router's sparse gates.  Experts live
in banks of stacked parameters (one bank per kind and growth step, see
:mod:`moracl.experts.banks`); each bank is one dense-masked computation, so the forward has
static shapes, no token dispatch and no host synchronisation.  How the routing runs is the
:class:`~moracl.experts.backend.RoutingBackend` (config, or :func:`routing_backend`).

Per-call context — task ids, and where to put the routing result — reaches the mixture
through :class:`~moracl.experts.context.RoutingContext`, which the model wrapper installs
before a forward and removes after it (see ``MoRAModel.forward``); nothing is stored on the
mixture during ``forward``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moracl.adapters
import moracl.experts.routers  # noqa: F401  (registers the router types)
from moracl.adapters.base import AdapterConfig, ParamRole, check_adapter_fit
from moracl.adapters.fused import fused_enabled, in_backward
from moracl.experts.backend import RoutingBackend, resolve_backend
from moracl.experts.banks import BANKS, ExpertBank, build_bank
from moracl.experts.context import RoutingContext, sample_task_ids, token_task_ids
from moracl.experts.gating import Gating, Routed
from moracl.experts.per_sample import (
    KeepingGating,
    KeptGating,
    SampleGating,
    SampleRouting,
    active_tokens,
    declared_token_mask,
    expand_result,
    keep_routing,
    keeping_routing,
    kept_routing,
    pool_weights,
    token_mask,
)
from moracl.experts.route_node import route_node
from moracl.experts.routers.base import Router, TaskIds, as_task_ids
from moracl.experts.routers.config import RoutePer, RouterConfig
from moracl.experts.routers.registry import build_router
from moracl.experts.routing import RoutingResult, routing_dtype
from moracl.guard import check_int
from moracl.parse_fields import check_field_types, check_string_keys, show

__all__ = [
    "MAX_EXPERTS",
    "MAX_TASKS",
    "ExpertGroup",
    "Mixture",
    "MixtureConfig",
    "RoutingContext",
    "check_mixture_fit",
]


@dataclass(frozen=True)
class ExpertGroup:
    """``count`` experts configured by ``adapter`` (one bank)."""

    adapter: AdapterConfig
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count <= 0:
            raise ValueError(f"an expert group needs count > 0, got {self.count!r}")


@dataclass(frozen=True)
class MixtureConfig:
    """A mixture of adapter experts, configured like a single adapter.

    ``MixtureConfig(kind="lora", rank=16, experts=8, router=RouterConfig(type="topk", k=2))``
    gives 8 LoRA experts of rank 16 with the kind's default settings.  For other settings of
    the experts (``alpha``, ...) or experts of several kinds give ``groups`` instead, e.g.
    ``(ExpertGroup(AdapterConfig(kind="lora", rank=16, alpha=32), 6),
    ExpertGroup(AdapterConfig(kind="mora", rank=16), 2))``; ``kind``, ``rank`` and ``experts``
    are then unused.

    Args:
        kind: the experts' adapter kind (one with a stacked bank: ``lora``, ``mora``,
            ``adalora``).
        rank: the experts' rank.
        experts: how many.
        router: the router (:class:`~moracl.experts.routers.config.RouterConfig`).
        groups: the experts as typed groups (overrides ``kind``, ``rank``, ``experts``).
        backend: how the routing runs (:class:`~moracl.experts.backend.RoutingBackend`).
    """

    kind: str = "lora"
    rank: int = 8
    experts: int = 4
    router: RouterConfig = field(default_factory=RouterConfig)
    groups: tuple[ExpertGroup, ...] = ()
    backend: RoutingBackend = RoutingBackend.AUTO

    def __post_init__(self) -> None:
        if isinstance(self.router, Mapping):
            object.__setattr__(self, "router", RouterConfig.from_dict(self.router))
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        groups = tuple(_group_from_dict(g, f"groups[{i}]") for i, g in enumerate(self.groups))
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "backend", RoutingBackend.parse(self.backend))
        if not groups and (
            not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts <= 0
        ):
            raise ValueError(f"experts must be a positive integer, got {self.experts!r}")
        self.expert_groups()  # validates the expert configs

    def expert_groups(self) -> list[ExpertGroup]:
        """The banks this mixture starts with."""
        if self.groups:
            return list(self.groups)
        try:
            adapter = AdapterConfig.from_dict({"kind": self.kind, "rank": self.rank})
        except ValueError as e:
            raise ValueError(
                f"MixtureConfig(kind={self.kind!r}, rank={self.rank!r}): {e}; set the experts' "
                "other fields with groups=(ExpertGroup(AdapterConfig(...), count),)"
            ) from None
        return [ExpertGroup(adapter, self.experts)]

    @property
    def num_experts(self) -> int:
        return sum(g.count for g in self.expert_groups())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mixture": True,
            "kind": self.kind,
            "rank": self.rank,
            "experts": self.experts,
            "router": self.router.to_dict(),
            "groups": [{"adapter": g.adapter.to_dict(), "count": g.count} for g in self.groups],
            "backend": self.backend.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureConfig:
        """Build from a plain mapping (``to_dict``'s form, parsed JSON or YAML); anything
        malformed raises ``ValueError`` naming the key and what was expected.

        The key ``options`` of earlier forms (extra fields of the experts' config) is read as
        one typed group: ``groups=[{adapter: {kind, rank, **options}, count: experts}]``."""
        data = dict(check_string_keys(data, "a mixture config"))
        if data.pop("mixture", True) is not True:
            raise ValueError("mixture must be true in a mixture config")
        options = data.pop("options", None)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for a mixture; valid keys: {sorted(valid)}")
        check_field_types(cls, data, skip=("router", "groups"))
        if "router" in data and not isinstance(data["router"], RouterConfig):
            try:
                data["router"] = RouterConfig.from_dict(data["router"])
            except ValueError as e:
                raise ValueError(f"router: {e}") from None
        if "groups" in data:
            groups = data["groups"]
            if not isinstance(groups, (list, tuple)):
                raise ValueError(
                    f"groups must be a list of {{adapter, count}}, got {type(groups).__name__}"
                )
            data["groups"] = tuple(
                _group_from_dict(g, f"groups[{i}]") for i, g in enumerate(groups)
            )
        if options:
            data["groups"] = _options_group(data, options)
        return cls(**data)


def _options_group(data: dict[str, Any], options: Any) -> tuple[ExpertGroup, ...]:
    """The typed group an earlier form's ``options`` describe."""
    options = dict(check_string_keys(options, "options"))
    clash = sorted({"kind", "rank"} & set(options))
    if clash:
        raise ValueError(f"options must not repeat {clash}: set them on the mixture itself")
    if data.get("groups"):
        raise ValueError("options and groups both configure the experts; give groups only")
    kind, rank = data.get("kind", "lora"), data.get("rank", 8)
    try:
        adapter = AdapterConfig.from_dict({**options, "kind": kind, "rank": rank})
    except ValueError as e:
        raise ValueError(f"options: {e}") from None
    return (ExpertGroup(adapter, data.get("experts", 4)),)


def _group_from_dict(data: Any, where: str) -> ExpertGroup:
    """An :class:`ExpertGroup` from ``{"adapter": {...}, "count": n}`` (or one already)."""
    if isinstance(data, ExpertGroup):
        return data
    data = check_string_keys(data, where)
    if set(data) != {"adapter", "count"}:
        raise ValueError(
            f"{where} must have exactly the keys ['adapter', 'count'], got {sorted(data)}"
        )
    count = data["count"]
    if not isinstance(count, int) or isinstance(count, bool):
        raise ValueError(f"{where}.count must be an integer, got {show(count)}")
    adapter = data["adapter"]
    if not isinstance(adapter, AdapterConfig):
        try:
            adapter = AdapterConfig.from_dict(adapter)
        except ValueError as e:
            raise ValueError(f"{where}.adapter: {e}") from None
    return ExpertGroup(adapter, count)


#: the most experts one mixture layer may hold (growth included): every bank computes every
#: expert's slice for every token (dense masking), so cost grows with the expert count
MAX_EXPERTS = 1024
#: the most task rows a router's expert masks may have (each row holds one flag per expert)
MAX_TASKS = 65536


def _router_configs(config: RouterConfig, path: str = "router") -> list[tuple[str, RouterConfig]]:
    out = [(path, config)]
    for name in config.nested:
        nested = getattr(config, name)
        if isinstance(nested, RouterConfig):
            out += _router_configs(nested, f"{path}.{name}")
    return out


def check_mixture_fit(
    in_features: int, out_features: int, config: MixtureConfig, where: str = "a layer"
) -> None:
    """Raise ``ValueError`` naming ``where``, the value and the bound if ``config`` does not
    fit an ``in_features -> out_features`` layer; allocates nothing.

    Each expert group's rank follows its kind's bound (:meth:`Adapter.check_fit`), the kinds
    must have a stacked bank, the experts number at most :data:`MAX_EXPERTS` and the routers'
    ``num_tasks`` at most :data:`MAX_TASKS`."""
    for i, group in enumerate(config.expert_groups()):
        if group.adapter.kind not in BANKS:
            raise ValueError(
                f"adapter kind {group.adapter.kind!r} cannot be a mixture expert; expected one "
                f"of {sorted(BANKS)}"
            )
        check_adapter_fit(in_features, out_features, group.adapter, f"{where}, expert group {i}")
    check_expert_count(config.num_experts, where)
    for path, router in _router_configs(config.router):
        if router.num_tasks > MAX_TASKS:
            raise ValueError(
                f"{where}: {path}.num_tasks={router.num_tasks} is out of range; expected "
                f"num_tasks <= {MAX_TASKS}"
            )


def check_expert_count(count: int, where: str = "a layer") -> None:
    """``ValueError`` naming ``where`` unless ``count`` is an integer (not a bool) with
    ``1 <= count <=`` :data:`MAX_EXPERTS`."""
    if not isinstance(count, int) or isinstance(count, bool):
        raise ValueError(f"{where}: the number of experts must be an integer, got {count!r}")
    if not 1 <= count <= MAX_EXPERTS:
        raise ValueError(
            f"{where}: {count} experts is out of range; expected 1 <= experts <= "
            f"{MAX_EXPERTS} per layer (every expert is computed for every token)"
        )


class Mixture(nn.Module):
    """Experts (in banks) and a router on one layer.

    Build one from a config with :meth:`from_config`, or from its parts:
    ``Mixture(banks=[...], router=router)``.  To its layer it offers what an adapter does
    (:meth:`fused_forward`, ``forward(x, base_out, weight=, bias=)``, :meth:`delta`,
    :meth:`param_roles`, ...).

    Args:
        banks: the expert banks, in expert order (all of one ``in -> out`` layer).
        router: routes over the banks' experts together.
        backend: how the routing runs (:func:`~moracl.experts.backend.routing_backend`
            overrides it for a block).
    """

    needs_weight: ClassVar[bool] = False

    def __init__(
        self,
        *,
        banks: Sequence[ExpertBank],
        router: Router,
        backend: RoutingBackend = RoutingBackend.AUTO,
    ) -> None:
        super().__init__()
        banks = list(banks)
        if not banks or not all(isinstance(b, ExpertBank) for b in banks):
            raise ValueError(f"banks must be a non-empty list of ExpertBank, got {banks!r}")
        shapes = {(b.in_features, b.out_features) for b in banks}
        if len(shapes) != 1:
            raise ValueError(
                f"the banks must share one layer shape (in, out), got {sorted(shapes)}"
            )
        if not isinstance(router, Router):
            raise ValueError(f"router must be a Router, got {type(router).__name__}")
        ((self.in_features, self.out_features),) = shapes
        total = sum(b.num_experts for b in banks)
        if router.num_experts != total or router.in_features != self.in_features:
            raise ValueError(
                f"the router routes {router.num_experts} experts of {router.in_features} inputs; "
                f"the banks hold {total} experts of {self.in_features} inputs"
            )
        self.banks = nn.ModuleList(banks)
        self.router = router
        self.backend = RoutingBackend.parse(backend)
        self.context: RoutingContext | None = None
        #: the task ids of the model's last forward with gradients, for activation
        #: checkpointing's recomputation of this layer in the backward (no routing recorded)
        self.recompute_context: RoutingContext | None = None

    @classmethod
    def from_config(cls, in_features: int, out_features: int, config: MixtureConfig) -> Mixture:
        """The mixture ``config`` describes on an ``in_features -> out_features`` layer."""
        check_mixture_fit(in_features, out_features, config)  # before any allocation
        banks = [
            build_bank(in_features, out_features, g.adapter, g.count)
            for g in config.expert_groups()
        ]
        router = build_router(
            config.router, in_features, sum(g.count for g in config.expert_groups())
        )
        return cls(banks=banks, router=router, backend=config.backend)

    @property
    def num_experts(self) -> int:
        return sum(b.num_experts for b in self.expert_banks())

    def expert_banks(self) -> list[ExpertBank]:
        """The banks, in expert order."""
        return [b for b in self.banks if isinstance(b, ExpertBank)]

    # -- routing and compute ------------------------------------------------------------
    @property
    def per_sample(self) -> bool:
        """Whether the router routes whole samples (``per="sample"``, see
        :mod:`moracl.experts.per_sample`) rather than tokens."""
        return getattr(self.router.config, "per", RoutePer.TOKEN) is RoutePer.SAMPLE

    def route(self, x: Tensor, task_ids: Tensor | TaskIds | None = None) -> RoutingResult:
        """Gates for ``x (..., i)`` through the router's own ``route`` (the ``naive``
        backend's routing); ``task_ids`` per batch row or per token (per batch row for a
        router that routes per sample)."""
        lead = x.shape[:-1]
        if self.per_sample:
            ids = None
            if task_ids is not None:
                ids = as_task_ids(
                    task_ids if isinstance(task_ids, TaskIds) else sample_task_ids(task_ids, lead)
                )
            return expand_result(self._route_samples(x, ids), lead[1:].numel())
        tid: Tensor | TaskIds | None = task_ids
        if isinstance(task_ids, Tensor):
            tid = token_task_ids(task_ids, lead)
        active = self._active(x)
        return self.router(x.reshape(-1, self.in_features), task_ids=tid, active=active)

    def _sample_gating(self, gating: Gating, x: Tensor, backend: RoutingBackend) -> Gating:
        """``gating`` (built for the samples) routing the samples of ``x (b, t, ..., i)``: by
        their pooled logits, or in a :func:`~moracl.experts.per_sample.first_call_routing`
        block after its first call, as that call routed them."""
        weights = self._pool_weights(x, routing_dtype(x.dtype))  # (b, t)
        kept = kept_routing(self, weights.shape[0])
        if kept is not None:
            gating = KeptGating(kept, gating)
        elif keeping_routing():
            gating = KeepingGating(gating, self)
        return SampleGating(gating, weights, backend)

    def _route_samples(self, x: Tensor, ids: TaskIds | None) -> RoutingResult:
        """The router's own routing of the samples of ``x (b, t, ..., i)`` (``(b, ·)``), or
        the one kept in a :func:`~moracl.experts.per_sample.first_call_routing` block."""
        lead = x.shape[:-1]
        kept = kept_routing(self, lead[0] if len(lead) else 1)
        if kept is not None:
            gates, probs, chosen, indices, aux = kept.routed
            return self.router.result(gates, probs, chosen, indices, dict(zip(kept.names, aux)))
        result = self.router(self._pooled(x), task_ids=ids)
        if keeping_routing():
            names = tuple(result.aux_losses)
            aux = tuple(result.aux_losses[n] for n in names)
            routed = Routed(result.gates, result.probs, result.chosen, result.indices, aux)
            keep_routing(self, SampleRouting.of(routed, names))
        return result

    def _pooled(self, x: Tensor) -> Tensor:
        """``(b, i)`` each row's mean token input (see :func:`pool_weights`)."""
        w = self._pool_weights(x, x.dtype)  # (b, t)
        b, t = w.shape
        return torch.einsum("bt,bti->bi", w, x.reshape(b, t, self.in_features))

    def _mask_scope(self, x: Tensor) -> AbstractContextManager[None]:
        """The token mask of this mixture's side for its input ``x`` where its context has an
        encoder-decoder's two (:class:`~moracl.experts.context.SideMasks`) and no mask is
        declared, and the token mask of the forward that activation checkpointing
        recomputes, declared again while it does (the recomputation runs outside that
        forward's block); nothing otherwise."""
        ctx = self.context
        recomputing = ctx is None and in_backward()
        if recomputing:
            ctx = self.recompute_context
        if ctx is None:
            return nullcontext()
        own = None if ctx.sides is None else ctx.sides.mask_for(self, x)
        if own is not None and declared_token_mask() is None:
            return token_mask(own[0], strict=own[1])
        if recomputing and ctx.padding is not None:
            return token_mask(ctx.padding[0], strict=ctx.padding[1])
        return nullcontext()

    def _pool_weights(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """:func:`~moracl.experts.per_sample.pool_weights` for ``x (b, t, ..., i)`` under the
        declared token mask (see :meth:`_mask_scope`): ``(b, t·...)``."""
        with self._mask_scope(x):
            return pool_weights(x.shape[:-1], x.device, dtype)

    def _real_tokens(self, x: Tensor) -> Tensor | None:
        """``(n,)`` bool, the real tokens of ``x (..., i)`` under the declared token mask (see
        :meth:`_mask_scope`); ``None``: every token."""
        with self._mask_scope(x):
            return active_tokens(x.shape[:-1], x.device)

    def _active(self, x: Tensor) -> Tensor | None:
        """The tokens a per-token router's auxiliary losses count (:meth:`_real_tokens`);
        ``None`` for routing per sample, whose losses are over the samples."""
        return None if self.per_sample else self._real_tokens(x)

    def _task_ids(self, lead: torch.Size) -> TaskIds | None:
        ctx = self.context
        if ctx is None and in_backward():  # activation checkpointing recomputes this layer
            ctx = self.recompute_context
        if ctx is None:
            return None
        return ctx.sample_ids(lead) if self.per_sample else ctx.token_ids(lead)

    def _keep_input(self, x: Tensor) -> None:
        ctx = self.context
        if ctx is not None and ctx.router_inputs is not None and not in_backward():
            routed = self._pooled(x) if self.per_sample else x.reshape(-1, self.in_features)
            ctx.keep_input(self, routed)

    def _record(self, result: RoutingResult, tokens: Tensor | None) -> None:
        """Keep ``result`` in the context, with the real tokens its statistics count
        (:meth:`_real_tokens` of its input)."""
        if self.context is not None and not in_backward():  # a recomputation: kept already
            if tokens is not None:
                result = dataclasses.replace(result, tokens=tokens)
            self.context.record(self, result)

    def mix(self, x: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e gates[:, e] · delta_e(x)`` for ``x (..., i)``, ``gates (n, e)``: ``(..., o)``."""
        x2 = x.reshape(-1, self.in_features)
        out, start = None, 0
        for bank in self.expert_banks():
            part = bank.delta(x2, gates[:, start : start + bank.num_experts])
            out = part if out is None else out + part
            start += bank.num_experts
        assert out is not None
        return out.view(*x.shape[:-1], self.out_features)

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """The update for ``x (..., i)``, routed in this forward's context: ``(..., o)``.

        Under ``naive`` the router's own ``route`` and a loop over the experts; under any
        other backend the router's gating in one autograd node (:mod:`moracl.experts.
        route_node`; the router's ``route`` under plain autograd where fused nodes step aside,
        see :func:`~moracl.adapters.fused.fused_enabled`) and the banks' stacked updates."""
        lead = x.shape[:-1]
        backend = resolve_backend(self.backend, x.device)
        tokens = self._real_tokens(x)
        if backend is not RoutingBackend.NAIVE and fused_enabled(*self.router.parameters()):
            result = self._route_node(x, backend, None if self.per_sample else tokens)
        else:
            result = self.route(x, self._task_ids(lead))
        self._keep_input(x)
        self._record(result, tokens)
        x = _cast(x, self._dtype())
        if backend is RoutingBackend.NAIVE:
            return self.naive_delta(x, result.gates)
        return self.mix(x, result.gates)

    def _route_node(
        self, x: Tensor, backend: RoutingBackend, active: Tensor | None
    ) -> RoutingResult:
        """The routing of ``x (..., i)`` by the router's gating for ``backend``, in one
        autograd node on the logits ``x Rᵀ (n, l)``; ``active``: :meth:`_active`'s tokens."""
        lead = x.shape[:-1]
        gating: Gating = self.router.gating(self._task_ids(lead), backend, active)
        if self.per_sample:
            gating = self._sample_gating(gating, x, backend)
        weights = self.router.logit_weights()  # (l, i)
        logits = F.linear(x.reshape(-1, self.in_features), weights.to(x.dtype))  # (n, l)
        routed = route_node(logits, gating)
        aux = dict(zip(gating.aux_names, routed.aux))
        return self.router.result(routed.gates, routed.probs, routed.chosen, routed.indices, aux)

    def _fused_bank(self, x: Tensor) -> ExpertBank | None:
        banks = self.expert_banks()
        if len(banks) == 1 and banks[0].fuses(x):
            return banks[0]
        return None

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The whole output ``x Wᵀ + b + Σ_e g_e(x) · delta_e(x)`` as the backend computes it:
        one bank with a routed node (LoRA experts, :mod:`moracl.experts.routed_lora`; MoRA
        experts on CUDA, :mod:`moracl.experts.routed_mora`) under a backend other than
        ``naive`` runs the frozen matmul, the router and the gated experts in one autograd
        node; ``None`` otherwise (the layer then adds :meth:`delta`)."""
        bank = self._fused_bank(x)
        backend = resolve_backend(self.backend, x.device)
        if bank is None or backend is RoutingBackend.NAIVE:
            return None
        lead = x.shape[:-1]
        tokens = self._real_tokens(x)  # once: the losses' tokens and the record's
        active = None if self.per_sample else tokens
        gating: Gating = self.router.gating(self._task_ids(lead), backend, active)
        if self.per_sample:
            gating = self._sample_gating(gating, x, backend)
        self._keep_input(x)
        parts = self.router.logit_parts()
        out, routed = bank.routed_linear(x, weight, bias, parts, gating, backend)
        if self.context is not None:
            aux = dict(zip(gating.aux_names, routed.aux))
            result = self.router.result(
                routed.gates, routed.probs, routed.chosen, routed.indices, aux
            )
            self._record(result, tokens)
        return out

    def forward(
        self, x: Tensor, base_out: Tensor, *, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """``base_out (..., o)`` plus this mixture's update for ``x (..., i)``."""
        return base_out + self.delta(x, weight=weight).to(base_out.dtype)

    def _dtype(self) -> torch.dtype:
        return next(self.banks.parameters()).dtype

    def initialize(self, weight: Tensor) -> None:
        """Nothing to derive from the frozen weight (experts start as their kinds do)."""

    # -- dense forms ----------------------------------------------------------------------
    def delta_weight(self, weight: Tensor | None = None, gates: Tensor | None = None) -> Tensor:
        """``Σ_e gates[e] · ΔW_e (o × i)`` for a fixed gate vector ``gates (e,)`` (e.g. one
        task's routing); routing that depends on the input has no single dense update."""
        if gates is None:
            raise ValueError("a mixture's dense update needs a fixed gate vector: gates=(e,)")
        if gates.shape != (self.num_experts,):
            raise ValueError(
                f"gates must have shape ({self.num_experts},), got {tuple(gates.shape)}"
            )
        total, start = None, 0
        for bank in self.expert_banks():
            for j in range(bank.num_experts):
                w = gates[start + j] * bank.expert_weight(j)
                total = w if total is None else total + w
            start += bank.num_experts
        assert total is not None
        return total

    def naive_delta(self, x: Tensor, gates: Tensor) -> Tensor:
        """The reference: a plain loop over experts, ``Σ_e gates[:, e] · delta_e(x)``."""
        x2 = x.reshape(-1, self.in_features)
        out = torch.zeros(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        start = 0
        for bank in self.expert_banks():
            for j in range(bank.num_experts):
                out = out + gates[:, start + j, None].to(x2.dtype) * bank.expert_delta(x2, j)
            start += bank.num_experts
        return out.view(*x.shape[:-1], self.out_features)

    # -- growth ---------------------------------------------------------------------------
    def grow(self, adapter: AdapterConfig, count: int) -> ExpertBank:
        """Append ``count`` new trainable experts (a new bank); the router grows with them."""
        check_adapter_fit(self.in_features, self.out_features, adapter)
        check_expert_count(self.num_experts + check_int("count", count, ge=1))
        p = next(self.banks.parameters())
        bank = build_bank(self.in_features, self.out_features, adapter, count).to(p.device, p.dtype)
        self.banks.append(bank)
        self.router.grow(count)
        return bank

    def freeze_experts(self) -> None:
        """Freeze every existing expert (their tensors then never change)."""
        for bank in self.expert_banks():
            bank.frozen = True
            bank.requires_grad_(False)

    def is_trainable(self, name: str) -> bool:
        """Whether parameter ``name`` trains while this mixture is active."""
        if name.startswith("banks."):
            return not self.expert_banks()[int(name.split(".")[1])].frozen
        return True

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters of this mixture."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def param_roles(self) -> dict[str, ParamRole]:
        """Empty: the banks and the router tag their own parameters."""
        return {}

    def extra_repr(self) -> str:
        kinds = [f"{b.config.kind}×{b.num_experts}" for b in self.expert_banks()]
        return f"in={self.in_features}, out={self.out_features}, experts={kinds}"


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the experts' dtype unless autocast casts it."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(dtype)
    return x
