"""``moracl bench continual``: moracl against the classic strategies on every stream, run from
the configs in ``configs/`` as they are, the quality targets checked on the test numbers, and
the cost of the training loop.

    moracl bench continual                      # every stream, seeds 0-4, configs' sizes
    moracl bench continual --jobs 2             # two strategy processes at once
    moracl bench continual --quick --seeds 0    # smaller streams, fewer epochs, one seed
    moracl bench continual --scenarios split-fashion/task digit-domains/domain
    moracl bench continual --loop-cost-only     # the loop-cost table alone
    moracl bench continual --loop-cost-only --device cuda   # ... training on the GPU
    moracl bench continual --strategies derpp --json R.json --merge   # add rows to a record

Each stream is one config (:data:`BENCH_SCENARIOS`): ``wordnet_domains.yaml`` (task),
``wordnet_domains_class.yaml``, ``split_fashion.yaml`` (task), ``split_fashion_class.yaml``
and ``digit_domains.yaml`` (domain). The benchmark changes nothing in them but the seed
(``train.seed``, which draws the stream's examples, the validation split, the
initialisations and the batch order), the output folder, and with ``--quick`` the stream's
sizes; the configs' hyperparameters are chosen on validation data (``moracl sweep``), never
here. Every strategy of a config runs through :func:`moracl.jobs.continual.run`, which
evaluates it on the validation splits and on the test split. By default each strategy runs
alone in a fresh process, so that its peak memory (the process's peak resident set,
``ru_maxrss``: Python, torch, the stream and the strategy) is its own; the accuracies are the
same as in one ``moracl run`` of all strategies, because every strategy seeds its own random
streams. ``--jobs N`` runs N such processes at once, each with ``cores // N`` torch threads.

Per stream and seed the tables give every strategy's validation ACC and its test ACC and
BWT; over the seeds, mean ± sample sd and moracl's per-seed difference from the best other
strategy; the targets (:mod:`moracl.bench.continual_tables`) are checked on moracl's test
numbers, means over the seeds, each with its margin.

``--strategies`` runs only the strategies named (each config's others are left out); with
``--merge`` their results join those already in the ``--json`` record, stream by stream and
seed by seed (same configs, sizes and seeds, else an error), and the record's caveats say
which strategies were measured later, by which commit and command.

The loop-cost table times moracl's training template on one experience against a plain
PyTorch loop on the same model and tensors (:mod:`moracl.bench.loopcost`); the target is a
ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moracl.bench.common import (
    add_caveat_arg,
    command_argv,
    device_arg,
    machine,
    positive_int,
    record_meta,
    write_record,
)
from moracl.bench.continual_tables import (
    MAX_RATIO,
    Target,
    check_seed_targets,
    check_targets,
    loop_cost_table,
    per_seed_table,
    scenario_table,
    seed_differences,
    seed_table,
    stream_markdown,
    targets_table,
)
from moracl.bench.loopcost import LoopCost, measure_loop_cost
from moracl.continual.config import STRATEGIES, LearnedRouting, RunConfig
from moracl.continual.metrics import RunResults

__all__ = [
    "BENCH_SCENARIOS",
    "DEFAULT_SEEDS",
    "MAX_RATIO",
    "BenchScenario",
    "Target",
    "bench_config",
    "check_seed_targets",
    "check_targets",
    "loop_cost",
    "loop_cost_markdown",
    "loop_cost_table",
    "main",
    "markdown",
    "parse_args",
    "per_seed_table",
    "run_scenario",
    "run_scenarios",
    "scenario_table",
    "seed_differences",
    "seed_table",
    "stream_markdown",
    "targets_table",
]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: the seeds every stream runs with unless ``--seeds`` says otherwise
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class BenchScenario:
    """One stream of the benchmark: a run config, used as it is.

    Attributes:
        config: a ``job: run`` YAML file in ``configs/``; its ``scenario.setting`` is the one
            the key of :data:`BENCH_SCENARIOS` names.
        quick: the smaller sizes of ``--quick`` (dotted overrides of the stream's size and
            epochs only).
    """

    config: str
    quick: tuple[str, ...] = ()


_WORDNET_QUICK = (
    "scenario.options.per_class=30",
    "scenario.options.test_per_class=20",
    "train.epochs=1",
)
_FASHION_QUICK = ("scenario.options.per_class=60", "scenario.options.test_per_class=40")
_DIGITS_QUICK = ("scenario.options.per_class=30", "scenario.options.test_per_class=20")

#: ``scenario/setting`` -> its config.
BENCH_SCENARIOS: dict[str, BenchScenario] = {
    "wordnet-domains/task": BenchScenario("wordnet_domains.yaml", _WORDNET_QUICK),
    "wordnet-domains/class": BenchScenario("wordnet_domains_class.yaml", _WORDNET_QUICK),
    "split-fashion/task": BenchScenario("split_fashion.yaml", _FASHION_QUICK),
    "split-fashion/class": BenchScenario("split_fashion_class.yaml", _FASHION_QUICK),
    "digit-domains/domain": BenchScenario("digit_domains.yaml", _DIGITS_QUICK),
}


def bench_config(
    key: str,
    *,
    quick: bool = False,
    output_dir: str | Path = "out/bench-continual",
    seed: int | None = None,
) -> RunConfig:
    """The config of ``BENCH_SCENARIOS[key]`` as it is (at ``--quick`` sizes with ``quick``),
    writing under ``output_dir/<scenario>-<setting>`` (``-seed<seed>`` appended when ``seed``
    replaces the config's ``train.seed``).

    Raises:
        ValueError: an unknown key, a config that is not a run config, or one whose stream or
            setting is not the one the key names.
    """
    from moracl.config import load_config

    if key not in BENCH_SCENARIOS:
        raise ValueError(f"unknown bench scenario {key!r}; expected one of {list(BENCH_SCENARIOS)}")
    b = BENCH_SCENARIOS[key]
    name = key.replace("/", "-") + ("" if seed is None else f"-seed{seed}")
    overrides = [
        *(b.quick if quick else ()),
        *(() if seed is None else (f"train.seed={seed}",)),
        f"output_dir={Path(output_dir) / name}",
    ]
    config = load_config(CONFIGS / b.config, overrides)
    if not isinstance(config, RunConfig):
        raise ValueError(f"{b.config} is a {config.job!r} config, not a 'run' one")
    setting = None if config.scenario.setting is None else config.scenario.setting.value
    if f"{config.scenario.name}/{setting}" != key:
        raise ValueError(
            f"configs/{b.config} runs {config.scenario.name}/{setting}; the benchmark's "
            f"stream {key!r} expects that stream and setting"
        )
    return config


def _sizes(config: RunConfig) -> str:
    o = config.scenario.options
    return (
        f"{o.get('per_class', 'default')} train and {o.get('test_per_class', 'default')} test "
        f"examples per class, validation share {config.scenario.val_share}, at most "
        f"{config.train.epochs} epoch(s), batch {config.train.batch_size}"
    )


# -- running ----------------------------------------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _run_alone(
    config_data: dict[str, Any], threads: int | None, device: str = "cpu"
) -> tuple[dict[str, Any], int]:
    """Child-process entry: run one config, return its results and the peak RSS."""
    from moracl.config import from_dict
    from moracl.jobs.continual import run

    # as the moracl command does: Avalanche's import warns that no QP solver is installed,
    # which no strategy here needs
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    if threads is not None:
        torch.set_num_threads(threads)
    results = run(from_dict(RunConfig, config_data), progress=False, device=device)
    return results.to_dict(), _peak_rss()


def _merge(config: RunConfig, parts: Sequence[tuple[dict[str, Any], int]]) -> RunResults:
    """One :class:`RunResults` from the one-strategy runs of ``config``, each strategy's peak
    memory that of its own process."""
    from moracl.config import to_dict

    merged: RunResults | None = None
    for data, peak in parts:
        part = RunResults.from_dict(data)
        if merged is None:
            merged = replace(part, strategies={}, config=to_dict(config))
        for result in part.strategies.values():
            merged.add(replace(result, cost=replace(result.cost, peak_memory_bytes=peak)))
    if merged is None:
        raise ValueError(f"config {config.output_dir!r} has no strategies to run")
    return merged


def run_scenarios(
    configs: Sequence[RunConfig],
    *,
    isolate: bool = True,
    threads: int | None = None,
    jobs: int = 1,
    device: str = "cpu",
) -> Iterator[RunResults]:
    """Every strategy of each config on its stream; yields one :class:`RunResults` per config,
    in order, as soon as its strategies are done.

    With ``isolate`` each strategy runs alone in a fresh process (``spawn``; at most ``jobs``
    at once, each strategy of every config queued from the start) and its
    ``peak_memory_bytes`` is that process's peak resident set; otherwise one
    :func:`~moracl.jobs.continual.run` per config in this process runs them all (peak memory
    is then only measured on CUDA). ``threads`` sets torch's CPU threads of the runs;
    ``device`` is where they train (``moracl run --device``).

    Raises:
        ValueError: ``jobs < 1``, or ``jobs > 1`` without ``isolate``.
    """
    from moracl.jobs.continual import run

    if jobs < 1 or (jobs > 1 and not isolate):
        raise ValueError(
            f"jobs={jobs}; expected 1, or more with isolate=True (strategy processes side by side)"
        )
    if not isolate:
        if threads is not None:
            torch.set_num_threads(threads)
        for config in configs:
            yield run(config, progress=False, device=device)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1)
    try:
        pending: list[list[Future[tuple[dict[str, Any], int]]]] = []
        for config in configs:
            names = [s for s in STRATEGIES if s in config.strategies]
            runs = [pool.submit(_run_alone, _one(config, n), threads, device) for n in names]
            pending.append(runs)
        for config, futures in zip(configs, pending):
            yield _merge(config, [f.result() for f in futures])
    finally:  # an error or an interrupt drops the strategies not started yet
        pool.shutdown(wait=True, cancel_futures=True)


def _one(config: RunConfig, name: str) -> dict[str, Any]:
    """``config`` with strategy ``name`` alone, writing under ``output_dir/name``, as a dict
    (what a child process receives)."""
    from moracl.config import to_dict

    out = str(Path(config.output_dir) / name)
    return to_dict(replace(config, strategies=[name], output_dir=out))


def run_scenario(
    config: RunConfig, *, isolate: bool = True, threads: int | None = None
) -> RunResults:
    """Every strategy of ``config`` on its stream (:func:`run_scenarios` of one config)."""
    return next(run_scenarios([config], isolate=isolate, threads=threads))


# -- loop cost --------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """A small MLP encoder (784-64-64 on flattened 28x28 images): so little compute per step
    that the loop's own overhead shows. ``x (b, 1, 28, 28)`` -> features ``(b, 64)``."""

    feature_dim = 64
    default_targets = ("fc1", "fc2")

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))  # (b, 64)
        out: torch.Tensor = torch.relu(self.fc2(h))  # (b, 64)
        return out


def loop_cost(
    config: RunConfig,
    name: str,
    *,
    tiny_mlp: bool = False,
    repeats: int = 3,
    device: str = "cpu",
) -> LoopCost:
    """Loop cost of moracl's strategy on the first experience of ``config``'s stream (with
    ``tiny_mlp``, on a frozen :class:`TinyMLP` instead of the stream's encoder), training on
    ``device``."""
    import moracl_scenarios  # noqa: F401  (registers the streams and encoders)
    from moracl_scenarios.streams import build_stream, load_encoder

    from moracl.continual.factory import build_model, optimizer_factory
    from moracl.continual.plugins import TaskStatisticsPlugin
    from moracl.continual.strategies import build_strategy

    # no replay: the warm-up run would fill the buffer, and the template's timed runs would
    # then train on more examples than the plain loop; no routing supervision: the plain loop's
    # loss is the cross-entropy plus the routers' auxiliary loss, and the template's must be too
    routing = config.experts.routing
    if isinstance(routing, LearnedRouting):
        routing = routing.replace(supervision=0.0, teacher_forcing=False, balance_epochs=0)
    experts = replace(config.experts, replay_size=0, balance_head_epochs=0, routing=routing)
    config = replace(config, experts=experts)
    sc = config.scenario
    stream = build_stream(
        sc.name,
        setting=None if sc.setting is None else sc.setting.value,
        seed=config.train.seed,
        **sc.options,
    )
    torch.manual_seed(config.train.seed)
    encoder = TinyMLP().requires_grad_(False) if tiny_mlp else load_encoder(stream.info)
    model = build_model("moracl", config, encoder, stream.info)
    strategy = build_strategy("moracl", config, model, torch.device(device))
    # nor the task-inference statistics: a forward over the experience's rows after
    # training, up to the first adapted layer, which the plain loop does not make
    strategy.plugins = [p for p in strategy.plugins if not isinstance(p, TaskStatisticsPlugin)]
    first = next(iter(stream.benchmark.train_stream))
    return measure_loop_cost(
        name, strategy, first, optimizer_factory=optimizer_factory(config), repeats=repeats
    )


def _loop_costs(configs: dict[str, RunConfig], repeats: int, device: str = "cpu") -> list[LoopCost]:
    """The loop cost of each stream with task labels or domains (a class stream trains the
    same model and loop, with one shared head), and of the tiny MLP on split-fashion's."""
    rows = []
    for key, config in configs.items():
        if not key.endswith("/class"):
            rows.append(loop_cost(config, key, repeats=repeats, device=device))
    first = configs.get("split-fashion/task") or next(iter(configs.values()))
    if first.scenario.name != "wordnet-domains":
        tiny = "tiny MLP (784-64-64)"
        rows.append(loop_cost(first, tiny, tiny_mlp=True, repeats=repeats, device=device))
    return rows


# -- the record -------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """The streams of a ``--json`` record (its ``results``): each stream's tables
    (:func:`stream_markdown`), then every stream's targets in one table; empty without
    streams."""
    streams = results.get("scenarios") or {}
    if not streams:
        return ""
    parts = []
    by_stream: dict[str, list[Target]] = {}
    for key, entry in streams.items():
        runs = [RunResults.from_dict(r) for r in entry["runs"]]
        parts.append(stream_markdown(key, runs, config=entry["config"], sizes=entry["sizes"]))
        by_stream[key] = check_seed_targets(runs)
    parts.append(_summary(by_stream))
    return "\n\n".join(parts)


def _summary(by_stream: dict[str, list[Target]]) -> str:
    """Every stream's targets under one heading (printed at the end, and in the record)."""
    return "### Targets, every stream\n\n" + targets_table(by_stream)


def loop_cost_markdown(results: dict[str, Any]) -> str:
    """The loop-cost table of a ``--json`` record (its ``results``); empty without one."""
    rows = results.get("loop_cost") or []
    if not rows:
        return ""
    fields = ("name", "examples", "steps", "template_seconds", "plain_seconds", "max_weight_diff")
    costs = [
        LoopCost(**{k: r[k] for k in fields}, checked_seconds=r.get("checked_seconds"))
        for r in rows
    ]
    device = results.get("device", "cpu")
    head = f"### moracl's template against a plain PyTorch loop, on {device.upper()}"
    return f"{head}\n\n{loop_cost_table(costs, device)}"


def merge_record(path: Path, streams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``results`` and ``meta`` of the record at ``path`` with the strategies of
    ``streams`` (this run's ``results.scenarios``) added to its runs, seed by seed, and the
    targets checked again.

    Raises:
        ValueError: a stream the record lacks, or one whose config, sizes or seeds differ, or
            a strategy the record already holds for a stream.
    """
    import json

    data = json.loads(Path(path).read_text())
    results, meta = data["results"], data["meta"]
    for key, entry in streams.items():
        old = results["scenarios"].get(key)
        if old is None:
            raise ValueError(
                f"the record {path} has no stream {key!r}; it has {list(results['scenarios'])}"
            )
        for field_ in ("config", "sizes"):
            if old[field_] != entry[field_]:
                raise ValueError(
                    f"stream {key!r}: {field_} {entry[field_]!r} differs from the record's "
                    f"{old[field_]!r}"
                )
        old_runs = [RunResults.from_dict(r) for r in old["runs"]]
        new_runs = [RunResults.from_dict(r) for r in entry["runs"]]
        seeds = [[r.seed for r in runs] for runs in (old_runs, new_runs)]
        if seeds[0] != seeds[1]:
            raise ValueError(
                f"stream {key!r}: seeds {seeds[1]} differ from the record's {seeds[0]}"
            )
        for old_run, new_run in zip(old_runs, new_runs):
            for result in new_run.strategies.values():
                if result.name in old_run.strategies:
                    raise ValueError(
                        f"stream {key!r} already holds {result.name!r}; the record keeps one "
                        "measurement per strategy"
                    )
                old_run.add(result)
        runs = old_runs
        targets = check_seed_targets(runs)
        old["runs"] = [r.to_dict() for r in runs]
        old["targets"] = [{**asdict(t), "margin_text": t.margin_text} for t in targets]
    return results, meta


def _caveats(args: argparse.Namespace, threads: int | None) -> list[str]:
    notes = []
    if not args.loop_only:
        if len(args.seeds) == 1:
            notes.append(f"seed {args.seeds[0]} only: no spread over seeds")
        if args.quick:
            notes.append("--quick: smaller streams and fewer epochs than the configs'")
        if args.jobs > 1:
            notes.append(
                f"{args.jobs} strategy processes at once, each with torch.set_num_threads("
                f"{threads}): the wall seconds include their contention"
            )
        if not args.isolate:
            notes.append("all strategies in one process: peak memory not measured per strategy")
    if args.loop:
        after = "" if args.loop_only else ", measured after the streams ran"
        notes.append(f"loop cost: best of {args.repeats} timed rounds{after}")
    return [*notes, *args.caveats]


# -- command line -----------------------------------------------------------------------------


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench continual`` (a bad one: argparse's usage and
    error, exit status 2)."""
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="moracl bench continual", description=doc.split("\n")[0])
    parser.add_argument(
        "--scenarios", nargs="+", choices=list(BENCH_SCENARIOS), default=list(BENCH_SCENARIOS)
    )
    parser.add_argument("--quick", action="store_true", help="smaller streams, fewer epochs")
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=list(STRATEGIES),
        default=None,
        help="run only these strategies (default: each config's own list)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the strategies run to the --json record's streams instead of replacing it",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="run every stream once per seed and report mean ± sd (default: 0 1 2 3 4)",
    )
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run all strategies in this process (no per-strategy peak memory on CPU)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="strategy processes at once (default 1); each gets cores // jobs torch threads",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--device",
        type=device_arg,
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the streams and the loop cost train (as moracl run --device)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed rounds of the loop cost"
    )
    parser.add_argument("--no-loop-cost", dest="loop", action="store_false")
    parser.add_argument(
        "--loop-cost-only",
        dest="loop_only",
        action="store_true",
        help="measure the loop cost alone (on the first seed's configs), no streams",
    )
    parser.add_argument("--output-dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_caveat_arg(parser)
    args = parser.parse_args(argv)
    if any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct (each writes its own run folder), got {args.seeds}")
    if args.jobs > 1 and not args.isolate:
        parser.error(
            f"--jobs {args.jobs} runs strategy processes side by side; --no-isolate runs them "
            "all in this process: drop one of the two"
        )
    if args.merge and (args.json is None or not args.json.is_file()):
        parser.error(f"--merge adds rows to an existing --json record; got --json {args.json}")
    if args.merge and args.strategies is None:
        parser.error("--merge needs --strategies: the strategies whose rows it adds")
    if args.loop_only and not args.loop:
        parser.error("--loop-cost-only and --no-loop-cost leave nothing to measure")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``moracl bench continual`` / ``python -m moracl.bench.continual``."""
    argv = command_argv(argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = args.threads or (None if args.jobs == 1 else max(1, _cores() // args.jobs))
    meta = record_meta("continual", argv, device=args.device) if args.json is not None else {}
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="moracl-bench-continual-"))
    print(f"machine: {machine(args.device)}\n")
    plan = [(key, seed) for key in args.scenarios for seed in args.seeds]
    configs = {
        (key, seed): bench_config(key, quick=args.quick, output_dir=out, seed=seed)
        for key, seed in plan
    }
    if args.strategies is not None:
        configs = {k: replace(c, strategies=list(args.strategies)) for k, c in configs.items()}
    streams: dict[str, Any] = {}
    by_stream: dict[str, list[Target]] = {}
    if not args.loop_only:
        began = time.perf_counter()
        runs: dict[str, list[RunResults]] = {key: [] for key in args.scenarios}
        done = run_scenarios(
            [configs[k] for k in plan],
            isolate=args.isolate,
            threads=threads,
            jobs=args.jobs,
            device=args.device,
        )
        for (key, seed), results in zip(plan, done):
            runs[key].append(results)
            print(
                f"### {key}, seed {seed}\n\n{_sizes(configs[key, seed])}; "
                f"{len(results.experiences)} experiences; "
                f"{time.perf_counter() - began:.0f} s into the benchmark\n"
            )
            print(scenario_table(results), "\n", flush=True)
            if len(runs[key]) < len(args.seeds):
                continue
            config = f"configs/{BENCH_SCENARIOS[key].config}"
            sizes = _sizes(configs[key, args.seeds[0]])
            streams[key] = {"config": config, "sizes": sizes}
            streams[key]["runs"] = [r.to_dict() for r in runs[key]]
            if "moracl" not in configs[key, args.seeds[0]].strategies:
                continue  # (--strategies without moracl: the targets are moracl's)
            print(stream_markdown(key, runs[key], config=config, sizes=sizes), "\n", flush=True)
            by_stream[key] = check_seed_targets(runs[key])
            streams[key]["targets"] = [
                {**asdict(t), "margin_text": t.margin_text} for t in by_stream[key]
            ]
        if by_stream:
            print(_summary(by_stream), "\n", flush=True)
    rows: list[LoopCost] = []
    if args.loop:
        first = {key: configs[key, args.seeds[0]] for key in args.scenarios}
        rows = _loop_costs(first, args.repeats, device=args.device)
        print("### loop cost: moracl's template against a plain PyTorch loop\n")
        print(loop_cost_table(rows, args.device), "\n")
    if args.json is not None and args.merge:
        merged, old_meta = merge_record(args.json, streams)
        print(markdown(merged), "\n", flush=True)
        later = (
            f"{', '.join(args.strategies)} measured later, at commit {meta['commit']} on "
            f"{meta['date']} ({meta['machine']}): `{meta['command']}`"
        )
        write_record(args.json, "continual", old_meta, merged, caveats=[later, *args.caveats])
    elif args.json is not None:
        result = {
            "quick": args.quick,
            "seeds": args.seeds,
            "isolate": args.isolate,
            "jobs": args.jobs,
            "threads": threads,
            "device": args.device,
            "scenarios": streams,
            "loop_cost": [{**asdict(r), "ratio": r.ratio} for r in rows],
        }
        notes = _caveats(args, threads)
        write_record(args.json, "continual", meta, result, caveats=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
