"""Typed configs, YAML files, overrides and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moracl.cli import main
from moracl.config import FinetuneConfig, apply_overrides, from_dict, load_config, to_dict

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
