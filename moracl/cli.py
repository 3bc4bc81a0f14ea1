"""The ``moracl`` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

BENCHES = {
    "adapters": "moracl.bench.adapters",
    "continual": "moracl.bench.continual",
    "distributed": "moracl.bench.distributed",
    "dylora": "moracl.bench.dylora",
    "experts": "moracl.bench.experts",
    "host": "moracl.bench.host",
    "meta": "moracl.bench.meta",
    "optim": "moracl.bench.optim",
    "profile": "moracl.bench.profile",
    "report": "moracl.bench.report",
}


def _validate(args: argparse.Namespace) -> int:
    from moracl.config import JOBS, dump_yaml, load_config, to_dict
    from moracl.jobs import check_config
    from moracl.parse_fields import describe_config

    if args.config is None:  # --doc --job NAME: the keys of a job's config, at their defaults
        if args.job is None or not args.doc or args.overrides:
            raise ValueError("moracl validate needs a CONFIG file (or --doc --job NAME alone)")
        print(describe_config(JOBS.get(args.job)()), end="")
        return 0
    if args.job is not None:
        raise ValueError(f"--job {args.job} goes with --doc and no CONFIG; the file names its job")
    config = load_config(args.config, args.overrides)
    check_config(config, device=args.device)  # what the job checks before any work
    print(f"{args.config}: valid {type(config).__name__}")
    if args.show:
        print(dump_yaml(to_dict(config)), end="")
    if args.doc:
        print(describe_config(config), end="")
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
    from moracl.extras import require
    from moracl.report import comparison_table

    job = require("moracl.jobs.continual", "moracl run")  # Avalanche: the continual extra
    resume_config, run = job.resume_config, job.run

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
    from moracl.extras import require
    from moracl.jobs.sweep_space import overrides_text
    from moracl.report.sweep import format_score, render_table

    sweep = require("moracl.jobs.sweep", "moracl sweep")  # Avalanche: the continual extra
    plan_sweep, run_sweep = sweep.plan_sweep, sweep.run_sweep

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


def _plot_attention(args: argparse.Namespace) -> int:
    from moracl.report.attention import plot_adapter_attention

    path = plot_adapter_attention(
        args.adapter_dir,
        args.text,
        args.out,
        model=args.model,
        task_id=args.task,
        layers=args.layers,
        heads=args.heads,
    )
    print(f"attention maps (adapters off, on, difference) written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moracl",
        description="Continual and multi-task learning with mixtures of adapter experts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "validate",
        help="check a YAML config as its job does before any work (values, scenario, "
        "output folder, device)",
    )
    p.add_argument("config", nargs="?", help="a YAML config (optional with --doc --job)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides, e.g. train.lr=1e-3; ~key deletes a key",
    )
    p.add_argument("--show", action="store_true", help="print the resolved config")
    p.add_argument(
        "--doc",
        action="store_true",
        help="list every key of the config with its value, type, default and help",
    )
    p.add_argument(
        "--job", help="with --doc and no CONFIG: list the keys of this job (finetune, meta, run)"
    )
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

    p = sub.add_parser("plot", help="figures of a saved adapter")
    plots = p.add_subparsers(dest="figure", required=True)
    p = plots.add_parser(
        "attention",
        help="attention maps of a text with the adapter off and on, and their difference",
    )
    p.add_argument(
        "adapter_dir", help="a folder written by save_pretrained (e.g. a run's adapter/)"
    )
    p.add_argument("--text", required=True, help="the text whose attention is drawn")
    p.add_argument(
        "--model",
        help="the base model: a local Hugging Face model folder (with its tokenizer) or "
        "'minilm' (default: minilm for an adapter saved by moracl finetune)",
    )
    p.add_argument("--task", type=int, help="the task to route a task-routed mixture to")
    p.add_argument(
        "--layers", help="layers drawn, e.g. 0,1 or 0-3 (default: all, or the 6 that changed most)"
    )
    p.add_argument(
        "--heads", help="heads drawn, e.g. 0-3 (default: all, or the 4 that changed most)"
    )
    p.add_argument("--out", default="attention.png", help="the PNG file (default: %(default)s)")
    p.set_defaults(func=_plot_attention)
    _add_plugin_option(parser)
    return parser


_PLUGIN_HELP = (
    "import this module first (repeatable), so the scenarios, encoders and components it "
    "registers can be named in the config; installed entry points 'moracl.plugins' load by "
    "themselves"
)


def _add_plugin_option(parser: argparse.ArgumentParser, depth: int = 0) -> None:
    """``--plugin MODULE`` on ``parser`` and on every subcommand below it: before or after
    the subcommand's name (one ``dest`` per level, so no level overwrites another's)."""
    parser.add_argument(
        "--plugin",
        dest=f"plugins_{depth}",
        action="append",
        metavar="MODULE",
        default=[] if depth == 0 else argparse.SUPPRESS,
        help=_PLUGIN_HELP,
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # (aliases share a parser)
                _add_plugin_option(child, depth + 1)


def _load_plugins(args: argparse.Namespace) -> None:
    """Import the ``--plugin`` modules (every level's, in order) and the installed ones."""
    from moracl.plugins import load_plugins

    levels = sorted(int(k.split("_")[1]) for k in vars(args) if k.startswith("plugins_"))
    load_plugins([name for depth in levels for name in getattr(args, f"plugins_{depth}")])


def _version() -> str:
    """The installed package's version (its metadata), else ``moracl.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moracl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        import moracl

        return str(moracl.__version__)


def _show_notes(show: Any) -> Any:
    """A ``warnings.showwarning`` printing a :class:`~moracl.config.ConfigNote` as one
    ``moracl: note:`` line on stderr and handing other warnings to ``show``."""

    def showwarning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        from moracl.config import ConfigNote

        if issubclass(category, ConfigNote):
            print(f"moracl: note: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


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
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning at the end
            from moracl.config import ConfigNote

            warnings.simplefilter("always", ConfigNote)  # every note, each time
            warnings.showwarning = _show_notes(warnings.showwarning)
            _load_plugins(args)  # before the config is read: what they register counts
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
