"""Image streams (split-fashion, digit-domains) and the pretrained SmallCNN encoders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import moracl_scenarios  # noqa: F401  (registers the streams and encoders)
import numpy as np
import pytest
import torch
from moracl_scenarios import images
from moracl_scenarios._cache import array_digest, cached_arrays, read_header
from moracl_scenarios.digits import mnist_digits, sklearn_digits
from moracl_scenarios.pretrain import (
    load_pretrained,
    pretrain_cnn,
    pretrained_cnn,
    pretraining_split,
)
from moracl_scenarios.streams import ENCODERS, IMAGE_MEAN, IMAGE_STD, Setting, build_stream
from safetensors import safe_open
from torch import nn

from moracl.backbones import SmallCNN
from moracl.targets import select_targets
from tests.offline_data import needs_fashion_mnist

TINY_FASHION = {"per_class": 12, "test_per_class": 6}
TINY_DIGITS = {"per_class": 8, "test_per_class": 4}


def experience_arrays(exp: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``(x, y, t)`` of an Avalanche experience, stacked: ``(n, 1, 28, 28)``, ``(n,)``,
    ``(n,)``."""
    items = [exp.dataset[i] for i in range(len(exp.dataset))]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([int(it[1]) for it in items])
    t = torch.tensor([int(it[2]) for it in items])
    return x, y, t


def stream_arrays(stream: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [experience_arrays(exp) for exp in stream]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Invert the normalisation (float64 math): ``(n, 1, 28, 28)`` -> ``(n, 28, 28)`` uint8,
    checking that every value was an exact 8-bit level."""
    raw = (x.double() * IMAGE_STD + IMAGE_MEAN) * 255.0
    levels = raw.round()
    assert float((raw - levels).abs().max()) < 1e-3
    assert levels.min() >= 0 and levels.max() <= 255
    return levels[:, 0].to(torch.uint8).numpy()


def hashes(images_u8: np.ndarray) -> list[bytes]:
    return [img.tobytes() for img in images_u8]


def label_of(images_u8: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): int(c) for img, c in zip(images_u8, labels)}


# --------------------------------------------------------------------------------------------
# split-fashion


@pytest.fixture(scope="module")
def fashion_raw() -> dict[str, dict[bytes, int]]:
    out = {}
    for split in ("train", "test"):
        try:
            x, y = images.load_fashion_mnist(split)
        except FileNotFoundError as err:
            pytest.skip(str(err))
        out[split] = label_of(x, y)
    return out


@pytest.fixture(scope="module")
def fashion_task(fashion_raw: Any) -> Any:
    return build_stream("split-fashion", seed=0, **TINY_FASHION)


def test_fashion_inputs_labels_and_provenance(fashion_task: Any, fashion_raw: Any) -> None:
    info = fashion_task.info
    assert info.setting is Setting.TASK and info.modality == "image"
    assert info.backbone == "cnn-mnist" and info.licence == "MIT"
    assert "dataset-fashion-mnist" in info.source
    assert info.class_names == images.FASHION_CLASSES
    assert info.experience_classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))  # seed 0: natural
    assert info.experience_names[0] == "T-shirt/top+Trouser"
    assert info.experience_names[4] == "Bag+Ankle boot"
    for split, stream, per_class in (
        ("train", fashion_task.benchmark.train_stream, 12),
        ("test", fashion_task.benchmark.test_stream, 6),
    ):
        assert len(stream) == 5
        for i, (exp, (x, y, t)) in enumerate(zip(stream, stream_arrays(stream))):
            assert x.dtype == torch.float32 and x.shape == (2 * per_class, 1, 28, 28)
            assert y.dtype == torch.int64
            u8 = to_uint8(x)
            ref = ((torch.from_numpy(u8).double() / 255 - IMAGE_MEAN) / IMAGE_STD)[:, None]
            torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)
            # every image is a real image of that split, labelled with its global class id
            assert [fashion_raw[split][h] for h in hashes(u8)] == y.tolist()
            assert sorted(set(y.tolist())) == list(info.experience_classes[i])
            assert (
                np.bincount(y.numpy(), minlength=10)[list(info.experience_classes[i])].tolist()
                == [per_class] * 2
            )
            assert set(exp.classes_in_this_experience) == set(info.experience_classes[i])
            assert exp.task_label == i and t.tolist() == [i] * len(t)
            assert exp.current_experience == i
            assert len(set(hashes(u8))) == len(u8)


def test_fashion_train_test_disjoint(fashion_task: Any) -> None:
    train = {
        h
        for x, _, _ in stream_arrays(fashion_task.benchmark.train_stream)
        for h in hashes(to_uint8(x))
    }
    test = {
        h
        for x, _, _ in stream_arrays(fashion_task.benchmark.test_stream)
        for h in hashes(to_uint8(x))
    }
    assert len(train) == 5 * 2 * 12 and len(test) == 5 * 2 * 6
    assert not train & test


def test_fashion_class_setting_and_seeds(fashion_task: Any, fashion_raw: Any) -> None:
    cls = build_stream("split-fashion", setting="class", seed=0, **TINY_FASHION)
    assert cls.info.setting is Setting.CLASS
    same = stream_arrays(cls.benchmark.train_stream)
    for exp, (_, _, t) in zip(cls.benchmark.train_stream, same):
        assert exp.task_label == 0 and t.tolist() == [0] * len(t)
    # the setting changes only the task labels; the same seed gives the same data
    for (x0, y0, _), (x1, y1, _) in zip(stream_arrays(fashion_task.benchmark.train_stream), same):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)

    other = build_stream("split-fashion", seed=1, **TINY_FASHION)
    order = [c for group in other.info.experience_classes for c in group]
    assert sorted(order) == list(range(10))
    assert other.info.experience_classes != fashion_task.info.experience_classes
    for exp, (_, y, _) in zip(
        other.benchmark.train_stream, stream_arrays(other.benchmark.train_stream)
    ):
        assert sorted(set(y.tolist())) == list(
            other.info.experience_classes[exp.current_experience]
        )
    # a different seed draws other images of a class
    first = other.info.experience_classes[0][0]
    seed0 = {h for x, y, _ in same for h, c in zip(hashes(to_uint8(x)), y.tolist()) if c == first}
    seed1 = {
        h
        for x, y, _ in stream_arrays(other.benchmark.train_stream)
        for h, c in zip(hashes(to_uint8(x)), y.tolist())
        if c == first
    }
    assert len(seed0) == len(seed1) == 12 and seed0 != seed1


def test_fashion_experiences_option(fashion_raw: Any) -> None:
    two = build_stream("split-fashion", experiences=2, per_class=3, test_per_class=2)
    assert two.info.experience_classes == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert [len(e.dataset) for e in two.benchmark.train_stream] == [15, 15]
    assert [e.task_label for e in two.benchmark.test_stream] == [0, 1]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"experiences": 3}, ["experiences=3", "[1, 2, 5, 10]"]),
        ({"experiences": 0}, ["experiences=0"]),
        ({"per_class": 0}, ["per_class=0", "1..6000"]),
        ({"per_class": 6001}, ["per_class=6001", "1..6000"]),
        ({"test_per_class": 1001}, ["test_per_class=1001", "1..1000"]),
        ({"classes": 4}, ["'classes'", "'experiences'", "'per_class'"]),
        ({"setting": "domain"}, ["'domain'", "'task'", "'class'"]),
        ({"setting": "online"}, ["'online'", "'domain'"]),
    ],
)
def test_fashion_bad_options(options: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        build_stream("split-fashion", **options)
    for word in words:
        assert word in str(err.value)


def test_fashion_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_stream("split-fashion", root=tmp_path / "nowhere")
    monkeypatch.setattr(images, "FASHION_ROOT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*dataset-fashion-mnist"):
        build_stream("split-fashion", **TINY_FASHION)


# --------------------------------------------------------------------------------------------
# digit-domains


@pytest.fixture(scope="module")
def digits_stream() -> Any:
    return build_stream("digit-domains", seed=0, **TINY_DIGITS)


def test_mnist_cache_matches_loader() -> None:
    cached = mnist_digits()
    direct = images.load_mnist_digits()
    assert cached[0].dtype == np.uint8 and cached[1].dtype == np.int64
    assert np.array_equal(cached[0], direct[0]) and np.array_equal(cached[1], direct[1])


def test_cached_arrays_build_once(tmp_path: Path) -> None:
    calls = []
    data = {
        "a": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "b": np.array([1, -2], dtype=np.int64),
    }

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return data

    path = tmp_path / "x.safetensors"
    first = cached_arrays(path, build, {"source": "test"})
    second = cached_arrays(path, build, {"source": "test"})
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    for got in (first, second):
        for k, v in data.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    assert read_header(path) == {"source": "test"}


def test_digits_domains_inputs_and_labels(digits_stream: Any) -> None:
    info = digits_stream.info
    assert info.setting is Setting.DOMAIN and info.backbone == "cnn-fashion"
    assert info.experience_names == ("mnist", "sklearn", "mnist-rot90", "mnist-inverted")
    assert info.experience_classes == (tuple(range(10)),) * 4
    assert info.class_names == tuple("0123456789")
    mnist = label_of(*mnist_digits())
    sk = label_of(*sklearn_digits())
    undo = {
        "mnist": lambda u: u,
        "sklearn": lambda u: u,
        "mnist-rot90": lambda u: np.rot90(u, k=-1, axes=(1, 2)),
        "mnist-inverted": lambda u: 255 - u,
    }
    for split, stream, per_class in (
        ("train", digits_stream.benchmark.train_stream, 8),
        ("test", digits_stream.benchmark.test_stream, 4),
    ):
        for exp, (x, y, t), name in zip(stream, stream_arrays(stream), info.experience_names):
            assert x.dtype == torch.float32 and x.shape == (10 * per_class, 1, 28, 28), split
            assert np.bincount(y.numpy(), minlength=10).tolist() == [per_class] * 10
            assert exp.task_label == 0 and t.tolist() == [0] * len(t)
            assert set(exp.classes_in_this_experience) == set(range(10))
            source = sk if name == "sklearn" else mnist
            original = np.ascontiguousarray(undo[name](to_uint8(x)))
            assert [source[h] for h in hashes(original)] == y.tolist(), name


def original_hashes(stream: Any, names: tuple[str, ...]) -> dict[str, set[bytes]]:
    out: dict[str, set[bytes]] = {}
    for (x, _, _), name in zip(stream_arrays(stream), names):
        u8 = to_uint8(x)
        if name == "mnist-rot90":
            u8 = np.rot90(u8, k=-1, axes=(1, 2))
        elif name == "mnist-inverted":
            u8 = 255 - u8
        out[name] = set(hashes(np.ascontiguousarray(u8)))
    return out


def test_digits_disjoint_subsets(digits_stream: Any) -> None:
    names = digits_stream.info.experience_names
    train = original_hashes(digits_stream.benchmark.train_stream, names)
    test = original_hashes(digits_stream.benchmark.test_stream, names)
    for name in names:
        assert len(train[name]) == 80 and len(test[name]) == 40
        assert not train[name] & test[name], name
    used = [train[n] | test[n] for n in ("mnist", "mnist-rot90", "mnist-inverted")]
    assert not used[0] & used[1] and not used[0] & used[2] and not used[1] & used[2]


def test_digits_seeds_and_domains_option(digits_stream: Any) -> None:
    again = build_stream("digit-domains", seed=0, **TINY_DIGITS)
    for a, b in zip(
        stream_arrays(digits_stream.benchmark.train_stream),
        stream_arrays(again.benchmark.train_stream),
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = build_stream("digit-domains", seed=1, **TINY_DIGITS)
    names = digits_stream.info.experience_names
    h0 = original_hashes(digits_stream.benchmark.train_stream, names)
    h1 = original_hashes(other.benchmark.train_stream, names)
    assert all(h0[n] != h1[n] for n in names)

    two = build_stream(
        "digit-domains", domains=["mnist-inverted", "mnist"], per_class=240, test_per_class=10
    )
    assert two.info.experience_names == ("mnist-inverted", "mnist")
    assert [len(e.dataset) for e in two.benchmark.train_stream] == [2400, 2400]
    h = original_hashes(two.benchmark.train_stream, two.info.experience_names)
    assert not h["mnist"] & h["mnist-inverted"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"setting": "task"}, ["'task'", "'domain'"]),
        ({"setting": "class"}, ["'class'", "'domain'"]),
        ({"domains": ["mnist", "svhn"]}, ["'svhn'", "'mnist-rot90'", "'sklearn'"]),
        ({"domains": ["mnist", "mnist"]}, ["distinct", "'mnist-inverted'"]),
        ({"domains": []}, ["domains=[]", "'mnist'"]),
        ({"per_class": 0}, ["per_class=0", "1..166"]),
        ({"per_class": 150, "test_per_class": 40}, ["per_class=150", "test_per_class=40", "166"]),
        (
            {"domains": ["sklearn"], "per_class": 170, "test_per_class": 10},
            ["per_class=170", "174"],
        ),
        ({"test_per_class": None}, ["test_per_class=None"]),
        ({"experiences": 4}, ["'experiences'", "'domains'"]),
    ],
)
def test_digits_bad_options(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        build_stream("digit-domains", **kwargs)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------------------------
# SmallCNN and its pretraining


def test_small_cnn_shape_size_and_no_batchnorm() -> None:
    model = SmallCNN()
    encoder = SmallCNN(num_classes=None)
    n = sum(p.numel() for p in encoder.parameters())
    assert 1_500_000 <= n <= 3_000_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(5, 1, 28, 28)
    assert model(x).shape == (5, model.feature_dim) and model.logits(x).shape == (5, 10)
    train_out = model.train()(x)
    assert torch.equal(train_out, model.eval()(x))  # no train/eval difference
    assert select_targets(encoder, list(encoder.default_targets)) == ["fc2", "fc3"]
    assert select_targets(encoder, "all-linear") == ["fc1", "fc2", "fc3"]
    with pytest.raises(ValueError, match=r"\(b, 1, 28, 28\)"):
        model(torch.randn(5, 28, 28))


QUICK: dict[str, Any] = {"source": "fashion", "epochs": 1, "limit": 500}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@needs_fashion_mnist
def test_pretrain_bit_identical_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = pretrain_cnn(**QUICK, cache_dir=tmp_path / "a")
    b = pretrain_cnn(**QUICK, cache_dir=tmp_path / "b")
    sa, sb = state(a.model), state(b.model)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = pretrain_cnn(**QUICK, seed=1, cache_dir=tmp_path / "a")
    assert c.path != a.path and not torch.equal(state(c.model)["fc1.weight"], sa["fc1.weight"])

    # the cache folder holds only finished entries: weights + sidecar, nothing else
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [b.path.name]
    assert sorted(p.name for p in b.path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(b.path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(sb)
        assert all(torch.equal(f.get_tensor(k), sb[k]) for k in sb)
    meta = json.loads((b.path / "config.json").read_text())
    assert meta["architecture"] == SmallCNN().architecture() and meta["class"] == "SmallCNN"
    assert meta["source"] == "fashion" and meta["seed"] == 0 and meta["epochs"] == 1
    assert meta["recipe"]["limit"] == 500 and meta["torch_version"] == torch.__version__
    assert meta["num_threads"] >= 1 and meta["train_examples"] + meta["held_out_examples"] == 500
    split = pretraining_split("fashion", _recipe(meta))
    assert load_pretrained(b.path).meta == meta
    assert meta["data_sha256"] == array_digest(*split)
    for key in ("train_accuracy", "held_out_accuracy"):
        assert 0.0 <= meta[key] <= 1.0

    # a second call reads the cache; force retrains, to the same bits
    import moracl_scenarios.pretrain as pretrain

    real_train = pretrain._train
    monkeypatch.setattr(pretrain, "_train", lambda *a, **k: pytest.fail("retrained"))
    again = pretrain_cnn(**QUICK, cache_dir=tmp_path / "b")
    assert all(torch.equal(state(again.model)[k], sb[k]) for k in sb)
    monkeypatch.setattr(pretrain, "_train", real_train)
    forced = pretrain_cnn(**QUICK, cache_dir=tmp_path / "b", force=True)
    assert all(torch.equal(state(forced.model)[k], sb[k]) for k in sb)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [b.path.name]


def _recipe(meta: dict[str, Any]) -> Any:
    from moracl_scenarios.pretrain import Recipe

    return Recipe(**meta["recipe"])


@needs_fashion_mnist
def test_pretraining_split_is_disjoint_and_balanced() -> None:
    from moracl_scenarios.pretrain import RECIPES

    tx, ty, hx, hy = pretraining_split("fashion", RECIPES["fashion"])
    assert len(ty) == 10_800 and len(hy) == 1_200
    assert np.bincount(ty).tolist() == [1080] * 10 and np.bincount(hy).tolist() == [120] * 10
    assert not set(hashes(tx)) & set(hashes(hx))
    with pytest.raises(ValueError, match="'cifar'"):
        pretraining_split("cifar")


@pytest.mark.parametrize("source", [pytest.param("fashion", marks=needs_fashion_mnist), "mnist"])
def test_pretrained_cnn_beats_chance_on_held_out(source: str, tmp_path: Path) -> None:
    result = pretrain_cnn(source, epochs=3, limit=2000, cache_dir=tmp_path)
    _, _, hx, hy = pretraining_split(source, _recipe(result.meta))
    x = (torch.from_numpy(hx).double() / 255 - IMAGE_MEAN) / IMAGE_STD
    with torch.no_grad():
        pred = result.model.logits(x[:, None].float()).argmax(-1)
    accuracy = float((pred == torch.from_numpy(hy)).double().mean())
    # recomputed in one batch here, in batches of 1024 there: float32 rounding may flip a
    # near-tied image on another machine, so one image's worth of difference is allowed
    assert accuracy == pytest.approx(result.meta["held_out_accuracy"], abs=1.01 / len(hy))
    assert accuracy > 0.6  # chance is 0.1


@needs_fashion_mnist
def test_frozen_encoder(tmp_path: Path) -> None:
    full = pretrain_cnn(**QUICK, cache_dir=tmp_path).model
    encoder = pretrained_cnn("fashion", epochs=1, limit=500, cache_dir=tmp_path)
    assert encoder.head is None and not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert encoder.feature_dim == 512 and encoder.default_targets == ("fc2", "fc3")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(encoder(x), full(x))
    assert {"cnn-fashion", "cnn-mnist"} <= set(ENCODERS.names())


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize(
    ("stream", "source", "floor"),
    [("split-fashion", "mnist", 0.95), ("digit-domains", "fashion", 0.85)],
)
def test_registered_encoders(stream: str, source: str, floor: float) -> None:
    """The default encoders (trained on first use, then cached) and their held-out accuracy."""
    from moracl_scenarios.streams import load_encoder

    built = build_stream(stream, per_class=2, test_per_class=1)
    encoder = load_encoder(built.info)
    assert isinstance(encoder, SmallCNN) and encoder.head is None
    assert all(not p.requires_grad for p in encoder.parameters())
    x, _, _ = experience_arrays(built.benchmark.train_stream[0])
    assert encoder(x).shape == (len(x), 512)
    assert pretrain_cnn(source).meta["held_out_accuracy"] > floor
