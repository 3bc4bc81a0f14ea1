"""The import graph of ``moracl`` and the scenarios package has no cycle.

Every ``import`` statement counts: at module level, inside functions (a deferred import is
still a dependency) and under ``TYPE_CHECKING``. An edge goes to the module named, or to the
submodule when ``from package import name`` names one. A package's ``__init__`` is the node
of the package itself; the implicit import of a parent package is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moracl": ROOT / "moracl", "moracl_scenarios": ROOT / "scenarios"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(module: str, level: int, name: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}``, restricted to the two packages."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node.level, node.module or "", is_package)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_cycle_finder_sees_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_pyproject_lists_every_package() -> None:
    """``[tool.setuptools] packages`` names every package folder (the list is explicit
    because the data folder ``scenarios/`` installs as ``moracl_scenarios``)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {"moracl_scenarios": "scenarios"}


#: the front end: the command line and the jobs, which read config files and build data
FRONT_END = ("moracl.cli", "moracl.jobs", "moracl.bench", "moracl.__main__")
#: what the library (everything else in ``moracl``) never imports
FRONT_END_ONLY = ("moracl_scenarios", "moracl.config", "moracl.cli", "moracl.jobs")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _forbidden(module: str) -> tuple[str, ...]:
    """What ``module`` must not import."""
    if _within(module, FRONT_END) or not module.startswith("moracl"):
        return ()
    if _within(module, ("moracl_scenarios",)):
        return FRONT_END_ONLY[1:]  # the data builds on the library, never on the front end
    return FRONT_END_ONLY


def test_library_imports_neither_the_data_nor_the_front_end() -> None:
    """Only ``moracl.cli``, ``moracl.jobs`` (and the benchmarks, which drive jobs) import the
    scenarios package, the config-file front end or the jobs; the library receives its stream
    or episode builder. The scenarios build on the library, never on the front end."""
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _within(target, _forbidden(module))
    )
    assert not wrong, "\n".join(wrong)
