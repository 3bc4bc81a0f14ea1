"""Class-balanced fine-tuning of the shared head after each experience: which rows it draws,
what it changes (the head alone, toward the old classes), and that a run using it resumes
exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("avalanche")

from moracl import MoRAModel
from moracl.config import from_dict
from moracl.continual.config import RunConfig
from moracl.continual.model import ContinualClassifier
from moracl.continual.plugins import BalancedHeadPlugin, SeededReplayPlugin, balanced_rows
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig
from tests.offline_data import needs_fashion_mnist

from .conftest import mlp


def test_balanced_rows_take_the_buffers_per_class_count_from_each_new_class() -> None:
    buffer_y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])  # 12 rows, 3 classes: 4 each
    new_y = torch.tensor([3] * 10 + [4] * 2 + [5] * 7)
    rows = balanced_rows(buffer_y, new_y, torch.Generator().manual_seed(0))
    picked = new_y[rows]
    assert picked.tolist() == [3] * 4 + [4] * 2 + [5] * 4  # a class with fewer gives all
    assert len(set(rows.tolist())) == len(rows)
    again = balanced_rows(buffer_y, new_y, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)


def _classifier() -> ContinualClassifier:
    torch.manual_seed(0)
    cfg = MixtureConfig(kind="lora", rank=2, experts=2, router=RouterConfig(type="topk", k=1))
    encoder = MoRAModel(mlp(d_in=6, hidden=16, d_out=8), cfg, target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 8, [[0, 1], [2, 3], [4, 5]], multi_head=False)
    model.seen[:4] = True  # two experiences trained; classes 4 and 5 not yet
    return model


def test_fine_tuning_changes_only_the_head_and_undoes_a_bias_toward_new_classes() -> None:
    model = _classifier()
    x = torch.randn(80, 6)
    with torch.no_grad():
        feats = model.features(x)
        head = model.heads[0]
        # a head that separates the four seen classes on these features...
        head.weight[:4] = torch.randn(4, 8)
        head.bias.zero_()
        logits = head(feats)[:, :4]
        y = logits.argmax(-1)
        assert set(y.tolist()) == {0, 1, 2, 3}
        spread = float((logits.max(-1).values - logits.min(-1).values).max())
        head.bias[2:4] += spread  # ...then favours the newest two, as training on them does
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    accuracy_before = float((model(x, 0).argmax(-1) == y).float().mean())
    plugin = BalancedHeadPlugin(SeededReplayPlugin(10), epochs=30, lr=0.05)
    plugin.fit_head(model, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
    accuracy_after = float((model(x, 0).argmax(-1) == y).float().mean())
    assert accuracy_before == float((y >= 2).float().mean())  # only the newest win
    assert accuracy_after > accuracy_before + 0.2
    for name, p in model.named_parameters():
        if name.startswith("heads."):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # encoder, adapters, routers untouched
    unseen = model.heads[0].weight[4:]
    assert torch.equal(unseen, before["heads.0.weight"][4:])  # masked classes get no gradient


def test_bad_balance_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set experts.replay_size > 0"):
        from_dict(RunConfig, {"experts": {"balance_head_epochs": 3}, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="balance_head_lr > 0, got 3 and -1"):
        from_dict(
            RunConfig,
            {
                "experts": {"replay_size": 10, "balance_head_epochs": 3, "balance_head_lr": -1},
                "output_dir": str(tmp_path),
            },
        )


def _config(out: Path, epochs: int, **experts: object) -> RunConfig:
    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "class",
            "options": {"per_class": 20, "test_per_class": 10},
        },
        "experts": {"replay_size": 20, "balance_head_epochs": epochs, **experts},
        "strategies": ["moracl"],
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_balanced_run_resumes_exactly_and_differs_from_an_unbalanced_one(
    tmp_path: Path,
) -> None:
    from moracl.jobs.continual import run as run_continual

    full = run_continual(_config(tmp_path / "full", 3), progress=False)
    out = tmp_path / "resumed"
    run_continual(_config(out, 3), progress=False, stop_after=1)
    resumed = run_continual(_config(out, 3), progress=False, resume=True)
    name = "moracl"
    assert resumed.strategies[name].matrix == full.strategies[name].matrix
    saved = json.loads((out / "metrics.json").read_text())["strategies"][0]["matrix"]
    assert saved == full.strategies[name].matrix.to_dict()
    plain = run_continual(_config(tmp_path / "plain", 0), progress=False)
    assert list(plain.strategies[name].matrix.R[0]) == list(full.strategies[name].matrix.R[0])
    assert list(plain.strategies[name].matrix.R[1]) != list(full.strategies[name].matrix.R[1])


def _grown_classifier() -> ContinualClassifier:
    """Three experiences' experts (one each), a top-1 router per layer, random weights."""
    from moracl import AdapterConfig
    from moracl.continual.strategy import GrowthConfig, grow_experts

    torch.manual_seed(0)
    router = RouterConfig(type="topk", k=1, noise=False, normalize=False)
    cfg = MixtureConfig(kind="lora", rank=2, experts=1, router=router)
    encoder = MoRAModel(mlp(d_in=6, hidden=16, d_out=8), cfg, target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 8, [[0, 1], [2, 3], [4, 5]], multi_head=False)
    growth = GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2), experts=1)
    for t in (1, 2):
        grow_experts(model, t, growth)
    with torch.no_grad():
        for _, m in encoder.mixtures():
            for p in m.parameters():
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("force", [False, True], ids=["routed", "forced"])
def test_router_fine_tuning_changes_only_the_routers_and_learns_the_experiences(
    force: bool,
) -> None:
    from moracl.continual.strategy import routing_supervision_loss, set_experience_masks

    model = _grown_classifier()
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    if force:
        set_experience_masks(model, 3)
    centres = torch.randn(3, 6) * 3  # each experience's inputs around its own centre
    experience = torch.arange(3).repeat_interleave(40)
    x = centres[experience] + torch.randn(120, 6)

    def loss_and_inference() -> tuple[float, float]:
        encoder.record_router_inputs = True
        with torch.no_grad():
            encoder(x)
            loss = float(routing_supervision_loss(encoder, experience))
        encoder.record_router_inputs = False
        routed = encoder.last_routing.values()
        hits = [(r.indices[:, 0] == experience).float().mean() for r in routed]
        return loss, float(torch.stack(hits).mean())

    loss_before, hits_before = loss_and_inference()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    replay = SeededReplayPlugin(10)
    plugin = BalancedHeadPlugin(
        replay, epochs=0, lr=1e-3, router_epochs=30, router_lr=0.05, force_routes=force
    )
    generator = torch.Generator().manual_seed(0)
    plugin.fit_routers(model, x, experience, batch_size=16, generator=generator)
    loss_after, hits_after = loss_and_inference()
    assert loss_after < 0.5 * loss_before
    assert hits_before < 0.6 and hits_after > 0.95  # expert e of each layer serves experience e
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".router." in name), name  # experts, head, frozen layers untouched
        assert p.grad is None, name
    assert model._forced_routes is None and not encoder.record_router_inputs  # restored


def test_router_fine_tuning_labels_buffer_rows_with_their_experience() -> None:
    """The rows handed to the routers: each buffer row with the experience it was stored
    from, then as many rows of the new experience as the buffer holds per experience."""
    from types import SimpleNamespace

    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as make_dataset,
    )

    def dataset(value: float, rows: int, labels: list[int]) -> object:
        y = torch.tensor(labels * (rows // len(labels)))
        return make_dataset(torch.full((rows, 6), value), y, targets=y, task_labels=0)

    # experience e's inputs are all e
    stored = {e: SimpleNamespace(buffer=dataset(e, 4, [2 * e, 2 * e + 1])) for e in range(2)}
    replay = SeededReplayPlugin(8)
    replay.storage_policy = SimpleNamespace(buffer_groups=stored)  # type: ignore[assignment]
    strategy = SimpleNamespace(
        model=_grown_classifier(),
        experience=SimpleNamespace(current_experience=2),
        adapted_dataset=dataset(2.0, 10, [4, 5]),
        train_mb_size=4,
    )
    seen = {}
    plugin = BalancedHeadPlugin(replay, epochs=0, lr=1e-3, router_epochs=1)
    plugin.fit_routers = lambda model, x, exp, *a: seen.update(x=x, exp=exp)  # type: ignore[method-assign]
    plugin.after_training_exp(strategy)
    assert seen["exp"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(seen["x"][:, 0], seen["exp"].float())


def test_bad_router_balance_settings_are_refused(tmp_path: Path) -> None:
    learned = {"mode": "learned", "balance_epochs": 2}
    with pytest.raises(ValueError, match="routing.balance_epochs=2 fine-tunes the routers"):
        from_dict(RunConfig, {"experts": {"routing": learned}, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="balance_lr must be a finite number > 0, got 0"):
        from_dict(
            RunConfig,
            {
                "experts": {"replay_size": 5, "routing": {**learned, "balance_lr": 0}},
                "output_dir": str(tmp_path),
            },
        )
    with pytest.raises(ValueError, match="one of them > 0"):
        BalancedHeadPlugin(SeededReplayPlugin(10), epochs=0, lr=1e-3)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_teacher_forced_run_with_router_balancing_resumes_exactly(tmp_path: Path) -> None:
    from moracl.jobs.continual import run as run_continual

    learned = {"mode": "learned", "supervision": 1.0, "teacher_forcing": True, "balance_epochs": 2}
    routing: dict[str, object] = {"routing": learned}
    full = run_continual(_config(tmp_path / "full", 3, **routing), progress=False)
    out = tmp_path / "resumed"
    run_continual(_config(out, 3, **routing), progress=False, stop_after=1)
    resumed = run_continual(_config(out, 3, **routing), progress=False, resume=True)
    name = "moracl"
    assert resumed.strategies[name].matrix == full.strategies[name].matrix
    routed = full.strategies[name].routing
    resumed_routing = resumed.strategies[name].routing
    assert routed is not None and resumed_routing is not None
    assert resumed_routing.task_inference_accuracy == routed.task_inference_accuracy
    plain = run_continual(_config(tmp_path / "plain", 3), progress=False)
    assert list(plain.strategies[name].matrix.R[1]) != list(full.strategies[name].matrix.R[1])
