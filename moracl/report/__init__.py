"""Reports of continual runs: the markdown report, its figures, the run's logs, and the
manifest that tells whether a run's outputs changed after it wrote them."""

from moracl.report.logs import RunLogger
from moracl.report.manifest import (
    MANIFEST_FILE,
    ManifestCheck,
    RunManifestError,
    verify_run_manifest,
    write_run_manifest,
)
from moracl.report.markdown import REPORT_FILE, comparison_table, render_report, write_report
from moracl.report.plots import PLOTS_DIR, PlotFiles, write_plots
from moracl.report.rebuild import RebuiltReport, rebuild_report, run_folder

__all__ = [
    "MANIFEST_FILE",
    "PLOTS_DIR",
    "REPORT_FILE",
    "ManifestCheck",
    "PlotFiles",
    "RebuiltReport",
    "RunLogger",
    "RunManifestError",
    "comparison_table",
    "rebuild_report",
    "render_report",
    "run_folder",
    "verify_run_manifest",
    "write_plots",
    "write_report",
    "write_run_manifest",
]
