"""The markdown report of a continual run, rebuilt from ``metrics.json`` alone.

``comparison_table`` gives the one table that compares the strategies, validation and test
side by side; ``write_report`` writes ``RUN_DIR/report.md`` (title, how the run selects,
table, early stopping, definitions, accuracy matrices, routing, plots) and the figures in
``RUN_DIR/plots/``.

A run that held out validation splits reports each metric twice, as ``val ...`` (on the
validation splits) and ``test ...``; a run that never read its test split reports the
validation numbers only and says so; a run without validation splits (and files written
before runs had them) keeps the plain column names (``ACC``, ``BWT``, ...), on the test split.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moracl.continual.metrics import AccuracyMatrix, RunResults, StrategyResult
from moracl.files import write_atomic

__all__ = ["REPORT_FILE", "comparison_table", "render_report", "write_report"]

REPORT_FILE = "report.md"
MISSING = "n/a"

#: the columns of a run without validation splits (its metrics are on the test split)
COLUMNS = [
    "strategy",
    "ACC",
    "avg inc. ACC",
    "BWT",
    "FWT",
    "forgetting (max)",
    "trainable params (% of backbone)",
    "active params/token",
    "wall time",
    "peak memory",
]
COST_COLUMNS = COLUMNS[6:]

#: a split a run measured: its column prefix and how to read a strategy's matrix on it
Split = tuple[str, Callable[[StrategyResult], AccuracyMatrix | None]]
VALIDATION: Split = ("val", lambda s: s.validation)
TEST: Split = ("test", lambda s: s.matrix)

#: metric name -> how it is computed from an accuracy matrix
METRICS: dict[str, Callable[[AccuracyMatrix], float]] = {
    "ACC": AccuracyMatrix.acc,
    "avg inc. ACC": AccuracyMatrix.average_incremental_accuracy,
    "BWT": AccuracyMatrix.bwt,
    "FWT": AccuracyMatrix.fwt,
    "forgetting (max)": AccuracyMatrix.forgetting,
}

# (column, formula) exactly as in DESIGN.md "Metric definitions".
DEFINITIONS = [
    ("ACC", "ACC = mean_j R[T-1][j]"),
    ("avg inc. ACC", "average incremental accuracy = mean_i mean_{j<=i} R[i][j]"),
    ("BWT", "BWT = mean_{j<T-1} (R[T-1][j] − R[j][j])"),
    ("FWT", "FWT = mean_{j>0} (R[j-1][j] − b[j])"),
    (
        "forgetting (max)",
        "Forgetting (max-based) = mean_{j<T-1} (max_{l<T-1} R[l][j] − R[T-1][j])",
    ),
    (
        "forgetting (first − last)",
        "Forgetting (first − last, Avalanche) = mean_{j<T-1} (R[j][j] − R[T-1][j])",
    ),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns align left, the rest (numbers) right."""
    rule = [":---" if k < left else "---:" for k in range(len(header))]
    return "\n".join([_row(header), _row(rule), *(_row(r) for r in rows)])


def points(x: float) -> str:
    """An accuracy (or difference of accuracies) in [0, 1] scale as points, one decimal."""
    if math.isnan(x):
        return MISSING
    text = f"{100.0 * x:.1f}"
    return "0.0" if text == "-0.0" else text


def count(n: float) -> str:
    """A parameter count with a K/M/B suffix (``1.23M``)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(n / scale, 2) >= 1.0:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``1 h 02 min``."""
    if seconds < 60.0:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def memory(n: int | None) -> str:
    """Bytes in binary units; ``n/a`` when not measured."""
    if n is None:
        return MISSING
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _share(s: StrategyResult) -> str:
    share = s.cost.trainable_share
    pct = MISSING if math.isnan(share) else f"{100.0 * share:.3g}%"
    return f"{count(s.cost.trainable_parameters)} ({pct})"


def _splits(results: RunResults) -> list[Split]:
    """The splits ``results`` measured, validation first."""
    held_out = any(s.validation is not None for s in results.strategies.values())
    return [*([VALIDATION] if held_out else []), *([TEST] if results.test_evaluated else [])]


def _metric(s: StrategyResult, split: Split, name: str) -> str:
    m = split[1](s)
    return MISSING if m is None else points(METRICS[name](m))


def comparison_table(results: RunResults) -> str:
    """One markdown row per strategy; accuracies and their differences in points (one
    decimal). With validation splits: ``val ACC``, ``test ACC``, ``val BWT``, ``test BWT``,
    then average incremental accuracy, FWT and max-based forgetting on the test split (on
    the validation splits when the test split was not evaluated), then the costs."""
    splits = _splits(results)
    if [p for p, _ in splits] == ["test"]:  # no validation: the plain names, as ever
        columns = [(name, TEST, name) for name in METRICS]
    else:
        last = splits[-1]
        columns = [(f"{p} {n}", (p, f), n) for n in ("ACC", "BWT") for p, f in splits]
        columns += [(f"{last[0]} {n}", last, n) for n in METRICS if n not in ("ACC", "BWT")]
    rows = []
    for s in results.strategies.values():
        rows.append(
            [
                _cell(s.label),
                *(_metric(s, split, name) for _, split, name in columns),
                _share(s),
                count(s.cost.active_parameters_per_token),
                duration(s.cost.wall_seconds),
                memory(s.cost.peak_memory_bytes),
            ]
        )
    return _table(["strategy", *(c for c, _, _ in columns), *COST_COLUMNS], rows)


def _val_share(results: RunResults) -> Any:
    scenario = results.config.get("scenario")
    return scenario.get("val_share") if isinstance(scenario, dict) else None


def _stopping_rule(results: RunResults) -> Any:
    train = results.config.get("train")
    return train.get("early_stopping") if isinstance(train, dict) else None


def _selection(results: RunResults) -> list[str]:
    """How the run's numbers may be used for model selection, in a few sentences."""
    held_out = any(s.validation is not None for s in results.strategies.values())
    lines = []
    if held_out:
        share = _val_share(results)
        amount = f"{100 * share:g}% of" if isinstance(share, (int, float)) else "a share of"
        rule = _stopping_rule(results)
        stopping = ""
        if isinstance(rule, dict):
            stopping = (
                f" Early stopping watched `{rule.get('metric')}` on the validation split of the "
                f"experience being trained (patience {rule.get('patience')}, min_delta "
                f"{rule.get('min_delta')}) and kept the best epoch's weights."
            )
        test = (
            " `test` columns are on the test split, which no choice of the run reads."
            if results.test_evaluated
            else ""
        )
        lines.append(
            f"**Model selection uses validation only.** `val` columns are measured on "
            f"validation splits: {amount} each class's training rows of every experience, held "
            f"out before training (seeded by `train.seed`); no strategy trains on them."
            f"{stopping}{test}"
        )
    else:
        lines.append(
            "No validation split was held out (`scenario.val_share` 0): these numbers are on "
            "the test split and are not fit for choosing hyperparameters."
        )
    if not results.test_evaluated:
        lines.append(
            "**The test split was not evaluated** (a run for model selection): every number "
            "in this report is on the validation splits."
        )
    out: list[str] = []
    for line in lines:
        out += [line, ""]
    return out


def _early_stopping(results: RunResults) -> list[str]:
    """A table of each strategy's best epoch and epochs run per experience."""
    stopped = [s for s in results.strategies.values() if s.early_stopping]
    if not stopped:
        return []
    experiences = results.experiences
    rows = []
    for s in stopped:
        by_exp = {r.experience: r for r in s.early_stopping}
        cells = []
        for i in range(len(experiences)):
            r = by_exp.get(i)
            cells.append("" if r is None else f"{r.best_epoch} / {r.epochs_run}")
        rows.append([_cell(s.label), *cells])
    header = ["strategy", *(f"{i}: {_cell(e)}" for i, e in enumerate(experiences))]
    return [
        "## Early stopping",
        "",
        "Best epoch (0-based, its weights kept) / epochs run, per experience trained (Joint: "
        "once, on the whole stream, on every validation split):",
        "",
        _table(header, rows),
        "",
    ]


def _definitions() -> list[str]:
    lines = [
        "## Definitions",
        "",
        "`R[i][j]` = accuracy on experience `j` after training through experience `i` "
        "(0-based, `T` experiences), plus `b[j]` = accuracy of the initial model. `test` "
        "metrics read `R` on the test experiences, `val` metrics the same formulas on each "
        "experience's validation split (`R_val`).",
        "",
        _table(["column", "definition"], [[c, f"`{f}`"] for c, f in DEFINITIONS], left=2),
        "",
        "Accuracies and their differences are in points (percent). `forgetting (max)` is the "
        "max-based forgetting; the max runs over every earlier evaluation `l < T-1`. "
        "Avalanche's `StreamForgetting` is first-minus-last, reported separately as "
        "`forgetting (first − last)`. A value is n/a when an entry its formula needs was not "
        "measured (a run in progress; joint training, which has only the final row).",
        "",
        "Cost: `trainable params` are the parameters the strategy updates, with their share of "
        "the backbone's parameter count; `active params/token` are the parameters a token "
        "passes through (mean over tokens for input-dependent routing); `wall time` is the "
        "wall-clock time of the strategy's whole run (training and evaluation); `peak memory` is "
        "the peak accelerator memory allocated (n/a when not measured).",
    ]
    return lines


def _matrix_table(m: AccuracyMatrix, experiences: list[str]) -> str:
    header = ["after \\ evaluated on", *(_cell(e) for e in experiences)]
    rows = [["initial (b)", *(points(x) for x in m.b)]]
    for i, e in enumerate(experiences):
        rows.append([f"{i}: {_cell(e)}", *(points(x) for x in m.R[i])])
    return _table(header, rows)


def _matrices(s: StrategyResult, experiences: list[str]) -> list[str]:
    """The strategy's test matrix, then its validation matrix (each when measured)."""
    both = s.matrix is not None and s.validation is not None
    lines = [f"### {_cell(s.label)}", ""]
    for title, m in (("Test", s.matrix), ("Validation", s.validation)):
        if m is None:
            continue
        if both or m is s.validation:
            lines += [f"{title}:", ""]
        lines += [_matrix_table(m, experiences), ""]
    return lines


def _routing(s: StrategyResult, experiences: list[str]) -> list[str]:
    r = s.routing
    if r is None:
        return []
    tia = r.task_inference_accuracy
    lines = [
        f"### {_cell(s.label)}",
        "",
        f"Task inference accuracy: {MISSING if tia is None else points(tia) + '%'}",
        "",
    ]
    if any(r.expert_usage):
        n_exp = max(len(row) for row in r.expert_usage)
        same = len(experiences) == len(r.expert_usage)
        names = experiences if same else [f"task {t}" for t in range(len(r.expert_usage))]
        rows = []
        for name, row, per_token in zip(names, r.expert_shares(), r.experts_per_token()):
            padded = list(row) + [float("nan")] * (n_exp - len(row))
            rows.append([_cell(name), *(points(x) for x in padded), f"{per_token:.2f}"])
        lines += [
            "Each expert's share of a task's routings (%; a token routed to k experts counts "
            "1/k for each, so a row sums to 100; n/a: the expert did not exist yet), and the "
            "experts a token is routed to:",
            "",
            _table(["task", *(f"e{e}" for e in range(n_exp)), "experts per token"], rows),
            "",
        ]
    return lines


def _progress(results: RunResults) -> list[str]:
    """A note for each strategy still running (its final row not measured yet)."""
    t = len(results.experiences)
    notes = []
    for s in results.strategies.values():
        m = s.measured
        if t - 1 not in m.measured_rows:
            k = m.last_completed
            note = f"- {_cell(s.label)}: evaluated after {k + 1} of {t} experiences"
            if k >= 0:
                so_far = m.upto(k)
                note += (
                    f"; as if the stream ended at `{_cell(results.experiences[k])}`: "
                    f"ACC {points(so_far.acc())}, BWT {points(so_far.bwt())}, "
                    f"forgetting (max) {points(so_far.forgetting())}"
                )
            notes.append(note)
    return ["**In progress:**", "", *notes, ""] if notes else []


def render_report(results: RunResults, plots: dict[str, str] | None = None) -> str:
    """The report's markdown; ``plots`` maps a caption to a path relative to the run folder."""
    t = len(results.experiences)
    lines = [
        f"# {_cell(results.scenario)} — {_cell(results.setting)}, seed {results.seed}",
        "",
        f"Stream of {t} experiences: " + ", ".join(f"`{_cell(e)}`" for e in results.experiences),
        "",
        *_progress(results),
        "## Results",
        "",
        *_selection(results),
        comparison_table(results),
        "",
        "Avalanche's forgetting (first − last), reported separately:",
        "",
        _forgetting_table(results),
        "",
        *_early_stopping(results),
        *_definitions(),
        "",
        "## Accuracy matrices",
        "",
        "Rows: after training through experience `i`; columns: evaluated experience `j`; points.",
        "",
    ]
    for s in results.strategies.values():
        lines += _matrices(s, results.experiences)
    routed = [s for s in results.strategies.values() if s.routing is not None]
    if routed:
        lines += ["## Routing", ""]
        for s in routed:
            lines += _routing(s, results.experiences)
    if plots:
        lines += ["## Plots", ""]
        for caption, rel in plots.items():
            alt = caption.replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({rel})", ""]
    lines += [
        "## Configuration",
        "",
        "```json",
        json.dumps(results.config, indent=2, sort_keys=True, allow_nan=False),
        "```",
        "",
    ]
    return "\n".join(lines)


def _forgetting_table(results: RunResults) -> str:
    splits = _splits(results)
    plain = [p for p, _ in splits] == ["test"]
    header = ["strategy"] + [
        "forgetting (first − last)" if plain else f"{p} forgetting (first − last)"
        for p, _ in splits
    ]
    rows = []
    for s in results.strategies.values():
        cells = []
        for _, read in splits:
            m = read(s)
            cells.append(MISSING if m is None else points(m.forgetting_first_minus_last()))
        rows.append([_cell(s.label), *cells])
    return _table(header, rows)


def write_report(run_dir: str | os.PathLike[str], *, plots: bool = True) -> Path:
    """Rebuild ``run_dir/report.md`` (and ``run_dir/plots/*.png``) from ``metrics.json``."""
    root = Path(run_dir)
    results = RunResults.load(root)
    links: dict[str, str] = {}
    if plots:
        from moracl.report.plots import PLOTS_DIR, write_plots

        files = write_plots(results, root / PLOTS_DIR)
        if files.summary is not None:
            links["ACC and BWT"] = f"{PLOTS_DIR}/{files.summary.name}"
        if files.accuracy_curves is not None:
            links["accuracy per experience"] = f"{PLOTS_DIR}/{files.accuracy_curves.name}"
        label = {n: s.label for n, s in results.strategies.items()}
        kind = "accuracy matrix" if results.test_evaluated else "validation accuracy matrix"
        for name, p in files.accuracy_matrices.items():
            links[f"{kind}: {label[name]}"] = f"{PLOTS_DIR}/{p.name}"
        for name, p in files.validation_matrices.items():
            links[f"validation accuracy matrix: {label[name]}"] = f"{PLOTS_DIR}/{p.name}"
        for name, p in files.expert_usage.items():
            links[f"expert usage: {label[name]}"] = f"{PLOTS_DIR}/{p.name}"
    path = root / REPORT_FILE
    write_atomic(path, render_report(results, links))
    return path
