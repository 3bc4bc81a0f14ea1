"""WordNet gloss loader and class-balanced splits: a hand-written snippet and the real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets", reason="needs the PyPI package 'datasets'")

from datasets import Dataset
from moracl_scenarios import wordnet as wn
from moracl_scenarios._paths import require_debian_path, require_python_package
from moracl_scenarios.wordnet import (
    LEXNAMES,
    load_wordnet_glosses,
    parse_data_file,
    wordnet_classification,
)

REAL_ROOT = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(
    not all((REAL_ROOT / f"data.{p}").is_file() for p in wn.POS_NAMES),
    reason="needs the Debian package 'wordnet-base' "
    "(apt-get install --no-install-recommends wordnet-base)",
)

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
# w_cnt is hex: "0a" is ten words; verb lines carry frames; "(ip)" marks an adjective lemma.
SNIPPET = {
    "noun": HEADER
    + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n"
    + "00015388 05 n 02 animal 0 animate_being 0 001 @ 00004475 n 0000 | a living organism "
    + 'that feeds on organic matter; "animals move"; "the animal ate"  \n'
    + "00015568 05 n 0a a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 000 | a breed of cattle  \n"
    + "00015600 05 n 01 cow 0 000 | a breed of cattle  \n",
    "verb": HEADER
    + "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 "
    + '02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs;"I can breathe"  \n',
    "adj": HEADER
    + "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in "
    + 'abundance; "abounding confidence"; "whiskey galore"  \n'
    + "01000010 44 a 01 closed 0 000 | not open; shut (of a door)  \n",
    "adv": HEADER + "00516492 02 r 01 unfairly 0 000 | in an unjust or unfair manner  \n",
}
EXPECTED = {
    "text": [
        "that which is perceived",
        "a living organism that feeds on organic matter",
        "a breed of cattle",
        "a breed of cattle",
        "draw air into, and expel out of, the lungs",
        "existing in abundance",
        "not open; shut (of a door)",
        "in an unjust or unfair manner",
    ],
    "label": [3, 5, 5, 5, 29, 0, 44, 2],
    "lexname": [
        "noun.Tops",
        "noun.animal",
        "noun.animal",
        "noun.animal",
        "verb.body",
        "adj.all",
        "adj.ppl",
        "adv.all",
    ],
    "pos": ["noun", "noun", "noun", "noun", "verb", "adj", "adj", "adv"],
    "offset": [1740, 15388, 15568, 15600, 1740, 14358, 1000010, 516492],
}


def col(ds: Dataset, name: str) -> list[Any]:
    """A column as a list (iterating a ``datasets`` column row by row is slow)."""
    return ds[name][:]


@pytest.fixture
def snippet_root(tmp_path: Path) -> Path:
    root = tmp_path / "wordnet"
    root.mkdir()
    for pos, text in SNIPPET.items():
        (root / f"data.{pos}").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wordnet-cache")


# ---------------------------------------------------------------- the parser on a snippet


def test_lexnames_are_the_45_standard_names() -> None:
    assert len(LEXNAMES) == len(set(LEXNAMES)) == 45
    assert LEXNAMES[0] == "adj.all" and LEXNAMES[3] == "noun.Tops"
    assert LEXNAMES[5] == "noun.animal" and LEXNAMES[29] == "verb.body"
    assert LEXNAMES[38] == "verb.motion" and LEXNAMES[44] == "adj.ppl"


def test_parse_data_file_reads_words_hex_counts_and_definitions(snippet_root: Path) -> None:
    nouns = list(parse_data_file(snippet_root / "data.noun"))
    assert [e.offset for e in nouns] == [1740, 15388, 15568, 15600]
    assert nouns[1].lemmas == ("animal", "animate being")
    assert nouns[2].lemmas == tuple("abcdefghij")  # w_cnt "0a" is 10
    (verb,) = parse_data_file(snippet_root / "data.verb")
    assert verb.lemmas == ("breathe", "take a breath", "respire", "suspire")
    assert verb.definition == "draw air into, and expel out of, the lungs"  # ';"' without space
    assert verb.lexname == "verb.body"
    adj = next(iter(parse_data_file(snippet_root / "data.adj")))
    assert adj.lemmas == ("abounding", "galore")


def test_load_gives_exact_rows(snippet_root: Path, tmp_path: Path) -> None:
    ds = load_wordnet_glosses(snippet_root, cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text", "label", "lexname", "pos", "offset"]
    assert ds.features["label"].names == list(LEXNAMES)
    assert ds.to_dict() == EXPECTED


def test_with_lemma_prefixes_the_first_lemma(snippet_root: Path, tmp_path: Path) -> None:
    ds = load_wordnet_glosses(snippet_root, ("verb", "adj"), with_lemma=True, cache_dir=tmp_path)
    assert col(ds, "text") == [
        "breathe: draw air into, and expel out of, the lungs",
        "abounding: existing in abundance",
        "closed: not open; shut (of a door)",
    ]
    assert col(ds, "pos") == ["verb", "adj", "adj"]


def test_cache_is_reused_and_follows_the_files(
    snippet_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MORACL_CACHE", str(tmp_path / "env-cache"))
    first = load_wordnet_glosses(snippet_root, ("adv",))
    assert len(list((tmp_path / "env-cache" / "wordnet").iterdir())) == 1

    def fail(path: object) -> None:
        raise AssertionError("parsed again although cached")

    with monkeypatch.context() as patch:
        patch.setattr(wn, "parse_data_file", fail)
        assert load_wordnet_glosses(snippet_root, ("adv",)).to_dict() == first.to_dict()
    with (snippet_root / "data.adv").open("a") as f:
        f.write("00516600 02 r 01 fairly 0 000 | in a just manner  \n")
    assert load_wordnet_glosses(snippet_root, ("adv",))["text"][-1] == "in a just manner"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "data.noun"
    bad.write_text(HEADER + "00001740 03 n 03 entity 0 000 | words missing  \n")
    with pytest.raises(ValueError, match=r"data\.noun:3: .*w_cnt"):
        list(parse_data_file(bad))
    bad.write_text("00001740 77 n 01 entity 0 000 | bad lexname  \n")
    with pytest.raises(ValueError, match="lex_filenum 77"):
        list(parse_data_file(bad))


def test_load_errors(snippet_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install --no-install-recommends wordnet"):
        load_wordnet_glosses(tmp_path / "nowhere", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="pos must be"):
        load_wordnet_glosses(snippet_root, ("noun", "pronoun"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="pos must be"):
        load_wordnet_glosses(snippet_root, ("noun", "noun"), cache_dir=tmp_path)


def test_classification_drops_repeated_texts(snippet_root: Path, tmp_path: Path) -> None:
    # noun.animal has 3 rows but only 2 distinct texts ("a breed of cattle" twice)
    train, test = wordnet_classification(
        ["noun.animal"],
        per_class=1,
        test_per_class=1,
        seed=0,
        root=snippet_root,
        cache_dir=tmp_path,
    )
    assert sorted(col(train, "text") + col(test, "text")) == [
        "a breed of cattle",
        "a living organism that feeds on organic matter",
    ]
    with pytest.raises(ValueError, match=r"'noun\.animal' has 2 distinct glosses"):
        wordnet_classification(
            ["noun.animal"],
            per_class=2,
            test_per_class=1,
            seed=0,
            root=snippet_root,
            cache_dir=tmp_path,
        )


def test_path_helpers_name_the_package(tmp_path: Path) -> None:
    assert require_debian_path(tmp_path, "x") == tmp_path
    with pytest.raises(FileNotFoundError, match="apt-get install --no-install-recommends pkg-x"):
        require_debian_path(tmp_path / "missing", "pkg-x")
    assert require_python_package("json", "json").dumps([]) == "[]"
    with pytest.raises(ImportError, match="pip install --no-deps no-such-pkg"):
        require_python_package("no_such_module_here", "no-such-pkg")


# ---------------------------------------------------------------- the real WordNet 3.0 files


@needs_wordnet
def test_real_counts(real_cache: Path) -> None:
    ds = load_wordnet_glosses(cache_dir=real_cache)
    assert len(ds) == 117_659
    pos = col(ds, "pos")
    assert {p: pos.count(p) for p in wn.POS_NAMES} == {
        "noun": 82_115,
        "verb": 13_767,
        "adj": 18_156,
        "adv": 3_621,
    }
    lexnames = col(ds, "lexname")
    assert lexnames.count("noun.animal") == 7_509
    assert lexnames.count("verb.motion") == 1_408
    assert lexnames.count("adj.ppl") == 60
    assert lexnames.count("noun.Tops") == 51
    assert all(name.split(".")[0] == p for name, p in zip(lexnames, pos))
    assert all(LEXNAMES[label] == name for label, name in zip(col(ds, "label"), lexnames))
    assert all(col(ds, "text"))  # no empty definition


@needs_wordnet
def test_real_split_is_balanced_disjoint_and_remapped(real_cache: Path) -> None:
    cats = ["noun.animal", "verb.motion", "adj.ppl", "noun.plant"]
    train, test = wordnet_classification(
        cats, per_class=30, test_per_class=20, seed=3, cache_dir=real_cache
    )
    assert train.features["label"].names == cats
    for split, n in ((train, 30), (test, 20)):
        labels = col(split, "label")
        assert len(split) == n * len(cats)
        assert [labels.count(k) for k in range(len(cats))] == [n] * len(cats)
        assert all(cats[k] == name for k, name in zip(labels, col(split, "lexname")))
        assert labels != sorted(labels)  # rows are shuffled, not grouped by class
    keys = {(p, o) for p, o in zip(col(train, "pos"), col(train, "offset"))}
    assert len(keys) == len(train)
    assert keys.isdisjoint(zip(col(test, "pos"), col(test, "offset")))
    assert set(col(train, "text")).isdisjoint(col(test, "text"))
    assert len(set(col(train, "text"))) == len(train)


@needs_wordnet
def test_real_split_is_deterministic_by_seed(real_cache: Path) -> None:
    def draw(cats: list[str], seed: int) -> tuple[list[int], list[int]]:
        train, test = wordnet_classification(
            cats, per_class=10, test_per_class=5, seed=seed, cache_dir=real_cache
        )
        return col(train, "offset"), col(test, "offset")

    cats = ["noun.food", "verb.weather"]
    assert draw(cats, 7) == draw(cats, 7)
    assert draw(cats, 7) != draw(cats, 8)
    # a category's rows do not depend on the other categories asked for
    alone = set(draw(["verb.weather"], 7)[0])
    assert len(alone) == 10
    both_train = wordnet_classification(
        cats, per_class=10, test_per_class=5, seed=7, cache_dir=real_cache
    )[0]
    weather = {o for o, k in zip(col(both_train, "offset"), col(both_train, "label")) if k == 1}
    assert weather == alone


@needs_wordnet
def test_real_split_without_building_the_test_split(real_cache: Path) -> None:
    """``build_test=False`` (a run that must not read the test split) trains on the rows, in
    the order, of a call that builds it, and builds no test row."""
    cats = ["noun.food", "verb.weather", "adj.ppl"]

    def draw(build_test: bool) -> tuple[Dataset, Dataset]:
        return wordnet_classification(
            cats, per_class=12, test_per_class=6, seed=4, cache_dir=real_cache,
            build_test=build_test,
        )  # fmt: skip

    (train, test), (alone, none) = draw(True), draw(False)
    assert col(alone, "offset") == col(train, "offset") and len(test) == 18
    assert col(alone, "text") == col(train, "text") and col(alone, "label") == col(train, "label")
    assert len(none) == 0 and none.features == test.features


@needs_wordnet
def test_real_split_errors(real_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"'noun\.motive' has 42 distinct glosses.* = 50"):
        wordnet_classification(
            ["noun.animal", "noun.motive"],
            per_class=45,
            test_per_class=5,
            seed=0,
            cache_dir=real_cache,
        )
    with pytest.raises(
        ValueError,
        match=r"unknown WordNet categories \['noun\.animals'\].*"
        r"'noun\.animal'",
    ):
        wordnet_classification(["noun.animals"], per_class=1, test_per_class=1, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        wordnet_classification(["noun.food"] * 2, per_class=1, test_per_class=1, seed=0)
    with pytest.raises(ValueError, match="per_class >= 1"):
        wordnet_classification(["noun.food"], per_class=0, test_per_class=1, seed=0)
