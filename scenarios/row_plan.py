"""Labelled rows cut into the experiences of a stream: what the ``table`` and
``image-folder`` scenarios share.

A row has a label, optionally an experience value (a domain, a task, a source) and optionally
a split (train or test). :func:`plan_rows` decides, reading only those three columns, which
rows each experience trains and tests on and the global class id of every row:

- With experience values, each distinct value is an experience (in ``order``, default sorted).
  Without them, the classes (in ``order``, default sorted) are cut into ``n_experiences``
  groups of (nearly) equal size, one experience each; only ``class`` and ``task`` settings.
- ``class``: every class belongs to one experience; global ids follow the stream order.
  ``domain``: the same label is the same class in every experience; ids follow the sorted
  labels. ``task``: when the experiences share no label, as ``class``; otherwise each
  experience's labels are classes of their own, named ``"<experience>/<label>"``.
- Rows without a split are divided per experience and class, seeded: ``test_share`` of them
  (at least one, and at least one left to train) go to test.
- ``max_per_class`` keeps at most that many rows of each class, experience and split (a
  seeded draw).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from moracl_scenarios.streams import Setting

__all__ = ["PLAN_OPTIONS", "RowPlan", "check_plan_options", "check_source", "plan_rows"]

#: the options of :func:`plan_rows` that scenarios pass through from their config
PLAN_OPTIONS = ("max_per_class", "n_experiences", "order", "test_share")


@dataclass(frozen=True)
class RowPlan:
    """Which rows each experience trains and tests on.

    Attributes:
        train, test: per experience, sorted row indices ``(n_e,)`` int64 into the rows given.
        labels: the global class id of every row given ``(n,)`` int64 (-1 on rows left out).
        class_names: the name of each global class id.
        experience_classes: the global class ids of each experience, sorted.
        experience_names: one name per experience.
        task_labels: the task label of each experience (its index under ``task``, else 0).
        setting: the stream's setting.
    """

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    experience_classes: tuple[tuple[int, ...], ...]
    experience_names: tuple[str, ...]
    task_labels: tuple[int, ...]
    setting: Setting


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _distinct_sorted(values: Sequence[Hashable]) -> list[Hashable]:
    """The distinct values, sorted (numbers numerically; mixed types by their text)."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct)  # type: ignore[type-var]
    except TypeError:
        return sorted(distinct, key=str)


def _ordered(
    scenario: str, what: str, present: list[Hashable], order: Sequence[object] | None
) -> list[Hashable]:
    """``present`` in ``order`` (matched by their text; a subset keeps only those)."""
    if order is None:
        return present
    by_text = {str(v): v for v in present}
    wanted = [str(v) for v in order]
    unknown = [w for w in wanted if w not in by_text]
    if unknown or len(set(wanted)) != len(wanted) or not wanted:
        raise ValueError(
            f"scenario {scenario!r}: order={list(order)!r} must list distinct {what} values "
            f"among {[str(v) for v in present]}" + (f"; unknown: {unknown}" if unknown else "")
        )
    return [by_text[w] for w in wanted]


def _check_column(scenario: str, column: str, values: Sequence[Hashable]) -> None:
    bad = [i for i, v in enumerate(values) if _missing(v)]
    if bad:
        raise ValueError(
            f"scenario {scenario!r}: column {column!r} is empty on {len(bad)} row(s) "
            f"(first: row {bad[0]}); every row needs a value"
        )


def _positive_int(scenario: str, key: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"scenario {scenario!r}: {key}={value!r} must be an integer >= 1 or null")


def check_plan_options(scenario: str, options: Mapping[str, Any]) -> None:
    """Check the values of :data:`PLAN_OPTIONS` in ``options`` (reads no data).

    Raises:
        ValueError: naming the option, its value and what is allowed.
    """
    for key in ("max_per_class", "n_experiences"):
        _positive_int(scenario, key, options.get(key))
    share = options.get("test_share", 0.2)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ValueError(f"scenario {scenario!r}: test_share={share!r} must be a number in (0, 1)")
    order = options.get("order")
    if order is not None and (
        not isinstance(order, (list, tuple))
        or not order
        or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in order)
    ):
        raise ValueError(
            f"scenario {scenario!r}: order={order!r} must be a non-empty list of experience "
            f"(or, without an experience column, label) values"
        )


def check_source(scenario: str, options: Mapping[str, Any], *, has_split: bool = False) -> None:
    """Check where the rows come from: ``path`` alone, or ``train`` and ``test`` together;
    each must exist. ``test_share`` is refused where the test rows are given (by ``train``
    and ``test``, or, with ``has_split``, by a split column).

    Raises:
        ValueError: naming the options and what is expected.
        FileNotFoundError: a path that does not exist.
    """
    path, train, test = (options.get(k) for k in ("path", "train", "test"))
    for key, value in (("path", path), ("train", train), ("test", test)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"scenario {scenario!r}: {key}={value!r} must be a path")
    if (path is None) == (train is None) or (train is None) != (test is None):
        raise ValueError(
            f"scenario {scenario!r}: give either 'path' (all rows), or 'train' and 'test' "
            f"(rows of each split); got path={path!r}, train={train!r}, test={test!r}"
        )
    for value in (path, train, test):
        if value is not None and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"scenario {scenario!r}: {value!r} does not exist")
    if "test_share" in options and (train is not None or has_split):
        given = "'train' and 'test'" if train is not None else "the split column"
        raise ValueError(
            f"scenario {scenario!r}: test_share={options['test_share']!r} splits rows that "
            f"have no split, but {given} already split them; leave test_share out"
        )


def plan_rows(
    scenario: str,
    labels: Sequence[Hashable],
    *,
    setting: Setting,
    experiences: Sequence[Hashable] | None = None,
    is_test: Sequence[bool] | np.ndarray | None = None,
    order: Sequence[object] | None = None,
    n_experiences: int | None = None,
    max_per_class: int | None = None,
    test_share: float = 0.2,
    seed: int = 0,
    label_column: str = "label",
    experience_column: str = "experience",
) -> RowPlan:
    """Cut labelled rows into experiences (see the module docstring).

    Args:
        scenario: the scenario's name, for messages.
        labels: ``n`` class values (strings or numbers).
        setting: ``class``, ``task`` or ``domain``.
        experiences: ``n`` experience values, or ``None`` (classes grouped into experiences).
        is_test: ``n`` flags, true on test rows; ``None``: split by ``test_share``.
        order: experience values in stream order (without ``experiences``: class values, in
            the order they are grouped); a subset leaves the other rows out.
        n_experiences: groups of classes without ``experiences`` (default: ``classes // 2``).
        max_per_class: at most this many rows per class, experience and split.
        test_share: the share of each class and experience drawn for test (0 < share < 1).
        seed: seeds the split and the draws of ``max_per_class``.
        label_column, experience_column: the columns' names, for messages.

    Raises:
        ValueError: an empty value, a class in several experiences under ``class``, a class
            too small to split, an experience without train or test rows, or a bad option.
    """
    n = len(labels)
    _check_column(scenario, label_column, labels)
    if experiences is not None:
        if len(experiences) != n:
            raise ValueError(f"{len(experiences)} experience values for {n} labels")
        _check_column(scenario, experience_column, experiences)
    test_flags = None if is_test is None else np.asarray(is_test, dtype=bool)
    if test_flags is not None and test_flags.shape != (n,):
        raise ValueError(f"{test_flags.shape[0]} split flags for {n} labels")
    if not 0 < test_share < 1:
        raise ValueError(f"scenario {scenario!r}: test_share={test_share!r} must be in (0, 1)")

    # -- the experiences: names and, per experience, the label values in it
    label_text = [str(v) for v in labels]
    if experiences is not None:
        if n_experiences is not None:
            raise ValueError(
                f"scenario {scenario!r}: n_experiences={n_experiences} groups classes, but the "
                f"experiences come from the column {experience_column!r}; leave one out"
            )
        names = _ordered(scenario, "experience", _distinct_sorted(experiences), order)
        position = {str(v): i for i, v in enumerate(names)}
        row_exp = np.array([position.get(str(v), -1) for v in experiences], dtype=np.int64)
        exp_names = tuple(str(v) for v in names)
    else:
        if setting is Setting.DOMAIN:
            raise ValueError(
                f"scenario {scenario!r}: the domain setting needs an experience column "
                f"(option 'experience') whose values are the domains"
            )
        classes = _ordered(scenario, "label", _distinct_sorted(labels), order)
        count = max(1, len(classes) // 2) if n_experiences is None else n_experiences
        if not 1 <= count <= len(classes):
            raise ValueError(
                f"scenario {scenario!r}: n_experiences={count} must be between 1 and the "
                f"{len(classes)} classes"
            )
        groups = np.array_split(np.arange(len(classes)), count)
        group_of = {str(classes[i]): g for g, idx in enumerate(groups) for i in idx}
        row_exp = np.array([group_of.get(t, -1) for t in label_text], dtype=np.int64)
        exp_names = tuple("+".join(str(classes[i]) for i in idx) for idx in groups)

    # -- global class ids
    pairs = sorted({(int(e), t) for e, t in zip(row_exp, label_text) if e >= 0})
    value_of = {str(v): v for v in labels}
    in_exp: list[list[str]] = [[] for _ in exp_names]
    for e, t in pairs:
        in_exp[e].append(t)
    for e, present in enumerate(in_exp):  # label order within an experience: sorted values
        in_exp[e] = [str(v) for v in _distinct_sorted([value_of[t] for t in present])]
    owners: dict[str, list[str]] = {}
    for e, present in enumerate(in_exp):
        for t in present:
            owners.setdefault(t, []).append(exp_names[e])
    shared = {t: where for t, where in owners.items() if len(where) > 1}
    if setting is Setting.CLASS and shared:
        t, where = next(iter(shared.items()))
        raise ValueError(
            f"scenario {scenario!r}: class {t!r} appears in the experiences {where}; the class "
            f"setting needs each class in one experience (setting 'domain' or 'task' lets "
            f"experiences share classes)"
        )
    class_names: list[str] = []
    ids: dict[tuple[int, str], int] = {}
    if setting is Setting.DOMAIN:
        all_labels = [str(v) for v in _distinct_sorted([value_of[t] for t in owners])]
        class_names = all_labels
        ids = {(e, t): all_labels.index(t) for e, present in enumerate(in_exp) for t in present}
    else:
        prefix = setting is Setting.TASK and bool(shared)
        for e, present in enumerate(in_exp):
            for t in present:
                ids[(e, t)] = len(class_names)
                class_names.append(f"{exp_names[e]}/{t}" if prefix else t)
    row_label = np.array(
        [ids[(int(e), t)] if e >= 0 else -1 for e, t in zip(row_exp, label_text)], dtype=np.int64
    )

    # -- splits and caps, per experience and class
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for e, name in enumerate(exp_names):
        rng = np.random.default_rng([seed, e])
        tr_parts: list[np.ndarray] = []
        te_parts: list[np.ndarray] = []
        for c in sorted({ids[(e, t)] for t in in_exp[e]}):
            rows = rng.permutation(np.flatnonzero((row_exp == e) & (row_label == c)))
            if test_flags is not None:
                tr, te = rows[~test_flags[rows]], rows[test_flags[rows]]
            else:
                if len(rows) < 2:
                    raise ValueError(
                        f"scenario {scenario!r}: class {class_names[c]!r} has {len(rows)} row in "
                        f"experience {name!r}; at least 2 are needed to split train and test"
                    )
                k = min(max(1, round(test_share * len(rows))), len(rows) - 1)
                tr, te = rows[k:], rows[:k]
            tr_parts.append(tr[:max_per_class])
            te_parts.append(te[:max_per_class])
        tr_rows = np.sort(np.concatenate(tr_parts)) if tr_parts else np.zeros(0, np.int64)
        te_rows = np.sort(np.concatenate(te_parts)) if te_parts else np.zeros(0, np.int64)
        for split, rows in (("train", tr_rows), ("test", te_rows)):
            if len(rows) == 0:
                raise ValueError(f"scenario {scenario!r}: experience {name!r} has no {split} rows")
        train.append(tr_rows.astype(np.int64))
        test.append(te_rows.astype(np.int64))

    return RowPlan(
        train=tuple(train),
        test=tuple(test),
        labels=row_label,
        class_names=tuple(class_names),
        experience_classes=tuple(
            tuple(sorted({ids[(e, t)] for t in in_exp[e]})) for e in range(len(exp_names))
        ),
        experience_names=exp_names,
        task_labels=tuple(e if setting is Setting.TASK else 0 for e in range(len(exp_names))),
        setting=setting,
    )
