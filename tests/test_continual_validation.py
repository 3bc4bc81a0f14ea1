"""Validation splits, runs that never read the test split, and early stopping in continual
runs: on tiny tensor streams whose every row carries a unique id, so that what a strategy
trains on, what it is validated on and what it is tested on can be told apart exactly."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("avalanche")

from moracl.config import from_dict
from moracl.continual.config import RunConfig
from moracl.continual.metrics import RunResults
from moracl.continual.run import run_continual
from moracl.continual.splits import class_counts, split_seed, split_stream, stratified_split
from moracl.continual.strategy import FastTemplate

CLASSES = ((0, 1), (2, 3), (4, 5))


class TinyEncoder(nn.Module):
    """A frozen ``8 -> 8`` layer (the adapters go on it)."""

    default_targets = ("fc",)
    feature_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x))


def _ids(x: Tensor) -> set[int]:
    """The unique ids carried by the last feature of each row."""
    return {round(float(v) * 10_000) for v in x[:, -1]}


class _Stream:
    """A stream of three experiences of 8-feature rows; feature 7 of a row is its unique id
    (train rows 1.., test rows 5000..), the other features random. ``noise``: training
    labels drawn at random (a model can only memorise them, so validation loss rises)."""

    def __init__(
        self, setting: str = "task", size: int = 10, *, seed: int = 0, noise: bool = False
    ) -> None:
        from moracl_scenarios.streams import Setting, StreamInfo, tensor_benchmark

        g = torch.Generator().manual_seed(seed)
        counter = iter(range(1, 10_000))

        def part(classes: tuple[int, ...], n: int, first: int, noisy: bool) -> tuple[Tensor, ...]:
            y = torch.tensor([c for c in classes for _ in range(n)])
            if noisy:
                y = torch.tensor(classes)[torch.randint(len(classes), (len(y),), generator=g)]
            x = torch.randn(len(y), 8, generator=g) + 0.5 * y[:, None].float()
            x[:, -1] = torch.tensor([first + next(counter) for _ in range(len(y))]) / 10_000
            return x, y

        self.train = [part(c, size, 0, noise) for c in CLASSES]
        self.test = [part(c, 4, 5000, False) for c in CLASSES]
        kind = Setting(setting)
        labels = [0, 1, 2] if kind is Setting.TASK else None
        self._bench = tensor_benchmark(self.train, self.test, task_labels=labels)
        self.info = StreamInfo(
            name="tiny-ids",
            setting=kind,
            modality="image",
            backbone="tiny",
            class_names=tuple("abcdef"),
            experience_classes=CLASSES,
            experience_names=("first", "second", "third"),
            source="synthetic",
            licence="none",
        )

    @property
    def benchmark(self) -> Any:
        return self._bench


class _Sealed:
    """A benchmark whose test stream raises on any access."""

    def __init__(self, bench: Any) -> None:
        self.train_stream = bench.train_stream

    @property
    def test_stream(self) -> Any:
        raise AssertionError("the test stream was read")


class _SealedStream(_Stream):
    @property
    def benchmark(self) -> Any:
        return _Sealed(self._bench)


def _config(out: Path, *, setting: str = "task", **changes: Any) -> RunConfig:
    data: dict[str, Any] = {
        "job": "run",
        "scenario": {"name": "tiny-ids", "setting": setting},
        "adapter": {"kind": "lora", "rank": 2, "alpha": 4.0},
        "experts": {"per_experience": 1, "replay_size": 6},
        "strategies": ["moracl", "naive", "ewc", "lwf", "replay", "joint"],
        "baselines": {"replay_size": 6},
        "train": {"epochs": 3, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-2, "head_lr": 5e-2},
        "output_dir": str(out),
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section] = {**data[section], name: value}
        else:
            data[key] = value
    return from_dict(RunConfig, data)


def _run(config: RunConfig, stream: _Stream, **kwargs: Any) -> RunResults:
    torch.manual_seed(0)
    return run_continual(config, stream=stream, encoder=TinyEncoder(), progress=False, **kwargs)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[set[int]]]:
    """The ids of the rows of each training experience a strategy's mini-batches were drawn
    from (the experience's own, with any replayed ones; Joint: all experiences'), in the
    order strategies and experiences trained."""
    record: list[set[int]] = []
    tensors = FastTemplate._tensors

    def spy(self: FastTemplate, dataset: Any) -> tuple[Tensor, Tensor, Tensor]:
        out = tensors(self, dataset)
        record.append(_ids(out[0]))
        return out

    monkeypatch.setattr(FastTemplate, "_tensors", spy)
    yield record


# -- the split ------------------------------------------------------------------------------


def test_split_is_disjoint_stratified_and_stable_for_a_seed() -> None:
    # classes of 20, 7 and 1 rows: a quarter of 20 is 5, of 7 is 1.75 -> 2, of 1 is none
    targets = torch.tensor([0] * 20 + [1] * 7 + [2])[torch.randperm(28)]
    train, val = stratified_split(targets, 0.25, seed=3)
    assert sorted(train.tolist() + val.tolist()) == list(range(28))  # every row once
    counts = {c: int((targets[val] == c).sum()) for c in (0, 1, 2)}
    assert counts == {0: 5, 1: 2, 2: 0} == class_counts(targets, 0.25)
    again = stratified_split(targets, 0.25, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(stratified_split(targets, 0.25, seed=4)[1], val)
    # a share that rounds every class to none still holds one row out (of the largest class)
    assert class_counts(torch.tensor([0, 0, 0, 1, 1, 1, 1]), 0.1) == {0: 0, 1: 1}
    with pytest.raises(ValueError, match=r"val_share=1.0; expected a number in \[0, 1\)"):
        stratified_split(targets, 1.0, seed=0)


def test_stream_split_keeps_experiences_and_is_disjoint_from_test() -> None:
    from moracl.continual.batches import materialize

    stream = _Stream("task", size=10)
    originals = list(stream.benchmark.train_stream)
    split = split_stream(originals, 0.2, seed=7)
    test_ids = set().union(*(_ids(x) for x, _ in stream.test))
    for i, (new, old) in enumerate(zip(split.train, originals)):
        assert new.current_experience == old.current_experience == i
        assert new.task_label == old.task_label == i
        assert set(new.classes_in_this_experience) == set(old.classes_in_this_experience)
        train_x = materialize(new.dataset)[0]
        val_x, val_y, val_t = split.validation[i]
        assert _ids(train_x) | _ids(val_x) == _ids(stream.train[i][0])
        assert not _ids(train_x) & _ids(val_x) and not (_ids(train_x) | _ids(val_x)) & test_ids
        assert torch.bincount(val_y).tolist()[min(CLASSES[i]) :] == [2, 2]  # 20% of 10 each
        assert set(val_t.tolist()) == {i}  # the task labels evaluation uses
        rows, held = split.indices[i]
        assert torch.equal(rows, stratified_split(stream.train[i][1], 0.2, split_seed(7, i))[0])
        assert len(rows) + len(held) == 20
    other = split_stream(originals, 0.2, seed=8)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(split.indices, other.indices))
    assert split_stream(originals, 0.0, seed=7).train == originals  # no split: as given


def test_strategies_train_on_the_training_rows_only(tmp_path: Path, seen: list[set[int]]) -> None:
    stream = _Stream("class", size=10)
    config = _config(tmp_path / "run", setting="class", train__epochs=1)
    results = _run(config, stream)
    split = split_stream(list(stream.benchmark.train_stream), 0.1, seed=0)
    val_ids = set().union(*(_ids(x) for x, _, _ in split.validation))
    test_ids = set().union(*(_ids(x) for x, _ in stream.test))
    assert len(val_ids) == 6  # one row of each class of 10
    trained = set().union(*seen)
    assert trained and not trained & (val_ids | test_ids)
    every = set().union(*(_ids(x) for x, _ in stream.train))
    assert trained == every - val_ids  # replay, joint: nothing but training rows
    for s in results.strategies.values():
        assert (s.validation is not None and s.validation.is_complete) or s.name == "joint"
        assert s.matrix is not None and s.early_stopping == []


# -- the test split left alone ----------------------------------------------------------------


def test_a_run_without_the_test_split_never_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _config(out, train__epochs=2, train__early_stopping={"patience": 1})
    stream = _SealedStream("task", size=6)
    results = _run(config, stream, evaluate_test=False, stop_after=0)
    with pytest.raises(ValueError, match="was run with evaluate_test=False: it never read"):
        _run(config, _Stream("task", size=6), resume=True)
    results = _run(config, stream, evaluate_test=False, resume=True)
    assert not results.test_evaluated
    for s in results.strategies.values():
        assert s.matrix is None and s.validation is not None
        assert not math.isnan(s.validation.acc()) and not math.isnan(s.validation.b[0])
        assert [r.experience for r in s.early_stopping] == ([2] if s.name == "joint" else [0, 1, 2])
    data = json.loads((out / "metrics.json").read_text())
    assert data["test_evaluated"] is False and data["strategies"][0]["matrix"] is None
    report = (out / "report.md").read_text()
    assert "**The test split was not evaluated**" in report and "| val ACC | val BWT |" in report
    assert "test ACC" not in report
    with (out / "logs" / "eval.csv").open() as fh:
        assert len(list(csv.reader(fh))) == 1  # the header only
    with pytest.raises(ValueError, match="scenario.val_share=0 holds none out"):
        _run(_config(tmp_path / "none", scenario__val_share=0.0), stream, evaluate_test=False)


def test_garbage_test_data_change_no_weight_nor_validation(tmp_path: Path) -> None:
    from moracl.continual.checkpoint import load_checkpoint, tensors_equal

    clean = _Stream("class", size=8)
    garbage = _Stream("class", size=8)
    g = torch.Generator().manual_seed(1)
    garbage.test = [(torch.randn(x.shape, generator=g) * 100, y.flip(0)) for x, y in clean.test]
    from moracl_scenarios.streams import tensor_benchmark

    garbage._bench = tensor_benchmark(clean.train, garbage.test)
    # moracl with its replay buffer and gaussian task inference (its statistics, and early
    # stopping routing the current experience's rows by their experience), EWC's
    # importances, Joint on every validation split
    changes = {
        "strategies": ["moracl", "ewc", "joint"],
        "experts__routing": {"mode": "gaussian"},
        "train__epochs": 2,
        "train__early_stopping": {"patience": 1},
    }
    a = _run(_config(tmp_path / "a", setting="class", **changes), clean)
    b = _run(_config(tmp_path / "b", setting="class", **changes), garbage)
    ta, tb = load_checkpoint(tmp_path / "a").tensors, load_checkpoint(tmp_path / "b").tensors
    assert list(ta) == list(tb) and all(tensors_equal(ta[k], tb[k]) for k in ta)
    for name in a.strategies:
        sa, sb = a.strategies[name], b.strategies[name]
        assert sa.validation == sb.validation and sa.early_stopping == sb.early_stopping
    assert any(a.strategies[n].matrix != b.strategies[n].matrix for n in a.strategies)


# -- early stopping ---------------------------------------------------------------------------


def test_early_stopping_keeps_the_best_validation_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen: list[set[int]]
) -> None:
    """Every epoch's trainable state recorded, its validation loss computed here with a plain
    loop: after each experience the weights are those of the lowest-loss epoch, and training
    ran until ``patience`` epochs after it (or to the last epoch)."""
    epochs: list[list[dict[str, Tensor]]] = []
    kept: list[dict[str, Tensor]] = []
    models: list[nn.Module] = []
    training_epoch, after = FastTemplate.training_epoch, FastTemplate._after_training_exp

    def state(model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def spy_epoch(self: FastTemplate, **kwargs: Any) -> None:
        if not epochs or len(epochs) == len(kept):
            epochs.append([])
        training_epoch(self, **kwargs)
        epochs[-1].append(state(self.model))
        models[:] = [self.model]

    def spy_after(self: FastTemplate, **kwargs: Any) -> None:
        after(self, **kwargs)
        kept.append(state(self.model))

    monkeypatch.setattr(FastTemplate, "training_epoch", spy_epoch)
    monkeypatch.setattr(FastTemplate, "_after_training_exp", spy_after)
    stream = _Stream("task", size=8, noise=True)
    patience = 2
    config = _config(
        tmp_path / "run",
        strategies=["naive"],
        train__epochs=10,
        train__lr=0.2,
        train__head_lr=0.2,
        train__early_stopping={"patience": patience},
    )
    results = _run(config, stream)
    model = models[0]
    model.eval()
    records = results.strategies["naive"].early_stopping
    assert len(epochs) == len(kept) == len(records) == 3
    logged = list(csv.DictReader((tmp_path / "run" / "logs" / "validation_epochs.csv").open()))
    for i, (states, final, record) in enumerate(zip(epochs, kept, records)):
        x, y = stream.train[i]
        # the validation rows: the experience's rows it never trained on
        held = torch.tensor([round(float(v) * 10_000) not in seen[i] for v in x[:, -1]])
        vx, vy = x[held], y[held]
        assert 1 <= len(vy) <= 3  # a tenth of each class's rows, rounded half up
        losses = []
        for s in states:
            with torch.no_grad():
                logits = torch.func.functional_call(model, s, (vx, torch.full_like(vy, i)))
            losses.append(F.cross_entropy(logits.double(), vy).item())
        best = min(range(len(losses)), key=lambda e: (losses[e], e))
        assert record.best_epoch == best and record.epochs_run == len(states)
        assert len(states) == min(10, best + patience + 1)
        assert record.stopped_early == (len(states) < 10)
        assert final.keys() == states[best].keys()
        assert all(torch.equal(final[k], states[best][k]) for k in final)
        rows = [r for r in logged if int(r["experience"]) == i]
        assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-9)
    assert any(r.stopped_early for r in records)
    assert any(r.best_epoch < r.epochs_run - 1 for r in records)  # a restore that mattered


def test_a_resumed_early_stopping_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    from moracl.continual.resume import ResumeConfigError

    changes = {
        "strategies": ["moracl", "ewc", "lwf", "joint"],
        "train__epochs": 3,
        "train__early_stopping": {"patience": 1},
    }
    stream = _Stream("task", size=8, noise=True)
    full = _run(_config(tmp_path / "full", **changes), stream)
    part = _config(tmp_path / "part", **changes)
    _run(part, stream, stop_after=0)
    for key, value in (("scenario__val_share", 0.2), ("train__early_stopping", None)):
        with pytest.raises(ResumeConfigError, match=key.replace("__", ".")):
            _run(_config(tmp_path / "part", **{**changes, key: value}), stream, resume=True)
    resumed = _run(part, stream, resume=True)
    for name, s in full.strategies.items():
        r = resumed.strategies[name]
        assert (r.matrix, r.validation, r.early_stopping) == (
            s.matrix,
            s.validation,
            s.early_stopping,
        )


# -- config and files -------------------------------------------------------------------------


def test_config_checks(tmp_path: Path) -> None:
    for share in (1.0, -0.1, "x"):
        with pytest.raises(ValueError, match="val_share"):
            _config(tmp_path, scenario__val_share=share)
    with pytest.raises(ValueError, match="scenario.val_share=0 holds none out"):
        _config(tmp_path, scenario__val_share=0.0, train__early_stopping={"patience": 1})
    with pytest.raises(ValueError, match="patience"):
        _config(tmp_path, train__early_stopping={"patience": 0})
    assert _config(tmp_path).scenario.val_share == 0.1
    assert _config(tmp_path).train.early_stopping is None


def test_results_of_version_2_load_without_validation(tmp_path: Path) -> None:
    from moracl.continual.metrics import AccuracyMatrix, Cost, StoppingRecord, StrategyResult

    m = AccuracyMatrix([[0.5, 0.2], [0.4, 0.9]], [0.1, 0.1])
    s = StrategyResult(
        "naive",
        m,
        Cost(1, 2, 1.0, 1.0, 1.0),
        validation=m.set_row(1, [0.5, 1.0]),
        early_stopping=[StoppingRecord(0, 1, 3, True, "val_loss", 0.25)],
    )
    results = RunResults("s", "task", 0, ["a", "b"], strategies={"naive": s})
    back = RunResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert back.to_dict() == results.to_dict() and back.to_dict()["version"] == 3
    old = results.to_dict()
    old["version"] = 2
    del old["test_evaluated"]
    for entry in old["strategies"]:
        del entry["validation"], entry["early_stopping"]
    loaded = RunResults.from_dict(old)
    assert loaded.test_evaluated and loaded.strategies["naive"].matrix == m
    assert loaded.strategies["naive"].validation is None
    assert loaded.strategies["naive"].early_stopping == []
    with pytest.raises(ValueError, match="test_evaluated is false"):
        RunResults.from_dict(results.to_dict() | {"test_evaluated": False})


def test_a_saved_config_without_val_share_resumes_without_a_split(tmp_path: Path) -> None:
    """A run saved before validation splits existed trained on every row."""
    from moracl.continual.checkpoint import Checkpoint
    from moracl.continual.resume import saved_config
    from moracl.parse_fields import to_dict

    data = to_dict(_config(tmp_path))
    del data["scenario"]["val_share"], data["train"]["early_stopping"]
    ckpt = Checkpoint(0, {}, {}, {"results": {"config": data}})
    config = saved_config(ckpt, tmp_path)
    assert config.scenario.val_share == 0.0 and config.train.early_stopping is None
