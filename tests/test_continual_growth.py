"""Expert growth between experiences: warm-started experts, the new task's initial gates, and
old tasks' outputs left bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig, MoRAModel
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import GrowthConfig, grow_experts
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig


def _model(router: RouterConfig) -> ContinualClassifier:
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    mixture = MixtureConfig(kind="lora", rank=2, experts=1, router=router, options={"alpha": 4.0})
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    return ContinualClassifier(
        encoder,
        5,
        [[0, 1], [2, 3], [4, 5]],
        multi_head=True,
        route_by_task=router.type == "task",
    )


def _train_a_little(model: ContinualClassifier) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("warm", [True, False])
def test_new_experts_start_as_copies_of_the_newest_ones(warm: bool) -> None:
    model = _model(RouterConfig(type="task", num_tasks=1, task_weights=True))
    _train_a_little(model)
    growth = GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2, alpha=4.0), warm_start=warm)  # type: ignore[call-arg]
    x = torch.randn(7, 6)
    task0 = torch.zeros(7, dtype=torch.long)
    before = model(x, task0)
    grow_experts(model, 1, growth)
    model.routed_tasks = 2
    assert torch.equal(model(x, task0), before)  # old task: bit-identical
    assert isinstance(model.encoder, MoRAModel)
    for _, mixture in model.encoder.mixtures():
        old, new = mixture._banks()
        assert all(not p.requires_grad for p in old.parameters())
        pairs = zip(old.state_dict().values(), new.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs) == warm
        router = mixture.router
        gates = router.task_logits[1].softmax(-1)  # type: ignore[index]
        # the new task's own expert carries most of the gate from the start
        assert float(gates[1]) == pytest.approx(math.exp(4.0) / (1.0 + math.exp(4.0)))
        assert float(router.task_logits[0, 1]) == 0.0  # type: ignore[index]  (old task: masked)
