"""An in-place operation on an adapted layer's output (``nn.ReLU(inplace=True)`` after a
linear layer, ``y.mul_(...)``) trains as it does after a plain ``nn.Linear``: the same
outputs and gradients as the out-of-place model, for every adapter kind and router."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRAModel
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig

from .conftest import randomize_adapters
from .test_adapters import KINDS

ROUTERS = {
    "topk": RouterConfig(type="topk", k=2),
    "topk-per-sample": RouterConfig(type="topk", k=2, per="sample"),
    "dynamic": RouterConfig(type="dynamic", top_p=0.6, max_experts=3),
    "task": RouterConfig(type="task", num_tasks=2, task_weights=True),
    "soft": RouterConfig(type="soft"),
    "hierarchical": RouterConfig(type="hierarchical", groups=2, k=1),
}


def _base(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(inplace=inplace), nn.Linear(24, 16)).double()


def _grads(model: MoRAModel, inplace: bool, **kwargs: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the routers' training noise: the same draws for both models
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y = model(x, **kwargs)
    if inplace:
        y.mul_(3.0)
    else:
        y = y * 3.0
    (y.square().sum() + model.aux_loss()).backward()
    named = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in named)
    return [y.detach(), x.grad, *named]  # type: ignore[list-item]


def _check(config: AdapterConfig | MixtureConfig, **kwargs: torch.Tensor) -> None:
    plain = MoRAModel(_base(False), config, target_modules="all-linear").double().train()
    randomize_adapters(plain)
    inplace = copy.deepcopy(plain)
    for m in inplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = True
    want, got = _grads(plain, False, **kwargs), _grads(inplace, True, **kwargs)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)  # float64


@pytest.mark.parametrize("options", KINDS, ids=lambda o: "-".join(map(str, o.values())))
def test_an_in_place_op_after_an_adapted_layer_trains_as_out_of_place(options: dict) -> None:
    _check(AdapterConfig(rank=4, **options))


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("kind", ["lora", "mora"])
def test_an_in_place_op_after_a_mixture_trains_as_out_of_place(router: str, kind: str) -> None:
    config = MixtureConfig(kind=kind, rank=2, experts=4, router=ROUTERS[router])
    kwargs = {"task_ids": torch.tensor([0, 1])} if router == "task" else {}
    _check(config, **kwargs)
