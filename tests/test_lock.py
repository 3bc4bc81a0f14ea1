"""``.ci/constraints.txt`` pins every package setup installs, at versions moracl accepts."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from packaging.version import Version

from .conftest import ci_lock

ROOT = Path(__file__).resolve().parents[1]


def _pins(lock: ModuleType) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[lock.canonical(name)] = Version(version)
    return pins


def test_every_requirement_is_pinned_at_a_version_the_project_accepts() -> None:
    lock = ci_lock()
    pins = _pins(lock)
    for req in lock.roots():
        name = lock.canonical(req.name)
        if name in lock.UNPINNED:
            continue
        assert name in pins, f"{req.name} is required, not pinned: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} in .ci/constraints.txt does not satisfy {req}"
        )


def test_setup_installs_with_the_constraints() -> None:
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "$PIP install" in line]
    assert installs and all("$PIN" in line for line in installs), installs
    assert "constraints.txt" in setup.split("stamp=")[1].splitlines()[0]  # a new pin re-runs it
