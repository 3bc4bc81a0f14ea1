"""``moracl bench dylora``: one DyLoRA trained at rank ``r`` and evaluated at each ``b``,
against a LoRA trained at each rank ``b``, on WordNet glosses with the MiniLM encoder.

The bottom ``--frozen-layers`` layers of MiniLM run once per gloss (their outputs are
cached); the adapters go on the query and value projections of the layers above, which train
with a linear head (``moracl finetune``'s training loop: AdamW, a learning rate of ``--lrs``
for the adapters and ``--head-lr`` for the head). Every model starts from the same seed and
sees the same batches; DyLoRA draws its rank at each step and is then evaluated with
``set_rank(b)``, without retraining. LoRA at rank ``b`` uses the same ``alpha``, so its
scaling ``alpha / b`` is that of DyLoRA truncated to ``b``. DyLoRA is trained in each
variant: each update rule of ``--updates`` (``last``: only row/column ``b`` learns at each
step, the paper's frozen mode; ``all``: every row up to ``b``) with each scaling of
``--scalings`` (``linear``: the paper's ``alpha / b``; ``rslora``: ``alpha / sqrt(b)``, named
``all+rslora``; ``fixed``: ``alpha / r`` at every ``b``, so truncation drops rows without
rescaling the kept ones, named ``all+fixed``) and each share of ``--full-shares`` (of the draws
that take the full rank, the rest uniform; ``all+rslora+full0.5`` draws it half the time).
Every choice is made on a validation split held out of the training glosses, on means over
the seeds: DyLoRA's variant and learning rate (the best mean validation accuracy over the
ranks) and each rank's LoRA learning rate; the test split is only reported.
Offline; one training takes about 40 seconds on one CPU core, and a seed trains
``len(lrs) · (variants + len(ranks))`` models (the test split has 300 glosses: one gloss is
0.33 points, so compare means over ``--seeds``).

Every training is deterministic given its seed and learning rate, so ``--reuse RECORD ...``
widens earlier records' grids at the cost of the new points only: the records' runs for the
same seeds and settings are kept, and only the learning rates and DyLoRA variants they lack
are trained (the new record's caveats say which runs were reused and from which commit).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moracl.bench.common import (
    add_caveat_arg,
    command_argv,
    machine,
    markdown_table,
    positive_float,
    positive_int,
    record_meta,
    write_record,
)

__all__ = ["CATEGORIES", "main", "markdown", "parse_args", "run"]

#: the five WordNet noun categories the benchmark classifies glosses into by default
CATEGORIES = ("noun.act", "noun.attribute", "noun.cognition", "noun.communication", "noun.event")


class _Classifier(nn.Module):
    """MiniLM's top layers on cached hidden states, mean pooling, then a linear head:
    ``x (b, n, d + 1) -> logits (b, k)``."""

    def __init__(self, top: nn.Module, features: int, classes: int) -> None:
        super().__init__()
        self.top = top
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.top(x))  # (b, n, d + 1) -> (b, d) -> (b, k)


class _Split(NamedTuple):
    """Cached MiniLM states ``x (n, n_tok, d + 1)`` and labels ``y (n,)`` of one split."""

    x: Tensor
    y: Tensor


def _data(args: argparse.Namespace) -> tuple[_Split, _Split, _Split, nn.Module, int]:
    """Train, validation and test splits (the first ``val_per_class`` training glosses of each
    category are held out), the top of MiniLM and its feature width."""
    from moracl_scenarios.wordnet import wordnet_classification

    from moracl.backbones import MiniLMTop, load_minilm, minilm_prefix_states

    train, test = wordnet_classification(
        list(args.categories),
        per_class=args.per_class + args.val_per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
    )
    encoder, tokenizer = load_minilm()
    for p in encoder.parameters():
        p.requires_grad_(False)

    def split(texts: list[str], labels: list[int]) -> _Split:
        x = minilm_prefix_states(
            texts, args.frozen_layers, args.max_length, model=encoder, tokenizer=tokenizer
        )  # (n, n_tok, d + 1)
        return _Split(x, torch.tensor(labels))

    texts, labels = list(train["text"][:]), list(train["label"][:])
    seen: dict[int, int] = {}
    held = []  # the first val_per_class rows of each category (rows are shuffled already)
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        held.append(seen[label] <= args.val_per_class)
    fit = [i for i, h in enumerate(held) if not h]
    val = [i for i, h in enumerate(held) if h]
    top = MiniLMTop(encoder, args.frozen_layers)
    return (
        split([texts[i] for i in fit], [labels[i] for i in fit]),
        split([texts[i] for i in val], [labels[i] for i in val]),
        split(list(test["text"][:]), list(test["label"][:])),
        top,
        top.feature_dim,
    )


def _train(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace) -> tuple[float, int]:
    """Train ``model`` on ``x (n, n_tok, d + 1)``, ``y (n,)``; ``(seconds, steps)``."""
    from moracl.config import TrainConfig
    from moracl.jobs.finetune import train_model

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        seed=args.seed,
        max_length=args.max_length,
    )
    start = time.perf_counter()
    log = train_model(model, lambda idx: {"x": x[idx]}, y, config, name="dylora bench")
    return time.perf_counter() - start, log.steps


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    logits = torch.cat([model(x=x[i : i + 128]) for i in range(0, len(x), 128)])  # (n, k)
    return float((logits.argmax(-1) == y).double().mean())


#: DyLoRA's scalings: the paper's ``alpha / b``, rsLoRA's ``alpha / sqrt(b)``, the full rank's
SCALINGS = ("linear", "rslora", "fixed")


def variant_name(update: str, scaling: str, full_share: float = 0.0) -> str:
    """A DyLoRA variant's key in the record: ``all``, ``last``, ``all+rslora``,
    ``all+rslora+full0.5`` (half the draws take the full rank), ..."""
    name = update if scaling == "linear" else f"{update}+{scaling}"
    return name if full_share == 0 else f"{name}+full{full_share:g}"


def parse_variant(name: str) -> tuple[str, str, float]:
    """``(update, scaling, full_share)`` of a variant's key (:func:`variant_name`)."""
    update, *rest = name.split("+")
    scaling, share = "linear", 0.0
    for part in rest:
        if part.startswith("full"):
            share = float(part.removeprefix("full"))
        else:
            scaling = part
    return update, scaling, share


def variants(args: argparse.Namespace) -> list[str]:
    """The DyLoRA variants ``args`` asks for (update rules × scalings × full-rank shares), in
    that order."""
    shares = getattr(args, "full_shares", [0.0])
    return [variant_name(u, s, f) for f in shares for s in args.scalings for u in args.updates]


def run_seed(args: argparse.Namespace) -> dict[str, Any]:
    """Train DyLoRA at ``args.rank`` in each variant of ``args.todo`` (variant name -> the
    learning rates to train it at) and LoRA at each of ``args.ranks`` at every learning rate
    of ``args.lrs`` (data split, initialisation and batches from ``args.seed``); validation
    and test accuracy per rank (fractions), keyed ``dylora[variant][lr]`` and ``lora[lr]``
    (``lr`` as text)."""
    from moracl import AdapterConfig, LoRAConfig, MoRAModel
    from moracl.adapters.dylora import DyLoRAConfig, DyLoRAUpdate, set_rank
    from moracl.backbones import MINILM_TARGETS

    train, val, test, top, features = _data(args)
    classes = len(args.categories)

    def adapted(config: AdapterConfig) -> MoRAModel:
        torch.manual_seed(args.seed)  # the same head and the same leading rows of A
        classifier = _Classifier(top, features, classes)
        return MoRAModel(
            classifier, config, target_modules=list(MINILM_TARGETS), modules_to_save=["head"]
        )

    def scores(model: nn.Module) -> dict[str, float]:
        return {"val": _accuracy(model, val.x, val.y), "test": _accuracy(model, test.x, test.y)}

    todo: dict[str, list[float]] = args.todo
    dylora: dict[str, dict[str, list[dict[str, float]]]] = {v: {} for v in todo}
    lora: dict[str, list[dict[str, float]]] = {}
    steps = 0
    for variant, lrs in todo.items():
        update, scaling, share = parse_variant(variant)
        for lr in lrs:
            at = argparse.Namespace(**{**vars(args), "lr": lr})
            config = DyLoRAConfig(
                rank=args.rank, alpha=args.alpha, seed=args.seed, update=DyLoRAUpdate(update),
                rslora=scaling == "rslora", fixed_scale=scaling == "fixed",
                full_rank_share=share,
            )  # fmt: skip
            model = adapted(config)
            _, steps = _train(model, train.x, train.y, at)
            dylora[variant][str(lr)] = []
            for b in args.ranks:
                set_rank(model, b)
                dylora[variant][str(lr)].append(scores(model))
    for lr in args.lrs:
        at = argparse.Namespace(**{**vars(args), "lr": lr})
        lora[str(lr)] = []
        for b in args.ranks:
            model = adapted(LoRAConfig(rank=b, alpha=args.alpha))
            _, steps = _train(model, train.x, train.y, at)
            lora[str(lr)].append(scores(model))
    return {
        "seed": args.seed,
        "sizes": [len(train.y), len(val.y), len(test.y)],
        "steps": steps,
        "dylora": dylora,
        "lora": lora,
    }


def _missing(
    olds: list[dict[str, Any]], names: list[str], lrs: list[float]
) -> tuple[dict[str, list[float]], list[float]]:
    """What one seed still has to train given its earlier runs ``olds``: the learning rates
    of ``lrs`` each DyLoRA variant of ``names`` lacks, and those LoRA lacks."""

    def has(key: str, variant: str | None, lr: float) -> bool:
        rows = [r[key] if variant is None else r[key].get(variant, {}) for r in olds]
        return any(str(lr) in row for row in rows)

    todo = {v: [lr for lr in lrs if not has("dylora", v, lr)] for v in names}
    return {v: t for v, t in todo.items() if t}, [lr for lr in lrs if not has("lora", None, lr)]


def _merge_runs(runs: list[dict[str, Any]], names: list[str], lrs: list[str]) -> dict[str, Any]:
    """One seed's run for every DyLoRA variant of ``names`` and learning rate of ``lrs`` (as
    text), each taken from the first of ``runs`` (the new run first, then earlier records'
    runs) that has it."""

    def pick(key: str, variant: str | None, lr: str) -> Any:
        for r in runs:
            rows = r[key] if variant is None else r[key].get(variant, {})
            if lr in rows:
                return rows[lr]
        raise KeyError(lr)  # unreachable: every missing point is trained

    first = runs[0]
    return {
        "seed": first["seed"],
        "sizes": first["sizes"],
        "steps": first["steps"],
        "dylora": {v: {lr: pick("dylora", v, lr) for lr in lrs} for v in names},
        "lora": {lr: pick("lora", None, lr) for lr in lrs},
    }


#: options that must agree between a run and the record it reuses (all but these)
_FREE_OPTIONS = frozenset(
    {"lrs", "seeds", "updates", "scalings", "full_shares", "json", "caveats", "reuse", "reused"}
)


def reused_runs(path: str, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """The runs of the ``moracl bench dylora`` record at ``path`` by seed, once its settings
    (every option but the learning rates, seeds, DyLoRA variants and output) are checked to
    equal ``args``'s.

    Raises:
        ValueError: the file is missing, not a DyLoRA record, or made with other settings
            (the option and both values named).
    """
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--reuse {path!r}: cannot read a JSON record ({e})") from e
    ok = isinstance(record, dict) and record.get("benchmark") == "dylora"
    meta, results = (record.get("meta"), record.get("results")) if ok else (None, None)
    words = shlex.split(meta.get("command", "")) if isinstance(meta, dict) else []
    runs = results.get("runs") if isinstance(results, dict) else None
    if words[:3] != ["moracl", "bench", "dylora"] or not isinstance(runs, list):
        raise ValueError(f"--reuse {path!r}: not a 'moracl bench dylora' record")
    before = parse_args(words[3:], check_reuse=False)
    for key, value in vars(args).items():
        if key not in _FREE_OPTIONS and getattr(before, key, None) != value:
            raise ValueError(
                f"--reuse {path!r}: the record has --{key.replace('_', '-')} "
                f"{getattr(before, key, None)!r}, this run {value!r}; only --lrs, --seeds, "
                "--updates, --scalings and --full-shares may differ"
            )
    return {int(r["seed"]): r for r in runs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_seed` for each of ``args.seeds``, then every choice on validation (means
    over the seeds): DyLoRA's variant and learning rate (the best mean validation accuracy
    over the ranks), and each rank's LoRA learning rate; per rank and variant the mean
    accuracies and the mean and standard deviation of the test gap (DyLoRA − LoRA).
    ``args.reused`` (from ``--reuse``): earlier runs by seed, whose points are not trained
    again."""
    reused: dict[int, list[dict[str, Any]]] = getattr(args, "reused", None) or {}
    names = variants(args)
    lrs = [str(lr) for lr in args.lrs]
    runs = []
    for seed in args.seeds:
        olds = reused.get(seed, [])
        todo, lora_lrs = _missing(olds, names, list(args.lrs))
        new = []
        if todo or lora_lrs:
            torch.manual_seed(seed)
            at = {**vars(args), "seed": seed, "lrs": lora_lrs, "todo": todo}
            new = [run_seed(argparse.Namespace(**at))]
        runs.append(_merge_runs([*new, *olds], names, lrs))

    def acc(variant: str | None, lr: str, i: int, split: str) -> Tensor:  # (seeds,)
        rows = [r["lora"][lr][i] if variant is None else r["dylora"][variant][lr][i] for r in runs]
        return torch.tensor([row[split] for row in rows], dtype=torch.float64)

    def dylora_val(update: str, lr: str) -> float:  # mean over ranks and seeds
        return float(
            torch.stack([acc(update, lr, i, "val") for i in range(len(args.ranks))]).mean()
        )

    best_lr = {u: max(lrs, key=lambda lr: dylora_val(u, lr)) for u in names}
    val_means = {u: dylora_val(u, best_lr[u]) for u in names}
    chosen = max(names, key=lambda u: val_means[u])  # the first of a tie
    lora_lr = [
        max(lrs, key=lambda lr: float(acc(None, lr, i, "val").mean()))
        for i in range(len(args.ranks))
    ]
    by_update = {}
    for u in names:
        rows = []
        for i, b in enumerate(args.ranks):
            mine, theirs = (u, best_lr[u]), (None, lora_lr[i])
            gap = acc(*mine, i, "test") - acc(*theirs, i, "test")  # (seeds,)
            rows.append(
                {
                    "rank": b,
                    "dylora_lr": float(best_lr[u]),
                    "lora_lr": float(lora_lr[i]),
                    "dylora_val": float(acc(*mine, i, "val").mean()),
                    "lora_val": float(acc(*theirs, i, "val").mean()),
                    "dylora": float(acc(*mine, i, "test").mean()),
                    "lora": float(acc(*theirs, i, "test").mean()),
                    "gap": float(gap.mean()),
                    "gap_std": float(gap.std()) if len(gap) > 1 else 0.0,
                    "gaps": gap.tolist(),
                }
            )
        by_update[u] = rows
    train, val, test = runs[0]["sizes"]
    return {
        "categories": list(args.categories),
        "train": train,
        "val": val,
        "test": test,
        "rank": args.rank,
        "alpha": args.alpha,
        "epochs": args.epochs,
        "lrs": list(args.lrs),
        "seeds": list(args.seeds),
        "steps": runs[0]["steps"],
        "val_mean": val_means,
        "chosen": chosen,
        "by_update": by_update,
        "runs": runs,
        "results": by_update[chosen],
    }


_SCALE_TEXT = {
    "linear": "`alpha / b`",
    "rslora": "`alpha / sqrt(b)` (rsLoRA)",
    "fixed": "`alpha / r` at every `b` (the full rank's)",
}


def markdown(result: dict[str, Any]) -> str:
    """A heading naming the task, then per DyLoRA variant (the one chosen on validation first)
    one row per rank: validation and test accuracies (means over the seeds), the mean test
    gap with its standard deviation, and each seed's gap."""
    seeds = result.get("seeds", [0])
    by_update = result.get("by_update", {"last": result["results"]})
    chosen = result.get("chosen", "last")
    head = (
        f"### DyLoRA r={result['rank']} (trained once) vs LoRA trained at each rank, "
        f"alpha={result['alpha']}: {len(result['categories'])} WordNet categories, "
        f"{result['train']} training / {result.get('val', 0)} validation / {result['test']} "
        f"test glosses, {result['epochs']} epochs, mean of {len(seeds)} seed(s) {seeds}"
    )
    parts = [head]
    for variant in sorted(by_update, key=lambda u: u != chosen):
        rows = [
            [
                r["rank"],
                f"{r['lora_lr']:g}" if "lora_lr" in r else "—",
                f"{100 * r.get('dylora_val', float('nan')):.1f}",
                f"{100 * r.get('lora_val', float('nan')):.1f}",
                f"{100 * r['dylora']:.1f}",
                f"{100 * r['lora']:.1f}",
                f"{100 * r.get('gap', r['dylora'] - r['lora']):+.1f} ± "
                f"{100 * r.get('gap_std', 0.0):.1f}",
                " ".join(f"{100 * g:+.1f}" for g in r.get("gaps", [r["dylora"] - r["lora"]])),
            ]
            for r in by_update[variant]
        ]
        mean = result.get("val_mean", {}).get(variant)
        note = "chosen on validation" if variant == chosen else "not chosen"
        lr = by_update[variant][0].get("dylora_lr")
        update, scaling, share = parse_variant(variant)
        drawn = f", the full rank drawn at {share:.0%} of the steps" if share else ""
        title = (
            f"update `{update}`, scaling {_SCALE_TEXT[scaling]}{drawn} ({note}"
            + (f"; lr {lr:g}" if lr is not None else "")
            + (f"; mean validation accuracy {100 * mean:.1f} %)" if mean is not None else ")")
        )
        table = markdown_table(
            [
                "rank b",
                "LoRA's lr",
                "DyLoRA val (%)",
                "LoRA val (%)",
                "DyLoRA test (%)",
                "LoRA test (%)",
                "test gap (points)",
                "gap per seed",
            ],
            rows,
        )
        parts += [title, table]
    return "\n\n".join(parts)


def _share(text: str) -> float:
    """A share in ``[0, 1)`` (argparse's type for ``--full-shares``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def parse_args(argv: list[str] | None = None, *, check_reuse: bool = True) -> argparse.Namespace:
    """The checked options of ``moracl bench dylora`` (a bad one: argparse's usage and error,
    exit status 2); with ``--reuse``, the record's runs as ``reused`` (by seed)."""
    parser = argparse.ArgumentParser(prog="moracl bench dylora", description=__doc__)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--per-class", type=positive_int, default=80)
    parser.add_argument("--val-per-class", type=positive_int, default=16)
    parser.add_argument("--test-per-class", type=positive_int, default=60)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--alpha", type=positive_float, default=16.0)
    parser.add_argument("--frozen-layers", type=int, default=4, help="MiniLM layers cached")
    parser.add_argument("--max-length", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=6)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--lrs",
        type=positive_float,
        nargs="+",
        default=[2e-3],
        help="each method's lr chosen on validation",
    )
    parser.add_argument("--head-lr", type=positive_float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="mean over these")
    parser.add_argument(
        "--updates",
        nargs="+",
        choices=["last", "all"],
        default=["last", "all"],
        help="DyLoRA's update rules (with each scaling, one variant chosen on validation)",
    )
    parser.add_argument(
        "--scalings",
        nargs="+",
        choices=list(SCALINGS),
        default=["linear"],
        help="DyLoRA's scalings: linear (alpha / b, the paper's), rslora (alpha / sqrt(b)), "
        "fixed (alpha / r at every b)",
    )
    parser.add_argument(
        "--full-shares",
        type=_share,
        nargs="+",
        default=[0.0],
        help="DyLoRA's shares of draws that take the full rank (0: the paper's uniform draw), "
        "each with every update rule and scaling",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=None,
        metavar="RECORD",
        help="earlier --json records with the same settings: train only the points they lack",
    )
    add_caveat_arg(parser)
    args: argparse.Namespace = parser.parse_args(argv)
    bad = [b for b in args.ranks if b > args.rank]
    if bad:
        parser.error(f"--ranks {bad} exceed --rank {args.rank}")
    args.reused = None
    if args.reuse is not None and check_reuse:
        args.reused = {}
        for path in args.reuse:
            try:
                by_seed = reused_runs(path, args)
            except ValueError as e:
                parser.error(str(e))
            for seed, r in by_seed.items():
                args.reused.setdefault(seed, []).append(r)
    return args


def _reuse_caveat(args: argparse.Namespace) -> list[str]:
    """What ``--reuse`` kept, for the record: per earlier record (in the order named, the
    first holding a point supplies it) the seeds, models and learning rates it supplied and
    the commit that trained them."""
    if not args.reused:
        return []
    names, lrs = variants(args), [str(lr) for lr in args.lrs]
    taken: set[tuple[int, str, str]] = set()  # (seed, model, lr) supplied already
    out = []
    for path in args.reuse:
        record = json.loads(Path(path).read_text())
        supplied: dict[str, set[str]] = {}  # model -> lrs
        seeds = set()
        for r in record["results"]["runs"]:
            if r["seed"] not in args.seeds:
                continue
            held = [("LoRA", lr) for lr in r["lora"] if lr in lrs] + [
                (v, lr) for v in names for lr in r["dylora"].get(v, {}) if lr in lrs
            ]
            for model, lr in held:
                if (r["seed"], model, lr) not in taken:
                    taken.add((r["seed"], model, lr))
                    supplied.setdefault(model, set()).add(lr)
                    seeds.add(r["seed"])
        if not supplied:
            continue
        what = "; ".join(
            f"{'LoRA' if m == 'LoRA' else 'DyLoRA ' + m} at lr {', '.join(sorted(v, key=float))}"
            for m, v in supplied.items()
        )
        out.append(
            f"reused from {path} (commit {record['meta'].get('commit', '?')}), trainings being "
            f"deterministic: {what}, for seeds {sorted(seeds)}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    meta = record_meta("dylora", argv) if args.json else {}
    result = run(args)
    print("\n" + markdown(result) + f"\n{machine()}")
    if args.json:
        caveats = [*_reuse_caveat(args), *args.caveats]
        write_record(args.json, "dylora", meta, result, caveats=caveats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
