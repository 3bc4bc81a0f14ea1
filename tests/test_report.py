"""The run report (markdown table, definitions, plots), the run logs and ``moracl report``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from moracl.cli import main
from moracl.continual import (
    METRICS_FILE,
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StrategyResult,
)
from moracl.report import RunLogger, comparison_table, write_report

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-computed in tests/test_continual_metrics.py: ACC 0.65, avg inc. 0.75, BWT -0.20,
# FWT 0.025, forgetting (max) 0.25, forgetting (first - last) 0.20.
R3 = [[0.80, 0.30, 0.20], [0.90, 0.70, 0.25], [0.60, 0.50, 0.85]]
B3 = [0.10, 0.20, 0.30]


def _results() -> RunResults:
    moe = StrategyResult(
        "MoE | top-2",  # a pipe, escaped in the table
        AccuracyMatrix(R3, B3),
        Cost(
            trainable_parameters=1_500_000,
            backbone_parameters=30_000_000,
            active_parameters_per_token=12_288.0,
            wall_seconds=125.0,
            train_seconds=100.0,
            peak_memory_bytes=3 * 2**29,
        ),
        RoutingDiagnostics([[1.0], [0.25, 0.75], [0.1, 0.2, 0.7]], task_inference_accuracy=0.875),
    )
    naive = StrategyResult(
        "Naive",
        # ACC = (0.2 + 0.4 + 0.9) / 3 = 0.5; BWT = ((0.2 - 0.9) + (0.4 - 0.8)) / 2 = -0.55
        AccuracyMatrix([[0.9, 0.1, 0.1], [0.5, 0.8, 0.2], [0.2, 0.4, 0.9]], [0.1, 0.1, 0.1]),
        Cost(30_000_000, 30_000_000, 30_000_000.0, 42.25, 40.0, None),
    )
    joint = StrategyResult(
        "Joint",
        AccuracyMatrix([[NAN] * 3, [NAN] * 3, [0.9, 0.8, 0.85]], [0.1, 0.1, 0.1]),
        Cost(30_000_000, 30_000_000, 30_000_000.0, 3700.0, 3600.0, None),
    )
    return RunResults(
        scenario="wordnet-domains",
        setting="domain-incremental",
        seed=3,
        experiences=["noun", "verb", "adj"],
        config={"seed": 3, "train": {"lr": 0.001}},
        strategies={s.name: s for s in (moe, naive, joint)},
    )


def _parse_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Rows of the markdown table whose header starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"| {first_header} |"))

    def cells(line: str) -> list[str]:
        parts, cur, k = [], "", 1
        while k < len(line) - 1:
            if line[k] == "\\" and line[k + 1] == "|":
                cur, k = cur + "|", k + 2
                continue
            if line[k] == "|":
                parts.append(cur.strip())
                cur = ""
            else:
                cur += line[k]
            k += 1
        return [*parts, cur.strip()]

    header = cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


def test_comparison_table_numbers() -> None:
    rows = {r["strategy"]: r for r in _parse_table(comparison_table(_results()), "strategy")}
    assert list(rows) == ["MoE | top-2", "Naive", "Joint"]
    moe = rows["MoE | top-2"]
    got = [float(moe[c]) for c in ("ACC", "avg inc. ACC", "BWT", "FWT", "forgetting (max)")]
    assert got == [65.0, 75.0, -20.0, 2.5, 25.0]
    # 1.5M of 30M trainable = 5%; 12,288 active per token; 125 s; 1.5 GiB
    assert moe["trainable params (% of backbone)"] == "1.50M (5%)"
    assert moe["active params/token"] == "12.29K"
    assert moe["wall time"] == "2 min 05 s"
    assert moe["peak memory"] == "1.50 GiB"
    naive = rows["Naive"]
    assert float(naive["ACC"]) == 50.0 and float(naive["BWT"]) == -55.0
    assert naive["peak memory"] == "n/a" and naive["wall time"] == "42.2 s"
    # Joint: only ACC is defined = (0.9 + 0.8 + 0.85) / 3 = 0.85
    joint = rows["Joint"]
    assert float(joint["ACC"]) == 85.0 and joint["BWT"] == "n/a" and joint["FWT"] == "n/a"
    assert joint["wall time"] == "1 h 01 min"


def test_write_report(tmp_path: Path) -> None:
    import matplotlib.image

    _results().save(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# wordnet-domains — domain-incremental, seed 3\n")
    table = {r["strategy"]: r for r in _parse_table(text, "strategy")}
    assert float(table["MoE | top-2"]["forgetting (max)"]) == 25.0
    assert len(table) == 3
    fml = _parse_table(text.split("first − last), reported separately", 1)[1], "strategy")
    assert float(fml[0]["forgetting (first − last)"]) == 20.0
    for formula in (
        "ACC = mean_j R[T-1][j]",
        "average incremental accuracy = mean_i mean_{j<=i} R[i][j]",
        "BWT = mean_{j<T-1} (R[T-1][j] − R[j][j])",
        "FWT = mean_{j>0} (R[j-1][j] − b[j])",
        "mean_{j<T-1} (max_{l<T-1} R[l][j] − R[T-1][j])",
        "mean_{j<T-1} (R[j][j] − R[T-1][j])",
    ):
        assert f"`{formula}" in text or f"= {formula}`" in text, formula
    # The accuracy matrix of MoE parses back to R and b in points.
    section = text.split("### MoE \\| top-2", 1)[1]
    matrix = _parse_table(section, "after \\ evaluated on")
    assert [float(matrix[0][e]) for e in ("noun", "verb", "adj")] == [10.0, 20.0, 30.0]
    for i, row in enumerate(matrix[1:]):
        assert [float(row[e]) for e in ("noun", "verb", "adj")] == [
            round(100 * x, 1) for x in R3[i]
        ]
    assert "Task inference accuracy: 87.5%" in text
    usage = _parse_table(text.split("## Routing", 1)[1], "task")
    assert [usage[1][e] for e in ("e0", "e1", "e2")] == ["25.0", "75.0", "n/a"]
    names = [
        "accuracy_curves.png",
        "accuracy_matrix_joint.png",
        "accuracy_matrix_moe_top-2.png",
        "accuracy_matrix_naive.png",
        "expert_usage_moe_top-2.png",
        "summary_acc_bwt.png",
    ]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names
    for name in names:
        assert f"(plots/{name})" in text
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
        image = matplotlib.image.imread(tmp_path / "plots" / name)  # decodes
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert float(np.std(image[..., :3])) > 0.05  # not a blank canvas


def test_report_rebuilds_from_metrics_json_alone(tmp_path: Path) -> None:
    _results().save(tmp_path)
    first = write_report(tmp_path).read_text()
    (tmp_path / "report.md").unlink()
    for p in (tmp_path / "plots").iterdir():
        p.unlink()
    assert write_report(tmp_path).read_text() == first
    assert len(list((tmp_path / "plots").iterdir())) == 6


def test_report_of_a_run_in_progress(tmp_path: Path) -> None:
    run = _results()
    moe = run.strategies["MoE | top-2"]
    partial = AccuracyMatrix.empty(3).set_initial(B3).set_row(0, R3[0]).set_row(1, R3[1])
    run.add(StrategyResult(moe.name, partial, moe.cost, None))
    run.save(tmp_path)
    text = write_report(tmp_path, plots=False).read_text()
    # Through experience 1 (see test_partial_matrix): ACC 0.8, BWT 0.1, forgetting -0.1.
    note = "MoE \\| top-2: evaluated after 2 of 3 experiences; as if the stream ended at `verb`: "
    assert note + "ACC 80.0, BWT 10.0, forgetting (max) -10.0" in text
    row = _parse_table(text, "strategy")[0]
    assert row["ACC"] == "n/a" and row["BWT"] == "n/a"
    assert row["FWT"] == "2.5"  # needs R01, R12 and b only, all measured
    assert not (tmp_path / "plots").exists()


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def test_csv_logs_append_across_loggers(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_train("MoE", experience=0, epoch=0, step=1, loss=0.1, lr=1e-3, seconds=0.5)
        log.log_eval("MoE", after_experience=0, eval_experience=1, accuracy=0.3, loss=2.0)
    log = RunLogger(tmp_path, tensorboard=False)
    log.log_train("MoE", experience=1, epoch=2, step=7, loss=1 / 3, lr=2e-4, seconds=9.25)
    log.log_eval("Naive", after_experience=1, eval_experience=0, accuracy=0.9)
    log.close()
    log.close()
    train = _read_csv(tmp_path / "logs" / "train.csv")
    assert train[0] == ["strategy", "experience", "epoch", "step", "loss", "lr", "seconds"]
    assert len(train) == 3 and train.count(train[0]) == 1
    assert train[2][:4] == ["MoE", "1", "2", "7"] and float(train[2][4]) == 1 / 3  # exact
    ev = _read_csv(tmp_path / "logs" / "eval.csv")
    assert ev == [
        ["strategy", "after_experience", "eval_experience", "accuracy", "loss"],
        ["MoE", "0", "1", "0.3", "2.0"],
        ["Naive", "1", "0", "0.9", ""],
    ]
    with pytest.raises(ValueError, match="closed"):
        log.log_eval("MoE", after_experience=0, eval_experience=0, accuracy=0.5)


def test_csv_log_with_another_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    other = tmp_path / "logs" / "train.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        RunLogger(tmp_path, tensorboard=False)
    assert other.read_text() == "a,b\n1,2\n"


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in range(2):  # a resumed run adds a second event file
        with RunLogger(tmp_path) as log:
            for step in range(3):
                log.log_train(
                    "EWC", experience=run, epoch=0, step=10 * run + step,
                    loss=1.0 / (1 + step), lr=0.01, seconds=float(step),
                )  # fmt: skip
            log.log_eval("EWC", after_experience=run, eval_experience=0, accuracy=0.5 + run / 4)
    folder = tmp_path / "tensorboard" / "EWC"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(folder))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2, 10, 11, 12]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3] * 2)
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy/exp_0")] == [(0, 0.5), (1, 0.75)]


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _results().save(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| strategy | ACC |")
    assert f"report written to {tmp_path / 'report.md'}" in out
    assert (tmp_path / "plots" / "summary_acc_bwt.png").read_bytes().startswith(PNG_SIGNATURE)


def test_cli_report_missing_or_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-run"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moracl: error: ") and str(missing) in err
    (tmp_path / METRICS_FILE).write_text('{"format": "moracl.continual.run", "version": 1,')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a readable" in err and str(tmp_path / METRICS_FILE) in err
    assert not (tmp_path / "report.md").exists()


def test_results_json_is_strict(tmp_path: Path) -> None:
    """No NaN tokens in the file: unmeasured entries are null."""
    _results().save(tmp_path)
    text = (tmp_path / METRICS_FILE).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert json.loads(text)["strategies"][2]["matrix"]["R"][0] == [None, None, None]
    assert math.isnan(RunResults.load(tmp_path).strategies["Joint"].matrix.R[0, 0])


def _with_validation(test_evaluated: bool = True) -> RunResults:
    """``_results()`` with a validation matrix per strategy (ACC 0.5, BWT -0.5) and
    MoE early-stopped."""
    from moracl.continual.metrics import StoppingRecord

    base = _results()
    val = AccuracyMatrix([[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.2, 0.5, 0.8]], [0.1, 0.2, 0.3])
    stopped = [StoppingRecord(i, 1, 3, True, "val_loss", 0.5) for i in range(3)]
    strategies = {}
    for name, s in base.strategies.items():
        strategies[name] = StrategyResult(
            s.name,
            s.matrix if test_evaluated else None,
            s.cost,
            s.routing,
            label=s.label,
            validation=val,
            early_stopping=stopped if name.startswith("MoE") else [],
        )
    config = {"scenario": {"val_share": 0.1}, "train": {"early_stopping": {"patience": 2}}}
    return RunResults(
        base.scenario,
        base.setting,
        base.seed,
        base.experiences,
        config=config,
        strategies=strategies,
        test_evaluated=test_evaluated,
    )


def test_report_puts_validation_and_test_side_by_side(tmp_path: Path) -> None:
    _with_validation().save(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "**Model selection uses validation only.**" in text
    assert "10% of each class's training rows" in text
    row = _parse_table(text, "strategy")[0]
    assert list(row)[:5] == ["strategy", "val ACC", "test ACC", "val BWT", "test BWT"]
    # val: ACC (0.2 + 0.5 + 0.8) / 3 = 0.5, BWT ((0.2 - 0.9) + (0.5 - 0.8)) / 2 = -0.5;
    # test: the hand-computed R3 numbers
    assert [float(row[c]) for c in ("val ACC", "test ACC", "val BWT", "test BWT")] == [
        50.0, 65.0, -50.0, -20.0,
    ]  # fmt: skip
    assert float(row["test FWT"]) == 2.5 and float(row["test forgetting (max)"]) == 25.0
    stopping = _parse_table(text.split("## Early stopping", 1)[1], "strategy")
    assert [r["strategy"] for r in stopping] == ["MoE | top-2"]
    assert stopping[0]["0: noun"] == "1 / 3"
    section = text.split("### MoE \\| top-2", 1)[1]
    test_matrix = _parse_table(section.split("Test:", 1)[1], "after \\ evaluated on")
    val_matrix = _parse_table(section.split("Validation:", 1)[1], "after \\ evaluated on")
    assert float(test_matrix[1]["noun"]) == 80.0 and float(val_matrix[1]["noun"]) == 90.0
    assert (tmp_path / "plots" / "validation_matrix_moe_top-2.png").is_file()
    assert "(plots/validation_matrix_moe_top-2.png)" in text


def test_report_of_a_run_that_never_read_its_test_split(tmp_path: Path) -> None:
    _with_validation(test_evaluated=False).save(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "**The test split was not evaluated**" in text
    row = _parse_table(text, "strategy")[0]
    assert [c for c in row if "ACC" in c or "BWT" in c] == [
        "val ACC",
        "val BWT",
        "val avg inc. ACC",
    ]
    assert float(row["val ACC"]) == 50.0 and "test" not in " ".join(row)
    assert "Test:" not in text and not (tmp_path / "plots" / "validation_matrix_naive.png").exists()
    assert RunResults.load(tmp_path).strategies["Naive"].matrix is None
