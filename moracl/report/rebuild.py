"""``moracl report``: rebuild a run's report from its verified ``metrics.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moracl.continual.metrics import METRICS_FILE, RunResults
from moracl.report.manifest import verify_run_manifest, write_run_manifest
from moracl.report.markdown import write_report
from moracl.runlock import lock_run_folder

__all__ = ["RebuiltReport", "rebuild_report", "run_folder"]


@dataclass
class RebuiltReport:
    """What :func:`rebuild_report` did: the ``report`` path, the ``results`` it shows,
    whether ``metrics.json`` was ``verified`` against the run's manifest, and the derived
    files (``report.md``, plots) that had changed since the run wrote them."""

    report: Path
    results: RunResults
    verified: bool
    rebuilt_changed: list[str]


def run_folder(path: str | os.PathLike[str]) -> Path:
    """The run folder meant by ``path``: the folder itself, or the folder of its
    ``metrics.json``.

    Raises:
        FileNotFoundError: no such folder, or a folder without ``metrics.json``.
        ValueError: a file other than ``metrics.json``.
    """
    p = Path(path)
    if p.is_file() or (p.name == METRICS_FILE and not p.is_dir()):
        if p.name != METRICS_FILE:
            raise ValueError(f"{p} is a file; expected a run folder or its {METRICS_FILE}")
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"no run folder {p}")
    if not (p / METRICS_FILE).is_file():
        raise FileNotFoundError(
            f"{p} has no {METRICS_FILE}: not a run folder, or its run has not finished an "
            f"experience yet"
        )
    return p


def rebuild_report(path: str | os.PathLike[str], *, plots: bool = True) -> RebuiltReport:
    """Verify the run in ``path`` (a run folder or its ``metrics.json``) against its
    manifest, then rebuild ``report.md`` and the plots from ``metrics.json`` and update the
    manifest. The folder is locked meanwhile (a run writing there refuses this, and the
    reverse).

    Raises:
        FileNotFoundError: no run folder or no ``metrics.json`` (see :func:`run_folder`).
        RunManifestError: ``metrics.json`` or a log changed since the run wrote it.
        RunFolderBusyError: another job holds the folder.
    """
    root = run_folder(path)
    with lock_run_folder(root, "moracl report"):
        check = verify_run_manifest(root)
        results = RunResults.load(root)
        report = write_report(root, plots=plots)
        if check.verified:
            write_run_manifest(root)
    return RebuiltReport(report, results, check.verified, check.derived_changed)
