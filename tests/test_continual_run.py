"""moracl run end to end on a tiny real stream: zero forgetting by construction, Naive
forgetting, resume equivalence, checkpoints that refuse corruption, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("avalanche")

from moracl.config import from_dict
from moracl.continual.checkpoint import load_checkpoint
from moracl.continual.config import RunConfig
from tests.offline_data import needs_fashion_mnist

pytestmark = [pytest.mark.slow, needs_fashion_mnist]


def _config(out: Path, **train: object) -> RunConfig:
    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "task",
            "options": {"per_class": 30, "test_per_class": 20},
        },
        "strategies": ["moracl", "naive", "ewc", "lwf", "replay", "joint"],
        "baselines": {"replay_size": 30},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-2, "head_lr": 2e-2, **train},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from moracl.jobs.continual import run as run_continual

    out = tmp_path_factory.mktemp("full") / "run"
    return out, run_continual(_config(out), progress=False)


def test_moracl_never_forgets_task_incrementally(full_run) -> None:  # type: ignore[no-untyped-def]
    _, results = full_run
    moracl = results.strategies["moracl"].matrix
    # frozen old experts and heads, old tasks masked from new experts: bit-identical outputs
    assert moracl.bwt() == 0.0
    assert all(moracl.R[i][0] == moracl.R[0][0] for i in range(5))
    # how much Naive forgets depends on rounding (its BWT was -0.39 on one CPU, -0.06 on
    # another); that its experience-0 weights move, and moracl's do not, is checked exactly in
    # test_resume_ends_where_an_uninterrupted_run_ends


def test_run_folder_has_metrics_report_plots_logs(full_run) -> None:  # type: ignore[no-untyped-def]
    out, results = full_run
    data = json.loads((out / "metrics.json").read_text())
    assert {s["name"] for s in data["strategies"]} == set(results.strategies)
    assert (out / "report.md").read_text().count("| moracl (experts) |") >= 1
    assert list((out / "plots").glob("*.png"))
    # header + five strategies x 5 rows x 5 experiences + Joint's one row
    assert (out / "logs" / "eval.csv").read_text().count("\n") == 1 + 5 * 5 * 5 + 5
    joint = results.strategies["joint"].matrix
    assert joint.measured_rows == [4]


def test_resume_ends_where_an_uninterrupted_run_ends(full_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from moracl.cli import main
    from moracl.jobs.continual import run as run_continual

    full_out, _ = full_run
    out = tmp_path / "run"
    run_continual(_config(out), progress=False, stop_after=0)
    after_first = load_checkpoint(out)
    assert after_first.experience == 0
    final = load_checkpoint(full_out).tensors
    # moracl keeps experience 0's head bit-identical through the stream; Naive trains its
    # one adapter on every experience, so the weights that served experience 0 move
    first = after_first.tensors
    heads0 = [k for k in first["moracl"] if k.startswith("heads.0.")]
    assert heads0 and all(first["moracl"][k].equal(final["moracl"][k]) for k in heads0)
    shared = [k for k in first["naive"] if ".adapters." in k]
    assert shared and all(not first["naive"][k].equal(final["naive"][k]) for k in shared)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    full = json.loads((full_out / "metrics.json").read_text())["strategies"]
    resumed = json.loads((out / "metrics.json").read_text())["strategies"]
    assert [s["name"] for s in resumed] == [s["name"] for s in full]
    for a, b in zip(resumed, full):
        assert a["matrix"] == b["matrix"], a["name"]


def test_corrupt_checkpoint_is_refused_and_left_alone(full_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from moracl.jobs.continual import run as run_continual

    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    folder = next((out / "checkpoints").glob("exp-*"))
    target = folder / "Naive.safetensors"
    if not target.exists():
        target = next(folder.glob("*.safetensors"))
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="checksum"):
        run_continual(_config(out), progress=False, resume=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_an_existing_run_is_not_overwritten(full_run) -> None:  # type: ignore[no-untyped-def]
    from moracl.jobs.continual import run as run_continual

    with pytest.raises(ValueError, match="already holds a run"):
        run_continual(_config(full_run[0]), progress=False)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"strategies": ["moracl", "icarl"]}, "strategies must be distinct names among"),
        (
            {"experts": {"routing": {"mode": "magic"}}},
            r"experts: routing: mode must be one of \['auto', 'task', 'learned', 'gaussian'\]",
        ),
        (
            {"experts": {"routing": {"mode": "learned", "per": "row"}}},
            r"experts: routing: per must be one of \['token', 'sample'\], got 'row'",
        ),
        ({"experts": {"router": "topk"}}, r"\['router'\] moved under experts.routing"),
        ({"train": {"epochs": 0}}, "train.epochs must be > 0"),
        ({"bogus": 1}, "unknown key"),
    ],
)
def test_bad_run_configs_name_the_valid_choices(patch: dict, message: str, tmp_path: Path) -> None:
    data = {"job": "run", "output_dir": str(tmp_path), **patch}
    with pytest.raises(ValueError, match=message):
        from_dict(RunConfig, data)


def test_unknown_scenario_lists_the_registered_ones(tmp_path: Path) -> None:
    from moracl.jobs.continual import run as run_continual

    config = from_dict(
        RunConfig, {"job": "run", "scenario": {"name": "cifar"}, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="split-fashion"):
        run_continual(config, progress=False)
