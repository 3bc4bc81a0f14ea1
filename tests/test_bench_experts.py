"""``moracl bench experts``: the A/B of the routing kernels and the adaptive-computation rows,
on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moracl.bench import experts, experts_act
from moracl.bench.common import LlamaShape
from moracl.experts.backend import RoutingBackend, current_routing_backend, routing_backend


@pytest.mark.slow  # 20 s on 2 cores
def test_kernels_ab_alternates_without_and_with_and_restores_the_backend(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RoutingBackend | None] = []
    real_run = experts.run

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(current_routing_backend())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(experts, "run", spy)
    argv = ["--size", "cpu", "--device", "cpu", "--methods", "floor", "top2-of-8"]
    with routing_backend("eager"):
        assert experts.main([*argv, "--kernels-ab", "2", "--steps", "1", "--warmup", "1"]) == 0
        assert current_routing_backend() is RoutingBackend.EAGER
    compiled, triton = RoutingBackend.COMPILED, RoutingBackend.TRITON
    assert seen == [compiled, triton, compiled, triton]
    assert current_routing_backend() is None
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert len(rows) == 8  # two rounds x two arms x two methods
    assert {r.split("|")[3].strip() for r in rows} == {"without", "with"}


def test_kernels_ab_rejects_a_negative_number_of_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        experts.main(["--size", "cpu", "--device", "cpu", "--kernels-ab", "-1"])
    assert exc.value.code == 2
    assert "--kernels-ab takes a number of rounds >= 0, got -1" in capsys.readouterr().err


# -- the adaptive-computation rows --------------------------------------------------------------

TINY = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, vocab=50, batch=2, seq=24)


def test_act_block_is_calibrated_to_about_two_steps_with_tokens_halting_at_different_steps() -> (
    None
):
    x = torch.randn(TINY.tokens, TINY.hidden, generator=torch.Generator().manual_seed(0))
    act, mean = experts_act.build_act(TINY, 4, torch.device("cpu"), torch.float32, x)
    with torch.no_grad():
        res = act.eval()(x)
    assert float(res.steps.mean()) == pytest.approx(mean)
    assert abs(mean - experts_act.TARGET_STEPS) < 0.25
    assert len(torch.unique(res.steps)) >= 3  # early exit has tokens to drop at each step
    with torch.no_grad():
        fixed = act(x, loop="masked")
    torch.testing.assert_close(res.output, fixed.output, rtol=1e-5, atol=1e-5)


def test_act_rows_ratios_are_the_exit_time_over_the_fixed_time_scaled_by_the_steps() -> None:
    rows = [
        {"method": "floor", "ms": 3.0},
        {"method": "act-train-fixed4", "ms": 40.0, "mean_steps": 2.0},
        {"method": "act-train-exit", "ms": 22.0, "mean_steps": 2.0},
        {"method": "act-infer-exit", "ms": 6.0, "mean_steps": 1.5},
    ]
    experts_act.add_ratios(rows)
    assert "x_steps" not in rows[0]
    assert rows[1]["x_steps"] is None
    assert rows[2]["x_steps"] == pytest.approx(22.0 / (40.0 * 2.0 / 4))
    assert rows[3]["x_steps"] is None  # no fixed-step inference row to compare with


def test_bench_experts_runs_the_act_rows_and_renders_them_in_their_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(experts.SIZES, "cpu", TINY)
    out = tmp_path / "experts.json"
    methods = ["lora-r16", *experts_act.ACT_METHODS]
    argv = ["--size", "cpu", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    assert experts.main([*argv, "--methods", *methods, "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = {r["method"]: r for r in rec["results"]["results"]}
    assert list(rows) == methods
    for name in experts_act.ACT_METHODS:
        assert rows[name]["x_floor"] is None and rows[name]["x_lora"] is None
        assert 1.0 <= rows[name]["mean_steps"] < 3.0
    for kind in ("train", "infer"):
        fixed, exit_ = rows[f"act-{kind}-fixed4"], rows[f"act-{kind}-exit"]
        expected = exit_["ms"] / (fixed["ms"] * exit_["mean_steps"] / 4)
        assert fixed["x_steps"] is None and exit_["x_steps"] == pytest.approx(expected)
    assert rows["act-infer-exit"]["trainable"] == rows["act-train-fixed4"]["trainable"] > 0
    text = experts.markdown(rec["results"])
    main_table, act_table = text.split("Adaptive computation")
    assert "| lora-r16 |" in main_table and "act-" not in main_table
    assert act_table.count("| act-") == 4 and "| mean steps | x_steps |" in act_table
    assert act_table in capsys.readouterr().out
    # a record without ACT rows renders as before: one table
    plain = {**rec["results"], "results": [rows["lora-r16"]]}
    assert "Adaptive computation" not in experts.markdown(plain)


def test_the_plain_helpers_row_is_the_mora_mixture_with_uncompiled_helpers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from moracl.adapters.mora.bank import MoRABank
    from moracl.bench.common import build_llama

    flags = {}
    for method in ("mora-top2-of-8", "mora-top2-of-8-plain", "mora-top2-of-8-dynamic"):
        model = experts._wrap(method, build_llama(TINY, torch.device("cpu"), torch.float32), 4)
        banks = [m for m in model.modules() if isinstance(m, MoRABank)]
        assert banks
        flags[method] = {(b.compile_helpers, b.helpers_dynamic) for b in banks}
    assert flags == {
        "mora-top2-of-8": {(True, False)},
        "mora-top2-of-8-plain": {(False, False)},
        "mora-top2-of-8-dynamic": {(True, None)},
    }
    monkeypatch.setitem(experts.SIZES, "cpu", TINY)
    argv = ["--size", "cpu", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    out = tmp_path / "experts.json"
    assert experts.main([*argv, "--methods", *flags, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["results"]
    assert [r["method"] for r in rows] == list(flags) and rows[0]["trainable"] == rows[1][
        "trainable"
    ]
