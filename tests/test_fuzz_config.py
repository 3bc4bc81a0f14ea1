"""Fuzzing the ``moracl`` command with configs and arguments: nothing escapes ``main`` but a
``moracl: error:`` line (or argparse's usage) with exit status 2, and ``moracl validate``
accepts exactly the configs each job accepts.

The jobs do not train here. Each runs for real through its own checks and its cheap setup
and is stopped at the first step that would read real data or build a real model:

- ``run`` on a synthetic stream (registered for the test with a :class:`ScenarioSpec`, like
  the real ones) and a tiny encoder, stopped at the first evaluation, after every
  strategy's model and Avalanche strategy is built;
- ``finetune`` over a synthetic gloss table, stopped where it would load MiniLM (after its
  scenario, category and backbone checks);
- ``meta`` stopped where the few-shot builder would read its data (after the builder's own
  option checks).

What only the data or the model can tell (enough examples for the sizes asked for,
``target_modules`` naming layers, a rank that fits them) stays with the jobs and is left out
of the drawn values. Hypothesis runs derandomized with few examples, so the verdict does not
depend on the machine or the run.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from moracl.cli import main

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Reached(Exception):
    """Raised where a job would start reading real data or building a real model: the job
    accepted its config."""


@dataclass
class Outcome:
    """What one ``moracl`` command did: its exit status (``None``: reached the stub), its
    stderr, and whether it reached the stub."""

    code: int | None
    err: str

    @property
    def accepted(self) -> bool:
        return self.code in (0, None)


def call(argv: Sequence[str]) -> Outcome:
    """``main(argv)`` with stderr captured; exceptions other than ``Reached`` and
    ``SystemExit`` propagate and fail the test (a traceback would reach the user)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | None = main(list(argv))
        except Reached:
            code = None
        except SystemExit as e:  # argparse: usage and error, status 2
            code = e.code if isinstance(e.code, int) else 1
            assert code == 2 and "error:" in err.getvalue(), err.getvalue()
            return Outcome(code, err.getvalue())
    text = err.getvalue()
    assert code in (0, 2, None), (code, text)
    if code == 2:  # one line, naming the problem (after any note on dropped keys)
        lines = [
            line
            for line in text.splitlines()
            if line.strip() and not line.startswith("moracl: note: ")
        ]
        assert len(lines) == 1 and lines[0].startswith("moracl: error: "), text
        assert "Traceback" not in text
    return Outcome(code, text)


def agree(job: str, config: Path, overrides: list[str], extra: Sequence[str] = ()) -> None:
    """``moracl validate`` and ``moracl JOB`` accept or refuse ``config`` + ``overrides``
    alike, and when both refuse, with the same message."""
    checked = call(["validate", str(config), *overrides, *extra])
    ran = call([job, str(config), *overrides, *extra, "--quiet"])
    assert checked.accepted == ran.accepted, (overrides, extra, checked.err, ran.err)
    event("accepted" if ran.accepted else "refused")
    if not checked.accepted:
        assert checked.err == ran.err


@contextlib.contextmanager
def fresh_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="moracl-fuzz-") as tmp:
        yield Path(tmp)


# -- values, as a user would type them after key= ---------------------------------------------

POSITIVE = ["1e-3", "1e-1", "1E5", ".5e1", "0.5", "2"]  # YAML 1.2 spellings included
NONNEGATIVE = [*POSITIVE, "0"]
NOT_FINITE = ["nan", ".nan", "inf", ".inf", "-.inf", "1e400"]
NOT_NUMBERS = ["'0.1'", "abc", "[1]", "{a: 1}", "", "true", "[", "!!python/name:os.system"]
NEGATIVE = ["-1", "-2e3"]
GOOD_INTS = ["1", "2", "3"]
BAD_INTS = ["0", "-1", "1.5", "1e2", "99999999999999999999", "true", "x", "[2]", ""]
BOOLS = ["true", "false", "yes"]
BAD_BOOLS = ["1", "maybe", ""]


def values(good: Sequence[str], bad: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """A value a user might type: three times in four one of ``good`` (accepted alone), else
    one of ``bad`` (refused)."""
    if not bad:
        return st.sampled_from(list(good))
    return st.one_of(*[st.sampled_from(list(good))] * 3, st.sampled_from(list(bad)))


def numbers(good: Sequence[str], *bad: Sequence[str]) -> st.SearchStrategy[str]:
    """:func:`values` with the refused values from several pools."""
    return values(good, [v for pool in bad for v in pool])


def overrides(table: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[list[str]]:
    """Lists of up to three ``key=value`` overrides drawn from ``table``, and now and then a
    malformed one."""
    one = st.sampled_from(sorted(table)).flatmap(lambda k: table[k].map(lambda v: f"{k}={v}"))
    bad = st.sampled_from(["noequals", "=1", "train..lr=1", ".x=1", "bogus.key=1", "train=5"])
    return st.lists(st.one_of(*[one] * 8, bad), max_size=3)


# -- run ----------------------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """A frozen ``16 -> 16`` layer: the encoder of the synthetic stream."""

    default_targets = ("fc",)
    feature_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def _check_size(options: Any) -> None:
    size = options.get("size", 4)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 16:
        raise ValueError(f"scenario 'fuzz-stream': size={size!r} must be an integer in 1..16")


def fuzz_stream(*, setting: Any = None, seed: int = 0, **options: Any) -> Any:
    """Two experiences of 16-feature Gaussian rows, in any setting."""
    from moracl_scenarios.streams import (
        Setting,
        Stream,
        StreamInfo,
        check_options,
        tensor_benchmark,
    )

    check_options("fuzz-stream", options, ("size",))
    _check_size(options)
    setting = Setting(setting or "task")
    size = options.get("size", 4)
    classes = ((0, 1), (0, 1)) if setting is Setting.DOMAIN else ((0, 1), (2, 3))
    g = torch.Generator().manual_seed(seed)

    def part(cs: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor([c for c in cs for _ in range(size)])
        return torch.randn(len(y), 16, generator=g) + y[:, None].float(), y

    train, test = [part(cs) for cs in classes], [part(cs) for cs in classes]
    bench = tensor_benchmark(train, test, task_labels=[0, 1] if setting is Setting.TASK else None)
    info = StreamInfo(
        name="fuzz-stream",
        setting=setting,
        modality="image",
        backbone="fuzz-tiny",
        class_names=("a", "b", "c", "d"),
        experience_classes=classes,
        experience_names=("first", "second"),
        source="synthetic",
        licence="none",
    )
    return Stream(bench, info)


@pytest.fixture
def fuzz_scenario(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The synthetic stream and its encoder registered, and the run stopped at its first
    evaluation (every strategy built by then)."""
    pytest.importorskip("avalanche")
    from moracl_scenarios.streams import ENCODERS, SCENARIOS, SPECS, ScenarioSpec, Setting

    import moracl.continual.run as run

    spec = ScenarioSpec((Setting.TASK, Setting.CLASS, Setting.DOMAIN), ("size",), _check_size)
    monkeypatch.setitem(SPECS, "fuzz-stream", spec)

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise Reached

    monkeypatch.setattr(run, "evaluate", stop)
    with (
        SCENARIOS.temporarily("fuzz-stream", fuzz_stream),
        ENCODERS.temporarily("fuzz-tiny", lambda info: TinyEncoder()),
    ):
        yield


RUN_CONFIG = """\
job: run
scenario: {name: fuzz-stream, options: {size: 3}}
adapter: {kind: lora, rank: 2, alpha: 4.0}
experts: {per_experience: 1}
strategies: [moracl, naive, ewc, lwf, replay, joint]
baselines: {replay_size: 4}
train: {epochs: 1, batch_size: 4, eval_batch_size: 8}
output_dir: OUT
"""

RUN_KEYS: dict[str, st.SearchStrategy[str]] = {
    "train.lr": numbers(POSITIVE, NOT_FINITE, NOT_NUMBERS, NEGATIVE, ["0"]),
    "train.head_lr": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "train.weight_decay": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "train.epochs": values(GOOD_INTS, BAD_INTS),
    "train.batch_size": values(GOOD_INTS, BAD_INTS),
    "train.seed": values(["0", "7", "4294967295"], ["-1", "4294967296", "x"]),
    "train.on_nonfinite": values(["stop", "skip"], ["ignore", ""]),
    "adapter.kind": values(["lora", "dora", "vera", "mora"], ["ia3"]),
    "adapter.rank": values(["1", "2", "4"], ["0", "-1", "x", "1.5"]),  # (fits the 16x16 layer)
    "adapter.alpha": numbers(POSITIVE, NOT_FINITE, NEGATIVE, ["0"]),
    "adapter.dropout": numbers(["0", "1e-1", "0.5"], ["1", "-1e-1"], NOT_FINITE),
    "experts.per_experience": values(["1", "2"], ["0", "-1", "x"]),
    "experts.rank": values(["0", "1", "2"], ["-1"]),
    "experts.routing": values(
        [
            "{mode: auto}",
            "{mode: auto, without_task_labels: gaussian, shrinkage: 0.5}",
            "{mode: task, reuse_old: false}",
            "{mode: learned, k: 1, per: sample}",
            "{mode: learned, supervision: 1.0, teacher_forcing: true}",
            "{mode: gaussian, shrinkage: 1e-1}",
        ],
        ["{mode: magic}", "{mode: auto, k: 2}", "{mode: learned, k: 0}", "[learned]"],
    ),
    "experts.routing.mode": values(["auto", "task", "learned", "gaussian"], ["magic", "topk"]),
    "experts.routing.k": values(["1", "2"], ["100", "0", "-1"]),
    "experts.routing.per": values(["token", "sample"], ["row"]),
    "experts.routing.without_task_labels": values(["learned", "gaussian"], ["lda", "router"]),
    "experts.routing.supervision": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "experts.routing.teacher_forcing": values(BOOLS, BAD_BOOLS),
    "experts.routing.balance_epochs": values(["0", "1"], ["-1"]),
    "experts.routing.shrinkage": numbers(["0", "0.5", "1", "1e-1"], NOT_FINITE, ["2"]),
    "experts.routing.reuse_old": values(BOOLS, BAD_BOOLS),
    "experts.k": st.just("1"),  # a key of earlier versions (refused: moved under routing)
    "experts.replay_size": values(["0", "4"], ["-1"]),
    "experts.balance_head_epochs": values(["0", "1"], ["-1"]),
    "experts.balance_head_lr": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "baselines.ewc_lambda": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "baselines.lwf_alpha": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "baselines.lwf_temperature": numbers(POSITIVE, NOT_FINITE, ["0"], NEGATIVE),
    "baselines.replay_size": values(GOOD_INTS, BAD_INTS),
    "scenario.setting": values(["task", "class", "domain", "null"], ["sideways"]),
    "scenario.name": values(["fuzz-stream"], ["cifar", ""]),
    "scenario.options.size": values(["1", "2", "16"], ["0", "17", "x"]),
    "scenario.options.colour": values(["1"]),
    "strategies": values(
        ["[moracl]", "[naive, ewc]", "[moracl, lwf, replay]"], ["[moracl, moracl]", "[icarl]", "[]"]
    ),
    "distributed.bucket_mb": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "output_dir": values(["''", "/dev/null", "null", "[a]"]),
}


@pytest.mark.slow
@SETTINGS
@given(changes=overrides(RUN_KEYS), device=st.sampled_from([None, "cpu", "cuda", "bogus"]))
def test_validate_accepts_what_moracl_run_accepts(
    fuzz_scenario: None, changes: list[str], device: str | None
) -> None:
    with fresh_dir() as tmp:
        config = tmp / "run.yaml"
        config.write_text(RUN_CONFIG.replace("OUT", str(tmp / "out")))
        agree("run", config, changes, () if device is None else ("--device", device))


# -- finetune -----------------------------------------------------------------------------------


@pytest.fixture
def fake_glosses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A synthetic gloss table (40 distinct texts per category) in place of WordNet, and the
    job stopped where it would load MiniLM."""
    pytest.importorskip("datasets")
    import moracl_scenarios.wordnet as wordnet
    from datasets import Dataset

    import moracl.backbones

    rows = [(lex, i) for i, lex in enumerate(wordnet.LEXNAMES) for _ in range(40)]
    table = Dataset.from_dict(
        {
            "text": [f"gloss {k} of {lex}" for k, (lex, _) in enumerate(rows)],
            "label": [label for _, label in rows],
            "lexname": [lex for lex, _ in rows],
            "pos": ["noun"] * len(rows),
            "offset": list(range(len(rows))),
        },
        features=wordnet._FEATURES,
    )
    monkeypatch.setattr(wordnet, "load_wordnet_glosses", lambda *a, **k: table)

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise Reached

    monkeypatch.setattr(moracl.backbones, "load_minilm", stop)


FINETUNE_CONFIG = """\
job: finetune
backbone: minilm
adapter: {kind: mora, rank: 8}
data:
  scenario: wordnet-categories
  categories: [noun.act, noun.attribute, noun.cognition]
  per_class: 10
  test_per_class: 5
train: {epochs: 1, batch_size: 8}
output_dir: OUT
"""

FINETUNE_KEYS: dict[str, st.SearchStrategy[str]] = {
    "train.lr": numbers(POSITIVE, NOT_FINITE, NOT_NUMBERS, ["0"]),
    "train.head_lr": numbers(POSITIVE, NOT_FINITE, NEGATIVE),
    "train.weight_decay": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "train.epochs": values(GOOD_INTS, BAD_INTS),
    "train.max_length": values(GOOD_INTS, BAD_INTS),
    "train.seed": values(["0", "5"], ["-1", "x"]),
    "train.on_nonfinite": values(["stop", "skip"], ["never"]),
    "adapter.kind": values(["lora", "mora", "dora", "vera"], ["ia3"]),
    "adapter.rank": values(["1", "4"], ["0", "-2", "x"]),
    "adapter.dropout": numbers(["0", "1e-1"], ["1"], NOT_FINITE, NOT_NUMBERS),
    "adapter.alpha": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "adapter.compression": values(["sharing", "rotation", "truncation"], ["zip"]),
    "data.scenario": values(["wordnet-categories"], ["wordnet-domains", ""]),
    "data.categories": values(
        ["[noun.act, noun.plant]", "[verb.motion, adj.all, noun.food]"],
        ["[noun.act]", "[noun.act, noun.act]", "[noun.bogus, verb.motion]", "noun.act"],
    ),
    "data.per_class": values(["2", "20"], ["0", "-1", "x", "1.5", "1"]),  # 1: no validation row
    "data.test_per_class": values(["1", "20"], ["0", "x"]),
    "data.val_share": numbers(["0", "0.1", "0.5", "1e-1"], ["1", "-0.1"], NOT_FINITE, NOT_NUMBERS),
    "train.early_stopping": values(
        ["null", "{patience: 2}", "{patience: 1, metric: val_acc, min_delta: 0.01}"],
        ["{patience: 0}", "{metric: loss}", "{min_delta: -1}", "{patiense: 2}", "5"],
    ),
    "backbone": values(["minilm"], ["bert", "cnn-fashion"]),
    "output_dir": values(["''", "/dev/null", "null"]),
    "distributed.backend": values(["auto", "gloo"], ["mpi"]),
}


@SETTINGS
@given(changes=overrides(FINETUNE_KEYS))
def test_validate_accepts_what_moracl_finetune_accepts(
    fake_glosses: None, changes: list[str]
) -> None:
    with fresh_dir() as tmp:
        config = tmp / "finetune.yaml"
        config.write_text(FINETUNE_CONFIG.replace("OUT", str(tmp / "out")))
        agree("finetune", config, changes)


# -- meta -----------------------------------------------------------------------------------


@pytest.fixture
def no_fewshot_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both few-shot builders stopped where they would read their data."""
    import moracl_scenarios.fewshot as fewshot
    import moracl_scenarios.pretrain as pretrain

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise Reached

    monkeypatch.setattr(fewshot, "_wordnet_rows", stop)
    monkeypatch.setattr(pretrain, "pretrained_cnn", stop)


META_CONFIG = """\
job: meta
backbone: minilm
adapter: {kind: lora, rank: 4}
data: {scenario: wordnet-fewshot, ways: 5, shots: 1, queries: 2, options: {per_class: 30}}
meta: {inner_lr: 0.3, inner_steps: 1, meta_batch: 2, steps: 2, val_every: 1, val_episodes: 4}
test: {episodes: 4, batch: 2, finetune_steps: 1}
output_dir: OUT
"""

META_KEYS: dict[str, st.SearchStrategy[str]] = {
    "meta.inner_lr": numbers(POSITIVE, NOT_FINITE, NOT_NUMBERS, ["0"]),
    "meta.algorithm": values(["maml", "fomaml", "metasgd", "anil"], ["reptile", ""]),
    "meta.inner_steps": values(["0", *GOOD_INTS], BAD_INTS[1:]),
    "meta.meta_batch": values(GOOD_INTS, BAD_INTS),
    "meta.chunk_size": values(["null", *GOOD_INTS], BAD_INTS),
    "meta.val_episodes": values(["2", "10"], ["1", "x"]),
    "meta.zero_head": values(BOOLS, BAD_BOOLS),
    "meta.on_nonfinite": values(["stop", "skip"], ["halt"]),
    "optim.base": values(["adamw", "sgd", "lamb"], ["adam", ""]),
    "optim.lr": numbers(POSITIVE, NOT_FINITE, ["0"], NEGATIVE),
    "optim.weight_decay": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "optim.loraplus_ratio": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "optim.sam_rho": numbers(NONNEGATIVE, NOT_FINITE, NEGATIVE),
    "optim.lars": values(BOOLS, BAD_BOOLS),
    "test.episodes": values(["2", "5"], ["1", "x"]),
    "test.finetune_lr": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "test.seed": values(["0", "2024"], ["-1", "4294967296"]),
    "data.ways": values(["2", "5"], ["1", "x"]),
    "data.shots": values(GOOD_INTS, BAD_INTS),
    "data.scenario": values(["wordnet-fewshot", "digits-fewshot"], ["omniglot"]),
    "data.options": values(["{}"], ["[1]", "{1: 2}"]),
    "data.options.per_class": values(["20", "100"], BAD_INTS),
    "data.options.max_length": values(["2", "32", "512"], ["513", "1", "x"]),
    "data.options.fractions": values(
        ["[0.6, 0.2, 0.2]", "[1, 0, 0]"], ["[0.5, 0.5]", "x", "[.nan, 0, 1]", "[2, -1, 0]"]
    ),
    "data.options.val_fraction": numbers(["0.1", "5e-1"], ["0", "1"], NOT_FINITE, NOT_NUMBERS),
    "data.options.train_classes": values(["[0, 1, 2]", "[9]"], ["[]", "[1, 1]", "[10]", "3"]),
    "data.options.bogus": values(["1"]),
    "backbone": values(["minilm", "cnn-fashion"], ["toy"]),
    "seed": values(["0", "3"], ["-1", "x"]),
    "adapter.rank": values(["1", "8"], ["0", "x"]),
    "adapter.alpha": numbers(POSITIVE, NOT_FINITE, ["0"]),
    "output_dir": values(["''", "/dev/null"]),
}


@SETTINGS
@given(changes=overrides(META_KEYS))
def test_validate_accepts_what_moracl_meta_accepts(
    no_fewshot_data: None, changes: list[str]
) -> None:
    with fresh_dir() as tmp:
        config = tmp / "meta.yaml"
        config.write_text(META_CONFIG.replace("OUT", str(tmp / "out")))
        agree("meta", config, changes)


def test_the_fuzzed_base_configs_are_accepted_by_validate_and_every_job(
    fuzz_scenario: None, fake_glosses: None, no_fewshot_data: None
) -> None:
    """The configs the fuzz tests vary are valid as they are: the agreement above cannot be
    met by a validation that refuses everything."""
    cases = [("run", RUN_CONFIG), ("finetune", FINETUNE_CONFIG), ("meta", META_CONFIG)]
    for job, text in cases:
        with fresh_dir() as tmp:
            config = tmp / f"{job}.yaml"
            config.write_text(text.replace("OUT", str(tmp / "out")))
            checked = call(["validate", str(config)])
            ran = call([job, str(config), "--quiet"])
            assert checked.accepted and ran.accepted, (job, checked.err, ran.err)


# -- config files themselves ------------------------------------------------------------------

TEXTS = st.sampled_from(
    [
        "job: [run]\n",
        "job: 5\n",
        "job: finetun\n",
        "- a\n- b\n",
        "job: finetune\njob: meta\n",
        "job: finetune\ntrain: {lr: 1e-3, lr: 2e-3}\n",
        "job: meta\ndata: {options: {1: 2}}\n",
        "job: finetune\n\tbad: tab\n",
        "job: finetune\nadapter: {kind: lora, 3: 4}\n",
        "job: finetune\nadapter: [lora]\n",
        "job: run\nexperts: {k: !!float 2}\n",
        "job: run\nscenario: null\n",
        "job: finetune\ntarget_modules: query\n",
        "job: meta\nadapter: {mixture: true, kind: lora, router: [1]}\n",
        "job: run\nadapter: !!python/object/apply:os.system [echo]\n",
        "[" * 200,
        "",
        "\x00",
        "a: &x [*x]\n",
    ]
)


@SETTINGS
@given(text=TEXTS, job=st.sampled_from(["validate", "run", "finetune", "meta"]))
def test_malformed_config_files_end_in_one_line(text: str, job: str) -> None:
    with fresh_dir() as tmp:
        config = tmp / "bad.yaml"
        config.write_text(text)
        argv = [job, str(config), f"output_dir={tmp / 'out'}"]
        outcome = call(argv if job == "validate" else [*argv, "--quiet"])
        assert outcome.code == 2, outcome


# -- report -----------------------------------------------------------------------------------

RUN_DIRS = st.sampled_from(["missing", "file", "empty", "garbage", "object", "list", "nan"])


@SETTINGS
@given(kind=RUN_DIRS)
def test_report_of_a_bad_run_folder_ends_in_one_line(kind: str) -> None:
    with fresh_dir() as tmp:
        target = tmp / "run"
        contents = {
            "garbage": "not json",
            "object": "{}",
            "list": "[1, 2]",
            "nan": '{"scenario": NaN}',
        }
        if kind == "file":
            target.write_text("x")
        elif kind != "missing":
            target.mkdir()
            if kind in contents:
                (target / "metrics.json").write_text(contents[kind])
        outcome = call(["report", str(target)])
        assert outcome.code == 2, outcome


# -- bench arguments --------------------------------------------------------------------------

NUMBERS = ["-1", "0", "1", "2", "x", "1.5", "", "99999999999"]
BENCH_OPTIONS: dict[str, dict[str, list[str]]] = {
    "adapters": {"--steps": NUMBERS, "--warmup": NUMBERS, "--rank": NUMBERS},
    "experts": {"--steps": NUMBERS, "--rank": NUMBERS, "--kernels-ab": NUMBERS},
    "distributed": {"--nproc": NUMBERS, "--steps": NUMBERS, "--warmup": NUMBERS},
    "meta": {"--steps": NUMBERS, "--repeats": NUMBERS, "--chunk-size": NUMBERS},
    "optim": {"--steps": NUMBERS, "--repeats": NUMBERS, "--threads": NUMBERS},
    "profile": {"--rank": NUMBERS, "--rows": NUMBERS},
    "continual": {"--threads": NUMBERS, "--repeats": NUMBERS, "--seeds": NUMBERS},
}
DEVICES = ["cpu", "cuda", "cuda:7", "bogus", ""]


@st.composite
def bench_argv(draw: st.DrawFn) -> tuple[str, list[str]]:
    name = draw(st.sampled_from(sorted(BENCH_OPTIONS)))
    options = BENCH_OPTIONS[name]
    argv: list[str] = []
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=2, unique=True)):
        argv += [option, draw(st.sampled_from(options[option]))]
    if name not in ("continual", "optim") and draw(st.booleans()):
        argv += ["--device", draw(st.sampled_from(DEVICES))]
    return name, argv


def _in_range(option: str, value: str) -> bool:
    try:
        number = int(value)
    except ValueError:
        return False
    return number >= (0 if option in ("--warmup", "--kernels-ab", "--seeds") else 1)


@SETTINGS
@given(drawn=bench_argv())
def test_bench_arguments_are_refused_by_argparse_or_parsed(drawn: tuple[str, list[str]]) -> None:
    """Every bench parses its options before any work: an out-of-range number or a device
    this machine lacks is argparse's error naming the option (status 2), through
    ``moracl bench`` too."""
    import importlib

    from moracl.cli import BENCHES

    name, argv = drawn
    module = importlib.import_module(BENCHES[name])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            module.parse_args(argv)
            refused = False
        except SystemExit as e:
            assert e.code == 2
            refused = True
    pairs = dict(zip(argv[::2], argv[1::2]))
    device = pairs.pop("--device", "cpu")
    if device == "cpu" or not torch.cuda.is_available():  # (GPU counts are the machine's)
        expected = all(_in_range(k, v) for k, v in pairs.items()) and device == "cpu"
        assert refused == (not expected), (name, argv, err.getvalue())
    if refused:
        message = err.getvalue().strip().splitlines()[-1]
        assert f"moracl bench {name}: error: " in message, message
        assert call(["bench", name, *argv]).code == 2  # the same through moracl bench
