"""Hierarchical routing: a group router, then an expert router inside each chosen group.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``g`` groups, ``s = e / g`` experts
per group (group ``h`` holds experts ``h·s … h·s + s − 1``).

Composition.  The outer router routes over the ``g`` groups; group ``h`` has its own inner
router over its ``s`` experts (``inner[h]``, built from the inner config).  Then::

    gate(h·s + j) = outer_gate(h) · inner_gate_h(j)        probs likewise

so a token's gates sum to 1 when each level's do.  The inner routers compute for every token
(static shapes) but their auxiliary losses count only the tokens the outer router sent to
their group (a group's router is not trained on other tasks' tokens), and the ``expert.*``
losses are the inner losses averaged over groups weighted by their token counts.  The outer
may be ``task`` (task-conditioned groups) and the inner may itself be hierarchical, which
gives three or more levels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from moracl.experts.routers.base import Router, TaskIds, as_task_ids
from moracl.experts.routers.config import (
    LogitRouterConfig,
    RoutePer,
    RouterConfig,
    RouterType,
    check_bool,
    check_int,
    check_weight,
)
from moracl.experts.routers.registry import build_router, register_router
from moracl.experts.routing import RoutingResult

__all__ = [
    "HierarchicalRouter",
    "HierarchicalRouterConfig",
    "expert_config",
    "group_config",
]


@dataclass(frozen=True)
class HierarchicalRouterConfig(LogitRouterConfig):
    """Groups, then experts.

    Args:
        groups: number of equal groups of experts (>= 1).
        k: experts per token of the default inner router (top-``k``).
        noise: noise of the default outer and inner routers.
        balance_weight: balance-loss weight of the default outer and inner routers.
        z_weight: z-loss weight of the default outer and inner routers.
        outer: the group router (``None``: noisy top-1 with this config's noise and loss
            weights); may be ``task`` or itself hierarchical.
        inner: the expert router used inside each group (``None``: top-``k`` with this
            config's noise and loss weights); may be hierarchical (more levels).
    """

    router_type: ClassVar[RouterType] = RouterType.HIERARCHICAL
    nested: ClassVar[tuple[str, ...]] = ("outer", "inner")

    type: RouterType = RouterType.HIERARCHICAL
    groups: int = 0
    k: int = 2
    noise: bool = True
    balance_weight: float = 0.01
    outer: RouterConfig | None = None
    inner: RouterConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("groups", self.groups, 0)
        if self.groups < 1:
            raise ValueError(f"the hierarchical router needs groups >= 1, got {self.groups}")
        check_int("k", self.k, 1)
        check_bool("noise", self.noise)
        check_weight("balance_weight", self.balance_weight)
        for name in self.nested:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, RouterConfig.from_dict(value))
            elif value is not None and not isinstance(value, RouterConfig):
                raise ValueError(
                    f"{name} must be a RouterConfig, a mapping or None, got {type(value).__name__}"
                )
            nested = getattr(self, name)
            if getattr(nested, "per", RoutePer.TOKEN) is not RoutePer.TOKEN:
                raise ValueError(
                    f"{name}.per={nested.per.value!r}: a hierarchical router routes all its "
                    f"levels alike; set per on the outermost config"
                )


def _default(config: HierarchicalRouterConfig, k: int) -> RouterConfig:
    return RouterConfig(
        type="topk",
        k=k,
        noise=config.noise,
        balance_weight=config.balance_weight,
        z_weight=config.z_weight,
    )


def group_config(config: HierarchicalRouterConfig) -> RouterConfig:
    """The outer (group) router's config: ``config.outer``, or noisy top-1."""
    return config.outer if config.outer is not None else _default(config, 1)


def expert_config(config: HierarchicalRouterConfig) -> RouterConfig:
    """The inner (per-group expert) router's config: ``config.inner``, or top-``config.k``."""
    return config.inner if config.inner is not None else _default(config, config.k)


@register_router(RouterType.HIERARCHICAL, HierarchicalRouterConfig)
class HierarchicalRouter(Router):
    """``outer`` routes over groups, ``inner[h]`` over group ``h``'s experts; see the module
    docstring for how they compose.  Expert masks set here (``set_expert_mask``) are passed
    down to both levels; the sub-routers' own masks apply as well (e.g. a task outer's group
    ownership, set with ``router.outer.set_expert_mask``).

    Growth appends whole groups: ``grow(n_new)`` needs ``n_new`` to be a multiple of ``s``;
    the outer router grows by ``n_new / s`` groups and new inner routers start at zero.
    """

    config: HierarchicalRouterConfig

    def __init__(
        self, config: HierarchicalRouterConfig, in_features: int, num_experts: int
    ) -> None:
        g = config.groups
        if isinstance(num_experts, int) and num_experts % g:
            raise ValueError(
                f"the hierarchical router needs groups of equal size: {num_experts} experts "
                f"are not divisible by groups={g}"
            )
        super().__init__(config, in_features, num_experts)
        self.group_size = num_experts // g
        self.outer = build_router(group_config(config), in_features, g)
        self.inner = nn.ModuleList(self._new_inner() for _ in range(g))

    def loss_weights(self) -> dict[str, float]:
        out = {f"group.{k}": v for k, v in self.outer.loss_weights().items()}
        inner = self._inner()[0].loss_weights()
        out.update({f"expert.{k}": v for k, v in inner.items()})
        return out

    @property
    def num_groups(self) -> int:
        return len(self.inner)

    @property
    def num_logits(self) -> int:
        return self.outer.num_logits + sum(r.num_logits for r in self._inner())

    def logit_weights(self) -> Tensor:
        """The outer router's rows, then each group's inner router's rows."""
        return torch.cat([self.outer.logit_weights(), *(r.logit_weights() for r in self._inner())])

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        task_ids = as_task_ids(task_ids)
        inner = self._inner()
        parts = logits.split([self.outer.num_logits, *(r.num_logits for r in inner)], dim=-1)
        allowed_gs = allowed.unflatten(-1, (self.num_groups, self.group_size))  # (n|1, g, s)
        group_allowed = self.outer.allowed_experts(task_ids) & allowed_gs.any(-1)  # (n|1, g)
        group = self.outer.route(parts[0], group_allowed, task_ids=task_ids, active=active)
        served = group.chosen if active is None else group.chosen & active[:, None]  # (n, g)
        results = [
            router.route(
                part,
                router.allowed_experts(task_ids) & allowed_gs[:, h],
                task_ids=task_ids,
                active=served[:, h],
            )
            for h, (router, part) in enumerate(zip(inner, parts[1:]))
        ]
        inner_gates = torch.stack([r.gates for r in results], dim=1)  # (n, g, s)
        inner_probs = torch.stack([r.probs for r in results], dim=1)  # (n, g, s)
        inner_chosen = torch.stack([r.chosen for r in results], dim=1)  # (n, g, s)
        gates = rearrange(group.gates[:, :, None] * inner_gates, "n g s -> n (g s)")
        probs = rearrange(group.probs[:, :, None] * inner_probs, "n g s -> n (g s)")
        chosen = rearrange(group.chosen[:, :, None] & inner_chosen, "n g s -> n (g s)")

        share = served.to(gates.dtype).sum(0)  # (g,) tokens served by each group
        share = share / share.sum().clamp_min(1.0)
        aux_losses = {f"group.{k}": v for k, v in group.aux_losses.items()}
        aux_weights = {f"group.{k}": v for k, v in group.aux_weights.items()}
        for name, weight in results[0].aux_weights.items():
            losses = torch.stack([r.aux_losses[name] for r in results])  # (g,)
            aux_losses[f"expert.{name}"] = (share * losses).sum()
            aux_weights[f"expert.{name}"] = weight
        return RoutingResult(
            gates=gates,
            probs=probs,
            chosen=chosen,
            indices=self._indices(group.indices, [r.indices for r in results]),
            aux_losses=aux_losses,
            aux_weights=aux_weights,
        )

    def _indices(self, outer: Tensor | None, inner: list[Tensor | None]) -> Tensor | None:
        """``(n, k_g · k_s)`` global indices of the chosen groups' chosen experts, when both
        levels report indices (``outer (n, k_g)``, each ``inner[h] (n, k_s)``)."""
        if outer is None or any(i is None for i in inner):
            return None
        per_group = torch.stack([i for i in inner if i is not None], dim=1)  # (n, g, k_s)
        k_s = per_group.shape[-1]
        picked = per_group.gather(1, outer[:, :, None].expand(-1, -1, k_s))  # (n, k_g, k_s)
        return rearrange(outer[:, :, None] * self.group_size + picked, "n a b -> n (a b)")

    def _inner(self) -> list[Router]:
        return [r for r in self.inner if isinstance(r, Router)]

    def _new_inner(self) -> Router:
        return build_router(expert_config(self.config), self.in_features, self.group_size)

    def _grow_experts(self, n_new: int) -> None:
        s = self.group_size
        if n_new % s:
            raise ValueError(
                f"a hierarchical router grows by whole groups of {s} experts; got n_new={n_new}"
            )
        self.outer.grow(n_new // s)
        device = self.global_mask.device
        dtype = next((p.dtype for p in self.parameters()), None)
        for _ in range(n_new // s):
            router = self._new_inner()
            for p in router.parameters():
                p.zero_()  # a new group starts with zero router rows, like flat growth
            self.inner.append(router.to(device=device, dtype=dtype).train(self.training))
