"""``moracl bench host``: every method adapts all seven layers of the stack, the per-layer
figures are the stack's time less the frozen stack's over seven, the record renders in
RESULTS.md, and bad options name the value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moracl.bench import adapters, host, report

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "method", [m for m in host.METHODS if not m.startswith("peft") or adapters._has_peft()]
)
def test_every_method_adapts_all_seven_layers_and_runs_a_step(method: str) -> None:
    model = host._wrapped(method, 16, 2, CPU)
    assert host.adapted_projections(model) == (0 if method == "floor" else 7)
    x = torch.randn(4, 2, 16, requires_grad=True)
    forward, step = host._step_fns(method, model, x, torch.arange(4) % 4)
    forward()
    step()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert x.grad is None and all(p.grad is None for p in trained)  # the step clears them


def test_per_layer_times_are_the_stack_less_the_floor_over_seven() -> None:
    methods = ["moracl-lora", "top2-of-8", "task"]
    rows = host.run(methods, hidden=16, tokens=8, rank=2, iters=2, repeats=1, device=CPU)
    assert [r["method"] for r in rows] == methods  # the floor is timed, not shown
    floor_rows = host.run(["floor"], hidden=16, tokens=8, rank=2, iters=2, repeats=1, device=CPU)
    assert floor_rows[0]["step_layer_us"] == 0.0 and floor_rows[0]["x_lora"] is None
    lora = rows[0]
    assert lora["x_lora"] == pytest.approx(1.0) or lora["step_layer_us"] <= 0
    for r in rows:
        for key in ("forward_us", "step_us", "forward_layer_us", "step_layer_us"):
            assert math.isfinite(r[key])
        assert r["step_us"] > 0


def test_the_json_record_renders_in_the_results(tmp_path: Path) -> None:
    out = tmp_path / "host-cpu.json"
    argv = ["--device", "cpu", "--methods", "floor", "moracl-lora", "--hidden", "16"]
    threads = torch.get_num_threads()
    assert (
        host.main([*argv, "--tokens", "8", "--iters", "2", "--repeats", "1", "--json", str(out)])
        == 0
    )
    assert torch.get_num_threads() == threads  # one thread while measuring, then restored
    data = json.loads(out.read_text())
    assert data["benchmark"] == "host"
    assert ", 1 torch threads;" in data["meta"]["machine"]
    assert data["meta"]["command"].startswith("moracl bench host --device cpu")
    text = report.render([("host-cpu.json", data)])
    assert "## Host time per layer (`moracl bench host`)" in text
    assert "| moracl-lora |" in text and "hidden 16, 8 tokens" in text


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--hidden", "12"], "got 12"),
        (["--iters", "0"], "got 0"),
        (["--methods", "lora"], "'lora'"),
    ],
)
def test_bad_options_name_the_value(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        host.parse_args(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err
