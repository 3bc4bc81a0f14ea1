"""``moracl bench experts``: training-step cost of mixtures of adapter experts against the
frozen floor, a single LoRA, the naive per-expert loop and PEFT, on the adapter benchmark's
model (one process, same batch).

Task routing gives each sequence a task (4 tasks owning 2 experts each) and is compared with
a single LoRA of rank k·r = 32. ``top2-of-8-per-sample`` routes each sequence as a whole (by
the mean of its tokens' inputs) instead of each token. ``mora-top2-of-8-plain`` is
``mora-top2-of-8`` with the routed MoRA node's gating helpers uncompiled
(``MoRABank.compile_helpers = False``): the A/B of their GPU passes against their host time;
``mora-top2-of-8-dynamic`` compiles them shape-generic (``MoRABank.helpers_dynamic = None``,
torch's default) rather than one kernel per layer shape. ``hierarchical-2x4-compiled`` routes
under the ``compiled`` backend (the closed form under ``torch.compile``) where
``hierarchical-2x4`` takes the Triton kernels.

The ``act-*`` rows time adaptive computation (a top-2-of-8 mixture MLP of the model's sizes
repeated under a halting unit, at most 4 steps) with every token through every step and with
each step on the still-running tokens only, in training and at inference; see
:mod:`moracl.bench.experts_act`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from moracl.bench.adapters import SIZES, caveats
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
from moracl.bench.experts_act import ACT_METHODS, act_markdown, add_ratios, make_act_step

__all__ = ["METHODS", "main", "make_step", "markdown", "parse_args", "run"]

METHODS = [
    "floor",
    "lora-r16",
    "lora-r32",
    "top2-of-8",
    "top2-of-8-per-sample",
    "dynamic",
    "task",
    "hierarchical-2x4",
    "hierarchical-2x4-compiled",
    "mora-top2-of-8",
    "mora-top2-of-8-plain",
    "mora-top2-of-8-dynamic",
    "naive-top2-of-8",
    "peft-lora",
    *ACT_METHODS,
]


def _wrap(method: str, base: nn.Module, rank: int) -> nn.Module:
    from moracl import AdapterConfig, LoRAConfig, MoRAModel
    from moracl.experts.backend import RoutingBackend
    from moracl.experts.mixture import ExpertGroup, MixtureConfig
    from moracl.experts.routers.config import RouterConfig

    if method == "floor":
        return base
    if method == "peft-lora":
        import peft

        return peft.get_peft_model(
            base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS)
        )
    if method.startswith("lora-r"):
        r = int(method.removeprefix("lora-r"))
        return MoRAModel(base, LoRAConfig(rank=r, alpha=2.0 * r), target_modules=PROJECTIONS)
    routers = {
        "top2-of-8": RouterConfig(type="topk", k=2),
        "top2-of-8-per-sample": RouterConfig(type="topk", k=2, per="sample"),
        "naive-top2-of-8": RouterConfig(type="topk", k=2),
        "mora-top2-of-8": RouterConfig(type="topk", k=2),
        "mora-top2-of-8-plain": RouterConfig(type="topk", k=2),
        "mora-top2-of-8-dynamic": RouterConfig(type="topk", k=2),
        "dynamic": RouterConfig(type="dynamic", top_p=0.5, max_experts=4),
        "task": RouterConfig(type="task", num_tasks=4),
        "hierarchical-2x4": RouterConfig(type="hierarchical", groups=2, k=2),
        "hierarchical-2x4-compiled": RouterConfig(type="hierarchical", groups=2, k=2),
    }
    kind = "mora" if method.startswith("mora") else "lora"
    options = {} if kind == "mora" else {"alpha": 2.0 * rank}
    expert = AdapterConfig.from_dict({"kind": kind, "rank": rank, **options})
    backend = RoutingBackend.NAIVE if method.startswith("naive") else RoutingBackend.AUTO
    if method.endswith("-compiled"):  # the closed form under torch.compile, not the kernels
        backend = RoutingBackend.COMPILED
    cfg = MixtureConfig(router=routers[method], groups=(ExpertGroup(expert, 8),), backend=backend)
    model = MoRAModel(base, cfg, target_modules=PROJECTIONS)
    if method.startswith("mora-") and method != "mora-top2-of-8":  # the helpers' A/B rows
        from moracl.adapters.mora.bank import MoRABank

        for bank in model.modules():
            if isinstance(bank, MoRABank):
                bank.compile_helpers = not method.endswith("-plain")
                bank.helpers_dynamic = None if method.endswith("-dynamic") else False
    return model


def make_step(
    method: str,
    shape: LlamaShape,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    ids: torch.Tensor,
    task_ids: torch.Tensor,
    compile: bool = False,
    graphs: bool = False,
) -> tuple[Callable[[], None], list[nn.Parameter]]:
    """One training step of ``method`` on a fresh benchmark model (forward with the routers'
    auxiliary losses, backward, AdamW) and its trainable parameters."""
    base = build_llama(shape, device, dtype)
    with torch.no_grad():
        embeds = cast(Any, base).get_input_embeddings()(ids)
    embeds.requires_grad_(True)
    model = _wrap(method, base, rank).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if compile:
        model = cast(nn.Module, torch.compile(model))
    extra = {"task_ids": task_ids} if method == "task" else {}
    cuda = device.type == "cuda"  # fused AdamW (one kernel for every tensor) where it exists
    opt = (
        torch.optim.AdamW(params, lr=1e-5, fused=cuda, foreach=not cuda, capturable=graphs)
        if params
        else None
    )
    aux = getattr(getattr(model, "_orig_mod", model), "aux_loss", None)

    def step() -> None:
        with torch.autocast(
            device.type, dtype=dtype, enabled=device.type == "cuda", cache_enabled=not graphs
        ):
            loss = model(inputs_embeds=embeds, labels=ids, **extra).loss
            if aux is not None:
                loss = loss + aux()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        embeds.grad = None

    return step, params


def run(
    size: str,
    methods: list[str],
    rank: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compile: bool = False,
    graphs: bool = False,
) -> list[dict[str, Any]]:
    shape = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    task_ids = (torch.arange(shape.batch) % 4).to(device)
    results: list[dict[str, Any]] = []
    for method in methods:
        free(device)
        if method in ACT_METHODS:  # graphs: the inference rows only; never compiled
            step, params, mean_steps = make_act_step(method, shape, rank, device, dtype, graphs)
            t = time_steps(step, device, warmup=warmup, steps=steps)
            results.append(
                {
                    "method": method,
                    "ms": t.ms,
                    "peak_gib": t.peak_bytes / 2**30,
                    "trainable": sum(p.numel() for p in params),
                    "mean_steps": mean_steps(),
                }
            )
            del step, params
            continue
        step, params = make_step(method, shape, rank, device, dtype, ids, task_ids, compile, graphs)
        if graphs:
            from moracl.cuda_graphs import GraphedStep

            torch.cuda.reset_peak_memory_stats(device)
            graphed = GraphedStep(step, warmup=warmup)  # the graph's memory is taken here
            capture_peak = torch.cuda.max_memory_allocated(device)
            t = time_steps(graphed, device, warmup=1, steps=steps)
            t = dataclasses.replace(t, peak_bytes=max(t.peak_bytes, capture_peak))
            del graphed
        else:
            t = time_steps(step, device, warmup=warmup, steps=steps)
        results.append(
            {
                "method": method,
                "ms": t.ms,
                "peak_gib": t.peak_bytes / 2**30,
                "trainable": sum(p.numel() for p in params),
            }
        )
        del step, params
    ref = {r["method"]: float(r["ms"]) for r in results}
    for r in results:
        # None where the reference method was not run (the table prints a dash), and for the
        # ACT rows (a block, not the model)
        act = r["method"] in ACT_METHODS
        r["x_floor"] = float(r["ms"]) / ref["floor"] if "floor" in ref and not act else None
        r["x_lora"] = float(r["ms"]) / ref["lora-r16"] if "lora-r16" in ref and not act else None
        r["tokens_per_s"] = shape.tokens / (float(r["ms"]) / 1e3)
    add_ratios(results)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench experts`` (a bad one: argparse's usage and
    error, exit status 2)."""
    parser = bench_parser("moracl bench experts", __doc__, METHODS, sorted(SIZES))
    parser.add_argument(
        "--compile", action="store_true", help="time torch.compile(model) for every method"
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="capture every method's whole step as a CUDA graph (moracl.cuda_graphs)",
    )
    parser.add_argument(
        "--kernels-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="A/B the Triton routing kernels: ROUNDS rounds of every method without them "
        "(routing backend 'compiled'), then with them ('triton'), in this process",
    )
    args: argparse.Namespace = parser.parse_args(argv)
    device, _ = device_and_size(args)
    if args.graphs and device.type != "cuda":
        parser.error(f"--graphs needs a CUDA device, got --device {device}")
    if args.kernels_ab < 0:
        parser.error(f"--kernels-ab takes a number of rounds >= 0, got {args.kernels_ab}")
    return args


def markdown(result: dict[str, Any], machine_line: str | None = None) -> str:
    """The benchmark's table from its ``--json`` results: a heading naming the size, shape,
    rank and mode (and the machine, when ``machine_line`` is given), then one row per
    method; the ACT rows, when run, in a table of their own after it."""
    rows = [
        [
            r["method"],
            f"{r['ms']:.1f}",
            "—" if r["x_floor"] is None else f"{r['x_floor']:.2f}",
            "—" if r["x_lora"] is None else f"{r['x_lora']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_gib']:.2f}",
            f"{r['trainable']:,}",
        ]
        for r in result["results"]
        if r["method"] not in ACT_METHODS
    ]
    head = (
        f"### experts, size {result['size']}: {result['shape']}, r={result['rank']}, "
        f"{result['mode']}"
    )
    table = markdown_table(
        ["method", "ms/step", "× floor", "× LoRA r16", "tokens/s", "peak GiB", "trainable"],
        rows,
    )
    act = act_markdown(result["results"])
    table += f"\n\n{act}" if act else ""
    return f"{head}\n{machine_line}\n\n{table}" if machine_line else f"{head}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    device, size = device_and_size(args)
    meta = record_meta("experts", argv, device=device) if args.json else {}
    methods = args.methods or METHODS
    if args.kernels_ab:
        return _kernels_ab(size, methods, args, device)
    rows = run(size, methods, args.rank, args.steps, args.warmup, device, args.compile, args.graphs)
    mode = "torch.compile(model)" if args.compile else "eager"
    mode += ", CUDA graph of the whole step" if args.graphs else ""
    result = {
        "size": size,
        "shape": str(SIZES[size]),
        "rank": args.rank,
        "mode": mode,
        "device": machine(device),
        "results": rows,
    }
    print("\n" + markdown(result, machine(device)))
    if args.json:
        notes = [*caveats(size, args.steps, args.warmup), *args.caveats]
        write_record(args.json, "experts", meta, result, caveats=notes)
    return 0


def _kernels_ab(size: str, methods: list[str], args: Any, device: torch.device) -> int:
    """Alternate rounds without and with the Triton routing kernels (the routing backends
    ``compiled`` and ``triton``); print ms per step."""
    from moracl.experts.backend import RoutingBackend, routing_backend

    rows = []
    for round_ in range(args.kernels_ab):
        for backend, label in (
            (RoutingBackend.COMPILED, "without"),
            (RoutingBackend.TRITON, "with"),
        ):
            with routing_backend(backend):
                for r in run(
                    size, methods, args.rank, args.steps, args.warmup, device, args.compile,
                    args.graphs,
                ):  # fmt: skip
                    rows.append([str(round_ + 1), r["method"], label, f"{r['ms']:.2f}"])
    print(f"\n### routing kernels A/B, size {size}\n{machine(device)}\n")
    print(markdown_table(["round", "method", "kernels", "ms/step"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
