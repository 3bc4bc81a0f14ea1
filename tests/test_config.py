"""Typed configs, YAML files, overrides and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moracl.cli import main
from moracl.config import (
    FinetuneConfig,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    parse_yaml,
    to_dict,
)
from moracl.continual.config import BaselinesConfig, ContinualTrainConfig
from moracl.guard import OnNonFinite

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_round_trips(path: Path) -> None:
    config = load_config(path)
    again = from_dict(type(config), yaml.safe_load(yaml.safe_dump(to_dict(config))))
    assert again == config


def test_overrides_are_typed() -> None:
    path = next(p for p in CONFIGS if p.name == "wordnet_finetune.yaml")
    config = load_config(path, ["train.lr=1e-4", "adapter.rank=4", "adapter.compression=rotation"])
    assert isinstance(config, FinetuneConfig)
    assert config.train.lr == 1e-4 and config.adapter.rank == 4
    assert config.adapter.compression.value == "rotation"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_unknown_keys_list_the_valid_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: finetune\ntrain: {epochs: 2, learning_rate: 0.1}\n")
    with pytest.raises(
        ValueError, match=r"train: unknown key\(s\) \['learning_rate'\]; valid keys: .*'lr'"
    ):
        load_config(bad)
    bad.write_text("job: finetune\nadapter: {kind: mora, rnk: 2}\n")
    with pytest.raises(ValueError, match=r"adapter: unknown key\(s\) \['rnk'\].*'rank'"):
        load_config(bad)
    bad.write_text("job: finetun\n")
    expected = r"unknown job 'finetun'; expected one of \[.*'finetune'.*'run'"
    with pytest.raises(ValueError, match=expected):
        load_config(bad)


def test_wrong_types_and_values_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: finetune\ntrain: {epochs: many}\n")
    with pytest.raises(ValueError, match="train.epochs: expected an integer, got 'many'"):
        load_config(bad)
    bad.write_text("job: finetune\ntrain: {epochs: 0}\n")
    with pytest.raises(ValueError, match=r"train.epochs must be > 0, got 0"):
        load_config(bad)


def test_cli_validate_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    finetune = next(p for p in CONFIGS if p.name == "wordnet_finetune.yaml")
    assert main(["validate", str(finetune), "train.epochs=1", "--show"]) == 0
    out = capsys.readouterr().out
    assert "valid FinetuneConfig" in out and "epochs: 1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: finetune\nbogus: 1\n")
    assert main(["validate", str(bad)]) == 2
    assert "unknown key(s) ['bogus']" in capsys.readouterr().err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "validate" in capsys.readouterr().out


# -- YAML 1.2 numbers, finite values, ranges ---------------------------------------------------

FINETUNE = next(p for p in CONFIGS if p.name == "wordnet_finetune.yaml")
RUN = next(p for p in CONFIGS if p.name == "wordnet_domains.yaml")
META = next(p for p in CONFIGS if p.name == "wordnet_fewshot.yaml")


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-1", 0.1), ("1E5", 1e5), ("-2e3", -2000.0), (".5e1", 5.0), ("-.5", -0.5), ("1.0e5", 1e5)],
)
def test_yaml_1_1_number_spellings_are_read_as_numbers(text: str, value: float) -> None:
    assert yaml.safe_load(f"x: {text}")["x"] != value  # what plain PyYAML does: a string
    parsed = parse_yaml(f"x: {text}", "test")["x"]
    assert isinstance(parsed, float) and parsed == value
    assert parse_yaml(f"x: '{text}'", "test")["x"] == text  # quoted: still a string
    assert parse_yaml(dump_yaml({"x": text}), "test") == {"x": text}  # dumped quoted


def test_overrides_and_files_read_exponents_as_numbers(tmp_path: Path) -> None:
    config = load_config(FINETUNE, ["adapter.dropout=1e-1", "train.lr=2E-3", "adapter.rank=4"])
    assert config.adapter.dropout == 0.1 and config.train.lr == 2e-3
    path = tmp_path / "lora.yaml"
    path.write_text("job: finetune\nadapter: {kind: lora, alpha: 1e1, dropout: .5e-1}\n")
    lora = load_config(path)
    assert lora.adapter.alpha == 10.0 and isinstance(lora.adapter.alpha, float)
    assert lora.adapter.dropout == 0.05


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (FINETUNE, "train.lr"),
        (FINETUNE, "train.head_lr"),
        (RUN, "train.lr"),
        (RUN, "train.head_lr"),
        (RUN, "experts.balance_head_lr"),
        (RUN, "baselines.lwf_alpha"),
        (RUN, "baselines.ewc_lambda"),
        (RUN, "distributed.bucket_mb"),
        (META, "optim.lr"),
        (META, "meta.inner_lr"),
    ],
)
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "-.inf", "1e400"])
def test_non_finite_numbers_are_refused_naming_the_key(path: Path, key: str, value: str) -> None:
    # a section that parses itself (experts: its moved keys) names itself, then the key
    section, _, rest = key.partition(".")
    named = f"{section}: {rest}" if section == "experts" else key
    with pytest.raises(ValueError, match=rf"^{named}: expected a finite number, got"):
        load_config(path, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.alpha=.nan", r"adapter: alpha must be a finite number > 0, got nan"),
        ("adapter.alpha=.inf", r"adapter: alpha must be a finite number > 0, got inf"),
        ("adapter.alpha=0", r"adapter: alpha must be a finite number > 0, got 0"),
        ("adapter.dropout=1", r"adapter: dropout must be a finite number in \[0, 1\), got 1"),
        ("adapter.dropout=.nan", r"adapter: dropout must be a finite number in \[0, 1\), got nan"),
        ("baselines.ewc_lambda=-5", r"baselines.ewc_lambda must be a finite number >= 0, got -5"),
        ("baselines.lwf_temperature=0", r"lwf_temperature must be a finite number > 0, got 0.0"),
        ("baselines.lwf_alpha=-1e-3", r"baselines.lwf_alpha must be a finite number >= 0"),
        ("train.weight_decay=-1", r"train.weight_decay must be a finite number >= 0, got -1.0"),
        ("train.seed=4294967296", r"train.seed must be in \[0, 4294967295\], got 4294967296"),
        ("train.on_nonfinite=ignore", r"train.on_nonfinite: expected one of \['stop', 'skip'\]"),
        (
            "experts.routing.shrinkage=2",
            r"experts: routing: shrinkage must be a finite number in \[0, 1\], got 2",
        ),
    ],
)
def test_out_of_range_run_values_name_the_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(RUN, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.base=adam", r"optim.base must be one of \['adamw', 'lamb', 'sgd'\], got 'adam'"),
        ("optim.weight_decay=-1", r"optim.weight_decay must be a finite number >= 0, got -1.0"),
        ("optim.loraplus_ratio=0", r"optim.loraplus_ratio must be a finite number > 0, got 0.0"),
        ("test.seed=-1", r"test.seed must be in \[0, 4294967295\], got -1"),
        ("meta.chunk_size=0", r"meta.chunk_size \(or null\) must be >= 1, got 0"),
        ("data.ways=1", r"need data.ways >= 2"),
        ("data.options=[1]", r"data.options: expected a mapping, got \[1\]"),
    ],
)
def test_out_of_range_meta_values_name_the_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(META, [override])


def test_configs_built_in_python_meet_the_same_rules() -> None:
    with pytest.raises(ValueError, match=r"train.lr must be a finite number > 0, got nan"):
        ContinualTrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"baselines.lwf_temperature must be a finite number > 0"):
        BaselinesConfig(lwf_temperature=0.0)
    with pytest.raises(ValueError, match=r"train.head_lr must be a finite number > 0, got inf"):
        TrainConfig(head_lr=float("inf"))
    with pytest.raises(ValueError, match=r"train.epochs must be an integer > 0, got '3'"):
        TrainConfig(epochs="3")  # type: ignore[arg-type]
    skip = TrainConfig(on_nonfinite="skip")  # type: ignore[arg-type]
    assert skip.on_nonfinite is OnNonFinite.SKIP  # an Enum, whatever it was given as


# -- YAML files and overrides ------------------------------------------------------------------


def test_yaml_errors_are_one_line_with_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: finetune\ntrain: {lr: 1e-3, lr: 2e-3}\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml is not valid YAML: duplicate key 'lr' at line 2"
    ):
        load_config(bad)
    bad.write_text("job: finetune\ntrain: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML: .* at line 3, column 1$"):
        load_config(bad)
    bad.write_bytes(b"job: \xff\n")
    with pytest.raises(ValueError, match="is not a UTF-8 text file"):
        load_config(bad)
    bad.write_text("job: [finetune]\n")
    with pytest.raises(
        ValueError, match=r"job must be one of \[.*'finetune'.*\], got \['finetune'\]"
    ):
        load_config(bad)


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ValueError, match=r"override 'train.lr=\[1' is not valid YAML: .*column 3"):
        load_config(FINETUNE, ["train.lr=[1"])
    with pytest.raises(ValueError, match=r"'train..lr' has an empty part"):
        load_config(FINETUNE, ["train..lr=1"])
    with pytest.raises(ValueError, match=r"override 'train.lr.x=1': 'lr' is not a section"):
        load_config(FINETUNE, ["train.lr.x=1"])
    with pytest.raises(ValueError, match="could not determine a constructor"):
        load_config(FINETUNE, ["train.lr=!!python/name:os.system"])


def test_overrides_leave_the_data_unchanged() -> None:
    data = {"train": {"lr": 1.0}, "job": "finetune"}
    out = apply_overrides(data, ["train.lr=2", "train.epochs=1"])
    assert out == {"train": {"lr": 2, "epochs": 1}, "job": "finetune"}
    assert data == {"train": {"lr": 1.0}, "job": "finetune"}
