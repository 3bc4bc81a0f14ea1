"""``moracl bench dylora``'s options: bad values stop argparse with the value named, and the
defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moracl.bench import dylora


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lrs", "0"], "'0'"),
        (["--lrs=-2e-3"], "'-2e-3'"),
        (["--lrs", "nan"], "'nan'"),
        (["--alpha", "x"], "'x'"),
        (["--updates", "first"], "'first'"),
        (["--scalings", "sqrt"], "'sqrt'"),
        (["--ranks", "16"], "[16] exceed --rank 8"),
    ],
)
def test_bad_options_name_the_value(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        dylora.parse_args(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_the_defaults_parse() -> None:
    args = dylora.parse_args([])
    assert args.lrs == [2e-3] and args.updates == ["last", "all"] and args.seeds == [0]
    assert args.scalings == ["linear"] and dylora.variants(args) == ["last", "all"]


def _fake_run_seed(calls: list[tuple[int, str, float]]):  # type: ignore[no-untyped-def]
    """A stand-in for the trainings: accuracies that depend only on (seed, lr, variant, rank),
    as the real ones do; each (seed, model, lr) it is asked to train is appended to ``calls``
    (model: a DyLoRA variant, or ``lora`` for the LoRAs at every rank)."""

    def acc(*key: object) -> dict[str, float]:
        g = torch.Generator().manual_seed(abs(hash(key)) % 2**31)
        val, test = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        return {"val": val, "test": test}

    def run_seed(args):  # type: ignore[no-untyped-def]
        calls.extend((args.seed, v, lr) for v, lrs in args.todo.items() for lr in lrs)
        calls.extend((args.seed, "lora", lr) for lr in args.lrs)
        return {
            "seed": args.seed,
            "sizes": [400, 80, 300],
            "steps": 150,
            "dylora": {
                v: {str(lr): [acc(args.seed, lr, v, b) for b in args.ranks] for lr in lrs}
                for v, lrs in args.todo.items()
            },
            "lora": {str(lr): [acc(args.seed, lr, b) for b in args.ranks] for lr in args.lrs},
        }

    return run_seed


def test_reuse_trains_only_the_missing_lrs_and_summarises_as_a_full_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, str, float]] = []
    monkeypatch.setattr(dylora, "run_seed", _fake_run_seed(calls))
    grid = ["--lrs", "1e-3", "2e-3", "4e-3", "--seeds", "0", "1", "2"]
    full = dylora.run(dylora.parse_args(grid))
    assert len(calls) == 27  # 3 seeds x 3 lrs x (2 DyLoRA variants + the LoRAs)

    first = tmp_path / "first.json"
    assert dylora.main(["--lrs", "1e-3", "2e-3", "--seeds", "0", "1", "--json", str(first)]) == 0
    calls.clear()
    wider = tmp_path / "wider.json"
    assert dylora.main([*grid, "--reuse", str(first), "--json", str(wider)]) == 0
    # seeds 0 and 1 train only 4e-3; seed 2, absent from the record, trains everything
    assert sorted({(seed, lr) for seed, _, lr in calls}) == [
        (0, 4e-3), (1, 4e-3), (2, 1e-3), (2, 2e-3), (2, 4e-3)
    ]  # fmt: skip
    assert len(calls) == 15
    record = json.loads(wider.read_text())
    for key in ("by_update", "chosen", "val_mean", "runs"):
        assert record["results"][key] == full[key]
    assert any(
        "LoRA at lr 0.001, 0.002; DyLoRA last at lr 0.001, 0.002; DyLoRA all at lr 0.001, 0.002, "
        "for seeds [0, 1]" in c
        for c in record["meta"]["caveats"]
    )


def test_a_new_variant_trains_only_itself_and_records_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, str, float]] = []
    monkeypatch.setattr(dylora, "run_seed", _fake_run_seed(calls))
    lrs = ["--lrs", "1e-3", "2e-3", "--seeds", "0", "1"]
    every = ["--updates", "all", "last", "--scalings", "linear", "rslora"]
    full = dylora.run(dylora.parse_args([*lrs, *every]))
    assert set(full["by_update"]) == {"all", "last", "all+rslora", "last+rslora"}

    old, rs = tmp_path / "old.json", tmp_path / "rs.json"
    assert dylora.main([*lrs, "--updates", "all", "last", "--json", str(old)]) == 0
    calls.clear()
    argv = [*lrs, "--updates", "all", "--scalings", "rslora", "--reuse", str(old)]
    assert dylora.main([*argv, "--json", str(rs)]) == 0
    assert {m for _, m, _ in calls} == {"all+rslora"}  # LoRA and the linear variants reused
    calls.clear()
    merged = tmp_path / "merged.json"
    argv = [*lrs, *every, "--reuse", str(old), str(rs), "--json", str(merged)]
    assert dylora.main(argv) == 0
    assert sorted(calls) == [(s, "last+rslora", lr) for s in (0, 1) for lr in (1e-3, 2e-3)]
    record = json.loads(merged.read_text())
    for key in ("by_update", "chosen", "val_mean", "runs"):
        assert record["results"][key] == full[key]
    assert "`alpha / sqrt(b)` (rsLoRA)" in dylora.markdown(record["results"])
    old_part, rs_part = record["meta"]["caveats"][:2]  # each names what it supplied first
    assert f"from {rs}" in rs_part and rs_part.count("DyLoRA") == 1 and "LoRA at" not in rs_part
    assert f"from {old}" in old_part and "LoRA at lr 0.001, 0.002; DyLoRA all" in old_part


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rank", "4", "--ranks", "1", "2"], "--rank 8, this run 4"),
        (["--epochs", "3"], "--epochs 6, this run 3"),
        (["--alpha", "8"], "--alpha 16.0, this run 8.0"),
    ],
)
def test_reuse_refuses_a_record_with_other_settings(
    argv: list[str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(dylora, "run_seed", _fake_run_seed([]))
    first = tmp_path / "first.json"
    assert dylora.main(["--json", str(first)]) == 0
    with pytest.raises(SystemExit) as e:
        dylora.parse_args([*argv, "--reuse", str(first)])
    assert e.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"benchmark": "adapters", "meta": {}}',
        '{"benchmark": "dylora", "meta": {"command": "moracl bench dylora"}, "results": {}}',
    ],
)
def test_reuse_refuses_what_is_not_a_dylora_record(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        dylora.parse_args(["--reuse", str(path)])
    assert e.value.code == 2
    assert str(path) in capsys.readouterr().err


def test_variant_names_carry_the_full_rank_share() -> None:
    args = dylora.parse_args(
        ["--updates", "all", "--scalings", "linear", "rslora", "--full-shares", "0", "0.5"]
    )
    names = dylora.variants(args)
    assert names == ["all", "all+rslora", "all+full0.5", "all+rslora+full0.5"]
    assert [dylora.parse_variant(n) for n in names] == [
        ("all", "linear", 0.0),
        ("all", "rslora", 0.0),
        ("all", "linear", 0.5),
        ("all", "rslora", 0.5),
    ]
    with pytest.raises(SystemExit):
        dylora.parse_args(["--full-shares", "1"])  # a share must stay below 1
