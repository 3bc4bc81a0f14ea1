"""Bad input to the ``moracl`` command ends in one line, before any work: output folders,
devices, scenarios and their options, routing rules, bench arguments, interrupts."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from moracl.cli import main
from moracl.config import load_config
from moracl.jobs import check_config
from moracl.preflight import check_device, check_output_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN = CONFIGS / "split_fashion.yaml"  # task setting by default, gaussian task inference
DOMAINS = CONFIGS / "digit_domains.yaml"  # domain setting, top-2 of 2 learned routers
FINETUNE = CONFIGS / "wordnet_finetune.yaml"
META = CONFIGS / "wordnet_fewshot.yaml"


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moracl: error: "), err
    return lines[0]


def refuse(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return error_line(capsys)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job fails the test if it gets as far as reading data."""
    import moracl_scenarios.fewshot
    import moracl_scenarios.streams
    import moracl_scenarios.wordnet

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the job started work before refusing its input")

    monkeypatch.setattr(moracl_scenarios.streams, "build_stream", forbidden)
    monkeypatch.setattr(moracl_scenarios.fewshot, "build_fewshot", forbidden)
    monkeypatch.setattr(moracl_scenarios.wordnet, "wordnet_classification", forbidden)
    monkeypatch.setattr(moracl_scenarios.wordnet, "load_wordnet_glosses", forbidden)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- output folders -------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["run", "finetune", "meta"])
def test_unusable_output_folders_are_refused_before_any_work(
    job: str, tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"run": RUN, "finetune": FINETUNE, "meta": META}[job]
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    before = listing(tmp_path)
    cases = {
        "''": "output_dir is empty",
        "/dev/null": r"output_dir='/dev/null' exists and is not a folder",
        str(a_file): "exists and is not a folder",
        f"{a_file}/run": f"cannot be created: '{a_file}' is not a folder",
    }
    for value, message in cases.items():
        for command in ("validate", job):
            argv = [command, str(config), f"output_dir={value}"]
            line = refuse(capsys, argv if command == "validate" else [*argv, "--quiet"])
            assert message in line, (command, value, line)
    assert listing(tmp_path) == before and a_file.read_text() == "keep me"


@pytest.mark.parametrize("job", ["run", "finetune", "meta"])
def test_an_empty_output_dir_writes_nothing_into_the_current_folder(
    job: str,
    tmp_path: Path,
    no_work: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = {"run": RUN, "finetune": FINETUNE, "meta": META}[job]
    monkeypatch.chdir(tmp_path)
    for value in ("", "''", "' '"):
        line = refuse(capsys, [job, str(config), f"output_dir={value}", "--quiet"])
        assert "output_dir" in line and ("is empty" in line or "got None" in line), line
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = refuse(capsys, ["validate", str(RUN), f"output_dir={folder / 'run'}"])
    finally:
        folder.chmod(0o755)
    assert "is not writable: cannot write in" in line and "Permission denied" in line


def test_an_unwritable_output_folder_is_refused_and_left_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a read-only folder (also when running as root): the write probe fails."""
    import tempfile

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError, match=r"is not writable: .*Read-only file system"):
        check_output_dir(str(tmp_path / "run"))
    assert listing(tmp_path) == []


def test_the_write_check_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert check_output_dir(str(tmp_path)) == tmp_path
    assert listing(tmp_path) == []  # no folder created, no probe file left


def test_odd_output_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="holds a null character"):
        check_output_dir("out/a\0b")
    with pytest.raises(ValueError, match="a name is longer than"):
        check_output_dir("out/" + "x" * 300)
    with pytest.raises(ValueError, match="must be a folder path, got 5"):
        check_output_dir(5)


def test_a_broken_link_as_output_folder_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="exists and is a broken link"):
        check_output_dir(str(link))


# -- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "", "mps", "cuda:x", "cpu:1"])
def test_unknown_devices_are_refused(
    device: str, no_work: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = f"output_dir={tmp_path / 'run'}"
    for argv in (
        ["validate", str(RUN), out, "--device", device],
        ["run", str(RUN), out, "--device", device, "--quiet"],
    ):
        assert f"--device={device!r}" in refuse(capsys, argv)
    assert listing(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(
    device: str, no_work: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = f"output_dir={tmp_path / 'run'}"
    for argv in (
        ["validate", str(RUN), out, "--device", device],
        ["run", str(RUN), out, "--device", device, "--quiet"],
    ):
        line = refuse(capsys, argv)
        assert f"--device={device!r}: CUDA is not available on this machine" in line


def test_a_cuda_index_the_machine_lacks_is_refused() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="cuda:99"):
        check_device("cuda:99")
    assert check_device("cpu") == torch.device("cpu")
    if count:
        assert check_device(f"cuda:{count - 1}").index == count - 1


# -- scenarios, backbones, optimisers: what validate checks as the jobs do ----------------------


@pytest.mark.parametrize(
    ("path", "override", "message"),
    [
        (RUN, "scenario.name=cifar", r"unknown scenario 'cifar'; expected one of \[.*"),
        (
            RUN,
            "scenario.setting=domain",
            r"'split-fashion' supports the settings \['task', 'class'",
        ),
        (
            RUN,
            "scenario.setting=sideways",
            r"scenario.setting: expected one of \[.task., .class., .domain.\]",
        ),
        (RUN, "scenario.options.colour=1", r"unknown option\(s\) \['colour'\]; valid: \["),
        (RUN, "scenario.options.experiences=3", "experiences=3 must divide the 10 classes"),
        (DOMAINS, "scenario.setting=task", r"'digit-domains' supports the settings \['domain'\]"),
        (DOMAINS, "scenario.options.domains=[mnist, svhn]", r"unknown: \['svhn'\]"),
        (CONFIGS / "wordnet_domains.yaml", "scenario.options.frozen_layers=9", "between 0 and 6"),
        (META, "data.scenario=omniglot", "unknown few-shot scenario 'omniglot'"),
        (META, "data.options.per_clas=3", r"unknown option\(s\) \['per_clas'\]"),
        (META, "data.options.fractions=[0.5,0.5]", "fractions=.* summing to 1"),
        (META, "backbone=cnn-fashion", "uses the backbone 'minilm', got backbone='cnn-fashion'"),
        (META, "optim.base=adam", r"optim.base must be one of \['adamw', 'lamb', 'sgd'\]"),
        (META, "optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
        (META, "optim.weight_decay=-1", "optim.weight_decay must be a finite number >= 0"),
        (FINETUNE, "backbone=bert", r"backbone='bert' is not a finetune backbone"),
        (FINETUNE, "data.scenario=wordnet-domains", "is not a finetune scenario"),
        (FINETUNE, "data.categories=[noun.act,noun.bogus]", r"unknown WordNet categories"),
        (FINETUNE, "data.categories=[noun.act]", "at least 2 distinct classes"),
    ],
)
def test_validate_refuses_what_the_job_refuses(
    path: Path,
    override: str,
    message: str,
    tmp_path: Path,
    no_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = load_config(path).job
    out = f"output_dir={tmp_path / 'out'}"
    checked = refuse(capsys, ["validate", str(path), override, out])
    assert re.search(message, checked), checked
    assert refuse(capsys, [job, str(path), override, out, "--quiet"]) == checked


def test_every_config_passes_the_preflight(tmp_path: Path) -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        check_config(load_config(path, [f"output_dir={tmp_path / path.stem}"]), device="cpu")
    assert listing(tmp_path) == []


def test_a_config_changed_in_python_is_checked_again(tmp_path: Path) -> None:
    config = load_config(RUN, [f"output_dir={tmp_path}"])
    config.train.lr = float("nan")  # dataclasses are mutable: the jobs check again
    with pytest.raises(ValueError, match=r"train.lr: expected a finite number, got nan"):
        check_config(config)


# -- routing rules the run enforces where it builds its routers ---------------------------------


class _Encoder(torch.nn.Module):
    default_targets = ("fc",)
    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (
            RUN,
            ["scenario.setting=class", "experts.routing={mode: task}"],
            r"experts.routing.mode=task routes each row by its task label, but this stream's",
        ),
        (
            RUN,
            ["experts.routing={mode: learned, supervision: 1}"],
            r"routing.supervision=1.0 teaches routing without task labels; this run has task ",
        ),
        (
            RUN,
            ["experts.replay_size=5", "experts.routing={mode: learned, balance_epochs: 2}"],
            "routing.balance_epochs=2 teaches routing without task labels; this run has task ",
        ),
        (
            RUN,
            ["experts.routing={mode: gaussian}"],
            r"experts.routing.mode=gaussian infers the task of rows without task labels, but ",
        ),
        (
            DOMAINS,
            ["experts.routing={mode: task}"],
            r"experts.routing.mode=task routes each row by its task label",
        ),
    ],
)
def test_routing_rules_are_checked_up_front_as_where_the_run_builds_routers(
    path: Path,
    overrides: list[str],
    message: str,
    tmp_path: Path,
    no_work: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("avalanche")
    from types import SimpleNamespace

    from moracl_scenarios.streams import Setting

    from moracl.continual.factory import build_model
    from moracl.continual.strategies import build_strategy

    out = f"output_dir={tmp_path / 'out'}"
    line = refuse(capsys, ["validate", str(path), *overrides, out])
    assert re.search(message, line), line
    assert refuse(capsys, ["run", str(path), *overrides, out, "--quiet"]) == line
    # the library functions the run builds with refuse it too (for Python users)
    config = load_config(path, [*overrides, out])
    setting = Setting(config.scenario.setting or ("domain" if path == DOMAINS else "task"))
    info = SimpleNamespace(setting=setting, experience_classes=((0, 1), (2, 3)))
    with pytest.raises(ValueError, match=message):
        model = build_model("moracl", config, _Encoder(), info)
        build_strategy("moracl", config, model, torch.device("cpu"))


def test_real_scenario_builders_refuse_what_their_specs_refuse() -> None:
    """The specs ``validate`` reads agree with the builders' own checks (which run before any
    data is read): every setting a spec leaves out, and bad option values."""
    import moracl_scenarios  # noqa: F401  (registers the streams)
    from moracl_scenarios.streams import SCENARIOS, SPECS, Setting, check_scenario

    assert {"split-fashion", "digit-domains", "wordnet-domains"} <= set(SPECS)
    for name, spec in SPECS.items():
        builder = SCENARIOS.get(name)
        for setting in set(Setting) - set(spec.settings):
            with pytest.raises(ValueError, match="setting") as direct:
                builder(setting=setting)
            with pytest.raises(ValueError, match="setting"):
                check_scenario(name, setting, {})
            assert setting.value in str(direct.value)
    bad = {
        "split-fashion": {"per_class": 0},
        "digit-domains": {"test_per_class": 10**6},
        "wordnet-domains": {"max_length": 1},
    }
    for name, options in bad.items():
        with pytest.raises(ValueError) as direct:
            SCENARIOS.get(name)(**options)
        with pytest.raises(ValueError) as checked:
            check_scenario(name, None, options)
        assert str(direct.value) == str(checked.value)


# -- the command itself -----------------------------------------------------------------------


def test_an_interrupt_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moracl.config

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(moracl.config, "load_config", interrupted)
    assert main(["validate", str(RUN)]) == 130
    assert capsys.readouterr().err == "moracl: interrupted\n"


def test_os_errors_name_the_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moracl.config

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/config.yaml")

    monkeypatch.setattr(moracl.config, "load_config", denied)
    line = refuse(capsys, ["validate", str(RUN)])
    assert line == "moracl: error: /x/config.yaml: Permission denied"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only user-input errors become one line: anything else is a bug and is not hidden."""
    import moracl.config

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(moracl.config, "load_config", bug)
    with pytest.raises(ZeroDivisionError):
        main(["validate", str(RUN)])


def test_a_missing_config_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        refuse(capsys, ["validate", "no/such.yaml"]) == "moracl: error: no config file no/such.yaml"
    )


# -- bench arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["adapters", "--steps", "-1"], "argument --steps: expected an integer >= 1, got -1"),
        (["experts", "--warmup", "-3"], "argument --warmup: expected an integer >= 0, got -3"),
        (["distributed", "--nproc", "0"], "argument --nproc: expected an integer >= 1, got 0"),
        (
            ["distributed", "--nproc", "2", "x"],
            "argument --nproc: expected an integer >= 1, got 'x'",
        ),
        (["meta", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
        (["optim", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["profile", "--rows", "-5"], "argument --rows: expected an integer >= 1, got -5"),
        (["continual", "--seeds", "-1"], "--seeds must be >= 0, got [-1]"),
        (["adapters", "--device", "bogus"], "argument --device: device='bogus' is not a device"),
    ],
)
def test_bench_arguments_out_of_range_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: moracl bench ") and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_a_gpu_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("adapters", "experts", "distributed", "meta", "optim", "profile"):
        with pytest.raises(SystemExit):
            main(["bench", name, "--device", "cuda"])
        assert "CUDA is not available on this machine" in capsys.readouterr().err
