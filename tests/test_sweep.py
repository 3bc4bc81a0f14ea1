"""``moracl sweep``: every combination run, ranked on validation (the test split read once, by
the final run), resumed after an interruption, failures recorded, random search seeded, bad
input refused; a toy job registered for the while, and one real tiny continual sweep."""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from moracl.config import JOBS, from_dict, load_config, to_dict
from moracl.jobs.sweep import SweepResult, plan_sweep, run_sweep, sweep
from moracl.jobs.sweep_kinds import (
    SWEEP_JOBS,
    ResultTable,
    Selection,
    SelectionRequest,
    SweepJob,
    TrialOptions,
)
from moracl.jobs.sweep_space import SearchSpace
from moracl.jobs.sweep_state import SweepState, TrialStatus

# -- a toy job: its validation and test scores are known functions of two keys ---------------

LRS = (0.001, 0.01, 0.1)
KINDS = ("a", "b", "c")
VAL_LR = {0.001: 0.6, 0.01: 0.8, 0.1: 0.7}
VAL_KIND = {"a": 0.0, "b": 0.05, "c": 0.05}  # b and c tie


def toy_validation(lr: float, kind: str) -> float:
    return VAL_LR[lr] + VAL_KIND[kind]


def toy_test(lr: float, kind: str) -> float:
    """Ranks the other way round: a sweep choosing on test would pick (0.001, a)."""
    return 1.0 - toy_validation(lr, kind)


@dataclass
class ToyTrain:
    lr: float = 0.01
    epochs: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"train.epochs must be an integer >= 1, got {self.epochs!r}")


@dataclass
class ToyConfig:
    job: str = "toy"
    kind: str = "a"
    train: ToyTrain = field(default_factory=ToyTrain)
    log: str = ""  # every call appends a line here
    fail_lr: float | None = None  # trials with this lr raise
    drift: float = 0.0  # added to the validation score of a run that reads the test split
    interrupt_file: str = ""  # when this file exists, the trial at lr=0.01, kind=a removes
    # it and raises KeyboardInterrupt (a Ctrl-C midway)
    output_dir: str = "out/toy"


@dataclass
class ToyResult:
    validation: float
    test: float | None


def toy_check(config: Any) -> None:
    from_dict(ToyConfig, to_dict(config))


def toy_select(config: Any, request: SelectionRequest) -> Selection:
    if request.metric not in (None, "val"):
        raise ValueError(f"--metric {request.metric!r}; expected 'val'")
    return Selection(metric="val", label="validation accuracy (toy)")


def toy_run(config: ToyConfig, options: TrialOptions) -> ToyResult:
    out = Path(config.output_dir)
    assert (out / "config.yaml").is_file()  # the sweep saved the trial's config first
    with open(config.log, "a") as fh:
        fh.write(
            json.dumps(
                {
                    "folder": out.name,
                    "lr": config.train.lr,
                    "kind": config.kind,
                    "evaluate_test": options.evaluate_test,
                    "resume": options.resume,
                }
            )
            + "\n"
        )
    marker = Path(config.interrupt_file) if config.interrupt_file else None
    if marker is not None and marker.exists() and (config.train.lr, config.kind) == (0.01, "a"):
        marker.unlink()
        raise KeyboardInterrupt
    if config.fail_lr is not None and config.train.lr == config.fail_lr:
        raise RuntimeError(f"diverged at lr={config.train.lr}")
    test = toy_test(config.train.lr, config.kind) if options.evaluate_test else None
    drift = config.drift if options.evaluate_test else 0.0
    return ToyResult(toy_validation(config.train.lr, config.kind) + drift, test)


def toy_score(result: ToyResult, selection: Selection) -> float:
    return result.validation


def toy_summary(result: ToyResult, selection: Selection) -> ResultTable:
    return ResultTable(
        columns=(("model", "text"), ("test accuracy", "accuracy"), ("validation", "accuracy")),
        rows=(("toy", result.test, result.validation),),
    )


TOY = SweepJob(
    command="moracl toy",
    check=toy_check,
    select=toy_select,
    run=toy_run,
    score=toy_score,
    summarize=toy_summary,
)


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Path]:
    """The toy job registered; yields its config file (logging to ``tmp_path/calls.log``)."""
    config = tmp_path / "toy.yaml"
    config.write_text(f"job: toy\nlog: {tmp_path / 'calls.log'}\noutput_dir: {tmp_path / 'o'}\n")
    with JOBS.temporarily("toy", ToyConfig), SWEEP_JOBS.temporarily("toy", TOY):
        yield config


def calls(config: Path) -> list[dict[str, Any]]:
    log = config.parent / "calls.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


GRID = ["train.lr=0.001,0.01,0.1", "kind=a,b"]


def test_grid_runs_every_combination_and_chooses_on_validation(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = sweep(toy, GRID, output_dir=out)
    state = SweepState.load(out)
    expected = [{"train.lr": lr, "kind": k} for lr, k in itertools.product(LRS, "ab")]
    assert [t.overrides for t in state.trials] == expected  # the first key varies slowest
    assert all(t.status is TrialStatus.DONE for t in state.trials)
    for t in state.trials:
        assert t.score == toy_validation(t.overrides["train.lr"], t.overrides["kind"])
        saved = yaml.safe_load((out / t.folder / "config.yaml").read_text())
        assert (saved["train"]["lr"], saved["kind"]) == (
            t.overrides["train.lr"],
            t.overrides["kind"],
        )
    # the hand computation: the best validation score over the grid, ties to the earlier
    best = max(
        expected, key=lambda o: (toy_validation(o["train.lr"], o["kind"]), -expected.index(o))
    )
    assert result.chosen.overrides == best == {"train.lr": 0.01, "kind": "b"}
    # on test the sweep would have chosen (0.001, a): it must not have looked
    assert max(expected, key=lambda o: toy_test(o["train.lr"], o["kind"])) != best
    log = calls(toy)
    assert [c["evaluate_test"] for c in log] == [False] * 6 + [True]  # the test split: once
    assert log[-1] == {
        "folder": "final",
        "lr": 0.01,
        "kind": "b",
        "evaluate_test": True,
        "resume": False,
    }
    final = state.final
    assert final is not None and final.status is TrialStatus.DONE
    assert final.validation_score == final.trial_score == toy_validation(0.01, "b")
    assert final.matches is True
    assert final.table is not None and final.table["rows"] == [
        ["toy", pytest.approx(toy_test(0.01, "b")), pytest.approx(toy_validation(0.01, "b"))]
    ]
    # chosen.yaml is the chosen config, writing where the base config writes
    chosen = load_config(out / "chosen.yaml")
    assert (chosen.train.lr, chosen.kind, chosen.output_dir) == (0.01, "b", str(tmp_path / "o"))
    # the report: trials best first, the chosen overrides, the final run's test number
    report = (out / "sweep.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "| 00" in line]
    ranked = sorted(expected, key=lambda o: -toy_validation(o["train.lr"], o["kind"]))
    assert [r.split("|")[2].strip() for r in rows] == [f"{expected.index(o):03d}" for o in ranked]
    assert "`train.lr=0.01 kind=b`" in report and "15.00 %" in report
    assert f"moracl toy {out / 'chosen.yaml'}" in report
    assert (out / "sweep.png").stat().st_size > 0


def test_ties_go_to_the_earlier_trial(toy: Path, tmp_path: Path) -> None:
    first = sweep(toy, ["train.lr=0.01", "kind=c,b"], output_dir=tmp_path / "cb")
    second = sweep(toy, ["train.lr=0.01", "kind=b,c"], output_dir=tmp_path / "bc")
    assert first.chosen.overrides["kind"] == "c" and second.chosen.overrides["kind"] == "b"


def test_an_interrupted_sweep_resumes_with_the_missing_trials_only(
    toy: Path, tmp_path: Path
) -> None:
    from moracl.cli import main

    marker = tmp_path / "interrupt"
    marker.touch()
    out = tmp_path / "sweep"
    args = ["sweep", str(toy), "--grid", *GRID, "--output-dir", str(out), "--quiet"]
    args += ["--set", f"interrupt_file={marker}"]
    assert main(args) == 130  # Ctrl-C during the third trial (lr=0.01, kind=a)
    state = SweepState.load(out)
    assert [t.status for t in state.trials] == [TrialStatus.DONE] * 2 + [TrialStatus.RUNNING] + [
        TrialStatus.PENDING
    ] * 3
    assert state.final is None and not (out / "final").exists()
    before = len(calls(toy))
    assert before == 3
    assert main(args) == 0  # the same command again resumes
    again = calls(toy)[before:]
    assert [(c["folder"], c["evaluate_test"]) for c in again] == [
        ("002", False),
        ("003", False),
        ("004", False),
        ("005", False),
        ("final", True),
    ]
    state = SweepState.load(out)
    assert all(t.status is TrialStatus.DONE for t in state.trials)
    assert state.final is not None and state.final.trial == 3
    # a finished sweep run again runs nothing
    assert main([*args, "--resume"]) == 0
    assert len(calls(toy)) == before + 5


@pytest.mark.slow  # two spawned workers import torch and avalanche (about 7 s each on 2 cores)
def test_jobs_in_worker_processes_give_the_same_sweep(toy: Path, tmp_path: Path) -> None:
    one = sweep(toy, GRID, output_dir=tmp_path / "one")
    two = sweep(toy, GRID, output_dir=tmp_path / "two", jobs=2)
    pick = ("number", "overrides", "status", "score", "error")
    rows = [[{k: t.to_dict()[k] for k in pick} for t in r.state.trials] for r in (one, two)]
    assert rows[0] == rows[1]
    assert one.chosen.number == two.chosen.number
    assert sorted(c["folder"] for c in calls(toy) if c["folder"] != "final") == sorted(
        [f"{i:03d}" for i in range(6)] * 2
    )


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = sweep(toy, GRID, output_dir=out, sets=["fail_lr=0.01"])
    state = result.state
    failed = [t for t in state.trials if t.status is TrialStatus.FAILED]
    assert [t.overrides["train.lr"] for t in failed] == [0.01, 0.01]
    assert all(t.error == "RuntimeError: diverged at lr=0.01" for t in failed)
    assert result.chosen.overrides == {"train.lr": 0.1, "kind": "b"}  # the best that ran
    assert "failed: RuntimeError: diverged at lr=0.01" in (out / "sweep.md").read_text()
    n = len(calls(toy))
    sweep(toy, GRID, output_dir=out, sets=["fail_lr=0.01"])  # failures are kept ...
    assert len(calls(toy)) == n
    sweep(toy, GRID, output_dir=out, sets=["fail_lr=0.01"], retry_failed=True)  # ... or retried
    assert [c["folder"] for c in calls(toy)[n:]] == ["002", "003"]


def test_a_sweep_whose_every_trial_fails_fails_with_no_final_run(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"every trial of the sweep failed.*trial 000: Runtime"):
        sweep(toy, ["train.lr=0.01", "kind=a,b"], output_dir=out, sets=["fail_lr=0.01"])
    assert not (out / "final").exists() and not (out / "chosen.yaml").exists()
    assert not any(c["evaluate_test"] for c in calls(toy))
    assert "No trial finished" in (out / "sweep.md").read_text()


def test_a_final_run_whose_validation_differs_from_its_trial_is_warned_about(
    toy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    with pytest.warns(UserWarning, match=r"the final run's validation accuracy \(toy\) is 86.00 %"):
        result = sweep(toy, ["train.lr=0.01", "kind=a,b"], output_dir=out, sets=["drift=0.01"])
    final = result.state.final
    assert final is not None and final.matches is False
    assert final.trial_score == toy_validation(0.01, "b")
    assert final.validation_score == toy_validation(0.01, "b") + 0.01
    assert result.warnings and "not deterministic" in result.warnings[0]
    assert "**Warning**" in (out / "sweep.md").read_text()


def test_random_search_draws_distinct_seeded_combinations(toy: Path, tmp_path: Path) -> None:
    grid = ["train.lr=0.001,0.01,0.1", "kind=a,b,c"]

    def drawn(trials: int, seed: int) -> list[tuple[float, str]]:
        plan = plan_sweep(toy, grid, trials=trials, seed=seed, output_dir=tmp_path / "s")
        return [(c["train.lr"], c["kind"]) for c in plan.combinations]

    first = drawn(4, seed=0)
    assert len(set(first)) == 4 and set(first) <= set(itertools.product(LRS, KINDS))
    assert drawn(4, seed=0) == first
    assert drawn(4, seed=1) != first
    assert drawn(6, seed=0)[:4] == first  # more trials extend the same draw
    assert sorted(drawn(9, seed=3)) == sorted(itertools.product(LRS, KINDS))


@pytest.mark.parametrize(
    ("grid", "options", "message"),
    [
        (["train.lrr=1,2"], {}, r"'train.lrr' is not in the config: train has no 'lrr'"),
        (["speed=1,2"], {}, r"'speed' is not in the config: the config has no 'speed'"),
        (["train.lr="], {}, r"--grid item 'train.lr=' has no values"),
        (["train.lr"], {}, r"--grid item 'train.lr' is not of the form key=v1,v2"),
        (["=1,2"], {}, r"--grid item '=1,2': '' is not a dotted config key"),
        (["train.lr=0.1,,0.2"], {}, r"--grid item 'train.lr=0.1,,0.2' has an empty value"),
        (["train.lr=[0.1,0.2"], {}, r"--grid item 'train.lr=\[0.1,0.2': .* unclosed"),
        (["train.lr=0.1,0.1"], {}, r"--grid key 'train.lr' lists the value 0.1 twice"),
        (["train.lr=0.1", "train.lr=0.2"], {}, r"--grid key 'train.lr' is given twice"),
        (["output_dir=a,b"], {}, r"'output_dir' cannot be swept"),
        (GRID, {"trials": 7}, r"--trials 7 is larger than the grid, which has 6 combinations"),
        (GRID, {"trials": 0}, r"--trials must be a positive integer, got 0"),
        (GRID, {"sets": ["kind=a"]}, r"--grid key 'kind' is also fixed by --set"),
        (["train.lr=0.1,-1"], {}, r"trial 001 \(train.lr=-1\)"),
        (["train.epochs=1,x"], {}, r"trial 001 \(train.epochs=x\): train.*epochs"),
        (GRID, {"metric": "test"}, r"--metric 'test'"),
    ],
)
def test_bad_input_is_refused_naming_the_value(
    toy: Path, tmp_path: Path, grid: list[str], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_sweep(toy, grid, output_dir=tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()


def test_the_cli_reports_bad_input_in_one_line(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moracl.cli import main

    code = main(["sweep", str(toy), "--grid", "train.lr=1,2", "--trials", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("moracl: error: --trials 3 is larger than the grid") and err.count("\n") == 1
    )
    assert main(["sweep", str(toy), "--grid", "train.lr=1,2", "--seed", "4"]) == 2
    assert "--seed 4 applies to a random search" in capsys.readouterr().err


def test_a_different_sweep_on_an_existing_folder_is_refused(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep(toy, ["train.lr=0.001,0.01", "kind=a"], output_dir=out)
    with pytest.raises(ValueError, match=r"grid train.lr: \[0.001, 0.1\] here, \[0.001, 0.01\]"):
        sweep(toy, ["train.lr=0.001,0.1", "kind=a"], output_dir=out)
    with pytest.raises(ValueError, match=r"config key train.epochs: 2 here, 1 there"):
        sweep(toy, ["train.lr=0.001,0.01", "kind=a"], output_dir=out, sets=["train.epochs=2"])
    with pytest.raises(ValueError, match=r"already holds files but no sweep.json"):
        sweep(toy, GRID, output_dir=out / "trials")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_sweep(plan_sweep(toy, GRID, output_dir=tmp_path / "new"), resume=True)


def test_the_sweep_folder_is_locked_while_the_sweep_runs(toy: Path, tmp_path: Path) -> None:
    from moracl.runlock import RunFolderBusyError, lock_run_folder

    out = tmp_path / "sweep"
    with lock_run_folder(out, "another job"), pytest.raises(RunFolderBusyError, match="another"):
        sweep(toy, GRID, output_dir=out)
    assert calls(toy) == []


def test_search_space_values_are_yaml() -> None:
    space = SearchSpace.parse(["a.b=1e-3,3e-3", "c=[x,y],[z]", "d='1,2',true,null"])
    assert space.grid == {
        "a.b": (0.001, 0.003),
        "c": (["x", "y"], ["z"]),
        "d": ("1,2", True, None),
    }
    assert space.size == 12 and len(space.combinations()) == 12


# -- real continual runs: a 2x1 grid on a tiny synthetic stream ----------------------------


class Tiny(nn.Module):
    """A frozen random layer: the stream's encoder."""

    default_targets = ("fc",)
    feature_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x) / 4)


def tiny_stream(*, setting: Any = None, seed: int = 0, **options: Any) -> Any:
    """Three task-labelled experiences of two Gaussian classes each (20 training rows a
    class, 10 test rows)."""
    from moracl_scenarios.streams import Setting, Stream, StreamInfo, tensor_benchmark

    g = torch.Generator().manual_seed(seed)
    classes = ((0, 1), (2, 3), (4, 5))

    def part(cs: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor([c for c in cs for _ in range(n)])
        return torch.randn(len(y), 16, generator=g) + 2 * F.one_hot(y, 16).float(), y

    train = [part(cs, 20) for cs in classes]
    test = [part(cs, 10) for cs in classes]
    info = StreamInfo(
        name="sweep-stream",
        setting=Setting.TASK,
        modality="image",
        backbone="sweep-tiny",
        class_names=tuple("abcdef"),
        experience_classes=classes,
        experience_names=("one", "two", "three"),
        source="synthetic",
        licence="none",
    )
    return Stream(tensor_benchmark(train, test, task_labels=[0, 1, 2]), info)


RUN_YAML = """\
job: run
scenario: {name: sweep-stream, setting: task, val_share: 0.2}
adapter: {kind: lora, rank: 2, alpha: 4.0}
strategies: [moracl, naive]
train: {epochs: 1, batch_size: 8, eval_batch_size: 32, lr: 0.01, head_lr: 0.01}
output_dir: OUT
"""
RUN_GRID = ["train.lr=0.001,0.05", "adapter.rank=2"]


def _has_evaluate_test() -> bool:
    from moracl.jobs.continual import run

    return "evaluate_test" in inspect.signature(run).parameters


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny stream and its encoder registered; yields a run config on it."""
    pytest.importorskip("avalanche")
    if not _has_evaluate_test():
        pytest.skip("the continual job has no evaluate_test")
    from moracl_scenarios.streams import ENCODERS, SCENARIOS, SPECS, ScenarioSpec, Setting

    config = tmp_path_factory.mktemp("run") / "run.yaml"
    config.write_text(RUN_YAML.replace("OUT", str(config.parent / "run")))
    with (
        pytest.MonkeyPatch.context() as patch,
        SCENARIOS.temporarily("sweep-stream", tiny_stream),
        ENCODERS.temporarily("sweep-tiny", lambda info: Tiny()),
    ):
        patch.setitem(SPECS, "sweep-stream", ScenarioSpec((Setting.TASK,), (), None))
        yield config


@pytest.fixture(scope="module")
def run_sweep_done(run_config: Path) -> tuple[Path, SweepResult]:
    """An uninterrupted sweep ranking Naive on experiences 0-1."""
    out = run_config.parent / "sweep"
    options: dict[str, Any] = {"strategy": "naive", "select_experiences": 2}
    return out, sweep(run_config, RUN_GRID, output_dir=out, **options)


def test_a_continual_sweep_chooses_on_validation_and_tests_once(
    run_sweep_done: tuple[Path, SweepResult],
) -> None:
    from moracl.continual.metrics import RunResults

    out, result = run_sweep_done
    state = result.state
    assert [t.status for t in state.trials] == [TrialStatus.DONE] * 2
    for t in state.trials:
        trial = RunResults.load(out / t.folder)
        assert trial.test_evaluated is False
        naive = trial.strategies["naive"]
        assert naive.matrix is None  # no trial evaluated the test split
        assert naive.validation is not None
        assert naive.validation.last_completed == 1  # experiences 0 and 1 only
        assert t.score == naive.validation.upto(1).acc()
    scores = [t.score for t in state.trials]
    assert scores[0] != scores[1]
    assert result.chosen.number == (0 if scores[0] > scores[1] else 1)
    final = RunResults.load(out / "final")
    test = final.strategies["naive"].matrix
    assert test is not None and test.is_complete  # the whole stream, test split read
    assert state.final is not None and state.final.matches is True
    assert state.final.validation_score == result.chosen.score
    assert state.final.table is not None
    rows = {row[0]: row[1:] for row in state.final.table["rows"]}
    assert rows["Naive"][0] == pytest.approx(test.acc())
    assert rows["Naive"][1] == pytest.approx(test.bwt())
    report = (out / "sweep.md").read_text()
    assert "| Naive |" in report and "test ACC" in report


def test_an_interrupted_continual_trial_resumes_from_its_checkpoint(
    run_config: Path, run_sweep_done: tuple[Path, SweepResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moracl.jobs.continual as continual_job

    real = continual_job.run
    seen: list[tuple[str, bool]] = []

    def interrupted(config: Any, **options: Any) -> Any:
        folder = Path(config.output_dir).name
        seen.append((folder, options["resume"]))
        if folder == "001" and not options["resume"]:
            real(config, **{**options, "stop_after": 0})  # checkpointed after experience 0
            raise KeyboardInterrupt
        return real(config, **options)

    monkeypatch.setattr(continual_job, "run", interrupted)
    out = run_config.parent / "interrupted"
    options: dict[str, Any] = {"strategy": "naive", "select_experiences": 2}
    with pytest.raises(KeyboardInterrupt):
        sweep(run_config, RUN_GRID, output_dir=out, **options)
    assert SweepState.load(out).trials[1].status is TrialStatus.RUNNING
    result = sweep(run_config, RUN_GRID, output_dir=out, **options)
    assert seen == [("000", False), ("001", False), ("001", True), ("final", False)]
    reference = run_sweep_done[1].state
    assert [t.score for t in result.state.trials] == [t.score for t in reference.trials]
    assert result.state.final is not None and reference.final is not None
    assert result.state.final.table == reference.final.table


def test_selecting_more_experiences_than_the_stream_has_stops_the_sweep(
    run_config: Path,
) -> None:
    from moracl.jobs.sweep_kinds import SelectionError

    with pytest.raises(SelectionError, match=r"--select-experiences 4 exceeds the stream's 3"):
        sweep(
            run_config,
            ["train.lr=0.05"],
            output_dir=run_config.parent / "four",
            sets=["strategies=[naive]"],
            select_experiences=4,
        )


def test_mean_ranks_on_the_strategies_mean_and_no_final_reads_no_test(run_config: Path) -> None:
    """``strategy="mean"``: the mean validation ACC of the strategies that train on every
    experience (Joint aside), computed here by hand; ``final=False``: no run reads the test
    split and no final folder is made."""
    from moracl.continual.metrics import RunResults
    from moracl.jobs.sweep import plan_sweep, run_sweep

    out = run_config.parent / "sweep-mean"
    grid = ["train.lr=0.001,0.05", "strategies=[moracl,naive,joint]"]
    plan = plan_sweep(run_config, grid, output_dir=out, strategy="mean", select_experiences=2)
    result = run_sweep(plan, final=False)
    assert result.final is None and result.state.final is None
    assert not (out / "final").exists()
    for t in result.state.trials:
        trial = RunResults.load(out / t.folder)
        assert trial.test_evaluated is False
        by_hand = [trial.strategies[n].validation.upto(1).acc() for n in ("moracl", "naive")]  # type: ignore[union-attr]
        assert t.score == pytest.approx(sum(by_hand) / 2)
    best = max(result.state.trials, key=lambda t: (t.score, -t.number))
    assert result.chosen.number == best.number
    assert (out / "chosen.yaml").is_file()
    assert "no final run" in (out / "sweep.md").read_text()


def test_a_swept_kind_drops_the_old_kinds_keys(tmp_path: Path) -> None:
    """``--grid adapter.kind=lora,mora`` on a MoRA config: the LoRA trial loses MoRA's
    ``compression``, as the override ``adapter.kind=lora`` does on the command line."""
    root = Path(__file__).resolve().parents[1]
    plan = plan_sweep(
        root / "configs/wordnet_finetune.yaml",
        ["adapter.kind=lora,mora"],
        output_dir=tmp_path / "s",
    )
    kinds = {}
    for combo in plan.combinations:
        config = plan.config_for(combo, tmp_path / "trial")
        kinds[combo["adapter.kind"]] = config.adapter
    assert type(kinds["lora"]).__name__ == "LoRAConfig"
    assert not hasattr(kinds["lora"], "compression")
    assert (
        kinds["mora"].compression
        == load_config(root / "configs/wordnet_finetune.yaml").adapter.compression
    )
