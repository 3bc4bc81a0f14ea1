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
- ``expert_usage_<strategy>.png``: tasks × experts heatmap of each expert's share of a
  task's routings (:meth:`~moracl.continual.metrics.RoutingDiagnostics.expert_shares`: a row
  sums to 100 %), for the strategies that report routing;
- ``summary_acc_bwt.png``: ACC and BWT bars across strategies, one panel each with its own
  scale (validation and test side by side when the run measured both).

Heatmaps carry a colour bar over the fixed range 0-100 %; figures use matplotlib's
constrained layout, so long strategy and experience names are not clipped.
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

from moracl.continual.metrics import AccuracyMatrix, RoutingDiagnostics, RunResults
from moracl.files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOTS_DIR", "PlotFiles", "plot_slugs", "usage_matrix", "write_plots"]

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

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Save as PNG, atomically (:func:`moracl.files.write_atomic`); the bounding box is
    that of everything drawn, so no label is cut off."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    write_atomic(path, buffer.getvalue())
    return path


def _short(names: list[str], limit: int = 24) -> list[str]:
    return [n if len(n) <= limit else n[: limit - 1] + "…" for n in names]


def _heatmap(
    fig: Figure, ax: Any, values: np.ndarray, rows: list[str], cols: list[str], label: str
) -> None:
    """Annotated heatmap of ``values (rows, cols)`` in points (0-100, the colour bar's fixed
    range, labelled ``label``); NaN cells stay blank."""
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_xticks(range(len(cols)), labels=_short(cols), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=_short(rows, 30), fontsize=8)
    small = len(cols) <= 12 and len(rows) <= 13
    for (i, j), v in np.ndenumerate(values):
        if small and not math.isnan(v):
            color = "black" if v > 60.0 else "white"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=color, fontsize=8)


def _matrix_figure(
    name: str, R: np.ndarray, b: np.ndarray, experiences: list[str], what: str = "accuracy"
) -> Figure:
    t = len(experiences)
    values = 100 * np.vstack([b[None, :], R])  # (T+1, T), points
    rows = ["initial"] + [f"after {e}" for e in experiences]
    fig = _new_figure(3.4 + 0.75 * t, 1.9 + 0.4 * (t + 1))
    ax = fig.add_subplot()
    _heatmap(fig, ax, values, rows, experiences, f"{what} (%)")
    ax.set_xlabel("evaluated experience j", fontsize=9)
    ax.set_ylabel("model after training", fontsize=9)
    ax.set_title(f"{name}: {what} (%)", fontsize=10)
    return fig


def _curves_figure(results: RunResults) -> Figure:
    names = list(results.strategies)
    t = len(results.experiences)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _new_figure(0.6 + 3.0 * cols, 1.2 + 2.4 * nrows)
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
    fig.legend(handles, _short(labels), loc="outside upper center", ncols=min(t, 4), fontsize=8)
    split = "" if results.test_evaluated else ", validation splits"
    fig.supxlabel(f"after training experience (init: initial model{split})", fontsize=9)
    return fig


def usage_matrix(routing: RoutingDiagnostics) -> np.ndarray:
    """``(tasks, experts)`` the expert-usage figure shows: each expert's share of a task's
    routings in points (a row sums to 100; NaN: the expert did not exist yet), from
    :meth:`~moracl.continual.metrics.RoutingDiagnostics.expert_shares`."""
    shares = routing.expert_shares()
    n_exp = max((len(row) for row in shares), default=0)
    values = np.full((len(shares), n_exp), np.nan)  # (tasks, experts)
    for t, row in enumerate(shares):
        values[t, : len(row)] = 100 * np.asarray(row, dtype=float)
    return values


def _usage_figure(name: str, routing: RoutingDiagnostics, tasks: list[str]) -> Figure:
    values = usage_matrix(routing)  # (tasks, experts)
    n_tasks, n_exp = values.shape
    rows = tasks if len(tasks) == n_tasks else [f"task {t}" for t in range(n_tasks)]
    fig = _new_figure(3.4 + 0.55 * n_exp, 1.6 + 0.4 * n_tasks)
    ax = fig.add_subplot()
    _heatmap(fig, ax, values, rows, [f"e{e}" for e in range(n_exp)], "share of routings (%)")
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("task", fontsize=9)
    ax.set_title(f"{name}: each expert's share of a task's routings (%)", fontsize=10)
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
    """ACC and BWT in two panels, each with its own scale (BWT is often a few points)."""
    names = list(results.strategies)
    labels = [results.strategies[n].label for n in names]
    series = _summary_series(results)
    x = np.arange(len(names))
    per_panel = max(1, len(series) // 2)
    width = 0.8 / per_panel
    fig = _new_figure(max(7.0, 2.0 + 0.9 * per_panel * len(names)), 3.6)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ACC", "BWT")):
        mine = [(legend, values) for legend, values in series if legend.endswith(metric)]
        for k, (legend, values) in enumerate(mine):
            dx = (k - (len(mine) - 1) / 2) * width
            prefix = legend.removesuffix(metric).strip()
            color = f"C{k}"
            ax.bar(x + dx, np.nan_to_num(values), width=width, label=prefix or metric, color=color)
            for xi, v in zip(x, values):
                text = "n/a" if math.isnan(v) else f"{v:.1f}"
                y = 0.0 if math.isnan(v) else v
                va = "bottom" if y >= 0 else "top"
                ax.text(xi + dx, y, text, ha="center", va=va, fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(x, labels=_short(labels), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("points", fontsize=9)
        what = "ACC (final mean accuracy)" if metric == "ACC" else "BWT (backward transfer)"
        ax.set_title(what, fontsize=10)
        ax.margins(y=0.15)  # room for the value labels
        if len(mine) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{results.scenario}: ACC and BWT", fontsize=10)
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
            fig = _usage_figure(s.label, s.routing, results.experiences)
            files.expert_usage[name] = _save(fig, out / f"expert_usage_{slugs[name]}.png")
    files.summary = _save(_summary_figure(results), out / "summary_acc_bwt.png")
    return files
