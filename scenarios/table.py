"""The ``table`` stream: your own rows (CSV, JSON Lines, Parquet or a ``datasets`` folder),
cut into experiences by a column or by classes; no Python needed.

Rows are read with the ``datasets`` library, offline: ``.csv`` (``.tsv``), ``.json`` /
``.jsonl``, ``.parquet`` files, or a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (a ``DatasetDict`` with ``train`` and ``test`` splits gives the
split). Nothing is written to the Hugging Face cache.

Options (see :class:`TableOptions`): where the rows are (``path``, or ``train`` and
``test``), which columns are the input, the label and the experience, how rows are split
(``split`` column, else ``test_share``) and cut (``order``, ``n_experiences``,
``max_per_class``; see :mod:`moracl_scenarios.row_plan`), and the encoder.

Inputs:

- **text** (input columns that are not all numeric, or a text encoder named): the columns'
  values joined by a space; ``x`` as in :mod:`moracl_scenarios.text_encoders` (``encoder``
  ``"minilm"``, the default, or a Hugging Face model folder).
- **numeric** (every input column numeric, or a list of numbers per row; or
  ``encoder: tabular``): ``x`` ``(f,)`` float32 standardised on the first experience's
  training rows, for the random-feature ``tabular`` encoder (:mod:`moracl_scenarios.tabular`).

Settings: ``class`` (the default), ``task`` or ``domain`` (which needs an ``experience``
column). A ``ClassLabel`` column of a ``datasets`` folder gives its names.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moracl_scenarios.row_plan import (
    RowPlan,
    check_plan_options,
    check_source,
    plan_rows,
)
from moracl_scenarios.streams import (
    SCENARIOS,
    ScenarioSpec,
    Setting,
    Stream,
    StreamInfo,
    check_options,
    describe_scenario,
    tensor_benchmark,
)
from moracl_scenarios.tabular import numeric_matrix, standardise
from moracl_scenarios.text_encoders import resolve_text_encoder, text_inputs

__all__ = ["FORMATS", "TableOptions", "read_rows", "table_stream"]

NAME = "table"
#: file suffix -> the ``datasets`` builder that reads it
FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_FORMAT_NAMES = ("csv", "json", "parquet", "datasets")


@dataclass(frozen=True)
class TableOptions:
    """Options of the ``table`` stream.

    Attributes:
        path: a file or ``datasets`` folder with every row.
        train, test: instead of ``path``, the rows of each split (files or folders).
        format: ``csv``, ``json``, ``parquet`` or ``datasets``; default from the suffix (a
            folder: ``datasets``).
        input: the input column, or a list of them (text joined by spaces, or numbers).
        label: the label column.
        experience: the column whose values are the experiences (domains or tasks); none:
            the classes are cut into ``n_experiences`` groups.
        split: a column saying ``train`` or ``test`` on every row.
        test_share: without ``split`` or ``train``/``test``: the share of each class and
            experience drawn for test (default 0.2).
        order: experience values in stream order (default sorted); without ``experience``,
            label values in the order they are grouped. A subset leaves the rest out.
        n_experiences: without ``experience``: groups of classes (default ``classes // 2``).
        max_per_class: at most this many rows of each class, experience and split.
        encoder: ``minilm`` (text default), a Hugging Face model folder (text) or
            ``tabular`` (numeric default).
        frozen_layers: text: encoder layers run once and cached (default: all but the last
            for BERT's layout, else 0).
        max_length: text: tokens per row, special tokens included (longer rows are cut).
        width: numeric: the ``tabular`` encoder's feature width.
        cache_dir: text: the folder of cached encoder states (default
            ``$MORACL_CACHE/text-prefix``).
    """

    path: str | None = None
    train: str | None = None
    test: str | None = None
    format: str | None = None
    input: str | list[str] = "text"
    label: str = "label"
    experience: str | None = None
    split: str | None = None
    test_share: float = 0.2
    order: list[Any] | None = None
    n_experiences: int | None = None
    max_per_class: int | None = None
    encoder: str | None = None
    frozen_layers: int | None = None
    max_length: int = 64
    width: int = 256
    cache_dir: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TableOptions:
        """Check ``options`` (reading no data) and build; unknown ones list the valid."""
        check_options(NAME, options, [f.name for f in fields(cls)])
        check_source(NAME, options, has_split=options.get("split") is not None)
        check_plan_options(NAME, options)
        opts = cls(**options)
        if opts.format is not None and opts.format not in _FORMAT_NAMES:
            raise ValueError(
                f"scenario {NAME!r}: format={opts.format!r}; expected one of {list(_FORMAT_NAMES)}"
            )
        for p in (opts.path, opts.train, opts.test):
            if p is not None:
                _format(p, opts.format)  # a suffix it can read
        names = opts.inputs
        if not names or not all(isinstance(c, str) and c for c in names):
            raise ValueError(
                f"scenario {NAME!r}: input={opts.input!r} must be a column name or a list of them"
            )
        for key in ("label", "experience", "split"):
            value = getattr(opts, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"scenario {NAME!r}: {key}={value!r} must be a column name")
        used = [*names, opts.label, opts.experience, opts.split]
        used = [c for c in used if c is not None]
        if len(set(used)) != len(used):
            raise ValueError(
                f"scenario {NAME!r}: input {names}, label {opts.label!r}, experience "
                f"{opts.experience!r} and split {opts.split!r} must be different columns"
            )
        if opts.split is not None and opts.train is not None:
            raise ValueError(f"scenario {NAME!r}: split={opts.split!r} with 'train'/'test' files")
        if opts.experience is not None and opts.n_experiences is not None:
            raise ValueError(
                f"scenario {NAME!r}: n_experiences={opts.n_experiences} groups classes, but "
                f"experience={opts.experience!r} names the experiences; leave one out"
            )
        if opts.encoder is not None and opts.encoder != "tabular":
            resolve_text_encoder(opts.encoder)
        if opts.encoder == "tabular" and opts.frozen_layers is not None:
            raise ValueError(f"scenario {NAME!r}: frozen_layers applies to text encoders")
        for key, low in (("frozen_layers", 0), ("max_length", 2), ("width", 1)):
            value = getattr(opts, key)
            if value is None and key == "frozen_layers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"scenario {NAME!r}: {key}={value!r} must be an integer >= {low}")
        if opts.cache_dir is not None and not isinstance(opts.cache_dir, str):
            raise ValueError(f"scenario {NAME!r}: cache_dir={opts.cache_dir!r} must be a folder")
        return opts


def _check_setting(setting: Setting, options: Mapping[str, Any]) -> None:
    if setting is Setting.DOMAIN and options.get("experience") is None:
        raise ValueError(
            f"scenario {NAME!r}: the domain setting needs option 'experience', the column "
            f"whose values are the domains"
        )


# ------------------------------------------------------------------ reading


def _format(path: str, fmt: str | None) -> str:
    """The format of ``path``: ``fmt`` if given, else from its suffix (a folder: datasets)."""
    if fmt is not None:
        return fmt
    p = Path(path).expanduser()
    if p.is_dir():
        return "datasets"
    builder = FORMATS.get(p.suffix.lower())
    if builder is None:
        raise ValueError(
            f"scenario {NAME!r}: cannot tell the format of {path!r} from its suffix; expected "
            f"one of {sorted(FORMATS)} or a datasets folder, or set option 'format'"
        )
    return builder


def read_rows(path: str, fmt: str | None = None) -> dict[str, Any]:
    """The ``datasets.Dataset`` of each split in ``path``: ``{"train": ...}`` for a file or a
    saved ``Dataset``; a saved ``DatasetDict``'s splits.

    Raises:
        ValueError: an unknown format or a file that ``datasets`` cannot parse.
    """
    import datasets
    from datasets.utils.logging import (
        disable_progress_bar,
        enable_progress_bar,
        is_progress_bar_enabled,
    )

    kind = _format(path, fmt)
    where = str(Path(path).expanduser())
    if kind == "datasets":
        loaded = datasets.load_from_disk(where)
        if isinstance(loaded, datasets.DatasetDict):
            return dict(loaded)
        return {"train": loaded}
    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as scratch:  # nothing left in the HF cache
            extra = {"delimiter": "\t"} if where.lower().endswith(".tsv") else {}
            loaded = datasets.load_dataset(
                kind, data_files=where, cache_dir=scratch, keep_in_memory=True, **extra
            )
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        raise ValueError(f"scenario {NAME!r}: cannot read {path!r} as {kind}: {err}") from None
    finally:
        if shown:
            enable_progress_bar()
    return {"train": loaded["train"]}


def _single(rows: dict[str, Any], path: str) -> Any:
    if len(rows) != 1:
        raise ValueError(
            f"scenario {NAME!r}: {path!r} holds the splits {sorted(rows)}; give a folder "
            f"of one split (or use 'path' with 'train' and 'test' splits)"
        )
    return next(iter(rows.values()))


def _column(ds: Any, name: str, source: str) -> list[Any]:
    """The values of column ``name`` (a ``ClassLabel``'s names, not its integers)."""
    import datasets

    if name not in ds.column_names:
        raise ValueError(
            f"scenario {NAME!r}: {source} has no column {name!r}; its columns: {ds.column_names}"
        )
    values: list[Any] = ds.data.column(name).to_pylist()
    feature = ds.features[name]
    if isinstance(feature, datasets.ClassLabel):
        return [None if v is None else feature.int2str(v) for v in values]
    return values


def _is_numeric(ds: Any, name: str) -> bool:
    import pyarrow as pa

    kind = ds.data.schema.field(name).type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    )


@dataclass
class _Rows:
    """Every row of the stream, train rows first: the columns it uses."""

    inputs: dict[str, list[Any]]
    labels: list[Any]
    experiences: list[Any] | None
    is_test: np.ndarray | None
    numeric: bool
    source: str


def _load(opts: TableOptions) -> _Rows:
    parts: list[tuple[Any, bool | None, str]] = []  # (dataset, is test, what)
    if opts.path is not None:
        rows = read_rows(opts.path, opts.format)
        if set(rows) >= {"train", "test"} and opts.split is None and len(rows) == 2:
            parts = [
                (rows["train"], False, f"{opts.path}[train]"),
                (rows["test"], True, f"{opts.path}[test]"),
            ]
        else:
            parts = [(_single(rows, opts.path), None, opts.path)]
    else:
        assert opts.train is not None and opts.test is not None  # (checked by from_options)
        parts = [
            (_single(read_rows(opts.train, opts.format), opts.train), False, opts.train),
            (_single(read_rows(opts.test, opts.format), opts.test), True, opts.test),
        ]
    names = opts.inputs
    numeric = all(_is_numeric(ds, c) for ds, _, _ in parts for c in names if c in ds.column_names)
    inputs: dict[str, list[Any]] = {c: [] for c in names}
    labels: list[Any] = []
    experiences: list[Any] | None = [] if opts.experience is not None else None
    flags: list[bool] = []
    for ds, test, what in parts:
        for c in names:
            inputs[c] += _column(ds, c, what)
        labels += _column(ds, opts.label, what)
        if experiences is not None and opts.experience is not None:
            experiences += _column(ds, opts.experience, what)
        if test is not None:
            flags += [test] * ds.num_rows
        elif opts.split is not None:
            split = [str(v) for v in _column(ds, opts.split, what)]
            odd = sorted(set(split) - {"train", "test"})
            if odd:
                raise ValueError(
                    f"scenario {NAME!r}: split column {opts.split!r} must say 'train' or 'test' "
                    f"on every row; it also holds {odd[:5]}"
                )
            flags += [s == "test" for s in split]
    is_test = np.asarray(flags, dtype=bool) if flags else None
    sources = " + ".join(what for _, _, what in parts)
    return _Rows(inputs, labels, experiences, is_test, numeric, sources)


# ------------------------------------------------------------------ the stream


def _text(rows: _Rows, names: Sequence[str], used: np.ndarray) -> list[str]:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    return [" ".join(cell(rows.inputs[c][i]) for c in names).strip() for i in used]


def _shown(names: Sequence[str]) -> str:
    """The input columns, shortened when there are many."""
    return str(list(names)) if len(names) <= 4 else f"{len(names)} ({names[0]!r} .. {names[-1]!r})"


@SCENARIOS.register(NAME)
def table_stream(*, setting: Setting | None = None, seed: int = 0, **options: Any) -> Stream:
    """Build the ``table`` stream (see the module docstring and :class:`TableOptions`).

    Raises:
        ValueError: an unknown or invalid option, a missing column, a file ``datasets``
            cannot read, or rows that do not fit the setting (see
            :func:`~moracl_scenarios.row_plan.plan_rows`).
        FileNotFoundError: a path that does not exist.
    """
    opts = TableOptions.from_options(options)
    chosen = Setting.CLASS if setting is None else Setting(getattr(setting, "value", setting))
    _check_setting(chosen, options)
    rows = _load(opts)
    plan: RowPlan = plan_rows(
        NAME,
        rows.labels,
        setting=chosen,
        experiences=rows.experiences,
        is_test=rows.is_test,
        order=opts.order,
        n_experiences=opts.n_experiences,
        max_per_class=opts.max_per_class,
        test_share=opts.test_share,
        seed=seed,
        label_column=opts.label,
        experience_column=opts.experience or "experience",
    )
    used = np.unique(np.concatenate([*plan.train, *plan.test]))  # (m,) sorted row indices
    where = np.full(len(rows.labels), -1, dtype=np.int64)
    where[used] = np.arange(len(used))
    numeric = opts.encoder == "tabular" or (opts.encoder is None and rows.numeric)
    backbone_options: dict[str, Any] = {}
    frozen = 0
    if numeric:
        if not rows.numeric:
            raise ValueError(
                f"scenario {NAME!r}: encoder 'tabular' takes numeric columns; "
                f"input {opts.inputs} holds text"
            )
        matrix = numeric_matrix([(c, [rows.inputs[c][i] for i in used]) for c in opts.inputs], NAME)
        x_all = standardise(matrix, matrix[where[plan.train[0]]])  # (m, f)
        backbone, modality = "tabular", "tabular"
        backbone_options = {"in_features": matrix.shape[1], "width": opts.width, "seed": seed}
    else:
        encoder = opts.encoder or "minilm"
        x_all, frozen = text_inputs(
            _text(rows, opts.inputs, used),
            encoder=encoder,
            frozen_layers=opts.frozen_layers,
            max_length=opts.max_length,
            cache_dir=opts.cache_dir,
        )
        modality = "text"
        backbone = "minilm" if encoder == "minilm" else "hf-text"
        if backbone == "hf-text":
            backbone_options = {"path": str(resolve_text_encoder(encoder))}

    def part(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return x_all[torch.from_numpy(where[indices])], torch.from_numpy(plan.labels[indices])

    train = [part(r) for r in plan.train]
    test = [part(r) for r in plan.test]
    info = StreamInfo(
        name=NAME,
        setting=plan.setting,
        modality=modality,
        backbone=backbone,
        class_names=plan.class_names,
        experience_classes=plan.experience_classes,
        experience_names=plan.experience_names,
        source=f"{rows.source} (columns: input {_shown(opts.inputs)}, label {opts.label!r})",
        licence="not recorded (the user's own data)",
        frozen_layers=frozen,
        backbone_options=backbone_options,
    )
    return Stream(tensor_benchmark(train, test, task_labels=plan.task_labels), info)


describe_scenario(
    NAME,
    ScenarioSpec(
        (Setting.CLASS, Setting.TASK, Setting.DOMAIN),
        tuple(f.name for f in fields(TableOptions)),
        TableOptions.from_options,
        _check_setting,
    ),
)
