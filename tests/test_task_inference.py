"""Gaussian task inference: running class statistics against scikit-learn's linear
discriminant analysis, the features it reads, the classifier routing by what it infers, and
a run using it (statistics from every row, resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import MoRAModel
from moracl.config import from_dict
from moracl.continual.config import ExpertsConfig, RunConfig
from moracl.continual.inference import GaussianTaskInference, input_features
from moracl.continual.model import ContinualClassifier
from moracl.experts.mixture import MixtureConfig
from moracl.experts.per_sample import token_mask
from moracl.experts.routers.config import RouterConfig
from tests.offline_data import needs_fashion_mnist


def _groups(n_per: int, groups: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per`` rows per group, Gaussian around a random mean each, a shared skewed spread."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(groups, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(groups, n_per, d, generator=g, dtype=torch.float64) @ mix + means[:, None]
    return x.reshape(-1, d), torch.arange(groups).repeat_interleave(n_per)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.7])
def test_discriminants_equal_scikit_learns_lda_built_one_experience_at_a_time(
    shrinkage: float,
) -> None:
    lda_cls = pytest.importorskip("sklearn.discriminant_analysis").LinearDiscriminantAnalysis
    classes, experiences, d = 3, 2, 5
    x, group = _groups(40, classes * experiences, d)  # equal counts: equal priors
    exp, cls = group // classes, group % classes
    inference = GaussianTaskInference(experiences, classes, shrinkage=shrinkage)
    for e in range(experiences):  # experience by experience, each in two uneven chunks
        rows = (exp == e).nonzero().flatten()
        for part in (rows[:7], rows[7:]):
            inference.update(x[part], e, cls[part])
    lda = lda_cls(solver="lsqr", shrinkage=shrinkage).fit(x.numpy(), group.numpy())
    queries = torch.randn(30, d, dtype=torch.float64) * 4
    scores, owner = inference.group_scores(queries)
    # scikit-learn adds log(1/6), the equal prior, to every group's score
    prior = torch.log(torch.tensor(6.0, dtype=torch.float64))
    want = torch.from_numpy(lda.decision_function(queries.numpy())) + prior
    assert owner.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(scores, want, rtol=1e-9, atol=1e-8)
    per_experience = torch.stack(
        [torch.logsumexp(want[:, e * classes : (e + 1) * classes], 1) for e in range(2)], 1
    )
    torch.testing.assert_close(inference.scores(queries), per_experience, rtol=1e-9, atol=1e-8)
    assert torch.equal(inference(queries), per_experience.argmax(1))


def test_statistics_are_order_free_and_experiences_without_rows_score_minus_infinity() -> None:
    x, y = _groups(10, 4, 3, seed=1)
    a = GaussianTaskInference(3, 4)
    a.update(x, 0, y)
    b = GaussianTaskInference(3, 4)
    for i in reversed(range(0, 40, 9)):
        b.update(x[i : i + 9], 0, y[i : i + 9])
    torch.testing.assert_close(a.sums, b.sums)
    torch.testing.assert_close(a.second, b.second)
    assert torch.equal(a.counts, b.counts)
    assert a.counts[0].tolist() == [10.0] * 4 and a.counts[1:].sum() == 0
    scores = a.scores(x[:5])
    assert torch.isinf(scores[:, 1:]).all() and torch.isfinite(scores[:, 0]).all()
    assert a(x[:5]).tolist() == [0] * 5


def test_bad_input_is_refused_naming_the_value() -> None:
    inference = GaussianTaskInference(2, 3)
    assert not inference.ready
    with pytest.raises(RuntimeError, match="no statistics"):
        inference.scores(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"experience must be in \[0, 2\), got 2"):
        inference.update(torch.zeros(2, 4), 2, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got 0..3"):
        inference.update(torch.zeros(2, 4), 0, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"features \(n, d\) and labels \(n,\)"):
        inference.update(torch.zeros(2, 4), 0, torch.zeros(3, dtype=torch.long))
    inference.update(torch.zeros(2, 4), 0, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 4 features per row, got 5"):
        inference.update(torch.zeros(2, 5), 0, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shrinkage must be in"):
        GaussianTaskInference(2, 3, shrinkage=1.5)


def test_a_state_dict_restores_the_statistics_into_a_fresh_module() -> None:
    x, y = _groups(8, 3, 4)
    a = GaussianTaskInference(2, 3)
    a.update(x, 1, y)
    queries = torch.randn(6, 4, dtype=torch.float64)
    want = a.scores(queries)
    b = GaussianTaskInference(2, 3)
    b.load_state_dict(a.state_dict())
    assert b.dim == 4 and b.ready
    torch.testing.assert_close(b.scores(queries), want)
    a.update(x[:3], 0, y[:3])  # the cached discriminant follows the statistics
    assert not torch.equal(a.scores(queries), want)


class _Tokens(nn.Module):
    """``x (b, t, 3)`` -> a frozen linear layer, then two adapted ones; declares a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        if mask is None:
            return self.out(self.mid(h)).mean(1)
        with token_mask(mask):
            out = self.out(self.mid(h)).mean(1)
        self.calls += 1
        return out


def test_input_features_are_the_first_adapted_layers_input_averaged_over_real_tokens() -> None:
    cfg = MixtureConfig(kind="lora", rank=2, experts=2, router=RouterConfig(type="topk", k=1))
    encoder = MoRAModel(_Tokens(), cfg, target_modules=["mid", "out"])
    x = torch.randn(3, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = input_features(encoder, x, mask)
    h = torch.tanh(encoder.model.embed(x)).double()  # (3, 5, 6)
    m = mask.double()[..., None]
    torch.testing.assert_close(got, (h * m).sum(1) / m.sum(1))
    assert encoder.model.calls == 0  # stopped at the first adapted layer
    torch.testing.assert_close(input_features(encoder, x), h.mean(1))
    assert not any(layer._forward_pre_hooks for _, layer in encoder.adapted_layers())


def _inferring_classifier() -> tuple[ContinualClassifier, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)).requires_grad_(False)
    router = RouterConfig(type="task", num_tasks=2, task_weights=True)
    encoder = MoRAModel(
        base, MixtureConfig(kind="lora", rank=2, experts=2, router=router), target_modules=["2"]
    )
    for _, m in encoder.mixtures():
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    inference = GaussianTaskInference(2, 4)
    model = ContinualClassifier(
        encoder,
        8,
        [[0, 1], [2, 3]],
        multi_head=False,
        route_by_task=True,
        task_inference=inference,
    )
    model.seen[:] = True
    model.route_tasks(2)
    x = torch.randn(64, 4)
    y = torch.randint(0, 4, (64,))
    x = x + 4 * (y[:, None] >= 2)  # experience 1's classes sit elsewhere
    feats = input_features(encoder, x)
    assert torch.allclose(feats, torch.relu(base[0](x)).double())
    for e in (0, 1):
        rows = (y >= 2) == bool(e)
        inference.update(feats[rows], e, y[rows])
    return model, x, y


def test_evaluation_routes_by_the_inferred_experience_and_training_by_the_labels() -> None:
    model, x, y = _inferring_classifier()
    truth = (y >= 2).long()
    model.eval()
    zeros = torch.zeros_like(y)
    got = model(x, zeros)  # test rows without task labels
    inferred = model.take_inferred()
    assert inferred is not None
    assert (inferred == truth).float().mean() > 0.9
    assert 0 < int(inferred.sum()) < len(y)
    by_hand = model.heads[0](model.encoder(x, task_ids=inferred))
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(
        model.features(x, truth, infer=False), model.encoder(x, task_ids=truth)
    )
    model.train()
    assert model.take_inferred() is None  # taken above
    torch.testing.assert_close(model(x, truth), model.heads[0](model.encoder(x, task_ids=truth)))
    assert model.take_inferred() is None  # training routes by the labels: nothing inferred


def test_evaluation_reports_how_often_the_inferred_experience_is_right() -> None:
    from moracl.continual.evaluation import evaluate

    model, x, y = _inferring_classifier()
    tests = [
        (x[y < 2], y[y < 2], torch.zeros_like(y[y < 2])),
        (x[y >= 2], y[y >= 2], torch.zeros_like(y[y >= 2])),
    ]
    ev = evaluate(model, tests, batch_size=16)
    model.eval()
    right = sum(int((model.infer_tasks(t[0]) == j).sum()) for j, t in enumerate(tests))
    assert ev.task_inference == pytest.approx(right / len(y))


def test_a_classifier_without_task_routing_refuses_task_inference() -> None:
    encoder = MoRAModel(
        nn.Sequential(nn.Linear(4, 8)),
        MixtureConfig(kind="lora", rank=2, experts=2, router=RouterConfig(type="topk", k=1)),
        target_modules=["0"],
    )
    with pytest.raises(ValueError, match="route_by_task=True"):
        ContinualClassifier(
            encoder, 8, [[0, 1]], multi_head=False, task_inference=GaussianTaskInference(1, 2)
        )


def test_config_refuses_bad_task_inference_settings() -> None:
    auto = {"mode": "auto", "without_task_labels": "lda"}
    with pytest.raises(ValueError, match="one of \\['learned', 'gaussian'\\], got 'lda'"):
        ExpertsConfig(routing=auto)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shrinkage must be a finite number in \[0, 1\]"):
        ExpertsConfig(routing={"mode": "gaussian", "shrinkage": -0.1})  # type: ignore[arg-type]


def _config(out: Path, setting: str = "class", **experts: object) -> RunConfig:
    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": setting,
            "options": {"per_class": 20, "test_per_class": 10},
        },
        "experts": {
            "replay_size": 20,
            "balance_head_epochs": 2,
            "routing": {"mode": "auto", "without_task_labels": "gaussian"},
            **experts,
        },
        "strategies": ["moracl"],
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@needs_fashion_mnist
def test_a_task_incremental_run_routes_by_its_task_labels_with_nothing_to_infer() -> None:
    import moracl_scenarios  # noqa: F401
    from moracl_scenarios.streams import build_stream, load_encoder

    from moracl.continual.factory import build_model

    config = _config(Path("unused"), "task")
    stream = build_stream("split-fashion", setting="task", seed=0, per_class=4, test_per_class=2)
    model = build_model("moracl", config, load_encoder(stream.info), stream.info)
    assert model.route_by_task and model.multi_head and model.task_inference is None
    classed = _config(Path("unused"), "class")
    stream = build_stream("split-fashion", setting="class", seed=0, per_class=4, test_per_class=2)
    model = build_model("moracl", classed, load_encoder(stream.info), stream.info)
    assert model.route_by_task and not model.multi_head
    assert isinstance(model.task_inference, GaussianTaskInference)
    assert model.task_inference.experiences == 5 and model.task_inference.classes == 10
    gaussian = _config(Path("unused"), "class", routing={"mode": "gaussian"})
    model = build_model("moracl", gaussian, load_encoder(stream.info), stream.info)
    assert isinstance(model.task_inference, GaussianTaskInference) and model.route_by_task
    by_task = _config(Path("unused"), "class", routing={"mode": "task"})
    with pytest.raises(ValueError, match="mode=task routes each row by its task label, but"):
        build_model("moracl", by_task, load_encoder(stream.info), stream.info)
    # the check is moracl's: a baseline with the same keys builds
    model = build_model("naive", by_task, load_encoder(stream.info), stream.info)
    assert not isinstance(model.encoder.adapter_configs["default"], MixtureConfig)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_run_keeps_every_training_rows_statistics_and_resumes_exactly(tmp_path: Path) -> None:
    import moracl_scenarios  # noqa: F401
    from moracl_scenarios.streams import build_stream, load_encoder

    from moracl.continual.checkpoint import load_checkpoint
    from moracl.continual.splits import split_stream
    from moracl.continual.strategy import materialize
    from moracl.jobs.continual import run as run_continual

    full = run_continual(_config(tmp_path / "full"), progress=False)
    out = tmp_path / "resumed"
    run_continual(_config(out), progress=False, stop_after=1)
    resumed = run_continual(_config(out), progress=False, resume=True)
    name = "moracl"
    assert resumed.strategies[name].matrix == full.strategies[name].matrix
    routing = full.strategies[name].routing
    assert routing is not None and routing.task_inference_accuracy is not None
    assert resumed.strategies[name].routing == routing
    # the saved statistics are those of every training row (the validation rows, a tenth of
    # each class's, held out), from the frozen layers
    stream = build_stream("split-fashion", setting="class", seed=0, per_class=20, test_per_class=10)
    held_out = split_stream(list(stream.benchmark.train_stream), 0.1, seed=0)
    frozen = load_encoder(stream.info)
    encoder = MoRAModel(
        frozen,
        MixtureConfig(kind="lora", rank=2, experts=1, router=RouterConfig(type="topk", k=1)),
        target_modules=list(frozen.default_targets),
    )
    want = GaussianTaskInference(5, 10)
    for e, exp in enumerate(stream.benchmark.train_stream):
        x, y, _ = materialize(exp.dataset)
        rows = held_out.indices[e][0]
        want.update(input_features(encoder, x[rows]), e, y[rows])
    assert set(want.counts[want.counts > 0].tolist()) == {18.0}  # 20 rows a class, 2 held out
    saved = load_checkpoint(tmp_path / "full").tensors["moracl"]
    for key in ("sums", "counts", "second"):
        torch.testing.assert_close(saved[f"task_inference.{key}"], getattr(want, key))
