"""Backward transfer chosen on validation (``experts.routing.adopt_newer``): an old task takes
a newer task's routing row only when its own validation split scores higher with it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.config import load_config
from moracl.continual.config import AutoRouting, TaskRouting
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import GrowthConfig, grow_experts
from moracl.continual.transfer import adopt_newer_routes, task_routers
from moracl.experts.mixture import ExpertGroup, MixtureConfig
from moracl.experts.routers.config import RouterConfig

LORA = AdapterConfig(kind="lora", rank=2, alpha=4.0)  # type: ignore[call-arg]


def _three_tasks() -> ContinualClassifier:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    router = RouterConfig(type="task", num_tasks=1, task_weights=True)
    mixture = MixtureConfig(router=router, groups=(ExpertGroup(LORA, 1),))
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    model = ContinualClassifier(
        encoder, 5, [[0, 1], [2, 3], [4, 5]], multi_head=True, route_by_task=True
    )
    for task in (1, 2):
        with torch.no_grad():  # each task's expert "trains": its weights move
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        grow_experts(model, task, GrowthConfig(adapter=LORA, warm_start=True))
        model.route_tasks(task + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model.eval()


def _predict_with_row(model: ContinualClassifier, x: Tensor, task: int, row: int) -> Tensor:
    """Task ``task``'s predictions with every router's row ``task`` replaced by row ``row``
    (a plain reference: copies the rows by hand and restores them)."""
    routers = task_routers(model)
    saved = [(r.expert_masks[task].clone(), r.task_logits.detach()[task].clone()) for r in routers]  # type: ignore[union-attr]
    with torch.no_grad():
        for r in routers:
            r.expert_masks[task] = r.expert_masks[row].clone()
            r.task_logits[task] = r.task_logits[row].clone()  # type: ignore[index]
        out = model(x, torch.full((len(x),), task)).argmax(-1)
        for r, (m, w) in zip(routers, saved):
            r.expert_masks[task] = m
            r.task_logits[task] = w  # type: ignore[index]
    return out


def _splits(model: ContinualClassifier, labels_row: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Validation splits whose task-0 labels are what task 0 predicts through row
    ``labels_row`` (so that row scores 100 % on it), flipped on a quarter of the rows."""
    g = torch.Generator().manual_seed(1)
    out = []
    for task in range(3):
        x = torch.randn(40, 6, generator=g)
        y = _predict_with_row(model, x, task, labels_row if task == 0 else task)
        y[::4] = torch.where(y[::4] % 2 == 0, y[::4] + 1, y[::4] - 1)  # the task's other class
        out.append((x, y, torch.full((40,), task)))
    return out


def _accuracy(model: ContinualClassifier, split: tuple[Tensor, Tensor, Tensor], row: int) -> float:
    x, y, t = split
    return float((_predict_with_row(model, x, int(t[0]), row) == y).float().mean())


def test_an_old_task_adopts_the_newer_row_its_validation_split_prefers() -> None:
    model = _three_tasks()
    splits = _splits(model, labels_row=2)
    scores = {row: _accuracy(model, splits[0], row) for row in (0, 1, 2)}
    best = max(scores, key=lambda r: (scores[r], -r))  # ties keep the earlier (own) row
    assert best == 2 and scores[2] > scores[0]  # the fixture: row 2 is better for task 0
    x = splits[0][0]
    expected = _predict_with_row(model, x, 0, 2)
    chosen = adopt_newer_routes(model, 2, splits)
    assert chosen[0] == 2
    with torch.no_grad():  # task 0 now predicts exactly as through task 2's routing
        assert torch.equal(model(x, torch.zeros(len(x), dtype=torch.long)).argmax(-1), expected)
    for r in task_routers(model):
        assert torch.equal(r.expert_masks[0], r.expert_masks[2])


def test_a_task_whose_own_row_scores_best_keeps_it_bit_identical() -> None:
    model = _three_tasks()
    splits = _splits(model, labels_row=0)
    scores = {row: _accuracy(model, splits[0], row) for row in (0, 1, 2)}
    assert scores[0] >= max(scores.values())
    x = splits[0][0]
    with torch.no_grad():
        before = model(x, torch.zeros(len(x), dtype=torch.long))
    chosen = adopt_newer_routes(model, 2, splits)
    assert chosen[0] == 0
    with torch.no_grad():
        assert torch.equal(model(x, torch.zeros(len(x), dtype=torch.long)), before)


def test_nothing_changes_without_task_routing_or_after_the_first_experience() -> None:
    model = _three_tasks()
    splits = _splits(model, labels_row=2)
    assert adopt_newer_routes(model, 0, splits) == [0]
    with pytest.raises(ValueError, match="validation splits of experiences 0..2"):
        adopt_newer_routes(model, 2, splits[:2])


def test_the_config_key_reaches_the_routing_and_is_checked() -> None:
    config = load_config("configs/wordnet_domains.yaml", ["experts.routing.adopt_newer=true"])
    routing = config.experts.routing  # type: ignore[attr-defined]
    assert isinstance(routing, AutoRouting)
    resolved = routing.resolve(task_aware=True)
    assert isinstance(resolved, TaskRouting) and resolved.adopt_newer
    with pytest.raises(ValueError, match="adopt_newer"):
        load_config("configs/wordnet_domains.yaml", ["experts.routing.adopt_newer=3"])
