"""Routing supervision for class-incremental runs: each router learns to send a row to the
experts of the experience its class was learned in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig, MoRAModel
from moracl.continual.config import ExpertsConfig
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import GrowthConfig, grow_experts, routing_supervision_loss
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig


def _grown_model(per_experience: int) -> ContinualClassifier:
    """A shared-head classifier over three experiences, grown to all three."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    router = RouterConfig(type="topk", k=1, noise=False, normalize=False)
    mixture = MixtureConfig(kind="lora", rank=2, experts=per_experience, router=router)
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 5, [[0, 1], [2, 3], [4, 5]], multi_head=False)
    growth = GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2), experts=per_experience)
    for t in (1, 2):
        grow_experts(model, t, growth)
    with torch.no_grad():
        for _, m in encoder.mixtures():
            m.router.weight.normal_()
    return model


@pytest.mark.parametrize("per_experience", [1, 2])
def test_the_loss_is_minus_log_the_router_mass_on_the_rows_experience(per_experience: int) -> None:
    model = _grown_model(per_experience)
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    x = torch.randn(4, 3, 6)  # 4 rows of 3 tokens each
    y = torch.tensor([0, 5, 2, 3])
    model(x, torch.zeros(4, dtype=torch.long))
    rows = model.class_experience()[y]
    assert rows.tolist() == [0, 2, 1, 1]
    got = routing_supervision_loss(encoder, rows)
    want = []
    for path, _ in encoder.mixtures():
        probs = encoder.last_routing[path].probs.double()  # (12, 3·per_experience)
        assert probs.shape == (12, 3 * per_experience)
        for token in range(12):
            t = int(rows[token // 3])
            mass = probs[token, t * per_experience : (t + 1) * per_experience].sum()
            want.append(-torch.log(mass))
    torch.testing.assert_close(got.double(), torch.stack(want).mean(), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(got, [next(iter(encoder.mixtures()))[1].router.weight])
    assert grad.abs().sum() > 0  # the loss trains the router


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="experts.route_supervision must be a finite number >= 0"):
        ExpertsConfig(route_supervision=-0.5)
    with pytest.raises(ValueError, match="experts.route_supervision must be a finite number"):
        ExpertsConfig(route_supervision=float("nan"))
    shared = ContinualClassifier(nn.Linear(4, 4), 4, [[0, 1], [1, 2]], multi_head=False)
    with pytest.raises(ValueError, match="class 1 is learned in experiences 0 and 1"):
        shared.class_experience()


def test_a_task_incremental_run_refuses_route_supervision(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from moracl.config import load_config
    from moracl.continual.run import build_strategy

    cfg = load_config(
        "configs/split_fashion.yaml",
        ["experts.route_supervision=1.0", f"output_dir={tmp_path}"],
    )
    model = _grown_model(1)
    model.multi_head = True
    with pytest.raises(ValueError, match=r"experts.route_supervision=1.0 teaches routing"):
        build_strategy("moracl", cfg, model, torch.device("cpu"))  # type: ignore[arg-type]
