"""Reports of continual runs: the markdown report, its figures, and the run's logs."""

from moracl.report.logs import RunLogger
from moracl.report.markdown import REPORT_FILE, comparison_table, render_report, write_report
from moracl.report.plots import PLOTS_DIR, PlotFiles, write_plots

__all__ = [
    "PLOTS_DIR",
    "REPORT_FILE",
    "PlotFiles",
    "RunLogger",
    "comparison_table",
    "render_report",
    "write_plots",
    "write_report",
]
