"""EWC and LwF keep state for the trainable parameters only: the same penalties as
Avalanche's plugins (float64, to 1e-12) without a copy of the frozen backbone, in memory or in
a checkpoint; checkpoints of Avalanche's full EWC state still load."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from avalanche.training.plugins import EWCPlugin, LwFPlugin

from moracl import AdapterConfig, MoRAModel
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import (
    CheckpointedEWCPlugin,
    CheckpointedLwFPlugin,
    PluginState,
    PreviousModel,
)
from moracl.continual.strategy import FastTemplate

CLASSES = [[0, 1], [2, 3], [4, 5]]


def _stream(multi_head: bool) -> list[Any]:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: list[int], n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        return torch.randn(n, 6, generator=g, dtype=torch.float64) + y[:, None], y

    tasks = [0, 1, 2] if multi_head else None
    bench = tensor_benchmark(
        [part(c) for c in CLASSES], [part(c, 4) for c in CLASSES], task_labels=tasks
    )
    return list(bench.train_stream)


def _model(multi_head: bool) -> ContinualClassifier:
    """float64: a frozen MLP with LoRA on both layers, then heads."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    encoder = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 5, CLASSES, multi_head=multi_head).double()
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a value
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return model


def _strategy(plugins: list[Any], multi_head: bool = False) -> FastTemplate:
    return FastTemplate(
        model=_model(multi_head),
        optimizer_factory=lambda m: torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.05
        ),
        train_mb_size=8,
        train_epochs=1,
        plugins=plugins,
        loader_seed=1,
    )


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _ewc_penalty(plugin: EWCPlugin, model: nn.Module, experiences: int) -> torch.Tensor:
    """What the plugin adds to the loss of a step after ``experiences`` experiences."""
    strategy = SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        clock=SimpleNamespace(train_exp_counter=experiences),
        loss=torch.zeros((), dtype=torch.float64),
    )
    plugin.before_backward(strategy)
    return strategy.loss


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def test_ewc_penalty_is_avalanches_over_trainable_parameters_only() -> None:
    exps = _stream(multi_head=False)
    ours, stock = CheckpointedEWCPlugin(10.0), EWCPlugin(10.0)
    strategy = _strategy([ours, stock])  # both see the same model after each experience
    for i in (0, 1):
        torch.manual_seed(i)
        strategy.train(exps[i])
    model = strategy.model
    trainable, frozen = _trainable(model), _frozen(model)
    assert frozen and trainable
    for e in (0, 1):  # Avalanche keeps the frozen backbone, with zero importance
        assert set(stock.saved_params[e]) == trainable | frozen
        assert all(not stock.importances[e][n].data.any() for n in frozen)
        assert set(ours.saved_params[e]) == set(ours.importances[e]) == trainable
        for n in trainable:
            assert torch.equal(ours.importances[e][n].data, stock.importances[e][n].data)
            assert torch.equal(ours.saved_params[e][n].data, stock.saved_params[e][n].data)
    _perturb(model, 5)
    a, b = _ewc_penalty(ours, model, 2), _ewc_penalty(stock, model, 2)
    assert a.dtype == torch.float64 and a.item() > 0
    assert abs(a.item() - b.item()) <= 1e-12 * max(1.0, abs(b.item()))
    # the checkpoint holds no frozen parameter
    names = {k.split(".", 2)[2] for k in ours.state_dict().tensors}
    assert names == trainable


def test_an_old_full_ewc_state_loads_without_its_frozen_entries() -> None:
    exps = _stream(multi_head=False)
    stock = EWCPlugin(10.0)
    strategy = _strategy([stock])
    for i in (0, 1):
        torch.manual_seed(i)
        strategy.train(exps[i])
    old = PluginState(
        tensors={
            f"{kind}.{e}.{n}": v.data.clone()
            for kind, store in (("saved", stock.saved_params), ("importance", stock.importances))
            for e, params in store.items()
            for n, v in params.items()
        }
    )
    model = strategy.model
    assert any(k.split(".", 2)[2] in _frozen(model) for k in old.tensors)
    loaded = CheckpointedEWCPlugin(10.0)
    loaded.load_state_dict(old, strategy=strategy, trained=exps[:2])
    assert {k.split(".", 2)[2] for k in loaded.state_dict().tensors} == _trainable(model)
    _perturb(model, 6)
    a, b = _ewc_penalty(loaded, model, 2), _ewc_penalty(stock, model, 2)
    assert abs(a.item() - b.item()) <= 1e-12 * max(1.0, abs(b.item()))


def _lwf_loss(plugin: LwFPlugin, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> Any:
    out = model(x, t)
    return plugin.lwf(x, out, model)


@pytest.mark.parametrize("multi_head", [False, True], ids=["shared-head", "multi-head"])
def test_lwf_loss_equals_avalanches_without_copying_the_frozen_backbone(multi_head: bool) -> None:
    exps = _stream(multi_head)
    runs = {}
    for kind in ("ours", "stock"):
        plugin = CheckpointedLwFPlugin(1.0, 2.0) if kind == "ours" else LwFPlugin(1.0, 2.0)
        strategy = _strategy([plugin], multi_head)
        for i in (0, 1):
            torch.manual_seed(i)
            strategy.train(exps[i])
        runs[kind] = (plugin, strategy.model)
    (ours, model), (stock, stock_model) = runs["ours"], runs["stock"]
    # trained alike through experience 1 (whose loss has LwF's term)
    for (n, a), (_, b) in zip(model.state_dict().items(), stock_model.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), n
    # Avalanche's previous model is a deep copy: the frozen backbone twice in memory
    live = {n: p.data_ptr() for n, p in stock_model.named_parameters()}
    copied = dict(stock.lwf.prev_model.named_parameters())
    assert all(copied[n].data_ptr() != live[n] for n in _frozen(stock_model))
    # ours keeps the trainable values and the buffers; the frozen ones are the live tensors
    prev = ours.lwf.prev_model
    assert isinstance(prev, PreviousModel)
    buffers = {n for n, _ in model.named_buffers()}
    assert set(prev.state) == _trainable(model) | buffers
    _perturb(model, 7)
    _perturb(stock_model, 7)
    x = torch.cat([torch.randn(6, 6, dtype=torch.float64) + k for k in range(3)])
    t = torch.arange(3).repeat_interleave(6) if multi_head else torch.zeros(18, dtype=torch.long)
    a, b = _lwf_loss(ours, model, x, t), _lwf_loss(stock, stock_model, x, t)
    assert a.item() > 0
    assert abs(a.item() - b.item()) <= 1e-12 * max(1.0, abs(b.item()))
    # a resumed plugin keeps the restored model as its previous one, as the original did
    restored = CheckpointedLwFPlugin(1.0, 2.0)
    fresh = SimpleNamespace(model=model)
    restored.load_state_dict(ours.state_dict(), strategy=fresh, trained=exps[:2])
    again = restored.lwf.prev_model
    assert isinstance(again, PreviousModel)
    assert all(torch.equal(again.state[n], v) for n, v in prev.state.items() if n in buffers)


def test_a_previous_model_refuses_a_frozen_parameter_changed_since() -> None:
    model = _model(multi_head=False)
    model.seen[:2] = True  # experience 0's classes
    prev = PreviousModel(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    before = prev(x, t)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.seen[:] = True
    # the kept trainable values and buffers (the classes seen then), not the new ones
    assert torch.equal(prev(x, t), before)
    assert not torch.equal(model(x, t)[:, :2], before[:, :2])
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        frozen.add_(1.0)
    with pytest.raises(ValueError, match=r"frozen when LwF kept the previous model were changed"):
        prev(x, t)
