"""The ``moracl`` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

BENCHES = {
    "adapters": "moracl.bench.adapters",
    "continual": "moracl.bench.continual",
    "distributed": "moracl.bench.distributed",
    "experts": "moracl.bench.experts",
    "meta": "moracl.bench.meta",
    "optim": "moracl.bench.optim",
    "profile": "moracl.bench.profile",
    "report": "moracl.bench.report",
}


def _validate(args: argparse.Namespace) -> int:
    from moracl.config import dump_yaml, load_config, to_dict
    from moracl.jobs import check_config

    config = load_config(args.config, args.overrides)
    check_config(config, device=args.device)  # what the job checks before any work
    print(f"{args.config}: valid {type(config).__name__}")
    if args.show:
        print(dump_yaml(to_dict(config)), end="")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from moracl.config import FinetuneConfig, load_config
    from moracl.jobs.finetune import run

    config = load_config(args.config, args.overrides)
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"{args.config} is a {config.job!r} config, not a 'finetune' one")
    result = run(config, progress=not args.quiet)
    from moracl.distributed import is_main

    if is_main():  # under torchrun the first process reports
        print(result.table())
        print(f"adapter and metrics.json saved in {config.output_dir}")
    return 0


def _meta(args: argparse.Namespace) -> int:
    from moracl.config import MetaConfig, load_config
    from moracl.jobs.meta import run

    config = load_config(args.config, args.overrides)
    if not isinstance(config, MetaConfig):
        raise ValueError(f"{args.config} is a {config.job!r} config, not a 'meta' one")
    print(run(config, progress=not args.quiet).table())
    print(f"report.md, metrics.json, episodes.json and adapter/ saved in {config.output_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name])
    code: int = module.main(args.rest)
    return code


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moracl.config import load_config
    from moracl.continual.config import RunConfig
    from moracl.jobs.continual import resume_config, run
    from moracl.report import comparison_table

    if args.resume:
        config_file, overrides = args.config, list(args.overrides)
        if config_file is not None and "=" in config_file and not Path(config_file).is_file():
            config_file, overrides = None, [config_file, *overrides]  # only overrides given
        plan = resume_config(args.resume, config_file, overrides)
        config = plan.config
        for change in plan.applied:
            print(f"resuming with {change}")
        if plan.finished:
            print(f"run already finished after experience {plan.done} of {plan.total}")
    else:
        if args.config is None:
            raise ValueError("moracl run needs a CONFIG file (or --resume RUN_DIR)")
        config = load_config(args.config, args.overrides)
        if not isinstance(config, RunConfig):
            raise ValueError(f"{args.config} is a {config.job!r} config, not a 'run' one")
    evaluate_test = True
    if args.resume:  # a run that left its test split alone (a sweep's trial) goes on so
        from moracl.continual.metrics import METRICS_FILE, RunResults

        metrics = Path(args.resume) / METRICS_FILE
        evaluate_test = RunResults.load(metrics).test_evaluated if metrics.is_file() else True
    results = run(
        config,
        resume=bool(args.resume),
        progress=not args.quiet,
        device=args.device,
        evaluate_test=evaluate_test,
    )
    print(comparison_table(results))
    print(f"run folder: {config.output_dir} (report.md, metrics.json, plots/, logs/)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from moracl.jobs.sweep import plan_sweep, run_sweep
    from moracl.jobs.sweep_space import overrides_text
    from moracl.report.sweep import format_score, render_table

    if args.seed is not None and args.trials is None:
        raise ValueError(f"--seed {args.seed} applies to a random search; give --trials N too")
    plan = plan_sweep(
        args.config,
        args.grid,
        trials=args.trials,
        seed=0 if args.seed is None else args.seed,
        sets=args.sets,
        output_dir=args.output_dir,
        metric=args.metric,
        strategy=args.strategy,
        select_experiences=args.select_experiences,
        device=args.device,
    )
    result = run_sweep(
        plan,
        jobs=args.jobs,
        resume=args.resume,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
        on_event=None if args.quiet else lambda line: print(line, flush=True),
        final=args.final,
    )
    chosen, sel = result.chosen, plan.selection
    overrides = overrides_text(chosen.overrides)
    print(
        f"chosen: trial {chosen.number:03d} ({overrides}), {sel.label} "
        f"{format_score(chosen.score, sel.kind)}"
    )
    final = result.state.final
    if final is not None and final.table is not None:
        print(render_table(final.table))
    print(
        f"sweep folder: {result.sweep_dir} (sweep.md, sweep.png, sweep.json, chosen.yaml); "
        f"run the chosen config with: {plan.job.command} {result.chosen_config}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from moracl.report import comparison_table, rebuild_report

    done = rebuild_report(args.run_dir)
    print(comparison_table(done.results))
    for why in done.rebuilt_changed:
        print(f"rebuilt: {why}")
    if not done.verified:
        print("note: no manifest.json in the run folder, so metrics.json was not verified")
    print(f"report written to {done.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moracl",
        description="Continual and multi-task learning with mixtures of adapter experts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "validate",
        help="check a YAML config as its job does before any work (values, scenario, "
        "output folder, device)",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--show", action="store_true", help="print the resolved config")
    p.add_argument(
        "--device", default=None, help="also check this device exists (as moracl run --device)"
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("finetune", help="adapt a frozen backbone to one classification task")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("meta", help="meta-train adapters on few-shot tasks and meta-test them")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_meta)

    p = sub.add_parser("bench", help="benchmarks (see moracl/bench/RESULTS.md)")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=_bench)

    p = sub.add_parser("run", help="a continual run: moracl and the baselines on one stream")
    p.add_argument("config", nargs="?", help="a YAML config with job: run")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "sweep",
        help="grid or random search over config keys, ranked on validation; the chosen "
        "config then runs once more, reading the test split",
    )
    p.add_argument("config", help="a YAML config with job: finetune, meta or run")
    p.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        required=True,
        metavar="KEY=V1,V2",
        help="swept keys and their values, parsed as YAML (e.g. adapter.rank=4,8,16 "
        "train.lr=1e-3,3e-3); every combination is a trial",
    )
    p.add_argument(
        "--trials", type=int, help="random search: N distinct combinations drawn from the grid"
    )
    p.add_argument("--seed", type=int, help="the seed of a random search (default 0)")
    p.add_argument(
        "--set",
        dest="sets",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="fixed overrides of every trial (e.g. strategies=[moracl])",
    )
    p.add_argument(
        "--metric",
        help="the validation metric ranked (run: acc, average_incremental_accuracy, bwt, fwt, "
        "forgetting, forgetting_first_minus_last; default: the job's validation accuracy)",
    )
    p.add_argument(
        "--strategy",
        help="run: the strategy ranked (default: the config's first strategy); 'mean': the "
        "mean over the strategies that train on every experience, for settings they share",
    )
    p.add_argument(
        "--select-experiences",
        type=int,
        metavar="K",
        help="run: trials train experiences 0..K-1 only and are ranked on those "
        "(Chaudhry et al. 2019); the final run trains the whole stream",
    )
    p.add_argument("--jobs", type=int, default=1, help="trials run at once, each in a process")
    p.add_argument(
        "--no-final",
        dest="final",
        action="store_false",
        help="rank only: no final run with the test split (its numbers come from elsewhere, "
        "e.g. moracl bench continual over seeds)",
    )
    p.add_argument("--output-dir", help="the sweep folder (default: the config's output_dir-sweep)")
    p.add_argument(
        "--resume", action="store_true", help="continue the sweep in --output-dir (must exist)"
    )
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--device", default="cpu", help="run: cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars or trial lines")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="rebuild report.md and plots of a run from its metrics.json")
    p.add_argument("run_dir", help="the run's folder (holding metrics.json)")
    p.set_defaults(func=_report)
    return parser


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; an ``OSError`` names its path."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
        if error.filename2 is not None:
            text += f" ({error.filename2})"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moracl`` command; returns the exit status.

    Bad input never ends in a traceback: argparse reports bad arguments with the usage (exit
    2); a config, an override, a path or a device the jobs refuse, and a missing optional
    package, end in one line ``moracl: error: ...`` (exit 2); Ctrl-C ends in one line
    (exit 130). Anything else is a bug and keeps its traceback.
    """
    # Avalanche imports qpsolvers (for GEM), which warns at import that no QP solver is
    # installed; no moracl strategy solves a QP, so the line would only alarm users
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("moracl: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        # ValueError: bad config, override or value (NonFiniteError included; the config
        # parser turns a wrong type into a ValueError naming the key);
        # OSError: a path (missing, a folder, no permission, read-only, full disk)
        print(f"moracl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if "moracl.distributed" in sys.modules:  # leave the torchrun process group, if any
            sys.modules["moracl.distributed"].shutdown()
    return code
