"""Every snippet and command of the README works as written.

Each ```python block runs on its own, with only its own imports, in an empty folder (the
repository's ``configs/`` and ``examples/`` beside it). Each command of a ```bash block is
checked by what it is:

- ``moracl ...`` (also after ``torchrun ... -m``): parsed by the real argument parser; a
  command naming a config is validated with its overrides exactly as written (``moracl
  validate``); the cheap ones (help, version, validate, bench report) run as written. The
  slow tests run the jobs as written, with only overrides appended that shrink the data and
  the epochs (listed in :data:`SHRINK`).
- ``make TARGET``: the target exists (CI runs ``make test`` and ``make test-slow``).
- ``pip install -e ".[extra]"``: every extra is declared in ``pyproject.toml``.
- ``python -m module`` / ``python path``: the module imports, the file exists.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Block:
    section: str
    index: int  # n-th block of its kind in the README
    text: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{self.index:02d}-{slug}"


def _blocks(language: str) -> list[Block]:
    out: list[Block] = []
    section = ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.strip() == f"```{language}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append(Block(section, len(out), "\n".join(lines[i + 1 : j]) + "\n"))
            i = j
        i += 1
    return out


def _commands() -> list[tuple[str, list[str]]]:
    """``(section, argv)`` of every command line of every bash block (continuations joined,
    comments dropped)."""
    out = []
    for block in _blocks("bash"):
        joined = block.text.replace("\\\n", " ")
        for line in joined.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append((block.section, argv))
    return out


#: blocks that run a whole job: run by the slow tests
SLOW_PYTHON = {"Continual learning"}

PYTHON = _blocks("python")
COMMANDS = _commands()


def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _workdir(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block.text, f"README {block.id}", "exec"), namespace)


@pytest.mark.parametrize(
    "block", [b for b in PYTHON if b.section not in SLOW_PYTHON], ids=lambda b: b.id
)
def test_python_snippet_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run_block(block, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in PYTHON if b.section in SLOW_PYTHON], ids=lambda b: b.id
)
def test_python_job_snippet_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_block(block, tmp_path, monkeypatch)


def test_every_python_block_is_tested() -> None:
    assert len(PYTHON) >= 8
    assert {b.section for b in PYTHON} >= SLOW_PYTHON


def test_quick_start_saves_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = next(b for b in PYTHON if b.section == "Quick start")
    _run_block(block, tmp_path, monkeypatch)
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()


def test_readme_leads_with_the_two_commands() -> None:
    head = README.read_text().split("## Quick start")[0]
    assert "make demo" in head and "make test" in head


def test_meta_learning_snippet_learns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The few-shot snippet meta-trains on toy classes and adapts to a held-out 5-way task."""
    block = next(b for b in PYTHON if b.section == "Few-shot meta-learning")
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: None)
    ns: dict[str, object] = {}
    exec(compile(block.text, "README few-shot", "exec"), ns)
    learner, xq, yq = ns["learner"], ns["xq"], ns["yq"]
    accuracy = float((learner(xq).argmax(-1) == yq).float().mean())  # type: ignore[operator]
    assert accuracy > 0.6  # chance is 0.2


# -- commands ---------------------------------------------------------------------------------


def _moracl_argv(argv: list[str]) -> list[str] | None:
    """The arguments given to ``moracl`` by a command line, or ``None`` if it runs no moracl."""
    if argv[0] == "moracl":
        return argv[1:]
    if argv[0] == "torchrun" and "-m" in argv:
        at = argv.index("-m")
        if argv[at + 1] == "moracl":
            return argv[at + 2 :]
    if argv[:3] == ["python", "-m", "moracl"]:
        return argv[3:]
    return None


MORACL = [(s, a, m) for s, a in COMMANDS if (m := _moracl_argv(a)) is not None]
OTHER = [(s, a) for s, a in COMMANDS if _moracl_argv(a) is None]
JOBS = {"run", "finetune", "meta", "sweep"}


def test_every_command_is_known() -> None:
    known = {"make", "pip", "python", "moracl", "torchrun"}
    unknown = [a for _, a in COMMANDS if a[0] not in known]
    assert not unknown, f"README commands this test does not check: {unknown}"


@pytest.mark.parametrize("argv", [a for _, a in OTHER], ids=lambda a: " ".join(a)[:60])
def test_other_command(argv: list[str]) -> None:
    if argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in argv[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    elif argv[0] == "pip":
        pyproject = (ROOT / "pyproject.toml").read_text()
        section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        extras = set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))
        spec = argv[-1]
        match = re.fullmatch(r"\.(?:\[(.*)\])?", spec)
        assert match is not None, spec
        for extra in filter(None, (match.group(1) or "").split(",")):
            assert extra in extras, f"pip extra {extra!r} is not in pyproject.toml"
    elif argv[:2] == ["python", "-m"]:
        found = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; print(u.find_spec({argv[2]!r}))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert found.stdout.strip() != "None", argv
    elif argv[0] == "python":
        assert (ROOT / argv[1]).is_file(), argv
    else:
        pytest.fail(f"unchecked command {argv}")


def _cli(args: list[str]) -> tuple[int, str]:
    from moracl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: --help, --version, bad arguments
            code = int(e.code or 0)
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("argv", [m for _, _, m in MORACL], ids=lambda a: " ".join(a)[:60])
def test_moracl_command_parses_and_validates(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed as written; a job's config validates with its overrides as written."""
    from moracl.cli import build_parser

    _workdir(tmp_path, monkeypatch)
    if argv in (["--help"], ["--version"]):  # these exit: run by test_cheap_moracl_command_runs
        return
    args = build_parser().parse_args(argv)
    if argv[0] in JOBS and getattr(args, "config", None) and not getattr(args, "resume", None):
        overrides = list(getattr(args, "overrides", []) or [])
        for key_values in getattr(args, "grid", None) or []:  # sweep: each value of the grid
            key, values = key_values.split("=", 1)
            overrides.append(f"{key}={values.split(',')[0]}")
        code, text = _cli(["validate", args.config, *overrides, *getattr(args, "sets", [])])
        assert code == 0, text


CHEAP = ("--help", "--version", "validate", "bench report")


@pytest.mark.parametrize(
    "argv",
    [m for _, _, m in MORACL if any(" ".join(m).startswith(c) for c in CHEAP)],
    ids=lambda a: " ".join(a)[:60],
)
def test_cheap_moracl_command_runs(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # bench report --check reads moracl/bench/
    code, text = _cli(argv)
    assert code == 0, text
    assert text.strip()


def test_readme_links_stay_inside_the_repository() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if "://" in target:
            continue
        assert (ROOT / target).resolve().is_relative_to(ROOT), target
        assert (ROOT / target).exists(), target
    assert "../shared" not in README.read_text()


def test_block_ids_are_unique() -> None:
    ids = [b.id for b in PYTHON]
    assert len(ids) == len(set(ids))


# -- the jobs, run as written (slow) ----------------------------------------------------------

#: overrides appended to a README command naming this config: less data, fewer epochs and
#: steps; nothing else changes
SHRINK = {
    "configs/wordnet_domains.yaml": [
        "train.epochs=1",
        "scenario.options.per_class=16",
        "scenario.options.test_per_class=8",
    ],
    "configs/wordnet_domains_class.yaml": [
        "train.epochs=1",
        "scenario.options.per_class=16",
        "scenario.options.test_per_class=8",
        "experts.balance_head_epochs=1",
    ],
    "configs/split_fashion.yaml": [
        "train.epochs=1",
        "scenario.options.per_class=24",
        "scenario.options.test_per_class=8",
    ],
    "configs/own_data_csv.yaml": ["train.epochs=1", "scenario.options.max_per_class=10"],
    "configs/wordnet_finetune.yaml": [
        "train.epochs=1",
        "data.per_class=12",
        "data.test_per_class=6",
    ],
    "configs/wordnet_fewshot.yaml": [
        "meta.steps=2",
        "meta.val_every=1",
        "meta.val_episodes=2",
        "meta.meta_batch=2",
        "test.episodes=4",
        "data.options.per_class=40",
    ],
    "configs/digits_fewshot.yaml": [
        "meta.steps=2",
        "meta.val_every=1",
        "meta.val_episodes=2",
        "meta.meta_batch=2",
        "test.episodes=4",
    ],
}

#: commands that need what the machine may lack
NEEDS_CUDA = ("--device cuda", "bench distributed")


def _shrunk(argv: list[str]) -> list[str]:
    config = next((a for a in argv if a in SHRINK), None)
    if config is None:
        return argv
    extra = SHRINK[config]
    if argv[0] == "sweep":
        return [*argv, "--set", *extra]
    return [*argv, *extra]


def _runnable(argv: list[str]) -> bool:
    import torch

    line = " ".join(argv)
    return torch.cuda.is_available() or not any(n in line for n in NEEDS_CUDA)


JOB_COMMANDS = [
    (argv, args)
    for _, argv, args in MORACL
    if args[0] not in ("--help", "--version", "validate") and args[:2] != ["bench", "report"]
]  # the cheap ones run in test_cheap_moracl_command_runs


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every job command, so a resume or a report finds the run it names."""
    folder = tmp_path_factory.mktemp("readme_jobs")
    for name in ("configs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("argv,args", JOB_COMMANDS, ids=[" ".join(a)[:70] for a, _ in JOB_COMMANDS])
def test_readme_job_runs_as_written(argv: list[str], args: list[str], job_folder: Path) -> None:
    """Every moracl job command of the README, in the README's order (a resume and a report
    follow the run they name), in one folder, each with :data:`SHRINK`'s overrides appended;
    torchrun's gloo launches run with two processes."""
    if not _runnable(args):
        pytest.skip("needs CUDA")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    prefix = [sys.executable, "-m", "moracl"]
    if argv[0] == "torchrun":
        at = argv.index("-m")
        prefix = [sys.executable, "-m", "torch.distributed.run", *argv[1:at], "-m", "moracl"]
    done = subprocess.run(
        [*prefix, *_shrunk(args), *(["--quiet"] if args[0] in JOBS else [])],
        cwd=job_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


def test_the_jobs_are_found() -> None:
    assert len(JOB_COMMANDS) >= 10
