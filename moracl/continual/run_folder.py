"""The run folder of ``moracl run`` before it trains: a new run refuses a folder holding
another's outputs, a resumed one verifies its checkpoint and logs first, and a finished run
only has its results, report and manifest rebuilt where they do not match its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from moracl.continual.checkpoint import Checkpoint, load_checkpoint
from moracl.continual.config import STRATEGIES, RunConfig
from moracl.continual.metrics import METRICS_FILE, RunResults
from moracl.continual.strategies import strategy_entry
from moracl.report import write_report, write_run_manifest
from moracl.runlock import process_rank

__all__ = ["check_test_evaluation", "finished_run", "open_run_folder", "strategy_labels"]


def strategy_labels(config: RunConfig) -> dict[str, str]:
    """Each strategy of ``config`` by name -> its display label, in the order runs report them."""
    return {n: strategy_entry(n).label for n in STRATEGIES if n in config.strategies}


def open_run_folder(
    run_dir: Path, config: RunConfig, resume: bool, evaluate_test: bool = True
) -> tuple[Checkpoint | None, RunResults | None]:
    """Refuse a folder this run must not write, or a checkpoint it must not resume from;
    returns the verified checkpoint and its results so far (``(None, None)`` for a new run).
    """
    from moracl.continual.resume import check_resume
    from moracl.report import MANIFEST_FILE, REPORT_FILE, verify_run_manifest
    from moracl.runlock import refuse_earlier_results

    if not resume:
        if os.path.lexists(run_dir / "checkpoints" / "latest.json"):
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                f"another output_dir"
            )
        refuse_earlier_results(run_dir, (METRICS_FILE, REPORT_FILE, MANIFEST_FILE), "moracl run")
        return None, None
    try:
        ckpt = load_checkpoint(run_dir, tensors=False)  # every file verified, none loaded
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoint") from None
    saved = check_resume(ckpt, config, strategy_labels(config))
    check_test_evaluation(run_dir, saved, evaluate_test)
    if process_rank() == 0:  # the logs a resumed run appends to must be the run's own
        verify_run_manifest(run_dir, append_only=True)
    ckpt.load_tensors()
    return ckpt, saved


def check_test_evaluation(run_dir: Path, saved: RunResults, evaluate_test: bool) -> None:
    """Refuse to resume a run with another ``evaluate_test`` than it was started with: its
    test matrices would have rows missing (or rows a run for selection must not have)."""
    if saved.test_evaluated == evaluate_test:
        return
    if evaluate_test:
        raise ValueError(
            f"{run_dir} was run with evaluate_test=False: it never read its test split, so "
            f"the test rows of the experiences it trained are missing; resume it with "
            f"evaluate_test=False, or run its config again in a new output_dir with the test "
            f"split evaluated"
        )
    raise ValueError(
        f"{run_dir} was run with the test split evaluated; resuming it with "
        f"evaluate_test=False would leave its later test rows missing: resume it with "
        f"evaluate_test=True"
    )


def finished_run(run_dir: Path, saved: RunResults) -> RunResults:
    """A resumed run whose checkpoint is after its last experience: nothing to train. Its
    ``metrics.json``, report and manifest are rewritten from the verified checkpoint only
    when they do not match it (a run interrupted after its last checkpoint)."""
    from moracl.report.manifest import RunManifestError, verify_run_manifest

    if process_rank() != 0:
        return saved
    try:
        intact = (
            RunResults.load(run_dir / METRICS_FILE).to_dict() == saved.to_dict()
            and (run_dir / "report.md").is_file()
            and not verify_run_manifest(run_dir).derived_changed
            and (run_dir / "manifest.json").is_file()
        )
    except (FileNotFoundError, ValueError):  # RunManifestError included
        intact = False
    if not intact:
        metrics = run_dir / METRICS_FILE
        if metrics.exists():
            try:
                RunResults.load(metrics)
            except ValueError:
                raise RunManifestError(
                    f"{metrics} is not this run's results file; refusing to replace it"
                ) from None
        saved.save(run_dir)
        write_report(run_dir)
        write_run_manifest(run_dir)
    return saved
