"""Continual-learning metrics against hand-computed values and plain loops; the results file."""

from __future__ import annotations

import enum
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from moracl.continual import (
    METRICS_FILE,
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StrategyResult,
)

NAN = float("nan")

# R[i][j]: accuracy on experience j after training through experience i; b: initial model.
R3 = [
    [0.80, 0.30, 0.20],
    [0.90, 0.70, 0.25],
    [0.60, 0.50, 0.85],
]
B3 = [0.10, 0.20, 0.30]


def test_hand_computed_3x3() -> None:
    m = AccuracyMatrix(R3, B3)
    # ACC = mean(R[2]) = (0.60 + 0.50 + 0.85) / 3 = 1.95 / 3 = 0.65
    assert m.acc() == pytest.approx(0.65, abs=1e-12)
    # avg inc. ACC: row means over j <= i: 0.80; (0.90 + 0.70) / 2 = 0.80;
    # (0.60 + 0.50 + 0.85) / 3 = 0.65  ->  (0.80 + 0.80 + 0.65) / 3 = 0.75
    assert m.average_incremental_accuracy() == pytest.approx(0.75, abs=1e-12)
    # BWT = ((R20 - R00) + (R21 - R11)) / 2 = ((0.60 - 0.80) + (0.50 - 0.70)) / 2 = -0.20
    assert m.bwt() == pytest.approx(-0.20, abs=1e-12)
    # FWT = ((R01 - b1) + (R12 - b2)) / 2 = ((0.30 - 0.20) + (0.25 - 0.30)) / 2 = 0.025
    assert m.fwt() == pytest.approx(0.025, abs=1e-12)
    # max-based: j=0: max(R00, R10) = 0.90, minus R20 = 0.60 -> 0.30
    #            j=1: max(R01, R11) = 0.70, minus R21 = 0.50 -> 0.20   mean -> 0.25
    assert m.forgetting() == pytest.approx(0.25, abs=1e-12)
    # first - last (Avalanche): (R00 - R20 + R11 - R21) / 2 = (0.20 + 0.20) / 2 = 0.20;
    # it differs from the max-based value because R10 (0.90) > R00 (0.80).
    assert m.forgetting_first_minus_last() == pytest.approx(0.20, abs=1e-12)
    assert m.forgetting() != pytest.approx(m.forgetting_first_minus_last())
    for v in m.summary().values():
        assert isinstance(v, float)


def test_negative_fwt() -> None:
    # Same R, a stronger initial model: FWT = ((0.30 - 0.50) + (0.25 - 0.40)) / 2 = -0.175
    m = AccuracyMatrix(R3, [0.10, 0.50, 0.40])
    assert m.fwt() == pytest.approx(-0.175, abs=1e-12)


def test_max_forgetting_takes_max_over_all_earlier_rows() -> None:
    # R01 = 0.90 was measured before experience 1 was trained, and exceeds R11 = 0.70.
    # As defined, max_{l<T-1} includes it: j=0: 0.90 - 0.60 = 0.30; j=1: 0.90 - 0.50 = 0.40
    # -> mean 0.35 (a max over l >= j only would give (0.30 + 0.20) / 2 = 0.25).
    r = [[0.80, 0.90, 0.20], [0.90, 0.70, 0.25], [0.60, 0.50, 0.85]]
    assert AccuracyMatrix(r, B3).forgetting() == pytest.approx(0.35, abs=1e-12)


def _reference(r: list[list[float]], b: list[float]) -> dict[str, float]:
    """The definitions as plain Python loops over lists."""
    t = len(r)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else NAN

    return {
        "acc": mean([r[t - 1][j] for j in range(t)]),
        "average_incremental_accuracy": mean(
            [mean([r[i][j] for j in range(i + 1)]) for i in range(t)]
        ),
        "bwt": mean([r[t - 1][j] - r[j][j] for j in range(t - 1)]),
        "fwt": mean([r[j - 1][j] - b[j] for j in range(1, t)]),
        "forgetting": mean(
            [max(r[ell][j] for ell in range(t - 1)) - r[t - 1][j] for j in range(t - 1)]
        ),
        "forgetting_first_minus_last": mean([r[j][j] - r[t - 1][j] for j in range(t - 1)]),
    }


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_metrics_match_plain_loops(t: int) -> None:
    rng = np.random.default_rng(t)
    r = rng.uniform(0, 1, (t, t)).tolist()
    b = rng.uniform(0, 1, t).tolist()
    got = AccuracyMatrix(r, b).summary()
    want = _reference(r, b)
    assert got.keys() == want.keys()
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    if t >= 2:  # first-minus-last is -BWT on a complete matrix
        assert got["forgetting_first_minus_last"] == pytest.approx(-got["bwt"], abs=1e-12)


def test_single_experience() -> None:
    m = AccuracyMatrix([[0.7]], [0.1])
    assert m.acc() == 0.7 and m.average_incremental_accuracy() == 0.7
    for v in (m.bwt(), m.fwt(), m.forgetting(), m.forgetting_first_minus_last()):
        assert math.isnan(v)


def test_partial_matrix() -> None:
    m = AccuracyMatrix.empty(3).set_initial(B3).set_row(0, R3[0]).set_row(1, R3[1])
    assert m.measured_rows == [0, 1] and m.last_completed == 1 and not m.is_complete
    # Full-horizon metrics need row 2 -> NaN; FWT needs R01, R12 and b only -> 0.025.
    for v in (m.acc(), m.average_incremental_accuracy(), m.bwt(), m.forgetting()):
        assert math.isnan(v)
    assert math.isnan(m.forgetting_first_minus_last())
    assert m.fwt() == pytest.approx(0.025, abs=1e-12)
    # As if the stream ended at experience 1: R = [[0.8, 0.3], [0.9, 0.7]], b = [0.1, 0.2]
    # ACC = 0.8; avg inc = (0.8 + 0.8) / 2 = 0.8; BWT = 0.9 - 0.8 = 0.1; FWT = 0.3 - 0.2 = 0.1
    # forgetting (max over l < 1) = 0.8 - 0.9 = -0.1; first - last = 0.8 - 0.9 = -0.1
    s = m.upto(m.last_completed).summary()
    want = [0.8, 0.8, 0.1, 0.1, -0.1, -0.1]
    assert list(s.values()) == pytest.approx(want, abs=1e-12)
    full = m.set_row(2, R3[2])
    assert full == AccuracyMatrix(R3, B3) and full.is_complete and full.last_completed == 2
    assert AccuracyMatrix.empty(3).last_completed == -1


def test_joint_training_has_only_the_final_row() -> None:
    m = AccuracyMatrix([[NAN] * 3, [NAN] * 3, R3[2]], B3)
    assert m.acc() == pytest.approx(0.65, abs=1e-12)
    assert m.measured_rows == [2] and m.last_completed == -1
    for v in (m.average_incremental_accuracy(), m.bwt(), m.fwt(), m.forgetting()):
        assert math.isnan(v)


@pytest.mark.parametrize(
    ("r", "b", "match"),
    [
        ([[0.5, 0.5]], [0.1, 0.1], "square"),
        ([[0.5]], [0.1, 0.2], "b has shape"),
        ([[0.5, 1.2], [0.5, 0.5]], [0.1, 0.1], r"R\[0\]\[1\] = 1.2"),
        ([[0.5, 0.5], [0.5, -0.1]], [0.1, 0.1], r"R\[1\]\[1\] = -0.1"),
        ([[0.5, 0.5], [0.5, 0.5]], [0.1, math.inf], r"b\[1\] = inf"),
        ([[0.5, NAN], [0.5, 0.5]], [0.1, 0.1], "partly measured"),
        ([[0.5, 0.5], [0.5, 0.5]], [NAN, 0.1], "partly measured"),
    ],
)
def test_matrix_validation(r: list, b: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AccuracyMatrix(r, b)


def test_matrix_is_read_only_and_copied() -> None:
    source = np.array(R3)
    m = AccuracyMatrix(source, B3)
    source[0, 0] = 0.0
    assert m.R[0, 0] == 0.8 and m.R.dtype == np.float64
    with pytest.raises(ValueError):
        m.R[0, 0] = 0.1


def _strategy(name: str, seed: int, routing: bool, rows: int = 3) -> StrategyResult:
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 1, (3, 3))  # floats with no short decimal form
    r[rows:] = np.nan
    usage = None
    if routing:
        usage = RoutingDiagnostics(
            expert_usage=[rng.dirichlet(np.ones(k + 1)).tolist() for k in range(3)],
            task_inference_accuracy=float(rng.uniform()),
        )
    cost = Cost(
        trainable_parameters=1_234_567,
        backbone_parameters=22_713_216,
        active_parameters_per_token=float(rng.uniform(1e3, 1e5)),
        wall_seconds=float(rng.uniform(1, 100)),
        train_seconds=float(rng.uniform(1, 100)),
        peak_memory_bytes=None if routing else 3 * 2**30 + 17,
    )
    return StrategyResult(name, AccuracyMatrix(r, rng.uniform(0, 1, 3)), cost, usage)


def _run(**strategies: StrategyResult) -> RunResults:
    return RunResults(
        scenario="wordnet-domains",
        setting="domain-incremental",
        seed=7,
        experiences=["noun", "verb", "adj"],
        config={"train": {"lr": 1e-3, "epochs": 2}, "strategies": ["moe", "naive"]},
        strategies=dict(strategies),
    )


def test_strategy_json_round_trip_is_exact() -> None:
    s = _strategy("MoE", 0, routing=True, rows=2)  # row 2 NaN
    text = json.dumps(s.to_dict(), allow_nan=False)
    assert '"R": [[' in text and "null, null, null" in text
    back = StrategyResult.from_dict(json.loads(text))
    assert back.matrix == s.matrix
    assert np.array_equal(back.matrix.R, s.matrix.R, equal_nan=True)  # bit-exact floats
    assert np.isnan(back.matrix.R[2]).all()
    assert back.cost == s.cost and back.routing == s.routing and back.name == "MoE"
    assert back.to_dict() == s.to_dict()
    plain = _strategy("Naive", 1, routing=False)
    assert StrategyResult.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_run_results_save_and_load(tmp_path: Path) -> None:
    run = _run(MoE=_strategy("MoE", 0, True), Naive=_strategy("Naive", 1, False, rows=1))
    path = run.save(tmp_path)
    assert path == tmp_path / METRICS_FILE
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644
    data = json.loads(path.read_text())
    assert data["format"] == "moracl.continual.run" and data["version"] == 3
    assert RunResults.load(tmp_path) == run and RunResults.load(path) == run
    run.add(_strategy("Naive", 2, False))
    run.save(tmp_path)  # overwriting our own readable file is fine
    assert RunResults.load(tmp_path).strategies["Naive"] == run.strategies["Naive"]


def test_str_enum_setting_is_stored_as_its_value() -> None:
    class Setting(str, enum.Enum):
        DOMAIN = "domain-incremental"

    run = RunResults("s", Setting.DOMAIN, 0, ["a"])
    assert type(run.setting) is str and run.setting == "domain-incremental"


def test_run_results_validation() -> None:
    s = _strategy("MoE", 0, True)
    with pytest.raises(ValueError, match="named 'MoE'"):
        _run(Other=s)
    with pytest.raises(ValueError, match="3x3 accuracy matrix"):
        RunResults("s", "class-incremental", 0, ["a", "b"], {}, {"MoE": s})


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "moracl.continual.run", "version": 1, "scenario": ',  # truncated
        b'{"config": {}, "result": {"accuracy": 0.9}}',  # another tool's metrics.json
        b'{"format": "moracl.continual.run", "version": 99}',
        b'{"format": "moracl.continual.run", "version": 1, "scenario": "s"}',
        b"\xff\xfe not text",
    ],
)
def test_unreadable_metrics_file_raises_and_is_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / METRICS_FILE
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RunResults.load(tmp_path)
    with pytest.raises(ValueError):
        _run(MoE=_strategy("MoE", 0, True)).save(tmp_path)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]


def test_version_error_names_both_versions(tmp_path: Path) -> None:
    data = _run().to_dict() | {"version": 99}
    (tmp_path / METRICS_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"version 99; this moracl reads versions \[2, 3\]"):
        RunResults.load(tmp_path)


def test_results_of_the_label_keyed_version_are_refused_clearly(tmp_path: Path) -> None:
    data = _run(MoE=_strategy("MoE", 0, True)).to_dict() | {"version": 1}
    (tmp_path / METRICS_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"version 1, written by an earlier moracl that keyed"):
        RunResults.load(tmp_path)


def test_a_strategy_keeps_its_registry_name_and_display_label() -> None:
    base = _strategy("x", 0, False)
    s = StrategyResult(name="moracl", label="moracl (experts)", matrix=base.matrix, cost=base.cost)
    back = StrategyResult.from_dict(json.loads(json.dumps(s.to_dict())))
    assert (back.name, back.label) == ("moracl", "moracl (experts)") and back == s
    plain = StrategyResult(name="naive", matrix=s.matrix, cost=s.cost)
    assert plain.label == "naive"  # no label: the name shows
    run = _run(moracl=s)
    assert list(run.strategies) == ["moracl"]


def test_missing_metrics_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        RunResults.load(tmp_path / "nowhere")


@pytest.mark.slow
def test_first_minus_last_matches_avalanche_stream_forgetting() -> None:
    """Drive Avalanche's StreamForgetting hooks with a lookup of R and compare every step."""
    from types import SimpleNamespace

    from avalanche.evaluation.metrics import Mean
    from avalanche.evaluation.metrics.forgetting_bwt import GenericStreamForgetting

    t = 5
    rng = np.random.default_rng(3)
    r = rng.uniform(0, 1, (t, t))

    class Lookup(GenericStreamForgetting):
        def __init__(self) -> None:
            super().__init__(Mean())
            self.at = (0, 0)

        def metric_update(self, strategy: object) -> None:
            pass

        def metric_result(self, strategy: object) -> float:
            return float(r[self.at])

        def __str__(self) -> str:
            return "Lookup"

    metric = Lookup()
    for i in range(t):
        strategy = SimpleNamespace(experience=SimpleNamespace(current_experience=i))
        metric.before_training_exp(strategy)
        metric.before_eval(strategy)
        for j in range(t):
            strategy.experience.current_experience = j
            metric.at = (i, j)
            metric.before_eval_exp(strategy)
            metric.after_eval_iteration(strategy)
            metric.after_eval_exp(strategy)
        ours = AccuracyMatrix(r[: i + 1, : i + 1], np.zeros(i + 1)).forgetting_first_minus_last()
        if i == 0:
            assert math.isnan(ours)
        else:
            assert metric.result() == pytest.approx(ours, abs=1e-12)
