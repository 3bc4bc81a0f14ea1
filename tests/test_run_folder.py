"""Run folders that cannot be lost or silently forged: one writer at a time (a lock the OS
frees when its holder dies), every file under a checksum, every path read on resume confined
to the run folder, a resumed run that keeps its config, and refusals that leave every byte
where it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moracl.cli import main
from moracl.continual.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moracl.guard import NonFiniteError
from moracl.report import (
    rebuild_report,
    verify_run_manifest,
    write_run_manifest,
)
from moracl.runlock import LOCK_FILE, RunFolderBusyError, RunLock
from tests.offline_data import needs_fashion_mnist, needs_wordnet_minilm

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["moracl (experts)", "Naive", "LwF"]


# -- helpers ----------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (symbolic links not followed): file bytes, link targets,
    folders."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "folder"
    return out


def _child(script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script args`` in the repository, lines in and out."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], line: str) -> None:
    """Read the child's output until ``line`` (the child's side of a handshake)."""
    assert proc.stdout is not None
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"the child ended (rc {proc.wait()}) without printing {line!r}")


# -- the lock -----------------------------------------------------------------------------------

HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
runlock = importlib.util.module_from_spec(spec)
sys.modules["runlock"] = runlock
spec.loader.exec_module(runlock)
lock = runlock.RunLock(sys.argv[2], "test holder").acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def test_a_second_process_is_refused_at_once_with_the_holder_named(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _child(HOLDER, str(ROOT / "moracl" / "runlock.py"), str(folder))
    try:
        _wait_for(holder, "locked")
        with pytest.raises(RunFolderBusyError) as refused:
            RunLock(folder, "second").acquire()
        found = refused.value.holder
        assert found is not None
        assert (found.pid, found.host, found.job) == (
            holder.pid,
            socket.gethostname(),
            "test holder",
        )
        assert f"test holder (pid {holder.pid} on {socket.gethostname()}, started " in str(
            refused.value
        )
        assert str(folder) in str(refused.value)
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        _wait_for(holder, "released")
    finally:
        holder.kill()
        holder.wait()
    with RunLock(folder, "second") as lock:  # free again
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _child(HOLDER, str(ROOT / "moracl" / "runlock.py"), str(folder))
    _wait_for(holder, "locked")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    assert (folder / LOCK_FILE).exists()  # its file is left, its lock is not
    with RunLock(folder, "next"):
        pass


def test_lock_in_one_process(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    first = RunLock(folder, "first").acquire()
    with pytest.raises(RunFolderBusyError, match=r"first \(pid \d+ on "):
        RunLock(folder, "second").acquire()
    first.release()
    first.release()  # twice: harmless
    assert not folder.exists()  # created by the lock, left empty: removed again
    with RunLock(folder, "off", enabled=False) as off:
        assert not off.held and not folder.exists()
    folder.mkdir(parents=True)
    (folder / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not a regular file"):
        RunLock(folder, "x").acquire()
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        RunLock(tmp_path / "file", "x").acquire()


# -- checkpoints written and read without a run ---------------------------------------------------


def _tiny_checkpoint(run: Path, experience: int = 1) -> None:
    tensors = {"naive": {"w": torch.arange(6.0).reshape(2, 3)}, "lwf": {"b": torch.ones(3)}}
    state = {"naive": {"experts_per_token": None}, "lwf": {"plugins": {"lwf": {"expcount": 2}}}}
    save_checkpoint(run, experience, tensors, state, {"results": {"note": "tiny"}})


def test_checkpoint_round_trip_and_every_file_checked(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path, 0)
    _tiny_checkpoint(tmp_path, 1)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.experience == 1 and ckpt.meta == {"results": {"note": "tiny"}}
    assert torch.equal(ckpt.tensors["naive"]["w"], torch.arange(6.0).reshape(2, 3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["exp-1", "latest.json"]
    assert load_checkpoint(tmp_path, tensors=False).tensors == {}
    (tmp_path / "checkpoints" / "exp-1" / "notes.txt").write_text("hi")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected: \['notes.txt'\]"):
        load_checkpoint(tmp_path)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("tensors", "meta", "error", "message"),
    [
        ({"naive": {"w": torch.tensor([1.0, float("nan")])}}, {}, NonFiniteError, "'w' holds nan"),
        ({"naive": {"w": torch.ones(2)}}, {"acc": float("inf")}, NonFiniteError, "meta.acc=inf"),
        ({"../x": {"w": torch.ones(2)}}, {}, CheckpointError, "cannot name a checkpoint file"),
    ],
)
def test_save_checkpoint_refuses_before_writing(
    tmp_path: Path, tensors: dict, meta: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        save_checkpoint(tmp_path, 0, tensors, {n: {} for n in tensors}, meta)
    assert list(tmp_path.iterdir()) == []


# -- the run's manifest and moracl report -------------------------------------------------------


def _saved_results(run: Path) -> None:
    from tests.test_report import _results

    run.mkdir(exist_ok=True)
    _results().save(run)
    (run / "logs").mkdir()
    (run / "logs" / "eval.csv").write_text("strategy,after_experience\nNaive,0\n")


def test_report_verifies_metrics_json_and_names_what_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _saved_results(tmp_path)
    assert main(["report", str(tmp_path / "metrics.json")]) == 0  # a path to metrics.json
    out = capsys.readouterr().out
    assert "metrics.json was not verified" in out  # results saved by hand: no manifest
    write_run_manifest(tmp_path)
    assert verify_run_manifest(tmp_path).verified
    (tmp_path / "report.md").write_text("edited")
    with open(tmp_path / "logs" / "eval.csv", "a") as f:  # logs may grow (a resumed run)
        f.write("Naive,1\n")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rebuilt: report.md changed after the run wrote it" in out
    assert "not verified" not in out and (tmp_path / "report.md").read_text() != "edited"
    assert verify_run_manifest(tmp_path).derived_changed == []  # the manifest is updated

    metrics = tmp_path / "metrics.json"
    metrics.write_text(metrics.read_text().replace("0.85", "0.95", 1))  # a forged accuracy
    before = _snapshot(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json changed after the run wrote it" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda run: (run / "logs" / "eval.csv").write_text("strategy\n"), "logs/eval.csv is"),
        (lambda run: (run / "metrics.json").unlink(), "has no metrics.json"),
        (lambda run: _relink(run / "metrics.json"), "metrics.json is a symbolic link"),
        (lambda run: _edit_manifest(run, "../x"), "'../x' leads outside the run folder"),
        (lambda run: _edit_manifest(run, "/etc/passwd"), "'/etc/passwd' is not a relative path"),
    ],
)
def test_report_refuses_a_tampered_run_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[Path], Any],
    message: str,
) -> None:
    run = tmp_path / "run"
    _saved_results(run)
    write_run_manifest(run)
    tamper(run)
    before = _snapshot(tmp_path)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moracl: error: ") and err.count("\n") == 1 and message in err
    assert _snapshot(tmp_path) == before


def _relink(path: Path) -> None:
    copy = path.parent.parent / "copy.json"  # beside the run folder
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)


def _edit_manifest(run: Path, rel: str) -> None:
    data = json.loads((run / "manifest.json").read_text())
    data["files"][rel] = data["files"]["metrics.json"]
    (run / "manifest.json").write_text(json.dumps(data))


def test_report_of_no_run_or_a_busy_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"moracl: error: {tmp_path} has no metrics.json: not a run folder, or its run has not "
        f"finished an experience yet\n"
    )
    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / "notes.txt")]) == 2
    assert "expected a run folder or its metrics.json" in capsys.readouterr().err
    _saved_results(tmp_path)
    busy = pytest.raises(RunFolderBusyError, match="in use by another job: moracl run")
    with RunLock(tmp_path, "moracl run"), busy:
        rebuild_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


# -- finetune and meta output folders ------------------------------------------------------------


@needs_wordnet_minilm
def test_finetune_refuses_a_busy_folder_or_earlier_results(tmp_path: Path) -> None:
    from moracl.config import load_config
    from moracl.jobs.finetune import run as finetune

    out = tmp_path / "ft"
    config = load_config(ROOT / "configs" / "wordnet_finetune.yaml", [f"output_dir={out}"])
    busy = pytest.raises(RunFolderBusyError, match=r"in use by another job: moracl meta \(pid")
    with RunLock(out, "moracl meta"), busy:
        finetune(config, progress=False)
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"already holds the results of an earlier job \(metrics"):
        finetune(config, progress=False)
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("toy")
def test_meta_refuses_to_overwrite_an_earlier_job_or_share_a_busy_folder(tmp_path: Path) -> None:
    from moracl.jobs.meta import run as meta_learn
    from tests.test_meta_job import tiny_config

    out = tmp_path / "meta"
    with RunLock(out, "moracl run"), pytest.raises(RunFolderBusyError, match="moracl run"):
        meta_learn(tiny_config(out), progress=False)
    assert not out.exists()
    meta_learn(tiny_config(out), progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{out} already holds the results of an earlier job"):
        meta_learn(tiny_config(out), progress=False)
    assert _snapshot(tmp_path) == before


@pytest.fixture
def toy() -> Iterator[None]:
    import warnings

    from moracl_scenarios.fewshot import FEWSHOT

    from tests.test_meta_job import toy_fewshot

    warnings.filterwarnings("ignore", "test.episodes=24 is below")
    with FEWSHOT.temporarily("toy", toy_fewshot):
        yield


# -- continual runs ------------------------------------------------------------------------------


def _config(out: Path) -> Any:
    """tests/test_continual_run.py's tiny run, smaller still: three strategies, one epoch,
    ten examples per class."""
    pytest.importorskip("avalanche")
    from tests.test_continual_run import _config as tiny

    config = tiny(out, epochs=1)
    scenario = replace(config.scenario, options={"per_class": 10, "test_per_class": 10})
    return replace(config, scenario=scenario, strategies=["moracl", "naive", "lwf"])


def test_a_new_run_into_another_jobs_results_is_refused(tmp_path: Path) -> None:
    from moracl.jobs.continual import run as run_continual

    (tmp_path / "metrics.json").write_text('{"result": "of a finetune"}')
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"already holds the results of an earlier job \(metrics"):
        run_continual(_config(tmp_path), progress=False)
    assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run and one interrupted after experience 1 (module-wide, copied by tests)."""
    from moracl.jobs.continual import run as run_continual

    base = tmp_path_factory.mktemp("runs")
    run_continual(_config(base / "full"), progress=False)
    run_continual(_config(base / "part"), progress=False, stop_after=1)
    return {"full": base / "full", "part": base / "part"}


def _copy(runs: dict[str, Path], which: str, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs[which], out, symlinks=True)
    return out


def _matrices(run: Path) -> list[Any]:
    data = json.loads((run / "metrics.json").read_text())
    return [(s["name"], s["matrix"]) for s in data["strategies"]]


def _latest(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "latest.json").read_text())


def _edit_state(run: Path, edit: Callable[[dict[str, Any]], None], *, rehash: bool) -> None:
    """Edit the newest state.json; with ``rehash`` also latest.json's checksum of it (a
    forger who knows the format)."""
    latest = _latest(run)
    path = run / "checkpoints" / latest["folder"] / "state.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))
    if rehash:
        latest["state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (run / "checkpoints" / "latest.json").write_text(json.dumps(latest))


def _nothing_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a checkpoint's tensors are deserialised."""
    import moracl.continual.checkpoint as checkpoint

    def boom(data: bytes) -> Any:
        raise AssertionError("tensors were loaded from a checkpoint that should be refused")

    monkeypatch.setattr(checkpoint, "load_safetensors", boom)


def _refused(run: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``moracl run --resume RUN argv`` is refused in one line, every file left as it was;
    returns the message."""
    before = _snapshot(run.parent)
    assert main(["run", "--resume", str(run), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moracl: error: ") and err.count("\n") == 1, err
    assert _snapshot(run.parent) == before
    return err


def _set_lr(data: dict[str, Any]) -> None:
    data["meta"]["results"]["config"]["train"]["lr"] = 0.5


def _forge_accuracy(data: dict[str, Any]) -> None:
    data["meta"]["results"]["strategies"][1]["matrix"]["R"][0][0] = 1.0


def _drop_lwf(data: dict[str, Any]) -> None:
    del data["state"]["lwf"]["plugins"]["lwf"]


def _skip_ahead(data: dict[str, Any]) -> None:
    data["experience"] = 3


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize("edit", [_skip_ahead, _set_lr, _forge_accuracy, _drop_lwf])
def test_an_edited_state_json_is_refused_before_anything_is_loaded(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[dict[str, Any]], None],
) -> None:
    run = _copy(runs, "part", tmp_path)
    _edit_state(run, edit, rehash=False)
    _nothing_loaded(monkeypatch)
    err = _refused(run, capsys)
    assert f"{run}/checkpoints/exp-1/state.json fails its checksum" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_skip_ahead, "experience=3 but the folder is 'exp-1'"),
        (_drop_lwf, "the state of 'lwf' lacks its LwF plugin state"),
        (lambda d: d["state"]["moracl"].update(experiences_prepared=4), "experiences_prepared=4"),
        (lambda d: d["files"].update({"../x": d["files"].pop("naive")}), "'../x' cannot name"),
        (lambda d: d["files"].update({"/tmp/x": d["files"].pop("naive")}), "'/tmp/x' cannot"),
        (
            lambda d: d["meta"]["results"]["strategies"][1]["matrix"]["R"].__setitem__(
                2, [0.5] * 5
            ),
            "the accuracy matrix of 'Naive' has rows [0, 1, 2]",
        ),
        (
            lambda d: d["meta"]["results"]["config"]["train"].update(lr="fast"),
            "the saved config is not a valid run config",
        ),
    ],
)
@needs_fashion_mnist
def test_a_consistently_forged_checkpoint_fails_its_cross_checks(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    run = _copy(runs, "part", tmp_path)
    _edit_state(run, edit, rehash=True)
    _nothing_loaded(monkeypatch)
    assert message in _refused(run, capsys)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_library_resume_with_another_config_is_refused(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    from moracl.continual.resume import ResumeConfigError
    from moracl.jobs.continual import run as run_continual

    run = _copy(runs, "part", tmp_path)
    config = _config(run)
    before = _snapshot(tmp_path)
    other = replace(config, train=replace(config.train, lr=0.5, epochs=3))
    with pytest.raises(ResumeConfigError) as refused:
        run_continual(other, resume=True, progress=False)
    assert "train.epochs (saved 1, given 3); train.lr (saved 0.02, given 0.5)" in str(refused.value)
    assert [c.key for c in refused.value.changes] == ["train.epochs", "train.lr"]
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ({"folder": "../x"}, "folder='../x'; expected the name of a folder"),
        ({"folder": "/tmp/x"}, "folder='/tmp/x'; expected"),
        ({"folder": "exp-1/../../x"}, "folder='exp-1/../../x'; expected"),
        ({"folder": "exp-0", "experience": 0}, "exp-0 is missing"),
        ({"experience": 3}, "experience=3 but folder='exp-1'"),
        ({"state_sha256": "0" * 64}, "state.json fails its checksum"),
        ({"format": "moracl.continual.checkpoint/1"}, "did not checksum state.json"),
        ({"format": "moracl.continual.checkpoint/2"}, "hold Avalanche plugin internals"),
        ({"format": "moracl.continual.checkpoint/3"}, "has flat routing keys (experts.router"),
    ],
)
@needs_fashion_mnist
def test_latest_json_cannot_point_elsewhere(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pointer: dict[str, Any],
    message: str,
) -> None:
    run = _copy(runs, "part", tmp_path)
    shutil.copytree(run / "checkpoints" / "exp-1", tmp_path / "x")  # a checkpoint outside
    (run / "checkpoints" / "latest.json").write_text(json.dumps({**_latest(run), **pointer}))
    _nothing_loaded(monkeypatch)
    assert message in _refused(run, capsys)


def _link_elsewhere(path: Path, outside: Path) -> None:
    """Replace ``path`` by a symbolic link to an identical copy in ``outside``."""
    copy = outside / f"outside-{path.name}"
    if path.is_dir():
        shutil.copytree(path, copy)
        shutil.rmtree(path)
    else:
        shutil.copy(path, copy)
        path.unlink()
    path.symlink_to(copy)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        "checkpoints",
        "checkpoints/latest.json",
        "checkpoints/exp-1",
        "checkpoints/exp-1/state.json",
        "checkpoints/exp-1/naive.safetensors",
    ],
)
@needs_fashion_mnist
def test_symbolic_links_on_the_read_path_are_refused(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    target: str,
) -> None:
    run = _copy(runs, "part", tmp_path)
    _link_elsewhere(run / target, tmp_path)
    _nothing_loaded(monkeypatch)
    err = _refused(run, capsys)
    assert f"{run / target} is a symbolic link" in err


@needs_fashion_mnist
@pytest.mark.slow
def test_resume_keeps_its_config(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moracl.config import to_dict

    run = _copy(runs, "part", tmp_path)
    err = _refused(run, capsys, "train.lr=0.5")
    assert "train.lr (saved 0.02, given 0.5)" in err and "train.epochs" not in err
    other = tmp_path / "other.yaml"
    data = to_dict(_config(run))
    data["train"]["epochs"] = 3
    other.write_text(yaml.safe_dump(data))
    err = _refused(run, capsys, str(other))
    assert "train.epochs (saved 1, given 3)" in err and "train.lr" not in err
    data["train"]["epochs"] = 1
    data["output_dir"] = str(tmp_path / "somewhere")
    other.write_text(yaml.safe_dump(data))
    assert "output_dir (saved" in _refused(run, capsys, str(other))

    # equal values are accepted, a safe change applied; the run ends where one never
    # interrupted ends
    argv = ["run", "--resume", str(run), "--quiet", "train.lr=0.02", "train.on_nonfinite=skip"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'resuming with train.on_nonfinite (saved "stop", given "skip")' in out
    assert _matrices(run) == _matrices(runs["full"])
    assert json.loads((run / "metrics.json").read_text())["config"]["train"]["on_nonfinite"] == (
        "skip"
    )
    assert verify_run_manifest(run).verified and not (run / LOCK_FILE).exists()


@needs_fashion_mnist
@pytest.mark.slow
def test_a_finished_run_resumed_says_so_and_prints_its_results(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(runs, "full", tmp_path)
    before = _snapshot(tmp_path)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run already finished after experience 5 of 5\n")
    for label in LABELS:
        assert f"| {label} |" in out
    assert _snapshot(tmp_path) == before

    # interrupted after its last checkpoint: metrics, report and manifest are rebuilt
    (run / "report.md").unlink()
    (run / "metrics.json").write_text((run / "metrics.json").read_text().replace("0.", "0.9", 1))
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert _matrices(run) == _matrices(runs["full"]) and (run / "report.md").is_file()
    assert verify_run_manifest(run).verified


@needs_fashion_mnist
@pytest.mark.slow
def test_a_finished_run_verifies_and_reports(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    full = runs["full"]
    check = verify_run_manifest(full)
    assert check.verified and check.derived_changed == []
    listed = json.loads((full / "manifest.json").read_text())["files"]
    assert {"metrics.json", "report.md", "logs/eval.csv", "logs/train.csv"} <= set(listed)
    assert any(k.startswith("plots/") for k in listed)
    assert any(k.startswith("tensorboard/") for k in listed)
    assert load_checkpoint(full).experience == 4
    assert sorted(p.name for p in (full / "checkpoints" / "exp-4").iterdir()) == [
        "lwf.safetensors",
        "moracl.safetensors",
        "naive.safetensors",
        "state.json",
    ]
    assert not (full / LOCK_FILE).exists()


# -- real processes: a concurrent writer, kill -9 -------------------------------------------------

RUNNER = """
import json, os, signal, sys
import torch
import moracl.continual.run as run
from moracl.config import from_dict
from moracl.jobs.continual import run as run_job
from moracl.continual.config import RunConfig

config = from_dict(RunConfig, json.loads(sys.argv[1]))
mode = sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
save = run.save_checkpoint

def save_and_wait(run_dir, experience, *args, **kwargs):
    folder = save(run_dir, experience, *args, **kwargs)
    if experience == 1:
        if mode == "kill":  # after the checkpoint, before metrics.json and the manifest
            os.kill(os.getpid(), signal.SIGKILL)
        print("checkpointed", flush=True)
        sys.stdin.readline()
    return folder

run.save_checkpoint = save_and_wait
run_job(config, progress=False)
"""


def _runner(out: Path, mode: str) -> subprocess.Popen[str]:
    from moracl.config import to_dict

    config = json.dumps(to_dict(_config(out)))
    return _child(RUNNER, config, mode, str(torch.get_num_threads()))


@needs_fashion_mnist
@pytest.mark.slow
def test_a_second_run_into_a_running_folder_is_refused_and_the_first_finishes_intact(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moracl.config import to_dict

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(_config(out))))
    first = _runner(out, "wait")
    try:
        _wait_for(first, "checkpointed")  # it holds the folder, mid-run
        holder = f"moracl run (pid {first.pid} on {socket.gethostname()}, started "
        for argv in (["run", str(config)], ["run", "--resume", str(out)], ["report", str(out)]):
            assert main([*argv, "--quiet"] if argv[0] == "run" else argv) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another job: {holder}" in err, err
        assert first.stdin is not None
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.wait() == 0
    finally:
        first.kill()
        first.wait()
    assert load_checkpoint(out).experience == 4
    assert verify_run_manifest(out).verified and verify_run_manifest(out).derived_changed == []
    rows = (out / "logs" / "eval.csv").read_text().splitlines()
    keys = [tuple(r.split(",")[:3]) for r in rows]
    full = (runs["full"] / "logs" / "eval.csv").read_text().splitlines()
    assert keys == [tuple(r.split(",")[:3]) for r in full]  # once each, in order: no interleaving
    assert not (out / LOCK_FILE).exists()


@needs_fashion_mnist
@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_ends_bit_identically(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    killed = _runner(out, "kill")
    assert killed.wait() == -signal.SIGKILL
    assert (out / LOCK_FILE).exists() and load_checkpoint(out).experience == 1
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # no stale lock
    capsys.readouterr()
    assert _matrices(out) == _matrices(runs["full"])
    assert (out / "logs" / "eval.csv").read_text() == (
        runs["full"] / "logs" / "eval.csv"
    ).read_text()
    assert verify_run_manifest(out).verified and not (out / LOCK_FILE).exists()
