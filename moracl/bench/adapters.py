"""``moracl bench adapters``: training-step cost of the adapter kinds against the frozen
floor, full fine-tuning and PEFT, on one Llama-style model in one process.

Every method trains the same model on the same batch: forward, backward, AdamW step.  The
floor is the frozen base with activation gradients only (gradients flow to the input
embeddings; no parameter trains).  Run on a GPU with ``--size h100``; ``--size cpu`` (the
default without a GPU) is a small model that finishes in under a minute.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from moracl.bench.common import (
    PROJECTIONS,
    LlamaShape,
    bench_parser,
    build_llama,
    device_and_size,
    free,
    machine,
    markdown_table,
    time_steps,
)

SIZES = {
    "h100": LlamaShape(),
    "h100-1024": LlamaShape(hidden=1024, intermediate=2816, heads=16),
    "cpu": LlamaShape(
        hidden=256, layers=2, intermediate=688, heads=4, vocab=1000, batch=2, seq=128
    ),
}

METHODS = [
    "floor",
    "full",
    "moracl-lora",
    "moracl-mora-sharing",
    "moracl-mora-rotation",
    "moracl-dora",
    "peft-lora",
    "peft-dora",
]


def _wrap(method: str, base: nn.Module, rank: int) -> nn.Module:
    """The model a method trains (adapters fp32 on a half base, as PEFT does)."""
    if method in ("floor", "full"):
        if method == "full":
            for p in base.parameters():
                p.requires_grad_(True)
        return base
    if method.startswith("peft-"):
        import peft

        cfg = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=PROJECTIONS,
            lora_dropout=0.0,
            use_dora=method == "peft-dora",
        )
        return peft.get_peft_model(base, cfg)
    from moracl import AdapterConfig, MoRAModel

    kind = method.removeprefix("moracl-")
    options: dict[str, Any] = {"alpha": 2 * rank} if kind in ("lora", "dora") else {}
    if kind.startswith("mora-"):
        kind, options = "mora", {"compression": kind.split("-")[1]}
    return MoRAModel(
        base, AdapterConfig(kind=kind, rank=rank, **options), target_modules=PROJECTIONS
    )


def _step_fn(
    model: nn.Module,
    embeds: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Callable[[], None], int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True) if params else None
    autocast = dtype in (torch.bfloat16, torch.float16)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        embeds.grad = None

    return step, sum(p.numel() for p in params)


def run(
    size: str, methods: list[str], rank: int, steps: int, warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    shape = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    results: list[dict[str, Any]] = []
    for method in methods:
        free(device)
        base = build_llama(shape, device, dtype)
        with torch.no_grad():
            embeds = cast(Any, base).get_input_embeddings()(ids)
        embeds.requires_grad_(True)
        model = _wrap(method, base, rank).train()
        step, trainable = _step_fn(model, embeds, ids, dtype, device)
        t = time_steps(step, device, warmup=warmup, steps=steps)
        results.append(
            {
                "method": method,
                "ms": t.ms,
                "peak_gib": t.peak_bytes / 2**30,
                "trainable": trainable,
                "tokens": shape.tokens,
            }
        )
        del model, base, step, embeds
    floor = next((float(r["ms"]) for r in results if r["method"] == "floor"), None)
    for r in results:
        r["x_floor"] = float(r["ms"]) / floor if floor else float("nan")
        r["tokens_per_s"] = int(r["tokens"]) / (float(r["ms"]) / 1e3)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench adapters`` (a bad one: argparse's usage and
    error, exit status 2)."""
    parser = bench_parser("moracl bench adapters", __doc__, METHODS, sorted(SIZES))
    args: argparse.Namespace = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, size = device_and_size(args)
    methods = args.methods or [m for m in METHODS if not m.startswith("peft") or _has_peft()]
    if device.type == "cpu":
        torch.manual_seed(0)
    results = run(size, methods, args.rank, args.steps, args.warmup, device)
    shape = SIZES[size]
    print(
        f"\n### adapters, size {size}: {shape}, r={args.rank}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}\n{machine(device)}\n"
    )
    rows = [
        [
            r["method"],
            f"{r['ms']:.1f}",
            f"{r['x_floor']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_gib']:.2f}",
            f"{r['trainable']:,}",
        ]
        for r in results
    ]
    print(
        markdown_table(["method", "ms/step", "× floor", "tokens/s", "peak GiB", "trainable"], rows)
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": size, "device": machine(device), "results": results}, fh, indent=2)
    return 0


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
