"""``moracl bench adapters``: training-step cost of the adapter kinds against the frozen
floor, full fine-tuning and PEFT, on one Llama-style model in one process.

Every method trains the same model on the same batch: forward, backward, AdamW step.  The
floor is the frozen base with activation gradients only (gradients flow to the input
embeddings; no parameter trains).  Run on a GPU with ``--size h100``; ``--size cpu`` (the
default without a GPU) is a small model that finishes in under a minute.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from moracl.adapters.adalora import RankBudgetHooks
from moracl.adapters.delta_lora import DeltaLoRAUpdater
from moracl.bench.common import (
    PROJECTIONS,
    LlamaShape,
    bench_parser,
    build_llama,
    command_argv,
    device_and_size,
    free,
    machine,
    markdown_table,
    record_meta,
    time_steps,
    write_record,
)
from moracl.quant import quantize_base

__all__ = ["METHODS", "SIZES", "caveats", "main", "markdown", "parse_args", "run"]

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
    "moracl-qlora",
    "moracl-mora-sharing",
    "moracl-mora-rotation",
    "moracl-dora",
    "moracl-dylora",
    "moracl-delta-lora",
    "moracl-adalora",
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
    if kind == "qlora":  # LoRA over projections stored in NF4; scales of scales per 64 blocks
        # (QLoRA's 256 does not divide the cpu size's 688-wide MLP; 0.006 bits a weight more)
        kind, base = "lora", quantize_base(base, target_modules=PROJECTIONS, scaler_block_size=64)
    lora_like = ("lora", "dora", "dylora", "delta-lora")
    options: dict[str, Any] = {"alpha": 2 * rank} if kind in lora_like else {}
    if kind == "delta-lora":  # the frozen-weight update from the first step on, so it is timed
        kind, options = "delta_lora", {**options, "start_step": 0}
    if kind == "adalora":  # from the initial rank (compare moracl-lora) to half of it
        options = {"alpha": 2 * rank, "target_rank": max(1, rank // 2)}
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
    budget = None
    if opt is not None:  # Delta-LoRA's frozen-weight update after each step (hooks on opt)
        DeltaLoRAUpdater.attach(model, opt)
        # AdaLoRA in its costliest phase: importance and reallocation at every step
        budget = RankBudgetHooks.attach(model, opt, total_steps=10**9)
    autocast = dtype in (torch.bfloat16, torch.float16)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = model(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        if budget is not None:
            budget.regularize()  # the orthogonality loss's gradients
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
        del base  # the model holds what it uses (QLoRA: not the dense weights it replaced)
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
        del model, step, embeds
    floor = next((float(r["ms"]) for r in results if r["method"] == "floor"), None)
    for r in results:
        # None where the floor was not run (the table prints a dash)
        r["x_floor"] = float(r["ms"]) / floor if floor else None
        r["tokens_per_s"] = int(r["tokens"]) / (float(r["ms"]) / 1e3)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench adapters`` (a bad one: argparse's usage and
    error, exit status 2)."""
    parser = bench_parser("moracl bench adapters", __doc__, METHODS, sorted(SIZES))
    args: argparse.Namespace = parser.parse_args(argv)
    return args


def markdown(result: dict[str, Any], machine_line: str | None = None) -> str:
    """The benchmark's table from its ``--json`` results: a heading naming the size, shape,
    rank and precision (and the machine, when ``machine_line`` is given), then one row per
    method."""
    rows = [
        [
            r["method"],
            f"{r['ms']:.1f}",
            "—" if r["x_floor"] is None else f"{r['x_floor']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_gib']:.2f}",
            f"{r['trainable']:,}",
        ]
        for r in result["results"]
    ]
    head = (
        f"### adapters, size {result['size']}: {result['shape']}, r={result['rank']}, "
        f"{result['precision']}"
    )
    table = markdown_table(
        ["method", "ms/step", "× floor", "tokens/s", "peak GiB", "trainable"], rows
    )
    return f"{head}\n{machine_line}\n\n{table}" if machine_line else f"{head}\n\n{table}"


def caveats(size: str, steps: int, warmup: int) -> list[str]:
    """The record's own caveats (here and in the experts benchmark): how the times were
    taken, and what a CPU run stands for."""
    notes = [
        f"median of {steps} steps after {warmup} warm-up steps; methods timed one after "
        "another in one process"
    ]
    if size == "cpu":
        notes.append("size cpu: a small model on the CPU, a smoke test of the GPU benchmark")
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    device, size = device_and_size(args)
    meta = record_meta("adapters", argv, device=device) if args.json else {}
    methods = args.methods or [m for m in METHODS if not m.startswith("peft") or _has_peft()]
    if device.type == "cpu":
        torch.manual_seed(0)
    rows = run(size, methods, args.rank, args.steps, args.warmup, device)
    result = {
        "size": size,
        "shape": str(SIZES[size]),
        "rank": args.rank,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "device": machine(device),
        "results": rows,
    }
    print("\n" + markdown(result, machine(device)))
    if args.json:
        notes = [*caveats(size, args.steps, args.warmup), *args.caveats]
        write_record(args.json, "adapters", meta, result, caveats=notes)
    return 0


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
