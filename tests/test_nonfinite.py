"""Training never continues through non-finite values, and the training loss is logged.

A diverging run (continual, finetune, meta) stops with ``NonFiniteError`` naming where, and
leaves nothing non-finite on disk; ``on_nonfinite=skip`` drops exactly the poisoned steps
(the weights equal a plain loop's that leaves those steps out) and counts them;
``logs/train.csv`` holds each epoch's mean loss and ``eval.csv`` each test experience's
cross-entropy, both checked against direct recomputations; a resumed run logs the rows an
uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.guard import NonFiniteError, StepGuard, loss_and_gradient_peak
from tests.offline_data import needs_fashion_mnist, needs_wordnet_minilm

NAN = float("nan")


# -- what is on disk -------------------------------------------------------------------------
def _strict_json(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def assert_nothing_nonfinite(folder: Path) -> int:
    """Every ``.safetensors`` under ``folder`` loads and is finite, every ``.json`` parses
    with a parser that refuses NaN and infinities, every CSV cell that is a number is
    finite; returns the number of files checked."""
    from safetensors.torch import load_file

    checked = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            for name, t in load_file(str(path)).items():
                if t.is_floating_point():
                    assert bool(torch.isfinite(t).all()), f"{path}: {name} is not finite"
        elif path.suffix == ".json":
            _strict_json(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    for cell in row:
                        try:
                            value = float(cell)
                        except ValueError:
                            continue
                        assert math.isfinite(value), f"{path}: {row}"
        else:
            continue
        checked += 1
    return checked


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- the guard itself ------------------------------------------------------------------------
def test_the_step_check_reads_loss_and_gradients_and_names_the_parameter() -> None:
    w = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(2))
    loss = (w * 2).sum()
    loss.backward()
    assert loss_and_gradient_peak(loss, [w, b]) == (6.0, 2.0)  # b has no gradient
    # finite gradients whose L2 norm overflows float32 are still finite
    w.grad = torch.full((3,), 1e30)
    assert loss_and_gradient_peak(loss, [w]) == (6.0, pytest.approx(1e30))
    guard = StepGuard("stop")
    assert guard.check(loss, [w], "here") == 6.0
    w.grad = torch.tensor([1.0, math.inf, 0.0])
    named = [("w", w), ("b", b)]
    with pytest.raises(
        NonFiniteError, match=r"^job, step 3: the loss is 6 but the gradient of 'w'"
    ):
        guard.check(loss, [w], lambda: "job, step 3", named=lambda: named)
    skip = StepGuard("skip")
    assert skip.check(loss * NAN, [w], "there") is None
    assert (skip.steps, skip.skipped) == (1, 1)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 4 steps .*there: the training loss"):
        skip.warn_skipped(0, 4, "epoch 0")
    with torch.no_grad():
        b[0] = NAN  # a parameter already broken: skipping cannot repair it, so it stops
    with pytest.raises(NonFiniteError, match="parameter 'b' already holds nan"):
        skip.check(loss, [w], "there", named=lambda: named)
    with pytest.raises(ValueError, match=r"on_nonfinite='maybe'; expected one of \['stop'"):
        StepGuard("maybe")


# -- the run logs ----------------------------------------------------------------------------
def test_logger_drops_the_rows_after_the_checkpoint_and_refuses_nonfinite(tmp_path: Path) -> None:
    from moracl.report.logs import RunLogger

    with RunLogger(tmp_path, tensorboard=False) as log:
        for exp in range(3):
            log.log_train(
                "A", experience=exp, epoch=0, step=exp + 1, loss=0.5, lr=1e-3, seconds=1.0
            )
            log.log_eval("A", after_experience=exp, eval_experience=0, accuracy=0.5, loss=0.25)
        with pytest.raises(NonFiniteError, match="loss=nan"):
            log.log_train("A", experience=3, epoch=0, step=4, loss=NAN, lr=1e-3, seconds=1.0)
        with pytest.raises(NonFiniteError, match="loss=inf"):
            log.log_eval("A", after_experience=3, eval_experience=0, accuracy=0.5, loss=math.inf)
        log.log_train("A", experience=3, epoch=0, step=4, loss=None, lr=1e-3, seconds=1.0)
    train = tmp_path / "logs" / "train.csv"
    with train.open("a") as fh:
        fh.write("A,3,1,5,0.")  # a row torn by a crash
    before = (tmp_path / "logs" / "eval.csv").read_text()
    RunLogger(tmp_path, tensorboard=False, resume_after=None).close()  # keeps every row
    assert (tmp_path / "logs" / "eval.csv").read_text() == before
    RunLogger(tmp_path, tensorboard=False, resume_after=1).close()
    assert [r["experience"] for r in _rows(train)] == ["0", "1"]
    assert [r["after_experience"] for r in _rows(tmp_path / "logs" / "eval.csv")] == ["0", "1"]
    assert train.read_text().endswith("\n")
    RunLogger(tmp_path, tensorboard=False, resume_after=-1).close()  # a new run: no rows
    assert train.read_text().splitlines() == ["strategy,experience,epoch,step,loss,lr,seconds"]
    train.write_text("strategy,experience,epoch,step,loss,lr,seconds\nA,x,0,1,0.5,0.1,1.0\n")
    with pytest.raises(ValueError, match=r"train.csv, line 2: .* an integer 'experience'"):
        RunLogger(tmp_path, tensorboard=False, resume_after=0)


def test_results_carry_the_step_counts_and_refuse_nonfinite_numbers(tmp_path: Path) -> None:
    from moracl.continual.metrics import AccuracyMatrix, Cost, RunResults, StrategyResult

    def result(**kwargs: Any) -> StrategyResult:
        return StrategyResult(
            "Naive", AccuracyMatrix([[0.5]], [0.1]), Cost(1, 2, 1.0, 3.0, 2.0), **kwargs
        )

    results = RunResults(
        "s", "task", 0, ["e0"], strategies={"Naive": result(steps=9, skipped_steps=2)}
    )
    results.save(tmp_path)
    data = _strict_json((tmp_path / "metrics.json").read_text())
    assert data["strategies"][0]["training"] == {"steps": 9, "skipped_steps": 2}
    assert RunResults.load(tmp_path).strategies["Naive"].skipped_steps == 2
    del data["strategies"][0]["training"]  # a file of an earlier version
    assert RunResults.from_dict(data).strategies["Naive"].steps == 0
    with pytest.raises(ValueError, match="skipped_steps=3 exceeds steps=2"):
        result(steps=2, skipped_steps=3)
    bad = RunResults("s", "task", 0, ["e0"], config={"train": {"lr": NAN}})
    with pytest.raises(NonFiniteError, match=r"config.train.lr=nan is not finite"):
        bad.save(tmp_path / "other")
    assert not (tmp_path / "other" / "metrics.json").exists()


# -- continual runs --------------------------------------------------------------------------
avalanche = pytest.importorskip("avalanche")

from avalanche.core import SupervisedPlugin  # noqa: E402

from moracl.config import from_dict  # noqa: E402
from moracl.continual.config import RunConfig  # noqa: E402

STREAM = {
    "name": "split-fashion",
    "setting": "task",
    "options": {"experiences": 2, "per_class": 20, "test_per_class": 10},
}


def run_config(out: Path, strategies: list[str], **train: object) -> RunConfig:
    data = {
        "job": "run",
        "scenario": STREAM,
        "strategies": strategies,
        "baselines": {"replay_size": 20},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-2, "head_lr": 2e-2, **train},
        "output_dir": str(out),
    }
    config: RunConfig = from_dict(RunConfig, data)
    return config


class Poison(SupervisedPlugin):
    """Makes chosen training steps non-finite: ``nan_loss`` steps multiply the loss by NaN,
    ``inf_grad`` steps put an infinity into the first trainable parameter's gradient (the
    loss stays finite). Steps count from 0 at each ``arm()``; disarmed it does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.nan_loss: set[int] = set()
        self.inf_grad: set[int] = set()
        self.step = -1

    def arm(self, nan_loss: set[int], inf_grad: set[int]) -> None:
        self.nan_loss, self.inf_grad, self.step = nan_loss, inf_grad, -1

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.step += 1
        if self.step in self.nan_loss:
            strategy.loss = strategy.loss * NAN

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.step in self.inf_grad:
            p = next(p for p in strategy.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = math.inf


class Capture(SupervisedPlugin):
    """Keeps the loss of every step the optimiser took, by (experience trained, epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[tuple[int, int], list[float]] = defaultdict(list)
        self.interrupt: tuple[int, int] | None = None  # (experience, epoch): raise there

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        key = (int(strategy.clock.train_exp_counter), int(strategy.clock.train_exp_epochs))
        if key == self.interrupt:
            raise KeyboardInterrupt("interrupted by the test")
        self.losses[key].append(float(strategy.loss.detach()))


def _build(config: RunConfig, name: str) -> tuple[Any, Any]:
    """The stream and strategy ``name`` of ``config``, as ``moracl run`` builds them."""
    import moracl_scenarios  # noqa: F401
    from moracl_scenarios.streams import build_stream, load_encoder

    from moracl.continual.factory import build_model
    from moracl.continual.strategies import build_strategy

    sc = config.scenario
    stream = build_stream(sc.name, setting=sc.setting, seed=config.train.seed, **sc.options)
    torch.manual_seed(0)
    model = build_model(name, config, load_encoder(stream.info), stream.info)
    return stream, build_strategy(name, config, model, torch.device("cpu"))


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _plain_loop(
    model: Any, tensors: tuple[Tensor, Tensor, Tensor], config: RunConfig, seed: int, skip: set[int]
) -> list[list[float]]:
    """The reference: the template's batches and optimiser, cross-entropy, ``backward``,
    ``step``, leaving out the steps in ``skip``; each epoch's losses of the steps taken."""
    from moracl.continual.factory import optimizer_factory
    from moracl.continual.strategy import TensorBatches

    model.train()
    optimizer = optimizer_factory(config)(model)
    batches = TensorBatches(tensors, config.train.batch_size, shuffle=True, seed=seed)
    losses: list[list[float]] = []
    step = 0
    for _ in range(config.train.epochs):
        taken = []
        for x, y, t in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x, t), y)
            loss.backward()
            if step not in skip:
                optimizer.step()
                taken.append(loss.item())
            step += 1
        losses.append(taken)
    return losses


@needs_fashion_mnist
@pytest.mark.slow
def test_a_diverging_run_stops_naming_where_and_leaves_nothing_nonfinite(tmp_path: Path) -> None:
    from moracl.jobs.continual import run as run_continual

    out = tmp_path / "run"
    config = run_config(out, ["moracl", "naive", "lwf"], lr=1e6, head_lr=1e6)
    with pytest.raises(NonFiniteError) as caught:
        run_continual(config, progress=False)
    message = str(caught.value)
    assert message.startswith("moracl run: strategy '"), message
    assert "experience " in message and ", epoch " in message and ", step " in message, message
    assert "nan" in message or "inf" in message, message
    assert assert_nothing_nonfinite(out) > 0  # the logs at least


@needs_fashion_mnist
@pytest.mark.slow
def test_skip_drops_exactly_the_bad_steps_counts_them_and_logs_the_mean_loss() -> None:
    from moracl.continual.strategy import derive_seed, materialize

    config = run_config(Path("unused"), ["naive"], on_nonfinite="skip")
    stream, strategy = _build(config, "naive")
    poison = Poison()
    strategy.plugins.append(poison)
    first = stream.benchmark.train_stream[0]
    strategy.train(first)  # adapts the model to the experience (untimed warm-up, as the bench)
    model = strategy.model
    start = _trainable(model)
    tensors = materialize(first.dataset)
    steps = -(-len(tensors[0]) // config.train.batch_size)  # per epoch
    bad_loss, bad_grad = {1}, {steps + 2}  # one in each epoch
    records: list[Any] = []
    strategy.epoch_listener = records.append
    poison.arm(bad_loss, bad_grad)
    seed = derive_seed(strategy.loader_seed, first.current_experience)
    torch.manual_seed(seed)
    skipped, counted = strategy.step_guard.skipped, strategy.step_guard.steps
    with pytest.warns(RuntimeWarning) as warned:
        strategy.train(first)
    ours = _trainable(model)
    _restore(model, start)
    torch.manual_seed(seed)
    reference = _plain_loop(model, tensors, config, seed, bad_loss | bad_grad)
    for name, value in _trainable(model).items():
        assert torch.equal(ours[name], value), name  # bit-identical
    assert strategy.step_guard.skipped - skipped == 2
    assert strategy.step_guard.steps - counted == 2 * steps
    skips = [str(w.message) for w in warned if "skipped" in str(w.message)]
    assert len(skips) == 2, skips  # once per epoch
    assert "skipped 1 of" in skips[0] and "the training loss is nan" in skips[0]
    assert "gradient of " in skips[1] and "holds inf" in skips[1]
    assert [r.epoch for r in records] == [0, 1]
    assert [r.skipped for r in records] == [1, 1]
    assert [r.step for r in records] == [counted + steps, counted + 2 * steps]
    assert [r.loss for r in records] == [math.fsum(e) / len(e) for e in reference]


@needs_fashion_mnist
@pytest.mark.slow
def test_lwf_with_temperature_zero_is_stopped_by_the_guard() -> None:
    from avalanche.training.plugins import LwFPlugin

    config = run_config(Path("unused"), ["lwf"])
    stream, strategy = _build(config, "lwf")
    # bypass the config's validation: the plugin built directly
    strategy.plugins = [
        LwFPlugin(alpha=1.0, temperature=0.0) if isinstance(p, LwFPlugin) else p
        for p in strategy.plugins
    ]
    train = list(stream.benchmark.train_stream)
    strategy.train(train[0])  # no distillation on the first experience
    before = _trainable(strategy.model)
    with pytest.raises(NonFiniteError, match=r"strategy 'LwF', experience 1, epoch 0, step 0 "):
        strategy.train(train[1])
    after = _trainable(strategy.model)
    # the one step tried was not taken: the weights of experience 0 are intact
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """An uninterrupted run whose strategies carry a :class:`Capture` plugin."""
    from moracl.continual import run as run_module
    from moracl.jobs.continual import run as run_job

    out = tmp_path_factory.mktemp("logged") / "run"
    made: dict[str, Any] = {}
    original = run_module.build_strategy

    def build(name: str, *args: Any, **kwargs: Any) -> Any:
        strategy = original(name, *args, **kwargs)
        strategy.plugins.append(Capture())
        made[name] = strategy
        return strategy

    run_module.build_strategy = build  # type: ignore[assignment]
    try:
        run_job(run_config(out, ["moracl", "naive", "joint"]), progress=False)
    finally:
        run_module.build_strategy = original  # type: ignore[assignment]
    yield out, made


@needs_fashion_mnist
@pytest.mark.slow
def test_train_csv_holds_each_epochs_mean_loss_and_step(logged_run: Any) -> None:
    from moracl.continual.strategies import STRATEGY_REGISTRY

    out, made = logged_run
    rows = _rows(out / "logs" / "train.csv")
    last = 1  # two experiences; Joint trains once, at the last
    expected = [
        (STRATEGY_REGISTRY.get(n).label, i, e)
        for i in range(2)
        for n in ("moracl", "naive", "joint")
        if n != "joint" or i == last
        for e in range(2)
    ]
    assert [(r["strategy"], int(r["experience"]), int(r["epoch"])) for r in rows] == expected
    for name, strategy in made.items():
        capture = next(p for p in strategy.plugins if isinstance(p, Capture))
        mine = [r for r in rows if r["strategy"] == STRATEGY_REGISTRY.get(name).label]
        step = 0
        for r in mine:
            trained = 0 if name == "joint" else int(r["experience"])
            losses = capture.losses[(trained, int(r["epoch"]))]
            step += len(losses)
            assert float(r["loss"]) == math.fsum(losses) / len(losses), r  # exact
            assert int(r["step"]) == step and float(r["lr"]) == 2e-2, r
        assert float(mine[-1]["seconds"]) > 0
        metrics = _strict_json((out / "metrics.json").read_text())
        (result,) = [s for s in metrics["strategies"] if s["name"] == name]
        assert result["label"] == STRATEGY_REGISTRY.get(name).label
        assert result["training"] == {"steps": step, "skipped_steps": 0}


@needs_fashion_mnist
@pytest.mark.slow
def test_eval_csv_loss_is_the_cross_entropy_on_each_test_experience(logged_run: Any) -> None:
    import moracl_scenarios  # noqa: F401
    from moracl_scenarios.streams import build_stream

    from moracl.continual.strategies import STRATEGY_REGISTRY
    from moracl.continual.strategy import materialize

    out, made = logged_run
    rows = _rows(out / "logs" / "eval.csv")
    assert rows and all(r["loss"] for r in rows)
    stream = build_stream(STREAM["name"], setting=STREAM["setting"], seed=0, **STREAM["options"])
    tests = [materialize(e.dataset) for e in stream.benchmark.test_stream]
    for name, strategy in made.items():  # after the last experience: the models as they are
        model = strategy.model.eval()
        for j, (x, y, t) in enumerate(tests):
            with torch.no_grad():
                direct = F.cross_entropy(model(x, t).double(), y).item()
            (row,) = [
                r
                for r in rows
                if r["strategy"] == STRATEGY_REGISTRY.get(name).label
                and (r["after_experience"], r["eval_experience"]) == ("1", str(j))
            ]
            assert float(row["loss"]) == pytest.approx(direct, rel=1e-6), (name, j)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(
    logged_run: Any, tmp_path: Path
) -> None:
    from moracl.continual import run as run_module
    from moracl.jobs.continual import run as run_job

    full, _ = logged_run
    out = tmp_path / "run"
    original = run_module.build_strategy

    def build(name: str, *args: Any, **kwargs: Any) -> Any:
        strategy = original(name, *args, **kwargs)
        capture = Capture()
        if name == "naive":  # after moracl logged its experience-1 epochs, Naive's epoch 1
            capture.interrupt = (1, 1)
        strategy.plugins.append(capture)
        return strategy

    run_module.build_strategy = build  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(run_config(out, ["moracl", "naive", "joint"]), progress=False)
    finally:
        run_module.build_strategy = original  # type: ignore[assignment]
    interrupted = _rows(out / "logs" / "train.csv")
    assert [r["experience"] for r in interrupted].count("1") == 3  # moracl's two, Naive's one
    run_job(run_config(out, ["moracl", "naive", "joint"]), resume=True, progress=False)

    def without_seconds(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(path)]

    for log in ("train.csv", "eval.csv"):
        assert without_seconds(out / "logs" / log) == without_seconds(full / "logs" / log), log


# -- finetune --------------------------------------------------------------------------------
class _Tiny(nn.Module):
    """A classifier called with keyword inputs, as ``moracl finetune`` calls its model (two
    linear layers: outputs grow with both, so a huge learning rate overflows them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.fc(x))
        return out


def _finetune_config(*overrides: str) -> Any:
    from moracl.config import load_config

    return load_config(
        Path(__file__).resolve().parents[1] / "configs" / "wordnet_finetune.yaml",
        ["train.batch_size=8", "train.epochs=2", *overrides],
    )


def _tiny_adapted() -> tuple[Any, Tensor, Tensor]:
    from moracl.adapters import AdapterConfig
    from moracl.model import MoRAModel

    torch.manual_seed(0)
    model = MoRAModel(
        _Tiny(), AdapterConfig(kind="lora", rank=2), target_modules=["fc"], modules_to_save=["head"]
    )
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)


@needs_wordnet_minilm
def test_finetune_training_stops_at_a_non_finite_loss() -> None:
    from moracl.jobs.finetune import train_model

    model, x, y = _tiny_adapted()
    config = _finetune_config("train.lr=1e30", "train.head_lr=1e30")
    with pytest.raises(
        NonFiniteError, match=r"^moracl finetune: adapters \+ head, epoch \d+, step \d+: "
    ):
        train_model(model, lambda idx: {"x": x[idx]}, y, config.train, name="adapters + head")


@needs_wordnet_minilm
def test_finetune_skip_leaves_the_weights_of_a_loop_without_that_step() -> None:
    from moracl.jobs.finetune import train_model

    config = _finetune_config("train.on_nonfinite=skip")
    model, x, y = _tiny_adapted()
    calls = {"n": 0}

    def batch(idx: Tensor) -> dict[str, Tensor]:  # the third batch's inputs are NaN
        calls["n"] += 1
        xb = x[idx].clone()
        if calls["n"] == 3:
            xb[0, 0] = NAN
        return {"x": xb}

    with pytest.warns(RuntimeWarning, match="skipped 1 of 4 steps"):
        log = train_model(model, batch, y, config.train, name="adapters + head")
    assert (log.steps, log.skipped) == (8, 1)
    assert [e.skipped for e in log.epochs] == [1, 0]
    ours = _trainable(model)
    # the reference: the same loop in plain PyTorch, without the third step
    from moracl.adapters.base import ParamRole, iter_param_roles

    ref, _, _ = _tiny_adapted()
    tc = config.train
    heads = [p for _, p, role in iter_param_roles(ref) if role is ParamRole.HEAD]
    rest = [p for p in ref.parameters() if p.requires_grad and all(p is not h for h in heads)]
    assert heads and rest
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": tc.lr}, {"params": heads, "lr": tc.head_lr}],
        weight_decay=tc.weight_decay,
    )
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    for _ in range(tc.epochs):
        order = torch.randperm(30, generator=gen)
        for i in range(0, 30, tc.batch_size):
            idx = order[i : i + tc.batch_size]
            ref.train()
            loss = F.cross_entropy(ref(x=x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step != 2:
                opt.step()
            step += 1
    for name, value in _trainable(ref).items():
        assert torch.equal(ours[name], value), name


@needs_wordnet_minilm
def test_finetune_logs_each_loops_epochs(tmp_path: Path) -> None:
    from moracl.jobs.finetune import train_model, write_logs

    model, x, y = _tiny_adapted()
    config = _finetune_config()
    log = train_model(model, lambda idx: {"x": x[idx]}, y, config.train, name="adapters + head")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.csv").write_text(
        "strategy,experience,epoch,step,loss,lr,seconds\nold,0,0,1,1.0,0.1,1.0\n"
    )  # an earlier run's rows in the same folder: replaced
    write_logs(tmp_path, {"adapters + head": log})
    rows = _rows(tmp_path / "logs" / "train.csv")
    assert [(r["strategy"], r["epoch"], r["step"]) for r in rows] == [
        ("adapters + head", "0", "4"),
        ("adapters + head", "1", "8"),
    ]
    assert [float(r["loss"]) for r in rows] == [e.loss for e in log.epochs]
    assert float(rows[0]["lr"]) == config.train.lr


@needs_wordnet_minilm
@pytest.mark.slow
def test_a_diverging_finetune_stops_and_writes_nothing(tmp_path: Path) -> None:
    from moracl.jobs.finetune import run as finetune

    out = tmp_path / "ft"
    config = _finetune_config(
        "data.categories=[noun.act,noun.state]",
        "data.per_class=8",
        "data.test_per_class=4",
        "adapter.rank=2",
        "train.lr=1e30",
        "train.head_lr=1e30",
        f"output_dir={out}",
    )
    with pytest.raises(NonFiniteError, match=r"moracl finetune: adapters \+ head, epoch 0, step"):
        finetune(config, progress=False)
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    if out.exists():
        assert_nothing_nonfinite(out)


# -- meta ------------------------------------------------------------------------------------
class _LinearBody(nn.Module):
    """The toy scenario's frozen layer without its tanh: outputs grow with the adapters."""

    default_targets = ("fc",)

    def __init__(self) -> None:
        super().__init__()
        from tests.test_meta_job import ToyBody

        self.feature_dim = 12
        self.fc = ToyBody().fc

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(x)
        return out


@pytest.fixture
def toy_linear() -> Iterator[Callable[[], Any]]:
    from moracl_scenarios.fewshot import FEWSHOT

    from tests.test_meta_job import toy_fewshot

    def make() -> Any:
        return dataclasses.replace(toy_fewshot(), make_body=_LinearBody)

    warnings.filterwarnings("ignore", "test.episodes=24 is below")
    with FEWSHOT.temporarily("toy", make):
        yield make


@pytest.mark.parametrize("val_every", [0, 2])
def test_a_diverging_meta_run_stops_and_writes_nothing(
    toy_linear: Any, tmp_path: Path, val_every: int
) -> None:
    from moracl.jobs.meta import run as meta_learn
    from tests.test_meta_job import tiny_config

    out = tmp_path / "meta"
    config = tiny_config(out, inner_lr=1e38, val_every=val_every)
    where = (
        "meta-training step 1: the training loss is nan"
        if not val_every
        else ("validation at step 0: episode 0 .* was scored from non-finite outputs")
    )
    with pytest.raises(NonFiniteError, match=f"^moracl meta: {where}"):
        meta_learn(config, progress=False)
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    if out.exists():
        assert_nothing_nonfinite(out)


def test_meta_test_refuses_to_score_diverged_adaptation(toy_linear: Any, tmp_path: Path) -> None:
    """Skipping every meta-training step keeps the start, but the test-time inner loop still
    diverges: its score is refused, not reported at chance level."""
    from moracl.jobs.meta import run as meta_learn
    from tests.test_meta_job import tiny_config

    out = tmp_path / "meta"
    config = tiny_config(out, inner_lr=1e38, val_every=0, on_nonfinite="skip")
    with (
        pytest.warns(RuntimeWarning, match="skipped 4 of 4 steps"),
        pytest.raises(NonFiniteError, match="^moracl meta: meta-test of 'meta': episode 0"),
    ):
        meta_learn(config, progress=False)
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_meta_skip_leaves_the_weights_of_the_step_before(
    toy_linear: Callable[[], Any], sam_rho: float
) -> None:
    """A skipped step (in SAM's first or second pass) changes no parameter."""
    from moracl.meta.learn import EpisodeShape, build_meta_model, meta_algorithm, meta_train
    from tests.test_meta_job import tiny_config

    config = tiny_config(Path("unused"), val_every=0, steps=4, on_nonfinite="skip")
    config.optim = dataclasses.replace(config.optim, sam_rho=sam_rho)
    data = toy_linear()
    model = build_meta_model(data, ways=config.data.ways, adapter=config.adapter, seed=config.seed)
    maml = meta_algorithm(model, config.meta.algorithm, config.meta.inner_lr)
    passes = 2 if sam_rho else 1
    poisoned = passes * 2  # the last pass of step 2 (SAM: the second one, at w + e)
    starts: list[dict[str, Tensor]] = []
    meta_loss = maml.meta_loss
    calls = {"n": 0}

    def poisoning(*args: Any, **kwargs: Any) -> Tensor:
        calls["n"] += 1
        if calls["n"] % passes == 1 or passes == 1:  # a step's first pass: the weights w
            starts.append(_trainable(maml))
        loss = meta_loss(*args, **kwargs)
        return loss * NAN if calls["n"] == poisoned else loss

    maml.meta_loss = poisoning  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4 steps"):
        _, _, training = meta_train(
            maml,
            data,
            shape=EpisodeShape(3, 2, 3),
            meta=config.meta,
            optim=config.optim,
            seed=config.seed,
            val_batch=config.test.batch,
            progress=False,
        )
    assert training["skipped_steps"] == 1 and training["steps"] == 4
    assert len(starts) == 4
    for name, value in starts[1].items():  # step 2 skipped: step 3 starts where step 2 did
        assert torch.equal(starts[2][name], value), name
    assert any(not torch.equal(starts[3][n], v) for n, v in starts[2].items())  # step 3 ran
    # one entry per step here (a tenth of 4 steps): the skipped one has no loss
    assert [row["loss"] is None for row in training["loss"]] == [False, True, False, False]
