"""``moracl meta``: config, baselines against hand-written references, the job end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from moracl_scenarios.fewshot import FEWSHOT, FewShotData, Pool
from torch import Tensor, nn

from moracl.cli import main
from moracl.config import MetaAlgorithm, MetaConfig, from_dict, load_config, to_dict
from moracl.experts.mixture import MixtureConfig
from moracl.jobs.meta import run as run_meta
from moracl.meta.baselines import (
    adam_update,
    adapted_accuracy,
    prototype_accuracy,
    sgd_update,
    summarize,
)
from moracl.meta.learn import EpisodeShape, build_meta_model, meta_algorithm, meta_learn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- a toy few-shot scenario: Gaussian classes under a frozen random layer -------------------
class ToyBody(nn.Module):
    default_targets = ("fc",)

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 12
        g = torch.Generator().manual_seed(5)
        self.fc = nn.Linear(8, 12)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(12, 8, generator=g) / 8**0.5)
            self.fc.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x))


def toy_fewshot() -> FewShotData:
    """Classes differ in the first two input features only; the other six are loud noise, so
    what transfers from the training classes is which directions to listen to."""
    g = torch.Generator().manual_seed(0)
    centres = torch.zeros(12, 8)
    centres[:, :2] = torch.randn(12, 2, generator=g) * 1.5
    labels = torch.arange(12).repeat_interleave(12)
    noise = torch.randn(labels.numel(), 8, generator=g) * torch.tensor([0.3] * 2 + [1.5] * 6)
    features = centres[labels] + noise
    pools = {
        s: Pool(features, labels, classes)
        for s, classes in (("train", tuple(range(6))), ("val", (6, 7, 8)), ("test", (9, 10, 11)))
    }
    return FewShotData(
        name="toy",
        pools=pools,
        class_names=tuple(f"c{i}" for i in range(12)),
        feature_dim=8,
        make_body=ToyBody,
        backbone="a frozen random tanh layer",
        split="6/3/3 classes",
        source="synthetic",
        licence="none",
    )


@pytest.fixture
def toy() -> Iterator[None]:
    warnings.filterwarnings("ignore", "test.episodes=24 is below")
    with FEWSHOT.temporarily("toy", toy_fewshot):
        yield


def tiny_config(out: Path, **meta: object) -> MetaConfig:
    config: MetaConfig = from_dict(
        MetaConfig,
        {
            "job": "meta",
            "backbone": "toy",
            "adapter": {"kind": "lora", "rank": 2},
            "data": {"scenario": "toy", "ways": 3, "shots": 2, "queries": 3},
            "meta": {
                "inner_lr": 0.3,
                "inner_steps": 2,
                "test_inner_steps": 3,
                "meta_batch": 4,
                "steps": 4,
                "val_every": 2,
                "val_episodes": 6,
                **meta,
            },
            "optim": {"lr": 0.01},
            "test": {"episodes": 24, "batch": 10, "finetune_steps": 3, "finetune_lr": 0.05},
            "output_dir": str(out),
        },
    )
    return config


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wordnet_fewshot.yaml", "digits_fewshot.yaml"])
def test_meta_configs_validate(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, MetaConfig)
    assert config.test.episodes >= 600
    assert config.data.ways == 5 and config.meta.algorithm is MetaAlgorithm.MAML


def test_meta_config_errors_name_the_valid_keys_and_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: meta\nmeta: {inner_lrr: 0.1}\n")
    with pytest.raises(ValueError, match=r"meta: unknown key\(s\) \['inner_lrr'\].*'inner_lr'"):
        load_config(bad)
    bad.write_text("job: meta\nmeta: {algorithm: reptile}\n")
    with pytest.raises(ValueError, match=r"meta.algorithm: expected one of \['maml', 'fomaml'"):
        load_config(bad)
    bad.write_text("job: meta\ndata: {ways: 1}\n")
    with pytest.raises(ValueError, match="data.ways >= 2"):
        load_config(bad)
    bad.write_text("job: meta\ndata: {wayz: 5}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wayz'\].*'queries'.*'ways'"):
        load_config(bad)
    assert main(["validate", str(bad)]) == 2


def test_mixture_adapter_sections_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mix.yaml"
    path.write_text(
        "job: meta\nadapter: {mixture: true, kind: lora, rank: 4, experts: 3, "
        "router: {type: topk, k: 1}}\n"
    )
    config = load_config(path)
    assert isinstance(config.adapter, MixtureConfig) and config.adapter.num_experts == 3
    assert from_dict(MetaConfig, to_dict(config)) == config


# -- baselines against references ----------------------------------------------------------
def test_prototype_accuracy_equals_a_hand_written_nearest_centroid() -> None:
    g = torch.Generator().manual_seed(0)
    t, ways, shots, queries, d = 5, 4, 3, 6, 7
    fs = torch.randn(t, ways * shots, d, generator=g, dtype=torch.float64)
    fq = torch.randn(t, ways * queries, d, generator=g, dtype=torch.float64)
    ys = torch.stack([torch.randperm(ways * shots, generator=g) % ways for _ in range(t)])
    yq = torch.randint(0, ways, (t, ways * queries), generator=g)
    expected = []
    for i in range(t):
        centroids = [
            [sum(float(fs[i, j, k]) for j in range(ways * shots) if ys[i, j] == c) / shots
             for k in range(d)]
            for c in range(ways)
        ]  # fmt: skip
        correct = 0
        for j in range(ways * queries):
            dist = [sum((float(fq[i, j, k]) - ck[k]) ** 2 for k in range(d)) for ck in centroids]
            correct += int(min(range(ways), key=dist.__getitem__) == int(yq[i, j]))
        expected.append(correct / (ways * queries))
    got = prototype_accuracy(fs, ys, fq, yq, ways)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) > 1  # the episodes differ, so the check has teeth


def test_summary_is_the_mean_and_the_1_96_sem() -> None:
    acc = [0.2, 0.5, 0.9, 0.4, 0.75, 0.6]
    s = summarize(torch.tensor(acc))
    assert s.mean == pytest.approx(statistics.fmean(acc))
    assert s.ci95 == pytest.approx(1.96 * statistics.stdev(acc) / math.sqrt(len(acc)))
    with pytest.raises(ValueError, match="at least 2"):
        summarize([0.5])


def _toy_episode(t: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(t, 6, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(t, 9, 4, generator=g, dtype=torch.float64)
    ys = torch.arange(3).repeat_interleave(2).expand(t, -1)
    yq = torch.randint(0, 3, (t, 9), generator=g)
    return xs, ys, xq, yq


def _linear(params: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ params["w1"].T) @ params["w2"].T + params["b"]


def test_adapted_accuracy_with_sgd_matches_a_plain_autograd_loop() -> None:
    g = torch.Generator().manual_seed(2)
    params = {
        "w1": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "w2": torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.1,
        "b": torch.zeros(3, dtype=torch.float64),
    }
    episodes = _toy_episode()
    got = adapted_accuracy(
        _linear, params, ["w2", "b"], episodes, steps=4, update=sgd_update({"w2": 0.7, "b": 0.7})
    )
    xs, ys, xq, yq = episodes
    for i in range(3):
        p = {n: v.clone().requires_grad_(n != "w1") for n, v in params.items()}
        for _ in range(4):
            loss = F.cross_entropy(_linear(p, xs[i]), ys[i])
            gw, gb = torch.autograd.grad(loss, [p["w2"], p["b"]])
            p = {**p, "w2": p["w2"] - 0.7 * gw, "b": p["b"] - 0.7 * gb}
        acc = (_linear(p, xq[i]).argmax(-1) == yq[i]).double().mean()
        assert float(got[i]) == pytest.approx(float(acc))
    assert got.dtype == torch.float64 and got.shape == (3,)


def test_adam_update_matches_torch_adam() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    ref = w.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.05)
    params, state = {"w": w}, {}
    update = adam_update(0.05)
    for step, gr in enumerate(grads, start=1):
        ref.grad = gr.clone()
        opt.step()
        params, state = update(params, {"w": gr}, state, step)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-12, atol=1e-12)


# -- the job ---------------------------------------------------------------------------------
@pytest.mark.usefixtures("toy")
def test_job_end_to_end_metrics_match_the_saved_episodes(tmp_path: Path) -> None:
    result = run_meta(tiny_config(tmp_path / "a"), progress=False)
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} >= {"report.md", "metrics.json", "episodes.json"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    episodes = json.loads((out / "episodes.json").read_text())
    for method in ("meta", "prototype", "finetune"):
        acc = episodes[method]
        assert len(acc) == 24 and all(0.0 <= a <= 1.0 for a in acc)
        summary = metrics["results"][method]
        assert summary["mean"] == pytest.approx(statistics.fmean(acc), abs=1e-12)
        ci = 1.96 * statistics.stdev(acc) / math.sqrt(len(acc))
        assert summary["ci95"] == pytest.approx(ci, abs=1e-12)
        assert summary["episodes"] == 24
        assert result.summaries[method].mean == pytest.approx(summary["mean"])
    diff = [a - b for a, b in zip(episodes["meta"], episodes["prototype"])]
    paired = metrics["paired_differences"]["meta − prototype"]
    assert paired["mean"] == pytest.approx(statistics.fmean(diff), abs=1e-12)
    assert paired["ci95"] == pytest.approx(1.96 * statistics.stdev(diff) / math.sqrt(24), abs=1e-12)
    assert [row["step"] for row in metrics["validation"]] == [0, 2, 4]
    best = max(metrics["validation"], key=lambda r: r["val_accuracy"])
    assert metrics["selected_step"] == best["step"]
    report = (out / "report.md").read_text()
    assert f"{100 * summary['mean']:.2f} %" in report and "Only 24 test episodes" in report


@pytest.mark.usefixtures("toy")
def test_job_is_deterministic_and_the_baselines_ignore_meta_training(tmp_path: Path) -> None:
    run_meta(tiny_config(tmp_path / "a"), progress=False)
    run_meta(tiny_config(tmp_path / "b"), progress=False)
    run_meta(tiny_config(tmp_path / "c", steps=0, val_every=0), progress=False)
    a, b, c = (json.loads((tmp_path / x / "episodes.json").read_text()) for x in "abc")
    assert a == b
    assert a["prototype"] == c["prototype"] and a["finetune"] == c["finetune"]


@pytest.mark.usefixtures("toy")
@pytest.mark.parametrize("algorithm", ["fomaml", "metasgd", "anil"])
def test_job_runs_every_algorithm(tmp_path: Path, algorithm: str) -> None:
    result = run_meta(tiny_config(tmp_path, algorithm=algorithm), progress=False)
    assert set(result.summaries) == {"meta", "prototype", "finetune"}


@pytest.mark.usefixtures("toy")
def test_job_with_a_noisy_mixture_of_experts(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    config.adapter = MixtureConfig.from_dict(
        {"kind": "lora", "rank": 2, "experts": 3, "router": {"type": "topk", "k": 1}}
    )
    result = run_meta(config, progress=False)
    assert result.trainable_parameters > 0


@pytest.mark.slow
@pytest.mark.usefixtures("toy")
def test_meta_training_learns_on_the_toy_tasks(tmp_path: Path) -> None:
    """Twenty outer steps raise meta-validation accuracy above the untrained start."""
    config = tiny_config(tmp_path, steps=20, val_every=20, val_episodes=40)
    result = run_meta(config, progress=False)
    start, end = (row["val_accuracy"] for row in result.validation)
    assert end > start + 0.05, (start, end)


def test_cli_meta_refuses_other_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["meta", str(CONFIGS / "wordnet_finetune.yaml")]) == 2
    assert "not a 'meta' one" in capsys.readouterr().err


# -- model selection without the test split ------------------------------------------------------
class NoTestData(FewShotData):
    """The toy scenario, whose test classes raise when an episode of them is drawn."""

    def sampler(self, split: str, *, ways: int, shots: int, queries: int) -> Any:
        if split == "test":
            raise AssertionError("a meta-test episode was drawn")
        return super().sampler(split, ways=ways, shots=shots, queries=queries)


def no_test_fewshot() -> FewShotData:
    toy = toy_fewshot()
    return NoTestData(**{f.name: getattr(toy, f.name) for f in dataclasses.fields(toy)})


@pytest.mark.usefixtures("toy")
def test_a_run_without_the_test_split_draws_no_test_episode(tmp_path: Path) -> None:
    full = run_meta(tiny_config(tmp_path / "full"), progress=False)
    with FEWSHOT.temporarily("toy-no-test", no_test_fewshot):
        guarded = tiny_config(tmp_path / "guard")
        guarded.data.scenario = "toy-no-test"
        with pytest.raises(AssertionError, match="meta-test episode was drawn"):  # it bites
            run_meta(guarded, progress=False)
        config = tiny_config(tmp_path / "trial")
        config.data.scenario = "toy-no-test"
        trial = run_meta(config, progress=False, evaluate_test=False)
    assert not trial.evaluated_test and full.evaluated_test
    assert trial.summaries == {} and trial.accuracies == {} and trial.paired == {}
    # the same meta-training and selection as the run that meta-tests
    assert trial.validation == full.validation and trial.selected_step == full.selected_step
    best = max(row["val_accuracy"] for row in full.validation)
    assert trial.best_validation_accuracy == full.best_validation_accuracy == best
    out = tmp_path / "trial"
    assert not (out / "episodes.json").exists() and (out / "adapter").is_dir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_split"] == "not evaluated" and metrics["results"] == {}
    assert metrics["best_validation_accuracy"] == best
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["test_split"] == "evaluated"
    report = (out / "report.md").read_text()
    assert "No meta-test episode was\ndrawn" in report and "Only 24 test episodes" not in report
    assert "meta-test not run" in trial.table()


@pytest.mark.usefixtures("toy")
def test_the_kept_parameters_score_the_best_validation_accuracy() -> None:
    """meta_learn keeps the parameters of its best meta-validation check (not the last):
    rescored on the same validation episodes, they give ``best_validation_accuracy``."""
    config = tiny_config(Path("unused"), steps=6, val_every=2)
    d, m = config.data, config.meta
    shape = EpisodeShape(ways=d.ways, shots=d.shots, queries=d.queries)
    source = toy_fewshot()
    model = build_meta_model(source, ways=d.ways, adapter=config.adapter, seed=config.seed)
    result = meta_learn(
        model, source, shape=shape, meta=m, optim=config.optim, test=config.test,
        seed=config.seed, progress=False, evaluate_test=False,
    )  # fmt: skip
    curve = {row["step"]: row["val_accuracy"] for row in result.validation}
    best = max(curve.values())
    # the earliest of the best checks (a later tie does not replace it); here the curve is
    # flat from step 0, so that is not the last check (which a plain loop would keep): teeth
    assert result.selected_step == min(step for step, acc in curve.items() if acc == best)
    assert result.best_validation_accuracy == curve[result.selected_step] == best
    maml = meta_algorithm(model, m.algorithm, m.inner_lr)
    episodes = shape.sampler(source, "val").sample_batch(
        m.val_episodes, generator=torch.Generator().manual_seed(config.seed + 1)
    )
    again = adapted_accuracy(
        maml.functional_forward, maml.meta_parameters(), maml.inner_names, episodes,
        steps=m.test_inner_steps, update=sgd_update(maml.step_sizes()), batch=config.test.batch,
    )  # fmt: skip
    assert float(again.mean()) == pytest.approx(result.best_validation_accuracy, abs=1e-12)


@pytest.mark.usefixtures("toy")
def test_without_validation_no_best_accuracy_and_no_test_free_run(tmp_path: Path) -> None:
    result = run_meta(tiny_config(tmp_path / "a", val_every=0), progress=False)
    assert result.best_validation_accuracy is None and result.selected_step == 4
    with pytest.raises(ValueError, match=r"meta.val_every=0 never validates"):
        run_meta(tiny_config(tmp_path / "b", val_every=0), progress=False, evaluate_test=False)
    assert not (tmp_path / "b").exists()
