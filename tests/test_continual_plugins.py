"""The continual run's parts in isolation: the strategy registry, the plugins' own
checkpointed state (a strategy restored from it trains on exactly as the original does) and
the evaluation's one reduction."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig, MoRAModel
from moracl.continual.config import STRATEGIES, ExpertsConfig, LearnedRouting, RoutingModeName
from moracl.continual.evaluation import sum_over_processes
from moracl.continual.model import ContinualClassifier
from moracl.continual.plugins import SeededReplayPlugin
from moracl.continual.stateful import (
    CheckpointedEWCPlugin,
    CheckpointedLwFPlugin,
    PluginState,
    StatefulPlugin,
)
from moracl.continual.strategies import STRATEGY_REGISTRY, strategy_entry
from moracl.continual.strategy import FastTemplate


def test_the_registry_holds_the_configs_strategy_names_with_their_labels() -> None:
    assert STRATEGY_REGISTRY.names() == sorted(STRATEGIES)
    labels = {n: strategy_entry(n).label for n in STRATEGIES}
    assert labels == {
        "moracl": "moracl (experts)",
        "naive": "Naive",
        "ewc": "EWC",
        "lwf": "LwF",
        "replay": "Replay",
        "derpp": "DER++",
        "olora": "O-LoRA",
        "inflora": "InfLoRA",
        "joint": "Joint",
    }
    assert [n for n in STRATEGIES if strategy_entry(n).trains_once] == ["joint"]
    expected = r"unknown strategy 'icarl'; expected one of \['derpp', 'ewc'"
    with pytest.raises(ValueError, match=expected):
        strategy_entry("icarl")


def test_choices_are_str_enums_that_read_yaml_strings() -> None:
    e = ExpertsConfig(routing={"mode": "learned", "per": "sample"})  # type: ignore[arg-type]
    assert isinstance(e.routing, LearnedRouting) and e.routing.mode is RoutingModeName.LEARNED
    assert e.routing.mode == "learned" and e.routing.per == "sample"
    with pytest.raises(ValueError, match=r"mode must be one of \['auto', 'task', 'learned', 'g"):
        ExpertsConfig(routing={"mode": "magic"})  # type: ignore[arg-type]


def _stream() -> list[Any]:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: tuple[int, int], n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        return torch.randn(n, 6, generator=g) + y[:, None], y

    bench = tensor_benchmark([part((0, 1)), part((2, 3)), part((4, 5))], [part((0, 1), 4)] * 3)
    return list(bench.train_stream)


def _strategy(plugins: list[Any]) -> FastTemplate:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    lora = AdapterConfig(kind="lora", rank=2)
    encoder = MoRAModel(base, lora, target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 5, [[0, 1], [2, 3], [4, 5]], multi_head=False)
    return FastTemplate(
        model=model,
        optimizer_factory=lambda m: torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.05
        ),
        train_mb_size=8,
        train_epochs=1,
        plugins=plugins,
        loader_seed=1,
    )


def _plugins() -> list[Any]:
    return [
        CheckpointedEWCPlugin(10.0),
        CheckpointedLwFPlugin(alpha=1.0, temperature=2.0),
        SeededReplayPlugin(12, seed=3),
    ]


def test_a_strategy_restored_from_its_plugins_state_trains_on_exactly_as_the_original() -> None:
    exps = _stream()
    original = _strategy(_plugins())
    for i in (0, 1):
        torch.manual_seed(10 + i)
        original.train(exps[i])
    states = {
        p.state_key: p.state_dict() for p in original.plugins if isinstance(p, StatefulPlugin)
    }
    assert sorted(states) == ["ewc", "lwf", "replay"]
    assert states["lwf"].values == {"expcount": 2, "classes": {"0": [0, 1, 2, 3]}}
    assert states["replay"].values == {"experiences": 2}
    assert {k.split(".")[0] for k in states["ewc"].tensors} == {"saved", "importance"}

    restored = _strategy(_plugins())
    restored.model.load_state_dict(original.model.state_dict())
    restored.clock.train_exp_counter = 2
    for p in restored.plugins:
        if isinstance(p, StatefulPlugin):
            copy = PluginState({k: v.clone() for k, v in states[p.state_key].tensors.items()},
                               dict(states[p.state_key].values))  # fmt: skip
            p.load_state_dict(copy, strategy=restored, trained=exps[:2])
    for s in (original, restored):
        torch.manual_seed(12)
        s.train(exps[2])
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), restored.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_plugin_states_refuse_what_they_cannot_have_written() -> None:
    exps = _stream()
    strategy = _strategy([])
    with pytest.raises(ValueError, match=r"replay.experiences=3; expected 2"):
        SeededReplayPlugin(4).load_state_dict(
            PluginState(values={"experiences": 3}), strategy=strategy, trained=exps[:2]
        )
    with pytest.raises(ValueError, match=r"lwf.expcount=-1; expected an integer >= 0"):
        CheckpointedLwFPlugin().load_state_dict(
            PluginState(values={"expcount": -1, "classes": {}}), strategy=strategy, trained=[]
        )
    with pytest.raises(ValueError, match=r"EWC state tensor='other.0.w'"):
        CheckpointedEWCPlugin(1.0).load_state_dict(
            PluginState(tensors={"other.0.w": torch.ones(1)}), strategy=strategy, trained=[]
        )


def test_sum_over_processes_keeps_each_tensors_dtype_shape_and_value() -> None:
    parts = {
        "count": torch.tensor(7, dtype=torch.int64),
        "usage": torch.tensor([0.1, 0.7], dtype=torch.float32),
        "loss": torch.tensor([[1.0 / 3]], dtype=torch.float64),
    }
    out = sum_over_processes(parts)  # one process: the values themselves
    assert list(out) == list(parts)
    for key, value in parts.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        assert torch.equal(out[key], value), key
    assert sum_over_processes({}) == {}


def test_choices_print_as_their_values() -> None:
    from moracl.continual.config import Setting

    assert f"scenario.setting={Setting.CLASS}" == "scenario.setting=class"
    assert str(RoutingModeName.LEARNED) == "learned" and f"{RoutingModeName.TASK:>5}" == " task"
