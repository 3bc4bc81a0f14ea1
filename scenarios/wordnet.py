"""WordNet 3.0 glosses labelled with their lexicographer category, as Hugging Face datasets.

Source: the Debian package ``wordnet-base`` (``apt-get install --no-install-recommends
wordnet-base``), which installs the WordNet 3.0 database files
``/usr/share/wordnet/data.{noun,verb,adj,adv}``: 117,659 synsets, each with a gloss and one of
45 lexicographer categories (``noun.animal``, ``verb.motion``, ...). Nothing is downloaded.

Licence: WordNet 3.0 Copyright 2006 by Princeton University, under the WordNet 3.0 licence
(permission to use, copy, modify and distribute for any purpose and without fee, provided the
copyright notice and the licence's statements and disclaimer appear on all copies; the name
of Princeton University may not be used in advertising). The full text heads every data file
and lies in ``/usr/share/doc/wordnet-base/copyright``. See https://wordnet.princeton.edu/.

Format of a data line (lines starting with two spaces are the licence header)::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...]
        [frames ...] | gloss

``lex_filenum`` is a two-digit decimal index into :data:`LEXNAMES`, ``w_cnt`` is two hex
digits. The gloss holds a definition, often followed by quoted examples
(``definition; "example"; "example"``); the text kept is the definition.

Preprocessed tables are cached with :meth:`datasets.Dataset.save_to_disk` under
``$MORACL_CACHE/wordnet`` (default ``~/.cache/moracl/wordnet``), one folder per set of options
and source-file versions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, Features, Value
from moracl_scenarios._cache import cache_root
from moracl_scenarios._paths import require_debian_path

__all__ = [
    "LEXNAMES",
    "POS_NAMES",
    "WordNetEntry",
    "load_wordnet_glosses",
    "parse_data_file",
    "wordnet_classification",
]

#: The 45 WordNet 3.0 lexicographer file names; ``lex_filenum`` indexes this tuple.
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)

#: The parts of speech, each naming one ``data.<pos>`` file.
POS_NAMES: tuple[str, ...] = ("noun", "verb", "adj", "adv")

_DEFAULT_ROOT = "/usr/share/wordnet"
_CACHE_FORMAT = 1  # bump when the parsing or the columns change, to invalidate old caches
_EXAMPLES = re.compile(r';\s*"')  # where the quoted examples of a gloss begin
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")  # syntactic marker on adjectives: galore(ip)

_FEATURES = Features(
    {
        "text": Value("string"),
        "label": ClassLabel(names=list(LEXNAMES)),
        "lexname": Value("string"),
        "pos": Value("string"),
        "offset": Value("int64"),
    }
)


@dataclass(frozen=True)
class WordNetEntry:
    """One synset of a ``data.<pos>`` file.

    Attributes:
        offset: the synset's byte offset in its file (unique within one file only).
        label: the lexicographer file number, an index into :data:`LEXNAMES`.
        lemmas: the synset's words, underscores replaced by spaces, markers such as ``(ip)``
            removed.
        definition: the gloss without its quoted examples, stripped.
    """

    offset: int
    label: int
    lemmas: tuple[str, ...]
    definition: str

    @property
    def lexname(self) -> str:
        """The lexicographer category, e.g. ``"noun.animal"``."""
        return LEXNAMES[self.label]

    def text(self, *, with_lemma: bool = False) -> str:
        """The definition, prefixed by ``"<first lemma>: "`` when ``with_lemma`` is true."""
        return f"{self.lemmas[0]}: {self.definition}" if with_lemma else self.definition


def _parse_line(line: str, where: str) -> WordNetEntry:
    """Parse one data line; ``where`` (``file:line``) names it in errors."""
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if not sep or len(fields) < 4:
            raise ValueError("expected 'offset lex_filenum ss_type w_cnt words ... | gloss'")
        offset, label, w_cnt = int(fields[0]), int(fields[1]), int(fields[3], 16)
        if not 0 <= label < len(LEXNAMES):
            raise ValueError(f"lex_filenum {label} outside 0..{len(LEXNAMES) - 1}")
        words = fields[4 : 4 + 2 * w_cnt : 2]
        if w_cnt < 1 or len(words) != w_cnt:
            raise ValueError(f"w_cnt {fields[3]!r} does not match the words on the line")
    except ValueError as err:
        raise ValueError(f"{where}: malformed WordNet data line ({err}): {line[:80]!r}") from None
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    definition = _EXAMPLES.split(gloss, maxsplit=1)[0].strip()
    return WordNetEntry(offset=offset, label=label, lemmas=lemmas, definition=definition)


def parse_data_file(path: str | Path) -> Iterator[WordNetEntry]:
    """Yield the synsets of one WordNet ``data.<pos>`` file, skipping the licence header.

    Raises:
        ValueError: a line does not follow the data-file format; the message names the line.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            yield _parse_line(line.rstrip("\n"), f"{path}:{number}")


def _check_pos(pos: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (pos,) if isinstance(pos, str) else tuple(pos)
    unknown = [p for p in chosen if p not in POS_NAMES]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"pos must be distinct names among {list(POS_NAMES)}, got {list(chosen)}")
    return chosen


def _default_cache_dir() -> Path:
    return cache_root("wordnet")


def _cache_key(files: Sequence[Path], with_lemma: bool) -> str:
    """A hash of the options and of each source file's path, size and modification time."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps({"format": _CACHE_FORMAT, "files": stats, "with_lemma": with_lemma})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(files: Sequence[tuple[str, Path]], with_lemma: bool) -> Dataset:
    columns: dict[str, list[object]] = {name: [] for name in _FEATURES}
    for pos, path in files:
        for entry in parse_data_file(path):
            columns["text"].append(entry.text(with_lemma=with_lemma))
            columns["label"].append(entry.label)
            columns["lexname"].append(entry.lexname)
            columns["pos"].append(pos)
            columns["offset"].append(entry.offset)
    return Dataset.from_dict(columns, features=_FEATURES)


def load_wordnet_glosses(
    root: str | Path = _DEFAULT_ROOT,
    pos: Sequence[str] = POS_NAMES,
    *,
    with_lemma: bool = False,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """All glosses of the chosen parts of speech, one row per synset, in file order.

    Columns: ``text`` (the definition, or ``"<first lemma>: <definition>"`` with
    ``with_lemma``), ``label`` (``ClassLabel`` over :data:`LEXNAMES`, ids 0..44), ``lexname``,
    ``pos`` (``"noun"``, ``"verb"``, ``"adj"`` or ``"adv"``: the file the row comes from;
    adjective satellites are ``"adj"``) and ``offset`` (unique within one ``pos``).

    The parsed table is saved with :meth:`~datasets.Dataset.save_to_disk` in ``cache_dir``
    (default ``$MORACL_CACHE/wordnet``, else ``~/.cache/moracl/wordnet``) under a hash of the
    options and of the source files' sizes and times, and memory-mapped from there afterwards.

    Args:
        root: folder holding ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``.
        pos: parts of speech to load, among :data:`POS_NAMES`.
        with_lemma: prefix each definition with the synset's first lemma.
        cache_dir: where to keep the preprocessed tables.

    Raises:
        FileNotFoundError: a data file is missing (names the Debian package to install).
        ValueError: an unknown part of speech, or a malformed data line.
    """
    chosen = _check_pos(pos)
    files = [(p, require_debian_path(Path(root) / f"data.{p}", "wordnet-base")) for p in chosen]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = cache / f"glosses-{'-'.join(chosen)}-{_cache_key([f for _, f in files], with_lemma)}"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            _build(files, with_lemma).save_to_disk(str(scratch))
            try:
                scratch.rename(target)  # atomic: readers never see a half-written table
            except OSError:
                if not target.exists():  # a concurrent writer may have won the race
                    raise
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
            shutil.rmtree(scratch, ignore_errors=True)
    return Dataset.load_from_disk(str(target))


def _eligible_rows(texts: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """Mask of the rows whose text is seen first and under one category only.

    WordNet repeats some definitions (``"a variety of aster"`` 23 times in ``noun.plant``),
    a few of them under two categories; keeping one row per text, and none of an ambiguous
    text, makes train and test disjoint in text as well as in rows.
    """
    first: dict[str, int] = {}
    ambiguous: set[str] = set()
    for row, text in enumerate(texts):
        if text not in first:
            first[text] = row
        elif labels[first[text]] != labels[row]:
            ambiguous.add(text)
    eligible = np.zeros(len(texts), dtype=bool)
    eligible[[row for text, row in first.items() if text not in ambiguous]] = True
    return eligible


def wordnet_classification(
    categories: Sequence[str],
    *,
    per_class: int,
    test_per_class: int,
    seed: int,
    with_lemma: bool = False,
    root: str | Path = _DEFAULT_ROOT,
    cache_dir: str | Path | None = None,
    build_test: bool = True,
) -> tuple[Dataset, Dataset]:
    """A seeded, class-balanced train/test split of the glosses of ``categories``.

    ``categories[k]`` becomes label ``k`` (a ``ClassLabel`` named by the categories); the
    other columns are those of :func:`load_wordnet_glosses`. Repeated texts are dropped first
    (one row per text; none for a text found under two categories), so no text appears
    twice. Each category then draws ``per_class + test_per_class`` rows with a generator
    seeded by ``(seed, lexname id)``, so its rows do not depend on which other categories
    are asked for; the first ``per_class`` go to train, the rest to test, so the splits are
    disjoint. Each split's rows are then shuffled with ``seed`` (train first).

    With ``build_test=False`` (a run that must not read the test split) the rows are drawn
    alike, so the training split is the same row for row, but the test split is not built:
    an empty table (no row, the same columns) stands in its place.

    Args:
        categories: distinct names from :data:`LEXNAMES`, e.g. ``["noun.animal", "noun.plant"]``.
        per_class: training rows per category (at least 1).
        test_per_class: test rows per category (at least 0).
        seed: the random seed; the same arguments give the same rows in the same order.
        with_lemma, root, cache_dir: passed to :func:`load_wordnet_glosses`.
        build_test: build the test split (``False``: an empty table in its place).

    Returns:
        ``(train, test)`` with ``K * per_class`` and ``K * test_per_class`` rows.

    Raises:
        ValueError: unknown or repeated categories (lists the valid names), bad counts, or a
            category with fewer than ``per_class + test_per_class`` distinct glosses (names
            it and the count available).
    """
    categories = list(categories)
    unknown = [c for c in categories if c not in LEXNAMES]
    if unknown:
        raise ValueError(f"unknown WordNet categories {unknown}; expected names among {LEXNAMES}")
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct and non-empty, got {categories}")
    if per_class < 1 or test_per_class < 0:
        raise ValueError(
            f"need per_class >= 1 and test_per_class >= 0, got {per_class} and {test_per_class}"
        )
    needed = per_class + test_per_class
    glosses = load_wordnet_glosses(root, with_lemma=with_lemma, cache_dir=cache_dir)
    labels = np.asarray(glosses.data.column("label").to_numpy(), dtype=np.int64)
    eligible = _eligible_rows(glosses.data.column("text").to_pylist(), labels)

    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for name in categories:
        lex_id = LEXNAMES.index(name)
        rows = np.flatnonzero((labels == lex_id) & eligible)
        if len(rows) < needed:
            raise ValueError(
                f"category {name!r} has {len(rows)} distinct glosses, fewer than the "
                f"per_class + test_per_class = {needed} asked for"
            )
        drawn = np.random.default_rng([seed, lex_id]).choice(rows, size=needed, replace=False)
        train_rows.append(drawn[:per_class])
        test_rows.append(drawn[per_class:])

    remap = np.full(len(LEXNAMES), -1, dtype=np.int64)
    remap[[LEXNAMES.index(c) for c in categories]] = np.arange(len(categories))
    features = _FEATURES.copy()
    features["label"] = ClassLabel(names=categories)
    order = np.random.default_rng(seed)

    def subset(parts: list[np.ndarray]) -> Dataset:
        rows = np.concatenate(parts)
        rows = rows[order.permutation(len(rows))]
        columns = glosses.select(rows).to_dict()
        columns["label"] = remap[np.asarray(columns["label"], dtype=np.int64)].tolist()
        return Dataset.from_dict(columns, features=features)

    train = subset(train_rows)
    if not build_test:
        return train, subset([np.zeros(0, dtype=np.int64)])
    return train, subset(test_rows)
