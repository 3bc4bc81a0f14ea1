"""``moracl bench experts --kernels-ab``: the A/B of the routing kernels, on the CPU."""

from __future__ import annotations

import pytest

from moracl.bench import experts
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
