"""Extending moracl from outside the package: a router type registered under a new name is
built from ``RouterConfig(type=...)`` and from a parsed YAML mapping, routes as it says, and
runs under every routing backend (those without a closed form for it replay its ``route``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from moracl import MoRALinear
from moracl.experts import MixtureConfig, RouterConfig, RoutingContext, routing_backend
from moracl.experts.losses import router_z_loss
from moracl.experts.routers import LogitRouter, register_router
from moracl.experts.routers.base import TaskIds
from moracl.experts.routers.config import LogitRouterConfig, RouterType
from moracl.experts.routing import RoutingResult
from moracl.parse_fields import from_dict

NAME = "first-allowed"


@dataclass(frozen=True)
class FirstAllowedConfig(LogitRouterConfig):
    """Every token to its first allowed expert, gated by ``sigmoid`` of that expert's logit
    (and the z loss, which the logit routers' configs declare through ``z_weight``)."""

    router_type: ClassVar[RouterType | str] = NAME

    type: RouterType | str = NAME
    scale: float = 1.0


@register_router(NAME, FirstAllowedConfig)
class FirstAllowedRouter(LogitRouter):
    config: FirstAllowedConfig

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        clean, _ = self.scores(logits)  # (n, e)
        first = (allowed.cumsum(-1) == 1) & allowed  # (n|1, e)
        chosen = first.expand_as(clean)
        gates = chosen * torch.sigmoid(self.config.scale * clean)  # (n, e)
        return self.result(gates, gates, chosen, None, {"z": router_z_loss(clean, allowed)})


@dataclass
class Holder:
    config: MixtureConfig


def test_a_registered_router_is_a_config_variant() -> None:
    config = RouterConfig(type=NAME, scale=2.0)
    assert isinstance(config, FirstAllowedConfig) and config.type == NAME
    assert RouterConfig.from_dict(config.to_dict()) == config
    parsed = from_dict(Holder, {"config": {"experts": 3, "router": {"type": NAME}}})
    assert isinstance(parsed.config.router, FirstAllowedConfig)
    with pytest.raises(ValueError, match=r"unknown router config key\(s\) \['k'\].*valid keys"):
        RouterConfig(type=NAME, k=2)
    with pytest.raises(ValueError, match="expected one of .*first-allowed"):
        RouterConfig(type="no-such-router")


def _layer() -> MoRALinear:
    torch.manual_seed(0)
    config = MixtureConfig(rank=2, experts=3, router=RouterConfig(type=NAME, scale=0.5))
    layer = MoRALinear(nn.Linear(6, 4), config).double().train()
    with torch.no_grad():
        for p in layer.adapter("default").parameters():
            p.copy_(torch.randn_like(p))
    return layer


def _step(layer: MoRALinear, backend: str, x: Tensor) -> list[Tensor]:
    mix = layer.adapter("default")
    x = x.detach().requires_grad_(True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    mix.context = RoutingContext()
    try:
        with routing_backend(backend):
            out = layer(x)
        routed = mix.context.results[mix]
    finally:
        mix.context = None
    loss = out.square().sum() + 10 * routed.aux_loss
    return [out, routed.gates, routed.aux_loss, *torch.autograd.grad(loss, params)]


def test_a_registered_router_routes_as_written_under_every_backend() -> None:
    layer = _layer()
    x = torch.randn(7, 6, dtype=torch.float64)
    router = layer.adapter("default").router
    expected = torch.zeros(7, 3, dtype=torch.float64)
    expected[:, 0] = torch.sigmoid(0.5 * x @ router.weight[0])  # every expert allowed
    want = _step(layer, "naive", x)
    torch.testing.assert_close(want[1], expected, rtol=1e-12, atol=1e-12)
    tol = 1e4 * torch.finfo(torch.float64).eps
    for backend in ("eager", "compiled", "auto"):
        for mine, ref in zip(_step(layer, backend, x), want):
            torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)
