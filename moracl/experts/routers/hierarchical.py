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

When every group's router is a plain top-k router with one config (the default), the groups
route as one batched top-k over ``(n, g, s)`` (the same numbers, noise included); with a top-k
outer as well, the fused node's routing is in closed form
(:mod:`moracl.experts.routers.hierarchical_gating`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, cast

import torch
from einops import rearrange
from torch import Tensor, nn

from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import Gating
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
from moracl.experts.routers.hierarchical_gating import (
    HierarchicalGating,
    LevelSettings,
    global_indices,
)
from moracl.experts.routers.registry import build_router, register_router
from moracl.experts.routers.topk import TopKRouter, TopKRouterConfig, topk_route_forward
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


class _Level(NamedTuple):
    """The inner level's routing of ``n`` tokens in ``g`` groups of ``s`` experts."""

    gates: Tensor  # (n, g, s)
    probs: Tensor  # (n, g, s)
    chosen: Tensor  # (n, g, s) bool
    indices: Tensor | None  # (n, g, k_s)
    losses: dict[str, Tensor]  # name -> (g,), each group's loss over the tokens it serves


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

    def logit_parts(self) -> tuple[Tensor, ...]:
        """The outer router's blocks, then each group's inner router's."""
        return (*self.outer.logit_parts(), *(p for r in self._inner() for p in r.logit_parts()))

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
        within = [r.allowed_experts(task_ids) for r in inner]  # each (n|1, s)
        if self._batched():
            level = self._route_batched(parts[1:], within, allowed_gs, served)
        else:
            level = self._route_each(parts[1:], within, allowed_gs, served, task_ids)
        gates = rearrange(group.gates[:, :, None] * level.gates, "n g s -> n (g s)")
        probs = rearrange(group.probs[:, :, None] * level.probs, "n g s -> n (g s)")
        chosen = rearrange(group.chosen[:, :, None] & level.chosen, "n g s -> n (g s)")

        share = served.to(gates.dtype).sum(0)  # (g,) tokens served by each group
        share = share / share.sum().clamp_min(1.0)
        aux_losses = {f"group.{k}": v for k, v in group.aux_losses.items()}
        aux_weights = {f"group.{k}": v for k, v in group.aux_weights.items()}
        for name, weight in inner[0].loss_weights().items():
            aux_losses[f"expert.{name}"] = (share * level.losses[name]).sum()
            aux_weights[f"expert.{name}"] = weight
        return RoutingResult(
            gates=gates,
            probs=probs,
            chosen=chosen,
            indices=self._indices(group.indices, level.indices),
            aux_losses=aux_losses,
            aux_weights=aux_weights,
        )

    def _batched(self) -> bool:
        """Whether every group's router is a plain top-k router with one config, so the
        groups route as one batch (:meth:`_route_batched`)."""
        inner = self._inner()
        first = inner[0]
        return all(type(r) is TopKRouter and r.config == first.config for r in inner)

    def _route_batched(
        self, parts: tuple[Tensor, ...], within: list[Tensor], allowed_gs: Tensor, served: Tensor
    ) -> _Level:
        """Every group's top-k routing at once: ``parts`` each ``(n, l_s)`` stacked to ``(n,
        g, l_s)``, one top-k over the last dimension, each group's losses over its served
        tokens (``served (n, g)``); the same numbers as :meth:`_route_each`, including the
        noise (each group's router draws its own, in order)."""
        inner = self._inner()
        cfg = inner[0].config
        assert isinstance(cfg, TopKRouterConfig)
        logits = torch.stack(parts, dim=1)  # (n, g, l_s)
        allowed = torch.stack(torch.broadcast_tensors(*within), dim=-2) & allowed_gs  # (n|1, g, s)
        draws = [cast(TopKRouter, r).noise(p) for r, p in zip(inner, parts)]  # (n, s) each
        noise = None if draws[0] is None else torch.stack(draws, dim=1)  # type: ignore[arg-type]
        routed, _ = topk_route_forward(logits, allowed, noise, cfg.k, cfg.normalize, served)
        losses = dict(zip(("balance", "z"), routed.aux))  # each (g,)
        return _Level(routed.gates, routed.probs, routed.chosen, routed.indices, losses)

    def _route_each(
        self,
        parts: tuple[Tensor, ...],
        within: list[Tensor],
        allowed_gs: Tensor,
        served: Tensor,
        task_ids: TaskIds | None,
    ) -> _Level:
        """Each group's router on its own logits ``parts[h] (n, l_h)``, its losses over the
        tokens it serves (``served[:, h]``), stacked over groups."""
        results = [
            router.route(part, ok & allowed_gs[:, h], task_ids=task_ids, active=served[:, h])
            for h, (router, part, ok) in enumerate(zip(self._inner(), parts, within))
        ]
        indices = [r.indices for r in results if r.indices is not None]
        return _Level(
            torch.stack([r.gates for r in results], dim=1),
            torch.stack([r.probs for r in results], dim=1),
            torch.stack([r.chosen for r in results], dim=1),
            torch.stack(indices, dim=1) if len(indices) == len(results) else None,
            {n: torch.stack([r.aux_losses[n] for r in results]) for n in results[0].aux_losses},
        )

    def _indices(self, outer: Tensor | None, per_group: Tensor | None) -> Tensor | None:
        """``(n, k_g · k_s)`` global indices of the chosen groups' chosen experts, when both
        levels report indices (``outer (n, k_g)``, ``per_group (n, g, k_s)``)."""
        return global_indices(outer, per_group, self.group_size)

    def gating(
        self, task_ids: TaskIds | None, backend: RoutingBackend, active: Tensor | None = None
    ) -> Gating:
        """Both levels top-k (the default): :class:`~moracl.experts.routers.
        hierarchical_gating.HierarchicalGating`, in closed form; other compositions replay
        :meth:`route` under autograd."""
        outer = self.outer
        if type(outer) is not TopKRouter or not self._batched():
            return super().gating(task_ids, backend, active)
        inner = cast(list[TopKRouter], self._inner())
        allowed_gs = self.allowed_experts(task_ids).unflatten(-1, (self.num_groups, -1))
        masks = torch.broadcast_tensors(*(r.allowed_experts(task_ids) for r in inner))
        within = torch.stack(masks, dim=-2)  # (n|1, g, s)
        sizes = [r.num_logits for r in inner]

        def expert_noise(logits: Tensor) -> Tensor | None:
            draws = [r.noise(part) for r, part in zip(inner, logits.split(sizes, dim=1))]
            return None if draws[0] is None else torch.stack(draws, dim=1)  # type: ignore[arg-type]

        return HierarchicalGating(
            group_allowed=outer.allowed_experts(task_ids) & allowed_gs.any(-1),
            expert_allowed=within & allowed_gs,
            group_noise=outer.noise,
            expert_noise=expert_noise,
            group_logits=outer.num_logits,
            groups=LevelSettings(outer.config.k, outer.config.normalize),
            experts=LevelSettings(inner[0].config.k, inner[0].config.normalize),
            backend=backend,
            active=active,
        )

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
