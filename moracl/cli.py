"""The ``moracl`` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

BENCHES = {
    "adapters": "moracl.bench.adapters",
    "continual": "moracl.bench.continual",
    "distributed": "moracl.bench.distributed",
    "experts": "moracl.bench.experts",
    "meta": "moracl.bench.meta",
    "optim": "moracl.bench.optim",
    "profile": "moracl.bench.profile",
}


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from moracl.config import load_config, to_dict

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: valid {type(config).__name__}")
    if args.show:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from moracl.config import FinetuneConfig, load_config
    from moracl.finetune import finetune

    config = load_config(args.config, args.overrides)
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"{args.config} is a {config.job!r} config, not a 'finetune' one")
    result = finetune(config, progress=not args.quiet)
    from moracl.distributed import is_main

    if is_main():  # under torchrun the first process reports
        print(result.table())
        print(f"adapter and metrics.json saved in {config.output_dir}")
    return 0


def _meta(args: argparse.Namespace) -> int:
    from moracl.config import MetaConfig, load_config
    from moracl.meta.run import meta_learn

    config = load_config(args.config, args.overrides)
    if not isinstance(config, MetaConfig):
        raise ValueError(f"{args.config} is a {config.job!r} config, not a 'meta' one")
    print(meta_learn(config, progress=not args.quiet).table())
    print(f"report.md, metrics.json, episodes.json and adapter/ saved in {config.output_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name])
    code: int = module.main(args.rest)
    return code


def _run(args: argparse.Namespace) -> int:
    from moracl.config import from_dict, load_config
    from moracl.continual.config import RunConfig
    from moracl.continual.run import run_continual
    from moracl.report import comparison_table

    if args.resume:
        import json
        from pathlib import Path

        from moracl.continual.checkpoint import load_checkpoint

        meta = load_checkpoint(args.resume).meta
        config_data = json.loads(json.dumps(meta["results"]["config"]))
        config_data["output_dir"] = str(Path(args.resume))
        config = from_dict(RunConfig, config_data)
    else:
        if args.config is None:
            raise ValueError("moracl run needs a CONFIG file (or --resume RUN_DIR)")
        config = load_config(args.config, args.overrides)
        if not isinstance(config, RunConfig):
            raise ValueError(f"{args.config} is a {config.job!r} config, not a 'run' one")
    results = run_continual(
        config, resume=bool(args.resume), progress=not args.quiet, device=args.device
    )
    print(comparison_table(results))
    print(f"run folder: {config.output_dir} (report.md, metrics.json, plots/, logs/)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from moracl.continual.metrics import RunResults
    from moracl.report import comparison_table, write_report

    path = write_report(args.run_dir)
    print(comparison_table(RunResults.load(args.run_dir)))
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moracl",
        description="Continual and multi-task learning with mixtures of adapter experts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a YAML config against the typed configs")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--show", action="store_true", help="print the resolved config")
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

    p = sub.add_parser("report", help="rebuild report.md and plots of a run from its metrics.json")
    p.add_argument("run_dir", help="the run's folder (holding metrics.json)")
    p.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"moracl: error: {e}", file=sys.stderr)
        return 2
    finally:
        if "moracl.distributed" in sys.modules:  # leave the torchrun process group, if any
            sys.modules["moracl.distributed"].shutdown()
    return code
