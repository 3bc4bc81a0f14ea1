"""The typed router configs: one variant per router type chosen by ``type``, each with only
its fields; Enum choices; the mixture config without untyped options."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moracl import AdapterConfig
from moracl.experts import (
    ROUTERS,
    DynamicRouterConfig,
    ExpertGroup,
    HierarchicalRouterConfig,
    MixtureConfig,
    RoutePer,
    RouterConfig,
    RouterType,
    RoutingBackend,
    SoftRouterConfig,
    TaskRouterConfig,
    TopKRouterConfig,
)

VARIANTS = {
    "topk": TopKRouterConfig,
    "dynamic": DynamicRouterConfig,
    "task": TaskRouterConfig,
    "hierarchical": HierarchicalRouterConfig,
    "soft": SoftRouterConfig,
}
MINIMAL = {"task": {"num_tasks": 2}, "hierarchical": {"groups": 2}}


def test_every_router_type_has_a_variant_and_an_enum_member() -> None:
    # (routers registered from outside, as in test_extending.py, add names of their own)
    assert set(VARIANTS) == {t.value for t in RouterType} <= set(ROUTERS.names())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_tag_picks_the_variant_and_round_trips_through_json(name: str) -> None:
    cfg = RouterConfig(type=name, **MINIMAL.get(name, {}))
    assert type(cfg) is VARIANTS[name]
    assert cfg.type is RouterType(name) and cfg.type == name  # str-valued Enum
    plain = json.loads(json.dumps(cfg.to_dict()))
    assert plain["type"] == name
    assert RouterConfig.from_dict(plain) == cfg
    assert VARIANTS[name](**MINIMAL.get(name, {})) == cfg  # the variant directly
    assert cfg.replace(num_tasks=3).num_tasks == 3


@pytest.mark.parametrize(
    ("data", "key", "router"),
    [
        ({"type": "topk", "top_p": 0.5}, "top_p", "topk"),
        ({"type": "task", "num_tasks": 1, "k": 2}, "k", "task"),
        ({"type": "soft", "noise": False}, "noise", "soft"),
        ({"type": "dynamic", "groups": 2}, "groups", "dynamic"),
        ({"k": 2, "bogus": 1}, "bogus", "topk"),
    ],
)
def test_unknown_or_unused_keys_name_the_key_and_the_valid_ones(
    data: dict, key: str, router: str
) -> None:
    valid = sorted(f.name for f in dataclasses.fields(VARIANTS[router]))
    for build in (lambda: RouterConfig(**data), lambda: RouterConfig.from_dict(data)):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert f"['{key}'] for the {router} router" in msg and f"valid keys: {valid}" in msg


def test_nested_configs_are_typed_and_errors_name_the_path() -> None:
    cfg = RouterConfig.from_dict(
        {"type": "hierarchical", "groups": 2, "outer": {"type": "task", "num_tasks": 2}}
    )
    assert isinstance(cfg, HierarchicalRouterConfig) and isinstance(cfg.outer, TaskRouterConfig)
    with pytest.raises(
        ValueError, match=r"inner: unknown router config key\(s\) \['top_p'\] for the topk router"
    ):
        RouterConfig.from_dict({"type": "hierarchical", "groups": 2, "inner": {"top_p": 0.5}})


def test_choices_are_enums_that_take_their_strings() -> None:
    cfg = RouterConfig(type="topk", per="sample")
    assert cfg.per is RoutePer.SAMPLE and cfg.to_dict()["per"] == "sample"
    with pytest.raises(ValueError, match=r"type must be one of|unknown router 'nope'"):
        RouterConfig(type="nope")
    with pytest.raises(ValueError, match=r"per must be one of \['token', 'sample'\], got 'row'"):
        RouterConfig(per="row")
    assert RoutingBackend("triton") is RoutingBackend.TRITON


def test_mixture_config_is_typed_and_reads_earlier_options() -> None:
    cfg = MixtureConfig.from_dict(
        {"mixture": True, "kind": "lora", "rank": 4, "experts": 3, "options": {"alpha": 16.0}}
    )
    assert cfg.groups == (ExpertGroup(AdapterConfig(kind="lora", rank=4, alpha=16.0), 3),)
    assert MixtureConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "options" not in cfg.to_dict()
    with pytest.raises(ValueError, match="options: unknown key"):
        MixtureConfig.from_dict({"options": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\] for a mixture"):
        MixtureConfig.from_dict({"extra": 1})
    with pytest.raises(TypeError):
        MixtureConfig(options={"alpha": 2.0})  # type: ignore[call-arg]
