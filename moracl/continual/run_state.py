"""A ``moracl run`` between experiences (:class:`RunState`): its strategies and what they
measured so far, what a checkpoint holds of each strategy and how a strategy is put back from
it, and the results file's rows rebuilt from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moracl.continual.config import RunConfig
from moracl.continual.factory import StreamInfo
from moracl.continual.metrics import (
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StoppingRecord,
    StrategyResult,
)
from moracl.continual.model import ContinualClassifier
from moracl.continual.splits import Split
from moracl.continual.stateful import PluginState, StatefulPlugin
from moracl.continual.stopping import EarlyStoppingPlugin
from moracl.continual.strategies import StrategyEntry
from moracl.continual.strategy import FastTemplate, MoRAStrategy
from moracl.guard import NonFiniteError
from moracl.model import MoRAModel

__all__ = [
    "PLUGIN_PREFIX",
    "ContinualStream",
    "RunState",
    "StrategyProgress",
    "active_per_token",
    "check_eval_losses",
    "fill_results",
    "frozen_ids",
    "plugin_states",
    "plugin_tensors",
    "restore_strategy",
    "stateful_plugins",
    "trained_state",
]

#: the prefix of a plugin's tensors in a strategy's checkpoint file
PLUGIN_PREFIX = "plugins."


class ContinualStream(Protocol):
    """A continual stream as the run reads it (``moracl_scenarios``' ``Stream`` is one): an
    Avalanche benchmark (``train_stream``, ``test_stream``; the latter is not read by a run
    with ``evaluate_test=False``) and its description."""

    @property
    def benchmark(self) -> Any: ...

    @property
    def info(self) -> StreamInfo: ...


@dataclass
class StrategyProgress:
    """One strategy of a run and what it measured so far: its test ``matrix`` (``None``
    when the run does not evaluate the test split), its ``validation`` matrix (``None``
    without a validation split), its early-stopping records and its early-stopping plugin
    (``None`` without ``train.early_stopping``)."""

    entry: StrategyEntry
    strategy: FastTemplate
    matrix: AccuracyMatrix | None
    validation: AccuracyMatrix | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0
    routing: RoutingDiagnostics | None = None
    experts_per_token: float | None = None
    stopping: list[StoppingRecord] = field(default_factory=list)
    stopper: EarlyStoppingPlugin | None = None

    @property
    def model(self) -> ContinualClassifier:
        """The strategy's classifier."""
        model = self.strategy.model
        if not isinstance(model, ContinualClassifier):
            raise TypeError(f"expected a ContinualClassifier, got {type(model).__name__}")
        return model


@dataclass
class RunState:
    """A run between experiences: its strategies, data and results so far.

    Attributes:
        config: the run's config.
        run_dir: the run folder.
        train_exps: the stream's training experiences without their validation rows.
        tests: each test experience as ``(x, y, t)`` tensors (``None``: the run does not
            evaluate the test split, which it never reads).
        strategies: per strategy name (in the order runs report them), its progress.
        results: the results file's content, rebuilt after each experience.
        frozen: ids of the encoder's tensors (shared by every strategy, never saved).
        backbone_parameters: the encoder's parameter count.
        start: the first experience still to train.
        main: this process writes the run folder (rank 0).
        validation: each experience's validation split as ``(x, y, t)`` tensors (empty:
            ``scenario.val_share`` is 0).
    """

    config: RunConfig
    run_dir: Path
    train_exps: list[Any]
    tests: list[Split] | None
    strategies: dict[str, StrategyProgress]
    results: RunResults
    frozen: set[int]
    backbone_parameters: int
    start: int = 0
    main: bool = True
    logger: Any = field(default=None)
    validation: list[Split] = field(default_factory=list)

    @property
    def num_experiences(self) -> int:
        return len(self.train_exps)


def frozen_ids(encoder: nn.Module) -> set[int]:
    """The ids of ``encoder``'s parameters and buffers (the tensors no checkpoint saves)."""
    return {id(p) for p in encoder.parameters()} | {id(b) for b in encoder.buffers()}


def trained_state(model: nn.Module, frozen: set[int]) -> dict[str, Tensor]:
    """The model's state without the tensors it shares with the pretrained encoder."""
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in frozen:
            out[name] = value.detach().clone()
    return out


def stateful_plugins(strategy: FastTemplate) -> list[StatefulPlugin]:
    """``strategy``'s checkpointed plugins; their ``state_key``s must differ."""
    plugins = [p for p in strategy.plugins if isinstance(p, StatefulPlugin)]
    keys = [p.state_key for p in plugins]
    if len(set(keys)) != len(keys):
        raise ValueError(f"strategy {strategy.name!r} has plugins sharing a state key: {keys}")
    return plugins


def plugin_states(strategy: FastTemplate) -> dict[str, PluginState]:
    """Each checkpointed plugin's state, by its ``state_key``."""
    return {p.state_key: p.state_dict() for p in stateful_plugins(strategy)}


def plugin_tensors(states: dict[str, PluginState]) -> dict[str, Tensor]:
    """The plugins' tensors by their name in a checkpoint: ``plugins.<state key>.<name>``."""
    return {
        f"{PLUGIN_PREFIX}{key}.{name}": t
        for key, s in states.items()
        for name, t in s.tensors.items()
    }


def restore_strategy(
    strategy: FastTemplate,
    name: str,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    train_exps: list[Any],
    last: int,
) -> None:
    """Put a strategy back in the state it had after experience ``last``."""
    model = strategy.model
    if isinstance(strategy, MoRAStrategy):
        strategy.prepare(int(state["experiences_prepared"]) - 1)
    strategy.clock.train_exp_counter = last + 1  # EWC reads it
    strategy.step_guard.steps = int(state["steps"])
    strategy.step_guard.skipped = int(state["skipped_steps"])
    own = {k: v for k, v in tensors.items() if not k.startswith(PLUGIN_PREFIX)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint of {name!r} has tensors the model lacks: {unexpected[:5]}")
    current = dict(model.state_dict(keep_vars=True))
    lost = [k for k in missing if current[k].requires_grad]
    if lost:
        raise ValueError(f"checkpoint of {name!r} lacks trainable tensors: {lost[:5]}")
    saved_plugins = state.get("plugins", {})
    for plugin in stateful_plugins(strategy):
        key = plugin.state_key
        prefix = f"{PLUGIN_PREFIX}{key}."
        plugin.load_state_dict(
            PluginState(
                tensors={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                values=dict(saved_plugins.get(key, {})),
            ),
            strategy=strategy,
            trained=train_exps[: last + 1],
        )


def fill_results(state: RunState) -> None:
    """Rebuild each strategy's row of ``state.results`` (matrices, cost, routing) from its
    progress so far."""
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    for p in state.strategies.values():
        model = p.model
        cost = Cost(
            trainable_parameters=sum(
                q.numel() for q in model.parameters() if id(q) not in state.frozen
            ),
            backbone_parameters=state.backbone_parameters,
            active_parameters_per_token=active_per_token(model, p.experts_per_token),
            wall_seconds=p.seconds,
            train_seconds=p.train_seconds,
            peak_memory_bytes=peak,
        )
        state.results.strategies[p.entry.name] = StrategyResult(
            name=p.entry.name,
            label=p.entry.label,
            matrix=p.matrix,
            cost=cost,
            routing=p.routing,
            steps=p.strategy.step_guard.steps,
            skipped_steps=p.strategy.step_guard.skipped,
            validation=p.validation,
            early_stopping=list(p.stopping),
        )


def active_per_token(model: ContinualClassifier, experts_per_token: float | None) -> float:
    """Adapter, router and head parameters one token's prediction uses: for mixtures the
    measured mean experts per token times an expert's size, plus the routers."""
    encoder = model.encoder
    total = 0.0
    head = sum(p.numel() for p in model.heads[-1].parameters())
    if isinstance(encoder, MoRAModel) and list(encoder.mixtures()):
        for _, m in encoder.mixtures():
            expert = sum(p.numel() for p in m.banks.parameters()) / m.num_experts
            total += expert * (experts_per_token or 1.0)
            total += sum(p.numel() for p in m.router.parameters())
    elif isinstance(encoder, MoRAModel):
        # every active adapter of each adapted layer (trained or frozen: a strategy that sums
        # one adapter per task runs them all), and whatever else trains
        counted: set[int] = set()
        for _, layer in encoder.adapted_layers():
            for name in layer.active:
                for p in layer.adapter(name).parameters():
                    if id(p) not in counted:
                        counted.add(id(p))
                        total += p.numel()
        frozen = {id(p) for p in encoder.model.parameters() if not p.requires_grad}
        total += sum(
            p.numel() for p in encoder.parameters() if id(p) not in frozen and id(p) not in counted
        )
    return total + head


def check_eval_losses(
    label: str, experience: int, losses: Sequence[float], what: str = "experience"
) -> None:
    """Raise :class:`NonFiniteError` if an evaluation loss is not finite (the model's
    outputs are not: nothing of it may be logged or saved); ``what`` names the data."""
    for j, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"moracl run: strategy {label!r} after experience {experience}: the evaluation "
                f"loss on {what} {j} is {loss}; the model's outputs are not finite"
            )
