"""``moracl bench continual``: moracl against the classic strategies on every stream, the
quality targets checked, and the cost of the training loop.

    moracl bench continual                      # every scenario at its config's sizes
    moracl bench continual --quick              # smaller streams, fewer epochs
    moracl bench continual --seeds 0 1 2        # each scenario per seed; mean ± sd tables
    moracl bench continual --scenarios split-fashion/task digit-domains/domain

For each scenario (a config in ``configs/`` and a setting) every strategy of
:data:`moracl.continual.config.STRATEGIES` runs on the same stream through
:func:`moracl.jobs.continual.run`. By default each strategy runs alone in a fresh
process, so that its peak memory (the process's peak resident set, ``ru_maxrss``: Python,
torch, the stream and the strategy) is its own; the accuracies are the same as in one
``moracl run`` of all strategies, because every strategy seeds its own random streams.

The targets (issue #5), checked on moracl's row of every scenario:

- ACC at least the best baseline's other than Joint;
- BWT >= -1 point (task-incremental scenarios);
- ACC within 3 points of Joint's;
- trainable parameters <= 2 % of the backbone.

The loop-cost table times moracl's training template on one experience against a plain
PyTorch loop on the same model and tensors (:mod:`moracl.bench.loopcost`); the target is a
ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moracl.bench.common import machine, markdown_table, positive_int
from moracl.bench.loopcost import LoopCost, measure_loop_cost
from moracl.continual.config import STRATEGIES, LearnedRouting, RunConfig
from moracl.continual.metrics import RunResults

__all__ = [
    "BENCH_SCENARIOS",
    "BenchScenario",
    "Target",
    "bench_config",
    "check_seed_targets",
    "check_targets",
    "loop_cost",
    "loop_cost_table",
    "main",
    "run_scenario",
    "scenario_table",
    "seed_table",
]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: the registry names of moracl and Joint (the keys of ``RunResults.strategies``)
MORACL = "moracl"
JOINT = "joint"
MAX_RATIO = 1.3


@dataclass(frozen=True)
class BenchScenario:
    """One stream of the benchmark: a run config, a setting, and the sizes to run it at.

    Attributes:
        config: a ``job: run`` YAML file in ``configs/``.
        setting: ``task``, ``class`` or ``domain``.
        overrides: dotted ``key=value`` overrides of the config (the streams run at the
            configs' own sizes: what ``moracl run`` gives).
        quick: further overrides for ``--quick``.
    """

    config: str
    setting: str
    overrides: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()


_WORDNET_QUICK = (
    "scenario.options.per_class=30",
    "scenario.options.test_per_class=20",
    "train.epochs=1",
)
_FASHION_QUICK = ("scenario.options.per_class=60", "scenario.options.test_per_class=40")
_DIGITS_QUICK = ("scenario.options.per_class=30", "scenario.options.test_per_class=20")
#: Without task labels moracl keeps a replay buffer of the Replay baseline's size
#: (``baselines.replay_size`` in the configs) for its shared head, fine-tuned class-balanced
#: on the buffer after each experience, and one rank-4 expert per experience; the configs'
#: gaussian task inference picks a test row's expert (no routers: 1.73 % of the backbone on
#: wordnet-domains, 1.80 % on split-fashion). digit-domains keeps learned routers with routing
#: supervision (its config). Three seeds, ACC: wordnet-domains/class 58.9 (two rank-2 experts,
#: top-2, no balancing, earlier reduced sizes) -> 62.2 (balanced head) -> 65.3 (routers
#: supervised per sample) -> 73.3 (gaussian task inference); split-fashion/class 63.6 -> 65.0
#: (routing supervision) -> 75.9 (gaussian task inference).
_CLASS = (
    "experts.replay_size=200",
    "experts.balance_head_epochs=5",
    "experts.per_experience=1",
)

#: ``scenario/setting`` -> how the benchmark runs it.
BENCH_SCENARIOS: dict[str, BenchScenario] = {
    "wordnet-domains/task": BenchScenario("wordnet_domains.yaml", "task", (), _WORDNET_QUICK),
    "wordnet-domains/class": BenchScenario(
        "wordnet_domains.yaml",
        "class",
        _CLASS,  # the config's gaussian task inference
        _WORDNET_QUICK,
    ),
    "split-fashion/task": BenchScenario("split_fashion.yaml", "task", (), _FASHION_QUICK),
    "split-fashion/class": BenchScenario(  # lr 3e-3 suits every strategy here (6e-3: task)
        "split_fashion.yaml",
        "class",
        (
            *_CLASS,  # the config's gaussian task inference
            "experts.balance_head_epochs=10",
            "train.lr=3e-3",
        ),
        _FASHION_QUICK,
    ),
    "digit-domains/domain": BenchScenario("digit_domains.yaml", "domain", (), _DIGITS_QUICK),
}


def bench_config(
    key: str,
    *,
    quick: bool = False,
    output_dir: str | Path = "out/bench-continual",
    seed: int | None = None,
) -> RunConfig:
    """The run config of ``BENCH_SCENARIOS[key]`` at bench (or quick) sizes, writing under
    ``output_dir/<scenario>-<setting>`` (``-seed<seed>`` appended when ``seed`` replaces the
    config's ``train.seed``: the seed draws the stream's examples, the initialisations and
    the batch order)."""
    from moracl.config import load_config

    if key not in BENCH_SCENARIOS:
        raise ValueError(f"unknown bench scenario {key!r}; expected one of {list(BENCH_SCENARIOS)}")
    b = BENCH_SCENARIOS[key]
    name = key.replace("/", "-") + ("" if seed is None else f"-seed{seed}")
    out = Path(output_dir) / name
    overrides = [
        f"scenario.setting={b.setting}",
        *b.overrides,
        *(b.quick if quick else ()),
        *(() if seed is None else (f"train.seed={seed}",)),
        f"output_dir={out}",
    ]
    config = load_config(CONFIGS / b.config, overrides)
    if not isinstance(config, RunConfig):
        raise ValueError(f"{b.config} is a {config.job!r} config, not a 'run' one")
    return config


def _sizes(config: RunConfig) -> str:
    o = config.scenario.options
    return (
        f"{o.get('per_class', 'default')} train and {o.get('test_per_class', 'default')} test "
        f"examples per class, {config.train.epochs} epoch(s), batch {config.train.batch_size}"
    )


# -- running ------------------------------------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _run_alone(config_data: dict[str, Any], threads: int | None) -> tuple[dict[str, Any], int]:
    """Child-process entry: run one config, return its results and the peak RSS."""
    from moracl.config import from_dict
    from moracl.jobs.continual import run

    if threads is not None:
        torch.set_num_threads(threads)
    results = run(from_dict(RunConfig, config_data), progress=False)
    return results.to_dict(), _peak_rss()


def run_scenario(
    config: RunConfig, *, isolate: bool = True, threads: int | None = None
) -> RunResults:
    """Every strategy of ``config`` on its stream.

    With ``isolate`` each strategy runs alone in a fresh process (``spawn``) and its
    ``peak_memory_bytes`` is that process's peak resident set; otherwise one
    :func:`~moracl.jobs.continual.run` in this process runs them all (peak memory is then
    only measured on CUDA).
    """
    from moracl.config import to_dict
    from moracl.jobs.continual import run

    if not isolate:
        if threads is not None:
            torch.set_num_threads(threads)
        return run(config, progress=False)
    merged: RunResults | None = None
    context = multiprocessing.get_context("spawn")
    for name in [s for s in STRATEGIES if s in config.strategies]:
        one = replace(config, strategies=[name], output_dir=str(Path(config.output_dir) / name))
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            data, peak = pool.submit(_run_alone, to_dict(one), threads).result()
        part = RunResults.from_dict(data)
        if merged is None:
            merged = replace(part, strategies={}, config=to_dict(config))
        for result in part.strategies.values():
            merged.add(replace(result, cost=replace(result.cost, peak_memory_bytes=peak)))
    assert merged is not None  # RunConfig rejects an empty strategy list
    return merged


# -- targets and tables ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One quality target on moracl's row: the measured value and whether it is met."""

    name: str
    value: str
    met: bool


def _pts(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def check_targets(results: RunResults) -> list[Target]:
    """The targets of issue #5 on moracl's row of ``results`` (see the module docstring).

    Raises:
        ValueError: ``results`` has no moracl row.
    """
    return check_seed_targets([results])


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _spread(values: Sequence[float]) -> str:
    """``mean ± sd`` in points over the seeds (the mean alone for one seed)."""
    mean, sd = _mean_sd(values)
    if len(values) < 2 or math.isnan(mean):
        return _pts(mean)
    return f"{_pts(mean)} ± {_pts(sd)}"


def check_seed_targets(runs: Sequence[RunResults]) -> list[Target]:
    """The targets on moracl's mean over ``runs`` (the same scenario, one run per seed).

    ACC is compared with the baseline of the best mean ACC (Joint aside); with several seeds
    the measured value also gives moracl's per-seed difference from it, mean ± sd.

    Raises:
        ValueError: no runs, or a run without a moracl row.
    """
    if not runs:
        raise ValueError("check_seed_targets needs at least one run")
    for results in runs:
        if MORACL not in results.strategies:
            raise ValueError(f"no {MORACL!r} row in the results; have {list(results.strategies)}")
    several = len(runs) > 1

    def accs(name: str) -> list[float]:
        return [r.strategies[name].matrix.acc() for r in runs]

    ours = accs(MORACL)
    acc = _mean_sd(ours)[0]
    targets = []
    names = [n for n in runs[0].strategies if n not in (MORACL, JOINT)]
    if names:
        means = {n: _mean_sd(accs(n))[0] for n in names}
        best = max(means, key=lambda n: means[n])
        diff = [a - b for a, b in zip(ours, accs(best))]
        extra = f" (per seed {_spread(diff)})" if several else ""
        targets.append(
            Target(
                "ACC >= best baseline (not Joint)",
                f"{_pts(acc)} vs {runs[0].strategies[best].label} {_pts(means[best])}{extra}",
                acc >= means[best],
            )
        )
    if runs[0].setting == "task":
        bwt = _mean_sd([r.strategies[MORACL].matrix.bwt() for r in runs])[0]
        targets.append(Target("BWT >= -1 point", _pts(bwt), bwt >= -0.01))
    if JOINT in runs[0].strategies:
        joint = _mean_sd(accs(JOINT))[0]
        gap = joint - acc
        targets.append(
            Target(
                "ACC within 3 points of Joint",
                f"{_pts(acc)} vs {_pts(joint)} ({_pts(-gap)})",
                gap <= 0.03,
            )
        )
    share = max(r.strategies[MORACL].cost.trainable_share for r in runs)
    targets.append(
        Target("trainable <= 2 % of backbone", f"{100 * share:.2f}%", bool(share <= 0.02))
    )
    return targets


def seed_table(runs: Sequence[RunResults]) -> str:
    """One markdown row per strategy with ACC, BWT and max-based forgetting as mean ± sd over
    ``runs`` (one per seed, points), then the targets on the means."""
    header = ["strategy", f"ACC ({len(runs)} seeds)", "BWT", "forgetting"]
    rows = []
    for name in runs[0].strategies:
        matrices = [r.strategies[name].matrix for r in runs]
        rows.append(
            [
                runs[0].strategies[name].label,
                _spread([m.acc() for m in matrices]),
                _spread([m.bwt() for m in matrices]),
                _spread([m.forgetting() for m in matrices]),
            ]
        )
    lines = [markdown_table(header, rows), ""]
    targets = [
        [t.name, t.value, "met" if t.met else "**not met**"] for t in check_seed_targets(runs)
    ]
    lines.append(markdown_table(["target (moracl, means)", "measured", ""], targets))
    return "\n".join(lines)


def _memory(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def scenario_table(results: RunResults) -> str:
    """One markdown row per strategy: ACC, BWT, max-based forgetting (points), trainable share
    of the backbone, wall seconds (training and evaluation) and peak memory; then the
    targets, each met or not met."""
    header = ["strategy", "ACC", "BWT", "forgetting", "trainable %", "wall s", "peak memory"]
    rows = []
    for s in results.strategies.values():
        m = s.matrix
        rows.append(
            [
                s.label,
                _pts(m.acc()),
                _pts(m.bwt()),
                _pts(m.forgetting()),
                f"{100 * s.cost.trainable_share:.2f}",
                f"{s.cost.wall_seconds:.1f}",
                _memory(s.cost.peak_memory_bytes),
            ]
        )
    lines = [markdown_table(header, rows), ""]
    if MORACL in results.strategies:
        targets = [
            [t.name, t.value, "met" if t.met else "**not met**"] for t in check_targets(results)
        ]
        lines.append(markdown_table(["target (moracl)", "measured", ""], targets))
    return "\n".join(lines)


# -- loop cost ------------------------------------------------------------------------------


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
    config: RunConfig, name: str, *, tiny_mlp: bool = False, repeats: int = 3
) -> LoopCost:
    """Loop cost of moracl's strategy on the first experience of ``config``'s stream (with
    ``tiny_mlp``, on a frozen :class:`TinyMLP` instead of the stream's encoder)."""
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
    strategy = build_strategy("moracl", config, model, torch.device("cpu"))
    # nor the task-inference statistics: a forward over the experience's rows after
    # training, up to the first adapted layer, which the plain loop does not make
    strategy.plugins = [p for p in strategy.plugins if not isinstance(p, TaskStatisticsPlugin)]
    first = next(iter(stream.benchmark.train_stream))
    return measure_loop_cost(
        name, strategy, first, optimizer_factory=optimizer_factory(config), repeats=repeats
    )


def loop_cost_table(rows: Sequence[LoopCost]) -> str:
    """One markdown row per measurement: steps, both times, the ratio against 1.3x, and the
    largest weight difference between the two loops."""
    body = [
        [
            r.name,
            r.examples,
            r.steps,
            f"{r.template_seconds:.3f}",
            f"{r.plain_seconds:.3f}",
            f"{r.ratio:.2f}x",
            "met" if r.ratio <= MAX_RATIO else "**not met**",
            f"{r.max_weight_diff:.1e}",
        ]
        for r in rows
    ]
    header = [
        "model (experience 0)",
        "examples",
        "steps",
        "template s",
        "plain loop s",
        "ratio",
        f"<= {MAX_RATIO}x",
        "max |Δw|",
    ]
    return markdown_table(header, body)


# -- command line ---------------------------------------------------------------------------


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
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every scenario once per seed and report mean ± sd (default: the config's)",
    )
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run all strategies in this process (no per-strategy peak memory on CPU)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed rounds of the loop cost"
    )
    parser.add_argument("--no-loop-cost", dest="loop", action="store_false")
    parser.add_argument("--output-dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.seeds is not None and any(seed < 0 for seed in args.seeds):
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct (each writes its own run folder), got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``moracl bench continual`` / ``python -m moracl.bench.continual``."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="moracl-bench-continual-"))
    print(f"machine: {machine()}\n")
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "scenarios": {}}
    configs: dict[str, RunConfig] = {}
    for key in args.scenarios:
        runs = []
        for seed in args.seeds or [None]:
            config = bench_config(key, quick=args.quick, output_dir=out, seed=seed)
            configs.setdefault(key, config)
            began = time.perf_counter()
            results = run_scenario(config, isolate=args.isolate, threads=args.threads)
            took = time.perf_counter() - began
            runs.append(results)
            print(
                f"### {key}, seed {config.train.seed}\n\n{_sizes(config)}; "
                f"{len(results.experiences)} experiences; {took:.0f} s\n"
            )
            print(scenario_table(results), "\n", flush=True)
        entry: dict[str, Any] = {
            "sizes": _sizes(configs[key]),
            "results": [r.to_dict() for r in runs] if args.seeds else runs[0].to_dict(),
            "targets": [t.__dict__ for t in check_seed_targets(runs)],
        }
        if args.seeds:
            print(f"### {key}: over seeds {args.seeds}\n\n{seed_table(runs)}\n", flush=True)
            entry["seeds"] = args.seeds
        report["scenarios"][key] = entry
    if args.loop:
        rows = []
        for key, config in configs.items():
            if key.endswith("/class"):
                continue  # same model and loop as the task setting, but one shared head
            rows.append(loop_cost(config, key, repeats=args.repeats))
        first = configs.get("split-fashion/task") or next(iter(configs.values()))
        if first.scenario.name != "wordnet-domains":
            rows.append(
                loop_cost(first, "tiny MLP (784-64-64)", tiny_mlp=True, repeats=args.repeats)
            )
        print("### loop cost: moracl's template against a plain PyTorch loop\n")
        print(loop_cost_table(rows), "\n")
        report["loop_cost"] = [{**r.__dict__, "ratio": r.ratio} for r in rows]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
