"""``moracl bench dylora``: one DyLoRA trained at rank ``r`` and evaluated at each ``b``,
against a LoRA trained at each rank ``b``, on WordNet glosses with the MiniLM encoder.

The bottom ``--frozen-layers`` layers of MiniLM run once per gloss (their outputs are
cached); the adapters go on the query and value projections of the layers above, which train
with a linear head (``moracl finetune``'s training loop: AdamW, ``--lr`` for the adapters and
``--head-lr`` for the head). Every model starts from the same seed and sees the same batches;
DyLoRA draws its rank at each step and is then evaluated with ``set_rank(b)``, without
retraining. LoRA at rank ``b`` uses the same ``alpha``, so its scaling ``alpha / b`` is that of
DyLoRA truncated to ``b``. Offline; the default size (five trainings per seed) takes about
13 minutes per seed on two CPU cores (the test split has 300 glosses: one gloss is 0.33
points, so compare means over ``--seeds``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor, nn

from moracl.bench.common import (
    add_caveat_arg,
    command_argv,
    machine,
    markdown_table,
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


def _data(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor, nn.Module, int]:
    """Cached hidden states and labels of the train and test glosses, the top of MiniLM and
    its feature width."""
    from moracl_scenarios.wordnet import wordnet_classification

    from moracl.backbones import MiniLMTop, load_minilm, minilm_prefix_states

    train, test = wordnet_classification(
        list(args.categories),
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
    )
    encoder, tokenizer = load_minilm()
    for p in encoder.parameters():
        p.requires_grad_(False)

    def states(split: Any) -> Tensor:
        texts = list(split["text"][:])
        return minilm_prefix_states(
            texts, args.frozen_layers, args.max_length, model=encoder, tokenizer=tokenizer
        )  # (n, n_tok, d + 1)

    top = MiniLMTop(encoder, args.frozen_layers)
    return (
        states(train),
        torch.tensor(train["label"][:]),
        states(test),
        torch.tensor(test["label"][:]),
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


def run_seed(args: argparse.Namespace) -> dict[str, Any]:
    """Train DyLoRA at ``args.rank`` once and LoRA at each of ``args.ranks`` (data split,
    initialisation and batches from ``args.seed``); test accuracy per rank (fractions) with
    each model's training time."""
    from moracl import AdapterConfig, LoRAConfig, MoRAModel
    from moracl.adapters.dylora import DyLoRAConfig, set_rank
    from moracl.backbones import MINILM_TARGETS

    x_train, y_train, x_test, y_test, top, features = _data(args)
    classes = len(args.categories)

    def adapted(config: AdapterConfig) -> MoRAModel:
        torch.manual_seed(args.seed)  # the same head and the same leading rows of A
        classifier = _Classifier(top, features, classes)
        return MoRAModel(
            classifier, config, target_modules=list(MINILM_TARGETS), modules_to_save=["head"]
        )

    dylora = adapted(DyLoRAConfig(rank=args.rank, alpha=args.alpha, seed=args.seed))
    seconds, steps = _train(dylora, x_train, y_train, args)
    rows: list[dict[str, Any]] = []
    for b in args.ranks:
        set_rank(dylora, b)
        rows.append({"rank": b, "dylora": _accuracy(dylora, x_test, y_test)})
    for row in rows:
        lora = adapted(LoRAConfig(rank=row["rank"], alpha=args.alpha))
        row["lora_seconds"], _ = _train(lora, x_train, y_train, args)
        row["lora"] = _accuracy(lora, x_test, y_test)
    return {
        "seed": args.seed,
        "train": len(y_train),
        "test": len(y_test),
        "steps": steps,
        "dylora_seconds": seconds,
        "results": rows,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_seed` for each of ``args.seeds``, and per rank the mean accuracies and the
    mean and standard deviation of the gap (DyLoRA − LoRA, fractions) over the seeds."""
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        runs.append(run_seed(argparse.Namespace(**{**vars(args), "seed": seed})))
    summary = []
    for i, b in enumerate(args.ranks):
        dy = torch.tensor([r["results"][i]["dylora"] for r in runs], dtype=torch.float64)
        lo = torch.tensor([r["results"][i]["lora"] for r in runs], dtype=torch.float64)
        gap = dy - lo  # (seeds,)
        summary.append(
            {
                "rank": b,
                "dylora": float(dy.mean()),
                "lora": float(lo.mean()),
                "gap": float(gap.mean()),
                "gap_std": float(gap.std()) if len(gap) > 1 else 0.0,
                "gaps": gap.tolist(),
            }
        )
    return {
        "categories": list(args.categories),
        "train": runs[0]["train"],
        "test": runs[0]["test"],
        "rank": args.rank,
        "alpha": args.alpha,
        "epochs": args.epochs,
        "lr": args.lr,
        "seeds": list(args.seeds),
        "steps": runs[0]["steps"],
        "runs": runs,
        "results": summary,
    }


def markdown(result: dict[str, Any]) -> str:
    """A heading naming the task and one row per rank: both accuracies (means over the
    seeds), the mean gap with its standard deviation, and each seed's gap."""
    seeds = result.get("seeds", [0])
    rows = []
    for r in result["results"]:
        gap = r.get("gap", r["dylora"] - r["lora"])
        gaps = r.get("gaps", [gap])
        rows.append(
            [
                r["rank"],
                f"{100 * r['dylora']:.1f}",
                f"{100 * r['lora']:.1f}",
                f"{100 * gap:+.1f} ± {100 * r.get('gap_std', 0.0):.1f}",
                " ".join(f"{100 * g:+.1f}" for g in gaps),
            ]
        )
    head = (
        f"### DyLoRA r={result['rank']} (trained once) vs LoRA trained at each rank, "
        f"alpha={result['alpha']}: {len(result['categories'])} WordNet categories, "
        f"{result['train']} training / {result['test']} test glosses, {result['epochs']} epochs, "
        f"mean of {len(seeds)} seed(s) {seeds}"
    )
    table = markdown_table(
        ["rank b", "DyLoRA at b (%)", "LoRA at b (%)", "gap (points)", "gap per seed"], rows
    )
    return f"{head}\n\n{table}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench dylora`` (a bad one: argparse's usage and error,
    exit status 2)."""
    parser = argparse.ArgumentParser(prog="moracl bench dylora", description=__doc__)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--per-class", type=positive_int, default=80)
    parser.add_argument("--test-per-class", type=positive_int, default=60)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--frozen-layers", type=int, default=4, help="MiniLM layers cached")
    parser.add_argument("--max-length", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=6)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="mean over these")
    parser.add_argument("--json", default=None, help="also write the results here")
    add_caveat_arg(parser)
    args: argparse.Namespace = parser.parse_args(argv)
    bad = [b for b in args.ranks if b > args.rank]
    if bad:
        parser.error(f"--ranks {bad} exceed --rank {args.rank}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    meta = record_meta("dylora", argv) if args.json else {}
    result = run(args)
    print("\n" + markdown(result) + f"\n{machine()}")
    if args.json:
        write_record(args.json, "dylora", meta, result, caveats=args.caveats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
