"""The report of a sweep (``moracl sweep``), from its state alone (``sweep.json``):

- ``sweep.md``: the search, the ranking, the chosen overrides and the chosen config's final
  run (its test numbers, validation beside), the commands that reproduce it, and every trial
  sorted by the metric (failed and unfinished ones last, with their error);
- ``sweep.png``: the metric against each swept key, one panel per key (every finished trial
  a dot, the best trial of each value joined by a line, the chosen one a star); numeric keys
  on a numeric axis (logarithmic when the values are positive and span 10x or more, as
  learning rates do), other keys as categories.

The state's layout is documented in :mod:`moracl.jobs.sweep_state`; this module reads it as
plain JSON data, so a report can be rebuilt from the file (:func:`write_sweep_report`).
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moracl.files import read_regular, write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CHOSEN_FILE",
    "SWEEP_PLOT",
    "SWEEP_REPORT",
    "format_score",
    "plot_sweep",
    "render_sweep_report",
    "render_table",
    "write_sweep_report",
]

SWEEP_REPORT = "sweep.md"
SWEEP_PLOT = "sweep.png"
CHOSEN_FILE = "chosen.yaml"
_DPI = 90
_LOG_SPAN = 10.0  # positive values spanning this factor or more get a log axis


def format_score(value: float | None, kind: str) -> str:
    """``82.13 %`` for an accuracy, ``+1.20 points`` for a difference, ``n/a`` for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "difference":
        return f"{100 * value:+.2f} points"
    if kind == "count":
        return f"{value:.0f}"
    return f"{100 * value:.2f} %"


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper quoting the strings a config would read as numbers (``'1e3'``)."""


def _number_like(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "'" if _number_like(data) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def _value(value: Any) -> str:
    """A swept value as an override writes it (``0.001``, ``[moracl]``)."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=math.inf).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def _overrides(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in overrides.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ranked(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Trials best first (ties: the earlier trial), then failed, then unfinished ones."""
    higher = bool(data["selection"].get("higher_is_better", True))
    done = [t for t in data["trials"] if t["status"] == "done"]
    done.sort(key=lambda t: (-t["score"] if higher else t["score"], t["number"]))
    failed = [t for t in data["trials"] if t["status"] == "failed"]
    rest = [t for t in data["trials"] if t["status"] not in ("done", "failed")]
    return [*done, *failed, *rest]


def render_table(table: Mapping[str, Any]) -> str:
    """A final run's table (``ResultTable.to_dict()``) in markdown."""
    return "\n".join(_table(table))


def _table(table: Mapping[str, Any]) -> list[str]:
    columns = table["columns"]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in table["rows"]:
        cells = [
            _cell(str(v)) if kind == "text" else format_score(v, kind)
            for v, (_, kind) in zip(row, columns)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _search(data: Mapping[str, Any]) -> str:
    grid = data["grid"]
    size = math.prod(len(v) for v in grid.values())
    shape = " x ".join(f"{k} ({len(v)})" for k, v in grid.items())
    trials = data["search"].get("trials")
    if trials is None:
        return f"grid search, all {size} combinations of {shape}"
    seed = data["search"].get("seed")
    return f"random search, {trials} of the {size} combinations of {shape} (seed {seed})"


def _final_section(data: Mapping[str, Any], chosen: Mapping[str, Any]) -> list[str]:
    sel = data["selection"]
    kind, label = sel.get("kind", "accuracy"), sel["label"]
    final = data.get("final")
    job = data["job"]
    lines = ["### Final run (`final/`: the whole stream, the test split read once)", ""]
    if final is None or final.get("trial") != chosen["number"]:
        return [
            *lines,
            "Not run: the sweep ranked only (`--no-final`) or has not reached it; run it "
            "again without `--no-final` to read the test split once.",
            "",
        ]
    if final["status"] == "failed":
        return [*lines, f"**Failed**: {_cell(str(final.get('error')))}", ""]
    if final["status"] != "done":
        return [*lines, "Not finished (interrupted): run the sweep again to finish it.", ""]
    val, trial = final.get("validation_score"), final.get("trial_score")
    if final.get("matches"):
        lines.append(
            f"{label}: {format_score(val, kind)} in the final run, equal to the trial's "
            f"(deterministic runs)."
        )
    else:
        lines.append(
            f"**Warning**: {label} is {format_score(val, kind)} ({val!r}) in the final run "
            f"but {format_score(trial, kind)} ({trial!r}) in the trial: the runs are not "
            f"deterministic, so the choice may not be reproducible."
        )
    sk = sel.get("select_experiences")
    if sk is not None:
        lines.append(
            f"The trials ran experiences 0-{sk - 1} only; the final run trains the whole "
            f"stream and its score above is taken over the same {sk} experiences."
        )
    if final.get("table"):
        lines += ["", *_table(final["table"])]
    command = shlex.join(
        [
            "moracl",
            job,
            data["config_file"],
            *data.get("sets", []),
            *[f"{k}={_value(v)}" for k, v in chosen["overrides"].items()],
        ]
    )
    chosen_file = shlex.quote(str(Path(data.get("sweep_dir", ".")) / CHOSEN_FILE))
    lines += [
        "",
        "Run the chosen config again (it writes to the base config's output_dir):",
        "",
        f"    moracl {job} {chosen_file}",
        "",
        "or, the same config from the base config and overrides:",
        "",
        f"    {command}",
        "",
    ]
    return lines


def render_sweep_report(data: Mapping[str, Any]) -> str:
    """The markdown report of a sweep state (``sweep.json``'s content)."""
    sel = data["selection"]
    kind, label = sel.get("kind", "accuracy"), sel["label"]
    trials = data["trials"]
    counts = {s: sum(t["status"] == s for t in trials) for s in ("done", "failed")}
    unfinished = len(trials) - counts["done"] - counts["failed"]
    direction = "higher" if sel.get("higher_is_better", True) else "lower"
    sets = ", ".join(f"`{s}`" for s in data.get("sets", [])) or "none"
    lines = [
        f"# Sweep: moracl {data['job']} on {data['config_file']}",
        "",
        f"Trials ranked by **{label}** ({direction} is better; ties go to the earlier trial).",
        "No trial read the test split"
        + (
            ": only the final run of the chosen config did, once."
            if data.get("final") is not None
            else ", and no final run has (yet)."
        ),
        "",
        f"- search: {_search(data)}",
        f"- fixed overrides: {sets}",
        f"- trials: {counts['done']} done, {counts['failed']} failed"
        + (f", {unfinished} not finished" if unfinished else ""),
        f"- the sweep: `{data.get('command', '')}`",
        "",
    ]
    ranked = _ranked(data)
    best = ranked[0] if ranked and ranked[0]["status"] == "done" else None
    if best is None:
        lines += ["## No trial finished", "", "Nothing was chosen.", ""]
    else:
        lines += [
            f"## Chosen: trial {best['number']:03d}",
            "",
            f"`{_overrides(best['overrides'])}`: {label} {format_score(best['score'], kind)}",
            "",
            *_final_section(data, best),
        ]
    keys = list(data["grid"])
    lines += ["## Trials, best first", ""]
    lines.append("| rank | trial | " + " | ".join(keys) + f" | {label} | time |")
    lines.append("|" + "---|" * (len(keys) + 4))
    for rank, t in enumerate(ranked, 1):
        values = [_cell(_value(t["overrides"].get(k))) for k in keys]
        if t["status"] == "done":
            place, score = str(rank), format_score(t["score"], kind)
        elif t["status"] == "failed":
            place, score = "-", f"failed: {_cell(str(t.get('error')))}"
        else:
            place, score = "-", "not finished"
        seconds = t.get("seconds")
        time = f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
        lines.append(f"| {place} | {t['number']:03d} | " + " | ".join(values))
        lines[-1] += f" | {score} | {time} |"
    if counts["done"]:
        lines += ["", f"![{label} against each swept key]({SWEEP_PLOT})"]
    return "\n".join(lines) + "\n"


# -- the plot -------------------------------------------------------------------------------


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _log_axis(values: Sequence[Any]) -> bool:
    """Positive numbers spanning :data:`_LOG_SPAN` or more."""
    return _numeric(values) and min(values) > 0 and max(values) / min(values) >= _LOG_SPAN


def _panel(
    ax: Any,
    key: str,
    values: Sequence[Any],
    done: Sequence[Mapping[str, Any]],
    failed: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, Any],
    *,
    higher: bool,
    scale: float,
) -> None:
    """One key's panel: every done trial's score against its value of ``key``; failed
    trials as crosses along the bottom edge."""
    numeric = _numeric(values)
    position = {json.dumps(v, sort_keys=True): i for i, v in enumerate(values)}

    def x_of(v: Any) -> float:
        return float(v) if numeric else float(position[json.dumps(v, sort_keys=True)])

    xs = [x_of(t["overrides"][key]) for t in done]
    ys = [scale * t["score"] for t in done]
    ax.scatter(xs, ys, s=18, color="tab:blue", alpha=0.6, label="trials", zorder=2)
    best: dict[float, float] = {}
    for x, y in zip(xs, ys):
        best[x] = max(best.get(x, y), y) if higher else min(best.get(x, y), y)
    line = sorted(best.items())
    ax.plot(
        [x for x, _ in line],
        [y for _, y in line],
        color="tab:blue",
        linewidth=1.2,
        label="best per value",
        zorder=1,
    )
    ax.scatter(
        [x_of(chosen["overrides"][key])],
        [scale * chosen["score"]],
        marker="*",
        s=160,
        color="tab:red",
        label="chosen",
        zorder=3,
    )
    if failed:  # at their value of the key, on the panel's bottom edge (axes coordinates)
        ax.scatter(
            [x_of(t["overrides"][key]) for t in failed],
            [0.03] * len(failed),
            marker="x",
            s=30,
            color="tab:gray",
            transform=ax.get_xaxis_transform(),
            label="failed",
            zorder=2,
        )
    if numeric:
        lo, hi = float(min(values)), float(max(values))
        if _log_axis(values):
            ax.set_xscale("log")
            pad = (hi / lo) ** 0.08
            ax.set_xlim(lo / pad, hi * pad)
        else:
            pad = 0.08 * (hi - lo) or 0.5
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_xticks([float(v) for v in values], labels=[_value(v) for v in values])
        ax.minorticks_off()
    else:
        labels = [_value(v) for v in values]
        ax.set_xticks(
            range(len(values)),
            labels=[s if len(s) <= 14 else s[:13] + "…" for s in labels],
            rotation=20 if len(values) > 3 else 0,
        )
        ax.set_xlim(-0.5, len(values) - 0.5)
    ax.margins(y=0.15)  # room for the failed trials' crosses along the bottom
    ax.set_xlabel(key)
    ax.grid(True, alpha=0.3)


def plot_sweep(data: Mapping[str, Any]) -> Figure | None:
    """The figure of a sweep state (``None`` when no trial finished)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [t for t in data["trials"] if t["status"] == "done"]
    if not done:
        return None
    failed = [t for t in data["trials"] if t["status"] == "failed"]
    sel = data["selection"]
    higher = bool(sel.get("higher_is_better", True))
    chosen = _ranked(data)[0]
    kind = sel.get("kind", "accuracy")
    scale = 100.0
    keys = list(data["grid"])
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(0.8 + 3.4 * cols, 1.3 + 2.9 * rows), dpi=_DPI)
    FigureCanvasAgg(fig)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.75 / w,
        right=1 - 0.2 / w,
        bottom=1.0 / h,
        top=1 - 0.6 / h,
        wspace=0.12,
        hspace=0.6,
    )
    first = None
    for k, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, k + 1, sharey=first)
        first = first or ax
        _panel(ax, key, data["grid"][key], done, failed, chosen, higher=higher, scale=scale)
        if k % cols == 0:
            ax.set_ylabel("accuracy (%)" if kind == "accuracy" else "points")
        else:
            ax.tick_params(labelleft=False)
    unfinished = len(data["trials"]) - len(done) - len(failed)
    note = f" ({unfinished} trials not finished, not shown)" if unfinished else ""
    width = max(30, int(12 * (0.8 + 3.4 * cols)))  # characters that fit across the figure
    fig.suptitle(textwrap.fill(f"{sel['label']}{note}", width), fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(labels), fontsize=8)
    return fig


def write_sweep_report(
    sweep_dir: str | os.PathLike[str], data: Mapping[str, Any] | None = None
) -> Path:
    """Write ``sweep.md`` and ``sweep.png`` (when a trial finished) in ``sweep_dir`` from
    ``data`` (default: its ``sweep.json``); returns the report's path."""
    out = Path(sweep_dir)
    if data is None:
        data = json.loads(read_regular(out / "sweep.json").decode("utf-8"))
    fig = plot_sweep(data)
    if fig is not None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI)
        write_atomic(out / SWEEP_PLOT, buffer.getvalue())
    path = out / SWEEP_REPORT
    write_atomic(path, render_sweep_report(data))
    return path
