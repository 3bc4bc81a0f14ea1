"""The tables of ``moracl bench continual`` and its quality targets, from run results.

Every number of a target is a TEST number of moracl's row (``StrategyResult.matrix``), the
mean over the seeds of one stream; validation accuracies (``StrategyResult.validation``) are
reported beside the test ones and have no part in any target. The targets, each stream:

- ACC at least the best baseline's other than Joint (the baseline of the best mean ACC);
- ACC at least Naive's;
- BWT >= -1 point (task-incremental streams only);
- ACC within 3 points of Joint's;
- trainable parameters <= 2 % of the backbone (the largest share over the seeds).

Each :class:`Target` carries its margin: how far the measured value is on the right side of
the threshold (negative: by how much it misses). A value within 1e-9 of its threshold meets
it (floating-point rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moracl.bench.common import markdown_table
from moracl.bench.loopcost import LoopCost
from moracl.continual.metrics import AccuracyMatrix, RunResults, StrategyResult

__all__ = [
    "JOINT",
    "MAX_RATIO",
    "MAX_RATIO_CUDA",
    "MORACL",
    "NAIVE",
    "Target",
    "check_seed_targets",
    "check_targets",
    "loop_cost_table",
    "per_seed_table",
    "scenario_table",
    "seed_differences",
    "seed_table",
    "stream_markdown",
    "targets_table",
]

#: the registry names of moracl, Naive and Joint (keys of ``RunResults.strategies``)
MORACL = "moracl"
NAIVE = "naive"
JOINT = "joint"
#: the loop-cost target: template time over plain-loop time
MAX_RATIO = 1.3
#: the loop-cost target on CUDA (``moracl run --device cuda``)
MAX_RATIO_CUDA = 1.2
#: a value no number can be compared with (a missing row)
_NAN = float("nan")
#: a measured value this close to its threshold meets it (floating-point rounding: a BWT of
#: (0.89 - 0.9) is -0.010000000000000009)
_TIE = 1e-9


@dataclass(frozen=True)
class Target:
    """One quality target on moracl's row.

    Attributes:
        name: the target (``"ACC >= Naive"``).
        value: what was measured, as shown (points; ``"vs"`` the reference it is held to).
        margin: the measured value minus the threshold, as a fraction (``0.021``: 2.1 points
            to spare; negative: missed by that much; NaN: not measurable, and not met).
        met: whether the target holds.
        unit: ``"points"`` (accuracy points) or ``"%"`` (percent of the backbone).
    """

    name: str
    value: str
    margin: float
    met: bool
    unit: str = "points"

    @property
    def margin_text(self) -> str:
        """The margin as shown: ``+2.1 points``, ``-0.30 %``, ``n/a``."""
        if math.isnan(self.margin):
            return "n/a"
        if self.unit == "%":
            return f"{_signed(self.margin, 2)} %"
        return f"{_signed(self.margin)} points"

    @property
    def verdict(self) -> str:
        """``met`` or ``NOT MET``."""
        return "met" if self.met else "NOT MET"


def _signed(x: float, decimals: int = 1) -> str:
    """A signed difference in points (``+2.1``, ``-0.4``; a zero is ``+0.0``; NaN ``n/a``)."""
    if math.isnan(x):
        return "n/a"
    text = f"{100 * x:+.{decimals}f}"
    return "+" + text[1:] if float(text) == 0 else text


def _pts(x: float | None) -> str:
    """A fraction in points (``0.701`` -> ``70.1``); ``–`` for no value, ``n/a`` for NaN."""
    if x is None:
        return "–"
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _spread(values: Sequence[float | None], *, signed: bool = False) -> str:
    """``mean ± sd`` in points over the seeds (the mean alone for one seed; ``–`` when any
    seed has no value); ``signed``: the mean of differences, with its sign (``+2.1 ± 0.4``)."""
    if any(v is None for v in values):
        return "–"
    numbers = [float(v) for v in values if v is not None]
    mean, sd = _mean_sd(numbers)
    shown = _signed(mean) if signed else _pts(mean)
    if len(numbers) < 2 or math.isnan(mean):
        return shown
    return f"{shown} ± {_pts(sd)}"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _test(s: StrategyResult) -> AccuracyMatrix:
    """The strategy's test matrix.

    Raises:
        ValueError: the run did not evaluate on the test split.
    """
    if s.matrix is None:
        raise ValueError(
            f"strategy {s.name!r} has no test matrix; the benchmark needs runs that evaluate "
            "on the test split (evaluate_test=True)"
        )
    return s.matrix


def _val_acc(s: StrategyResult) -> float | None:
    """ACC on the validation splits (``None`` for a run without a validation split)."""
    return None if s.validation is None else s.validation.acc()


# -- targets ----------------------------------------------------------------------------------


def check_targets(results: RunResults) -> list[Target]:
    """The targets on moracl's row of one run (see the module docstring).

    Raises:
        ValueError: ``results`` has no moracl row, or a row without a test matrix.
    """
    return check_seed_targets([results])


def _not_measurable(name: str, why: str) -> Target:
    return Target(name, why, _NAN, False)


def check_seed_targets(runs: Sequence[RunResults]) -> list[Target]:
    """The targets on moracl's TEST numbers, means over ``runs`` (one stream, one run per
    seed). ACC is compared with the baseline of the best mean ACC (Joint aside); with several
    seeds its value also gives moracl's per-seed difference from that baseline, mean ± sd. A
    reference strategy missing from the runs makes its target not met ("no ... row").

    Raises:
        ValueError: no runs, a run without a moracl row, or a row without a test matrix.
    """
    if not runs:
        raise ValueError("check_seed_targets needs at least one run")
    for results in runs:
        if MORACL not in results.strategies:
            raise ValueError(f"no {MORACL!r} row in the results; have {list(results.strategies)}")
    first = runs[0].strategies

    def accs(name: str) -> list[float]:
        return [_test(r.strategies[name]).acc() for r in runs]

    ours = accs(MORACL)
    acc = _mean_sd(ours)[0]
    targets = []

    name = "ACC >= best baseline (not Joint)"
    others = [n for n in first if n not in (MORACL, JOINT)]
    if others:
        means = {n: _mean_sd(accs(n))[0] for n in others}
        best = max(others, key=lambda n: -math.inf if math.isnan(means[n]) else means[n])
        diff = [a - b for a, b in zip(ours, accs(best))]
        extra = f" (per seed {_spread(diff, signed=True)})" if len(runs) > 1 else ""
        value = f"{_pts(acc)} vs {first[best].label} {_pts(means[best])}{extra}"
        targets.append(Target(name, value, acc - means[best], acc - means[best] >= -_TIE))
    else:
        targets.append(_not_measurable(name, "no baseline other than Joint"))

    name = "ACC >= Naive"
    if NAIVE in first:
        naive = _mean_sd(accs(NAIVE))[0]
        value = f"{_pts(acc)} vs {first[NAIVE].label} {_pts(naive)}"
        targets.append(Target(name, value, acc - naive, acc - naive >= -_TIE))
    else:
        targets.append(_not_measurable(name, f"no {NAIVE!r} row"))

    if runs[0].setting == "task":
        bwt = _mean_sd([_test(r.strategies[MORACL]).bwt() for r in runs])[0]
        targets.append(Target("BWT >= -1 point", _pts(bwt), bwt + 0.01, bwt + 0.01 >= -_TIE))

    name = "ACC within 3 points of Joint"
    if JOINT in first:
        joint = _mean_sd(accs(JOINT))[0]
        gap = joint - acc
        value = f"{_pts(acc)} vs {first[JOINT].label} {_pts(joint)} ({_signed(-gap)})"
        targets.append(Target(name, value, 0.03 - gap, 0.03 - gap >= -_TIE))
    else:
        targets.append(_not_measurable(name, f"no {JOINT!r} row"))

    share = max(r.strategies[MORACL].cost.trainable_share for r in runs)
    targets.append(
        Target(
            "trainable <= 2 % of backbone",
            f"{100 * share:.2f}%",
            0.02 - share,
            0.02 - share >= -_TIE,
            unit="%",
        )
    )
    return targets


# -- tables -----------------------------------------------------------------------------------


def _targets_rows(targets: Sequence[Target]) -> list[list[str]]:
    return [[t.name, t.value, t.margin_text, t.verdict] for t in targets]


def _memory(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def scenario_table(results: RunResults) -> str:
    """One run (one seed): a row per strategy with the validation ACC (``–`` without a
    validation split), the test ACC, BWT and max-based forgetting (points), the trainable
    share of the backbone, wall seconds and peak memory; then moracl's targets on this run."""
    header = [
        "strategy",
        "val ACC",
        "ACC",
        "BWT",
        "forgetting",
        "trainable %",
        "wall s",
        "peak memory",
    ]
    rows = []
    for s in results.strategies.values():
        m = _test(s)
        rows.append(
            [
                s.label,
                _pts(_val_acc(s)),
                _pts(m.acc()),
                _pts(m.bwt()),
                _pts(m.forgetting()),
                f"{100 * s.cost.trainable_share:.2f}",
                f"{s.cost.wall_seconds:.1f}",
                _memory(s.cost.peak_memory_bytes),
            ]
        )
    lines = [markdown_table(header, rows)]
    if MORACL in results.strategies:
        header = ["target (moracl, test)", "measured", "margin", ""]
        lines += ["", markdown_table(header, _targets_rows(check_targets(results)))]
    return "\n".join(lines)


def seed_table(runs: Sequence[RunResults]) -> str:
    """A row per strategy with the validation ACC, test ACC, BWT and max-based forgetting as
    mean ± sample sd over ``runs`` (one per seed, points)."""
    header = ["strategy", f"val ACC ({_seeds(len(runs))})", "ACC", "BWT", "forgetting"]
    rows = []
    for name, s in runs[0].strategies.items():
        matrices = [_test(r.strategies[name]) for r in runs]
        rows.append(
            [
                s.label,
                _spread([_val_acc(r.strategies[name]) for r in runs]),
                _spread([m.acc() for m in matrices]),
                _spread([m.bwt() for m in matrices]),
                _spread([m.forgetting() for m in matrices]),
            ]
        )
    return markdown_table(header, rows)


def per_seed_table(runs: Sequence[RunResults]) -> str:
    """A row per strategy, a column per seed: validation ACC / test ACC / test BWT (points)."""
    header = ["strategy", *(f"seed {r.seed}: val / ACC / BWT" for r in runs)]
    rows = []
    for name, s in runs[0].strategies.items():
        cells = []
        for r in runs:
            one = r.strategies[name]
            m = _test(one)
            cells.append(f"{_pts(_val_acc(one))} / {_pts(m.acc())} / {_pts(m.bwt())}")
        rows.append([s.label, *cells])
    return markdown_table(header, rows)


def seed_differences(runs: Sequence[RunResults]) -> str:
    """Per seed, moracl's test ACC minus that of the best other strategy on that seed (Joint
    aside), then mean ± sample sd of the differences.

    Raises:
        ValueError: a run without a moracl row or without another strategy than Joint.
    """
    header = ["seed", "moracl ACC", "best other (not Joint)", "its ACC", "moracl − best other"]
    rows: list[list[Any]] = []
    diffs = []
    for r in runs:
        if MORACL not in r.strategies:
            raise ValueError(f"no {MORACL!r} row in seed {r.seed}; have {list(r.strategies)}")
        others = {n: _test(s).acc() for n, s in r.strategies.items() if n not in (MORACL, JOINT)}
        if not others:
            raise ValueError(f"seed {r.seed} has no strategy other than moracl and Joint")
        best = max(others, key=lambda n: -math.inf if math.isnan(others[n]) else others[n])
        ours = _test(r.strategies[MORACL]).acc()
        diffs.append(ours - others[best])
        rows.append(
            [r.seed, _pts(ours), r.strategies[best].label, _pts(others[best]), _signed(diffs[-1])]
        )
    if len(runs) > 1:
        rows.append(["mean ± sd", "", "", "", _spread(diffs, signed=True)])
    return markdown_table(header, rows)


def stream_markdown(key: str, runs: Sequence[RunResults], *, config: str, sizes: str) -> str:
    """Everything the record shows of one stream: its config and sizes, the mean ± sd table,
    the per-seed table, moracl's per-seed difference from the best other strategy, and the
    targets on the means."""
    seeds = ", ".join(str(r.seed) for r in runs)
    header = [f"target (moracl, test, mean of {_seeds(len(runs))})", "measured", "margin", ""]
    parts = [
        f"### {key}",
        f"`{config}` as it is; {sizes}; {len(runs[0].experiences)} experiences; seeds {seeds}.",
        seed_table(runs),
        per_seed_table(runs),
        seed_differences(runs),
        markdown_table(header, _targets_rows(check_seed_targets(runs))),
    ]
    return "\n\n".join(parts)


def targets_table(by_stream: Mapping[str, Sequence[Target]]) -> str:
    """Every stream's targets in one table: stream, target, measured, margin, met/NOT MET."""
    header = ["stream", "target (moracl, test)", "measured", "margin", "result"]
    rows = [
        [key, t.name, t.value, t.margin_text, t.verdict]
        for key, targets in by_stream.items()
        for t in targets
    ]
    return markdown_table(header, rows)


def loop_cost_table(rows: Sequence[LoopCost], device: str = "cpu") -> str:
    """One markdown row per measurement: steps, the times of the template, the plain loop and
    the plain loop with the template's non-finite check, the ratio against the target (on
    CUDA :data:`MAX_RATIO_CUDA`, else :data:`MAX_RATIO`), and the largest weight difference
    between the loops."""
    target = MAX_RATIO_CUDA if device == "cuda" else MAX_RATIO

    def checked(r: LoopCost) -> list[str]:
        if r.checked_seconds is None or r.checked_ratio is None:
            return ["—", "—"]
        return [f"{r.checked_seconds:.3f}", f"{r.checked_ratio:.2f}x"]

    body = [
        [
            r.name,
            r.examples,
            r.steps,
            f"{r.template_seconds:.3f}",
            f"{r.plain_seconds:.3f}",
            f"{r.ratio:.2f}x",
            "met" if r.ratio <= target + _TIE else "**not met**",
            *checked(r),
            f"{r.max_weight_diff:.1e}",
        ]
        for r in rows
    ]
    header = [
        "model (experience 0)",
        "examples",
        "steps",
        "template s",
        "plain loop s",
        "ratio",
        f"<= {target}x",
        "checked loop s",
        "template / checked",
        "max \\|Δw\\|",  # the bars escaped: a markdown table's cell
    ]
    return markdown_table(header, body)
