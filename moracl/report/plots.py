"""Figures of a continual run, as PNG files in ``RUN_DIR/plots/``.

Figures are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, so a user's
interactive backend is left alone). File names depend only on the strategy names:

- ``accuracy_matrix_<strategy>.png``: heatmap of ``R`` on the test split (on the validation
  splits when the run did not evaluate it; rows: after training through experience ``i``;
  columns: evaluated experience ``j``) with the initial accuracies ``b`` as the first row,
  every measured cell annotated in points;
- ``validation_matrix_<strategy>.png``: the same on the validation splits, for a run that
  evaluated both;
- ``accuracy_curves.png``: one panel per strategy, the accuracy on each experience ``j``
  against the training step (``init``, then after each experience), test split as above;
- ``expert_usage_<strategy>.png``: tasks × experts heatmap of the routing shares, for the
  strategies that report routing;
- ``summary_acc_bwt.png``: ACC and BWT bars across strategies (validation and test side by
  side when the run measured both).
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moracl.continual.metrics import AccuracyMatrix, RunResults
from moracl.files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOTS_DIR", "PlotFiles", "plot_slugs", "write_plots"]

PLOTS_DIR = "plots"
_DPI = 90


@dataclass
class PlotFiles:
    """Paths of the figures written for a run (keys are strategy names)."""

    accuracy_matrices: dict[str, Path] = field(default_factory=dict)
    accuracy_curves: Path | None = None
    expert_usage: dict[str, Path] = field(default_factory=dict)
    summary: Path | None = None
    validation_matrices: dict[str, Path] = field(default_factory=dict)

    def all(self) -> list[Path]:
        """Every path, in a fixed order."""
        paths = [*self.accuracy_matrices.values(), *self.validation_matrices.values()]
        paths += [p for p in (self.accuracy_curves,) if p is not None]
        paths += [*self.expert_usage.values()]
        paths += [p for p in (self.summary,) if p is not None]
        return paths


def plot_slugs(names: list[str]) -> dict[str, str]:
    """File-name stems for strategy names: lower case, ``[a-z0-9_-]``, unique (``_2``...)."""
    slugs: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_") or "strategy"
        slug, n = base, 1
        while slug in taken:
            n += 1
            slug = f"{base}_{n}"
        taken.add(slug)
        slugs[name] = slug
    return slugs


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float) -> None:
    """Fixed margins in inches (a layout engine would draw every figure twice)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _save(fig: Figure, path: Path) -> Path:
    """Save as PNG, atomically (:func:`moracl.files.write_atomic`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    write_atomic(path, buffer.getvalue())
    return path


def _short(names: list[str], limit: int = 14) -> list[str]:
    return [n if len(n) <= limit else n[: limit - 1] + "…" for n in names]


def _heatmap(
    ax: Any, values: np.ndarray, rows: list[str], cols: list[str], vmax: float = 1.0
) -> None:
    """Annotated heatmap of ``values (rows, cols)`` in points; NaN cells stay blank."""
    masked = np.ma.masked_invalid(values)
    ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=_short(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=_short(rows, 20))
    small = len(cols) <= 12 and len(rows) <= 13
    for (i, j), v in np.ndenumerate(values):
        if small and not math.isnan(v):
            color = "black" if v > 0.6 * vmax else "white"
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color=color, fontsize=8)


def _matrix_figure(
    name: str, R: np.ndarray, b: np.ndarray, experiences: list[str], what: str = "accuracy"
) -> Figure:
    t = len(experiences)
    values = np.vstack([b[None, :], R])  # (T+1, T)
    rows = ["initial"] + [f"after {e}" for e in experiences]
    # the left margin holds a row label of up to 20 characters ("after adjectives+ad…")
    fig = _new_figure(2.3 + 0.75 * t, 1.6 + 0.4 * (t + 1))
    _margins(fig, left=1.8, right=0.2, bottom=1.3, top=0.35)
    ax = fig.add_subplot()
    _heatmap(ax, values, rows, experiences)
    ax.set_xlabel("evaluated experience j")
    ax.set_title(f"{name}: {what} (%)", fontsize=10)
    return fig


def _curves_figure(results: RunResults) -> Figure:
    names = list(results.strategies)
    t = len(results.experiences)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _new_figure(0.6 + 3.0 * cols, 0.9 + 2.4 * nrows)
    _margins(fig, left=0.6, right=0.15, bottom=1.0, top=0.3)
    fig.subplots_adjust(wspace=0.08, hspace=0.55)
    first = None
    steps = ["init", *[str(i) for i in range(t)]]
    x = np.arange(t + 1)
    for k, name in enumerate(names):
        ax = fig.add_subplot(nrows, cols, k + 1, sharey=first)
        first = first or ax
        m = results.strategies[name].measured
        values = np.vstack([m.b[None, :], m.R])  # (T+1, T): step × experience
        for j, exp in enumerate(results.experiences):
            ax.plot(x, 100 * values[:, j], marker="o", markersize=3, label=exp)
        ax.set_xticks(x, labels=steps)
        ax.set_ylim(-2, 102)
        ax.set_title(results.strategies[name].label, fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("accuracy (%)")
        else:
            ax.tick_params(labelleft=False)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    h = fig.get_size_inches()[1]
    fig.legend(handles, _short(labels), loc="lower center", ncols=min(t, 6), fontsize=8)
    split = "" if results.test_evaluated else ", validation splits"
    fig.supxlabel(f"after training experience (init: initial model{split})", y=0.5 / h, fontsize=9)
    return fig


def _usage_figure(name: str, usage: list[list[float]], tasks: list[str]) -> Figure:
    n_exp = max(len(row) for row in usage)
    values = np.full((len(usage), n_exp), np.nan)  # (tasks, experts), NaN: not there yet
    for t, row in enumerate(usage):
        values[t, : len(row)] = row
    rows = tasks if len(tasks) == len(usage) else [f"task {t}" for t in range(len(usage))]
    vmax = max(1.0, float(np.nanmax(values)))
    fig = _new_figure(2.3 + 0.55 * n_exp, 1.2 + 0.4 * len(usage))
    _margins(fig, left=1.8, right=0.2, bottom=0.7, top=0.35)  # row labels up to 20 characters
    ax = fig.add_subplot()
    _heatmap(ax, values, rows, [f"e{e}" for e in range(n_exp)], vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_title(f"{name}: expert usage (%)", fontsize=10)
    return fig


def _summary_series(results: RunResults) -> list[tuple[str, list[float]]]:
    """``(legend label, value per strategy in points)`` of each bar series."""
    strategies = list(results.strategies.values())
    splits: list[tuple[str, list[AccuracyMatrix | None]]] = []
    if any(s.validation is not None for s in strategies):
        splits.append(("val ", [s.validation for s in strategies]))
    if results.test_evaluated:
        splits.append(("test ", [s.matrix for s in strategies]))
    if len(splits) == 1 and splits[0][0] == "test ":
        splits = [("", splits[0][1])]
    series = []
    for metric in ("ACC", "BWT"):
        for prefix, matrices in splits:
            values = [
                math.nan if m is None else 100 * (m.acc() if metric == "ACC" else m.bwt())
                for m in matrices
            ]
            series.append((f"{prefix}{metric}", values))
    return series


def _summary_figure(results: RunResults) -> Figure:
    names = list(results.strategies)
    labels = [results.strategies[n].label for n in names]
    series = _summary_series(results)
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig = _new_figure(1.4 + 0.45 * len(series) * len(names), 3.2)
    _margins(fig, left=0.7, right=0.2, bottom=0.9, top=0.35)
    ax = fig.add_subplot()
    for k, (legend, values) in enumerate(series):
        dx = (k - (len(series) - 1) / 2) * width
        ax.bar(x + dx, np.nan_to_num(values), width=width, label=legend)
        for xi, v in zip(x, values):
            label = "n/a" if math.isnan(v) else f"{v:.1f}"
            y = 0.0 if math.isnan(v) else v
            ax.text(xi + dx, y, label, ha="center", va="bottom" if y >= 0 else "top", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, labels=_short(labels), rotation=20, ha="right")
    ax.set_ylabel("points")
    ax.set_title(f"{results.scenario}: ACC and BWT", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def write_plots(results: RunResults, out_dir: str | os.PathLike[str]) -> PlotFiles:
    """Draw every figure of ``results`` into ``out_dir`` (created) and return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = PlotFiles()
    if not results.strategies:
        return files
    slugs = plot_slugs(list(results.strategies))
    for name, s in results.strategies.items():
        m = s.measured
        what = "accuracy" if s.matrix is not None else "validation accuracy"
        fig = _matrix_figure(s.label, m.R, m.b, results.experiences, what)
        path = out / f"accuracy_matrix_{slugs[name]}.png"
        files.accuracy_matrices[name] = _save(fig, path)
        if s.matrix is not None and s.validation is not None:
            v = s.validation
            fig = _matrix_figure(s.label, v.R, v.b, results.experiences, "validation accuracy")
            path = out / f"validation_matrix_{slugs[name]}.png"
            files.validation_matrices[name] = _save(fig, path)
    files.accuracy_curves = _save(_curves_figure(results), out / "accuracy_curves.png")
    for name, s in results.strategies.items():
        if s.routing is not None and any(s.routing.expert_usage):
            fig = _usage_figure(s.label, s.routing.expert_usage, results.experiences)
            files.expert_usage[name] = _save(fig, out / f"expert_usage_{slugs[name]}.png")
    files.summary = _save(_summary_figure(results), out / "summary_acc_bwt.png")
    return files
