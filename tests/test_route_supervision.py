"""Routing supervision for class-incremental runs: each router learns to send a row to the
experts of the experience its class was learned in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig, MoRAModel
from moracl.continual.config import ExpertsConfig, LearnedRouting
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import GrowthConfig, grow_experts, routing_supervision_loss
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig
from tests.offline_data import needs_fashion_mnist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
    encoder.record_router_inputs = True
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
    with pytest.raises(ValueError, match="supervision must be a finite number >= 0, got -0.5"):
        ExpertsConfig(routing=LearnedRouting(supervision=-0.5))
    with pytest.raises(ValueError, match="supervision must be a finite number"):
        ExpertsConfig(routing={"mode": "learned", "supervision": float("nan")})  # type: ignore[arg-type]
    shared = ContinualClassifier(nn.Linear(4, 4), 4, [[0, 1], [1, 2]], multi_head=False)
    with pytest.raises(ValueError, match="class 1 is learned in experiences 0 and 1"):
        shared.class_experience()


def test_a_task_incremental_run_refuses_route_supervision(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from moracl.config import load_config
    from moracl.continual.strategies import build_strategy

    cfg = load_config(
        CONFIGS / "split_fashion.yaml",
        ["experts.routing={mode: learned, supervision: 1.0}", f"output_dir={tmp_path}"],
    )
    model = _grown_model(1)
    model.multi_head = True
    with pytest.raises(ValueError, match=r"experts.routing.supervision=1.0 teaches routing"):
        build_strategy("moracl", cfg, model, torch.device("cpu"))  # type: ignore[arg-type]


class _Bucketing(nn.Module):
    """An encoder that, like MiniLMTop, may regroup its rows by length."""

    default_targets = ("proj",)
    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.length_buckets = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).mean(1)


@pytest.mark.parametrize(("weight", "buckets"), [(0.0, 2), (1.0, 1)])
def test_supervised_routing_keeps_the_rows_in_batch_order(weight: float, buckets: int) -> None:
    """Routing targets are per row, so a supervised run's encoder must not regroup rows (the
    routed tokens would no longer follow the batch's rows)."""
    from types import SimpleNamespace

    from moracl_scenarios.streams import Setting

    from moracl.config import load_config
    from moracl.continual.factory import build_model

    cfg = load_config(
        CONFIGS / "wordnet_domains.yaml",
        [
            "scenario.setting=class",
            f"experts.routing={{mode: learned, supervision: {weight}}}",
        ],
    )
    info = SimpleNamespace(setting=Setting.CLASS, experience_classes=((0, 1), (2, 3)))
    model = build_model("moracl", cfg, _Bucketing(), info)
    assert getattr(model.encoder.model, "length_buckets") == buckets  # noqa: B009


def test_tokens_that_do_not_fill_the_rows_are_refused() -> None:
    model = _grown_model(1)
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    model(torch.randn(4, 3, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"routed 12 tokens for 5 rows"):
        routing_supervision_loss(encoder, torch.zeros(5, dtype=torch.long))


def test_per_sample_routing_reaches_the_routers_and_refuses_task_routing() -> None:
    from types import SimpleNamespace

    from moracl_scenarios.streams import Setting

    from moracl.config import load_config
    from moracl.continual.factory import build_model

    info = SimpleNamespace(setting=Setting.CLASS, experience_classes=((0, 1), (2, 3)))
    cfg = load_config(
        CONFIGS / "wordnet_domains.yaml",
        ["scenario.setting=class", "experts.routing={mode: learned, per: sample}"],
    )
    model = build_model("moracl", cfg, _Bucketing(), info)
    routers = [m.router.config for _, m in model.encoder.mixtures()]
    assert routers and all(r.type == "topk" and r.per == "sample" for r in routers)
    # per applies to learned routers only: routing by task has no such key
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['per'\] for the auto routing mode"):
        load_config(CONFIGS / "wordnet_domains.yaml", ["experts.routing.per=sample"])


def test_teacher_forcing_routes_training_rows_by_experience_and_evaluation_by_router() -> None:
    from moracl.continual.strategy import MoRAStrategy, expert_experience

    model = _grown_model(2)
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    growth = GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2), experts=2)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)

    strategy = MoRAStrategy(
        model=model,
        optimizer_factory=sgd,
        growth=growth,
        route_supervision=1.0,
        class_experience=model.class_experience(),
        teacher_forcing=True,
        device=torch.device("cpu"),
    )
    strategy.experiences_prepared = 3  # the model is grown already
    strategy.prepare(2)
    x = torch.randn(6, 3, 6)
    rows = torch.tensor([0, 1, 2, 2, 1, 0])
    owner = expert_experience(next(iter(encoder.mixtures()))[1])  # (6,) the same per layer
    own = owner[None, :] == rows.repeat_interleave(3)[:, None]  # (18 tokens, 6 experts)
    with model.forced_routes(rows):
        model(x, torch.zeros(6, dtype=torch.long))
    for path, routed in encoder.last_routing.items():
        assert bool((routed.chosen <= own).all()) and bool(routed.chosen.any(-1).all()), path
    loss = float(routing_supervision_loss(encoder, rows).detach())
    assert loss > 0  # the routers' own distribution is not the forced one
    model(x, torch.zeros(6, dtype=torch.long))  # as evaluation routes: by the routers
    assert any(not bool((r.chosen <= own).all()) for r in encoder.last_routing.values())
    with pytest.raises(ValueError, match="set route_supervision > 0"):
        MoRAStrategy(model=model, optimizer_factory=sgd, growth=growth, teacher_forcing=True)
    with pytest.raises(ValueError, match="teacher_forcing routes training rows by their"):
        ExpertsConfig(routing=LearnedRouting(teacher_forcing=True))


def test_domain_incremental_rows_are_labelled_with_their_experience() -> None:
    """Where a class is in several experiences, moracl trains on each experience with its
    rows' task labels set to the experience's index; the replay buffer, rebuilt as after
    training, stores those rows; the stream itself is left unchanged."""
    from moracl_scenarios.streams import tensor_benchmark

    from moracl.continual.plugins import SeededReplayPlugin
    from moracl.continual.strategy import MoRAStrategy, materialize

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 6), torch.arange(n) % 2  # the same two classes everywhere

    bench = tensor_benchmark([part(6), part(8), part(4)], [part(2)] * 3)
    exps = list(bench.train_stream)
    model = _grown_model(1)
    strategy = MoRAStrategy(
        model=model,
        optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        growth=GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2)),
        route_supervision=1.0,
        experience_labels=True,
    )
    for i, exp in enumerate(exps):
        x, y, t = materialize(strategy.training_experience(exp).dataset)
        assert t.tolist() == [i] * len(y)
        assert torch.equal(x, materialize(exp.dataset)[0])
        assert set(materialize(exp.dataset)[2].tolist()) == {0}  # the stream is unchanged
    replay = SeededReplayPlugin(9)
    replay.rebuild(strategy, exps)
    for e, group in replay.storage_policy.buffer_groups.items():
        labels = materialize(group.buffer)[2]
        assert len(labels) > 0 and set(labels.tolist()) == {e}
    plain = MoRAStrategy(
        model=_grown_model(1),
        optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        growth=GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2)),
    )
    assert plain.training_experience(exps[1]) is exps[1]


@needs_fashion_mnist
@pytest.mark.slow
def test_a_teacher_forced_domain_incremental_run_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from moracl.config import from_dict
    from moracl.continual.config import RunConfig
    from moracl.jobs.continual import run as run_continual

    def config(out: str) -> RunConfig:
        data = {
            "job": "run",
            "scenario": {
                "name": "digit-domains",
                "options": {"per_class": 8, "test_per_class": 4},
            },
            "experts": {
                "per_experience": 2,
                "rank": 2,
                "routing": {"mode": "learned", "k": 2, "supervision": 1.0, "teacher_forcing": True},
                "replay_size": 20,
            },
            "strategies": ["moracl"],
            "train": {"epochs": 1, "batch_size": 16},
            "output_dir": str(tmp_path / out),
        }
        return from_dict(RunConfig, data)

    full = run_continual(config("full"), progress=False)
    run_continual(config("resumed"), progress=False, stop_after=1)
    resumed = run_continual(config("resumed"), progress=False, resume=True)
    name = "moracl"
    assert resumed.strategies[name].matrix == full.strategies[name].matrix
    routing = full.strategies[name].routing
    assert routing is not None and routing.task_inference_accuracy is not None
    assert resumed.strategies[name].routing == routing
