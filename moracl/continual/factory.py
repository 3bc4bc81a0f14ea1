"""The classifiers of a continual run: moracl's mixture of growing adapter experts, or one
adapter for the baselines, over the encoder the run is given; and their optimisers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from moracl.adapters.base import AdapterConfig
from moracl.continual.config import (
    GaussianRouting,
    LearnedRouting,
    RunConfig,
    Setting,
    check_routing,
)
from moracl.continual.inference import GaussianTaskInference
from moracl.continual.inflora import inflora_classifier
from moracl.continual.model import ContinualClassifier
from moracl.continual.olora import olora_classifier
from moracl.experts.mixture import ExpertGroup, MixtureConfig
from moracl.experts.routers.config import RouterConfig
from moracl.experts.routers.task import TaskRouterConfig
from moracl.experts.routers.topk import TopKRouterConfig
from moracl.model import MoRAModel

__all__ = [
    "StreamInfo",
    "build_model",
    "expert_adapter",
    "moracl_router",
    "optimizer_factory",
    "task_aware",
]


class StreamInfo(Protocol):
    """What a run reads of its stream's description (``moracl_scenarios``' ``StreamInfo``
    has it): its name, setting, experience names and the classes of each experience."""

    @property
    def name(self) -> str: ...

    @property
    def setting(self) -> Any: ...  # a Setting, or an Enum with the same values

    @property
    def experience_names(self) -> Sequence[str]: ...

    @property
    def experience_classes(self) -> Sequence[Sequence[int]]: ...


def task_aware(info: StreamInfo) -> bool:
    """Whether the stream's test rows carry task labels (the task-incremental setting)."""
    return Setting(getattr(info.setting, "value", info.setting)) is Setting.TASK


def moracl_router(config: RunConfig, *, task_aware: bool) -> RouterConfig:
    """The router of moracl's mixtures: top-k for learned routing, else by task id (given,
    or inferred by gaussian task inference); see
    :meth:`~moracl.continual.config.RoutingMode.resolve`, whose checks it runs."""
    routing = config.experts.routing.resolve(task_aware=task_aware)
    if not isinstance(routing, LearnedRouting):
        return TaskRouterConfig(num_tasks=1, task_weights=True)
    k = routing.k  # at most per_experience (ExpertsConfig)
    # top-1 gates renormalised over one expert are a constant 1: Switch's gate (the chosen
    # expert's probability) lets the task loss train the router
    return TopKRouterConfig(k=k, noise=False, normalize=k > 1, per=routing.per)


def expert_adapter(
    config: RunConfig, router: RouterConfig | None = None, *, grown: bool = False
) -> AdapterConfig:
    """The configuration of each of moracl's experts: ``config.adapter`` at rank
    ``experts.rank`` (when set), with ``alpha`` scaled alike so that ``alpha / rank`` (LoRA's
    scaling) stays the adapter's. ``grown``: the experts grown for the experiences after the
    first, at rank ``experts.growth_rank`` when set (AdaLoRA experts: their initial rank,
    which each experience's budget prunes to ``target_rank``).

    Under a ``router`` that picks ``k > 1`` experts with gates renormalised to sum to 1,
    ``alpha`` is also multiplied by ``k``: the ``k`` rank-``r`` experts of a token then add up
    to the scale of one adapter of rank ``k·r`` (with gates summing to 1 they would give half
    of it for ``k = 2``, and train at half its pace).
    """
    base = config.adapter
    rank = (config.experts.growth_rank if grown else 0) or config.experts.rank or base.rank
    scale = rank / base.rank
    if isinstance(router, TopKRouterConfig) and router.normalize and router.k > 1:
        scale *= router.k
    if rank == base.rank and scale == 1:
        return base
    data = {**base.to_dict(), "rank": rank}
    if "alpha" in data:
        data["alpha"] = float(data["alpha"]) * scale
    return AdapterConfig.from_dict(data)


def build_model(
    name: str, config: RunConfig, encoder: nn.Module, info: StreamInfo
) -> ContinualClassifier:
    """The classifier of strategy ``name`` over ``encoder`` (which names its
    ``default_targets`` and ``feature_dim``): moracl gets a mixture, baselines one adapter."""
    aware = task_aware(info)
    targets = list(config.target_modules) or list(getattr(encoder, "default_targets"))  # noqa: B009
    if name == "olora":  # one LoRA per experience, summed (moracl.continual.olora)
        return olora_classifier(
            encoder,
            config.adapter,
            info.experience_classes,
            target_modules=targets,
            multi_head=aware,
        )
    if name == "inflora":  # one designed LoRA branch per experience (moracl.continual.inflora)
        return inflora_classifier(
            encoder,
            info.experience_classes,
            targets=targets,
            rank=config.baselines.inflora_rank,
            multi_head=aware,
        )
    adapter: AdapterConfig | MixtureConfig = config.adapter
    e = config.experts
    moracl = name == "moracl"
    routes_by_task = False
    routing = None
    if moracl:
        check_routing(config, task_aware=aware)  # what `moracl validate` checks too
        routing = e.routing.resolve(task_aware=aware)
        router = moracl_router(config, task_aware=aware)
        routes_by_task = router.type == "task"
        expert = expert_adapter(config, router)
        n = e.per_experience
        adapter = MixtureConfig(
            kind=expert.kind,
            rank=expert.rank,
            experts=n,
            router=router,
            groups=(ExpertGroup(expert, n),),
        )
    wrapped = MoRAModel(encoder, adapter, target_modules=targets)
    by_row = routes_by_task or (
        isinstance(routing, LearnedRouting)
        and (routing.supervision > 0 or routing.balance_epochs > 0)
    )
    if by_row and hasattr(wrapped.model, "length_buckets"):
        # per-row task ids and per-row routing targets need every layer's tokens in batch
        # order: no regrouping of the rows by length
        setattr(wrapped.model, "length_buckets", 1)  # noqa: B010
    inference = None
    if isinstance(routing, GaussianRouting):
        # (resolved for rows without task labels only: task-incremental rows carry their task)
        classes = 1 + max(c for cs in info.experience_classes for c in cs)
        inference = GaussianTaskInference(
            len(info.experience_classes), classes, shrinkage=routing.shrinkage
        )
    return ContinualClassifier(
        wrapped,
        int(getattr(encoder, "feature_dim")),  # noqa: B009
        info.experience_classes,
        multi_head=aware,
        route_by_task=routes_by_task,
        task_inference=inference,
    )


def optimizer_factory(config: RunConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """AdamW over a model's trainable parameters: the heads (``heads.*``) at
    ``train.head_lr``, the rest (adapters, routers) at ``train.lr``."""
    train = config.train

    def build(model: nn.Module) -> torch.optim.Optimizer:
        heads = [
            p for n, p in model.named_parameters() if p.requires_grad and n.startswith("heads.")
        ]
        rest = [
            p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")
        ]
        groups = [
            {"params": rest, "lr": train.lr},
            {"params": heads, "lr": train.head_lr},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], weight_decay=train.weight_decay, foreach=True
        )

    return build
