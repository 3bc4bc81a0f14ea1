"""``experts.routing``: one typed variant per routing mode, chosen by its ``mode`` tag."""

from __future__ import annotations

from pathlib import Path

import pytest

from moracl.config import load_config
from moracl.continual.config import (
    MOVED_KEYS,
    AutoRouting,
    ExpertsConfig,
    GaussianRouting,
    LearnedRouting,
    RoutePer,
    RoutingMode,
    RoutingModeName,
    RunConfig,
    TaskRouting,
    WithoutTaskLabels,
    check_routing,
)
from moracl.parse_fields import from_dict, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN = CONFIGS / "wordnet_domains.yaml"
VARIANTS = {
    "auto": AutoRouting,
    "task": TaskRouting,
    "learned": LearnedRouting,
    "gaussian": GaussianRouting,
}


@pytest.mark.parametrize(("mode", "cls"), sorted(VARIANTS.items()))
def test_the_tag_picks_the_variant(mode: str, cls: type[RoutingMode]) -> None:
    built = RoutingMode(mode=mode)
    assert type(built) is cls and built.mode is RoutingModeName(mode) and built == cls()
    assert type(RoutingMode.from_dict({"mode": mode})) is cls
    assert RoutingMode.from_dict(built.to_dict()) == built
    assert type(RoutingMode()) is AutoRouting and type(RoutingMode.from_dict({})) is AutoRouting


def test_variants_hold_typed_choices_and_round_trip() -> None:
    learned = RoutingMode(mode="learned", k=2, per="sample", supervision=1, balance_epochs=3)
    assert isinstance(learned, LearnedRouting)
    assert learned.per is RoutePer.SAMPLE and learned.supervision == 1.0
    assert isinstance(learned.supervision, float)  # an integer from YAML, stored as a float
    assert learned.to_dict() == {
        "mode": "learned",
        "k": 2,
        "per": "sample",
        "supervision": 1.0,
        "teacher_forcing": False,
        "balance_epochs": 3,
        "balance_lr": 1e-2,
    }
    auto = RoutingMode.from_dict({"without_task_labels": "gaussian", "shrinkage": 0.5})
    assert isinstance(auto, AutoRouting)
    assert auto.without_task_labels is WithoutTaskLabels.GAUSSIAN
    for routing in (learned, auto, TaskRouting(reuse_old=False), GaussianRouting(shrinkage=0)):
        experts = ExpertsConfig(per_experience=2, replay_size=4, routing=routing)
        assert from_dict(ExpertsConfig, to_dict(experts)) == experts
        assert ExpertsConfig.from_dict(to_dict(experts)) == experts
    with pytest.raises(TypeError, match="keyword arguments only"):
        RoutingMode("learned")  # type: ignore[misc]
    with pytest.raises(ValueError, match="TaskRouting has mode 'task', got"):
        TaskRouting(mode=RoutingModeName.LEARNED)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"mode": "auto", "k": 2},
            r"unknown key\(s\) \['k'\] for the auto routing mode; valid keys: \['adopt_newer', "
            r"'mode', 'reuse_old', 'shrinkage', 'without_task_labels'\]",
        ),
        (
            {"mode": "task", "shrinkage": 0.1},
            r"\['shrinkage'\] for the task routing mode; valid keys: \['adopt_newer', 'mode', "
            r"'reuse_old'\]",
        ),
        (
            {"mode": "gaussian", "per": "sample"},
            r"\['per'\] for the gaussian routing mode; valid keys: \['adopt_newer', 'mode', 'reu",
        ),
        (
            {"mode": "learned", "reuse_old": True},
            r"\['reuse_old'\] for the learned routing mode; valid keys: \['balance_epochs', ",
        ),
        ({"mode": "topk"}, r"mode must be one of \['auto', 'task', 'learned', 'gaussian'\]"),
        ({"mode": "learned", "k": 0}, r"k must be > 0, got 0"),
        ({"mode": "learned", "k": "two"}, r"k must be an integer, got 'two'"),
        ({"mode": "learned", "per": "row"}, r"per must be one of \['token', 'sample'\]"),
        ({"mode": "learned", "teacher_forcing": True}, "learn only from experts.routing.superv"),
        ({"mode": "auto", "reuse_old": "yes"}, r"reuse_old must be true or false, got 'yes'"),
        ({"mode": "gaussian", "shrinkage": 1.5}, r"shrinkage must be a finite number in \[0, 1"),
    ],
)
def test_bad_routing_modes_name_the_key_and_what_is_valid(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingMode.from_dict(data)
    with pytest.raises(ValueError, match=r"^experts: routing: .*" + message):
        from_dict(RunConfig, {"experts": {"routing": data}})


@pytest.mark.parametrize("key", sorted(MOVED_KEYS))
def test_a_flat_key_of_earlier_versions_names_where_it_moved(key: str) -> None:
    value = {"router": "topk", "task_inference": "gaussian", "route_per": "sample"}.get(key, 1)
    with pytest.raises(
        ValueError, match=r"^experts: key\(s\) \['" + key + r"'\] moved under "
    ) as e:
        load_config(RUN, [f"experts.{key}={value}"])
    assert MOVED_KEYS[key] in str(e.value) and "experts.routing." in MOVED_KEYS[key]


def test_cross_section_rules_name_both_keys() -> None:
    with pytest.raises(ValueError, match=r"routing.k=3 exceeds experts.per_experience=2"):
        ExpertsConfig(per_experience=2, routing=LearnedRouting(k=3))
    with pytest.raises(ValueError, match=r"balance_epochs=1 fine-tunes the routers on the repl"):
        ExpertsConfig(routing=LearnedRouting(balance_epochs=1))
    ExpertsConfig(replay_size=4, routing=LearnedRouting(balance_epochs=1))  # with a buffer: fine
    with pytest.raises(ValueError, match=r"experts.routing must be a routing mode"):
        ExpertsConfig(routing="learned")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("routing", "task_aware", "resolved"),
    [
        (AutoRouting(reuse_old=False), True, TaskRouting(reuse_old=False)),
        (AutoRouting(), False, LearnedRouting()),
        (
            AutoRouting(without_task_labels="gaussian", shrinkage=0.3),  # type: ignore[arg-type]
            False,
            GaussianRouting(shrinkage=0.3),
        ),
        (AutoRouting(without_task_labels="gaussian"), True, TaskRouting()),  # type: ignore[arg-type]
        (TaskRouting(), True, TaskRouting()),
        (LearnedRouting(k=1, per="sample"), True, LearnedRouting(per="sample")),  # type: ignore[arg-type]
        (LearnedRouting(supervision=1.0), False, LearnedRouting(supervision=1.0)),
        (GaussianRouting(), False, GaussianRouting()),
    ],
)
def test_each_mode_resolves_to_the_routing_of_the_stream(
    routing: RoutingMode, task_aware: bool, resolved: RoutingMode
) -> None:
    assert routing.resolve(task_aware=task_aware) == resolved


@pytest.mark.parametrize(
    ("routing", "task_aware", "message"),
    [
        (TaskRouting(), False, r"mode=task routes each row by its task label, but this str"),
        (GaussianRouting(), True, r"mode=gaussian infers the task of rows without task labels"),
        (LearnedRouting(supervision=0.5), True, r"supervision=0.5 teaches routing without"),
    ],
)
def test_a_mode_the_stream_cannot_route_is_refused_where_moracl_runs(
    routing: RoutingMode, task_aware: bool, message: str
) -> None:
    config = RunConfig(experts=ExpertsConfig(replay_size=4, routing=routing))
    with pytest.raises(ValueError, match=message):
        check_routing(config, task_aware=task_aware)
    check_routing(RunConfig(experts=config.experts, strategies=["naive"]), task_aware=task_aware)


def test_the_configs_keep_their_routing() -> None:
    wordnet = load_config(RUN).experts.routing
    assert wordnet == AutoRouting(without_task_labels="gaussian", reuse_old=False)  # type: ignore[arg-type]
    digits = load_config(CONFIGS / "digit_domains.yaml").experts.routing
    assert digits == LearnedRouting(k=2, supervision=1.0)
    fashion = load_config(CONFIGS / "split_fashion.yaml").experts.routing
    assert fashion.resolve(task_aware=False) == GaussianRouting(reuse_old=False)
    assert fashion.resolve(task_aware=True) == TaskRouting(reuse_old=False)
    for name in ("wordnet_domains_class.yaml", "split_fashion_class.yaml"):
        assert load_config(CONFIGS / name).experts.routing == GaussianRouting()
