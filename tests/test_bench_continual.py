"""``moracl bench continual``: the targets, the tables, the plain-loop reference of the
training template, and per-strategy isolated runs matching one shared run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("avalanche")

from moracl.bench.continual import (
    BENCH_SCENARIOS,
    Target,
    bench_config,
    check_seed_targets,
    check_targets,
    loop_cost,
    loop_cost_markdown,
    loop_cost_table,
    markdown,
    parse_args,
    per_seed_table,
    run_scenario,
    run_scenarios,
    scenario_table,
    seed_differences,
    seed_table,
    targets_table,
)
from moracl.continual.metrics import AccuracyMatrix, Cost, RunResults, StrategyResult
from tests.offline_data import needs_fashion_mnist, needs_wordnet_minilm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = (
    "scenario.options.per_class=20",
    "scenario.options.test_per_class=10",
    "train.batch_size=16",
    "train.epochs=2",
    "baselines.replay_size=20",
)


def _matrix(last_row: list[float], diag: list[float]) -> AccuracyMatrix:
    """Diagonal ``diag``, 0.5 elsewhere, last row ``last_row``."""
    t = len(last_row)
    r = [[diag[i] if j == i else 0.5 for j in range(t)] for i in range(t)]
    r[t - 1] = last_row
    return AccuracyMatrix(r, [0.1] * t)


def _result(
    name: str,
    last_row: list[float],
    diag: list[float],
    trainable: int,
    val_last: list[float] | None = None,
) -> StrategyResult:
    cost = Cost(
        trainable_parameters=trainable,
        backbone_parameters=1000,
        active_parameters_per_token=1.0,
        wall_seconds=1.0,
        train_seconds=0.5,
    )
    validation = None if val_last is None else _matrix(val_last, diag)
    matrix = _matrix(last_row, diag)
    return StrategyResult(
        name=name, label=LABELS[name], matrix=matrix, cost=cost, validation=validation
    )


LABELS = {"moracl": "moracl (experts)", "naive": "Naive", "replay": "Replay", "joint": "Joint"}


def _results(
    setting: str,
    moracl_last: list[float],
    trainable: int = 10,
    *,
    seed: int = 0,
    without: tuple[str, ...] = (),
) -> RunResults:
    """moracl (validation ACC 0.85), Naive (ACC 0.4667, no validation split), Replay (ACC 0.8,
    validation 0.75) and Joint (ACC 0.9, validation 0.9); diagonals 0.9."""
    diag = [0.9, 0.9, 0.9]
    results = RunResults(scenario="s", setting=setting, seed=seed, experiences=["a", "b", "c"])
    rows = {
        "moracl": _result("moracl", moracl_last, diag, trainable, [0.85, 0.85, 0.85]),
        "naive": _result("naive", [0.2, 0.3, 0.9], diag, 10),
        "replay": _result("replay", [0.7, 0.8, 0.9], diag, 10, [0.7, 0.7, 0.85]),
        "joint": _result("joint", [0.9, 0.9, 0.9], diag, 10, [0.9, 0.9, 0.9]),
    }
    for name, row in rows.items():
        if name not in without:
            results.add(row)
    return results


def _by_name(targets: list[Target]) -> dict[str, Target]:
    return {t.name: t for t in targets}


BEST, NAIVE, BWT, JOINT, SHARE = (
    "ACC >= best baseline (not Joint)",
    "ACC >= Naive",
    "BWT >= -1 point",
    "ACC within 3 points of Joint",
    "trainable <= 2 % of backbone",
)


def test_every_target_met_with_its_margin() -> None:
    targets = check_targets(_results("task", [0.9, 0.9, 0.9]))
    assert [t.name for t in targets] == [BEST, NAIVE, BWT, JOINT, SHARE]
    assert all(t.met and t.verdict == "met" for t in targets)
    met = _by_name(targets)
    assert met[BEST].value == "90.0 vs Replay 80.0" and met[BEST].margin_text == "+10.0 points"
    assert met[NAIVE].value == "90.0 vs Naive 46.7" and met[NAIVE].margin_text == "+43.3 points"
    assert met[BWT].value == "0.0" and met[BWT].margin_text == "+1.0 points"
    assert (
        met[JOINT].value == "90.0 vs Joint 90.0 (+0.0)" and met[JOINT].margin_text == "+3.0 points"
    )
    assert met[SHARE].value == "1.00%" and met[SHARE].margin_text == "+1.00 %"
    assert met[BEST].margin == pytest.approx(0.1) and met[SHARE].margin == pytest.approx(0.01)


def test_every_target_not_met_with_its_margin() -> None:
    # moracl's last row: ACC 0.4, BWT (0.2 - 0.9 + 0.1 - 0.9) / 2 = -0.75; 3 % trainable
    targets = _by_name(check_targets(_results("task", [0.2, 0.1, 0.9], 30)))
    assert not any(t.met for t in targets.values())
    assert {t.verdict for t in targets.values()} == {"NOT MET"}
    assert targets[BEST].margin_text == "-40.0 points"
    assert targets[NAIVE].value == "40.0 vs Naive 46.7"
    assert targets[NAIVE].margin_text == "-6.7 points"
    assert targets[BWT].value == "-75.0" and targets[BWT].margin_text == "-74.0 points"
    assert targets[JOINT].value == "40.0 vs Joint 90.0 (-50.0)"
    assert targets[JOINT].margin_text == "-47.0 points"
    assert targets[SHARE].value == "3.00%" and targets[SHARE].margin_text == "-1.00 %"


def test_targets_each_on_its_own_threshold() -> None:
    # ACC 0.8 = Replay's: met (>=); above Naive; 10 points under Joint: not met; BWT -15
    targets = _by_name(check_targets(_results("task", [0.75, 0.75, 0.9])))
    assert targets[BEST].met and targets[BEST].margin_text == "+0.0 points"
    assert targets[NAIVE].met
    assert not targets[JOINT].met and not targets[BWT].met
    assert targets[SHARE].met
    # 1.7 points under Joint: met; BWT -1 point exactly (in floats -1.0000000000000009): met
    close = _by_name(check_targets(_results("task", [0.89, 0.89, 0.87])))
    assert close[JOINT].value == "88.3 vs Joint 90.0 (-1.7)"
    assert close[JOINT].met and close[JOINT].margin_text == "+1.3 points"
    assert close[BWT].value == "-1.0" and close[BWT].met
    # BWT is a target of task-incremental streams only
    assert BWT not in _by_name(check_targets(_results("class", [0.9, 0.9, 0.9])))


def test_a_missing_reference_row_is_a_target_not_met() -> None:
    targets = _by_name(check_targets(_results("task", [0.9, 0.9, 0.9], without=("naive",))))
    assert targets[NAIVE].value == "no 'naive' row" and not targets[NAIVE].met
    assert targets[NAIVE].margin_text == "n/a"
    assert targets[BEST].value == "90.0 vs Replay 80.0"  # Replay is still there
    alone = _by_name(
        check_targets(_results("task", [0.9] * 3, without=("naive", "replay", "joint")))
    )
    assert alone[BEST].value == "no baseline other than Joint" and not alone[BEST].met
    assert alone[JOINT].value == "no 'joint' row" and not alone[JOINT].met
    with pytest.raises(ValueError, match="no 'moracl' row"):
        check_targets(_results("task", [0.9] * 3, without=("moracl",)))


def test_scenario_table_has_validation_and_test_columns_and_the_targets() -> None:
    table = scenario_table(_results("class", [0.6, 0.6, 0.9]))
    lines = table.splitlines()
    assert lines[0] == (
        "| strategy | val ACC | ACC | BWT | forgetting | trainable % | wall s | peak memory |"
    )
    assert lines[2] == "| moracl (experts) | 85.0 | 70.0 | -30.0 | 30.0 | 1.00 | 1.0 | n/a |"
    assert lines[3] == "| Naive | – | 46.7 | -65.0 | 65.0 | 1.00 | 1.0 | n/a |"  # no val split
    assert (
        "| ACC >= best baseline (not Joint) | 70.0 vs Replay 80.0 | -10.0 points | NOT MET |"
        in (lines)
    )


def test_seed_tables_report_mean_and_sample_sd_and_check_targets_on_the_means() -> None:
    # moracl's last rows give ACC 0.8 and 0.7 (diag 0.9: BWT -0.15 and -0.3); Replay 0.8 twice
    runs = [
        _results("task", [0.75, 0.75, 0.9], seed=0),
        _results("task", [0.6, 0.6, 0.9], seed=1),
    ]
    lines = seed_table(runs).splitlines()
    assert lines[0] == "| strategy | val ACC (2 seeds) | ACC | BWT | forgetting |"
    # mean 0.75, sample sd sqrt(2 * 0.05**2 / 1) = 0.0707; BWT -0.225 ± 0.106
    assert lines[2] == "| moracl (experts) | 85.0 ± 0.0 | 75.0 ± 7.1 | -22.5 ± 10.6 | 22.5 ± 10.6 |"
    assert lines[3].startswith("| Naive | – | 46.7 ± 0.0 |")
    assert lines[4] == "| Replay | 75.0 ± 0.0 | 80.0 ± 0.0 | -15.0 ± 0.0 | 15.0 ± 0.0 |"
    nan_bwt = _results("task", [0.8, 0.8, 0.9])
    joint = nan_bwt.strategies["joint"]  # Joint measures the last row only
    last_only = AccuracyMatrix([[math.nan] * 3, [math.nan] * 3, [0.9] * 3], [0.1] * 3)
    nan_bwt.strategies["joint"] = StrategyResult(
        name="joint", label="Joint", matrix=last_only, cost=joint.cost, validation=last_only
    )
    joint_row = seed_table([nan_bwt, nan_bwt]).splitlines()[5]
    assert joint_row == "| Joint | 90.0 ± 0.0 | 90.0 ± 0.0 | n/a | n/a |"  # no diagonal: no BWT
    targets = _by_name(check_seed_targets(runs))
    assert targets[BEST].value == "75.0 vs Replay 80.0 (per seed -5.0 ± 7.1)"
    assert not targets[BEST].met and targets[BEST].margin_text == "-5.0 points"
    assert targets[BWT].value == "-22.5"
    # one run: the same targets as check_targets, with no per-seed spread
    assert check_seed_targets(runs[:1]) == check_targets(runs[0])
    with pytest.raises(ValueError, match="at least one run"):
        check_seed_targets([])


def test_per_seed_tables_give_validation_and_test_numbers_and_the_difference() -> None:
    runs = [
        _results("task", [0.75, 0.75, 0.9], seed=3),
        _results("task", [0.6, 0.6, 0.9], seed=7),
    ]
    lines = per_seed_table(runs).splitlines()
    assert lines[0] == "| strategy | seed 3: val / ACC / BWT | seed 7: val / ACC / BWT |"
    assert lines[2] == "| moracl (experts) | 85.0 / 80.0 / -15.0 | 85.0 / 70.0 / -30.0 |"
    assert lines[3] == "| Naive | – / 46.7 / -65.0 | – / 46.7 / -65.0 |"
    diffs = seed_differences(runs).splitlines()
    assert (
        diffs[0] == "| seed | moracl ACC | best other (not Joint) | its ACC | moracl − best other |"
    )
    assert diffs[2] == "| 3 | 80.0 | Replay | 80.0 | +0.0 |"
    assert diffs[3] == "| 7 | 70.0 | Replay | 80.0 | -10.0 |"
    assert diffs[4] == "| mean ± sd |  |  |  | -5.0 ± 7.1 |"


def test_targets_table_names_the_stream_target_margin_and_verdict() -> None:
    table = targets_table(
        {
            "a/task": check_targets(_results("task", [0.9, 0.9, 0.9])),
            "b/class": check_targets(_results("class", [0.2, 0.1, 0.9], 30)),
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| stream | target (moracl, test) | measured | margin | result |"
    best = "| a/task | ACC >= best baseline (not Joint) | 90.0 vs Replay 80.0 | +10.0 points |"
    assert lines[2] == best + " met |"
    assert "| b/class | trainable <= 2 % of backbone | 3.00% | -1.00 % | NOT MET |" in lines
    assert len(lines) == 2 + 5 + 4  # the class stream has no BWT target


def test_a_run_without_test_matrices_is_refused() -> None:
    results = RunResults(
        scenario="s", setting="task", seed=0, experiences=["a", "b"], test_evaluated=False
    )
    cost = _results("task", [0.9] * 3).strategies["moracl"].cost
    only_val = AccuracyMatrix([[0.9, 0.5], [0.8, 0.9]], [0.1, 0.1])
    results.add(StrategyResult(name="moracl", matrix=None, validation=only_val, cost=cost))
    with pytest.raises(ValueError, match="'moracl' has no test matrix"):
        scenario_table(results)


def test_the_record_renders_the_streams_and_the_loop_cost() -> None:
    runs = [_results("task", [0.9, 0.9, 0.9], seed=0), _results("task", [0.8, 0.8, 0.9], seed=1)]
    record = {
        "scenarios": {
            "a/task": {
                "config": "configs/a.yaml",
                "sizes": "10 train and 5 test examples per class",
                "runs": [r.to_dict() for r in runs],
            }
        },
        "loop_cost": [
            {
                "name": "a/task",
                "examples": 40,
                "steps": 6,
                "template_seconds": 1.2,
                "plain_seconds": 1.0,
                "max_weight_diff": 0.0,
                "ratio": 1.2,
            }
        ],
    }
    text = markdown(record)
    assert text.startswith("### a/task\n\n`configs/a.yaml` as it is; 10 train and 5 test")
    assert "; 3 experiences; seeds 0, 1." in text
    assert seed_table(runs) in text and per_seed_table(runs) in text
    assert "| a/task | ACC >= best baseline (not Joint) | 86.7 vs Replay 80.0" in text
    loop = loop_cost_markdown(record)  # a record from before the checked loop was timed
    assert "| a/task | 40 | 6 | 1.200 | 1.000 | 1.20x | met | — | — | 0.0e+00 |" in loop
    assert "| <= 1.3x |" in loop  # the CPU target
    record["device"] = "cuda"
    record["loop_cost"][0].update(template_seconds=1.21, checked_seconds=1.1)
    loop = loop_cost_markdown(record)
    assert loop.startswith("### moracl's template against a plain PyTorch loop, on CUDA")
    assert "| <= 1.2x |" in loop  # the CUDA target
    assert "| a/task | 40 | 6 | 1.210 | 1.000 | 1.21x | **not met** | 1.100 | 1.10x |" in loop
    assert markdown({"scenarios": {}, "loop_cost": []}) == ""
    assert loop_cost_markdown({"scenarios": {}, "loop_cost": []}) == ""


def test_repeated_seeds_are_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moracl.bench.continual import main

    with pytest.raises(SystemExit):
        main(["--seeds", "0", "1", "0", "--scenarios", "split-fashion/task", "--no-loop-cost"])
    assert "--seeds must be distinct (each writes its own run folder), got [0, 1, 0]" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["--seeds", "-1", "--scenarios", "split-fashion/task", "--no-loop-cost"])
    assert "--seeds must be >= 0, got [-1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"train.seed must be >= 0, got -1"):
        bench_config("split-fashion/task", seed=-1)


def test_options_default_to_five_seeds_and_refuse_jobs_without_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args([])
    assert args.seeds == [0, 1, 2, 3, 4] and args.jobs == 1 and args.isolate
    assert args.scenarios == list(BENCH_SCENARIOS)
    assert args.device == "cpu"  # where the streams and the loop cost train
    with pytest.raises(SystemExit):
        parse_args(["--jobs", "2", "--no-isolate"])
    assert "--jobs 2 runs strategy processes side by side" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--loop-cost-only", "--no-loop-cost"])
    assert "leave nothing to measure" in capsys.readouterr().err
    with pytest.raises(ValueError, match="jobs=2; expected 1, or more with isolate=True"):
        next(run_scenarios([], isolate=False, jobs=2))


def test_each_stream_is_its_config_as_it_is(tmp_path: Path) -> None:
    """Nothing but the seed, the output folder and (``--quick``) the sizes is changed."""
    from moracl.config import load_config, to_dict

    assert {key: b.config for key, b in BENCH_SCENARIOS.items()} == {
        "wordnet-domains/task": "wordnet_domains.yaml",
        "wordnet-domains/class": "wordnet_domains_class.yaml",
        "split-fashion/task": "split_fashion.yaml",
        "split-fashion/class": "split_fashion_class.yaml",
        "digit-domains/domain": "digit_domains.yaml",
    }
    for key, b in BENCH_SCENARIOS.items():
        own = to_dict(load_config(CONFIGS / b.config))
        config = to_dict(bench_config(key, output_dir=tmp_path, seed=3))
        assert config["output_dir"] == str(tmp_path / (key.replace("/", "-") + "-seed3"))
        assert config["train"]["seed"] == 3
        own["train"]["seed"], own["output_dir"] = 3, config["output_dir"]
        assert config == own, key
        quick = to_dict(bench_config(key, quick=True, output_dir=tmp_path))
        own["train"]["seed"], own["output_dir"] = 0, quick["output_dir"]
        for override in b.quick:
            dotted, value = override.split("=")
            *path, last = dotted.split(".")
            node = own
            for part in path:
                node = node[part]
            node[last] = int(value)
        assert quick == own, key
    assert bench_config("wordnet-domains/class", quick=True).train.epochs == 1
    with pytest.raises(ValueError, match="unknown bench scenario"):
        bench_config("split-fashion/domain")


def test_a_config_of_another_stream_or_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from moracl.bench import continual

    wrong = continual.BenchScenario("split_fashion.yaml")  # a task-incremental config
    monkeypatch.setitem(continual.BENCH_SCENARIOS, "split-fashion/class", wrong)
    with pytest.raises(ValueError, match="runs split-fashion/task; the benchmark's stream"):
        bench_config("split-fashion/class")


def _tiny(key: str, out: Path, *extra: str) -> object:
    from moracl.config import load_config
    from moracl.continual.config import RunConfig

    config = bench_config(key, output_dir=out)
    overrides = [*TINY, *extra, f"output_dir={config.output_dir}"]
    tiny = load_config(CONFIGS / BENCH_SCENARIOS[key].config, overrides)
    assert isinstance(tiny, RunConfig)
    return tiny


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("split-fashion/task", ("experts.routing={mode: learned}",)),
        ("split-fashion/class", ("experts.routing={mode: learned}",)),
        # routing supervision is left out of the timed template, as replay is
        (
            "split-fashion/class",
            ("experts.routing={mode: learned, supervision: 1.0, teacher_forcing: true}",),
        ),
        ("split-fashion/class", ()),  # gaussian task inference: trained by experience
    ],
)
def test_template_and_plain_loop_end_with_the_same_weights(
    key: str, extra: tuple[str, ...], tmp_path: Path
) -> None:
    config = _tiny(key, tmp_path, *extra)
    cost = loop_cost(config, key, repeats=1)  # type: ignore[arg-type]
    assert cost.examples == 40
    assert cost.steps == 2 * 3  # two epochs of ceil(40 / 16) batches
    assert cost.max_weight_diff == 0.0
    assert cost.template_seconds > 0 and cost.plain_seconds > 0
    assert cost.checked_seconds is not None and cost.checked_seconds > 0
    row = loop_cost_table([cost]).splitlines()[2]
    assert row.startswith(f"| {key} | 40 | 6 |") and row.endswith("| 0.0e+00 |")


@needs_wordnet_minilm
@pytest.mark.slow
def test_with_dropout_in_the_encoder_both_loops_end_with_the_same_weights(tmp_path: Path) -> None:
    # MiniLM's dropout draws from the global generator: equal only if loading the
    # experience's data in the template draws nothing from it
    key = "wordnet-domains/task"
    cost = loop_cost(_tiny(key, tmp_path), key, repeats=1)  # type: ignore[arg-type]
    assert cost.examples == 80 and cost.steps == 2 * 5  # two epochs of ceil(80 / 16)
    assert cost.max_weight_diff == 0.0


@needs_fashion_mnist
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_template_and_plain_loop_end_with_the_same_weights(tmp_path: Path) -> None:
    key = "split-fashion/task"
    config = _tiny(key, tmp_path, "experts.routing={mode: learned}")
    cost = loop_cost(config, key, repeats=1, device="cuda")  # type: ignore[arg-type]
    assert cost.steps == 2 * 3
    assert cost.max_weight_diff <= 1e-6  # the same kernels; CUDA's reductions may reorder
    assert cost.template_seconds > 0 and cost.plain_seconds > 0


@needs_fashion_mnist
@pytest.mark.slow
def test_isolated_strategies_match_one_shared_run(tmp_path: Path) -> None:
    """The same test and validation matrices, strategy by strategy, from one shared process
    and from one fresh process per strategy, two at once (``--jobs 2``). Both run on one
    thread: the matrices come from training, and a kernel may round differently with another
    number of threads."""
    config = _tiny("split-fashion/class", tmp_path, "strategies=[moracl,naive]")
    threads = torch.get_num_threads()
    try:
        shared = run_scenario(config, isolate=False, threads=1)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)  # run_scenario sets it for this whole process
    other = _tiny("split-fashion/class", tmp_path / "iso", "strategies=[moracl,naive]")
    (isolated,) = run_scenarios([other], isolate=True, threads=1, jobs=2)  # type: ignore[list-item]
    assert list(isolated.strategies) == list(shared.strategies) == ["moracl", "naive"]
    for name, s in shared.strategies.items():
        assert isolated.strategies[name].matrix == s.matrix, name
        assert s.validation is not None and isolated.strategies[name].validation == s.validation
        peak = isolated.strategies[name].cost.peak_memory_bytes
        assert peak is not None and peak > 50 * 2**20  # a process holding torch
    assert "| moracl (experts) |" in scenario_table(isolated)


def test_merging_adds_strategies_seed_by_seed_and_refuses_other_streams(tmp_path: Path) -> None:
    """``--merge``: new rows join the record's runs of the same stream and seeds; the record's
    own rows are kept as they were, and the targets are checked again over all rows."""
    from moracl.bench.common import write_record
    from moracl.bench.continual import merge_record

    def stream(runs: list[RunResults]) -> dict[str, object]:
        return {"config": "configs/a.yaml", "sizes": "s", "runs": [r.to_dict() for r in runs]}

    old = [_results("task", [0.9, 0.9, 0.9], seed=s, without=("replay",)) for s in (0, 1)]
    new = [
        RunResults(scenario="s", setting="task", seed=s, experiences=["a", "b", "c"])
        for s in (0, 1)
    ]
    for r in new:
        r.add(
            _results("task", [0.9, 0.9, 0.9], without=("moracl", "naive", "joint")).strategies[
                "replay"
            ]
        )
    path = tmp_path / "r.json"
    meta = {"commit": "abc", "caveats": ["old note"]}
    write_record(path, "continual", meta, {"scenarios": {"a/task": stream(old)}})
    results, kept_meta = merge_record(path, {"a/task": stream(new)})
    assert kept_meta == meta
    runs = [RunResults.from_dict(r) for r in results["scenarios"]["a/task"]["runs"]]
    assert [list(r.strategies) for r in runs] == [["moracl", "naive", "joint", "replay"]] * 2
    for merged, before in zip(runs, old):
        assert merged.strategies["moracl"].to_dict() == before.strategies["moracl"].to_dict()
    names = {t["name"] for t in results["scenarios"]["a/task"]["targets"]}
    assert BEST in names  # Replay is now the best baseline the target compares with
    write_record(path, "continual", meta, results)
    with pytest.raises(ValueError, match="already holds 'replay'"):
        merge_record(path, {"a/task": stream(new)})
    with pytest.raises(ValueError, match=r"seeds \[1, 0\] differ from the record's \[0, 1\]"):
        merge_record(path, {"a/task": stream(new[::-1])})
    with pytest.raises(ValueError, match="has no stream 'b/task'"):
        merge_record(path, {"b/task": stream(new)})
