"""A mixture of adapter experts on one linear layer, and its configuration.

Shape legend: ``n`` tokens (leading dims flattened), ``i``/``o`` layer sizes, ``e`` experts.

``y = x Wᵀ + b + Σ_e g_e(x) · delta_e(x)`` with ``g`` the router's sparse gates.  Experts live
in banks of stacked parameters (one bank per kind and growth step); each bank is one
dense-masked computation (see :mod:`moracl.experts.banks`), so the forward has static shapes,
no token dispatch and no host synchronisation.

Per-call context — task ids, and where to put the routing result — reaches the mixture
through :class:`RoutingContext`, which the model wrapper installs before a forward and removes
after it (see ``MoRAModel.forward``); nothing is stored on the mixture during ``forward``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

import moracl.experts.routers  # noqa: F401  (registers the router types)
from moracl.adapters.base import Adapter, AdapterConfig, ParamRole, check_adapter_fit
from moracl.adapters.fused import routed_lora_linear
from moracl.experts.banks import BANKS, ExpertBank, LoRABank, build_bank
from moracl.experts.per_sample import SampleRouteOp, expand_result, pool_weights
from moracl.experts.route_ops import RouteOp
from moracl.experts.routers.base import Router, build_router
from moracl.experts.routers.config import RouterConfig
from moracl.experts.routing import RoutingResult, concat_results, routing_dtype
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
    gives 8 LoRA experts of rank 16; ``options`` are extra fields of the expert kind's config
    (e.g. ``{"alpha": 32}``).  For experts of several kinds give ``groups`` instead, e.g.
    ``(ExpertGroup(AdapterConfig(kind="lora", rank=16), 6),
    ExpertGroup(AdapterConfig(kind="mora", rank=16), 2))``.
    """

    kind: str = "lora"
    rank: int = 8
    experts: int = 4
    router: RouterConfig = field(default_factory=RouterConfig)
    options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
    groups: tuple[ExpertGroup, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        if isinstance(self.router, Mapping):
            object.__setattr__(self, "router", RouterConfig.from_dict(self.router))
        groups = tuple(_group_from_dict(g, f"groups[{i}]") for i, g in enumerate(self.groups))
        object.__setattr__(self, "groups", groups)
        if not groups and (not isinstance(self.experts, int) or self.experts <= 0):
            raise ValueError(f"experts must be a positive integer, got {self.experts!r}")
        self.expert_groups()  # validates the expert configs

    def expert_groups(self) -> list[ExpertGroup]:
        """The banks this mixture starts with."""
        if self.groups:
            return list(self.groups)
        options = dict(self.options)
        clash = sorted({"kind", "rank"} & set(options))
        if clash:
            raise ValueError(f"options must not repeat {clash}: set them on the mixture itself")
        try:
            adapter = AdapterConfig.from_dict({**options, "kind": self.kind, "rank": self.rank})
        except ValueError as e:
            raise ValueError(f"options: {e}") from None
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
            "options": dict(self.options),
            "groups": [{"adapter": g.adapter.to_dict(), "count": g.count} for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureConfig:
        """Build from a plain mapping (``to_dict``'s form, parsed JSON or YAML); anything
        malformed raises ``ValueError`` naming the key and what was expected."""
        data = dict(check_string_keys(data, "a mixture config"))
        if data.pop("mixture", True) is not True:
            raise ValueError("mixture must be true in a mixture config")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for a mixture; valid keys: {sorted(valid)}")
        check_field_types(cls, data, skip=("router", "options", "groups"))
        if "router" in data and not isinstance(data["router"], RouterConfig):
            try:
                data["router"] = RouterConfig.from_dict(data["router"])
            except ValueError as e:
                raise ValueError(f"router: {e}") from None
        if "options" in data and not isinstance(data["options"], tuple):
            data["options"] = dict(check_string_keys(data["options"], "options"))
        if "groups" in data:
            groups = data["groups"]
            if not isinstance(groups, (list, tuple)):
                raise ValueError(
                    f"groups must be a list of {{adapter, count}}, got {type(groups).__name__}"
                )
            data["groups"] = tuple(
                _group_from_dict(g, f"groups[{i}]") for i, g in enumerate(groups)
            )
        return cls(**data)


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
    for name in ("outer", "inner"):
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


@dataclass
class RoutingContext:
    """What the model wrapper hands its mixtures for one forward.

    Attributes:
        task_ids: ``(b,)`` one task id per batch row (or ``(n,)`` per token), or ``None``.
        results: filled by each mixture with its :class:`RoutingResult` (see
            :meth:`record`).
        router_inputs: a dict to fill with each mixture's router input (see
            :meth:`keep_input`), or ``None`` to keep none.
    """

    task_ids: Tensor | None = None
    results: dict[nn.Module, RoutingResult] = field(default_factory=dict)
    router_inputs: dict[nn.Module, Tensor] | None = None
    _per_token: dict[tuple[int, ...], Tensor] = field(default_factory=dict)

    def keep_input(self, mixture: nn.Module, routed: Tensor) -> None:
        """Keep what ``mixture``'s router read: ``(n, i)`` tokens, or ``(b, i)`` samples' means
        for a router per sample (calls concatenated in call order; in the graph, so a loss on
        them reaches the layers below); only when :attr:`router_inputs` is a dict
        (``MoRAModel.record_router_inputs``)."""
        if self.router_inputs is None:
            return
        old = self.router_inputs.get(mixture)
        self.router_inputs[mixture] = routed if old is None else torch.cat([old, routed])

    def record(self, mixture: nn.Module, result: RoutingResult) -> None:
        """Keep ``mixture``'s routing of this forward. A mixture called more than once (an
        encoder running groups of rows separately, a block repeated) gets the calls' tokens
        concatenated in call order (:func:`~moracl.experts.routing.concat_results`)."""
        old = self.results.get(mixture)
        self.results[mixture] = result if old is None else concat_results(old, result)

    def token_ids(self, lead: torch.Size) -> Tensor | None:
        """The task ids per token for an input with leading shape ``lead``; one tensor per
        shape, shared by every layer (so its range is checked once per forward)."""
        if self.task_ids is None:
            return None
        key = tuple(lead)
        if key not in self._per_token:
            self._per_token[key] = token_task_ids(self.task_ids, lead)
        return self._per_token[key]


def sample_task_ids(task_ids: Tensor | None, lead: torch.Size) -> Tensor | None:
    """Per-row ``(b,)`` task ids, checked against an input with leading shape ``lead``, for a
    router that routes per sample (``None`` passes through)."""
    if task_ids is None:
        return None
    b = lead[0] if len(lead) else 1
    if task_ids.ndim != 1 or task_ids.shape[0] != b:
        raise ValueError(
            f"per-sample routing needs one task id per batch row ({b}), got task_ids of shape "
            f"{tuple(task_ids.shape)} for an input with leading shape {tuple(lead)}"
        )
    return task_ids


def token_task_ids(task_ids: Tensor, lead: torch.Size) -> Tensor:
    """Per-row ``(b,)`` (or per-token) task ids -> one per token ``(n,)`` for input ``lead``."""
    n = lead.numel()
    if task_ids.ndim == 1 and task_ids.shape[0] == n:
        return task_ids
    if task_ids.ndim == 1 and len(lead) >= 1 and task_ids.shape[0] == lead[0]:
        return task_ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(n)
    raise ValueError(
        f"task_ids of shape {tuple(task_ids.shape)} fit neither the batch ({lead[0]} rows) nor "
        f"the tokens ({n}) of an input with leading shape {tuple(lead)}"
    )


class Mixture(Adapter):
    """Experts (in banks) and a router on one layer; an :class:`Adapter` to the layer."""

    def __init__(self, in_features: int, out_features: int, config: MixtureConfig) -> None:
        check_mixture_fit(in_features, out_features, config)  # before any allocation
        rank = config.expert_groups()[0].adapter.rank
        super().__init__(in_features, out_features, AdapterConfig(kind="lora", rank=rank))
        self.mixture_config = config
        self.banks = nn.ModuleList(
            build_bank(in_features, out_features, g.adapter, g.count)
            for g in config.expert_groups()
        )
        self.router: Router = build_router(config.router, in_features, self.num_experts)
        self.context: RoutingContext | None = None

    @property
    def num_experts(self) -> int:
        return sum(b.num_experts for b in self._banks())

    def _banks(self) -> list[ExpertBank]:
        return [b for b in self.banks if isinstance(b, ExpertBank)]

    # -- routing and compute ------------------------------------------------------------
    @property
    def per_sample(self) -> bool:
        """Whether the router routes whole samples (``per="sample"``, see
        :mod:`moracl.experts.per_sample`) rather than tokens."""
        return self.router.config.per == "sample"

    def route(self, x: Tensor, task_ids: Tensor | None = None) -> RoutingResult:
        """Gates for ``x (..., i)``; ``task_ids`` per batch row or per token (per batch row
        for a router that routes per sample)."""
        if self.per_sample:
            return self._route_samples(x, task_ids)
        x2 = x.reshape(-1, self.in_features)
        tid = None if task_ids is None else token_task_ids(task_ids, x.shape[:-1])
        return self.router(x2, task_ids=tid)

    def _route_samples(self, x: Tensor, task_ids: Tensor | None) -> RoutingResult:
        """Route each row of ``x (b, t..., i)`` by the mean of its tokens (padding left out
        under a declared :func:`~moracl.experts.per_sample.token_mask`)."""
        lead = x.shape[:-1]
        pooled = self._pooled(x)  # (b, i)
        result = self.router(pooled, task_ids=sample_task_ids(task_ids, lead))
        if self.context is not None:
            self.context.keep_input(self, pooled)
        return expand_result(result, lead[1:].numel())

    def _pooled(self, x: Tensor) -> Tensor:
        """``(b, i)`` each row's mean token input (see :func:`pool_weights`)."""
        w = pool_weights(x.shape[:-1], x.device, x.dtype)  # (b, t)
        b, t = w.shape
        return torch.einsum("bt,bti->bi", w, x.reshape(b, t, self.in_features))

    def _route_in_context(self, x: Tensor) -> RoutingResult:
        ctx = self.context
        if ctx is None:
            return self.route(x)
        if self.per_sample:
            result = self._route_samples(x, ctx.task_ids)
        else:
            x2 = x.reshape(-1, self.in_features)
            result = self.router(x2, task_ids=ctx.token_ids(x.shape[:-1]))
            ctx.keep_input(self, x2)
        ctx.record(self, result)
        return result

    def mix(self, x: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e gates[:, e] · delta_e(x)`` for ``x (..., i)``, ``gates (n, e)``: ``(..., o)``."""
        x2 = x.reshape(-1, self.in_features)
        out, start = None, 0
        for bank in self._banks():
            part = bank.delta(x2, gates[:, start : start + bank.num_experts])
            out = part if out is None else out + part
            start += bank.num_experts
        assert out is not None
        return out.view(*x.shape[:-1], self.out_features)

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        result = self._route_in_context(x)
        return self.mix(self._input(x, self._dtype()), result.gates)

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """One LoRA bank (the common case): the frozen matmul, the router and the gated
        experts in one autograd node (see :func:`moracl.adapters.fused.routed_lora_linear`)."""
        banks = self._banks()
        if len(banks) != 1 or not isinstance(banks[0], LoRABank):
            return None
        if self.training and self.mixture_config.expert_groups()[0].adapter.dropout > 0:
            return None
        bank = banks[0]
        a = rearrange(bank.lora_A, "e r i -> (e r) i")
        b = rearrange(bank.lora_B, "o e r -> o (e r)")
        ctx = self.context
        op: RouteOp
        if self.per_sample:
            lead = x.shape[:-1]
            w = pool_weights(lead, x.device, routing_dtype(x.dtype))  # (b, t)
            tid = None if ctx is None else sample_task_ids(ctx.task_ids, lead)
            op = SampleRouteOp(self.router.route_op(tid), w)
        else:
            op = self.router.route_op(None if ctx is None else ctx.token_ids(x.shape[:-1]))
        if ctx is not None and ctx.router_inputs is not None:
            x2 = x.reshape(-1, self.in_features)
            ctx.keep_input(self, self._pooled(x) if self.per_sample else x2)
        r = self.router.logit_weights()
        out, gates, probs, aux = routed_lora_linear(x, weight, bias, a, b, r, bank.scaling, op)
        if ctx is not None:
            ctx.record(self, op.result(gates, probs, aux))
        return out

    def forward(
        self, x: Tensor, base_out: Tensor, *, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        return base_out + self.delta(x, weight=weight).to(base_out.dtype)

    def _dtype(self) -> torch.dtype:
        return next(self.banks.parameters()).dtype

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
        for bank in self._banks():
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
        for bank in self._banks():
            for j in range(bank.num_experts):
                out = out + gates[:, start + j, None] * bank.expert_delta(x2, j)
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
        for bank in self._banks():
            bank.frozen = True
            bank.requires_grad_(False)

    def is_trainable(self, name: str) -> bool:
        if name.startswith("banks."):
            return not self._banks()[int(name.split(".")[1])].frozen
        return True

    def param_roles(self) -> dict[str, ParamRole]:
        return {}

    def extra_repr(self) -> str:
        kinds = [f"{b.config.kind}×{b.num_experts}" for b in self._banks()]
        return f"in={self.in_features}, out={self.out_features}, experts={kinds}"
