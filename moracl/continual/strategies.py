"""The strategies a continual run may list (``strategies:`` in its config), registered by
name: each entry builds its Avalanche strategy over a classifier and carries the label the
run's results and report show.

Every strategy trains on the lean template (:class:`~moracl.continual.strategy.FastTemplate`)
with the run's optimiser, batch sizes, non-finite policy and a quiet evaluator (the run
computes its accuracy matrix itself); the baselines add Avalanche's
plugins (in their checkpointable form, :mod:`moracl.continual.stateful`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moracl.continual.batches import derive_seed
from moracl.continual.config import LearnedRouting, RunConfig, check_routing
from moracl.continual.derpp import DERPlusPlusPlugin
from moracl.continual.factory import expert_adapter, moracl_router, optimizer_factory
from moracl.continual.inflora import InfLoRAPlugin, InfLoRAStrategy
from moracl.continual.model import ContinualClassifier
from moracl.continual.olora import OLoRAStrategy
from moracl.continual.plugins import (
    BalancedHeadPlugin,
    FastJoint,
    SeededReplayPlugin,
    TaskStatisticsPlugin,
)
from moracl.continual.stateful import CheckpointedEWCPlugin, CheckpointedLwFPlugin
from moracl.continual.strategy import FastTemplate, GrowthConfig, MoRAStrategy, quiet_evaluator
from moracl.registry import Registry

__all__ = ["STRATEGY_REGISTRY", "StrategyEntry", "build_strategy", "strategy_entry"]

#: what a strategy's builder receives: the run's config, the classifier and the template's
#: keyword arguments (batch sizes, epochs, device, optimiser factory, seeds, name)
Builder = Callable[[RunConfig, ContinualClassifier, dict[str, Any]], FastTemplate]


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy.

    Attributes:
        name: its name in configs, checkpoints and logs' keys (``"ewc"``).
        label: its name in results, reports and messages (``"EWC"``).
        build: builds the strategy (see :data:`Builder`).
        trains_once: trains once, on the whole stream, at the last experience (Joint).
    """

    name: str
    label: str
    build: Builder
    trains_once: bool = False


STRATEGY_REGISTRY: Registry[StrategyEntry] = Registry("strategy")


def _register(name: str, label: str, *, trains_once: bool = False) -> Callable[[Builder], Builder]:
    def deco(build: Builder) -> Builder:
        STRATEGY_REGISTRY.register(name)(StrategyEntry(name, label, build, trains_once))
        return build

    return deco


def strategy_entry(name: str) -> StrategyEntry:
    """The registered strategy ``name``; ``ValueError`` listing the names for another."""
    return STRATEGY_REGISTRY.get(name)


@_register("moracl", "moracl (experts)")
def _moracl(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Growing adapter experts, with replay, balanced fine-tuning, routing supervision and
    task statistics as the ``experts`` section asks."""
    check_routing(config, task_aware=model.multi_head)
    e, seed = config.experts, common["loader_seed"]
    routing = e.routing.resolve(task_aware=model.multi_head)
    learned = routing if isinstance(routing, LearnedRouting) else LearnedRouting()
    growth = GrowthConfig(
        adapter=expert_adapter(
            config, moracl_router(config, task_aware=model.multi_head), grown=True
        ),
        experts=e.per_experience,
        # (read by routing by task, given or inferred; learned routers have no task rows)
        reuse_old=routing.reuse_old if not isinstance(routing, LearnedRouting) else True,
        freeze_heads=e.freeze_heads,
    )
    plugins: list[Any] = []
    if e.replay_size:
        replay = SeededReplayPlugin(e.replay_size, seed=seed)
        if e.balance_head_epochs or learned.balance_epochs:
            # before replay: it reads the buffer of earlier experiences
            balance = BalancedHeadPlugin(
                replay,
                epochs=e.balance_head_epochs,
                lr=e.balance_head_lr,
                seed=seed,
                router_epochs=learned.balance_epochs,
                router_lr=learned.balance_lr,
                force_routes=learned.teacher_forcing,
            )
            plugins.append(balance)
        plugins.append(replay)
    class_experience = None
    experience_labels = False
    if learned.supervision:
        try:  # class-incremental: a row's experience is its class's
            class_experience = model.class_experience()
        except ValueError:  # domain-incremental: moracl labels each experience's rows
            experience_labels = True
    if model.task_inference is not None:
        # trained through its experience's experts: a row's task label is its experience
        experience_labels = True
        plugins.insert(0, TaskStatisticsPlugin(batch_size=config.train.eval_batch_size))
    return MoRAStrategy(
        model=model,
        growth=growth,
        route_supervision=learned.supervision,
        class_experience=class_experience,
        experience_labels=experience_labels,
        teacher_forcing=learned.teacher_forcing,
        plugins=plugins,
        **common,
    )


@_register("naive", "Naive")
def _naive(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Fine-tuning, experience after experience (the lower reference)."""
    return FastTemplate(model=model, **common)


@_register("ewc", "EWC")
def _ewc(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Elastic weight consolidation (``baselines.ewc_lambda``)."""
    plugin = CheckpointedEWCPlugin(config.baselines.ewc_lambda)
    return FastTemplate(model=model, plugins=[plugin], **common)


@_register("lwf", "LwF")
def _lwf(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Learning without forgetting (``baselines.lwf_alpha``, ``baselines.lwf_temperature``)."""
    b = config.baselines
    plugin = CheckpointedLwFPlugin(alpha=b.lwf_alpha, temperature=b.lwf_temperature)
    return FastTemplate(model=model, plugins=[plugin], **common)


@_register("replay", "Replay")
def _replay(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Experience-balanced replay (``baselines.replay_size``)."""
    plugin = SeededReplayPlugin(config.baselines.replay_size, seed=common["loader_seed"])
    return FastTemplate(model=model, plugins=[plugin], **common)


@_register("joint", "Joint", trains_once=True)
def _joint(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Joint training on the whole stream (the upper reference)."""
    return FastJoint(model=model, **common)


@_register("olora", "O-LoRA")
def _olora(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """O-LoRA: one LoRA per experience, kept orthogonal to the earlier (frozen) ones
    (``baselines.olora_lambda1``, ``baselines.olora_lambda2``; :mod:`moracl.continual.olora`)."""
    b = config.baselines
    return OLoRAStrategy(model=model, lambda1=b.olora_lambda1, lambda2=b.olora_lambda2, **common)


@_register("inflora", "InfLoRA")
def _inflora(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """InfLoRA: one LoRA branch per experience whose ``A`` is designed orthogonal to the
    earlier experiences' inputs (``baselines.inflora_*``; :mod:`moracl.continual.inflora`)."""
    b = config.baselines
    plugin = InfLoRAPlugin(
        threshold=b.inflora_threshold,
        threshold_end=b.inflora_threshold_end,
        batch_size=config.train.eval_batch_size,
    )
    return InfLoRAStrategy(model=model, plugins=[plugin], **common)


@_register("derpp", "DER++")
def _derpp(config: RunConfig, model: ContinualClassifier, common: dict[str, Any]) -> FastTemplate:
    """Dark experience replay++ (``baselines.replay_size``, ``baselines.derpp_alpha``,
    ``baselines.derpp_beta``)."""
    b = config.baselines
    plugin = DERPlusPlusPlugin(
        b.replay_size, alpha=b.derpp_alpha, beta=b.derpp_beta, seed=common["loader_seed"]
    )
    return FastTemplate(model=model, plugins=[plugin], **common)


def build_strategy(
    name: str, config: RunConfig, model: ContinualClassifier, device: torch.device
) -> FastTemplate:
    """The registered strategy ``name`` over ``model``, trained as ``config.train`` says."""
    entry = strategy_entry(name)
    t = config.train
    common: dict[str, Any] = dict(
        optimizer_factory=optimizer_factory(config),
        train_mb_size=t.batch_size,
        train_epochs=t.epochs,
        eval_mb_size=t.eval_batch_size,
        device=device,
        criterion=nn.CrossEntropyLoss(),
        loader_seed=derive_seed(t.seed, name),
        name=entry.label,
        job="moracl run",
        on_nonfinite=t.on_nonfinite,
        # the run computes its accuracy matrix itself: no Avalanche metrics or loggers
        evaluator=quiet_evaluator(),
    )
    return entry.build(config, model, common)
