"""The README's quick-start snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.group(1), "README quick start", "exec"), {})
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()


def test_readme_leads_with_the_two_commands() -> None:
    head = README.read_text().split("## Quick start")[0]
    assert "make demo" in head and "make test" in head


def test_meta_learning_snippet_runs_and_learns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The few-shot snippet meta-trains on toy classes and adapts to a held-out 5-way task."""
    section = README.read_text().split("## Few-shot meta-learning", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: None)
    ns: dict[str, object] = {}
    exec(compile(snippet.group(1), "README few-shot", "exec"), ns)
    learner, xq, yq = ns["learner"], ns["xq"], ns["yq"]
    accuracy = float((learner(xq).argmax(-1) == yq).float().mean())  # type: ignore[operator]
    assert accuracy > 0.6  # chance is 0.2
