"""``moracl bench experts --kernels-ab``: the A/B of the routing kernels, on the CPU."""

from __future__ import annotations

import os

import pytest

from moracl.bench import experts


def test_kernels_ab_alternates_without_and_with_and_restores_the_switch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MORACL_TRITON_ROUTING", "keep")
    seen: list[str | None] = []
    real_run = experts.run

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(os.environ.get("MORACL_TRITON_ROUTING"))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(experts, "run", spy)
    argv = ["--size", "cpu", "--device", "cpu", "--methods", "floor", "top2-of-8"]
    assert experts.main([*argv, "--kernels-ab", "2", "--steps", "1", "--warmup", "1"]) == 0
    assert seen == ["0", "1", "0", "1"]
    assert os.environ["MORACL_TRITON_ROUTING"] == "keep"
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert len(rows) == 8  # two rounds x two arms x two methods
    assert {r.split("|")[3].strip() for r in rows} == {"without", "with"}


def test_kernels_ab_rejects_a_negative_number_of_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        experts.main(["--size", "cpu", "--device", "cpu", "--kernels-ab", "-1"])
    assert exc.value.code == 2
    assert "--kernels-ab takes a number of rounds >= 0, got -1" in capsys.readouterr().err
